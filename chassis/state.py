"""Workflow state: the saga's durable record (the seed's ``OrchestrationState``, extended)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """Workflow statuses: the original platform's five, CANCELLED, and the saga's
    COMPENSATING (completed steps are being undone) and COMPENSATED (they were)."""

    RUNNING = "RUNNING"
    AWAITING_RESPONSES = "AWAITING_RESPONSES"
    PAUSED_FOR_HUMAN_INPUT = "PAUSED_FOR_HUMAN_INPUT"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"

    @property
    def finished(self) -> bool:
        """A final status: nothing happens to the workflow any more (an operator may
        still retry a FAILED one)."""
        return self in (Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.COMPENSATED)


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
                     Status.COMPENSATED, Status.PAUSED_FOR_HUMAN_INPUT})

#: A step's compensation runs under the step's name with this suffix (its attempts,
#: rows, debits and request ids); step names cannot hold "/", so it names no step.
COMPENSATE_SUFFIX = "/compensate"


def compensation_of(name: str) -> str:
    """The name a step's (or sub-task's) compensation runs under."""
    return name + COMPENSATE_SUFFIX


def compensated_step(name: str) -> str | None:
    """The step a compensation's name undoes; None for a step's own name."""
    return name[:-len(COMPENSATE_SUFFIX)] if name.endswith(COMPENSATE_SUFFIX) else None

#: Reads stored values: ``{name: rev}`` → ``{name: value}`` (see :class:`Outputs`).
Loader = Callable[[Mapping[str, int]], dict[str, Any]]


class Outputs(MutableMapping[str, Any]):
    """A workflow's collected data (step outputs by step name, ``human_feedback``,
    ``error``): a mapping whose values are stored one row each, apart from the
    workflow's row.

    The state carries only ``revs`` (name → the workflow version that wrote the value),
    so a transition reads and writes a few bytes per name however large the outputs
    are: a linear step costs the same at step 1,000 as at step 1. Values are read on
    first need, all missing ones at once (``loader``), and a decision saves only the
    ones it set (``written``)."""

    __slots__ = ("revs", "_values", "written", "removed", "_loader")

    def __init__(self, values: Mapping[str, Any] | None = None, *,
                 revs: Mapping[str, int] | None = None, loader: Loader | None = None) -> None:
        self.revs: dict[str, int] = dict(revs or {})
        self._values: dict[str, Any] = {}
        self.written: dict[str, Any] = {}
        """Values set since the state was read (saved by the next transition)."""
        self.removed: set[str] = set()
        self._loader = loader
        for name, value in (values or {}).items():
            self[name] = value

    def copy(self) -> Outputs:
        """A new mapping with the same values (shared, not copied) and loader."""
        new = Outputs(revs=self.revs, loader=self._loader)
        new._values = dict(self._values)
        new.written = dict(self.written)
        new.removed = set(self.removed)
        return new

    def _load(self) -> None:
        missing = self.missing()
        if not missing:
            return
        if self._loader is None:
            raise KeyError(f"values of {sorted(missing)[:5]} were not read")
        self.fill(self._loader(missing))

    def __getitem__(self, name: str) -> Any:
        if name in self._values:
            return self._values[name]
        if name not in self.revs:
            raise KeyError(name)
        self._load()
        return self._values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._values[name] = value
        self.written[name] = value
        self.revs[name] = self.revs.get(name, 0)
        self.removed.discard(name)

    def __delitem__(self, name: str) -> None:
        if name not in self.revs:
            raise KeyError(name)
        del self.revs[name]
        self._values.pop(name, None)
        self.written.pop(name, None)
        self.removed.add(name)

    def __contains__(self, name: object) -> bool:
        return name in self.revs

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.revs))

    def __len__(self) -> int:
        return len(self.revs)

    def missing(self) -> dict[str, int]:
        """Names (with their revs) whose values have not been read."""
        return {n: r for n, r in self.revs.items() if n not in self._values}

    def fill(self, values: Mapping[str, Any]) -> None:
        """Values read by the caller (not set: nothing to save)."""
        for name in self.revs:
            if name not in self._values:
                self._values[name] = values.get(name)

    def to_dict(self) -> dict[str, Any]:
        """Every value, read at once if need be."""
        self._load()
        return {n: self._values[n] for n in self.revs}

    def items(self):  # type: ignore[override]
        return self.to_dict().items()

    def values(self):  # type: ignore[override]
        return self.to_dict().values()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.to_dict() == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = {n: self._values[n] if n in self._values else "<not read>" for n in self.revs}
        return f"Outputs({shown!r})"

    def stamp(self, version: int) -> list[dict[str, Any]]:
        """Give the values set since the read the version about to be saved; the rows
        to write (name, rev, value)."""
        for name in self.written:
            self.revs[name] = version
        return [{"name": n, "rev": version, "value": v} for n, v in self.written.items()]

    def saved(self) -> None:
        """The values set are stored now."""
        self.written.clear()
        self.removed.clear()


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
    collected_data: Outputs = field(default_factory=Outputs)
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
    completed: list[str] = field(default_factory=list)
    """Steps and sub-tasks with a ``compensate`` that completed, in order of completion
    (those a failure would undo)."""
    undo: list[list[str]] = field(default_factory=list)
    """While compensating (or FAILED in a compensation): the compensations still to run,
    in batches run one after the other (a fan-out's sub-tasks form one batch, run in
    parallel); the first batch is under way."""
    cause: str | None = None
    """The error that started the compensation (kept as ``error`` at the end)."""
    then: str | None = None
    """The status the workflow ends with once compensated: COMPENSATED or CANCELLED."""
    undo_failed: str | None = None
    """A compensation of the batch under way ran out of attempts: the workflow FAILS
    with this once the rest of the batch has settled."""
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.collected_data, Outputs):
            self.collected_data = Outputs(self.collected_data)

    @property
    def fuel_remaining(self) -> int:
        return self.fuel_budget - self.fuel_spent

    def rid(self, step: str, attempt: int = 1) -> str:
        """The request id of attempt ``attempt`` of ``step`` (see :func:`request_id_for`)."""
        return request_id_for(self.correlation_id, step, attempt, self.nonce)

    def step_data(self, step: str | None = None) -> dict[str, Any]:
        """What a step sees: ``input``, earlier outputs by step name, ``human_feedback``
        (and ``error`` on an ``on_failure`` path). A compensation sees that, the output
        of the step it undoes under ``output``, and the error that started the
        compensation under ``error``."""
        data = {"input": self.initial_request_data, **self.collected_data.to_dict()}
        undone = compensated_step(step) if step else None
        if undone is not None:
            data["output"] = self.collected_data.get(undone)
            data["error"] = {"message": self.cause, "status": self.then}
        return data

    def saga(self) -> dict[str, Any] | None:
        """The saga's progress as stored (None when there is none)."""
        if not (self.completed or self.undo or self.cause or self.then):
            return None
        return {"completed": self.completed, "undo": self.undo, "cause": self.cause,
                "then": self.then, "undo_failed": self.undo_failed}

    def load_saga(self, saga: Any) -> None:
        """Read back :meth:`saga`."""
        if isinstance(saga, dict):
            self.completed = list(saga.get("completed") or [])
            self.undo = [list(b) for b in saga.get("undo") or []]
            self.cause = saga.get("cause")
            self.then = saga.get("then")
            self.undo_failed = saga.get("undo_failed")
