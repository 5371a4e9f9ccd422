"""A worker killed with SIGKILL in the middle of a step; a new worker finishes the job,
with beat's sweep finding the attempt whose lease expired (default settings)."""

from __future__ import annotations

import uuid

import pytest

from chassis.api import Client
from tests.helpers import wait_until
from tests.integration.conftest import Services
from tests.integration.test_execution import ledger_sum, runs

pytestmark = pytest.mark.timeout(180)


def test_worker_killed_mid_step_then_a_new_worker_completes_it(services: Services,
                                                               client: Client) -> None:
    key = uuid.uuid4().hex
    plan = {"start_step": "slow", "steps": {
        "slow": {"action": "count", "params": {"key": key, "seconds": 2}, "next_step": "after"},
        "after": {"action": "echo", "params": {"ok": 1}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    services.start_beat()
    first = services.start_worker(concurrency=1)
    cid = client.start(plan, None, client_id="acme")
    wait_until(lambda: runs(services, key) == 1, timeout=60, message="slow step never started")
    first.kill()
    assert client.status(cid)["status"] == "RUNNING"
    services.start_worker(concurrency=1)
    doc = client.wait(cid, timeout=60, until={"COMPLETED", "FAILED"})
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
    services.start_beat()
    first = services.start_worker(concurrency=1)
    cid = client.start(plan, None, client_id="acme")
    wait_until(lambda: "undo charge" in names(services, key), timeout=60,
               message="the compensation never started")
    first.kill()
    assert client.status(cid)["status"] == "COMPENSATING"
    services.start_worker(concurrency=1)
    doc = client.wait(cid, timeout=90, until={"COMPENSATED", "FAILED"})
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
