"""Retention (`chassis prune`), on SQLite and on PostgreSQL: finished workflows go with
their rows, in batches; running and paused ones stay; with Kafka, events not yet
published keep their workflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from chassis import coordinator as co
from chassis.celery_conf import PRUNE_TASK, beat_schedule
from chassis.config import load
from chassis.plan import parse_plan
from chassis.state import Status, WorkflowState
from chassis.store import SqlStore
from chassis.store.db import make_engine
from chassis.store.prune import prune
from chassis.store.tables import (
    fuel_ledger,
    orchestrator_state,
    outbox,
    step_attempts,
    step_outputs,
    step_runs,
    workflow_events,
)
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.timeout(120)

DONE = parse_plan({"start_step": "done", "steps": {"done": {"action": "complete_workflow"}}})
WORK = parse_plan({"start_step": "a", "steps": {
    "a": {"action": "echo", "next_step": "done"}, "done": {"action": "complete_workflow"}}})
PAUSE = parse_plan({"start_step": "p", "steps": {
    "p": {"action": "pause_for_human_input", "next_step": "done"},
    "done": {"action": "complete_workflow"}}})


def started(store: SqlStore, plan: object) -> str:
    cid = str(uuid.uuid4())
    s = WorkflowState(correlation_id=cid, client_id="c1", status=Status.RUNNING,
                      current_step=plan.start_step, fuel_budget=100)  # type: ignore[attr-defined]
    assert store.create(co.decide(s, plan, co.Start()), plan)  # type: ignore[arg-type]
    return cid


def rows(store: SqlStore, cid: str) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)
                                     .where(t.c.correlation_id == cid)).scalar_one()
                for t in (orchestrator_state, step_runs, fuel_ledger, outbox, step_outputs,
                          step_attempts, workflow_events)}


@pytest.fixture
def store(db_url: str) -> SqlStore:
    return SqlStore(make_engine(db_url))


def test_finished_workflows_go_with_their_rows_and_others_stay(store: SqlStore) -> None:
    completed = [started(store, DONE) for _ in range(7)]
    failed = started(store, WORK)
    store.transition(failed, lambda s, p: co.decide(s, p, co.StepFailed("a", "boom", 1)))
    paused, running = started(store, PAUSE), started(store, WORK)
    # (events: started, the debit, completed)
    assert rows(store, completed[0]) == {"orchestrator_state": 1, "step_runs": 1,
                                         "fuel_ledger": 1, "outbox": 1, "step_outputs": 0,
                                         "step_attempts": 1, "workflow_events": 3}
    assert rows(store, failed)["step_outputs"] == 0 and rows(store, failed)["step_attempts"]
    seen: list[int] = []
    dry = prune(store.engine, timedelta(0), kafka=False, dry_run=True, batch=3)
    assert (dry.workflows, dry.step_runs, dry.ledger_rows, dry.outbox_rows) == (8, 8, 8, 8)
    assert rows(store, completed[0])["orchestrator_state"] == 1  # a dry run removes nothing
    # recent ones stay
    assert prune(store.engine, timedelta(days=1), kafka=False).workflows == 0
    report = prune(store.engine, timedelta(0), kafka=False, batch=3,
                   progress=lambda r: seen.append(r.workflows))
    assert (report.workflows, report.step_runs, report.ledger_rows, report.outbox_rows) == (
        8, 8, 8, 8)
    assert seen == [3, 6, 8]  # in batches, progress after each
    for cid in [*completed, failed]:
        assert set(rows(store, cid).values()) == {0}
    for cid in (paused, running):
        assert rows(store, cid)["orchestrator_state"] == 1 and rows(store, cid)["step_runs"]
    assert store.get(paused).status is Status.PAUSED_FOR_HUMAN_INPUT
    assert prune(store.engine, timedelta(0), kafka=False).workflows == 0


def test_with_kafka_a_workflow_waits_until_its_events_are_published(store: SqlStore) -> None:
    cid = started(store, DONE)
    report = prune(store.engine, timedelta(0), kafka=True)
    assert (report.workflows, report.kept_unpublished) == (0, 1)
    with store.engine.begin() as conn:
        conn.execute(outbox.update().values(published_at=sa.func.now()))
    dry = prune(store.engine, timedelta(0), kafka=True, dry_run=True)
    report = prune(store.engine, timedelta(0), kafka=True)
    assert (report.workflows, report.outbox_rows, report.kept_unpublished) == (1, 1, 0)
    # a dry run counts what the run then removes (each outbox row once)
    assert (dry.workflows, dry.outbox_rows, dry.step_runs, dry.ledger_rows) == (
        report.workflows, report.outbox_rows, report.step_runs, report.ledger_rows)
    assert set(rows(store, cid).values()) == {0}


def test_the_command_line_and_beat(db_url: str, store: SqlStore) -> None:
    done, paused = started(store, DONE), started(store, PAUSE)
    env = {**os.environ, "CHASSIS_DATABASE_URL": db_url}
    env.pop("CHASSIS_KAFKA_BOOTSTRAP", None)

    def chassis(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "chassis", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    dry = chassis("prune", "--older-than", "0", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would remove 1 finished workflow")
    out = chassis("prune", "--older-than", "0", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["workflows"] == 1
    assert rows(store, done)["orchestrator_state"] == 0
    assert rows(store, paused)["orchestrator_state"] == 1
    for bad in (["--older-than", "-1"], ["--older-than", "abc"], []):
        refused = chassis("prune", *bad)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "chassis-prune" not in beat_schedule(load({}))
    entry = beat_schedule(load({"CHASSIS_PRUNE_AFTER_DAYS": "30"}))["chassis-prune"]
    assert entry["task"] == PRUNE_TASK
    assert entry["args"] == [30.0]  # beat's own setting travels with the task
    for bad in ("soon", "0"):  # the daily job removes nothing younger than a day
        env["CHASSIS_PRUNE_AFTER_DAYS"] = bad
        refused = chassis("prune", "--older-than", "1")
        assert refused.returncode == 2 and "CHASSIS_PRUNE_AFTER_DAYS" in refused.stderr


def test_beats_task_prunes_when_configured(db_url: str, store: SqlStore,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from chassis.celery_tasks import PRUNE_TASK as name
    from chassis.worker import app

    prune_task = app.tasks[name]

    done = started(store, DONE)
    monkeypatch.setenv("CHASSIS_DATABASE_URL", db_url)
    monkeypatch.delenv("CHASSIS_KAFKA_BOOTSTRAP", raising=False)
    assert prune_task.run(1)["workflows"] == 0  # a day: too young
    assert rows(store, done)["orchestrator_state"] == 1
    assert prune_task.run(0)["workflows"] == 1
    assert rows(store, done)["orchestrator_state"] == 0


def test_a_compensation_left_to_finish_keeps_its_workflow(store: SqlStore) -> None:
    plan = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "echo", "next_step": "b",
              "compensate": {"action": "echo", "retry": {"max_attempts": 1}}},
        "b": {"action": "echo", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    cid = started(store, plan)
    for event in (co.StepSucceeded("a", {}, 1), co.StepFailed("b", "boom", 1),
                  co.StepFailed("a/compensate", "undo broke", 1)):
        store.transition(cid, lambda s, p, e=event: co.decide(s, p, e))
    assert store.get(cid).status is Status.FAILED and store.get(cid).undo == [["a"]]
    assert prune(store.engine, timedelta(0), kafka=False).workflows == 0
    assert rows(store, cid)["orchestrator_state"] == 1
