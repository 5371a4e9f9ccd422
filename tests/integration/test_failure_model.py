"""The failure model with a real prefork worker and beat on Redis and PostgreSQL, default
settings: retries, timeouts, cancel, an operator's retry, honest Celery states."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from chassis.api import Client
from chassis.errors import InvalidTransition
from tests.helpers import wait_until
from tests.integration.conftest import Services, Worker
from tests.integration.test_execution import ledger_sum, runs

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def worker(services: Services) -> Worker:
    """A prefork worker that sends task events (as the Procfile's), and beat."""
    services.start_beat()
    return services.start_worker(concurrency=2, events=True)


def flaky_plan(key: str, fail_times: int, retry: dict[str, Any] | None = None,
               **params: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"action": "flaky", "next_step": "done",
                            "params": {"key": key, "fail_times": fail_times, **params}}
    if retry is not None:
        step["retry"] = retry
    return {"start_step": "flaky", "steps": {"flaky": step,
                                             "done": {"action": "complete_workflow"}}}


def the_step(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in doc["steps"] if s["name"] == name)


def test_a_step_that_fails_twice_then_succeeds_completes(client: Client, worker: Worker,
                                                         services: Services) -> None:
    key = uuid.uuid4().hex
    cid = client.start(flaky_plan(key, 2, {"max_attempts": 3, "initial_interval": 0.2}),
                       client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    step = the_step(doc, "flaky")
    assert step["attempts"] == 3 and step["max_attempts"] == 3
    assert [(a["attempt"], a["status"], a["error"], a["error_type"])
            for a in step["history"]] == [
        (1, "FAILED", "flaky run 1", "FlakyError"), (2, "FAILED", "flaky run 2", "FlakyError"),
        (3, "COMPLETED", None, None)]
    assert runs(services, key) == 3
    assert [e["step"] for e in client.ledger(cid)] == ["flaky", "flaky", "flaky", "done"]
    assert doc["fuel"]["spent"] == ledger_sum(client, cid) == 4


def test_out_of_attempts_the_workflow_fails_naming_the_step_and_attempts(
        client: Client, worker: Worker) -> None:
    cid = client.start(flaky_plan(uuid.uuid4().hex, 5,
                                  {"max_attempts": 2, "initial_interval": 0.2}),
                       client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "FAILED"
    assert doc["error"] == "step 'flaky' failed after 2 attempts: flaky run 2"
    assert the_step(doc, "flaky")["error"] == "flaky run 2"
    assert doc["fuel"]["spent"] == ledger_sum(client, cid) == 2


def test_a_non_retryable_error_fails_at_once(client: Client, worker: Worker,
                                             services: Services) -> None:
    key = uuid.uuid4().hex
    cid = client.start(flaky_plan(key, 5, {"max_attempts": 4, "non_retryable": ["LookupError"]},
                                  error="KeyError"), client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "FAILED"
    assert doc["error"] == "step 'flaky' failed (KeyError is not retried): 'flaky run 1'"
    assert runs(services, key) == 1


def test_an_attempt_past_its_timeout_is_stopped_and_retried_then_fails(
        client: Client, worker: Worker) -> None:
    plan = {"start_step": "slow", "steps": {
        "slow": {"action": "sleep", "params": {"seconds": 60}, "timeout": 2,
                 "retry": {"max_attempts": 2}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    began = time.monotonic()
    cid = client.start(plan, client_id="acme")
    doc = client.wait(cid, timeout=20)
    took = time.monotonic() - began
    assert doc["status"] == "FAILED", doc
    assert doc["error"] == "step 'slow' failed after 2 attempts: timed out after 2 s"
    assert [a["error_type"] for a in the_step(doc, "slow")["history"]] == [
        "StepTimeout", "StepTimeout"]
    print(f"\n[measured] 60 s step, timeout 2 s, 2 attempts: FAILED after {took:.1f} s")
    # the pool process was interrupted, not left sleeping: the worker serves others at once
    quick = client.start(flaky_plan(uuid.uuid4().hex, 0), client_id="acme")
    assert client.wait(quick, timeout=10)["status"] == "COMPLETED"


def test_cancel_revokes_a_long_step_and_ignores_its_result(client: Client, worker: Worker,
                                                           services: Services) -> None:
    key = uuid.uuid4().hex
    cid = client.start(flaky_plan(key, 0, seconds=30), client_id="acme")
    wait_until(lambda: runs(services, key) == 1, timeout=30, message="the step never started")
    began = time.monotonic()
    doc = client.cancel(cid, "not needed any more")
    assert doc["status"] == "CANCELLED"
    assert doc["error"] == "Workflow cancelled: not needed any more"
    assert the_step(doc, "flaky")["status"] == "CANCELLED"
    rid = client.store.get(cid).rid("flaky")
    wait_until(lambda: f"Terminating {rid}" in worker.text(), timeout=10,
               message="the prefork pool never terminated the step")
    print(f"\n[measured] cancel of a 30 s step: CANCELLED and terminated after "
          f"{time.monotonic() - began:.1f} s")
    events = [m["payload"]["event_type"] for m in client.store.outbox_for(cid)]
    assert events == ["WORKFLOW_CANCELLED"]
    with pytest.raises(InvalidTransition, match="already CANCELLED"):
        client.cancel(cid)
    assert client.status(cid)["version"] == doc["version"]


def test_cancel_through_the_celery_task(client: Client, worker: Worker,
                                        services: Services) -> None:
    key = uuid.uuid4().hex
    cid = client.start(flaky_plan(key, 0, seconds=30), client_id="acme")
    wait_until(lambda: runs(services, key) == 1, timeout=30, message="the step never started")
    other = Celery("another-app", broker=services.env["CHASSIS_BROKER_URL"])
    # another client's cancel is refused (FAILURE, nothing changes), the owner's applies
    other.send_task("chassis.cancel", args=[cid, "not yours"], kwargs={"client_id": "evil"},
                    queue="chassis.coordination")
    other.send_task("chassis.cancel", args=[cid, "from another app"],
                    kwargs={"client_id": "acme"}, queue="chassis.coordination")
    doc = client.wait(cid, timeout=15)
    assert doc["status"] == "CANCELLED"
    assert doc["error"] == "Workflow cancelled: from another app"


def test_celery_control_terminate_of_a_running_step_fails_its_attempt(
        client: Client, worker: Worker, services: Services) -> None:
    """An operator terminates a step's task with Celery's own command (as `celery control
    revoke --terminate` or Flower does): the attempt fails (TaskRevokedError) and, with
    no attempt left, the workflow ends FAILED at once, not waiting forever."""
    key = uuid.uuid4().hex
    cid = client.start(flaky_plan(key, 0, seconds=30), client_id="acme")
    wait_until(lambda: runs(services, key) == 1, timeout=30, message="the step never started")
    operator = Celery("operator", broker=services.env["CHASSIS_BROKER_URL"])
    began = time.monotonic()
    operator.control.revoke(client.store.get(cid).rid("flaky"), terminate=True,
                            signal="SIGKILL")
    doc = client.wait(cid, timeout=20)
    assert doc["status"] == "FAILED"
    assert doc["error"] == ("step 'flaky' failed: the task was terminated (signal 9) "
                            "through Celery")
    history = the_step(doc, "flaky")["history"]
    assert [(h["status"], h["error_type"]) for h in history] == [("FAILED", "TaskRevokedError")]
    print(f"\n[measured] terminated through Celery: FAILED {time.monotonic() - began:.1f} s "
          "after the command")


def test_a_step_task_revoked_before_it_runs_is_a_failed_attempt_and_retried(
        client: Client, worker: Worker) -> None:
    """`celery control revoke` of a step's task that has not started: the worker
    discards it, the attempt fails, and the step's retry runs it again (a new task id)."""
    plan = {"start_step": "a", "steps": {
        "a": {"action": "sleep", "params": {"seconds": 2}, "next_step": "b"},
        "b": {"action": "echo", "params": {"ok": 1}, "next_step": "done",
              "retry": {"max_attempts": 2, "initial_interval": 0.1}},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    operator = Celery("operator", broker=client.settings.broker_url)
    operator.control.revoke(client.store.get(cid).rid("b", 1))  # before it is even sent
    doc = client.wait(cid, timeout=30)
    assert doc["status"] == "COMPLETED", doc["error"]
    history = the_step(doc, "b")["history"]
    assert [(h["attempt"], h["status"], h["error_type"]) for h in history] == [
        (1, "FAILED", "TaskRevokedError"), (2, "COMPLETED", None)]


def test_an_operator_retries_a_failed_workflow_from_its_failed_step(
        client: Client, worker: Worker, services: Services) -> None:
    first, key = uuid.uuid4().hex, uuid.uuid4().hex
    plan = {"start_step": "a", "steps": {
        "a": {"action": "count", "params": {"key": first}, "next_step": "b"},
        "b": {"action": "flaky", "params": {"key": key, "fail_times": 1}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    failed = client.wait(cid, timeout=60)
    assert failed["status"] == "FAILED" and failed["current_step"] == "b"
    doc = client.retry(cid)
    assert doc["status"] == "RUNNING"
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    assert runs(services, first) == 1  # the completed step is kept, not run again
    assert [a["status"] for a in the_step(doc, "b")["history"]] == ["FAILED", "COMPLETED"]
    assert doc["fuel"]["spent"] == ledger_sum(client, cid) == 4
    with pytest.raises(InvalidTransition, match="only a FAILED workflow"):
        client.retry(cid)


def test_a_flaky_sub_task_is_retried_alone(client: Client, worker: Worker,
                                           services: Services) -> None:
    key = uuid.uuid4().hex
    plan = {"start_step": "fan", "steps": {
        "fan": {"action": "fan_out", "next_step": "done",
                "retry": {"max_attempts": 3, "initial_interval": 0.2},
                "sub_tasks": [{"step_name": "steady", "action": "echo", "params": {"v": 1}},
                              {"step_name": "shaky", "action": "flaky",
                               "params": {"key": key, "fail_times": 2}}]},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    assert doc["final_result"]["fan"] == {"steady": {"v": 1}, "shaky": {"runs": 3}}
    assert the_step(doc, "steady")["attempts"] == 1
    assert the_step(doc, "shaky")["attempts"] == 3
    assert doc["fuel"]["spent"] == ledger_sum(client, cid) == 5 + 1 + 3 + 1


def test_a_repeated_resume_is_reported_as_already_recorded(client: Client,
                                                           worker: Worker) -> None:
    plan = {"start_step": "review", "steps": {
        "review": {"action": "pause_for_human_input", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme")
    client.wait(cid, timeout=30)
    assert "resume" not in client.resume(cid, True, {"ok": 1})
    again = client.resume(cid, True, {"ok": 1})
    assert again["resume"] == "already recorded"
    with pytest.raises(InvalidTransition):
        client.resume(cid, False)  # a different answer is not a repeat


@pytest.fixture
def task_events(services: Services, worker: Worker) -> Iterator[list[dict[str, Any]]]:
    """Celery task events (what Flower shows), received while the test runs."""
    app = Celery("events", broker=services.env["CHASSIS_BROKER_URL"])
    got: list[dict[str, Any]] = []
    conn = app.connection_for_read()

    def listen() -> None:
        recv = app.events.Receiver(conn, handlers={"*": got.append})
        recv.capture(limit=None, timeout=None, wakeup=False)

    threading.Thread(target=listen, daemon=True).start()
    # bound once the worker's heartbeat (every 2 s) comes through
    wait_until(lambda: got, timeout=30, message="no event from the worker")
    yield got
    conn.release()


def test_celery_sees_retry_then_failure(client: Client, worker: Worker,
                                        task_events: list[dict[str, Any]]) -> None:
    cid = client.start(flaky_plan(uuid.uuid4().hex, 5,
                                  {"max_attempts": 2, "initial_interval": 0.2}),
                       client_id="acme")
    assert client.wait(cid, timeout=60)["status"] == "FAILED"
    first, second = client.store.get(cid).rid("flaky", 1), client.store.get(cid).rid("flaky", 2)

    def states() -> dict[str, set[str]]:
        out: dict[str, set[str]] = {first: set(), second: set()}
        for e in task_events:
            if e.get("uuid") in out:
                out[e["uuid"]].add(e["type"])
        return out

    got = wait_until(lambda: (s := states())[first] >= {"task-retried"}
                     and s[second] >= {"task-failed"} and s, timeout=30,
                     message=f"the worker did not report RETRY then FAILURE: "
                             f"{sorted({e['type'] for e in task_events})}")
    assert "task-succeeded" not in got[first] | got[second]
