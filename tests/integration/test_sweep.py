"""The sweep on SQLite and PostgreSQL, sending to a real Redis broker (no worker runs
here, so what was sent stays in the queues to be counted): stuck steps are sent again
or fail their workflow, and two sweeps at once have one effect."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from chassis import config
from chassis.api import Client
from chassis.config import Settings
from chassis.state import request_id_for
from chassis.store.db import make_engine
from chassis.store.sql import now
from chassis.store.tables import orchestrator_state, outbox, step_runs
from chassis.sweep import SWEEP_LOCK_KEY, Sweeper, SweepReport

pytestmark = pytest.mark.timeout(120)

QUEUES = ("chassis.steps", "chassis.coordination", "chassis.ai")
LINEAR = {"start_step": "work", "steps": {
    "work": {"action": "noop", "next_step": "done"},
    "done": {"action": "complete_workflow"}}}


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    s = config.load({"CHASSIS_DATABASE_URL": db_url, "CHASSIS_BROKER_URL": redis_url,
                     "CHASSIS_HOME": str(tmp_path), "CHASSIS_STEP_TIMEOUT": "60",
                     "CHASSIS_STEP_MAX_ATTEMPTS": "3"})
    yield s
    r = redis.Redis.from_url(redis_url)
    r.delete(*QUEUES)  # nothing of ours for a later module's worker
    r.close()


@pytest.fixture
def client(settings: Settings) -> Client:
    return Client(settings)


def sent(settings: Settings, task_id: str | None = None, task: str | None = None) -> int:
    """Messages waiting in the broker for this task id (or task name)."""
    r = redis.Redis.from_url(settings.broker_url)
    try:
        heads = [json.loads(m)["headers"] for q in QUEUES for m in r.lrange(q, 0, -1)]
    finally:
        r.close()
    return sum(1 for h in heads if (task_id is None or h["id"] == task_id)
               and (task is None or h["task"] == task))


def age(settings: Settings, cid: str, seconds: float = 3600) -> None:
    """Pretend the workflow's steps were dispatched (and started) ``seconds`` ago."""
    old = now() - timedelta(seconds=seconds)
    with make_engine(settings.database_url).begin() as conn:
        conn.execute(step_runs.update().where(step_runs.c.correlation_id == cid).values(
            dispatched_at=old, started_at=sa.case((step_runs.c.started_at.is_(None), None),
                                                  else_=old)))
        conn.execute(orchestrator_state.update()
                     .where(orchestrator_state.c.correlation_id == cid).values(updated_at=old))


def sweep_twice_at_once(client: Client, settings: Settings) -> list[SweepReport]:
    """Two sweeps started together, as two beats by mistake would."""
    barrier = threading.Barrier(2)
    reports: list[SweepReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            reports.append(Sweeper(client.engine, settings).sweep())
        except BaseException as exc:  # noqa: BLE001  (re-raised below)
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return reports


def step_row(client: Client, cid: str, step: str) -> dict[str, Any]:
    return next(r for r in client.store.steps(cid) if r["step_name"] == step)


def failures(settings: Settings, cid: str) -> int:
    with make_engine(settings.database_url).connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(outbox).where(
            outbox.c.correlation_id == cid,
            outbox.c.dedup_key == f"{cid}:WORKFLOW_FAILED")).scalar_one()


def test_fresh_steps_are_left_alone(client: Client, settings: Settings) -> None:
    cid = client.start(LINEAR, client_id="acme")
    assert Sweeper(client.engine, settings).sweep().counts() == {
        "redispatched": 0, "failed": 0, "locked_out": 0}
    assert sent(settings, request_id_for(cid, "work")) == 1


def test_a_lost_step_is_sent_again_once_by_two_sweeps(client: Client,
                                                      settings: Settings) -> None:
    cid = client.start(LINEAR, client_id="acme")
    rid = request_id_for(cid, "work")
    age(settings, cid)
    reports = sweep_twice_at_once(client, settings)
    assert sum(len(r.redispatched) for r in reports) == 1
    assert sent(settings, rid) == 2  # the original and one more
    assert step_row(client, cid, "work")["status"] == "DISPATCHED"
    # sent again just now: not stuck any more
    assert Sweeper(client.engine, settings).sweep().redispatched == []
    assert sent(settings, rid) == 2


def test_a_running_step_with_attempts_left_is_sent_again(client: Client,
                                                         settings: Settings) -> None:
    cid = client.start(LINEAR, client_id="acme")
    assert client.store.claim_step(cid, "work", "t-1") == 1
    age(settings, cid)
    report = Sweeper(client.engine, settings).sweep()
    assert report.redispatched == [f"{cid}/work"] and report.failed == []
    assert sent(settings, request_id_for(cid, "work")) == 2
    assert client.status(cid)["status"] == "RUNNING"


