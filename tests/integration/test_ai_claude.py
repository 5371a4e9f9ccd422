"""ClaudeProvider (the real anthropic SDK) against a Messages API server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chassis.ai import ClaudeAPIError, EmbeddingsNotSupported, EmptyAnswer, TextRequest
from chassis.ai.claude import ClaudeOptions, ClaudeProvider
from tests.fakes.anthropic_server import FakeAnthropic, error, hang, message

pytestmark = pytest.mark.timeout(60)

REQUEST = TextRequest(model="claude-haiku-5-5", prompt="Write about Celery.")


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def claude(server: FakeAnthropic) -> ClaudeProvider:
    server.reset()
    return ClaudeProvider(ClaudeOptions(api_key="test-key", base_url=server.url, timeout=5,
                                        max_retries=3, backoff=0.01, max_backoff=0.05))


def test_the_request_as_the_api_receives_it(server: FakeAnthropic,
                                            claude: ClaudeProvider) -> None:
    server.script(message("Celery is a task queue.", input_tokens=21, output_tokens=6))
    result = claude.generate_text(TextRequest(model="claude-haiku-5-5",
                                              prompt="Write about Celery.", system="Be brief."))
    assert (result.text, result.model, result.stop_reason) == (
        "Celery is a task queue.", "claude-haiku-5-5", "end_turn")
    assert (result.input_tokens, result.output_tokens, result.provider) == (21, 6, "anthropic")
    [seen] = server.requests
    assert (seen.method, seen.path) == ("POST", "/v1/messages")
    assert seen.body == {"model": "claude-haiku-5-5", "max_tokens": 2048,
                         "system": "Be brief.",
                         "messages": [{"role": "user", "content": "Write about Celery."}]}
    assert seen.api_key == "test-key"
    assert seen.headers["anthropic-version"]
    assert seen.headers["x-stainless-retry-count"] == "0"


def test_temperature_and_effort_are_sent_only_when_set(server: FakeAnthropic,
                                                       claude: ClaudeProvider) -> None:
    claude.generate_text(REQUEST)
    claude.generate_text(TextRequest(model="m", prompt="p", temperature=0.2, effort="low"))
    claude.generate_text(TextRequest(model="m", prompt="p", temperature=0.0, max_tokens=5))
    plain, tuned, zero = (r.body for r in server.requests)
    assert "temperature" not in plain and "output_config" not in plain and "system" not in plain
    assert (tuned["temperature"], tuned["output_config"]) == (0.2, {"effort": "low"})
    assert (zero["temperature"], zero["max_tokens"]) == (0.0, 5)


def test_529_then_200_is_one_retry(server: FakeAnthropic, claude: ClaudeProvider) -> None:
    server.script(error(529, "overloaded_error", "Overloaded"), message("At last."))
    assert claude.generate_text(REQUEST).text == "At last."
    assert len(server.requests) == 2
    assert server.requests[0].body == server.requests[1].body


@pytest.mark.parametrize("reply", [
    error(429, "rate_limit_error", "Number of requests has exceeded your rate limit"),
    error(500, "api_error", "Internal server error"),
    error(503, "api_error", "Service unavailable"),
    error(529, "overloaded_error", "Overloaded"),
    error(409, "conflict_error", "try again", x_should_retry="true"),
], ids=["429", "500", "503", "529", "x-should-retry"])
def test_retryable_answers_are_retried(server: FakeAnthropic, claude: ClaudeProvider,
                                       reply: object) -> None:
    server.script(reply, reply, message("ok"))  # type: ignore[arg-type]
    assert claude.generate_text(REQUEST).text == "ok"
    assert len(server.requests) == 3


def test_retries_stop_at_the_limit_with_the_last_error(server: FakeAnthropic,
                                                       claude: ClaudeProvider) -> None:
    server.default = error(529, "overloaded_error", "Overloaded")
    with pytest.raises(ClaudeAPIError) as info:
        claude.generate_text(REQUEST)
    assert str(info.value) == "Claude API error 529 overloaded_error: Overloaded (after 4 attempts)"
    assert (info.value.status_code, info.value.attempts) == (529, 4)
    assert len(server.requests) == 4  # max_retries=3


def test_the_servers_retry_after_is_honoured(server: FakeAnthropic,
                                             claude: ClaudeProvider) -> None:
    server.script(error(429, "rate_limit_error", "slow down", retry_after_ms="40"),
                  message("ok"))
    assert claude.generate_text(REQUEST).text == "ok"
    assert len(server.requests) == 2


@pytest.mark.parametrize(("status", "kind", "text"), [
    (400, "invalid_request_error", "max_tokens: must be at least 1"),
    (401, "authentication_error", "invalid x-api-key"),
    (403, "permission_error", "Your API key does not have permission to use this model"),
    (404, "not_found_error", "model: claude-nope"),
    (500, "api_error", "do not retry this one"),
])
def test_other_errors_fail_at_once_with_the_apis_message(
        server: FakeAnthropic, claude: ClaudeProvider, status: int, kind: str,
        text: str) -> None:
    # the API's x-should-retry is obeyed, except that 400, 401 and 403 are never retried
    headers = {500: {"x_should_retry": "false"}, 404: {}}.get(status, {"x_should_retry": "true"})
    server.script(error(status, kind, text, **headers))
    with pytest.raises(ClaudeAPIError) as info:
        claude.generate_text(REQUEST)
    assert str(info.value) == f"Claude API error {status} {kind}: {text}"
    assert (info.value.status_code, info.value.error_type, info.value.attempts) == (
        status, kind, 1)
    assert info.value.request_id and info.value.request_id.startswith("req_")
    assert len(server.requests) == 1


def test_a_timeout_is_retried(server: FakeAnthropic) -> None:
    server.reset()
    claude = ClaudeProvider(ClaudeOptions(api_key="k", base_url=server.url, timeout=0.3,
                                          max_retries=2, backoff=0.01, max_backoff=0.05))
    server.script(hang(), message("after the timeout"))
    assert claude.generate_text(REQUEST).text == "after the timeout"
    assert len(server.requests) == 2


def test_an_unreachable_server_fails_after_the_retries() -> None:
    with FakeAnthropic() as gone:
        url = gone.url
    claude = ClaudeProvider(ClaudeOptions(api_key="k", base_url=url, timeout=2,
                                          max_retries=1, backoff=0.01))
    with pytest.raises(ClaudeAPIError, match=f"^Claude request to {url} failed.*"
                                             r"\(after 2 attempts\)$") as info:
        claude.generate_text(REQUEST)
    assert info.value.status_code is None


def test_an_answer_without_text_is_an_error(server: FakeAnthropic,
                                            claude: ClaudeProvider) -> None:
    server.script(message(None, stop_reason="max_tokens"), message("   "))
    for _ in range(2):
        with pytest.raises(EmptyAnswer, match=r"answered with no text \(stop_reason: "):
            claude.generate_text(REQUEST)
    assert len(server.requests) == 2  # an empty answer is not retried


def test_only_text_blocks_make_the_answer(server: FakeAnthropic,
                                          claude: ClaudeProvider) -> None:
    server.script(message(content=[
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig"},
        {"type": "text", "text": "First. "}, {"type": "text", "text": "Second."}]))
    assert claude.generate_text(REQUEST).text == "First. Second."


def test_no_embeddings_from_anthropic(claude: ClaudeProvider) -> None:
    with pytest.raises(EmbeddingsNotSupported,
                       match="^embedding generation not supported by Anthropic$"):
        claude.generate_embedding("text")
