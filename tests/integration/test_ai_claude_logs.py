"""A Claude retry warning in JSON logs names the model (issue 16): the real ClaudeProvider
against the fake Messages API server, its warning through the JSON formatter."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from chassis import logs
from chassis.ai import TextRequest
from chassis.ai.claude import ClaudeOptions, ClaudeProvider
from tests.fakes.anthropic_server import FakeAnthropic, error, message

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What chassis.ai.claude logs, as the worker writes it with CHASSIS_LOG_FORMAT=json."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.install(handler, "json")
    logger = logging.getLogger("chassis.ai.claude")
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def test_a_claude_retry_warning_in_json_logs_includes_the_model(
        json_log: io.StringIO) -> None:
    with FakeAnthropic() as server:
        server.script(error(529, "overloaded_error", "Overloaded"), message("At last."))
        claude = ClaudeProvider(ClaudeOptions(api_key="test-key", base_url=server.url,
                                              timeout=5, max_retries=3, backoff=0.01,
                                              max_backoff=0.05))
        with logs.bind(correlation_id="cid-7", step="draft", task_id="task-7"):
            answer = claude.generate_text(TextRequest(model="claude-haiku-5-5",
                                                      prompt="Write about Celery."))
        assert answer.text == "At last." and len(server.requests) == 2
    [warning] = [json.loads(line) for line in json_log.getvalue().splitlines()
                 if json.loads(line)["level"] == "WARNING"]
    assert warning["model"] == "claude-haiku-5-5"
    assert warning["message"].startswith("Claude request failed (HTTP 529), attempt 1 of 4;")
    assert (warning["logger"], warning["correlation_id"], warning["step"],
            warning["task_id"]) == ("chassis.ai.claude", "cid-7", "draft", "task-7")
