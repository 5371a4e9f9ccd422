"""Plans with Claude steps, run by a real worker whose anthropic SDK talks to a Messages
API server on loopback (ANTHROPIC_BASE_URL); state in PostgreSQL, Redis broker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from chassis.api import Client
from tests.fakes.anthropic_server import FakeAnthropic, error, message
from tests.integration.conftest import Services, Worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@pytest.fixture(scope="module")
def ai_worker(services: Services, claude: FakeAnthropic) -> Iterator[Worker]:
    env = {**services.env, "ANTHROPIC_BASE_URL": claude.url, "ANTHROPIC_API_KEY": "test-key",
           "CHASSIS_AI_PROVIDER": "anthropic", "CHASSIS_AI_BACKOFF": "0.05",
           "CHASSIS_AI_MAX_BACKOFF": "0.2", "CHASSIS_AI_TIMEOUT": "20"}
    worker = Services(env, services.tmp).start_worker()
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def fresh(claude: FakeAnthropic) -> None:
    claude.reset()


def plan(params: dict[str, Any], action: str = "ai_text_generate_claude_haiku") -> dict[str, Any]:
    return {"start_step": "write", "steps": {
        "write": {"action": action, "params": params, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}


def run(client: Client, params: dict[str, Any], input: Any = None,
        action: str = "ai_text_generate_claude_haiku") -> tuple[str, dict[str, Any]]:
    cid = client.start(plan(params, action), input, client_id="acme", fuel_budget=100)
    return cid, client.wait(cid, timeout=60)


def ledger_of(client: Client, cid: str, step: str) -> list[dict[str, Any]]:
    return [e for e in client.ledger(cid) if e["step"] == step]


def settled(client: Client, cid: str, step: str) -> dict[str, Any]:
    """The step's one settlement (its reservation and release are the other rows)."""
    rows = ledger_of(client, cid, step)
    assert [r["kind"] for r in rows] in (["reserve", "settle", "release"],
                                         ["reserve", "settle"]), rows
    return rows[1]


def test_haiku_step_completes_with_the_servers_text_and_usage(
        client: Client, ai_worker: Worker, claude: FakeAnthropic) -> None:
    claude.default = message("Celery runs tasks.", input_tokens=21, output_tokens=5)
    cid, doc = run(client, {"prompt": "Write about {{ input.topic }}.",
                            "system": "You write for {{ input.audience }}."},
                   {"topic": "Celery", "audience": "platform teams"})
    assert doc["status"] == "COMPLETED", doc
    assert doc["final_result"]["write"] == {
        "text": "Celery runs tasks.", "model": "claude-haiku-5-5", "stop_reason": "end_turn",
        "usage": {"input_tokens": 21, "output_tokens": 5}, "provider": "anthropic"}
    [seen] = claude.requests
    assert seen.body == {
        "model": "claude-haiku-5-5", "max_tokens": 2048,
        "system": "You write for platform teams.",
        "messages": [{"role": "user", "content": "Write about Celery."}]}
    assert seen.api_key == "test-key"
    debit = settled(client, cid, "write")  # 21 in, 5 out: less than haiku's floor of 10
    assert (debit["action"], debit["amount"]) == ("ai_text_generate_claude_haiku", 10)
    assert debit["usage"] == {"input_tokens": 21, "output_tokens": 5}
    assert doc["fuel"]["spent"] == 11


def test_temperature_is_sent_when_the_step_sets_it(client: Client, ai_worker: Worker,
                                                   claude: FakeAnthropic) -> None:
    _, doc = run(client, {"prompt": "p", "temperature": 0.2, "effort": "low",
                          "max_tokens": 300})
    assert doc["status"] == "COMPLETED", doc
    [seen] = claude.requests
    assert (seen.body["temperature"], seen.body["max_tokens"]) == (0.2, 300)
    assert seen.body["output_config"] == {"effort": "low"}


