"""The acceptance of the AI circuit breaker with a real worker: the Messages API server
on loopback answers 529 for a while, the breaker opens, AI steps wait (their attempts
deferred, not failed: a step with one attempt survives it) with few requests, and every
workflow completes once the server answers again. State in PostgreSQL, Redis broker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chassis import config, metrics
from chassis.api import Client
from chassis.state import StepStatus
from chassis.store.breaker import CLOSED, CircuitBreakers
from chassis.store.db import make_engine
from tests.fakes.anthropic_server import FakeAnthropic, error, message
from tests.helpers import wait_until
from tests.integration.conftest import Services, Worker

pytestmark = pytest.mark.timeout(180)

FAILURES = 3  # CHASSIS_AI_BREAKER_FAILURES
COOLDOWN = 1.0  # CHASSIS_AI_BREAKER_COOLDOWN

LINEAR = {"start_step": "write", "steps": {
    "write": {"action": "ai_text_generate_claude_haiku", "params": {"prompt": "p"},
              "next_step": "done"},  # one attempt: a deferral must not spend it
    "done": {"action": "complete_workflow"}}}
FAN_OUT = {"start_step": "drafts", "steps": {
    "drafts": {"action": "fan_out", "next_step": "done", "sub_tasks": [
        {"step_name": "short", "action": "ai_text_generate_claude_haiku",
         "params": {"prompt": "short"}},
        {"step_name": "plain", "action": "echo", "params": {"x": 1}}]},
    "done": {"action": "complete_workflow"}}}


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@pytest.fixture(scope="module")
def breakers(services: Services) -> Iterator[CircuitBreakers]:
    rows = CircuitBreakers(make_engine(services.env["CHASSIS_DATABASE_URL"]))
    rows.reset("anthropic")
    yield rows
    rows.reset("anthropic")  # the session's other AI tests share this database


@pytest.fixture(scope="module")
def ai_worker(services: Services, claude: FakeAnthropic,
              breakers: CircuitBreakers) -> Iterator[Worker]:
    env = {**services.env, "ANTHROPIC_BASE_URL": claude.url, "ANTHROPIC_API_KEY": "test-key",
           "CHASSIS_AI_PROVIDER": "anthropic", "CHASSIS_AI_BACKOFF": "0.05",
           "CHASSIS_AI_MAX_BACKOFF": "0.1", "CHASSIS_AI_TIMEOUT": "20",
           # a request's retries can reach the breaker's threshold: it opens inside them
           "CHASSIS_AI_MAX_RETRIES": str(FAILURES + 1),
           "CHASSIS_AI_BREAKER_FAILURES": str(FAILURES),
           "CHASSIS_AI_BREAKER_COOLDOWN": str(COOLDOWN)}
    worker = Services(env, services.tmp).start_worker()
    yield worker
    worker.stop()


def breaker_metric(services: Services) -> float:
    text = generate_latest(metrics.registry(config.load(services.env))).decode()
    [value] = [s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "circuit_breaker_state" and s.labels == {"provider": "anthropic"}]
    return value


def statuses(client: Client, cids: list[str]) -> list[str]:
    return [client.status(cid)["status"] for cid in cids]


def ai_rows(client: Client, cid: str, step: str) -> list[dict[str, Any]]:
    return [r for r in client.store.steps(cid) if r["step_name"] == step]


def test_a_provider_down_for_a_while_opens_the_breaker_and_ai_steps_wait_then_complete(
        services: Services, client: Client, ai_worker: Worker, claude: FakeAnthropic,
        breakers: CircuitBreakers) -> None:
    claude.reset()
    claude.default = error(529, "overloaded_error", "Overloaded")
    began = time.monotonic()
    cids = [client.start(LINEAR, client_id="acme", fuel_budget=1000),
            client.start(LINEAR, client_id="acme", fuel_budget=1000),
            client.start(FAN_OUT, client_id="acme", fuel_budget=1000)]

    # the breaker opens after FAILURES requests, all workers counting together
    wait_until(lambda: breakers.get("anthropic").state != CLOSED, timeout=60,
               message="the breaker did not open")
    assert breaker_metric(services) in (1, 2)
    # the provider stays down over several cool-downs: probes fail, the breaker opens
    # again, and the steps keep waiting (deferred attempts), never failing
    wait_until(lambda: len(claude.requests) >= FAILURES + 3, timeout=60,
               message="no probes after the cool-downs")
    deferred = wait_until(lambda: [r for cid in cids for r in client.store.steps(cid)
                                   if r["error_type"] == "AttemptDeferred"], timeout=30,
                          message="no attempt was deferred")
    assert all(r["status"] == StepStatus.FAILED for r in deferred)
    assert all(s in ("RUNNING", "AWAITING_RESPONSES") for s in statuses(client, cids))
    assert not [r for cid in cids for r in client.store.steps(cid)
                if r["status"] == StepStatus.FAILED and r["error_type"] != "AttemptDeferred"]
    # while open, requests are the probes only (one per cool-down), not every attempt's
    # retries: each of the three steps would otherwise send FAILURES + 2 per attempt
    down_for = time.monotonic() - began
    assert len(claude.requests) <= FAILURES + 2 * (down_for / COOLDOWN + 2), (
        len(claude.requests), down_for)

    # the provider recovers: a probe succeeds, the breaker closes, every workflow ends
    claude.default = message("Back again.", input_tokens=5, output_tokens=3)
    docs = [client.wait(cid, timeout=60) for cid in cids]
    assert [d["status"] for d in docs] == ["COMPLETED"] * 3, docs
    assert docs[0]["final_result"]["write"]["text"] == "Back again."
    assert docs[2]["final_result"]["drafts"]["short"]["text"] == "Back again."
    assert breakers.get("anthropic").state == CLOSED
    assert breakers.get("anthropic").failures == 0
    assert breaker_metric(services) == 0
    for cid, step in ((cids[0], "write"), (cids[1], "write"), (cids[2], "short")):
        rows = ai_rows(client, cid, step)
        assert [r["status"] for r in rows].count(StepStatus.COMPLETED) == 1
        assert {r["error_type"] for r in rows if r["status"] == StepStatus.FAILED} <= {
            "AttemptDeferred"}
