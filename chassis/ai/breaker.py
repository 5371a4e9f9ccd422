"""A circuit breaker per AI provider, shared by every worker through the database.

While a provider keeps failing (5xx, 529 overloaded included, 429, 408, timeouts and
connection errors), sending it more requests only spends the steps' attempts and
delays its recovery. So failures in a row are counted (any answer resets the count:
other 4xx say the provider is up and the request is at fault); at
CHASSIS_AI_BREAKER_FAILURES the breaker **opens** for CHASSIS_AI_BREAKER_COOLDOWN
seconds, and no request is sent: an AI step that would call the provider raises
:class:`~chassis.errors.AttemptDeferred` instead, and is tried again after the
cool-down without spending one of its attempts (nothing was consumed). Once the
cool-down has passed, exactly one caller is let through (**half-open**): its request
is the probe. A success closes the breaker and everyone goes again; a failure opens it
for another cool-down. A prober that dies holds the probe no longer than its lease
(the longer of the cool-down and the request timeout).

The breaker guards every request, the provider's own retries included: a retry loop
that opens the breaker stops there and defers its attempt. Rows and statements are
:mod:`chassis.store.breaker`'s. The breaker never fails a step of its own: when its
database cannot be read or written, requests go as if it were closed (logged).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from chassis.errors import AttemptDeferred
from chassis.store.breaker import CLOSED, HALF_OPEN, OPEN, BreakerState, CircuitBreakers, now

log = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses that count as the provider failing, besides every 5xx.
FAILING_STATUSES = frozenset({408, 429})
#: Deferred attempts wait up to this share of the cool-down more (so that they do not
#: all come back at the same instant).
JITTER = 0.1
#: The shortest deferral, in seconds (a waiter must not spin).
MIN_WAIT = 0.05

#: Providers that have a breaker (the offline one makes no requests).
PROVIDERS = ("anthropic",)
#: The value of each state in the metric ``circuit_breaker_state``.
STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


def counts(status: int | None) -> bool:
    """Whether an answer counts as the provider failing: None (no answer: a timeout or
    a connection error), 408, 429 or any 5xx."""
    return status is None or status in FAILING_STATUSES or status >= 500


class CircuitBreaker:
    """One provider's breaker, as one attempt's requests see it (it remembers whether
    this attempt holds the half-open probe). ``failures`` opens it, for ``cooldown``
    seconds; ``lease``: the longest a probe may hold the half-open breaker."""

    def __init__(self, rows: CircuitBreakers, provider: str, *, failures: int,
                 cooldown: float, lease: float) -> None:
        self.rows = rows
        self.provider = provider
        self.failures = failures
        self.cooldown = cooldown
        self.lease = max(lease, cooldown)
        self.probe = False

    def before_request(self) -> None:
        """Return when a request may go; raise :class:`AttemptDeferred` (retry_after:
        what is left of the cool-down, or of another caller's probe) when not."""
        permit = self._safely(lambda: self.rows.acquire(self.provider, lease=self.lease),
                              "checking it")
        if permit is None or permit.allowed:
            if permit is not None and permit.probe:
                self.probe = True
                log.info("circuit breaker of %s: cool-down over, this request is the probe",
                         self.provider)
            return
        raise self._deferred(permit.state, now())

    def succeeded(self) -> None:
        """The provider answered (any answer but a counted failure): the breaker closes."""
        changed = self._safely(lambda: self.rows.succeeded(self.provider), "closing it")
        if changed and self.probe:
            log.info("circuit breaker of %s closed: the probe succeeded", self.provider)
        elif changed:
            log.debug("circuit breaker of %s: an answer reset the failure count",
                      self.provider)
        self.probe = False

    def failed(self, reason: str) -> None:
        """Count a failure (``reason``: e.g. ``HTTP 529``). Raise :class:`AttemptDeferred`
        when the breaker is open afterwards (opened by this failure or another's)."""
        probe, self.probe = self.probe, False
        outcome = self._safely(lambda: self.rows.failed(
            self.provider, threshold=self.failures, cooldown=self.cooldown, probe=probe),
            "counting a failure")
        if outcome is None or outcome[0].state == CLOSED:
            return
        after, counted = outcome
        t = now()
        if probe and counted:
            log.warning("circuit breaker of %s open again for %.3g s: the probe failed (%s)",
                        self.provider, after.wait(t), reason)
        elif counted and after.state == OPEN:  # this failure opened it
            log.warning("circuit breaker of %s open for %.3g s after %d failures in a row "
                        "(last: %s): AI steps wait instead of calling", self.provider,
                        after.wait(t), after.failures, reason)
        raise self._deferred(after, t, reason)

    # ------------------------------------------------------------------ helpers

    def _deferred(self, state: BreakerState, t: datetime,
                  reason: str | None = None) -> AttemptDeferred:
        wait = state.wait(t)
        if state.state != OPEN:  # another caller's probe: its outcome comes sooner
            wait = min(wait, self.cooldown)
        wait = max(wait, MIN_WAIT) + random.uniform(0, JITTER * self.cooldown)
        what = (f"open after {state.failures} failures in a row"
                if state.state == OPEN else "half-open, another request is probing it")
        done = f" (last: {reason}): retries stopped" if reason else ": no request sent"
        return AttemptDeferred(f"the circuit breaker of {self.provider} is {what}{done}, "
                               f"trying again in {wait:.3g} s", retry_after=wait)

    def _safely(self, fn: Callable[[], T], doing: str) -> T | None:
        try:
            return fn()
        except SQLAlchemyError as exc:
            log.warning("circuit breaker of %s: the database failed while %s (%s); "
                        "requests go as if it were closed", self.provider, doing,
                        " ".join(str(exc).split())[:200])
            return None


__all__ = ["FAILING_STATUSES", "PROVIDERS", "STATE_VALUES", "CircuitBreaker", "counts"]
