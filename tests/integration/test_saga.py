"""Sagas with a real prefork worker and beat on Redis and PostgreSQL, default settings:
a booking whose last step fails is undone in reverse order, a fan-out's compensations
run in parallel, a rejected review and a cancel compensate, on_failure goes on, a
compensation that keeps failing ends FAILED and an operator's retry finishes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
import redis

from chassis.api import Client
from chassis.errors import InvalidTransition
from tests.helpers import wait_until
from tests.integration.conftest import ROOT, Services, Worker
from tests.integration.test_execution import ledger_sum

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def worker(services: Services) -> Worker:
    """A prefork worker of three processes (a fan-out's compensations run together),
    and beat."""
    services.start_beat()
    return services.start_worker(concurrency=3)


def log_of(services: Services, key: str) -> list[dict[str, Any]]:
    """What the user's ``record`` action did, in order."""
    r = redis.Redis.from_url(services.env["CHASSIS_TEST_COUNTER_URL"])
    return [json.loads(x) for x in r.lrange(f"log:{key}", 0, -1)]


def names(services: Services, key: str) -> list[str]:
    return [e["name"] for e in log_of(services, key)]


def rec(key: str, name: str, **params: Any) -> dict[str, Any]:
    """A step of the booking: the user's action, and how to undo it."""
    return {"action": "record", "params": {"key": key, "name": name, **params},
            "compensate": {"action": "record", "params": {"key": key, "name": f"undo {name}"}}}


def booking(key: str, **ship: Any) -> dict[str, Any]:
    """reserve -> charge -> ship (failing unless told otherwise), each with a compensation."""
    return {"name": "booking", "start_step": "reserve", "steps": {
        "reserve": {**rec(key, "reserve"), "next_step": "charge"},
        "charge": {**rec(key, "charge"), "next_step": "ship"},
        "ship": {**rec(key, "ship", **{"fail": True, **ship}), "next_step": "done"},
        "done": {"action": "complete_workflow"}}}


def rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in doc["steps"]}


def events(client: Client, cid: str) -> list[str]:
    return [m["payload"]["event_type"] for m in client.store.outbox_for(cid)]


