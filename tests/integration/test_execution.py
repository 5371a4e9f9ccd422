"""Workflows run by a real Celery worker (subprocess) on Redis, state in PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from chassis.api import Client
from chassis.errors import InputError, InvalidTransition, PlanError, WorkflowNotFound
from chassis.store.db import make_engine
from chassis.store.tables import fuel_ledger, orchestrator_state, outbox, step_runs
from tests.helpers import wait_until
from tests.integration.conftest import Services, Worker

pytestmark = pytest.mark.timeout(120)

LINEAR = {
    "start_step": "a",
    "steps": {
        "a": {"action": "echo", "params": {"greeting": "hi"}, "next_step": "b"},
        "b": {"action": "count", "params": {"key": "PLACEHOLDER"}, "dependencies": ["a"],
              "next_step": "done"},
        "done": {"action": "complete_workflow"},
    },
}


def linear(key: str) -> dict[str, Any]:
    plan = {"start_step": "a", "steps": {k: dict(v) for k, v in LINEAR["steps"].items()}}
    plan["steps"]["b"] = {**plan["steps"]["b"], "params": {"key": key}}
    return plan


def runs(services: Services, key: str) -> int:
    r = redis.Redis.from_url(services.env["CHASSIS_TEST_COUNTER_URL"])
    return int(r.get(f"runs:{key}") or 0)


def ledger_sum(client: Client, cid: str) -> int:
    return sum(e["amount"] for e in client.ledger(cid))


def count_rows(client: Client, table: sa.Table, cid: str) -> int:
    with make_engine(client.settings.database_url).connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)
                            .where(table.c.correlation_id == cid)).scalar_one()


def test_linear_workflow_completes_with_outputs_by_step_name(client: Client, worker: Worker,
                                                             services: Services) -> None:
    key = uuid.uuid4().hex
    cid = client.start(linear(key), {"topic": "x"}, client_id="acme", fuel_budget=10)
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    assert doc["final_result"]["a"] == {"greeting": "hi"}
    assert doc["final_result"]["b"]["saw"] == ["a", "input"]
    assert doc["fuel"] == {"budget": 10, "spent": 3, "reserved": 0, "remaining": 7}
    assert ledger_sum(client, cid) == 3
    assert [(s["name"], s["status"], s["attempts"]) for s in doc["steps"]] == [
        ("a", "COMPLETED", 1), ("b", "COMPLETED", 1), ("done", "COMPLETED", 1)]
    assert runs(services, key) == 1


def test_start_is_idempotent_by_correlation_id(client: Client, worker: Worker,
                                               services: Services) -> None:
    key, cid = uuid.uuid4().hex, str(uuid.uuid4())
    assert client.start(linear(key), None, client_id="acme", correlation_id=cid) == cid
    assert client.start(linear(key), None, client_id="acme", correlation_id=cid) == cid
    assert client.wait(cid, timeout=60)["status"] == "COMPLETED"
    assert runs(services, key) == 1
    assert count_rows(client, orchestrator_state, cid) == 1
    assert count_rows(client, fuel_ledger, cid) == 3


def test_fan_out_chord_records_every_output_and_continues(client: Client,
                                                          worker: Worker) -> None:
    plan = {"start_step": "research", "steps": {
        "research": {"action": "fan_out", "next_step": "write", "sub_tasks": [
            {"step_name": f"part{i}", "action": "echo", "params": {"i": i}} for i in range(5)]},
        "write": {"action": "echo", "dependencies": ["research"], "params": {"w": 1},
                  "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, None, client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    assert doc["final_result"]["research"] == {f"part{i}": {"i": i} for i in range(5)}
    assert doc["final_result"]["part3"] == {"i": 3}
    # fan_out 5 + five sub-tasks at 1 + write 1 + complete 1
    assert doc["fuel"]["spent"] == 12 == ledger_sum(client, cid)
    subs = [s for s in doc["steps"] if s["parent_step"] == "research"]
    assert len(subs) == 5 and all(s["status"] == "COMPLETED" for s in subs)


PAUSING = {"start_step": "draft", "steps": {
    "draft": {"action": "echo", "params": {"text": "a draft"}, "next_step": "review"},
    "review": {"action": "pause_for_human_input", "description": "Review the draft",
               "next_step": "publish"},
    "publish": {"action": "echo", "params": {"published": True}, "next_step": "done"},
    "done": {"action": "complete_workflow"}}}


def test_pause_notifies_then_approve_completes_with_feedback(client: Client,
                                                             worker: Worker) -> None:
    cid = client.start(PAUSING, None, client_id="acme", project_id="p1")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "PAUSED_FOR_HUMAN_INPUT"
    assert doc["current_step"] == "review"
    assert doc["waiting_for"] == "a human's approval at step 'review'"
    notes = [m for m in client.store.outbox_for(cid)
             if m["payload"]["event_type"] == "WORKFLOW_PAUSED_FOR_APPROVAL"]
    assert len(notes) == 1
    assert notes[0]["topic"] == "system.notifications.ui"
    assert notes[0]["payload"]["data_for_review"] == {"draft": {"text": "a draft"}}
    assert notes[0]["payload"]["project_id"] == "p1"
    client.resume(cid, True, {"ok": True})
    doc = client.wait(cid, timeout=60, until={"COMPLETED", "FAILED"})
    assert doc["status"] == "COMPLETED"
    assert doc["final_result"]["human_feedback"] == {"ok": True}
    assert doc["final_result"]["publish"] == {"published": True}
    assert doc["fuel"]["spent"] == ledger_sum(client, cid) == 3


def test_reject_fails_the_workflow(client: Client, worker: Worker) -> None:
    cid = client.start(PAUSING, None, client_id="acme")
    client.wait(cid, timeout=60)
    doc = client.resume(cid, False)
    assert doc["status"] == "FAILED" and doc["error"] == "Workflow rejected by user"


def test_resume_errors_change_nothing(client: Client, worker: Worker) -> None:
    with pytest.raises(WorkflowNotFound):
        client.resume(str(uuid.uuid4()), True)
    cid = client.start(linear(uuid.uuid4().hex), None, client_id="acme")
    before = client.wait(cid, timeout=60)
    with pytest.raises(InvalidTransition, match="not paused"):
        client.resume(cid, True, {"x": 1})
    after = client.status(cid)
    assert after["version"] == before["version"]
    assert "human_feedback" not in after["collected_data"]


def test_bad_input_is_refused_and_nothing_is_written(client: Client) -> None:
    cid = str(uuid.uuid4())
    bad_plan = {"start_step": "nope", "steps": {"a": {"action": "echo"}}}
    with pytest.raises(PlanError):
        client.start(bad_plan, None, client_id="acme", correlation_id=cid)
    with pytest.raises(InputError, match="client_id"):
        client.start(linear("k"), None, client_id="", correlation_id=cid)
    for budget in (0, -5, "ten", 1.5, True):
        with pytest.raises(InputError, match="positive integer"):
            client.start(linear("k"), None, client_id="acme", fuel_budget=budget,
                         correlation_id=cid)
    assert count_rows(client, orchestrator_state, cid) == 0


def test_failing_action_fails_its_workflow_and_the_worker_serves_others(
        client: Client, worker: Worker, services: Services) -> None:
    failing = {"start_step": "boom", "steps": {
        "boom": {"action": "fail", "params": {"message": "the model said no"},
                 "next_step": "done"}, "done": {"action": "complete_workflow"}}}
    bad = client.start(failing, None, client_id="acme")
    good = client.start(linear(uuid.uuid4().hex), None, client_id="acme")
    doc = client.wait(bad, timeout=60)
    assert doc["status"] == "FAILED"
    assert doc["error"] == "step 'boom' failed: the model said no"
    assert client.wait(good, timeout=60)["status"] == "COMPLETED"
    events = [m["payload"]["event_type"] for m in client.store.outbox_for(bad)]
    assert events == ["WORKFLOW_FAILED"]


def test_insufficient_fuel_fails_with_the_original_message(client: Client,
                                                           worker: Worker) -> None:
    cid = client.start(linear(uuid.uuid4().hex), None, client_id="acme", fuel_budget=2)
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "FAILED"
    assert doc["error"] == "insufficient fuel for action 'complete_workflow': have 0, need 1"
    assert doc["fuel"]["spent"] == 2 == ledger_sum(client, cid)


def test_same_task_delivered_twice_runs_once_and_debits_once(
        client: Client, worker: Worker, services: Services) -> None:
    key = uuid.uuid4().hex
    cid = client.start(linear(key), None, client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED"
    ledger_before = client.ledger(cid)
    # deliver step b's task again, exactly as it was first sent (same id and payload)
    state = client.store.get(cid)
    payload = {"cid": cid, "step": "b", "action": "count", "params": {"key": key},
               "data": {"input": None, "a": state.collected_data["a"]}, "parent": None,
               "attempt": 1, "timeout": None}
    rid = next(s for s in client.store.steps(cid) if s["step_name"] == "b")["request_id"]
    for _ in range(2):
        client.app.send_task("chassis.step", args=[payload], task_id=rid)
    # and the same as a sub-task of a fan-out it never had, twice
    for _ in range(2):
        client.app.send_task("chassis.subtask", args=[{**payload, "parent": "a"}])
    marker = client.start(linear(uuid.uuid4().hex), None, client_id="acme")
    assert client.wait(marker, timeout=60)["status"] == "COMPLETED"  # the queue drained
    wait_until(lambda: "duplicate delivery ignored" in worker.text(), timeout=30,
               message="the worker never saw the duplicate")
    assert runs(services, key) == 1
    assert client.ledger(cid) == ledger_before
    after = client.status(cid)
    assert after["version"] == doc["version"]
    b = next(s for s in after["steps"] if s["name"] == "b")
    assert b["attempts"] == 1 and b["history"][0]["deliveries"] == 1
    assert count_rows(client, step_runs, cid) == 3
    assert count_rows(client, outbox, cid) == 1  # one completion event


def test_an_action_changing_its_input_does_not_change_the_workflows_data(
        client: Client, worker: Worker) -> None:
    """The data a step sees is read with its claim; an action that changes it in place
    changes nothing recorded (an earlier step's output stays as that step returned it)."""
    plan = {"start_step": "a", "steps": {
        "a": {"action": "echo", "params": {"items": [3, 1, 2]}, "next_step": "b"},
        "b": {"action": "mutate", "params": {"of": "a"}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    doc = client.wait(client.start(plan, client_id="acme"), timeout=60)
    assert doc["status"] == "COMPLETED", doc
    assert doc["final_result"]["a"] == {"items": [3, 1, 2]}
    assert next(s for s in client.store.steps(doc["correlation_id"])
                if s["step_name"] == "a")["output"] == {"items": [3, 1, 2]}
