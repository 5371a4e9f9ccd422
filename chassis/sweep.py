"""The sweep (``chassis.sweep``, sent by celery beat every CHASSIS_SWEEP_INTERVAL
seconds, default 5): the clock of the failure model. Each run, in this order:

1. **due retries**: a SCHEDULED attempt whose retry time has come is reported to the
   coordinator (:class:`~chassis.events.RetryDue`), which sends it;
2. **timeouts**: an attempt RUNNING past its deadline, or an agent's request not
   answered in time (its step's ``timeout``, else CHASSIS_STEP_TIMEOUT), is a failed
   attempt (error type ``StepTimeout``): the coordinator retries it or fails the step;
   a pause whose step sets a ``timeout`` and had no answer within it expired
   (:class:`~chassis.events.ApprovalExpired`): its ``on_failure`` goes on, or it fails;
3. **lost workers**: a RUNNING attempt whose lease expired (its worker stopped renewing
   it: killed, out of memory, cut off) is sent again, the same attempt with the same
   task id; one started CHASSIS_MAX_DELIVERIES times already is a failed attempt
   instead (error type ``WorkerLost``), so a step that kills its worker cannot loop;
4. **lost messages**: a DISPATCHED attempt that no worker has claimed (a message lost
   with a broker restart, or a publish that failed while the broker was down) is sent
   again once its queue is empty and it has waited CHASSIS_REDISPATCH_AFTER seconds
   (ten times that while the queue holds messages: it may only be waiting its turn),
   the wait doubling after each re-send, up to two minutes (twenty while busy);
5. **fan-ins**: a fan-out whose sub-tasks all recorded success but was never collected
   (the last sub-task's worker died in between) is collected;
6. **stalls**: a RUNNING workflow that has waited CHASSIS_STEP_TIMEOUT for dependencies
   that never came fails;
7. **unanswered agents**: an agent's request still unanswered CHASSIS_AGENT_RESEND_AFTER
   seconds after it was sent (then 3, 7, 15... times that) is sent once more, the same
   request id (:class:`~chassis.events.RequestUnanswered`): a request or an answer lost
   on the way (a broker restarted empty between the bridge and the workers) does not
   leave the step waiting for its timeout. Its deadline stays as it was.

Decisions (failing an attempt, retrying, failing a workflow) are the coordinator's; the
sweep only reports events and re-sends what was already decided. A re-send is a
conditional update of the attempt's row, so of two sweeps at once (two beats by
mistake) only one sends; on PostgreSQL a sweep also takes an advisory lock and a second
one returns at once. Paused workflows wait for a human as long as it takes, unless the
pause step sets a ``timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

import sqlalchemy as sa
from kombu.exceptions import ChannelError

from chassis import coordinator as co
from chassis import infra
from chassis.celery_conf import queue_for
from chassis.config import Settings
from chassis.engine import Engine
from chassis.plan import PAUSE
from chassis.policy import TIMEOUT_ERROR, WORKER_LOST_ERROR
from chassis.store import Stuck
from chassis.store.sql import now

log = logging.getLogger(__name__)

#: pg_try_advisory_xact_lock key held by a running sweep ("sweep").
SWEEP_LOCK_KEY = 0x7377656570
#: Rows looked at per kind and sweep; the rest wait for the next one.
BATCH = 500
#: How much longer an unclaimed attempt may wait while its queue is not empty.
BUSY_QUEUE_FACTOR = 10
#: Re-sends double the wait up to this many times, and to this many seconds at most
#: (ten times that while the queue is busy).
MAX_DOUBLINGS = 8
MAX_WAIT = 120.0


@dataclass
class SweepReport:
    """What one sweep did (``cid/step#attempt`` names)."""

    sent_due: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    """Pauses whose approval expired."""
    resent: list[str] = field(default_factory=list)
    asked_again: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    fanned_in: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    locked_out: bool = False
    """Another sweep held the lock: this one did nothing."""

    def counts(self) -> dict[str, int]:
        return {"sent_due": len(self.sent_due), "timed_out": len(self.timed_out),
                "expired": len(self.expired),
                "resent": len(self.resent), "asked_again": len(self.asked_again),
                "lost": len(self.lost),
                "fanned_in": len(self.fanned_in), "failed": len(self.failed),
                "locked_out": int(self.locked_out)}

    @property
    def acted(self) -> bool:
        return any(v for k, v in self.counts().items() if k != "locked_out")


def _name(row: Stuck) -> str:
    return f"{row.correlation_id}/{row.step}#{row.attempt}"


class Sweeper:
    """Finds due, overdue, lost and stalled attempts of ``engine``'s store."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine.impatient()  # a broker that is down stops this sweep, not waits
        self.store = engine.store
        self.settings = settings

    def sweep(self) -> SweepReport:
        report = SweepReport()
        with self._lock() as acquired:
            if not acquired:
                report.locked_out = True
                log.info("sweep: another sweep is running; skipped")
                return report
            self._each(self.store.due(BATCH), self._send_due, report)
            self._each(self.store.overdue(self.settings.step_timeout, BATCH), self._time_out,
                       report)
            self._each(self.store.lost(BATCH), self._lost, report)
            depths: dict[str, int | None] = {}
            self._each(self.store.unclaimed(self._cutoff(self.settings.redispatch_after),
                                            BATCH),
                       lambda row, rep: self._unclaimed(row, rep, depths), report)
            for cid, step in self.store.waiting_fan_ins(self.settings.redispatch_after, BATCH):
                self._guard(partial(self._fan_in, cid, step, report), cid)
            for cid, step in self.store.stalled(self.settings.step_timeout, BATCH):
                self._guard(partial(self._stalled, cid, step, report), cid)
            if self.settings.agent_resend_after > 0:
                self._each(self.store.unanswered(
                    self._cutoff(self.settings.agent_resend_after), BATCH),
                    self._unanswered, report)
        if report.acted:
            log.info("sweep: %s", ", ".join(f"{k} {v}" for k, v in report.counts().items()
                                            if v and k != "locked_out"))
        return report

    # ------------------------------------------------------------------ each kind

    def _send_due(self, row: Stuck, report: SweepReport) -> None:
        decision = self.engine.apply(row.correlation_id, co.RetryDue(row.step, row.attempt))
        if decision.changed:
            report.sent_due.append(_name(row))

    def _time_out(self, row: Stuck, report: SweepReport) -> None:
        plan = self.store.get_plan(row.correlation_id)
        if row.action == PAUSE:  # (only a pause whose step sets a timeout has a deadline)
            step = plan.steps.get(row.step)
            expired = co.ApprovalExpired(row.step, row.attempt,
                                         step.timeout if step and step.timeout else 0.0)
            if self.engine.apply(row.correlation_id, expired).changed:
                report.expired.append(_name(row))
                log.warning("step %s attempt %d: the approval expired", row.step,
                            row.attempt, extra={"correlation_id": row.correlation_id,
                                                "step": row.step})
            return
        timeout = plan.timeout(row.step) or self.settings.step_timeout
        error = (f"no answer from the agent within {timeout:g} s" if row.status == "AWAITING"
                 else f"timed out after {timeout:g} s")
        decision = self.engine.apply_if(row, co.StepFailed(
            row.step, error, row.attempt, (TIMEOUT_ERROR,)), (row.status,))
        if decision.changed:
            report.timed_out.append(_name(row))
            log.warning("step %s attempt %d %s", row.step, row.attempt, error,
                        extra={"correlation_id": row.correlation_id, "step": row.step})

    def _lost(self, row: Stuck, report: SweepReport) -> None:
        if row.deliveries >= self.settings.max_deliveries:
            error = (f"its worker was lost {row.deliveries} times while running it "
                     f"(CHASSIS_MAX_DELIVERIES={self.settings.max_deliveries})")
            decision = self.engine.apply_if(row, co.StepFailed(
                row.step, error, row.attempt, (WORKER_LOST_ERROR,)), (row.status,))
            if decision.changed:
                report.lost.append(_name(row))
            return
        self._resend(row, report, "its worker was lost (lease expired)")

    def _unclaimed(self, row: Stuck, report: SweepReport,
                   depths: dict[str, int | None]) -> None:
        queue = queue_for(row.action)
        if queue not in depths:
            depths[queue] = self._depth(queue)
        wait = min(self.settings.redispatch_after * 2 ** min(row.sends, MAX_DOUBLINGS),
                   max(self.settings.redispatch_after, MAX_WAIT))
        if depths[queue] != 0:  # not empty (or unknown): it may be waiting its turn
            wait *= BUSY_QUEUE_FACTOR
        sent = row.sent_at or row.dispatched_at
        if (now() - sent).total_seconds() > wait:
            self._resend(row, report, f"not started {wait:g} s after it was sent")

    def _resend(self, row: Stuck, report: SweepReport, why: str) -> None:
        if not self.store.mark_resent(row):
            return  # another sweep, or the worker, got there first
        self.engine.resend(row)
        report.resent.append(_name(row))
        log.warning("step %s attempt %d sent again: %s", row.step, row.attempt, why,
                    extra={"correlation_id": row.correlation_id, "step": row.step})

    def _unanswered(self, row: Stuck, report: SweepReport) -> None:
        """Ask an agent again once its request has waited 1, 3, 7, 15... times
        CHASSIS_AGENT_RESEND_AFTER (the n-th time after 2^n - 1 of them)."""
        base = self.settings.agent_resend_after
        wait = base * (2 ** min(row.sends + 1, MAX_DOUBLINGS + 1) - 1)
        sent = row.sent_at or row.dispatched_at
        if (now() - sent).total_seconds() <= wait or not self.store.mark_asked_again(row):
            return
        decision = self.engine.apply(row.correlation_id,
                                     co.RequestUnanswered(row.step, row.attempt,
                                                          row.sends + 1))
        if decision.changed:
            report.asked_again.append(_name(row))
            log.warning("step %s attempt %d: no answer from the agent after %g s; its "
                        "request is sent again", row.step, row.attempt, wait,
                        extra={"correlation_id": row.correlation_id, "step": row.step})

    def _fan_in(self, cid: str, step: str, report: SweepReport) -> None:
        if self.engine.fan_in(cid, step).changed:
            report.fanned_in.append(f"{cid}/{step}")

    def _stalled(self, cid: str, step: str, report: SweepReport) -> None:
        state, plan = self.store.get(cid), self.store.get_plan(cid)
        wanted = plan.steps[step].dependencies if step in plan.steps else ()
        missing = ", ".join(d for d in wanted if d not in state.collected_data)
        error = (f"step '{step}' waited {self.settings.step_timeout:g} s for its "
                 f"dependencies: {missing or '-'}")
        if self.engine.apply(cid, co.Stalled(step, error)).changed:
            report.failed.append(f"{cid}/{step}")
            log.warning("workflow failed by the sweep: %s", error,
                        extra={"correlation_id": cid, "step": step})

    # ------------------------------------------------------------------ helpers

    def _each(self, rows: list[Stuck], act: Callable[[Stuck, SweepReport], None],
              report: SweepReport) -> None:
        for row in rows:
            self._guard(partial(act, row, report), row.correlation_id)

    @staticmethod
    def _guard(fn: Callable[[], None], cid: str) -> None:
        """One workflow's trouble must not stop the sweep for the others (an unreachable
        service does: the next sweep tries again)."""
        try:
            fn()
        except Exception as exc:
            if infra.is_infrastructure_error(exc):
                raise
            log.exception("sweep: workflow %s: %s", cid, exc, extra={"correlation_id": cid})

    @staticmethod
    def _cutoff(seconds: float) -> datetime:
        return now() - timedelta(seconds=seconds)

    def _depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` (0 when it does not exist); None if unknown."""
        try:
            with self.engine.app.connection_for_read() as conn:
                return int(conn.default_channel.queue_declare(queue=queue,
                                                              passive=True).message_count)
        except ChannelError:
            return 0  # Redis and the file-system broker: an empty queue does not exist
        except Exception as exc:
            log.debug("cannot read the length of queue %s: %s", queue, exc)
            return None

    @contextmanager
    def _lock(self) -> Iterator[bool]:
        """Held for the whole sweep on PostgreSQL; other databases rely on the
        conditional updates and versioned transitions alone."""
        db = self.store.engine
        if db.dialect.name != "postgresql":
            yield True
            return
        with db.connect() as conn, conn.begin():
            yield bool(conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"),
                                    {"k": SWEEP_LOCK_KEY}).scalar())


__all__ = ["SWEEP_LOCK_KEY", "SweepReport", "Sweeper"]
