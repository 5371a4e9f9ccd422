"""Workflow state: the saga's durable record (the seed's ``OrchestrationState``, extended)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
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

def json_copy(value: Any) -> Any:
    """A deep copy of a JSON document (dicts, lists and immutable leaves): several
    times faster than :func:`copy.deepcopy`, which matters when a step late in a long
    workflow sees a thousand earlier outputs. (Values read from the store are shared
    with what a process keeps of them: whoever may change one gets a copy.)"""
    if isinstance(value, dict):
        return {k: v if type(v) in _ATOMS else json_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [v if type(v) in _ATOMS else json_copy(v) for v in value]
    return value


#: Immutable JSON leaves: shared, not copied (and no call per leaf).
_ATOMS = frozenset({str, int, float, bool, type(None)})

#: Reads a workflow's collected data whole: ``(revs, values)`` (see :class:`Outputs`).
OutputsSource = Callable[[], tuple[dict[str, int], dict[str, Any]]]
#: Reads attempts by step name (None: all of them): ``{name: [attempt, base, scheduled]}``
#: for those that have any (see :class:`Progress`).
ProgressLoader = Callable[[Sequence[str] | None], dict[str, list[int]]]


class Outputs(MutableMapping[str, Any]):
    """A workflow's collected data (step outputs by step name, ``human_feedback``,
    ``error``): a mapping stored one row per name, apart from the workflow's row, so a
    transition writes only the values it sets (``written``), each with the version that
    wrote it (``revs``), however large the collection has grown.

    Read from the store, it is filled on first use from ``source`` (a process keeps
    each recent workflow's data and reads only what was written since: a step late in a
    long workflow reads one new output, not all of them). Values are never removed."""

    __slots__ = ("revs", "_values", "written", "_source")

    def __init__(self, values: Mapping[str, Any] | None = None, *,
                 source: OutputsSource | None = None) -> None:
        self.revs: dict[str, int] = {}
        self._values: dict[str, Any] = {}
        self.written: dict[str, Any] = {}
        """Values set since the state was read (saved by the next transition)."""
        self._source = source
        for name, value in (values or {}).items():
            self[name] = value

    @classmethod
    def read(cls, revs: dict[str, int], values: dict[str, Any]) -> Outputs:
        """The collected data as read from the store (nothing to save)."""
        new = cls()
        new.revs, new._values = revs, values
        return new

    def _ensure(self) -> None:
        source = self._source
        if source is None:
            return
        revs, values = source()  # (a read that fails leaves it to be tried again)
        self._source = None
        revs.update(self.revs)  # what was set meanwhile wins
        values.update(self._values)
        self.revs, self._values = revs, values

    def copy(self) -> Outputs:
        """A new mapping with the same values (shared, not copied)."""
        self._ensure()
        new = Outputs()
        new.revs = dict(self.revs)
        new._values = dict(self._values)
        new.written = dict(self.written)
        return new

    def __getitem__(self, name: str) -> Any:
        self._ensure()
        return self._values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._ensure()
        self._values[name] = value
        self.written[name] = value
        self.revs[name] = self.revs.get(name, 0)

    def __delitem__(self, name: str) -> None:
        raise TypeError("collected data is never removed")

    def __contains__(self, name: object) -> bool:
        self._ensure()
        return name in self.revs

    def __iter__(self) -> Iterator[str]:
        self._ensure()
        return iter(list(self.revs))

    def __len__(self) -> int:
        self._ensure()
        return len(self.revs)

    def to_dict(self) -> dict[str, Any]:
        """Every value, in a new dict (the values themselves are shared)."""
        self._ensure()
        return dict(self._values)

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
        return f"Outputs({self.to_dict()!r})"

    def stamp(self, version: int) -> None:
        """Give the values set since the read the version about to be saved."""
        for name in self.written:
            self.revs[name] = version

    def saved(self) -> None:
        """The values set are stored now."""
        self.written.clear()


class Progress(MutableMapping[str, list[int]]):
    """Attempts by step or sub-task name, ``[attempt, base, scheduled]`` each (see
    :attr:`WorkflowState.attempts`), stored one row per name: a transition writes the
    entries it changed (in place or new), never the whole map.

    Read from the store, it holds the entries read with the state (those of the step
    at hand and where it may go next) and reads any other on first use (``loader``);
    iterating reads them all."""

    __slots__ = ("_entries", "_orig", "_absent", "complete", "_loader")

    def __init__(self, entries: Mapping[str, Sequence[int]] | None = None, *,
                 loaded: Mapping[str, Sequence[int]] | None = None, complete: bool = True,
                 loader: ProgressLoader | None = None) -> None:
        read = {k: list(v) for k, v in (loaded or {}).items()}
        self._orig: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in read.items()}
        self._entries: dict[str, list[int]] = read
        self._absent: set[str] = set()
        self.complete = complete
        """Every entry is known (nothing left to read)."""
        self._loader = loader
        for name, progress in (entries or {}).items():
            self[name] = list(progress)

    def absent(self, names: Iterable[str]) -> None:
        """These names were looked for with the state and have no entry."""
        self._absent.update(n for n in names if n not in self._entries)

    def _read(self, got: Mapping[str, Sequence[int]]) -> None:
        for name, progress in got.items():
            if name not in self._entries and name not in self._orig:
                self._entries[name] = list(progress)
                self._orig[name] = tuple(progress)

    def _find(self, name: str) -> list[int] | None:
        entry = self._entries.get(name)
        if entry is not None or self.complete or name in self._absent:
            return entry
        if self._loader is None:
            return None
        self._read(self._loader([name]))
        if name not in self._entries:
            self._absent.add(name)
        return self._entries.get(name)

    def _all(self) -> None:
        if self.complete:
            return
        if self._loader is not None:
            self._read(self._loader(None))
        self.complete = True

    def copy(self) -> Progress:
        """A new mapping with copies of the entries, the same reads behind it."""
        new = Progress(complete=self.complete, loader=self._loader)
        new._entries = {k: list(v) for k, v in self._entries.items()}
        new._orig = dict(self._orig)
        new._absent = set(self._absent)
        return new

    def __getitem__(self, name: str) -> list[int]:
        entry = self._find(name)
        if entry is None:
            raise KeyError(name)
        return entry

    def __setitem__(self, name: str, progress: list[int]) -> None:
        self._entries[name] = progress
        self._absent.discard(name)

    def __delitem__(self, name: str) -> None:
        raise TypeError("attempts are never removed")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def __iter__(self) -> Iterator[str]:
        self._all()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._all()
        return len(self._entries)

    def to_dict(self) -> dict[str, list[int]]:
        self._all()
        return {k: list(v) for k, v in self._entries.items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.to_dict() == {k: list(v) for k, v in other.items()}

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Progress({self._entries!r}{'' if self.complete else ', ...'})"

    def changed(self) -> dict[str, list[int]]:
        """Entries new or changed since the read (to be saved)."""
        return {k: v for k, v in self._entries.items() if self._orig.get(k) != tuple(v)}

    def saved(self) -> None:
        """The changed entries are stored now."""
        self._orig.update((k, tuple(v)) for k, v in self.changed().items())


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


@dataclass(frozen=True)
class Quota:
    """A client's quota as read in a transition: ``fuel`` per ``per`` (day, month,
    total), of which ``left`` is left in the current window: ``used`` was spent in it
    and ``held`` is held by AI attempts under way."""

    client_id: str
    per: str
    fuel: int
    left: int
    used: int = 0
    held: int = 0


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
    traceparent: str | None = None
    """The trace context (W3C traceparent) of the workflow's root span, when traced:
    every later span of the workflow is in its trace, and every outgoing message
    carries it."""
    nonce: str | None = None
    """A secret of the workflow's, mixed into its request ids so that nobody who knows
    the workflow's id can forge an answer to one of its requests."""
    attempts: Progress = field(default_factory=Progress)
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
    holds: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Fuel held for AI attempts under way, by ``step#attempt``: ``{amount, action,
    model, price}`` (the price per token it was reserved at, settled at the same)."""
    budget_wait: dict[str, Any] | None = None
    """Paused because fuel (or the client's quota) ran out: ``{step, action, error,
    needed, available, reason}``; an approval tries the step again, a rejection fails
    the workflow with ``error``."""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    quota: Quota | None = field(default=None, compare=False, repr=False)
    """Not stored: the client's quota as the store read it for this transition (None:
    not read; the store then checks the charges and reads it if they exceed it)."""

    def __post_init__(self) -> None:
        if not isinstance(self.collected_data, Outputs):
            self.collected_data = Outputs(self.collected_data)
        if not isinstance(self.attempts, Progress):
            self.attempts = Progress(self.attempts)

    @property
    def fuel_reserved(self) -> int:
        """Fuel held for AI attempts under way."""
        return sum(int(h["amount"]) for h in self.holds.values())

    @property
    def fuel_remaining(self) -> int:
        """Fuel available: budget - spent - reserved."""
        return self.fuel_budget - self.fuel_spent - self.fuel_reserved

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
        if not (self.completed or self.undo or self.cause or self.then or self.holds
                or self.budget_wait):
            return None
        out: dict[str, Any] = {"completed": self.completed, "undo": self.undo,
                               "cause": self.cause, "then": self.then,
                               "undo_failed": self.undo_failed}
        if self.holds:
            out["holds"] = self.holds
        if self.budget_wait:
            out["budget_wait"] = self.budget_wait
        return out

    def load_saga(self, saga: Any) -> None:
        """Read back :meth:`saga`."""
        if isinstance(saga, dict):
            self.completed = list(saga.get("completed") or [])
            self.undo = [list(b) for b in saga.get("undo") or []]
            self.cause = saga.get("cause")
            self.then = saga.get("then")
            self.undo_failed = saga.get("undo_failed")
            self.holds = dict(saga.get("holds") or {})
            self.budget_wait = saga.get("budget_wait")
