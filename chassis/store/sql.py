"""The SQLAlchemy store. Every transition is one transaction: the new state (checked
against its version), the step runs, the ledger rows and the outbox rows are written
together, so a crash leaves either all of them or none. Idempotency is the database's:
unique (workflow, step) step runs, unique ledger keys, a version column."""

from __future__ import annotations

import builtins
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from chassis import commands as cmd
from chassis.errors import ChassisError, WorkflowNotFound
from chassis.plan import Plan, parse_plan, plan_to_dict
from chassis.state import Outputs, Progress, Quota, Status, StepStatus, WorkflowState
from chassis.store import attempts as at
from chassis.store import pg
from chassis.store import quotas as qt
from chassis.store import responses as mr
from chassis.store.breaker import CircuitBreakers
from chassis.store.rows import rows_for
from chassis.store.tables import (
    fuel_ledger,
    orchestrator_state,
    outbox,
    step_attempts,
    step_outputs,
    step_runs,
    workflow_events,
)

log = logging.getLogger(__name__)

_STATE_COLS = [c for c in orchestrator_state.c if c.name != "plan"]
#: ``decide(state, plan[, settled])``: the coordinator's decision (settled: a fan-out's
#: sub-tasks that recorded their success, read under lock; see ``transition``).
Decide = Callable[..., cmd.Decision]
#: The fan-out under way whose sub-tasks a transition must read under lock, if any.
FanOut = Callable[[WorkflowState, Plan], str | None]
_MAX_RETRIES = 20


class StaleState(ChassisError):
    """The state changed under us (its version moved): re-read and decide again. Raised
    to the caller only when that kept happening."""


class StoreConflict(ChassisError):
    """A write was refused by a unique key that a transition should never meet (the
    decision and the rows disagree): nothing was written."""


@dataclass(frozen=True)
class Claim:
    """A delivery took an attempt: the row, how many times the attempt has been started
    (1, or more after a lost worker), and on PostgreSQL the workflow's state read in
    the same round trip."""

    row_id: int
    deliveries: int
    state: WorkflowState | None = None


def now() -> datetime:
    return datetime.now(UTC)


class _PlanCache:
    """Plans are immutable per workflow: parse each snapshot once per process. Kept with
    the workflow's ``created_at``: a workflow pruned and started again under the same
    id (with another plan, perhaps) is another workflow."""

    def __init__(self, size: int = 2048) -> None:
        self._d: OrderedDict[str, tuple[Plan, datetime | None]] = OrderedDict()
        self._size = size

    def get(self, cid: str, created: datetime | None = None) -> Plan | None:
        """The plan kept for ``cid`` (when ``created`` is given: only if it is that
        workflow's)."""
        hit = self._d.get(cid)
        if hit is None or (created is not None and hit[1] != created):
            return None
        self._d.move_to_end(cid)
        return hit[0]

    def put(self, cid: str, plan: Plan, created: datetime | None) -> None:
        self._d[cid] = (plan, created)
        self._d.move_to_end(cid)
        if len(self._d) > self._size:
            self._d.popitem(last=False)


#: One value of collected data as read: (name, rev, value, bytes of its JSON).
OutputRow = tuple[str, int, Any, int]


class _Seen:
    __slots__ = ("seen", "revs", "values", "sizes", "size")

    def __init__(self) -> None:
        self.seen = 0
        self.revs: dict[str, int] = {}
        self.values: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}
        self.size = 0


