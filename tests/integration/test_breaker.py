"""The AI providers' circuit breaker (chassis.ai.breaker over chassis.store.breaker) on
SQLite and PostgreSQL: its states, concurrent workers agreeing on them, the provider
with the real anthropic SDK against a Messages API server on loopback, and the metric
``circuit_breaker_state``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chassis import config, metrics
from chassis.ai import ClaudeAPIError, TextRequest
from chassis.ai.breaker import CircuitBreaker, counts
from chassis.ai.claude import ClaudeOptions, ClaudeProvider
from chassis.errors import AttemptDeferred
from chassis.store.breaker import CLOSED, HALF_OPEN, OPEN, BreakerState, CircuitBreakers
from chassis.store.db import make_engine
from tests.fakes.anthropic_server import FakeAnthropic, error, message
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

P = "anthropic"
T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
REQUEST = TextRequest(model="claude-haiku-5-5", prompt="Write about Celery.")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def rows(db_url: str) -> CircuitBreakers:
    return CircuitBreakers(make_engine(db_url))


def fail(rows: CircuitBreakers, n: int, when: float = 0.0, threshold: int = 5,
         cooldown: float = 30.0) -> BreakerState:
    state = rows.get(P)
    for _ in range(n):
        state, _ = rows.failed(P, threshold=threshold, cooldown=cooldown, at=at(when))
    return state


# ---------------------------------------------------------------- the state machine


def test_no_row_is_closed_and_lets_requests_go(rows: CircuitBreakers) -> None:
    assert rows.get(P) == BreakerState(P, CLOSED, 0, None)
    permit = rows.acquire(P, lease=30, at=at(0))
    assert permit.allowed and not permit.probe


def test_failures_in_a_row_open_it_for_the_cooldown(rows: CircuitBreakers) -> None:
    assert fail(rows, 4) == BreakerState(P, CLOSED, 4, None)
    assert rows.acquire(P, lease=30, at=at(1)).allowed
    opened = fail(rows, 1, when=2)
    assert (opened.state, opened.failures, opened.opened_until) == (OPEN, 5, at(32))
    refused = rows.acquire(P, lease=30, at=at(10))
    assert not refused.allowed and not refused.probe
    assert refused.state.wait(at(10)) == 22
    # failures of requests sent before it opened change nothing
    assert fail(rows, 3, when=11) == opened
    assert rows.failed(P, threshold=5, cooldown=30, at=at(12)) == (opened, False)


def test_an_answer_resets_the_count(rows: CircuitBreakers) -> None:
    fail(rows, 4)
    assert rows.succeeded(P, at=at(1)) is True
    assert rows.get(P) == BreakerState(P, CLOSED, 0, None)
    assert rows.succeeded(P, at=at(2)) is False  # nothing to change: no write
    assert fail(rows, 4).state == CLOSED


def test_after_the_cooldown_one_caller_probes_and_its_success_closes_it(
        rows: CircuitBreakers) -> None:
    fail(rows, 5)
    probe = rows.acquire(P, lease=60, at=at(30))
    assert probe.allowed and probe.probe
    assert (probe.state.state, probe.state.opened_until) == (HALF_OPEN, at(90))
    other = rows.acquire(P, lease=60, at=at(31))
    assert not other.allowed and not other.probe and other.state.state == HALF_OPEN
    rows.succeeded(P, at=at(32))
    assert rows.get(P) == BreakerState(P, CLOSED, 0, None)
    assert rows.acquire(P, lease=60, at=at(33)).allowed


def test_a_failed_probe_opens_it_again(rows: CircuitBreakers) -> None:
    fail(rows, 5)
    assert rows.acquire(P, lease=60, at=at(30)).probe
    again, counted = rows.failed(P, threshold=5, cooldown=30, probe=True, at=at(35))
    assert (again.state, again.failures, again.opened_until, counted) == (OPEN, 6, at(65), True)
    assert not rows.acquire(P, lease=60, at=at(64)).allowed
    assert rows.acquire(P, lease=60, at=at(65)).probe


def test_a_probe_whose_lease_ran_out_is_taken_over(rows: CircuitBreakers) -> None:
    fail(rows, 5)
    assert rows.acquire(P, lease=60, at=at(30)).probe  # this prober dies
    assert not rows.acquire(P, lease=60, at=at(89)).allowed
    assert rows.acquire(P, lease=60, at=at(90)).probe


def concurrently(n: int, fn: Callable[[], Any]) -> list[Any]:
    """``fn`` in ``n`` threads released at once; their results."""
    start = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


def test_exactly_one_of_many_concurrent_callers_wins_the_probe(
        rows: CircuitBreakers) -> None:
    fail(rows, 5)
    permits = concurrently(12, lambda: rows.acquire(P, lease=60, at=at(31)))
    assert sum(p.probe for p in permits) == 1
    assert sum(p.allowed for p in permits) == 1
    assert rows.get(P).state == HALF_OPEN


def test_concurrent_failures_are_all_counted_and_open_it_once(
        rows: CircuitBreakers) -> None:
    outcomes = concurrently(10, lambda: [rows.failed(P, threshold=25, cooldown=30, at=at(0))
                                         for _ in range(3)])
    got = rows.get(P)
    assert (got.state, got.failures) == (OPEN, 25)  # 30 failures; the last 5 came too late
    counted = [state for batch in outcomes for state, was in batch if was]
    assert len(counted) == 25
    assert [s.state for s in counted].count(OPEN) == 1  # exactly one failure opened it


# ---------------------------------------------------------------- the breaker's rules


def test_what_counts_as_a_failure() -> None:
    assert all(counts(s) for s in (None, 408, 429, 500, 502, 503, 529))
    assert not any(counts(s) for s in (400, 401, 403, 404, 409, 413, 422))


def breaker(rows: CircuitBreakers, failures: int = 3, cooldown: float = 0.3,
            lease: float = 5.0) -> CircuitBreaker:
    return CircuitBreaker(rows, P, failures=failures, cooldown=cooldown, lease=lease)


def test_an_open_breaker_defers_with_what_is_left_of_the_cooldown(
        rows: CircuitBreakers) -> None:
    b = breaker(rows, cooldown=20)
    b.before_request()
    b.failed("HTTP 529")
    b.failed("HTTP 529")
    with pytest.raises(AttemptDeferred) as opened:
        b.failed("HTTP 529")
    assert 20 <= opened.value.retry_after <= 20 * 1.1 + 0.1
    assert str(opened.value).startswith(
        "the circuit breaker of anthropic is open after 3 failures in a row (last: HTTP 529)")
    assert opened.value.usage == {"input_tokens": 0, "output_tokens": 0}
    with pytest.raises(AttemptDeferred) as later:
        breaker(rows, cooldown=20).before_request()  # another worker's attempt
    assert 19 <= later.value.retry_after <= 20 * 1.1 + 0.1


def test_the_probe_holds_the_half_open_breaker_until_its_outcome(
        rows: CircuitBreakers) -> None:
    fail(rows, 3, threshold=3, cooldown=0.3)
    first, second = breaker(rows), breaker(rows)
    wait_until(lambda: rows.get(P).wait(datetime.now(UTC)) == 0, timeout=10)
    first.before_request()
    assert first.probe
    with pytest.raises(AttemptDeferred) as waiting:
        second.before_request()
    assert "half-open" in str(waiting.value)
    assert 0.05 <= waiting.value.retry_after <= 0.3 * 1.1 + 0.01
    with pytest.raises(AttemptDeferred):  # the probe failed: open again
        first.failed("HTTP 529")
    assert rows.get(P).state == OPEN
    wait_until(lambda: rows.get(P).wait(datetime.now(UTC)) == 0, timeout=10)
    second.before_request()
    second.succeeded()
    assert rows.get(P) == BreakerState(P, CLOSED, 0, None)


def test_an_unreachable_breaker_database_lets_requests_go(tmp_path: Path) -> None:
    b = breaker(CircuitBreakers(make_engine(f"sqlite:///{tmp_path / 'not-migrated.db'}")),
                failures=1)
    b.before_request()
    b.failed("HTTP 529")  # not counted, not raised
    b.succeeded()


# ---------------------------------------------------------------- the provider


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


def claude(server: FakeAnthropic, rows: CircuitBreakers, max_retries: int = 10,
           failures: int = 3, cooldown: float = 0.3) -> ClaudeProvider:
    server.reset()
    return ClaudeProvider(ClaudeOptions(api_key="test-key", base_url=server.url, timeout=5,
                                        max_retries=max_retries, backoff=0.01,
                                        max_backoff=0.02, breaker_failures=failures,
                                        breaker_cooldown=cooldown), breakers=rows)


def test_the_provider_stops_retrying_once_the_breaker_opens_then_probes(
        server: FakeAnthropic, rows: CircuitBreakers) -> None:
    provider = claude(server, rows)
    server.default = error(529, "overloaded_error", "Overloaded")
    with pytest.raises(AttemptDeferred) as opened:
        provider.generate_text(REQUEST)
    assert "open after 3 failures in a row (last: HTTP 529)" in str(opened.value)
    assert len(server.requests) == 3  # not the 11 the retries allow
    with pytest.raises(AttemptDeferred):  # open: no request at all
        provider.generate_text(REQUEST)
    assert len(server.requests) == 3
    wait_until(lambda: rows.get(P).wait(datetime.now(UTC)) == 0, timeout=10)
    with pytest.raises(AttemptDeferred):  # the probe: one request, failed, open again
        provider.generate_text(REQUEST)
    assert len(server.requests) == 4 and rows.get(P).state == OPEN
    server.default = message("Back again.")
    wait_until(lambda: rows.get(P).wait(datetime.now(UTC)) == 0, timeout=10)
    assert provider.generate_text(REQUEST).text == "Back again."
    assert rows.get(P) == BreakerState(P, CLOSED, 0, None)


def test_retries_run_out_before_the_breaker_opens_as_before(
        server: FakeAnthropic, rows: CircuitBreakers) -> None:
    provider = claude(server, rows, max_retries=1, failures=5)
    server.default = error(503, "api_error", "Service unavailable")
    with pytest.raises(ClaudeAPIError) as failed:
        provider.generate_text(REQUEST)
    assert failed.value.attempts == 2
    assert rows.get(P) == BreakerState(P, CLOSED, 2, None)
    server.script(error(400, "invalid_request_error", "bad"))  # an answer: count reset
    with pytest.raises(ClaudeAPIError):
        provider.generate_text(REQUEST)
    assert rows.get(P).failures == 0


def test_without_a_worker_attempt_there_is_no_breaker(server: FakeAnthropic) -> None:
    server.reset()
    provider = ClaudeProvider(ClaudeOptions(api_key="k", base_url=server.url, timeout=5,
                                            max_retries=0, breaker_failures=1))
    assert provider.breaker() is None
    server.default = error(529, "overloaded_error", "Overloaded")
    for _ in range(2):
        with pytest.raises(ClaudeAPIError):
            provider.generate_text(REQUEST)
    assert len(server.requests) == 2


# ---------------------------------------------------------------- the metric


def breaker_metric(db_url: str, tmp_path: Path) -> dict[str, float]:
    settings = config.load({"CHASSIS_DATABASE_URL": db_url, "CHASSIS_BROKER_URL": "memory://",
                            "CHASSIS_HOME": str(tmp_path)})
    text = generate_latest(metrics.registry(settings)).decode()
    return {s.labels["provider"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "circuit_breaker_state"}


def test_the_metric_is_the_breakers_state(rows: CircuitBreakers, db_url: str,
                                          tmp_path: Path) -> None:
    assert breaker_metric(db_url, tmp_path) == {P: 0}  # no row yet: closed
    fail(rows, 5, when=0)
    assert breaker_metric(db_url, tmp_path) == {P: 1}
    rows.acquire(P, lease=60, at=at(30))
    assert breaker_metric(db_url, tmp_path) == {P: 2}
    rows.succeeded(P)
    assert breaker_metric(db_url, tmp_path) == {P: 0}