def test_overloaded_then_ok_is_one_retry_and_one_debit(client: Client, ai_worker: Worker,
                                                       claude: FakeAnthropic) -> None:
    claude.script(error(529, "overloaded_error", "Overloaded"), message("Second time lucky."))
    cid, doc = run(client, {"prompt": "p"})
    assert doc["status"] == "COMPLETED", doc
    assert doc["final_result"]["write"]["text"] == "Second time lucky."
    assert len(claude.requests) == 2
    assert settled(client, cid, "write")["amount"] == 10  # settled once
    write = next(s for s in doc["steps"] if s["name"] == "write")
    assert write["attempts"] == 1  # retried inside the step: the step ran once
    assert doc["fuel"]["spent"] == sum(e["amount"] for e in client.ledger(cid)) == 11


def test_unauthorized_fails_at_once_with_the_apis_message(
        client: Client, ai_worker: Worker, claude: FakeAnthropic) -> None:
    claude.default = error(401, "authentication_error", "invalid x-api-key")
    cid, doc = run(client, {"prompt": "p"})
    assert doc["status"] == "FAILED"
    assert doc["error"] == ("step 'write' failed: Claude API error 401 authentication_error: "
                            "invalid x-api-key")
    assert len(claude.requests) == 1
    assert settled(client, cid, "write")["amount"] == 0  # no answer, nothing billed
    assert client.status(cid)["fuel"]["spent"] == 0


def test_a_missing_template_key_fails_naming_it_before_any_request(
        client: Client, ai_worker: Worker, claude: FakeAnthropic) -> None:
    _, doc = run(client, {"prompt": "Write about {{ input.topic }}."}, {"subject": "Celery"})
    assert doc["status"] == "FAILED"
    assert doc["error"].startswith(
        "step 'write' failed: prompt template: missing key 'topic': ")
    assert claude.requests == []


def test_ai_text_generate_sends_the_plans_model(client: Client, ai_worker: Worker,
                                                claude: FakeAnthropic) -> None:
    _, doc = run(client, {"prompt": "p", "model": "claude-opus-5-5"}, action="ai_text_generate")
    assert doc["status"] == "COMPLETED", doc
    assert [r.body["model"] for r in claude.requests] == ["claude-opus-5-5"]
    assert doc["final_result"]["write"]["model"] == "claude-opus-5-5"


def test_ai_sub_tasks_of_a_fan_out(client: Client, ai_worker: Worker,
                                   claude: FakeAnthropic) -> None:
    fan = {"start_step": "drafts", "steps": {
        "drafts": {"action": "fan_out", "next_step": "done", "sub_tasks": [
            {"step_name": "short", "action": "ai_text_generate_claude_haiku",
             "params": {"prompt": "Short take on {{ input.topic }}"}},
            {"step_name": "long", "action": "ai_text_generate_claude_sonnet",
             "params": {"prompt": "Long take on {{ input.topic }}"}}]},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(fan, {"topic": "chords"}, client_id="acme", fuel_budget=100)
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    assert {r.body["model"]: r.body["messages"][0]["content"] for r in claude.requests} == {
        "claude-haiku-5-5": "Short take on chords", "claude-sonnet-5-5": "Long take on chords"}
    assert doc["fuel"]["spent"] == 5 + 10 + 25 + 1
    for step in ("short", "long"):  # 12 in, 7 out: each at its model's floor
        assert settled(client, cid, step)["usage"] == {"input_tokens": 12, "output_tokens": 7}


def test_a_template_that_would_hold_the_worker_fails_its_step_and_the_worker_goes_on(
        client: Client, ai_worker: Worker, claude: FakeAnthropic) -> None:
    claude.default = message("fine", input_tokens=3, output_tokens=1)
    _, doc = run(client, {"prompt": "{{ 9 ** (9 ** 8) }}"})
    assert doc["status"] == "FAILED"
    assert "9 ** 43046721 is too large to compute" in doc["error"]
    _, doc = run(client, {"prompt": "{% for i in range(100000) %}{% for j in range(100000) %}"
                                    "{% endfor %}{% endfor %}"})
    assert doc["status"] == "FAILED" and "took longer than 2 s" in doc["error"]
    assert claude.requests == []  # no request for either
    _, doc = run(client, {"prompt": "Hello {{ input.name }}"}, {"name": "next"})
    assert doc["status"] == "COMPLETED"
