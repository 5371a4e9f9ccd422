"""The rows a decision's commands call for: ledger debits, attempt rows (new, sent,
finished), token usage and outbox messages. Computed once, written by either writer
(:mod:`chassis.store.sql` on any database, :mod:`chassis.store.pg` in one statement)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from chassis import commands as cmd
from chassis.plan import PAUSE
from chassis.state import StepStatus, WorkflowState
from chassis.store import quotas

Row = dict[str, Any]

#: Columns of a new attempt row (both writers insert exactly these).
RUN_COLUMNS = ("correlation_id", "step_name", "attempt", "parent_step", "action", "status",
               "request_id", "dispatched_at", "started_at", "finished_at", "due_at",
               "sent_at", "deadline", "pending", "output", "error", "error_type")


@dataclass
class Rows:
    ledger: list[Row] = field(default_factory=list)
    runs: list[Row] = field(default_factory=list)
    """New attempt rows."""
    sent: list[Row] = field(default_factory=list)
    """A SCHEDULED attempt sent now: b_step, b_attempt, status, sent_at, deadline."""
    finished: list[Row] = field(default_factory=list)
    """An attempt's outcome, unless it has one already: b_step, b_attempt, status,
    output, error, error_type, finished_at."""
    usage: list[Row] = field(default_factory=list)
    messages: list[Row] = field(default_factory=list)
    collected: list[Row] = field(default_factory=list)
    """Values of collected data set by the decision: correlation_id, name, rev, value
    (replacing the row of that name)."""
    progress: list[Row] = field(default_factory=list)
    """Attempts of a step the decision changed: correlation_id, name, attempt, base,
    scheduled (replacing the row of that name)."""
    history: list[Row] = field(default_factory=list)
    """The event history's rows of what the decision did (see :func:`history`)."""
    quota: Row | None = None
    """What the decision charges its client's quota window (PostgreSQL's parameters;
    see chassis.store.quotas), when it charges anything."""


def _later(ts: datetime, seconds: float | None) -> datetime | None:
    return None if seconds is None else ts + timedelta(seconds=seconds)


def rows_for(s: WorkflowState, commands: Sequence[cmd.Command], ts: datetime,
             fuel: tuple[int, int, int, int] = (0, 0, 0, 0),
             version: int | None = None) -> Rows:
    cid = s.correlation_id
    out = Rows()
    out.history = history(cid, commands, ts, s.version if version is None else version)
    if any(fuel):
        out.quota = quotas.pg_params(s.client_id, fuel, ts)
    collected = s.collected_data
    out.collected = [{"correlation_id": cid, "name": n, "rev": collected.revs[n], "value": v}
                   for n, v in collected.written.items()]
    out.progress = [{"correlation_id": cid, "name": n, "attempt": int(p[0]),
                     "base": int(p[1]) if len(p) > 1 else 0,
                     "scheduled": int(p[2]) if len(p) > 2 else 0}
                    for n, p in s.attempts.changed().items()]
    new: dict[tuple[str, int], Row] = {}

    def run(step: str, attempt: int, action: str, status: StepStatus, rid: str | None,
            parent: str | None = None, **values: Any) -> None:
        row = dict.fromkeys(RUN_COLUMNS)
        row.update(correlation_id=cid, step_name=step, attempt=attempt, parent_step=parent,
                   action=action, status=status.value, request_id=rid, dispatched_at=ts,
                   **values)
        new[(step, attempt)] = row
        out.runs.append(row)

    def message(topic: str, key: str, headers: dict[str, str], payload: Any,
                dedup: str) -> None:
        out.messages.append({"correlation_id": cid, "topic": topic, "key": key,
                             "headers": headers, "payload": payload, "dedup_key": dedup,
                             "created_at": ts})

    def sent(step: str, attempt: int, status: StepStatus, deadline: datetime | None) -> None:
        out.sent.append({"b_step": step, "b_attempt": attempt, "status": status.value,
                         "sent_at": ts, "deadline": deadline})

    def dispatched(c: cmd.RunStep) -> None:
        due = _later(ts, c.delay) if c.delay else None
        if c.scheduled:
            sent(c.step, c.attempt, StepStatus.DISPATCHED, None)
        else:
            run(c.step, c.attempt, c.action, StepStatus.DISPATCHED, c.request_id,
                c.parent_step, due_at=due, sent_at=due or ts)

    for c in commands:
        if isinstance(c, cmd.Debit):
            out.ledger.append({"correlation_id": cid, "client_id": s.client_id,
                               "step_name": c.step, "action": c.action, "amount": c.amount,
                               "idempotency_key": c.key, "created_at": ts, "kind": c.kind,
                               "held": c.held, "model": c.model, "usage": c.usage})
        elif isinstance(c, cmd.RunStep):
            dispatched(c)
        elif isinstance(c, cmd.RunFanOut):
            for t in c.subtasks:
                dispatched(t)
        elif isinstance(c, cmd.ScheduleStep):
            run(c.step, c.attempt, c.action, StepStatus.SCHEDULED, c.request_id,
                c.parent_step, due_at=_later(ts, c.delay))
        elif isinstance(c, cmd.SendRequest):
            deadline = _later(ts, c.timeout)
            if c.scheduled:
                sent(c.step, c.attempt, StepStatus.AWAITING, deadline)
            else:
                run(c.step, c.attempt, c.action, StepStatus.AWAITING, c.request_id,
                    c.parent_step, sent_at=ts, deadline=deadline)
            message(c.topic, cid, c.headers, c.payload, c.dedup_key)
        elif isinstance(c, cmd.Emit):
            message(c.topic, c.key, c.headers, c.payload, c.dedup_key)
        elif isinstance(c, cmd.RecordStep):
            done = c.status.finished
            run(c.step, c.attempt, c.action, c.status, None, started_at=ts,
                finished_at=ts if done else None, pending=c.pending,
                deadline=_later(ts, c.timeout))
        elif isinstance(c, cmd.FinishStep):
            outcome = {"status": c.status.value, "output": c.output, "error": c.error,
                       "error_type": c.error_type, "finished_at": ts}
            row = new.get((c.step, c.attempt))
            if row is not None:  # written in this same transition: one insert
                row.update({k: v for k, v in outcome.items() if k in row})
                continue
            out.finished.append({"b_step": c.step, "b_attempt": c.attempt, **outcome})
        elif isinstance(c, cmd.Usage):
            out.usage.append({"b_key": c.key, "usage": c.usage})
    return out


