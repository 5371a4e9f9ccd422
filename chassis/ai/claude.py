"""Claude through the official ``anthropic`` SDK (the Messages API).

Retries are ours, not the SDK's (it is built with ``max_retries=0``), so that the limit,
the backoff and the log lines are the ones configured: 408, 429, 5xx (529 overloaded
included), timeouts and connection errors are tried again up to CHASSIS_AI_MAX_RETRIES
times, waiting CHASSIS_AI_BACKOFF doubled each time with jitter (a server's retry-after
is honoured), never more than CHASSIS_AI_MAX_BACKOFF. 400, 401 and 403 fail at once with
the API's message, and so do other 4xx unless the API's x-should-retry header says
otherwise (as the SDK's own policy does). A retry happens inside the step's task, so the
step's fuel, debited once at dispatch, is never charged again.

Every request, retries included, first asks the provider's circuit breaker
(:mod:`chassis.ai.breaker`, shared by all workers through the worker's database): while
it is open, no request is sent and the attempt is deferred
(:class:`~chassis.errors.AttemptDeferred`: tried again after the cool-down without
spending one of the step's attempts), and a retry loop whose failures open it stops
there and defers its attempt too. Outside a worker's attempt (no database at hand) there
is no breaker.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anthropic
from opentelemetry.trace import SpanKind

from chassis import tracing
from chassis.actions import current_attempt
from chassis.ai.breaker import CircuitBreaker, counts
from chassis.ai.errors import ClaudeAPIError, EmbeddingsNotSupported, EmptyAnswer, MissingAPIKey
from chassis.ai.provider import TextRequest, TextResult
from chassis.config import Settings
from chassis.store.breaker import CircuitBreakers

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.anthropic.com"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait (retry-after-ms, retry-after), if it says."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return max(0.0, float(raw) * scale)
        except ValueError:
            pass
        try:  # retry-after may also be an HTTP date
            return max(0.0, email.utils.parsedate_to_datetime(raw).timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return None


#: Refusals that no retry can fix: they fail at once, whatever the headers say.
NEVER_RETRIED = frozenset({400, 401, 403})


def _retryable(exc: anthropic.APIStatusError) -> bool:
    if exc.status_code in NEVER_RETRIED:
        return False
    should = exc.response.headers.get("x-should-retry")
    if should in ("true", "false"):  # the API says so explicitly
        return should == "true"
    return exc.status_code in (408, 429) or exc.status_code >= 500


@dataclass(frozen=True)
class ClaudeOptions:
    """How the provider talks to the API (from :class:`Settings`)."""

    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    timeout: float = 300.0
    max_retries: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ClaudeOptions:
        """Raises :class:`MissingAPIKey` when ANTHROPIC_API_KEY is not set."""
        if not settings.anthropic_api_key:
            raise MissingAPIKey(
                "ANTHROPIC_API_KEY is not set: AI steps cannot call Claude. Set "
                "ANTHROPIC_API_KEY, or CHASSIS_AI_PROVIDER=offline for deterministic "
                "stand-in text.")
        return cls(api_key=settings.anthropic_api_key,
                   base_url=settings.anthropic_base_url or DEFAULT_BASE_URL,
                   timeout=settings.ai_timeout, max_retries=settings.ai_max_retries,
                   backoff=settings.ai_backoff, max_backoff=settings.ai_max_backoff,
                   breaker_failures=settings.ai_breaker_failures,
                   breaker_cooldown=settings.ai_breaker_cooldown)


class ClaudeProvider:
    """Text generation with Claude. ``breakers``: where the circuit breaker is kept
    (default: the running attempt's, see :meth:`breaker`)."""

    name = "anthropic"

    def __init__(self, options: ClaudeOptions, breakers: CircuitBreakers | None = None) -> None:
        self.options = options
        self.breakers = breakers
        # explicit arguments: the SDK then reads no credential or URL from the environment
        self.client = anthropic.Anthropic(api_key=options.api_key, base_url=options.base_url,
                                          max_retries=0, timeout=options.timeout)

    @staticmethod
    def for_settings(settings: Settings) -> ClaudeProvider:
        """The provider for these settings, shared (so a worker keeps its connections)."""
        return _shared(ClaudeOptions.from_settings(settings))

    # ------------------------------------------------------------------ generation

    def generate_text(self, request: TextRequest) -> TextResult:
        """Send one Messages request (retried as the module says); the answer's text."""
        message = self._create_with_retries(request)
        text = "".join(block.text for block in message.content if block.type == "text")
        u = message.usage
        cache_write = getattr(u, "cache_creation_input_tokens", None) or 0
        cache_read = getattr(u, "cache_read_input_tokens", None) or 0
        if not text.strip():
            used = {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                    "cache_creation_input_tokens": cache_write,
                    "cache_read_input_tokens": cache_read}
            raise EmptyAnswer(f"Claude ({message.model}) answered with no text "
                              f"(stop_reason: {message.stop_reason})", usage=used)
        return TextResult(text=text, model=message.model, stop_reason=message.stop_reason,
                          input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                          provider=self.name, cache_write_tokens=cache_write,
                          cache_read_tokens=cache_read)

    def generate_embedding(self, text: str) -> list[float]:
        """Anthropic has no embeddings endpoint."""
        raise EmbeddingsNotSupported()

    def _create(self, request: TextRequest) -> anthropic.types.Message:
        kwargs: dict[str, Any] = {
            "model": request.model, "max_tokens": request.max_tokens,
            "messages": [{"role": "user", "content": request.prompt}]}
        if request.system:
            kwargs["system"] = request.system
        if request.effort:
            kwargs["output_config"] = {"effort": request.effort}
        if request.temperature is not None:
            # not in the current SDK's typed signature (newer models reject values other
            # than the default): in the body only when a plan sets it
            kwargs["extra_body"] = {"temperature": request.temperature}
        # one span per request (a retry is another), as the GenAI conventions have it
        with tracing.span(f"chat {request.model}", kind=SpanKind.CLIENT, attributes={
                "gen_ai.system": "anthropic", "gen_ai.operation.name": "chat",
                "gen_ai.request.model": request.model,
                "gen_ai.request.max_tokens": request.max_tokens,
                "gen_ai.request.temperature": request.temperature,
                "server.address": urlsplit(self.options.base_url).hostname}) as span:
            message = self.client.messages.create(**kwargs)
            if span.is_recording():
                span.set_attributes({
                    "gen_ai.response.model": message.model,
                    "gen_ai.response.id": message.id,
                    "gen_ai.response.finish_reasons": [message.stop_reason or ""],
                    "gen_ai.usage.input_tokens": message.usage.input_tokens,
                    "gen_ai.usage.output_tokens": message.usage.output_tokens})
            return message

    def breaker(self) -> CircuitBreaker | None:
        """This provider's circuit breaker, in ``breakers`` or else in the running
        attempt's database; None outside a worker's attempt."""
        rows = self.breakers
        if rows is None:
            attempt = current_attempt()
            rows = attempt.breakers if attempt is not None else None
        if rows is None:
            return None
        o = self.options
        return CircuitBreaker(rows, self.name, failures=o.breaker_failures,
                              cooldown=o.breaker_cooldown, lease=o.timeout)

    def _create_with_retries(self, request: TextRequest) -> anthropic.types.Message:
        breaker = self.breaker()
        attempt = 0
        while True:
            attempt += 1
            if breaker is not None:
                breaker.before_request()  # raises AttemptDeferred while it is open
            try:
                message = self._create(request)
            except anthropic.APIStatusError as exc:
                reason = f"HTTP {exc.status_code}"
                if breaker is not None:
                    if counts(exc.status_code):
                        breaker.failed(reason)  # raises AttemptDeferred once it opens
                    else:
                        breaker.succeeded()  # the provider is up; the request is at fault
                if not _retryable(exc) or attempt > self.options.max_retries:
                    raise self._status_error(exc, attempt) from None
                asked = _retry_after(exc.response.headers)
            except anthropic.APIConnectionError as exc:  # timeouts included
                reason, asked = type(exc).__name__, None
                if breaker is not None:
                    breaker.failed(reason)
                if attempt > self.options.max_retries:
                    raise self._connection_error(exc, attempt) from None
            else:
                if breaker is not None:
                    breaker.succeeded()
                return message
            delay = self._delay(attempt, asked)
            log.warning("Claude request failed (%s), attempt %d of %d; retrying in %.2f s",
                        reason, attempt, self.options.max_retries + 1, delay,
                        extra={"model": request.model})
            time.sleep(delay)

    def _delay(self, attempt: int, asked: float | None) -> float:
        """Exponential backoff with jitter (half to all of the step), at least what the
        server asked for, at most max_backoff."""
        step = min(self.options.max_backoff, self.options.backoff * 2 ** (attempt - 1))
        delay = step * random.uniform(0.5, 1.0)
        if asked is not None:
            delay = max(delay, asked)
        return min(delay, self.options.max_backoff)

    # ------------------------------------------------------------------ errors

    def _tries(self, attempt: int) -> str:
        return f" (after {attempt} attempts)" if attempt > 1 else ""

    def _status_error(self, exc: anthropic.APIStatusError, attempt: int) -> ClaudeAPIError:
        error = exc.body.get("error") if isinstance(exc.body, dict) else None
        error = error if isinstance(error, dict) else {}
        kind = error.get("type") if isinstance(error.get("type"), str) else None
        detail = error.get("message") or exc.response.text[:500] or exc.message
        return ClaudeAPIError(
            f"Claude API error {exc.status_code}{f' {kind}' if kind else ''}: {detail}"
            f"{self._tries(attempt)}",
            status_code=exc.status_code, error_type=kind,
            request_id=exc.response.headers.get("request-id"), attempts=attempt)

    def _connection_error(self, exc: anthropic.APIConnectionError,
                          attempt: int) -> ClaudeAPIError:
        what = "timed out" if isinstance(exc, anthropic.APITimeoutError) else "failed"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        return ClaudeAPIError(
            f"Claude request to {self.options.base_url} {what}{cause}{self._tries(attempt)}",
            status_code=None, error_type=None, request_id=None, attempts=attempt)


@functools.lru_cache(maxsize=8)
def _shared(options: ClaudeOptions) -> ClaudeProvider:
    return ClaudeProvider(options)
