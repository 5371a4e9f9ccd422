"""AI steps on a real worker that has no ANTHROPIC_API_KEY: with CHASSIS_AI_PROVIDER
=anthropic the step fails naming the variable, before any request; by default the
offline provider answers (and still nothing is sent)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from chassis.api import Client
from tests.fakes.anthropic_server import FakeAnthropic
from tests.integration.conftest import ROOT, Services, Worker

pytestmark = pytest.mark.timeout(120)

HAIKU = {"start_step": "write", "steps": {
    "write": {"action": "ai_text_generate_claude_haiku",
              "params": {"prompt": "Write about {{ input.topic }}."}, "next_step": "done"},
    "done": {"action": "complete_workflow"}}}


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@contextmanager
def keyless_worker(services: Services, claude: FakeAnthropic, provider: str) -> Iterator[Worker]:
    # empty values override whatever the machine's environment has
    env = {**services.env, "ANTHROPIC_API_KEY": "", "ANTHROPIC_BASE_URL": claude.url,
           "CHASSIS_AI_PROVIDER": provider}
    worker = Services(env, services.tmp).start_worker()
    try:
        yield worker
    finally:
        worker.stop()


def test_claude_without_a_key_fails_naming_it_and_sends_nothing(
        services: Services, client: Client, claude: FakeAnthropic) -> None:
    with keyless_worker(services, claude, "anthropic"):
        cid = client.start(HAIKU, {"topic": "Celery"}, client_id="acme")
        doc = client.wait(cid, timeout=60)
    assert doc["status"] == "FAILED"
    assert doc["error"].startswith("step 'write' failed: ANTHROPIC_API_KEY is not set")
    assert claude.requests == []


def test_by_default_the_offline_provider_answers(services: Services, client: Client,
                                                 claude: FakeAnthropic) -> None:
    with keyless_worker(services, claude, ""):
        cid = client.start(ROOT / "examples" / "research_assistant.yaml", None,
                           client_id="acme")
        doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    answer = doc["final_result"]["analyze_research"]
    assert answer["provider"] == "offline" and answer["model"] == "claude-haiku-5-5"
    assert "latest developments in durable workflow engines" in answer["text"]
    [debit] = [e for e in client.ledger(cid)
               if e["step"] == "analyze_research" and e["kind"] == "settle"]
    assert debit["amount"] == 10 and debit["usage"] == answer["usage"]
    assert claude.requests == []
