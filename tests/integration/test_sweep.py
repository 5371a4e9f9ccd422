"""The sweep on SQLite and PostgreSQL, sending to a real Redis broker (no worker runs
here, so what was sent stays in the queues to be counted): due retries are sent,
overdue attempts fail, lost attempts and lost messages are sent again, forgotten
fan-ins are collected, and two sweeps at once have one effect."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from chassis import config
from chassis import coordinator as co
from chassis.api import Client
from chassis.config import Settings
from chassis.errors import InvalidTransition
from chassis.plan import parse_plan
from chassis.state import Status, WorkflowState
from chassis.store.db import make_engine
from chassis.store.sql import now
from chassis.store.tables import orchestrator_state, step_runs
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
                     "CHASSIS_MAX_DELIVERIES": "2"})
    drain(s)
    yield s
    drain(s)  # nothing of ours for a later module's worker


def drain(settings: Settings) -> None:
    """Empty the queues: the broker lost every message."""
    r = redis.Redis.from_url(settings.broker_url)
    r.delete(*QUEUES)
    r.close()


@pytest.fixture
def client(settings: Settings) -> Client:
    return Client(settings, client_id="acme")


def sent(settings: Settings, task_id: str | None = None, task: str | None = None) -> int:
    """Messages waiting in the broker for this task id (or task name)."""
    r = redis.Redis.from_url(settings.broker_url)
    try:
        heads = [json.loads(m)["headers"] for q in QUEUES for m in r.lrange(q, 0, -1)]
    finally:
        r.close()
    return sum(1 for h in heads if (task_id is None or h["id"] == task_id)
               and (task is None or h["task"] == task))


def age(settings: Settings, cid: str, seconds: float = 3600, **values: Any) -> None:
    """Pretend the workflow's attempts were sent (and started, and their leases and
    deadlines set) ``seconds`` earlier than they were."""
    c = step_runs.c
    shift = timedelta(seconds=seconds)
    with make_engine(settings.database_url).begin() as conn:
        for row in conn.execute(sa.select(c.id, c.dispatched_at, c.sent_at, c.started_at,
                                          c.lease_until, c.deadline, c.due_at)
                                .where(c.correlation_id == cid)).all():
            old = {k: getattr(row, k) - shift for k in ("dispatched_at", "sent_at",
                                                           "started_at", "lease_until",
                                                           "deadline", "due_at")
                   if getattr(row, k) is not None}
            conn.execute(step_runs.update().where(c.id == row.id).values(**old, **values))
        conn.execute(orchestrator_state.update()
                     .where(orchestrator_state.c.correlation_id == cid)
                     .values(updated_at=now() - shift))


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


def attempt_row(client: Client, cid: str, step: str, attempt: int = 1) -> dict[str, Any]:
    return next(r for r in client.store.steps(cid)
                if (r["step_name"], r["attempt"]) == (step, attempt))


def claim(client: Client, cid: str, step: str = "work", attempt: int = 1) -> None:
    assert client.store.claim(cid, step, attempt, "t-1", lease=15, timeout=60) is not None


def sweep(client: Client, settings: Settings) -> SweepReport:
    return Sweeper(client.engine, settings).sweep()


def test_fresh_steps_are_left_alone(client: Client, settings: Settings) -> None:
    cid = client.start(LINEAR, client_id="acme")
    assert not sweep(client, settings).acted
    assert sent(settings, client.store.get(cid).rid("work")) == 1


def test_a_lost_message_is_sent_again_once_by_two_sweeps(client: Client,
                                                         settings: Settings) -> None:
    cid = client.start(LINEAR, client_id="acme")
    rid = client.store.get(cid).rid("work")
    age(settings, cid, 100)
    assert not sweep(client, settings).acted  # its queue is busy: it may be waiting its turn
    drain(settings)  # the broker restarted empty
    reports = sweep_twice_at_once(client, settings)
    assert sum(len(r.resent) for r in reports) == 1
    assert sent(settings, rid) == 1
    row = attempt_row(client, cid, "work")
    assert (row["status"], row["sends"]) == ("DISPATCHED", 1)
    drain(settings)
    age(settings, cid, 30)  # the next re-send waits twice as long (40 s)
    assert not sweep(client, settings).acted
    age(settings, cid, 30)
    assert len(sweep(client, settings).resent) == 1


def test_a_lost_workers_attempt_is_sent_again_then_fails(client: Client,
                                                         settings: Settings) -> None:
    cid = client.start(LINEAR, client_id="acme")
    drain(settings)
    claim(client, cid)
    assert not sweep(client, settings).acted  # its worker renews the lease
    age(settings, cid, 20)  # it stopped: the lease expired
    report = sweep(client, settings)
    assert report.resent == [f"{cid}/work#1"] and report.lost == []
    assert sent(settings, client.store.get(cid).rid("work")) == 1
    assert client.status(cid)["status"] == "RUNNING"
    claim(client, cid)  # the second delivery
    age(settings, cid, 20)
    report = sweep(client, settings)  # CHASSIS_MAX_DELIVERIES=2: a failed attempt
    assert report.lost == [f"{cid}/work#1"] and report.resent == []
    doc = client.status(cid)
    assert doc["status"] == "FAILED"
    assert doc["error"] == ("step 'work' failed: its worker was lost 2 times while running "
                            "it (CHASSIS_MAX_DELIVERIES=2)")
    assert attempt_row(client, cid, "work")["error_type"] == "WorkerLost"


def test_an_attempt_past_its_deadline_fails_and_is_retried(client: Client,
                                                           settings: Settings) -> None:
    plan = {"start_step": "work", "steps": {
        "work": {"action": "noop", "timeout": 5, "retry": {"max_attempts": 2},
                 "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    assert client.store.claim(cid, "work", 1, "t-1", lease=15, timeout=5) is not None
    assert not sweep(client, settings).acted
    age(settings, cid, 6)
    version = client.store.get(cid).version
    reports = sweep_twice_at_once(client, settings)
    assert sum(len(r.timed_out) for r in reports) == 1
    assert client.store.get(cid).version == version + 1  # one transition
    first = attempt_row(client, cid, "work")
    assert (first["status"], first["error"], first["error_type"]) == (
        "FAILED", "timed out after 5 s", "StepTimeout")
    assert attempt_row(client, cid, "work", 2)["status"] == "DISPATCHED"
    assert sent(settings, client.store.get(cid).rid("work", 2)) == 1


def test_an_unanswered_external_agent_times_out(client: Client, settings: Settings) -> None:
    plan = {"start_step": "ask", "steps": {
        "ask": {"action": "research", "topic": "agents.research", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    assert client.status(cid)["status"] == "AWAITING_RESPONSES"
    age(settings, cid, 30)
    assert not sweep(client, settings).acted
    age(settings, cid, 60)  # CHASSIS_STEP_TIMEOUT=60: its default
    assert sweep(client, settings).timed_out == [f"{cid}/ask#1"]
    doc = client.status(cid)
    assert doc["status"] == "FAILED"
    assert doc["error"] == "step 'ask' failed: no answer from the agent within 60 s"


def test_an_unanswered_agent_is_asked_again_and_its_deadline_stays(
        client: Client, settings: Settings) -> None:
    plan = {"start_step": "ask", "steps": {
        "ask": {"action": "research", "topic": "agents.research", "timeout": 600,
                "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    requests = [m for m in client.store.outbox_for(cid) if m["topic"] == "agents.research"]
    assert len(requests) == 1
    age(settings, cid, 100)  # CHASSIS_AGENT_RESEND_AFTER: 120 by default
    assert not sweep(client, settings).acted
    age(settings, cid, 30)
    report = sweep(client, settings)
    assert report.asked_again == [f"{cid}/ask#1"]
    again = [m for m in client.store.outbox_for(cid) if m["topic"] == "agents.research"]
    assert len(again) == 2
    assert again[1]["headers"]["request_id"] == again[0]["headers"]["request_id"]
    assert again[1]["payload"] == again[0]["payload"]
    assert [e["kind"] for e in client.events(cid)].count("request_resent") == 1
    assert not sweep(client, settings).acted  # the next time: after 3 x 120 s
    age(settings, cid, 240)
    assert sweep(client, settings).asked_again == [f"{cid}/ask#1"]
    assert client.status(cid)["status"] == "AWAITING_RESPONSES"
    age(settings, cid, 240)  # 610 s after it was first sent: its timeout (600 s) is past
    assert sweep(client, settings).timed_out == [f"{cid}/ask#1"]
    assert client.status(cid)["error"] == \
        "step 'ask' failed: no answer from the agent within 600 s"


def test_a_retry_due_is_sent_when_its_time_comes(client: Client, settings: Settings) -> None:
    plan = {"start_step": "work", "steps": {
        "work": {"action": "noop", "retry": {"max_attempts": 2, "initial_interval": 120},
                 "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    claim(client, cid)
    client.engine.apply(cid, co.StepFailed("work", "flaked", 1))
    assert attempt_row(client, cid, "work", 2)["status"] == "SCHEDULED"
    assert not sweep(client, settings).sent_due
    age(settings, cid, 120)
    reports = sweep_twice_at_once(client, settings)
    assert sum(len(r.sent_due) for r in reports) == 1
    assert attempt_row(client, cid, "work", 2)["status"] == "DISPATCHED"
    assert sent(settings, client.store.get(cid).rid("work", 2)) == 1


def test_a_fan_in_whose_trigger_was_lost_is_collected(client: Client,
                                                      settings: Settings) -> None:
    plan = {"start_step": "fan", "steps": {
        "fan": {"action": "fan_out", "next_step": "done",
                "sub_tasks": [{"step_name": "a", "action": "noop"},
                              {"step_name": "b", "action": "noop"}]},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    for name in "ab":
        claim(client, cid, name)
        client.store.record_subtask(cid, name, 1, {"name": name})
    # the last sub-task's worker died before it applied the fan-in
    assert not sweep(client, settings).fanned_in
    age(settings, cid, 30)
    assert sweep(client, settings).fanned_in == [f"{cid}/fan"]
    doc = client.status(cid)
    assert doc["status"] == "COMPLETED"
    assert doc["final_result"]["fan"] == {"a": {"name": "a"}, "b": {"name": "b"}}


def test_a_workflow_waiting_for_dependencies_that_never_come_fails(
        client: Client, settings: Settings) -> None:
    """Validation refuses such plans now; a workflow started before it did waits."""
    plan = parse_plan({"start_step": "wait", "steps": {
        "never": {"action": "noop"},
        "wait": {"action": "noop", "dependencies": ["never"]}}})
    cid = str(uuid.uuid4())
    state = WorkflowState(correlation_id=cid, client_id="acme", status=Status.RUNNING,
                          current_step="wait", fuel_budget=10)
    assert client.engine.create(co.decide(state, plan, co.Start()), plan)
    assert client.status(cid)["status"] == "RUNNING"
    assert sweep(client, settings).failed == []  # not old enough
    age(settings, cid)
    assert sweep(client, settings).failed == [f"{cid}/wait"]
    assert client.status(cid)["error"] == (
        "step 'wait' waited 60 s for its dependencies: never")


def test_paused_cancelled_and_finished_workflows_are_left_alone(client: Client,
                                                                settings: Settings) -> None:
    plan = {"start_step": "review", "steps": {
        "review": {"action": "pause_for_human_input", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    paused = client.start(plan, client_id="acme")
    failed = client.start({"start_step": "x", "steps": {"x": {
        "action": "fan_out", "sub_tasks": [{"step_name": "y", "action": "noop"}]}}},
        client_id="acme", fuel_budget=1)  # fails at once: too little fuel
    assert client.status(failed)["status"] == "FAILED"
    cancelled = client.start(LINEAR, client_id="acme")
    client.cancel(cancelled)
    drain(settings)
    for cid in (paused, failed, cancelled):
        age(settings, cid)
    assert not sweep(client, settings).acted
    assert client.status(paused)["status"] == "PAUSED_FOR_HUMAN_INPUT"


def test_an_approval_with_a_timeout_expires_once_and_a_late_resume_is_refused(
        client: Client, settings: Settings) -> None:
    plan = {"start_step": "review", "steps": {
        "review": {"action": "pause_for_human_input", "timeout": 600,
                   "on_failure": "escalate", "next_step": "done"},
        "escalate": {"action": "noop", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    other = client.start(plan, client_id="acme")
    assert client.status(cid)["status"] == "PAUSED_FOR_HUMAN_INPUT"
    row = attempt_row(client, cid, "review")
    assert row["deadline"] is not None
    age(settings, cid, 300)
    assert not sweep(client, settings).acted  # 300 of 600 s: not yet
    age(settings, cid, 301)
    reports = sweep_twice_at_once(client, settings)
    assert sorted(len(r.expired) for r in reports) == [0, 1]
    doc = client.status(cid)
    assert doc["status"] == "RUNNING" and doc["current_step"] == "escalate"
    review = attempt_row(client, cid, "review")
    assert review["status"] == "FAILED"
    assert review["error"] == "no answer to the approval within 600 s: it expired"
    kinds = [(e["kind"], e["step"]) for e in client.events(cid)]
    assert ("failed", "review") in kinds
    with pytest.raises(InvalidTransition, match="not paused"):
        client.resume(cid, True)
    assert not sweep(client, settings).acted  # once
    # the other one, resumed in time, never expires
    client.resume(other, True)
    age(settings, other, 3600)
    assert not sweep(client, settings).acted


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_on_postgresql_a_sweep_skips_while_another_holds_the_lock(
        db_url: str, client: Client, settings: Settings) -> None:
    """(SQLite has no advisory locks: there the conditional updates alone decide.)"""
    cid = client.start(LINEAR, client_id="acme")
    drain(settings)
    age(settings, cid)
    with make_engine(db_url).connect() as conn, conn.begin():
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": SWEEP_LOCK_KEY})
        report = sweep(client, settings)
    assert report.locked_out and report.resent == []
    assert sweep(client, settings).resent == [f"{cid}/work#1"]
