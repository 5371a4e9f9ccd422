"""The SQLAlchemy store. Every transition is one transaction: the new state (checked
against its version), the step runs, the ledger rows and the outbox rows are written
together, so a crash leaves either all of them or none. Idempotency is the database's:
unique (workflow, step) step runs, unique ledger keys, a version column."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from chassis import coordinator as co
from chassis.errors import WorkflowNotFound
from chassis.plan import Plan, parse_plan, plan_to_dict
from chassis.state import Status, StepStatus, WorkflowState
from chassis.store import pg
from chassis.store.rows import rows_for
from chassis.store.tables import TS, fuel_ledger, orchestrator_state, outbox, step_runs

log = logging.getLogger(__name__)

_STATE_COLS = [c for c in orchestrator_state.c if c.name != "plan"]
_MAX_RETRIES = 20


class StaleState(Exception):
    """The state changed under us (its version moved): re-read and decide again."""


def now() -> datetime:
    return datetime.now(UTC)


class _PlanCache:
    """Plans are immutable per workflow: parse each snapshot once per process."""

    def __init__(self, size: int = 2048) -> None:
        self._d: OrderedDict[str, Plan] = OrderedDict()
        self._size = size

    def get(self, cid: str) -> Plan | None:
        plan = self._d.get(cid)
        if plan is not None:
            self._d.move_to_end(cid)
        return plan

    def put(self, cid: str, plan: Plan) -> None:
        self._d[cid] = plan
        if len(self._d) > self._size:
            self._d.popitem(last=False)


def _row_to_state(row: Any) -> WorkflowState:
    m = row._mapping
    return WorkflowState(
        correlation_id=str(m["correlation_id"]), client_id=m["client_id"],
        status=Status(m["status"]), current_step=m["current_step"],
        fuel_budget=m["fuel_budget"], awaited_steps=list(m["awaited_steps"] or []),
        collected_data=dict(m["collected_data"] or {}),
        initial_request_data=m["initial_request_data"], final_result=m["final_result"],
        error=m["error"], fuel_spent=m["fuel_spent"], project_id=m["project_id"],
        request_id=m["request_id"], version=m["version"], created_at=m["created_at"],
        updated_at=m["updated_at"])


def _state_values(s: WorkflowState) -> dict[str, Any]:
    return {"status": s.status.value, "current_step": s.current_step,
            "awaited_steps": s.awaited_steps, "collected_data": s.collected_data,
            "final_result": s.final_result, "error": s.error, "fuel_spent": s.fuel_spent}


_CLAIM = (
    step_runs.update()
    .where(step_runs.c.correlation_id == sa.bindparam("b_cid"),
           step_runs.c.step_name == sa.bindparam("b_step"),
           step_runs.c.status.in_([StepStatus.DISPATCHED, StepStatus.RUNNING]))
    .values(status=StepStatus.RUNNING, attempts=step_runs.c.attempts + 1,
            started_at=sa.bindparam("b_started"), task_id=sa.bindparam("b_task"))
    .returning(step_runs.c.attempts))


# The hot path's statements, built once (building them per call costs more than running)
_LOAD = sa.select(*_STATE_COLS).where(
    orchestrator_state.c.correlation_id == sa.bindparam("b_cid"))
_LOAD_WITH_PLAN = sa.select(*_STATE_COLS, orchestrator_state.c.plan).where(
    orchestrator_state.c.correlation_id == sa.bindparam("b_cid"))
_SAVE = orchestrator_state.update().where(
    orchestrator_state.c.correlation_id == sa.bindparam("b_cid"),
    orchestrator_state.c.version == sa.bindparam("b_version"))
_INSERT_LEDGER = fuel_ledger.insert()
_INSERT_RUNS = step_runs.insert()
_INSERT_OUTBOX = outbox.insert()
_LEDGER_USAGE = (fuel_ledger.update()
                 .where(fuel_ledger.c.idempotency_key == sa.bindparam("b_key"))
                 .values(usage=sa.bindparam("usage")))
_FINISH = (
    step_runs.update()
    .where(step_runs.c.correlation_id == sa.bindparam("b_cid"),
           step_runs.c.step_name == sa.bindparam("b_step"))
    .values(status=sa.bindparam("status"), output=sa.bindparam("output"),
            error=sa.bindparam("error"), finished_at=sa.bindparam("finished_at"),
            # fan-out sub-tasks report their start with their result
            started_at=sa.func.coalesce(sa.bindparam("b_started", type_=TS),
                                        step_runs.c.started_at),
            attempts=sa.case((step_runs.c.attempts == 0, 1), else_=step_runs.c.attempts)))

_CLAIMED = _CLAIM.cte("claimed")
_CLAIM_AND_READ = (sa.select(_CLAIMED.c.attempts, *_STATE_COLS)
                   .select_from(_CLAIMED.join(orchestrator_state, sa.true()))
                   .where(orchestrator_state.c.correlation_id == sa.bindparam("b_cid")))


class SqlStore:
    """Workflow storage on one SQLAlchemy engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._plans = _PlanCache()
        self._claims: sa.Engine | None = None
        if engine.dialect.name == "postgresql":
            self._claims = sa.create_engine(
                engine.url, isolation_level="AUTOCOMMIT", pool_size=2, max_overflow=8,
                connect_args={"options": "-c synchronous_commit=off", "connect_timeout": 10})

    # ------------------------------------------------------------------ writing

    def create(self, decision: co.Decision, plan: Plan, *, plan_name: str | None = None,
               plan_version: int | None = None) -> bool:
        """Insert a new workflow with the outcome of its Start decision. False (and
        nothing written) when a workflow with this correlation_id already exists."""
        s = decision.state
        ts = now()
        values = {**_state_values(s), "correlation_id": s.correlation_id,
                  "client_id": s.client_id, "initial_request_data": s.initial_request_data,
                  "project_id": s.project_id, "request_id": s.request_id,
                  "plan": plan_to_dict(plan), "plan_name": plan_name,
                  "plan_version": plan_version, "fuel_budget": s.fuel_budget, "version": 1,
                  "created_at": ts, "updated_at": ts}
        if self._claims is not None:  # PostgreSQL: one statement, one round trip
            with self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                if not pg.create(conn, values, rows_for(s, decision.commands, ts)):
                    return False
        else:
            try:
                with self.engine.begin() as conn:
                    conn.execute(orchestrator_state.insert().values(**values))
                    self._apply(conn, s, decision.commands, ts)
            except IntegrityError:
                if self.exists(s.correlation_id):
                    return False
                raise
        s.version = 1
        self._plans.put(s.correlation_id, plan)
        return True

    def claim_step(self, cid: str, step: str, task_id: str | None) -> int | None:
        """Mark a dispatched step as running; its attempt number, or None when the step
        is already finished (a duplicate delivery: do nothing)."""
        claim = self.claim(cid, step, task_id)
        return None if claim is None else claim[0]

    def claim(self, cid: str, step: str,
              task_id: str | None) -> tuple[int, WorkflowState | None] | None:
        """:meth:`claim_step`, and on PostgreSQL the workflow's state read in the same
        round trip, for the transition that follows to start from (it is checked by its
        version when written, so a state that moved meanwhile only costs a re-read).

        The claim sends nothing, so on PostgreSQL it commits without waiting for the WAL
        flush: the transition that follows flushes it. A claim lost in a database crash
        only means the redelivered task claims again.
        """
        params = {"b_cid": cid, "b_step": step, "b_started": now(), "b_task": task_id}
        if self._claims is not None:  # one round trip: autocommit, no flush wait
            with self._claims.connect() as conn:
                row = conn.execute(_CLAIM_AND_READ, params).first()
            return None if row is None else (int(row.attempts), _row_to_state(row))
        with self.engine.begin() as conn:
            row = conn.execute(_CLAIM, params).first()
        return None if row is None else (int(row[0]), None)

    def transition(self, cid: str, decide: Callable[[WorkflowState, Plan], co.Decision],
                   state: WorkflowState | None = None) -> co.Decision:
        """Read the workflow, decide, and write the outcome in one transaction; retried
        when another transition got there first. ``state``: a recent read to start from
        (PostgreSQL; its version guards the write)."""
        for attempt in range(_MAX_RETRIES):
            try:
                if self._claims is not None:
                    known, state = state, None  # a retry reads afresh
                    return self._transition_pg(cid, decide, known)
                with self.engine.begin() as conn:
                    state, plan = self._load(conn, cid)
                    decision = decide(state, plan)
                    if decision.changed:
                        self._save(conn, decision, state.version)
                    return decision
            except (StaleState, IntegrityError) as exc:
                log.debug("transition of %s retried (%s), attempt %d", cid, exc, attempt + 1,
                          extra={"correlation_id": cid})
        raise StaleState(f"workflow {cid}: too much contention, gave up after "
                         f"{_MAX_RETRIES} tries")

    def _transition_pg(self, cid: str, decide: Callable[[WorkflowState, Plan], co.Decision],
                       known: WorkflowState | None) -> co.Decision:
        """Read (autocommit; skipped when the claim already read it), then every write
        in one statement."""
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            plan = self._plans.get(cid) if known is not None else None
            if known is not None and plan is not None:
                state = known
            else:
                state, plan = self._load(conn, cid)
            decision = decide(state, plan)
            if decision.changed:
                s, ts = decision.state, now()
                values = {**_state_values(s), "version": state.version + 1, "updated_at": ts}
                if not pg.write(conn, values, cid, state.version,
                                rows_for(s, decision.commands, ts)):
                    raise StaleState(f"workflow {cid} moved past version {state.version}")
                s.version = state.version + 1
            return decision

    def _load(self, conn: sa.Connection, cid: str) -> tuple[WorkflowState, Plan]:
        plan = self._plans.get(cid)
        row = conn.execute(_LOAD if plan is not None else _LOAD_WITH_PLAN,
                           {"b_cid": cid}).first()
        if row is None:
            raise WorkflowNotFound(f"no workflow with correlation_id {cid}", correlation_id=cid)
        if plan is None:
            plan = parse_plan(row._mapping["plan"])
            self._plans.put(cid, plan)
        return _row_to_state(row), plan

    def _save(self, conn: sa.Connection, decision: co.Decision, version: int) -> None:
        s = decision.state
        ts = now()
        res = conn.execute(_SAVE, {**_state_values(s), "b_cid": s.correlation_id,
                                   "b_version": version, "version": version + 1,
                                   "updated_at": ts})
        if res.rowcount != 1:
            raise StaleState(f"workflow {s.correlation_id} moved past version {version}")
        s.version = version + 1
        self._apply(conn, s, decision.commands, ts)

    def _apply(self, conn: sa.Connection, s: WorkflowState, commands: Sequence[co.Command],
               ts: datetime) -> None:
        """Write the rows the commands call for (sending happens after commit)."""
        rows = rows_for(s, commands, ts)
        for stmt, params in ((_INSERT_LEDGER, rows.ledger), (_INSERT_RUNS, rows.runs),
                             (_LEDGER_USAGE, rows.usage), (_FINISH, rows.finished),
                             (_INSERT_OUTBOX, rows.messages)):
            if params:
                conn.execute(stmt, params)

    # ------------------------------------------------------------------ reading

    def exists(self, cid: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(orchestrator_state.c.version).where(
                orchestrator_state.c.correlation_id == cid)).first() is not None

    def get(self, cid: str) -> WorkflowState:
        with self.engine.connect() as conn:
            return self._load(conn, cid)[0]

    def get_plan(self, cid: str) -> Plan:
        with self.engine.connect() as conn:
            return self._load(conn, cid)[1]

    def steps(self, cid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(step_runs).where(step_runs.c.correlation_id == cid)
                                .order_by(step_runs.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def ledger(self, cid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(fuel_ledger).where(fuel_ledger.c.correlation_id == cid)
                                .order_by(fuel_ledger.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def outbox_for(self, cid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(outbox).where(outbox.c.correlation_id == cid)
                                .order_by(outbox.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def list(self, status: str | None = None, limit: int = 50) -> list[WorkflowState]:
        q = sa.select(*_STATE_COLS).order_by(orchestrator_state.c.created_at.desc()).limit(limit)
        if status:
            q = q.where(orchestrator_state.c.status == status)
        with self.engine.connect() as conn:
            return [_row_to_state(r) for r in conn.execute(q).all()]
