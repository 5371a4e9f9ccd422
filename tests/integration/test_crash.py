"""A worker killed with SIGKILL in the middle of a step; a new worker finishes the job,
with beat's sweep finding the attempt whose lease expired (default settings)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from chassis.api import Client
from tests.helpers import wait_until
from tests.integration.conftest import Services
from tests.integration.test_execution import ledger_sum, runs

pytestmark = pytest.mark.timeout(180)


def killed_and_restarted(services: Services, client: Client, plan: dict[str, Any],
                         started: Callable[[], bool], status: str) -> dict[str, Any]:
    """Start ``plan`` on a worker of one process (and beat), SIGKILL the worker once
    ``started`` (the workflow is then in ``status``), start a new one, and wait until
    the workflow has finished."""
    for w in services.workers:  # (another test's worker would take the work)
        w.stop()
    services.start_beat()
    first = services.start_worker(concurrency=1)
    cid = client.start(plan, None, client_id="acme")
    wait_until(started, timeout=60, message="the work never started")
    first.kill()
    assert client.status(cid)["status"] == status
    services.start_worker(concurrency=1)
    return client.wait(cid, timeout=90, until={"COMPLETED", "FAILED", "COMPENSATED",
                                               "CANCELLED"})


def test_worker_killed_mid_step_then_a_new_worker_completes_it(services: Services,
                                                               client: Client) -> None:
    key = uuid.uuid4().hex
    plan = {"start_step": "slow", "steps": {
        "slow": {"action": "count", "params": {"key": key, "seconds": 2}, "next_step": "after"},
        "after": {"action": "echo", "params": {"ok": 1}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    doc = killed_and_restarted(services, client, plan, lambda: runs(services, key) == 1,
                               "RUNNING")
    cid = doc["correlation_id"]
    assert doc["status"] == "COMPLETED", doc
    slow = next(s for s in doc["steps"] if s["name"] == "slow")
    # the same attempt, delivered again: not a new attempt, not charged again
    assert slow["attempts"] == 1 and slow["history"][0]["deliveries"] == 2
    assert runs(services, key) == 2  # the action is at-least-once; its record is once
    assert doc["fuel"]["spent"] == ledger_sum(client, cid) == 3


def test_worker_killed_during_a_compensation_still_ends_compensated(services: Services,
                                                                    client: Client) -> None:
    from tests.integration.test_saga import booking, names

    key = uuid.uuid4().hex
    plan = booking(key)
    plan["steps"]["charge"]["compensate"]["params"]["seconds"] = 3
    doc = killed_and_restarted(services, client, plan,
                               lambda: "undo charge" in names(services, key), "COMPENSATING")
    cid = doc["correlation_id"]
    assert doc["status"] == "COMPENSATED", doc
    undo = next(s for s in doc["steps"] if s["name"] == "charge/compensate")
    # the same attempt delivered again: recorded once, charged once
    assert undo["attempts"] == 1 and undo["history"][0]["deliveries"] == 2
    assert [s["name"] for s in doc["steps"] if s["compensates"]] == [
        "charge/compensate", "reserve/compensate"]
    assert names(services, key) == ["reserve", "charge", "ship", "undo charge", "undo charge",
                                    "undo reserve"]
    assert [e["step"] for e in client.ledger(cid)].count("charge/compensate") == 1
    assert doc["fuel"]["spent"] == ledger_sum(client, cid) == 5