def test_a_failed_last_step_is_undone_in_reverse_order(client: Client, worker: Worker,
                                                       services: Services) -> None:
    key = uuid.uuid4().hex
    cid = client.start(booking(key), client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPENSATED", doc
    assert doc["error"] == "step 'ship' failed: ship failed (run 1)"
    assert names(services, key) == ["reserve", "charge", "ship", "undo charge", "undo reserve"]
    undo_charge = log_of(services, key)[3]
    assert undo_charge["output"] == {"did": "charge", "run": 1}  # the step's own output
    assert undo_charge["error"]["message"] == doc["error"]
    assert "reserve" in undo_charge["saw"] and "input" in undo_charge["saw"]
    steps = rows(doc)
    for step in ("reserve", "charge"):
        row = steps[f"{step}/compensate"]
        assert (row["compensates"], row["status"], row["attempts"]) == (step, "COMPLETED", 1)
    assert "ship/compensate" not in steps
    assert steps["charge/compensate"]["finished_at"] <= steps["reserve/compensate"]["started_at"]
    assert events(client, cid) == ["WORKFLOW_COMPENSATING", "WORKFLOW_COMPENSATED"]
    assert doc["compensation"] == {"cause": doc["error"], "ends": "COMPENSATED",
                                   "pending": [], "failed": None}
    # compensations are priced: 3 steps + 2 compensations
    assert doc["fuel"]["spent"] == ledger_sum(client, cid) == 5
    with pytest.raises(InvalidTransition):
        client.retry(cid)


def test_a_fan_outs_compensations_run_together_then_the_earlier_steps(
        client: Client, worker: Worker, services: Services) -> None:
    key = uuid.uuid4().hex
    plan = {"start_step": "reserve", "steps": {
        "reserve": {**rec(key, "reserve"), "next_step": "research"},
        "research": {"action": "fan_out", "next_step": "ship", "sub_tasks": [
            {"step_name": f"r{i}", "action": "record", "params": {"key": key, "name": f"r{i}"},
             "compensate": {"action": "record",
                            "params": {"key": key, "name": f"undo r{i}", "seconds": 1.5}}}
            for i in range(3)]},
        "ship": {"action": "fail", "params": {"message": "no courier"}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPENSATED", doc
    log = log_of(services, key)
    undo = [e for e in log if e["name"] in ("undo r0", "undo r1", "undo r2")]
    assert sorted(e["name"] for e in undo) == ["undo r0", "undo r1", "undo r2"]
    # in parallel: each began before any other could have ended (they sleep 1.5 s)
    starts = [e["at"] for e in undo]
    assert max(starts) - min(starts) < 1.5, starts
    assert log[-1]["name"] == "undo reserve" and len(log) == 1 + 3 + 3 + 1
    assert log[-1]["at"] >= max(starts) + 1.5  # after the whole batch


def test_a_sub_task_that_fails_undoes_its_siblings_that_completed(
        client: Client, worker: Worker, services: Services) -> None:
    key = uuid.uuid4().hex
    plan = {"start_step": "fan", "steps": {
        "fan": {"action": "fan_out", "next_step": "done", "sub_tasks": [
            {"step_name": "quick", "action": "record", "params": {"key": key, "name": "quick"},
             "compensate": {"action": "record", "params": {"key": key, "name": "undo quick"}}},
            {"step_name": "bad", "action": "record",
             "params": {"key": key, "name": "bad", "seconds": 1, "fail": True},
             "compensate": {"action": "record", "params": {"key": key, "name": "undo bad"}}}]},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPENSATED", doc
    assert sorted(names(services, key)) == ["bad", "quick", "undo quick"]
    assert rows(doc)["fan"]["status"] == "FAILED"


def test_a_rejected_review_undoes_the_steps_before_it(client: Client, worker: Worker,
                                                      services: Services) -> None:
    key = uuid.uuid4().hex
    plan = {"start_step": "draft", "steps": {
        "draft": {**rec(key, "draft"), "next_step": "upload"},
        "upload": {**rec(key, "upload"), "next_step": "review"},
        "review": {"action": "pause_for_human_input", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    assert client.wait(cid, timeout=60)["status"] == "PAUSED_FOR_HUMAN_INPUT"
    client.resume(cid, False, {"why": "off topic"})
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPENSATED", doc
    assert doc["error"] == "Workflow rejected by user"
    assert names(services, key) == ["draft", "upload", "undo upload", "undo draft"]


def test_an_approval_nobody_gives_in_time_expires_and_undoes_the_steps_before_it(
        client: Client, worker: Worker, services: Services) -> None:
    """A pause with a 2 s timeout and nobody to answer: beat's sweep expires it, the
    workflow undoes what it did, and the answer that comes late is refused."""
    key = uuid.uuid4().hex
    plan = {"start_step": "draft", "steps": {
        "draft": {**rec(key, "draft"), "next_step": "upload"},
        "upload": {**rec(key, "upload"), "next_step": "review"},
        "review": {"action": "pause_for_human_input", "timeout": 2, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    paused = client.wait(cid, timeout=60)
    assert paused["status"] == "PAUSED_FOR_HUMAN_INPUT"
    review = next(s for s in paused["steps"] if s["name"] == "review")
    assert review["deadline"] is not None
    assert paused["waiting_for"] == (f"a human's approval at step 'review' (it expires at "
                                     f"{review['deadline']})")
    doc = wait_until(lambda: (d := client.status(cid))["status"] == "COMPENSATED" and d,
                     timeout=60, interval=0.2, message="the approval never expired")
    assert doc["error"] == ("step 'review' failed: no answer to the approval within 2 s: "
                            "it expired")
    assert names(services, key) == ["draft", "upload", "undo upload", "undo draft"]
    with pytest.raises(InvalidTransition, match="not paused"):
        client.resume(cid, True)


def test_on_failure_goes_on_at_a_notify_step_that_sees_the_error(
        client: Client, worker: Worker, services: Services) -> None:
    key = uuid.uuid4().hex
    plan = booking(key)
    plan["steps"]["ship"].update(on_failure="notify",
                                 retry={"max_attempts": 2, "initial_interval": 0.2})
    plan["steps"]["notify"] = {"action": "record", "params": {"key": key, "name": "notify"},
                               "next_step": "done"}
    cid = client.start(plan, client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    assert names(services, key) == ["reserve", "charge", "ship", "ship", "notify"]
    notify = log_of(services, key)[-1]
    assert notify["error"] == {"step": "ship", "attempts": 2, "message":
                               "step 'ship' failed after 2 attempts: ship failed (run 2)"}
    assert doc["final_result"]["error"]["step"] == "ship"


def test_a_compensation_that_keeps_failing_ends_failed_and_a_retry_finishes_it(
        client: Client, worker: Worker, services: Services) -> None:
    key = uuid.uuid4().hex
    plan = booking(key)
    plan["steps"]["charge"]["compensate"]["params"]["fail"] = 2  # its first two runs
    plan["steps"]["charge"]["compensate"]["retry"] = {"max_attempts": 2,
                                                      "initial_interval": 0.2}
    cid = client.start(plan, client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "FAILED", doc
    assert doc["error"] == ("step 'ship' failed: ship failed (run 1); then the compensation "
                            "of 'charge' failed after 2 attempts: undo charge failed (run 2)")
    assert doc["compensation"]["pending"] == [["charge"], ["reserve"]]
    assert names(services, key) == ["reserve", "charge", "ship", "undo charge", "undo charge"]
    doc = client.retry(cid)
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPENSATED", doc
    assert doc["error"] == "step 'ship' failed: ship failed (run 1)"
    assert names(services, key)[-2:] == ["undo charge", "undo reserve"]
    assert rows(doc)["charge/compensate"]["attempts"] == 3
    assert events(client, cid) == ["WORKFLOW_COMPENSATING", "WORKFLOW_FAILED",
                                   "WORKFLOW_COMPENSATING", "WORKFLOW_COMPENSATED"]


def test_cancel_with_compensation_on_the_command_line(client: Client, worker: Worker,
                                                      services: Services) -> None:
    key = uuid.uuid4().hex
    plan = booking(key, fail=False, seconds=60)
    cid = client.start(plan, client_id="acme")
    wait_until(lambda: "ship" in names(services, key), timeout=60,
               message="the long step never started")
    out = subprocess.run([sys.executable, "-m", "chassis", "cancel", cid, "--compensate",
                          "--reason", "customer left", "--json"], cwd=ROOT, timeout=60,
                         env={**os.environ, **services.env, "CHASSIS_CLIENT_ID": "acme"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "COMPENSATING"
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "CANCELLED", doc
    assert doc["error"] == "Workflow cancelled: customer left"
    assert names(services, key) == ["reserve", "charge", "ship", "undo charge", "undo reserve"]
    assert rows(doc)["ship"]["status"] == "CANCELLED"
    assert events(client, cid) == ["WORKFLOW_COMPENSATING", "WORKFLOW_CANCELLED"]


def test_cancel_with_compensation_through_the_celery_task(client: Client, worker: Worker,
                                                          services: Services) -> None:
    key = uuid.uuid4().hex
    cid = client.start(booking(key, fail=False, seconds=60), client_id="acme")
    wait_until(lambda: "ship" in names(services, key), timeout=60,
               message="the long step never started")
    client.app.send_task("chassis.cancel", args=[cid, "from another app", "acme", True])
    doc = client.wait(cid, timeout=60, until={"CANCELLED", "FAILED", "COMPENSATED"})
    assert doc["status"] == "CANCELLED", doc
    assert names(services, key)[-2:] == ["undo charge", "undo reserve"]
