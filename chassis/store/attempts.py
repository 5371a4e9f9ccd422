"""Statements about attempts (rows of ``step_runs``) outside a workflow transition: the
claim, a sub-task's own record, lease renewals and the sweep's look-ups and re-sends.

They touch attempt rows only, never the workflow's state, so they need no version
check: each is one conditional statement, and only one of two concurrent callers can
match (a claim, a re-send).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from chassis.plan import FAN_OUT, PAUSE
from chassis.state import Status, StepStatus
from chassis.store.tables import orchestrator_state, step_runs

r = step_runs.c
o = orchestrator_state.c

ACTIVE = (Status.RUNNING.value, Status.AWAITING_RESPONSES.value, Status.COMPENSATING.value)
FINAL = (StepStatus.COMPLETED.value, StepStatus.FAILED.value, StepStatus.CANCELLED.value)


@dataclass(frozen=True)
class Stuck:
    """An attempt row the sweep looks at."""

    id: int
    correlation_id: str
    step: str
    attempt: int
    action: str
    parent_step: str | None
    status: str
    request_id: str | None
    deliveries: int
    sends: int
    sent_at: datetime | None
    started_at: datetime | None
    dispatched_at: datetime


def _active_workflow() -> sa.ColumnElement[bool]:
    return sa.exists().where(o.correlation_id == r.correlation_id, o.status.in_(ACTIVE))


def _lease_expired(at: Any) -> sa.ColumnElement[bool]:
    # rows from before leases existed have none: their start time counts instead
    return sa.func.coalesce(r.lease_until, r.started_at) < at


#: Take an attempt for this delivery: DISPATCHED (or RUNNING whose worker's lease
#: expired: a redelivery after a lost worker), of a workflow still running.
CLAIM = (
    step_runs.update()
    .where(r.correlation_id == sa.bindparam("b_cid"), r.step_name == sa.bindparam("b_step"),
           r.attempt == sa.bindparam("b_attempt"),
           sa.or_(r.status == StepStatus.DISPATCHED.value,
                  sa.and_(r.status == StepStatus.RUNNING.value,
                          _lease_expired(sa.bindparam("b_now", type_=r.started_at.type)))),
           _active_workflow())
    .values(status=StepStatus.RUNNING.value, deliveries=r.deliveries + 1,
            started_at=sa.bindparam("b_now", type_=r.started_at.type),
            task_id=sa.bindparam("b_task"), lease_until=sa.bindparam("b_lease"),
            deadline=sa.bindparam("b_deadline"))
    .returning(r.id, r.deliveries))

#: A sub-task's success, recorded by itself (its fan-out collects the outputs later).
RECORD = (
    step_runs.update()
    .where(r.correlation_id == sa.bindparam("b_cid"), r.step_name == sa.bindparam("b_step"),
           r.attempt == sa.bindparam("b_attempt"), r.status == StepStatus.RUNNING.value)
    .values(status=StepStatus.COMPLETED.value, output=sa.bindparam("b_output"),
            finished_at=sa.bindparam("b_now"))
    .returning(r.parent_step))

#: One fewer sub-task to wait for; the fan-out's current row (AWAITING) only.
COUNT_DOWN = (
    step_runs.update()
    .where(r.correlation_id == sa.bindparam("b_cid"), r.step_name == sa.bindparam("b_parent"),
           r.status == StepStatus.AWAITING.value)
    .values(pending=r.pending - 1)
    .returning(r.pending))

RENEW = (step_runs.update()
         .where(r.id.in_(sa.bindparam("b_ids", expanding=True)),
                r.status == StepStatus.RUNNING.value)
         .values(lease_until=sa.bindparam("b_until")))

COMPLETED_SUBTASKS = (
    sa.select(r.step_name, r.attempt, r.output)
    .where(r.correlation_id == sa.bindparam("b_cid"), r.parent_step == sa.bindparam("b_parent"),
           r.status == StepStatus.COMPLETED.value)
    .order_by(r.attempt))

_STUCK_COLS = (r.id, r.correlation_id, r.step_name, r.attempt, r.action, r.parent_step,
               r.status, r.request_id, r.deliveries, r.sends, r.sent_at, r.started_at,
               r.dispatched_at)


def _stuck(rows: Any) -> list[Stuck]:
    return [Stuck(row.id, str(row.correlation_id), row.step_name, row.attempt, row.action,
                  row.parent_step, row.status, row.request_id, row.deliveries, row.sends,
                  row.sent_at, row.started_at, row.dispatched_at) for row in rows]


def due(conn: sa.Connection, at: datetime, limit: int) -> list[Stuck]:
    """SCHEDULED attempts whose time has come."""
    q = (sa.select(*_STUCK_COLS)
         .where(r.status == StepStatus.SCHEDULED.value, r.due_at <= at, _active_workflow())
         .order_by(r.due_at).limit(limit))
    return _stuck(conn.execute(q))


def unclaimed(conn: sa.Connection, before: datetime, limit: int) -> list[Stuck]:
    """DISPATCHED attempts sent before ``before`` that no worker has started."""
    q = (sa.select(*_STUCK_COLS)
         .where(r.status == StepStatus.DISPATCHED.value,
                sa.func.coalesce(r.sent_at, r.dispatched_at) < before, _active_workflow())
         .order_by(r.id).limit(limit))
    return _stuck(conn.execute(q))


def lost(conn: sa.Connection, at: datetime, limit: int) -> list[Stuck]:
    """RUNNING attempts whose worker stopped renewing the lease."""
    q = (sa.select(*_STUCK_COLS)
         .where(r.status == StepStatus.RUNNING.value, _lease_expired(at), _active_workflow())
         .order_by(r.id).limit(limit))
    return _stuck(conn.execute(q))


def overdue(conn: sa.Connection, at: datetime, unset_before: datetime,
            limit: int) -> list[Stuck]:
    """Attempts past their deadline: RUNNING ones, agents' requests (AWAITING with a
    request id) not answered in time, and pauses whose approval expired (a pause has a
    deadline only when its step sets a timeout). A request without a deadline of its
    own is overdue when it was sent before ``unset_before`` (the default timeout)."""
    running = sa.and_(r.status == StepStatus.RUNNING.value, r.deadline < at)
    agent = sa.and_(r.status == StepStatus.AWAITING.value, r.request_id.is_not(None),
                    r.action.not_in([PAUSE, FAN_OUT]),
                    sa.or_(r.deadline < at,
                           sa.and_(r.deadline.is_(None), r.sent_at < unset_before)))
    pause = sa.and_(r.status == StepStatus.AWAITING.value, r.action == PAUSE,
                    r.deadline.is_not(None), r.deadline < at,
                    sa.exists().where(o.correlation_id == r.correlation_id,
                                      o.status == Status.PAUSED_FOR_HUMAN_INPUT.value))
    q = (sa.select(*_STUCK_COLS)
         .where(sa.or_(sa.and_(sa.or_(running, agent), _active_workflow()), pause))
         .order_by(r.id).limit(limit))
    return _stuck(conn.execute(q))


def unanswered(conn: sa.Connection, before: datetime, limit: int) -> list[Stuck]:
    """Agents' requests (AWAITING with a request id) sent before ``before`` and not
    answered yet, of workflows still under way."""
    q = (sa.select(*_STUCK_COLS)
         .where(r.status == StepStatus.AWAITING.value, r.request_id.is_not(None),
                r.action.not_in([PAUSE, FAN_OUT]),
                sa.func.coalesce(r.sent_at, r.dispatched_at) < before, _active_workflow())
         .order_by(r.id).limit(limit))
    return _stuck(conn.execute(q))


def mark_asked_again(conn: sa.Connection, row: Stuck) -> bool:
    """Count one more request for an unanswered agent's attempt, if it is still as the
    sweep saw it (only one of two sweeps matches); its deadline is left as it was."""
    stmt = (step_runs.update()
            .where(r.id == row.id, r.status == StepStatus.AWAITING.value,
                   r.sends == row.sends)
            .values(sends=r.sends + 1))
    return conn.execute(stmt).rowcount > 0


def waiting_fan_ins(conn: sa.Connection, before: datetime, limit: int) -> list[tuple[str, str]]:
    """(workflow, fan_out step) whose Celery sub-tasks all recorded success, while the
    workflow has not moved since ``before``: the fan-in was never applied."""
    q = (sa.select(r.correlation_id, r.step_name)
         .join(orchestrator_state, o.correlation_id == r.correlation_id)
         .where(r.action == FAN_OUT, r.status == StepStatus.AWAITING.value, r.pending <= 0,
                o.status.in_(ACTIVE), o.updated_at < before)
         .limit(limit))
    return [(str(row[0]), row[1]) for row in conn.execute(q)]


def stalled(conn: sa.Connection, before: datetime, limit: int) -> list[tuple[str, str]]:
    """(workflow, current step) of RUNNING workflows awaiting nothing, unchanged since
    ``before``: waiting for dependencies that never came."""
    q = (sa.select(o.correlation_id, o.current_step, o.awaited_steps)
         .where(o.status == Status.RUNNING.value, o.updated_at < before)
         .limit(limit))
    return [(str(row[0]), row[1]) for row in conn.execute(q) if not row[2]]


def mark_resent(conn: sa.Connection, row: Stuck, at: datetime) -> bool:
    """DISPATCHED again, now, if the row is still as the sweep saw it (only one of two
    sweeps matches)."""
    stmt = (step_runs.update()
            .where(r.id == row.id, r.status == row.status, r.sends == row.sends,
                   sa.or_(r.status != StepStatus.RUNNING.value, _lease_expired(at)))
            .values(status=StepStatus.DISPATCHED.value, sent_at=at, sends=r.sends + 1))
    return conn.execute(stmt).rowcount > 0


__all__ = ["CLAIM", "COMPLETED_SUBTASKS", "COUNT_DOWN", "RECORD", "RENEW", "Stuck", "due",
           "lost", "mark_asked_again", "mark_resent", "overdue", "stalled", "unanswered",
           "unclaimed", "waiting_fan_ins"]
