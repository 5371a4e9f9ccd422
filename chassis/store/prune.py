"""Retention: finished workflows older than a cutoff go, with their rows.

A workflow is removed once it has finished (COMPLETED, FAILED, CANCELLED, COMPENSATED)
and has not changed for the given time: its state row, and with it (foreign keys,
ON DELETE CASCADE) its step runs, ledger rows and recorded model responses, and its
outbox rows. Outbox rows already published (or set aside) before the cutoff go too,
whatever their workflow.

With Kafka configured, a workflow whose events are not all published yet is kept until
they are (the relay may be behind). Without Kafka nothing publishes the outbox: its rows
are removed with their workflow, and those of workflows already gone once they are
older than the cutoff, so they are not all sent the day Kafka is turned on.

Work goes in batches, one short transaction each: no long lock, and a workflow that an
operator retries meanwhile (it is no longer finished) is left alone, the check being
made by the delete itself. A FAILED workflow whose compensation ran out of attempts
(steps still to undo) is kept: it is the only trace of what an operator must finish.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa

from chassis.state import Status
from chassis.store.sql import now
from chassis.store.tables import (
    fuel_ledger,
    model_responses,
    orchestrator_state,
    outbox,
    step_runs,
    workflow_events,
)

FINISHED = tuple(s.value for s in Status if s.finished)
#: Workflows removed per transaction.
BATCH = 500


@dataclass
class PruneReport:
    """What was removed (or, on a dry run, would be)."""

    cutoff: datetime
    dry_run: bool = False
    workflows: int = 0
    step_runs: int = 0
    ledger_rows: int = 0
    outbox_rows: int = 0
    model_responses: int = 0
    events: int = 0
    """Lines of the workflows' event history."""
    kept_unpublished: int = 0
    """Finished workflows old enough, kept because Kafka has not got their events yet."""
    batches: int = field(default=0, repr=False)

    def counts(self) -> dict[str, object]:
        return {"cutoff": self.cutoff.isoformat(), "dry_run": self.dry_run,
                "workflows": self.workflows, "step_runs": self.step_runs,
                "ledger_rows": self.ledger_rows, "outbox_rows": self.outbox_rows,
                "model_responses": self.model_responses, "events": self.events,
                "kept_unpublished": self.kept_unpublished}


def _unpublished(cids: sa.ColumnElement[str]) -> sa.Exists:
    return sa.exists().where(outbox.c.correlation_id == cids,
                             outbox.c.published_at.is_(None), outbox.c.failed_at.is_(None))


def _undo_left(dialect: str) -> sa.ColumnElement[bool]:
    """A FAILED workflow whose compensation ran out of attempts still has steps to undo
    (an operator's retry finishes it): its record is the only trace of them."""
    if dialect == "postgresql":
        left = sa.text("jsonb_array_length(COALESCE(orchestrator_state.saga -> 'undo', "
                       "'[]'::jsonb)) > 0")
    else:
        left = sa.text("COALESCE(json_array_length(orchestrator_state.saga, '$.undo'), 0) > 0")
    return sa.and_(orchestrator_state.c.status == Status.FAILED.value, left)


def _old_finished(cutoff: datetime, kafka: bool, dialect: str) -> sa.ColumnElement[bool]:
    o = orchestrator_state.c
    cond = sa.and_(o.status.in_(FINISHED), o.updated_at < cutoff, ~_undo_left(dialect))
    if kafka:
        cond = sa.and_(cond, ~_unpublished(o.correlation_id))
    return cond


def _count(conn: sa.Connection, table: sa.Table, cids: list[str]) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(table)
                            .where(table.c.correlation_id.in_(cids))).scalar_one())


