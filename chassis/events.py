"""The coordinator's events: what happened to a workflow (see :mod:`chassis.coordinator`).

Every event about an attempt names it (step and attempt number, or its request id), so
one about an attempt no longer awaited is recognised and changes nothing. Events from
outside the engine (a resume, a cancel, a retry, an agent's answer) name the client they
act for: the coordinator refuses them for another client's workflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Start:
    """The workflow was just created (``by``: who asked, recorded in the event history
    when not the workflow's client itself, e.g. an API key)."""

    by: str | None = None


@dataclass(frozen=True)
class StepSucceeded:
    """Attempt ``attempt`` of a Celery step (or sub-task) returned ``output``."""

    step: str
    output: Any
    attempt: int = 1


@dataclass(frozen=True)
class StepFailed:
    """Attempt ``attempt`` of a step or sub-task failed: its action raised, it ran past
    its timeout, or its worker was lost too often. ``error_types`` are the names of the
    error's class and base classes (matched against ``retry.non_retryable``)."""

    step: str
    error: str
    attempt: int = 1
    error_types: tuple[str, ...] = ()
    usage: dict[str, Any] | None = None
    """What the attempt consumed of a model, if it knows (an AI attempt is settled
    from it; None: unknown)."""
    retry_after: float | None = None
    """For a deferred attempt (error type AttemptDeferred): seconds until it is sent
    again."""


@dataclass(frozen=True)
class SubtasksSucceeded:
    """Sub-tasks of fan-out ``step`` succeeded: ``outputs`` and ``attempts`` by sub-task
    name. Their rows were recorded by the sub-tasks themselves."""

    step: str
    outputs: dict[str, Any]
    attempts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ResponseReceived:
    """An external agent answered the request ``request_id`` (its ``causation_id``) on
    behalf of ``client_id`` (None only from inside the engine)."""

    request_id: str
    success: bool
    data: Any = None
    error: str | None = None
    error_type: str | None = None
    client_id: str | None = None


@dataclass(frozen=True)
class Resume:
    """A human of ``client_id`` approved or rejected a paused workflow."""

    approved: bool
    feedback: Any = None
    client_id: str | None = None
    add_fuel: int = 0
    """Fuel added to the budget first (a workflow paused for fuel goes on with it)."""
    by: str | None = None
    """Who took it, recorded in the event history (an API key); else ``client_id``."""
    step: str | None = None
    """The step whose approval this answers (as the person saw it): refused when the
    workflow waits at another one (the approval they saw expired, or was answered, and
    another is asked now). None: whichever it waits at."""


@dataclass(frozen=True)
class AddFuel:
    """``client_id`` adds ``amount`` fuel to the workflow's budget (it then goes on
    when approved, if it paused for fuel; a FAILED one can be retried)."""

    amount: int
    client_id: str | None = None
    by: str | None = None
    """Who took it, recorded in the event history (an API key); else ``client_id``."""


@dataclass(frozen=True)
class RetryDue:
    """The time of scheduled attempt ``attempt`` of ``step`` has come (from the sweep)."""

    step: str
    attempt: int


@dataclass(frozen=True)
class RequestUnanswered:
    """Attempt ``attempt`` of ``step``, an external agent's, has had no answer for a while
    (from the sweep): its request is sent once more (``times``: the how-many-th time
    again), the same request id, so that a request or an answer lost on the way (a broker
    restarted empty) does not leave the step waiting until its timeout."""

    step: str
    attempt: int
    times: int = 1


@dataclass(frozen=True)
class ApprovalExpired:
    """Attempt ``attempt`` of ``step``, a ``pause_for_human_input`` with a ``timeout``,
    had no answer within ``timeout`` seconds (from the sweep): the approval expired. The
    workflow goes on at the step's ``on_failure``, or fails (compensating). Late (the
    workflow was resumed meanwhile), it changes nothing."""

    step: str
    attempt: int
    timeout: float


@dataclass(frozen=True)
class Cancel:
    """``client_id`` stops the workflow: in-flight attempts are revoked, late results
    ignored. With ``compensate``, the completed steps that have a ``compensate`` are
    undone first (COMPENSATING, then CANCELLED)."""

    reason: str | None = None
    client_id: str | None = None
    compensate: bool = False
    by: str | None = None
    """Who took it, recorded in the event history (an API key); else ``client_id``."""


@dataclass(frozen=True)
class Retry:
    """An operator retries a FAILED workflow from its failed step, with fresh attempts.
    ``outputs``/``attempts``: sub-tasks of the failed fan-out that completed (their rows)
    but were never collected; they are kept, not run again."""

    outputs: dict[str, Any] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    client_id: str | None = None
    by: str | None = None
    """Who took it, recorded in the event history (an API key); else ``client_id``."""


@dataclass(frozen=True)
class Stalled:
    """The sweep found the workflow waiting at ``step`` for dependencies that never
    came: it fails with ``error``. Late (the workflow moved on), it changes nothing."""

    step: str
    error: str


Event = (Start | StepSucceeded | StepFailed | SubtasksSucceeded | ResponseReceived
         | Resume | RetryDue | RequestUnanswered | ApprovalExpired | Cancel | Retry | Stalled
         | AddFuel)


__all__ = [
    "Start", "StepSucceeded", "StepFailed", "SubtasksSucceeded", "ResponseReceived", "Resume",
    "RetryDue", "RequestUnanswered", "ApprovalExpired", "Cancel", "Retry", "Stalled", "AddFuel",
    "Event",
]
