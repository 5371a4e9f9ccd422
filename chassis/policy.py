"""Retry policies and attempt timeouts (Temporal's ``RetryPolicy``, resolved per step).

A plan states them in layers: ``defaults.retry`` / ``defaults.timeout`` on the plan, a
fan_out step's ``retry`` / ``timeout`` for its sub-tasks, and a step's or sub-task's
own. Each layer is a partial :class:`RetryOptions` (only the fields it sets); the
layers are merged field by field, the innermost winning, into one :class:`RetryPolicy`.

Delays are computed here, deterministically: the jitter comes from a hash of the
workflow, the step and the attempt, so a replayed decision schedules the same delay.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

#: Largest values a plan may state (bounded so that a typo cannot schedule a retry in a
#: thousand years or an attempt that never times out).
MAX_ATTEMPTS_LIMIT = 1000
MAX_SECONDS = 7 * 24 * 3600.0
MAX_NON_RETRYABLE = 100
#: A ``non_retryable`` entry: an exception class name, optionally dotted
#: (``ValueError``, ``anthropic.RateLimitError``); matched by its last component.
ERROR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
ERROR_NAME_MAX = 200

#: Error types of the failures agentchassis itself reports for an attempt.
TIMEOUT_ERROR = "StepTimeout"
WORKER_LOST_ERROR = "WorkerLost"

RETRY_FIELDS: Mapping[str, str] = {
    "max_attempts": "Attempts in all, the first included (1: no retry). Default 1.",
    "initial_interval": "Seconds before the first retry. Default 1.",
    "backoff_coefficient": "Each next delay is the previous one times this (>= 1). "
                           "Default 2.",
    "max_interval": "Longest delay between two attempts, in seconds. Default 100 times "
                    "initial_interval.",
    "non_retryable": "Error type names (exception class names, e.g. ValueError) that "
                     "fail the step at once, without retrying.",
}


@dataclass(frozen=True)
class RetryOptions:
    """One layer of retry settings as a plan states it: unset fields are None."""

    max_attempts: int | None = None
    initial_interval: float | None = None
    backoff_coefficient: float | None = None
    max_interval: float | None = None
    non_retryable: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class RetryPolicy:
    """How a step's failed attempts are retried."""

    max_attempts: int = 1
    """Attempts in all, the first included; 1 means no retry (the original's behaviour)."""
    initial_interval: float = 1.0
    """Seconds before the first retry."""
    backoff_coefficient: float = 2.0
    """Each next delay is the previous one times this."""
    max_interval: float | None = None
    """Longest delay; None means 100 times ``initial_interval``."""
    non_retryable: frozenset[str] = field(default_factory=frozenset)
    """Error type names that fail the step at once."""

    @property
    def cap(self) -> float:
        return self.max_interval if self.max_interval is not None \
            else min(MAX_SECONDS, 100 * self.initial_interval)

    def retryable(self, error_types: Iterable[str]) -> bool:
        """False when any of the error's type names (its class and base classes) is
        listed in ``non_retryable`` (compared by last dotted component)."""
        listed = {name.rpartition(".")[2] for name in self.non_retryable}
        return not any(t.rpartition(".")[2] in listed for t in error_types)

    def delay(self, retry_number: int, seed: str = "") -> float:
        """Seconds to wait before retry ``retry_number`` (1 for the first retry):
        ``initial_interval * backoff_coefficient ** (n - 1)``, capped at the maximum,
        then jittered into its upper half ("equal jitter"), deterministically by ``seed``.
        """
        exponent = max(0, retry_number - 1)
        base = self.initial_interval
        for _ in range(exponent):  # no float overflow for huge exponents
            base *= self.backoff_coefficient
            if base >= self.cap:
                break
        base = min(base, self.cap)
        return base / 2 + base / 2 * _unit(seed)


def _unit(seed: str) -> float:
    """A number in [0, 1) that depends only on ``seed``."""
    digest = hashlib.sha256(seed.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def resolve(layers: Iterable[RetryOptions | None]) -> RetryPolicy:
    """Merge layers, outermost first (plan defaults, fan_out step, step or sub-task)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            merged.update({k: v for k, v in vars(layer).items() if v is not None})
    if "non_retryable" in merged:
        merged["non_retryable"] = frozenset(merged["non_retryable"])
    return RetryPolicy(**merged)


def merged_problems(place: str, policy: RetryPolicy) -> list[str]:
    """Problems that only show once the layers are merged."""
    if policy.max_interval is not None and policy.max_interval < policy.initial_interval:
        return [f"{place}: retry.max_interval ({policy.max_interval:g}) is shorter than "
                f"retry.initial_interval ({policy.initial_interval:g})"]
    return []


def last_timeout(values: Iterable[float | None]) -> float | None:
    """The innermost timeout that is set, or None."""
    found = None
    for value in values:
        if value is not None:
            found = value
    return found


__all__ = ["RETRY_FIELDS", "RetryOptions", "RetryPolicy", "TIMEOUT_ERROR",
           "WORKER_LOST_ERROR", "last_timeout", "merged_problems", "resolve"]