def prune(engine: sa.Engine, older_than: timedelta, *, kafka: bool, dry_run: bool = False,
          batch: int = BATCH,
          progress: Callable[[PruneReport], None] | None = None) -> PruneReport:
    """Remove finished workflows unchanged for ``older_than`` (see the module)."""
    cutoff = now() - older_than
    dialect = engine.dialect.name
    report = PruneReport(cutoff, dry_run)
    o = orchestrator_state.c
    with engine.connect() as conn:
        if kafka:
            report.kept_unpublished = int(conn.execute(
                sa.select(sa.func.count()).select_from(orchestrator_state)
                .where(o.status.in_(FINISHED), o.updated_at < cutoff,
                       _unpublished(o.correlation_id))).scalar_one())
    last: tuple[datetime, str] | None = None
    while True:
        with engine.begin() as conn:
            q = (sa.select(o.correlation_id, o.updated_at)
                 .where(_old_finished(cutoff, kafka, dialect))
                 .order_by(o.updated_at, o.correlation_id).limit(batch))
            if last is not None:  # (a dry run deletes nothing: page on)
                q = q.where(sa.tuple_(o.updated_at, o.correlation_id) > sa.tuple_(
                    sa.literal(last[0], o.updated_at.type),
                    sa.literal(last[1], o.correlation_id.type)))
            page = conn.execute(q).all()
            if not page:
                break
            last = (page[-1].updated_at, str(page[-1].correlation_id))
            cids = [str(r.correlation_id) for r in page]
            runs, ledger = _count(conn, step_runs, cids), _count(conn, fuel_ledger, cids)
            answers = _count(conn, model_responses, cids)
            history = _count(conn, workflow_events, cids)
            if dry_run:
                gone = cids
            else:
                gone = [str(c) for c in conn.execute(
                    orchestrator_state.delete()
                    .where(o.correlation_id.in_(cids), _old_finished(cutoff, kafka, dialect))
                    .returning(o.correlation_id)).scalars()]
                if len(gone) < len(cids):  # retried meanwhile: count what went
                    runs, ledger = runs - _count(conn, step_runs, cids), \
                        ledger - _count(conn, fuel_ledger, cids)
                    answers -= _count(conn, model_responses, cids)
                    history -= _count(conn, workflow_events, cids)
            report.step_runs += runs
            report.ledger_rows += ledger
            report.model_responses += answers
            report.events += history
            if dry_run:
                report.outbox_rows += _count(conn, outbox, gone)
            elif gone:
                # step runs, ledger rows and model responses went with their workflow
                # (ON DELETE CASCADE)
                report.outbox_rows += conn.execute(
                    outbox.delete().where(outbox.c.correlation_id.in_(gone))).rowcount
            report.workflows += len(gone)
            report.batches += 1
        if progress is not None:
            progress(report)
    report.outbox_rows += _prune_outbox(engine, cutoff, kafka, dry_run, batch)
    return report


def _prune_outbox(engine: sa.Engine, cutoff: datetime, kafka: bool, dry_run: bool,
                  batch: int) -> int:
    """Outbox rows older than the cutoff that are published or set aside (and, without
    Kafka, any whose workflow is gone), in batches."""
    done = sa.or_(outbox.c.published_at.is_not(None), outbox.c.failed_at.is_not(None))
    if not kafka:
        done = sa.or_(done, ~sa.exists().where(
            orchestrator_state.c.correlation_id == outbox.c.correlation_id))
    old = sa.and_(outbox.c.created_at < cutoff, done)
    if dry_run:
        # the rows of the workflows a real run removes first were counted with them
        counted = sa.exists().where(
            orchestrator_state.c.correlation_id == outbox.c.correlation_id,
            _old_finished(cutoff, kafka, engine.dialect.name))
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(outbox)
                                    .where(old, ~counted)).scalar_one())
    total = 0
    while True:
        with engine.begin() as conn:
            ids = conn.execute(sa.select(outbox.c.id).where(old).order_by(outbox.c.id)
                               .limit(batch)).scalars().all()
            if not ids:
                return total
            total += conn.execute(outbox.delete().where(outbox.c.id.in_(ids))).rowcount


__all__ = ["BATCH", "FINISHED", "PruneReport", "prune"]