class _RecentOutputs:
    """Per process: the collected data of the workflows seen lately, each complete up
    to a version (``seen``: every value written at or before it is here), most
    recently used kept, at most ``max_bytes`` of JSON. A claim or a read then asks the
    database only for values written after ``seen``: a step late in a long workflow
    reads one new output, not a thousand. A value of a given rev never changes (a value
    set again gets the new version), so nothing kept is ever wrong."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._d: OrderedDict[str, _Seen] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    def get(self, cid: str) -> tuple[int, dict[str, int], dict[str, Any]]:
        """(seen, revs, values): copies; (0, {}, {}) for a workflow not kept."""
        with self._lock:
            e = self._d.get(cid)
            if e is None:
                return 0, {}, {}
            self._d.move_to_end(cid)
            return e.seen, dict(e.revs), dict(e.values)

    def add(self, cid: str, since: int, rows: Sequence[OutputRow], upto: int) -> None:
        """``rows``: every value written after version ``since``, up to at least
        ``upto``. Kept only where what is here reaches ``since``."""
        with self._lock:
            e = self._d.get(cid)
            if since == 0:  # the whole workflow (a new one may reuse a pruned one's id)
                if e is not None:
                    self._bytes -= e.size
                e = self._d[cid] = _Seen()
            elif e is None or e.seen < since:
                return
            for name, rev, value, size in rows:
                if rev >= e.revs.get(name, 0):
                    delta = size - e.sizes.get(name, 0)
                    e.size += delta
                    self._bytes += delta
                    e.revs[name], e.values[name], e.sizes[name] = rev, value, size
            e.seen = max(e.seen, upto)
            self._d.move_to_end(cid)
            while self._bytes > self._max and self._d:
                _, gone = self._d.popitem(last=False)
                self._bytes -= gone.size


def _parse(rows: Sequence[Any]) -> list[OutputRow]:
    """(name, rev, JSON text) rows as read → OutputRows."""
    return [(name, int(rev), None if text is None else json.loads(text), len(text or ""))
            for name, rev, text in rows]


def _merge(revs: dict[str, int], values: dict[str, Any], rows: Sequence[OutputRow]) -> int:
    """Put newer values in; the highest rev among the rows (0 for none)."""
    top = 0
    for name, rev, value, _ in rows:
        top = max(top, rev)
        if rev >= revs.get(name, 0):
            revs[name], values[name] = rev, value
    return top


def _row_to_state(row: Any, outputs: Outputs, attempts: Progress) -> WorkflowState:
    m = row._mapping
    state = WorkflowState(
        correlation_id=str(m["correlation_id"]), client_id=m["client_id"],
        status=Status(m["status"]), current_step=m["current_step"],
        fuel_budget=m["fuel_budget"], awaited_steps=list(m["awaited_steps"] or []),
        collected_data=outputs,
        initial_request_data=m["initial_request_data"], final_result=m["final_result"],
        error=m["error"], fuel_spent=m["fuel_spent"], project_id=m["project_id"],
        request_id=m["request_id"], version=m["version"], created_at=m["created_at"],
        updated_at=m["updated_at"], attempts=attempts, nonce=m["nonce"],
        traceparent=m["traceparent"])
    state.load_saga(m["saga"])
    return state


def _fuel(decision: cmd.Decision) -> qt.Fuel:
    """What a decision charges its client: (charged, released, forced, held)."""
    return decision.charged, decision.released, decision.forced, decision.held


def _state_values(s: WorkflowState, version: int) -> dict[str, Any]:
    """The state's columns as saved at ``version`` (the values it set get that rev;
    they and the attempts it changed are rows of their own, see ``rows_for``)."""
    s.collected_data.stamp(version)
    return {"status": s.status.value, "current_step": s.current_step,
            "awaited_steps": s.awaited_steps, "final_result": s.final_result,
            "error": s.error, "fuel_spent": s.fuel_spent, "fuel_budget": s.fuel_budget,
            "saga": s.saga(),
            "version": version}



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
_INSERT_EVENTS = workflow_events.insert()
_INSERT_OUTPUTS = step_outputs.insert()
_DELETE_OUTPUT = step_outputs.delete().where(
    step_outputs.c.correlation_id == sa.bindparam("b_cid"),
    step_outputs.c.name == sa.bindparam("b_name"))
_INSERT_PROGRESS = step_attempts.insert()
_DELETE_PROGRESS = step_attempts.delete().where(
    step_attempts.c.correlation_id == sa.bindparam("b_cid"),
    step_attempts.c.name == sa.bindparam("b_name"))
#: Values of collected data written after version b_seen: (name, rev, JSON text) on
#: PostgreSQL; (name, rev, value) on SQLite, whose CAST of a number stored as a REAL to
#: TEXT keeps only 15 digits.
_NEW_OUTPUTS = sa.select(
    step_outputs.c.name, step_outputs.c.rev, sa.cast(step_outputs.c.value, sa.Text)).where(
    step_outputs.c.correlation_id == sa.bindparam("b_cid"),
    step_outputs.c.rev > sa.bindparam("b_seen"))
_NEW_OUTPUT_VALUES = sa.select(
    step_outputs.c.name, step_outputs.c.rev, step_outputs.c.value).where(
    step_outputs.c.correlation_id == sa.bindparam("b_cid"),
    step_outputs.c.rev > sa.bindparam("b_seen"))
_PROGRESS_COLS = (step_attempts.c.name, step_attempts.c.attempt, step_attempts.c.base,
                  step_attempts.c.scheduled)
_ALL_PROGRESS = sa.select(*_PROGRESS_COLS).where(
    step_attempts.c.correlation_id == sa.bindparam("b_cid"))
_SOME_PROGRESS = _ALL_PROGRESS.where(
    step_attempts.c.name.in_(sa.bindparam("b_names", expanding=True)))
_LEDGER_USAGE = (fuel_ledger.update()
                 .where(fuel_ledger.c.idempotency_key == sa.bindparam("b_key"))
                 .values(usage=sa.bindparam("usage")))
_WHERE_ATTEMPT = (step_runs.c.correlation_id == sa.bindparam("b_cid"),
                  step_runs.c.step_name == sa.bindparam("b_step"),
                  step_runs.c.attempt == sa.bindparam("b_attempt"))
_SENT = (step_runs.update().where(*_WHERE_ATTEMPT)
         .values(status=sa.bindparam("status"), sent_at=sa.bindparam("sent_at"),
                 deadline=sa.bindparam("deadline")))
_FINISH = (
    step_runs.update()
    # no NOT IN: an expanding parameter cannot be used with executemany (SQLite's path)
    .where(*_WHERE_ATTEMPT, *(step_runs.c.status != final for final in at.FINAL))
    .values(status=sa.bindparam("status"), output=sa.bindparam("output"),
            error=sa.bindparam("error"), error_type=sa.bindparam("error_type"),
            finished_at=sa.bindparam("finished_at")))

#: Lock a fan-out's sub-task rows that are under way or completed (a claim or a
#: record of success then waits for the commit); the outputs of the completed ones.
_LOCK_SUBTASKS = (step_runs.update()
                  .where(step_runs.c.correlation_id == sa.bindparam("b_cid"),
                         step_runs.c.parent_step == sa.bindparam("b_parent"),
                         step_runs.c.status != StepStatus.FAILED.value,
                         step_runs.c.status != StepStatus.CANCELLED.value)
                  .values(status=step_runs.c.status)
                  .returning(step_runs.c.step_name, step_runs.c.attempt, step_runs.c.status,
                             sa.case((step_runs.c.status == StepStatus.COMPLETED.value,
                                      step_runs.c.output)).label("output")))

_CLAIMED = at.CLAIM.cte("claimed")
#: The history's line of a claim (PostgreSQL: written by the claim's one statement).
_CLAIM_EVENT = workflow_events.insert().from_select(
    ["correlation_id", "at", "kind", "step", "attempt", "actor", "data"],
    sa.select(sa.cast(sa.bindparam("b_cid", type_=sa.String), postgresql.UUID(as_uuid=False)),
              sa.bindparam("b_now", type_=workflow_events.c.at.type),
              sa.literal("attempt_started"), sa.bindparam("b_step", type_=sa.String),
              sa.bindparam("b_attempt", type_=sa.Integer),
              sa.bindparam("b_worker", type_=sa.String),
              sa.func.jsonb_build_object("delivery", _CLAIMED.c.deliveries,
                                         "task_id", sa.bindparam("b_task", type_=sa.String)))
    .select_from(_CLAIMED)).cte("started")
#: PostgreSQL's claim: the attempt taken, the workflow's row, the attempts of the steps
#: named (where it may go next), and the values of collected data written since the
#: version this process has (b_seen): one round trip, whatever the workflow's length.
_CLAIM_AND_READ = (
    sa.select(
        _CLAIMED.c.id, _CLAIMED.c.deliveries, *_STATE_COLS,
        sa.select(sa.func.json_agg(sa.func.json_build_array(*_PROGRESS_COLS)))
        .where(step_attempts.c.correlation_id == sa.bindparam("b_cid"),
               # = ANY(array): no statement rendered per call, unlike an expanding IN
               step_attempts.c.name == sa.any_(
                   sa.bindparam("b_names", type_=postgresql.ARRAY(sa.String))))
        .scalar_subquery().label("x_progress"),
        sa.select(sa.func.json_agg(sa.func.json_build_array(
            step_outputs.c.name, step_outputs.c.rev, sa.cast(step_outputs.c.value, sa.Text))))
        .where(step_outputs.c.correlation_id == sa.bindparam("b_cid"),
               step_outputs.c.rev > sa.bindparam("b_seen"))
        .scalar_subquery().label("x_outputs"))
    .select_from(_CLAIMED.join(orchestrator_state, sa.true()))
    .where(orchestrator_state.c.correlation_id == sa.bindparam("b_cid"))
    .add_cte(_CLAIM_EVENT))


def _json_rows(value: Any) -> list[Any]:
    """A json_agg column: a list (psycopg parses JSON; NULL for no rows)."""
    if value is None:
        return []
    return json.loads(value) if isinstance(value, str) else list(value)


class SqlStore:
    """Workflow storage on one SQLAlchemy engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        #: the AI providers' circuit breakers (chassis.ai.breaker)
        self.breakers = CircuitBreakers(engine)
        self._plans = _PlanCache()
        self._recent = _RecentOutputs()
        self._claims: sa.Engine | None = None
        if engine.dialect.name == "postgresql":
            self._claims = sa.create_engine(
                engine.url, isolation_level="AUTOCOMMIT", pool_size=2, max_overflow=8,
                connect_args={"options": "-c synchronous_commit=off", "connect_timeout": 10})

    # ------------------------------------------------------------------ writing

    def create(self, decision: cmd.Decision, plan: Plan, *, plan_name: str | None = None,
               plan_version: int | None = None) -> bool:
        """Insert a new workflow with the outcome of its Start decision. False (and
        nothing written) when a workflow with this correlation_id already exists."""
        s = decision.state
        ts = now()
        values = {**_state_values(s, 1), "correlation_id": s.correlation_id,
                  "client_id": s.client_id, "initial_request_data": s.initial_request_data,
                  "project_id": s.project_id, "request_id": s.request_id,
                  "plan": plan_to_dict(plan), "plan_name": plan_name,
                  "plan_version": plan_version, "fuel_budget": s.fuel_budget,
                  "nonce": s.nonce, "traceparent": s.traceparent,
                  "created_at": ts, "updated_at": ts}
        if self._claims is not None:  # PostgreSQL: one statement, one round trip
            with self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                try:
                    created = pg.create(conn, values, rows_for(s, decision.commands, ts,
                                                               _fuel(decision), 1))
                except sa.exc.DBAPIError as exc:
                    if qt.is_refusal(exc):
                        raise qt.QuotaRace(s.client_id) from None
                    raise
                if not created:
                    return False
        else:
            try:
                with self.engine.begin() as conn:
                    conn.execute(orchestrator_state.insert().values(**values))
                    self._apply(conn, s, decision.commands, ts, 1)
                    qt.charge(conn, s.client_id, _fuel(decision), ts)
            except IntegrityError:
                if self.exists(s.correlation_id):
                    return False
                raise
        s.version = 1
        self._saved(s)
        self._plans.put(s.correlation_id, plan, ts)
        return True

    def claim(self, cid: str, step: str, attempt: int, task_id: str | None, *,
              lease: float, timeout: float, names: Sequence[str] = (),
              worker: str | None = None) -> Claim | None:
        """Mark an attempt RUNNING for this delivery, with a lease of ``lease`` seconds
        and a deadline ``timeout`` seconds from now. None when the attempt is not to be
        run here: it finished, it was cancelled, its workflow is not running, or another
        delivery holds a live lease on it (a duplicate delivery: do nothing).

        The claim sends nothing, so on PostgreSQL it commits without waiting for the WAL
        flush (the transition that follows flushes it) and reads the workflow's state in
        the same round trip: its row, the attempts of ``names`` (the steps a decision
        about this one is likely to touch: others are read if it does) and the values
        of collected data this process has not seen. A claim lost in a database crash
        only means the redelivered task claims again.
        """
        ts = now()
        params = {"b_cid": cid, "b_step": step, "b_attempt": attempt, "b_now": ts,
                  "b_task": task_id, "b_lease": ts + timedelta(seconds=lease),
                  "b_deadline": ts + timedelta(seconds=timeout), "b_worker": worker}
        if self._claims is not None:  # one round trip: autocommit, no flush wait
            seen, revs, values = self._recent.get(cid)
            with self._claims.connect() as conn:
                row = conn.execute(_CLAIM_AND_READ, {**params, "b_names": list(names),
                                                     "b_seen": seen}).first()
            if row is None:
                return None
            rows = _parse(_json_rows(row.x_outputs))
            self._recent.add(cid, seen, rows, max(row.version, _merge(revs, values, rows)))
            attempts = Progress(loaded={r[0]: r[1:] for r in _json_rows(row.x_progress)},
                                complete=False, loader=self._progress_reader(cid))
            attempts.absent(names)
            return Claim(row.id, row.deliveries,
                         _row_to_state(row, Outputs.read(revs, values), attempts))
        with self.engine.begin() as conn:
            row = conn.execute(at.CLAIM, params).first()
            if row is not None:  # (PostgreSQL's claim writes it in its one statement)
                conn.execute(_INSERT_EVENTS, {
                    "correlation_id": cid, "at": ts, "kind": "attempt_started", "step": step,
                    "attempt": attempt, "actor": worker, "version": None,
                    "data": {"delivery": row.deliveries, "task_id": task_id}})
        return None if row is None else Claim(row.id, row.deliveries)

    def record_subtask(self, cid: str, step: str, attempt: int, output: Any,
                       worker: str | None = None) -> tuple[bool, int | None]:
        """A sub-task's success, recorded by itself: (recorded, Celery sub-tasks its
        fan-out still waits for). Not recorded when the attempt is no longer RUNNING
        (cancelled, timed out, abandoned: a late result). The count is None when the
        fan-out is no longer waiting; at 0 or below, the caller applies the fan-in."""
        params = {"b_cid": cid, "b_step": step, "b_attempt": attempt, "b_output": output,
                  "b_now": now()}
        # one transaction: the record, its history row and the fan-out's count-down
        # together or not at all (a record without its count-down would leave the
        # fan-out waiting for ever). On PostgreSQL the claims' pool (no flush wait: a
        # record lost with a crash of the server re-runs the sub-task), in a transaction
        # of its own (that pool autocommits each statement otherwise).
        with (self._claims or self.engine).connect() as raw:
            conn = raw.execution_options(isolation_level="READ COMMITTED") \
                if self._claims is not None else raw
            with conn.begin():
                return self._record_subtask(conn, cid, step, params, worker)

    @staticmethod
    def _record_subtask(conn: sa.Connection, cid: str, step: str, params: dict[str, Any],
                        worker: str | None) -> tuple[bool, int | None]:
        parent = conn.execute(at.RECORD, params).scalar()
        if parent is None:
            return False, None
        conn.execute(_INSERT_EVENTS, {
            "correlation_id": cid, "at": params["b_now"], "kind": "succeeded", "step": step,
            "attempt": params["b_attempt"], "actor": worker, "version": None,
            "data": {"parent": parent}})
        pending = conn.execute(at.COUNT_DOWN, {"b_cid": cid, "b_parent": parent}).scalar()
        return True, pending

    def completed_subtasks(self, cid: str, parent: str) -> dict[str, tuple[int, Any]]:
        """Sub-tasks of fan-out ``parent`` that recorded success: name → (attempt, output)
        of the latest such attempt."""
        with self.engine.connect() as conn:
            rows = conn.execute(at.COMPLETED_SUBTASKS, {"b_cid": cid, "b_parent": parent})
            return {row.step_name: (row.attempt, row.output) for row in rows}

    def renew_leases(self, row_ids: Sequence[int], lease: float) -> int:
        """Extend the leases of these RUNNING attempts (a worker's heartbeat)."""
        if not row_ids:
            return 0
        db = self._claims or self.engine
        with db.begin() as conn:
            return conn.execute(at.RENEW, {"b_ids": list(row_ids),
                                           "b_until": now() + timedelta(seconds=lease)}).rowcount

    def record_response(self, cid: str, step: str, attempt: int,
                        response: dict[str, Any]) -> bool:
        """Keep a model's answer to this attempt (committed on return); False when one
        was kept already (the first wins)."""
        return mr.record(self.engine, cid, step, attempt, response)

    def recorded_response(self, cid: str, step: str, attempt: int) -> dict[str, Any] | None:
        """The model's answer kept for this attempt, if any."""
        return mr.recorded(self.engine, cid, step, attempt)

    def transition(self, cid: str, decide: Decide, state: WorkflowState | None = None,
                   fan_out: FanOut | None = None,
                   names: Sequence[str] | None = None) -> cmd.Decision:
        """Read the workflow, decide, and write the outcome in one transaction; retried
        when another transition got there first. ``state``: a recent read to start from
        (PostgreSQL; its version guards the write).

        ``fan_out(state, plan)`` names the fan-out whose sub-tasks are under way, if any:
        then its sub-tasks' rows are locked and read in the transaction, and the ones
        that recorded their success are handed to ``decide`` as its third argument (a
        sub-task recording its success meanwhile waits for the commit, and finds its
        attempt abandoned if the decision ended the fan-out). ``names``: the steps whose
        attempts to read with the state (others are read when the decision needs them;
        None: all of them)."""
        known = [state]
        box: list[Quota | None] = [None]
        decide = self._with_quota(decide, box)

        def once() -> cmd.Decision:
            try:
                if self._claims is not None:
                    first, known[0] = known[0], None  # a retry reads afresh
                    return self._transition_pg(cid, decide, first, fan_out, names)
                return self._transition_locked(cid, decide, fan_out, names)
            except qt.QuotaRace as exc:
                box[0] = self.quota(exc.client_id)
                raise

        try:
            return self._retrying(cid, once)
        except IntegrityError as exc:
            raise StoreConflict(
                f"workflow {cid}: a row of this transition exists already "
                f"({' '.join(str(exc.orig).split())[:300]}); nothing was written",
                correlation_id=cid) from None

    def transition_if(self, cid: str, step: str, attempt: int, statuses: Sequence[str],
                      decide: Decide, fan_out: FanOut | None = None,
                      parent: str | None = None) -> cmd.Decision:
        """:meth:`transition`, applied only while attempt ``attempt`` of ``step`` is in
        one of ``statuses``; its row stays locked until the commit, so a worker's own
        record of that attempt (a sub-task's success) comes either before (and the
        transition is skipped: ``changed`` False) or after (and finds it finished)."""
        lock = (step_runs.update()
                .where(step_runs.c.correlation_id == cid, step_runs.c.step_name == step,
                       step_runs.c.attempt == attempt, step_runs.c.status.in_(statuses))
                .values(status=step_runs.c.status).returning(step_runs.c.id))
        box: list[Quota | None] = [None]
        decide = self._with_quota(decide, box)

        def once() -> cmd.Decision:
            try:
                return locked_once()
            except qt.QuotaRace as exc:
                box[0] = self.quota(exc.client_id)
                raise

        def locked_once() -> cmd.Decision:
            with self.engine.begin() as conn:
                pre = None
                if parent is not None and fan_out is not None:
                    # the siblings first, as every locking transition takes them
                    pre = (parent, self._settled(conn, cid, parent))
                locked = conn.execute(lock).first() is not None
                state, plan = self._load(conn, cid)
                if not locked:
                    return cmd.Decision(state, changed=False)
                decision = self._decide_and_save(conn, state, plan, decide, fan_out, pre)
            if decision.changed:
                self._saved(decision.state)
            return decision

        return self._retrying(cid, once)

    @staticmethod
    def _with_quota(decide: Decide, box: list[Quota | None]) -> Decide:
        """``decide``, told the client's quota once a write found it exceeded."""
        def decide_knowing(s: WorkflowState, p: Plan, *settled: Any) -> cmd.Decision:
            s.quota = box[0]
            return decide(s, p, *settled)
        return decide_knowing

    def quota(self, client_id: str) -> Quota | None:
        """The client's quota and what is left of it now; None when it has none."""
        with self.engine.connect() as conn:
            return qt.read(conn, client_id, now())

    def set_quota(self, client_id: str, per: str, fuel: int) -> None:
        with self.engine.begin() as conn:
            qt.set_quota(conn, client_id, per, fuel, now())

    def remove_quota(self, client_id: str) -> bool:
        with self.engine.begin() as conn:
            return qt.remove_quota(conn, client_id)

    @staticmethod
    def _retrying(cid: str, once: Callable[[], cmd.Decision]) -> cmd.Decision:
        """``once()``, again while another transition got there first (StaleState), or
        its charges met the client's quota (decided again knowing what is left)."""
        for tries in range(_MAX_RETRIES):
            try:
                return once()
            except (StaleState, qt.QuotaRace) as exc:
                log.debug("transition of %s retried (%s), attempt %d", cid, exc, tries + 1,
                          extra={"correlation_id": cid})
        raise StaleState(f"workflow {cid}: too much contention, gave up after "
                         f"{_MAX_RETRIES} tries", correlation_id=cid)

    def _transition_locked(self, cid: str, decide: Decide, fan_out: FanOut | None,
                           names: Sequence[str] | None = None) -> cmd.Decision:
        """A transition in one transaction (any database), reading a fan-out's sub-tasks
        under lock when ``fan_out`` names one."""
        with self.engine.begin() as conn:
            current, plan = self._load(conn, cid, names)
            decision = self._decide_and_save(conn, current, plan, decide, fan_out)
        if decision.changed:
            self._saved(decision.state)
        return decision

    def _decide_and_save(self, conn: sa.Connection, state: WorkflowState, plan: Plan,
                         decide: Decide, fan_out: FanOut | None,
                         read: tuple[str, dict[str, tuple[int, Any]]] | None = None
                         ) -> cmd.Decision:
        """Decide (with the fan-out's settled sub-tasks, read under lock, when
        ``fan_out`` names one; ``read``: a fan-out's already read in this transaction)
        and write the outcome in ``conn``'s transaction."""
        fan = fan_out(state, plan) if fan_out is not None else None
        if fan is None:
            decision = decide(state, plan)
        else:
            settled = (read[1] if read is not None and read[0] == fan
                       else self._settled(conn, state.correlation_id, fan))
            decision = decide(state, plan, settled)
        if decision.changed:
            self._save(conn, decision, state.version)
            qt.charge(conn, state.client_id, _fuel(decision), now())
        return decision

    @staticmethod
    def _settled(conn: sa.Connection, cid: str, fan: str) -> dict[str, tuple[int, Any]]:
        """Lock fan-out ``fan``'s sub-task rows until the commit; those that recorded
        their success: name → (attempt, output) of the latest such attempt."""
        out: dict[str, tuple[int, Any]] = {}
        for row in conn.execute(_LOCK_SUBTASKS, {"b_cid": cid, "b_parent": fan}):
            if row.status == "COMPLETED" and row.attempt >= out.get(row.step_name, (0,))[0]:
                out[row.step_name] = (row.attempt, row.output)
        return out

    def _transition_pg(self, cid: str, decide: Decide, known: WorkflowState | None,
                       fan_out: FanOut | None,
                       names: Sequence[str] | None = None) -> cmd.Decision:
        """Read (autocommit; skipped when the claim already read it), then every write
        in one statement (during a fan-out that ``fan_out`` names: the locking way)."""
        plan = self._plans.get(cid, known.created_at) if known is not None else None
        if known is not None and plan is not None:
            state = known
        else:
            with self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                state, plan = self._load(conn, cid, names)
        if fan_out is not None and fan_out(state, plan) is not None:
            return self._transition_locked(cid, decide, fan_out)
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            decision = decide(state, plan)
            if decision.changed:
                s, ts = decision.state, now()
                values = {**_state_values(s, state.version + 1), "updated_at": ts}
                try:
                    written = pg.write(conn, values, cid, state.version,
                                       rows_for(s, decision.commands, ts, _fuel(decision),
                                                state.version + 1))
                except sa.exc.DBAPIError as exc:
                    if qt.is_refusal(exc):
                        raise qt.QuotaRace(s.client_id) from None
                    raise
                if not written:
                    raise StaleState(f"workflow {cid} moved past version {state.version}")
                s.version = state.version + 1
                self._saved(s)
            return decision

    def _load(self, conn: sa.Connection, cid: str,
              names: Sequence[str] | None = None) -> tuple[WorkflowState, Plan]:
        """The workflow's state and plan, read in ``conn``: its collected data whole
        (what this process has not seen of it), and the attempts of ``names`` (None:
        all of them; any other is read when asked for)."""
        # what this process keeps first: it is no newer than the row read next, so in
        # one snapshot (a REPEATABLE READ status) state and data agree
        kept = self._recent.get(cid)
        plan = self._plans.get(cid)
        row = conn.execute(_LOAD if plan is not None else _LOAD_WITH_PLAN,
                           {"b_cid": cid}).first()
        if row is None:
            raise WorkflowNotFound(f"no workflow with correlation_id {cid}", correlation_id=cid)
        if plan is not None and self._plans.get(cid, row.created_at) is None:
            plan = None  # the same id, another workflow (pruned, then started again)
            row = conn.execute(_LOAD_WITH_PLAN, {"b_cid": cid}).first()
            if row is None:
                raise WorkflowNotFound(f"no workflow with correlation_id {cid}",
                                       correlation_id=cid)
        if plan is None:
            plan = parse_plan(row._mapping["plan"])
            self._plans.put(cid, plan, row.created_at)
        outputs = Outputs.read(*self._outputs_of(cid, row.version, conn, kept))
        if names is None:
            attempts = Progress(loaded=self._read_progress(conn, cid, None))
        else:
            attempts = Progress(loaded=self._read_progress(conn, cid, names), complete=False,
                                loader=self._progress_reader(cid))
            attempts.absent(names)
        return _row_to_state(row, outputs, attempts), plan

    def cached_plan(self, cid: str) -> Plan | None:
        """The workflow's plan if this process has read it (no database access)."""
        return self._plans.get(cid)

    # ------------------------------------------------- collected data, attempts

    def _outputs_of(self, cid: str, version: int, conn: sa.Connection | None = None,
                    kept: tuple[int, dict[str, int], dict[str, Any]] | None = None
                    ) -> tuple[dict[str, int], dict[str, Any]]:
        """(revs, values) of the workflow's collected data, as of ``version`` at least:
        what this process keeps (``kept``: as taken before the state was read), and
        what was written since (read in ``conn``, or on a connection of its own)."""
        seen, revs, values = kept if kept is not None else self._recent.get(cid)
        params = {"b_cid": cid, "b_seen": seen}

        def read(c: sa.Connection) -> list[OutputRow]:
            if self._claims is not None:  # PostgreSQL: JSONB as text is exact
                return _parse(c.execute(_NEW_OUTPUTS, params).all())
            return [(n, int(r), v, len(json.dumps(v, separators=(",", ":"))))
                    for n, r, v in c.execute(_NEW_OUTPUT_VALUES, params).all()]

        if conn is None:
            with (self._claims or self.engine).connect() as own:
                rows = read(own)
        else:
            rows = read(conn)
        self._recent.add(cid, seen, rows, max(version, _merge(revs, values, rows)))
        return revs, values

    @staticmethod
    def _read_progress(conn: sa.Connection, cid: str,
                       names: Sequence[str] | None) -> dict[str, list[int]]:
        if names is not None and not names:
            return {}
        q = _ALL_PROGRESS if names is None else _SOME_PROGRESS
        params: dict[str, Any] = {"b_cid": cid}
        if names is not None:
            params["b_names"] = list(names)
        return {r.name: [r.attempt, r.base, r.scheduled] for r in conn.execute(q, params)}

    def _progress_reader(self, cid: str) -> Callable[[Sequence[str] | None],
                                                      dict[str, list[int]]]:
        """Reads attempts for a state read earlier, when a decision asks for one that
        was not read with it (the transition's version check covers any change since)."""
        def read(names: Sequence[str] | None) -> dict[str, list[int]]:
            with (self._claims or self.engine).connect() as conn:
                return self._read_progress(conn, cid, names)
        return read

    def _saved(self, s: WorkflowState) -> None:
        """A transition to ``s.version`` committed: keep the values it set (the steps
        that follow are likely run by this process), and start afresh."""
        outputs = s.collected_data
        rows = []
        for name, value in outputs.written.items():
            # kept as stored: a copy in plain JSON, not the caller's object (which it may
            # change later; a tuple would be a list once read back)
            text = json.dumps(value, separators=(",", ":"))
            rows.append((name, outputs.revs[name], json.loads(text), len(text)))
        self._recent.add(s.correlation_id, s.version - 1, rows, s.version)
        outputs.saved()
        s.attempts.saved()

    def _save(self, conn: sa.Connection, decision: cmd.Decision, version: int) -> None:
        s = decision.state
        ts = now()
        res = conn.execute(_SAVE, {**_state_values(s, version + 1),
                                   "b_cid": s.correlation_id, "b_version": version,
                                   "updated_at": ts})
        if res.rowcount != 1:
            raise StaleState(f"workflow {s.correlation_id} moved past version {version}")
        s.version = version + 1
        self._apply(conn, s, decision.commands, ts)

    def _apply(self, conn: sa.Connection, s: WorkflowState, commands: Sequence[cmd.Command],
               ts: datetime, version: int | None = None) -> None:
        """Write the rows the commands call for (sending happens after commit)."""
        rows = rows_for(s, commands, ts, version=version)
        cid = {"b_cid": s.correlation_id}
        for stmt, params in ((_DELETE_OUTPUT, [{**cid, "b_name": r["name"]}
                                               for r in rows.collected]),
                             (_INSERT_OUTPUTS, rows.collected),
                             (_DELETE_PROGRESS, [{**cid, "b_name": r["name"]}
                                                 for r in rows.progress]),
                             (_INSERT_PROGRESS, rows.progress),
                             (_INSERT_LEDGER, rows.ledger), (_INSERT_RUNS, rows.runs),
                             (_LEDGER_USAGE, rows.usage),
                             (_SENT, [{**cid, **p} for p in rows.sent]),
                             (_FINISH, [{**cid, **p} for p in rows.finished]),
                             (_INSERT_OUTBOX, rows.messages),
                             (_INSERT_EVENTS, rows.history)):
            if params:
                conn.execute(stmt, params)

    # ------------------------------------------------------------------ reading

    def owner(self, cid: str) -> str | None:
        """The client owning the workflow; None when there is no such workflow."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(orchestrator_state.c.client_id).where(
                orchestrator_state.c.correlation_id == cid)).scalar()

    def plan_ref(self, cid: str) -> tuple[str | None, int | None]:
        """(registered plan name, version) the workflow started from; Nones for a plan
        given as a document or file."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(orchestrator_state.c.plan_name,
                                         orchestrator_state.c.plan_version).where(
                orchestrator_state.c.correlation_id == cid)).first()
        return (row.plan_name, row.plan_version) if row else (None, None)

    def exists(self, cid: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(orchestrator_state.c.version).where(
                orchestrator_state.c.correlation_id == cid)).first() is not None

    def get(self, cid: str, names: Sequence[str] | None = None) -> WorkflowState:
        """The workflow's state (``names``: read only these steps' attempts with it;
        the others when asked for)."""
        with self.engine.connect() as conn:
            return self._load(conn, cid, names)[0]

    def get_plan(self, cid: str) -> Plan:
        with self.engine.connect() as conn:
            return self._load(conn, cid)[1]

    def snapshot(self, cid: str) -> tuple[WorkflowState, list[dict[str, Any]], Plan,
                                          list[dict[str, Any]]]:
        """(state, step rows, plan, refused messages) read together: on PostgreSQL in
        one REPEATABLE READ transaction, so the rows and the state agree (a status
        document never shows a step done that the state still has to do)."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                state, plan = self._load(conn, cid)
                return state, self._steps(conn, cid), plan, self._refused(conn, cid)

    def steps(self, cid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return self._steps(conn, cid)

    @staticmethod
    def _steps(conn: sa.Connection, cid: str) -> list[dict[str, Any]]:
        rows = conn.execute(sa.select(step_runs).where(step_runs.c.correlation_id == cid)
                            .order_by(step_runs.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def ledger(self, cid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(fuel_ledger).where(fuel_ledger.c.correlation_id == cid)
                                .order_by(fuel_ledger.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def traceparent(self, cid: str) -> str | None:
        """The trace context of the workflow's root span (None: not traced, or no such
        workflow)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(orchestrator_state.c.traceparent).where(
                orchestrator_state.c.correlation_id == cid)).scalar()

    def events(self, cid: str) -> list[dict[str, Any]]:
        """The workflow's event history, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(workflow_events).where(
                workflow_events.c.correlation_id == cid).order_by(workflow_events.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def refused_messages(self, cid: str) -> list[dict[str, Any]]:
        """The workflow's outgoing messages Kafka refused for good (set aside)."""
        with self.engine.connect() as conn:
            return self._refused(conn, cid)

    @staticmethod
    def _refused(conn: sa.Connection, cid: str) -> list[dict[str, Any]]:
        rows = conn.execute(sa.select(outbox.c.topic, outbox.c.payload, outbox.c.last_error,
                                      outbox.c.failed_at)
                            .where(outbox.c.correlation_id == cid,
                                   outbox.c.failed_at.is_not(None))
                            .order_by(outbox.c.id)).all()
        return [{"topic": r.topic, "event_type": (r.payload or {}).get("event_type")
                 if isinstance(r.payload, dict) else None, "error": r.last_error,
                 "failed_at": r.failed_at} for r in rows]

    def outbox_for(self, cid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(outbox).where(outbox.c.correlation_id == cid)
                                .order_by(outbox.c.id)).all()
        return [dict(r._mapping) for r in rows]

    # ------------------------------------------------------------------ the sweep

    def due(self, limit: int) -> list[at.Stuck]:
        """SCHEDULED attempts whose retry time has come."""
        with self.engine.connect() as conn:
            return at.due(conn, now(), limit)

    def unclaimed(self, sent_before: datetime, limit: int) -> list[at.Stuck]:
        """DISPATCHED attempts sent before ``sent_before`` that no worker started."""
        with self.engine.connect() as conn:
            return at.unclaimed(conn, sent_before, limit)

    def lost(self, limit: int) -> list[at.Stuck]:
        """RUNNING attempts whose lease expired: their worker is gone."""
        with self.engine.connect() as conn:
            return at.lost(conn, now(), limit)

    def overdue(self, default_timeout: float, limit: int) -> list[at.Stuck]:
        """Attempts past their deadline (an agent's request without one: past
        ``default_timeout`` seconds)."""
        ts = now()
        with self.engine.connect() as conn:
            return at.overdue(conn, ts, ts - timedelta(seconds=default_timeout), limit)

    def unanswered(self, sent_before: datetime, limit: int) -> list[at.Stuck]:
        """Agents' requests sent before ``sent_before`` and not answered yet."""
        with self.engine.connect() as conn:
            return at.unanswered(conn, sent_before, limit)

    def mark_asked_again(self, row: at.Stuck) -> bool:
        """Count one more request for ``row`` (an agent's attempt), if it is still as it
        was seen; False when another sweep (or the answer) got there first."""
        with self.engine.begin() as conn:
            return at.mark_asked_again(conn, row)

    def waiting_fan_ins(self, unchanged_for: float, limit: int) -> list[tuple[str, str]]:
        """(workflow, fan_out step) whose sub-tasks all succeeded but were never
        collected, the workflow unchanged for ``unchanged_for`` seconds."""
        with self.engine.connect() as conn:
            return at.waiting_fan_ins(conn, now() - timedelta(seconds=unchanged_for), limit)

    def stalled(self, unchanged_for: float, limit: int) -> list[tuple[str, str]]:
        """(workflow, step) of RUNNING workflows awaiting nothing for ``unchanged_for``
        seconds (dependencies that never came)."""
        with self.engine.connect() as conn:
            return at.stalled(conn, now() - timedelta(seconds=unchanged_for), limit)

    def mark_resent(self, row: at.Stuck) -> bool:
        """Record that the sweep sends ``row`` again, if it is still as it was seen;
        False when another sweep (or the worker) got there first."""
        ts = now()
        with self.engine.begin() as conn:
            if not at.mark_resent(conn, row, ts):
                return False
            why = ("its worker was lost" if row.status == StepStatus.RUNNING.value
                   else "it was not taken" if row.status == StepStatus.DISPATCHED.value
                   else "it was due")
            conn.execute(_INSERT_EVENTS, {
                "correlation_id": row.correlation_id, "at": ts, "kind": "resent",
                "step": row.step, "attempt": row.attempt, "actor": "sweep", "version": None,
                "data": {"why": why, "was": row.status, "sends": row.sends + 1}})
            return True

    def list(self, status: str | None = None, limit: int = 50,
             client_id: str | None = None) -> list[WorkflowState]:
        """Recent workflows, newest first (of ``client_id`` only, when given)."""
        q = sa.select(*_STATE_COLS).order_by(orchestrator_state.c.created_at.desc()).limit(limit)
        if status:
            q = q.where(orchestrator_state.c.status == status)
        if client_id is not None:
            q = q.where(orchestrator_state.c.client_id == client_id)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [_row_to_state(r, self._lazy_outputs(str(r.correlation_id), r.version),
                              Progress(complete=False,
                                       loader=self._progress_reader(str(r.correlation_id))))
                for r in rows]

    def runs(self, *, client_id: str | None = None, status: str | None = None,
             plan: str | None = None, since: datetime | None = None,
             after: tuple[datetime, str] | None = None,
             limit: int = 50) -> builtins.list[dict[str, Any]]:
        """A page of workflows, newest first, as summaries (no outputs nor attempts):
        of ``client_id`` only, in ``status``, of registered plan (or plan name)
        ``plan``, started at ``since`` or later; ``after``: (created_at,
        correlation_id) of the last row of the page before."""
        t = orchestrator_state.c
        q = sa.select(t.correlation_id, t.client_id, t.project_id, t.status, t.current_step,
                      t.error, t.plan_name, t.plan_version, t.plan["name"].label("plan_title"),
                      t.fuel_budget, t.fuel_spent, t.created_at, t.updated_at, t.version) \
            .order_by(t.created_at.desc(), t.correlation_id.desc()).limit(limit)
        if client_id is not None:
            q = q.where(t.client_id == client_id)
        if status:
            q = q.where(t.status == status)
        if plan:
            q = q.where(sa.or_(t.plan_name == plan,
                               sa.and_(t.plan_name.is_(None),
                                       t.plan["name"].as_string() == plan)))
        if since is not None:
            q = q.where(t.created_at >= since)
        if after is not None:
            q = q.where(sa.or_(t.created_at < after[0],
                               sa.and_(t.created_at == after[0],
                                       t.correlation_id < after[1])))
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [{**r, "correlation_id": str(r["correlation_id"]),
                 "plan_title": r["plan_title"] if isinstance(r["plan_title"], str)
                 else None} for r in rows]

    def _lazy_outputs(self, cid: str, version: int) -> Outputs:
        return Outputs(source=lambda: self._outputs_of(cid, version))
