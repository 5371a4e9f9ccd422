"""The sweep (``chassis.sweep``, sent by celery beat): steps and workflows stuck past
CHASSIS_STEP_TIMEOUT are re-dispatched or, out of attempts, failed.

What counts as stuck, and what the sweep does about it:

- a Celery step DISPATCHED (its message was lost, or no worker took it yet) or RUNNING
  (its worker died, or the action hangs) for longer than the timeout: it is sent
  again; the claim makes a duplicate delivery harmless. A RUNNING step that has already
  been run ``CHASSIS_STEP_MAX_ATTEMPTS`` times fails the workflow instead;
- a fan-out whose Celery sub-tasks have not reported back in time: its chord is sent
  again (``chassis.fanout``), up to the same number of sends, then the workflow fails;
- an external agent's step (a Kafka request) not answered in time fails the workflow;
- a RUNNING workflow waiting that long for dependencies that never came fails.

Paused workflows wait for a human as long as it takes: the sweep leaves them alone.

Two sweeps at once (two beat processes by mistake) do nothing twice. On PostgreSQL a
sweep takes a transaction-scoped advisory lock and a second one returns at once; on
every database a re-dispatch is a conditional update (only the sweep whose update
matched sends), and a failure is a coordinator transition checked against the
workflow's version, so only one is written (with its outbox event).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from chassis import coordinator as co
from chassis.config import Settings
from chassis.engine import FANOUT_TASK, Engine
from chassis.plan import FAN_OUT, PAUSE
from chassis.state import Status, StepStatus
from chassis.store.sql import now
from chassis.store.tables import orchestrator_state, step_runs

log = logging.getLogger(__name__)

#: pg_try_advisory_xact_lock key held by a running sweep ("sweep").
SWEEP_LOCK_KEY = 0x7377656570
#: Rows looked at per sweep; the rest wait for the next one.
BATCH = 500

_ACTIVE = (Status.RUNNING.value, Status.AWAITING_RESPONSES.value)
_RUNNABLE = (StepStatus.DISPATCHED.value, StepStatus.RUNNING.value)


@dataclass
class SweepReport:
    """What one sweep did (``cid/step`` names)."""

    redispatched: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    locked_out: bool = False
    """Another sweep held the lock: this one did nothing."""

    def counts(self) -> dict[str, int]:
        return {"redispatched": len(self.redispatched), "failed": len(self.failed),
                "locked_out": int(self.locked_out)}


class Sweeper:
    """Finds stuck steps and workflows of ``engine``'s store and acts on them."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.db = engine.store.engine
        self.timeout = settings.step_timeout
        self.max_attempts = settings.step_max_attempts

    def sweep(self) -> SweepReport:
        report = SweepReport()
        with self._lock() as acquired:
            if not acquired:
                report.locked_out = True
                log.info("sweep: another sweep is running; skipped")
                return report
            cutoff = now() - timedelta(seconds=self.timeout)
            fan_outs: dict[tuple[str, str], list[Any]] = {}
            for row in self._stuck_steps(cutoff):
                if row.parent_step is not None and row.status == StepStatus.DISPATCHED:
                    fan_outs.setdefault((str(row.correlation_id), row.parent_step),
                                        []).append(row)
                elif row.status in _RUNNABLE:
                    self._step(row, cutoff, report)
                elif row.action not in (FAN_OUT, PAUSE):  # an external agent's request
                    self._fail(row, f"step '{row.step_name}' timed out after "
                                    f"{self.timeout:g} s waiting for the agent's response",
                               report)
            for (cid, parent), rows in fan_outs.items():
                self._fan_out(cid, parent, rows, cutoff, report)
            self._waiting_workflows(cutoff, report)
        if report.redispatched or report.failed:
            log.info("sweep: %d steps re-dispatched, %d workflows failed",
                     len(report.redispatched), len(report.failed))
        return report

    # ------------------------------------------------------------------ actions

    def _step(self, row: Any, cutoff: datetime, report: SweepReport) -> None:
        cid, name = str(row.correlation_id), row.step_name
        if row.status == StepStatus.RUNNING and row.attempts >= self.max_attempts:
            self._fail(row, f"step '{name}' timed out after {self.timeout:g} s "
                            f"(attempt {row.attempts} of {self.max_attempts})", report)
            return
        state = self.engine.store.get(cid)
        if row.request_id not in state.awaited_steps:
            return  # it finished since we looked
        touched = _touch(self.db, cutoff, step_runs.c.id == row.id,
                         step_runs.c.status == row.status)
        if not touched:
            return  # another sweep, or the step itself, got there first
        step = self.engine.store.get_plan(cid).steps[name]
        self.engine.dispatch(co.Decision(state, [co.RunStep(
            name, row.action, dict(step.params), row.request_id)]))
        report.redispatched.append(f"{cid}/{name}")
        log.warning("step %s stuck %s since %s: dispatched again", name, row.status,
                    row.started_at or row.dispatched_at,
                    extra={"correlation_id": cid, "step": name})

    def _fan_out(self, cid: str, parent: str, rows: list[Any], cutoff: datetime,
                 report: SweepReport) -> None:
        sends = 1 + max(r.attempts for r in rows)  # sub-tasks count the sweep's re-sends
        if sends >= self.max_attempts:
            self._fail(rows[0], f"step '{rows[0].step_name}' timed out after "
                                f"{self.timeout:g} s ({sends} sends of fan-out "
                                f"'{parent}')", report)
            return
        touched = _touch(self.db, cutoff, step_runs.c.correlation_id == cid,
                         step_runs.c.parent_step == parent,
                         step_runs.c.status == StepStatus.DISPATCHED,
                         attempts=step_runs.c.attempts + 1)
        if not touched:
            return
        self.engine.app.send_task(FANOUT_TASK, args=[cid, parent], ignore_result=True)
        report.redispatched.append(f"{cid}/{parent}")
        log.warning("fan-out %s stuck since %s: its sub-tasks are sent again", parent,
                    min(r.dispatched_at for r in rows),
                    extra={"correlation_id": cid, "step": parent})

    def _fail(self, row: Any, error: str, report: SweepReport) -> None:
        self._apply_timeout(str(row.correlation_id), row.step_name, error, report)

    def _apply_timeout(self, cid: str, step: str, error: str, report: SweepReport) -> None:
        decision = self.engine.apply(cid, co.StepTimedOut(step, error))
        if decision.changed:
            report.failed.append(f"{cid}/{step}")
            log.warning("workflow failed by the sweep: %s", error,
                        extra={"correlation_id": cid, "step": step})

    def _waiting_workflows(self, cutoff: datetime, report: SweepReport) -> None:
        """RUNNING, nothing awaited, unchanged since the cutoff: dependencies never met."""
        q = (sa.select(orchestrator_state.c.correlation_id, orchestrator_state.c.current_step,
                       orchestrator_state.c.awaited_steps)
             .where(orchestrator_state.c.status == Status.RUNNING.value,
                    orchestrator_state.c.updated_at < cutoff)
             .limit(BATCH))
        with self.db.connect() as conn:
            rows = [r for r in conn.execute(q).all() if not r.awaited_steps]
        for cid, step, _ in rows:
            cid = str(cid)
            state, plan = self.engine.store.get(cid), self.engine.store.get_plan(cid)
            wanted = plan.steps[step].dependencies if step in plan.steps else ()
            missing = ", ".join(d for d in wanted if d not in state.collected_data)
            self._apply_timeout(cid, step, f"step '{step}' timed out after {self.timeout:g} s "
                                           f"waiting for its dependencies: {missing or '-'}",
                                report)

    # ------------------------------------------------------------------ database

    def _stuck_steps(self, cutoff: datetime) -> list[Any]:
        s = step_runs.c
        old = sa.and_(s.dispatched_at < cutoff, sa.or_(s.started_at.is_(None),
                                                      s.started_at < cutoff))
        q = (sa.select(s.id, s.correlation_id, s.step_name, s.parent_step, s.action, s.status,
                       s.attempts, s.request_id, s.dispatched_at, s.started_at)
             .join(orchestrator_state,
                   orchestrator_state.c.correlation_id == s.correlation_id)
             .where(orchestrator_state.c.status.in_(_ACTIVE), old,
                    s.status.in_([*_RUNNABLE, StepStatus.AWAITING.value]))
             .order_by(s.id).limit(BATCH))
        with self.db.connect() as conn:
            return list(conn.execute(q).all())

    @contextmanager
    def _lock(self) -> Iterator[bool]:
        """Held for the whole sweep on PostgreSQL; other databases rely on the
        conditional updates and versioned transitions alone."""
        if self.db.dialect.name != "postgresql":
            yield True
            return
        with self.db.connect() as conn, conn.begin():
            yield bool(conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"),
                                    {"k": SWEEP_LOCK_KEY}).scalar())


def _touch(db: sa.Engine, cutoff: datetime, *where: Any, **values: Any) -> bool:
    """Mark stuck rows dispatched now, if they are still stuck; True when any were
    (only one of two concurrent sweeps can match)."""
    s = step_runs.c
    stmt = (step_runs.update()
            .where(*where, s.dispatched_at < cutoff,
                   sa.or_(s.started_at.is_(None), s.started_at < cutoff))
            .values(dispatched_at=now(), **values))
    with db.begin() as conn:
        return conn.execute(stmt).rowcount > 0
