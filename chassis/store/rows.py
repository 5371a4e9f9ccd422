"""The rows a decision's commands call for: ledger debits, step runs, finished steps,
token usage and outbox messages. Computed once, written by either writer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chassis import coordinator as co
from chassis.plan import FAN_OUT
from chassis.state import StepStatus, WorkflowState

Row = dict[str, Any]


@dataclass
class Rows:
    ledger: list[Row] = field(default_factory=list)
    runs: list[Row] = field(default_factory=list)
    finished: list[Row] = field(default_factory=list)
    usage: list[Row] = field(default_factory=list)
    messages: list[Row] = field(default_factory=list)


def rows_for(s: WorkflowState, commands: Sequence[co.Command], ts: datetime) -> Rows:
    cid = s.correlation_id
    out = Rows()

    def run(step: str, action: str, status: StepStatus, rid: str | None,
            parent: str | None = None, attempts: int = 0, started: datetime | None = None,
            finished: datetime | None = None) -> None:
        out.runs.append({"correlation_id": cid, "step_name": step, "parent_step": parent,
                         "action": action, "status": status.value, "attempts": attempts,
                         "request_id": rid, "dispatched_at": ts, "started_at": started,
                         "finished_at": finished})

    def message(topic: str, key: str, headers: dict[str, str], payload: Any,
                dedup: str) -> None:
        out.messages.append({"correlation_id": cid, "topic": topic, "key": key,
                             "headers": headers, "payload": payload, "dedup_key": dedup,
                             "created_at": ts})

    # a fan_out step itself: one row, awaiting until its sub-tasks are in
    parents = {c.step for c in commands if isinstance(c, co.RunFanOut)}
    parents |= {c.parent_step for c in commands
                if isinstance(c, co.SendRequest) and c.parent_step}
    for parent in sorted(parents):
        run(parent, FAN_OUT, StepStatus.AWAITING, None, attempts=1, started=ts)
    for c in commands:
        if isinstance(c, co.Debit):
            out.ledger.append({"correlation_id": cid, "client_id": s.client_id,
                               "step_name": c.step, "action": c.action, "amount": c.amount,
                               "idempotency_key": f"{cid}:{c.step}", "created_at": ts})
        elif isinstance(c, co.RunStep):
            run(c.step, c.action, StepStatus.DISPATCHED, c.request_id, c.parent_step)
        elif isinstance(c, co.RunFanOut):
            for t in c.subtasks:
                run(t.step, t.action, StepStatus.DISPATCHED, t.request_id, c.step)
        elif isinstance(c, co.SendRequest):
            run(c.step, c.action, StepStatus.AWAITING, c.request_id, c.parent_step)
            message(c.topic, cid, c.headers, c.payload, f"{cid}:request:{c.step}")
        elif isinstance(c, co.Emit):
            message(c.topic, c.key, c.headers, c.payload, c.dedup_key)
        elif isinstance(c, co.RecordStep):
            done = c.status in (StepStatus.COMPLETED, StepStatus.FAILED)
            run(c.step, c.action, c.status, None, attempts=1, started=ts,
                finished=ts if done else None)
        elif isinstance(c, co.FinishStep):
            out.finished.append({
                "b_cid": cid, "b_step": c.step, "status": c.status.value, "output": c.output,
                "error": c.error, "finished_at": ts,
                "b_started": datetime.fromisoformat(c.started_at) if c.started_at else None})
            if isinstance(c.output, dict) and "usage" in c.output:
                # token usage is kept with the step's debit, to price by tokens later
                out.usage.append({"b_key": f"{cid}:{c.step}", "usage": c.output["usage"]})
    return out
