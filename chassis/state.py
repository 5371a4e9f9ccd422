"""Workflow state: the saga's durable record (the seed's ``OrchestrationState``, extended)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """Workflow statuses: the original platform's five, and CANCELLED."""

    RUNNING = "RUNNING"
    AWAITING_RESPONSES = "AWAITING_RESPONSES"
    PAUSED_FOR_HUMAN_INPUT = "PAUSED_FOR_HUMAN_INPUT"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        """A final status: nothing happens to the workflow any more (an operator may
        still retry a FAILED one)."""
        return self in (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


class StepStatus(StrEnum):
    """Status of one attempt of a step (a row of ``step_runs``)."""

    SCHEDULED = "SCHEDULED"
    """A retry waiting for its time; nothing is sent yet."""
    DISPATCHED = "DISPATCHED"
    """Sent to the broker, not yet started by a worker."""
    RUNNING = "RUNNING"
    """A worker runs it and renews its lease."""
    AWAITING = "AWAITING"
    """An external agent's answer, a human's, or a fan-out's sub-tasks are awaited."""
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    """Abandoned: the workflow was cancelled or failed elsewhere meanwhile."""

    @property
    def finished(self) -> bool:
        return self in (StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.CANCELLED)


#: Statuses at which ``chassis run --wait`` returns.
SETTLED = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED,
                     Status.PAUSED_FOR_HUMAN_INPUT})

_REQUEST_NS = uuid.UUID("6f1c8a4e-2b1d-4c55-9a57-0e4a3c2d9b10")


def request_id_for(correlation_id: str, step: str, attempt: int = 1,
                   nonce: str | None = None) -> str:
    """The request id of one attempt of a step: deterministic, so a replayed transition
    produces the same id and a duplicate (or a late answer to an earlier attempt) can be
    recognised. It is also the Celery task id of the attempt. With the workflow's secret
    ``nonce`` it cannot be guessed from the workflow's id (workflows started before
    nonces existed have none)."""
    key = f"{correlation_id}/{step}" if attempt == 1 else f"{correlation_id}/{step}/{attempt}"
    if nonce:
        key = f"{nonce}/{key}"
    return str(uuid.uuid5(_REQUEST_NS, key))


@dataclass
class WorkflowState:
    """One workflow instance. ``collected_data`` holds step outputs by step name and,
    after an approval, ``human_feedback``."""

    correlation_id: str
    client_id: str
    status: Status
    current_step: str
    fuel_budget: int
    awaited_steps: list[str] = field(default_factory=list)
    """Request ids of the attempts awaited now (Celery tasks, agents, a human)."""
    collected_data: dict[str, Any] = field(default_factory=dict)
    initial_request_data: Any = None
    final_result: Any = None
    error: str | None = None
    fuel_spent: int = 0
    project_id: str | None = None
    request_id: str | None = None
    version: int = 0
    nonce: str | None = None
    """A secret of the workflow's, mixed into its request ids so that nobody who knows
    the workflow's id can forge an answer to one of its requests."""
    attempts: dict[str, list[int]] = field(default_factory=dict)
    """Per step or sub-task that has run: ``[attempt, base, scheduled]``: the latest
    attempt's number, the attempts made before the current round (an operator's retry
    starts a new round with a fresh retry budget), and 1 while that attempt waits for
    its retry time (nothing sent yet)."""
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def fuel_remaining(self) -> int:
        return self.fuel_budget - self.fuel_spent

    def rid(self, step: str, attempt: int = 1) -> str:
        """The request id of attempt ``attempt`` of ``step`` (see :func:`request_id_for`)."""
        return request_id_for(self.correlation_id, step, attempt, self.nonce)

    def step_data(self) -> dict[str, Any]:
        """What a step sees: ``input``, earlier outputs by step name, ``human_feedback``."""
        return {"input": self.initial_request_data, **self.collected_data}
