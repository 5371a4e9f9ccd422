"""The store role: what the engine, the API and the sweep ask of durable storage.

One implementation per technology (:class:`chassis.store.sql.SqlStore` on SQLAlchemy).
Every write that changes a workflow goes through :meth:`Store.transition` (read,
decide, write all rows at once, guarded by the version); the other writes touch attempt
rows only and are single conditional statements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from chassis.commands import Decision
from chassis.plan import Plan
from chassis.state import WorkflowState

if TYPE_CHECKING:
    from chassis.store.attempts import Stuck
    from chassis.store.sql import Claim


class Store(Protocol):
    """Durable workflow state, attempts, ledger and outbox."""

    # writing
    def create(self, decision: Decision, plan: Plan, *, plan_name: str | None = None,
               plan_version: int | None = None) -> bool: ...

    def transition(self, cid: str, decide: Callable[..., Decision],
                   state: WorkflowState | None = None,
                   fan_out: Callable[[WorkflowState, Plan], str | None] | None = None,
                   names: Sequence[str] | None = None) -> Decision: ...

    def transition_if(self, cid: str, step: str, attempt: int, statuses: Sequence[str],
                      decide: Callable[[WorkflowState, Plan], Decision]) -> Decision: ...

    def claim(self, cid: str, step: str, attempt: int, task_id: str | None, *,
              lease: float, timeout: float, names: Sequence[str] = (),
              worker: str | None = None) -> Claim | None: ...

    def record_subtask(self, cid: str, step: str, attempt: int, output: Any,
                       worker: str | None = None) -> tuple[bool, int | None]: ...

    def events(self, cid: str) -> list[dict[str, Any]]: ...

    def renew_leases(self, row_ids: Sequence[int], lease: float) -> int: ...

    def record_response(self, cid: str, step: str, attempt: int,
                        response: dict[str, Any]) -> bool: ...

    def mark_resent(self, row: Stuck) -> bool: ...

    # reading
    def exists(self, cid: str) -> bool: ...

    def owner(self, cid: str) -> str | None: ...

    def get(self, cid: str, names: Sequence[str] | None = None) -> WorkflowState: ...

    def get_plan(self, cid: str) -> Plan: ...

    def cached_plan(self, cid: str) -> Plan | None: ...

    def steps(self, cid: str) -> list[dict[str, Any]]: ...

    def ledger(self, cid: str) -> list[dict[str, Any]]: ...

    def outbox_for(self, cid: str) -> list[dict[str, Any]]: ...

    def refused_messages(self, cid: str) -> list[dict[str, Any]]: ...

    def completed_subtasks(self, cid: str, parent: str) -> dict[str, tuple[int, Any]]: ...

    def recorded_response(self, cid: str, step: str,
                          attempt: int) -> dict[str, Any] | None: ...

    # the sweep
    def due(self, limit: int) -> list[Stuck]: ...

    def unclaimed(self, sent_before: datetime, limit: int) -> list[Stuck]: ...

    def lost(self, limit: int) -> list[Stuck]: ...

    def overdue(self, default_timeout: float, limit: int) -> list[Stuck]: ...

    def waiting_fan_ins(self, unchanged_for: float, limit: int) -> list[tuple[str, str]]: ...

    def stalled(self, unchanged_for: float, limit: int) -> list[tuple[str, str]]: ...

    # last: the name ``list`` would shadow the builtin in the annotations below it
    def list(self, status: str | None = None, limit: int = 50,
             client_id: str | None = None) -> list[WorkflowState]: ...


__all__ = ["Store"]
