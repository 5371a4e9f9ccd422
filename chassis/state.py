"""Workflow state: the saga's durable record (the seed's ``OrchestrationState``, extended)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """Workflow statuses, exactly as the original platform's."""

    RUNNING = "RUNNING"
    AWAITING_RESPONSES = "AWAITING_RESPONSES"
    PAUSED_FOR_HUMAN_INPUT = "PAUSED_FOR_HUMAN_INPUT"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def finished(self) -> bool:
        return self in (Status.COMPLETED, Status.FAILED)


class StepStatus(StrEnum):
    """Status of one step run (a row of ``step_runs``)."""

    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    AWAITING = "AWAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


#: Statuses at which ``chassis run --wait`` returns.
SETTLED = frozenset({Status.COMPLETED, Status.FAILED, Status.PAUSED_FOR_HUMAN_INPUT})

_REQUEST_NS = uuid.UUID("6f1c8a4e-2b1d-4c55-9a57-0e4a3c2d9b10")


def request_id_for(correlation_id: str, step: str) -> str:
    """The request id of a step's dispatch: deterministic, so a replayed transition
    produces the same id and a duplicate response can be recognised."""
    return str(uuid.uuid5(_REQUEST_NS, f"{correlation_id}/{step}"))


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
    collected_data: dict[str, Any] = field(default_factory=dict)
    initial_request_data: Any = None
    final_result: Any = None
    error: str | None = None
    fuel_spent: int = 0
    project_id: str | None = None
    request_id: str | None = None
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def fuel_remaining(self) -> int:
        return self.fuel_budget - self.fuel_spent

    def step_data(self) -> dict[str, Any]:
        """What a step sees: ``input``, earlier outputs by step name, ``human_feedback``."""
        return {"input": self.initial_request_data, **self.collected_data}