#: The event history's kind of a workflow notification (its event_type).
_EMITTED = {"WORKFLOW_COMPLETED": "completed", "WORKFLOW_FAILED": "workflow_failed",
            "WORKFLOW_CANCELLED": "cancelled", "WORKFLOW_COMPENSATING": "compensating",
            "WORKFLOW_COMPENSATED": "compensated",
            "WORKFLOW_PAUSED_FOR_BUDGET": "paused_for_fuel"}
#: (a pause for approval is told by its step's record, which names the step)
#: Notification fields the history leaves out (the workflow's, or large).
_LEFT_OUT = frozenset({"event_type", "correlation_id", "project_id", "client_id",
                       "final_result", "data_for_review", "message"})
_FINISHED = {StepStatus.COMPLETED: "succeeded", StepStatus.FAILED: "failed",
             StepStatus.CANCELLED: "abandoned"}


def history(cid: str, commands: Sequence[cmd.Command], ts: datetime,
            version: int) -> list[Row]:
    """The event history's rows of a decision's commands, in their order: what was
    dispatched, scheduled, finished, charged, announced, and the coordinator's notes."""
    rows: list[Row] = []

    def add(kind: str, step: str | None = None, attempt: int | None = None,
            actor: str | None = None, data: Any = None) -> None:
        rows.append({"correlation_id": cid, "version": version, "at": ts, "kind": kind,
                     "step": step, "attempt": attempt, "actor": actor, "data": data})

    def dispatched(c: cmd.RunStep) -> None:
        data: dict[str, Any] = {"action": c.action}
        if c.parent_step:
            data["parent"] = c.parent_step
        if c.delay:
            data["delay"] = c.delay
        add("sent" if c.scheduled else "dispatched", c.step, c.attempt, data=data)

    for c in commands:
        if isinstance(c, cmd.Note):
            add(c.kind, c.step, c.attempt, c.actor, c.data)
        elif isinstance(c, cmd.RunStep):
            dispatched(c)
        elif isinstance(c, cmd.RunFanOut):
            for t in c.subtasks:
                dispatched(t)
        elif isinstance(c, cmd.ScheduleStep):
            add("retry_scheduled", c.step, c.attempt,
                data={"action": c.action, "due_in": c.delay})
        elif isinstance(c, cmd.SendRequest):
            add("sent" if c.scheduled else "dispatched", c.step, c.attempt,
                data={"action": c.action, "topic": c.topic})
        elif isinstance(c, cmd.FinishStep):
            data = {k: v for k, v in (("error", c.error), ("error_type", c.error_type))
                    if v is not None}
            add(_FINISHED.get(c.status, c.status.value.lower()), c.step, c.attempt,
                data=data or None)
        elif isinstance(c, cmd.RecordStep) and c.action == "fan_out":
            add("fanned_out", c.step, c.attempt, data={"celery_subtasks": c.pending})
        elif isinstance(c, cmd.RecordStep) and c.action == PAUSE:
            add("paused_for_approval", c.step, c.attempt)
        elif isinstance(c, cmd.Debit):
            fuel: dict[str, Any] = {"action": c.action, "amount": c.amount}
            if c.held:
                fuel["held"] = c.held
            if c.model:
                fuel["model"] = c.model
            add(f"fuel_{c.kind}", c.step, data=fuel)
        elif isinstance(c, cmd.Emit):
            kind = _EMITTED.get(str(c.payload.get("event_type")))
            if kind is not None:
                add(kind, c.payload.get("step"), data={
                    k: v for k, v in c.payload.items() if k not in _LEFT_OUT} or None)
    return rows
