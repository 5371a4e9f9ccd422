"""The coordinator's commands: what a decision asks the store and the engine to do.

The store writes the rows every command calls for in the transaction of the state
change; after the commit the engine sends what must be sent (Celery tasks, revokes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chassis.state import StepStatus, WorkflowState


@dataclass(frozen=True)
class Debit:
    """One ledger row with ``key`` for an attempt of ``step``: ``kind`` debit (a table
    price, ``amount`` charged), reserve (``held`` fuel held for an AI attempt), settle
    (``amount`` it consumed, taken from what was held) or release (the rest let go)."""

    step: str
    action: str
    amount: int
    key: str
    kind: str = "debit"
    held: int = 0
    model: str | None = None
    usage: Any = None


@dataclass(frozen=True)
class RunStep:
    """Run attempt ``attempt`` of ``action`` as a Celery task for ``step``.

    ``delay``: seconds to wait first (a Celery countdown, at most COUNTDOWN_LIMIT).
    ``scheduled``: the attempt's row exists already (it was SCHEDULED)."""

    step: str
    action: str
    params: dict[str, Any]
    request_id: str
    parent_step: str | None = None
    attempt: int = 1
    timeout: float | None = None
    delay: float = 0.0
    scheduled: bool = False


@dataclass(frozen=True)
class RunFanOut:
    """Send ``subtasks`` as one Celery group; they report back to fan-out ``step``."""

    step: str
    subtasks: tuple[RunStep, ...]


@dataclass(frozen=True)
class ScheduleStep:
    """Keep attempt ``attempt`` of ``step`` for later: its row is SCHEDULED, due in
    ``delay`` seconds; the sweep then reports :class:`RetryDue`. Nothing is sent."""

    step: str
    action: str
    request_id: str
    attempt: int
    delay: float
    parent_step: str | None = None


@dataclass(frozen=True)
class SendRequest:
    """Send a TaskRequest to an external agent on ``topic`` (through the outbox)."""

    step: str
    action: str
    topic: str
    request_id: str
    headers: dict[str, str]
    payload: dict[str, Any]
    parent_step: str | None = None
    attempt: int = 1
    timeout: float | None = None
    dedup_key: str = ""
    scheduled: bool = False


@dataclass(frozen=True)
class Emit:
    """Write an outgoing message (notification or event) to the outbox."""

    topic: str
    key: str
    headers: dict[str, str]
    payload: dict[str, Any]
    dedup_key: str


@dataclass(frozen=True)
class FinishStep:
    """Record an attempt's outcome (an attempt already finished keeps its outcome)."""

    step: str
    status: StepStatus
    output: Any = None
    error: str | None = None
    attempt: int = 1
    error_type: str | None = None


@dataclass(frozen=True)
class RecordStep:
    """Record an attempt of a step the coordinator carries out itself (pause, complete,
    a fan_out awaiting ``pending`` Celery sub-tasks)."""

    step: str
    action: str
    status: StepStatus
    attempt: int = 1
    pending: int | None = None
    timeout: float | None = None
    """A pause's: seconds until its approval expires (its deadline)."""


@dataclass(frozen=True)
class Usage:
    """Keep a model call's token usage with the debit ``key`` of its attempt."""

    key: str
    usage: Any


@dataclass(frozen=True)
class Note:
    """A line of the workflow's event history that no other command tells of (started,
    resumed by whom, cancel asked by whom, retried, fuel added)."""

    kind: str
    step: str | None = None
    attempt: int | None = None
    actor: str | None = None
    data: Any = None


@dataclass(frozen=True)
class Revoke:
    """Revoke these Celery task ids (terminating them where the pool allows it)."""

    task_ids: tuple[str, ...]


Command = (Debit | RunStep | RunFanOut | ScheduleStep | SendRequest | Emit | FinishStep
           | RecordStep | Usage | Revoke | Note)


@dataclass
class Decision:
    """The coordinator's answer: the new state and what to do. ``changed`` is False when
    the event was a duplicate or arrived too late: nothing is to be written or sent."""

    state: WorkflowState
    commands: list[Command] = field(default_factory=list)
    changed: bool = True
    charged: int = 0
    """Fuel this decision charges its client's quota that the quota may refuse: table
    prices and reservations of steps (not of compensations)."""
    released: int = 0
    """Fuel it gives back to the quota (≤ 0): holds settled for less."""
    forced: int = 0
    """Fuel it charges that no quota refuses (≥ 0): compensations, and what an attempt
    consumed beyond its hold."""
    held: int = 0
    """How much the fuel held for AI attempts changed (reserved, less settled)."""

    def retries(self, step: str) -> bool:
        """True when this decision dispatches or schedules another attempt of ``step``."""
        for c in self.commands:
            if isinstance(c, RunStep | ScheduleStep | SendRequest) and c.step == step:
                return True
            if isinstance(c, RunFanOut) and any(t.step == step for t in c.subtasks):
                return True
        return False



__all__ = [
    "Debit", "RunStep", "RunFanOut", "ScheduleStep", "SendRequest", "Emit", "FinishStep",
    "RecordStep", "Usage", "Revoke", "Note", "Decision", "Command",
]