def test_a_step_out_of_attempts_fails_the_workflow_once(client: Client,
                                                        settings: Settings) -> None:
    cid = client.start(LINEAR, client_id="acme")
    for attempt in (1, 2, 3):
        assert client.store.claim_step(cid, "work", f"t-{attempt}") == attempt
    age(settings, cid)
    version = client.store.get(cid).version
    reports = sweep_twice_at_once(client, settings)
    assert sum(len(r.failed) for r in reports) == 1
    assert sum(len(r.redispatched) for r in reports) == 0
    doc = client.status(cid)
    assert doc["status"] == "FAILED"
    assert doc["error"] == "step 'work' timed out after 60 s (attempt 3 of 3)"
    assert doc["version"] == version + 1  # one transition
    assert step_row(client, cid, "work")["status"] == "FAILED"
    assert failures(settings, cid) == 1  # the WORKFLOW_FAILED event, in the outbox
    assert sent(settings, request_id_for(cid, "work")) == 1


def test_an_unanswered_external_agent_fails_the_workflow(client: Client,
                                                         settings: Settings) -> None:
    plan = {"start_step": "ask", "steps": {
        "ask": {"action": "research", "topic": "agents.research", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    assert client.status(cid)["status"] == "AWAITING_RESPONSES"
    age(settings, cid)
    assert Sweeper(client.engine, settings).sweep().failed == [f"{cid}/ask"]
    doc = client.status(cid)
    assert doc["status"] == "FAILED"
    assert doc["error"] == "step 'ask' timed out after 60 s waiting for the agent's response"
    assert failures(settings, cid) == 1


def test_a_stuck_fan_out_is_sent_again_then_fails(client: Client, settings: Settings) -> None:
    plan = {"start_step": "fan", "steps": {
        "fan": {"action": "fan_out", "next_step": "done",
                "sub_tasks": [{"step_name": "a", "action": "noop"},
                              {"step_name": "b", "action": "noop"}]},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    assert sent(settings, task="chassis.fanout") == 1  # the app hands the chord to a worker
    strict = config.load({"CHASSIS_DATABASE_URL": settings.database_url,
                          "CHASSIS_BROKER_URL": settings.broker_url,
                          "CHASSIS_HOME": str(settings.home), "CHASSIS_STEP_TIMEOUT": "60",
                          "CHASSIS_STEP_MAX_ATTEMPTS": "2"})
    age(settings, cid)
    assert Sweeper(client.engine, strict).sweep().redispatched == [f"{cid}/fan"]
    assert sent(settings, task="chassis.fanout") == 2
    assert {step_row(client, cid, s)["attempts"] for s in "ab"} == {1}
    age(settings, cid)
    assert Sweeper(client.engine, strict).sweep().failed == [f"{cid}/a"]
    doc = client.status(cid)
    assert doc["status"] == "FAILED" and "timed out after 60 s (2 sends of fan-out 'fan')" \
        in doc["error"]
    assert {s["name"]: s["status"] for s in doc["steps"]} == {
        "fan": "FAILED", "a": "FAILED", "b": "DISPATCHED"}


def test_a_workflow_waiting_for_dependencies_that_never_come_fails(
        client: Client, settings: Settings) -> None:
    plan = {"start_step": "wait", "steps": {
        "never": {"action": "noop"},
        "wait": {"action": "noop", "dependencies": ["never"]}}}
    cid = client.start(plan, client_id="acme")
    assert client.status(cid)["status"] == "RUNNING"
    assert Sweeper(client.engine, settings).sweep().failed == []  # not old enough
    age(settings, cid)
    assert Sweeper(client.engine, settings).sweep().failed == [f"{cid}/wait"]
    assert client.status(cid)["error"] == (
        "step 'wait' timed out after 60 s waiting for its dependencies: never")


def test_paused_and_finished_workflows_are_left_alone(client: Client,
                                                      settings: Settings) -> None:
    plan = {"start_step": "review", "steps": {
        "review": {"action": "pause_for_human_input", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    paused = client.start(plan, client_id="acme")
    failed = client.start({"start_step": "x", "steps": {"x": {
        "action": "fan_out", "sub_tasks": [{"step_name": "y", "action": "noop"}]}}},
        client_id="acme", fuel_budget=1)  # fails at once: too little fuel
    assert client.status(failed)["status"] == "FAILED"
    for cid in (paused, failed):
        age(settings, cid)
    report = Sweeper(client.engine, settings).sweep()
    assert report.failed == [] and report.redispatched == []
    assert client.status(paused)["status"] == "PAUSED_FOR_HUMAN_INPUT"


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_on_postgresql_a_sweep_skips_while_another_holds_the_lock(
        db_url: str, client: Client, settings: Settings) -> None:
    """(SQLite has no advisory locks: there the conditional updates alone decide.)"""
    cid = client.start(LINEAR, client_id="acme")
    age(settings, cid)
    with make_engine(db_url).connect() as conn, conn.begin():
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": SWEEP_LOCK_KEY})
        report = Sweeper(client.engine, settings).sweep()
    assert report.locked_out and report.redispatched == []
    assert Sweeper(client.engine, settings).sweep().redispatched == [f"{cid}/work"]
