"""The store suite, run on SQLite and on PostgreSQL: idempotency is the database's."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from chassis import coordinator as co
from chassis.errors import InvalidTransition, WorkflowNotFound
from chassis.plan import Plan, Step, SubTask, parse_plan
from chassis.state import Status, WorkflowState
from chassis.store import SqlStore
from chassis.store.db import make_engine
from chassis.store.sql import now
from chassis.store.tables import fuel_ledger, orchestrator_state, outbox, step_runs

pytestmark = pytest.mark.timeout(60)

PLAN = Plan("a", {"a": Step("echo", next_step="fan"),
                  "fan": Step("fan_out", next_step="review", sub_tasks=(
                      SubTask("x", action="noop"), SubTask("y", action="noop"))),
                  "review": Step("pause_for_human_input", next_step="done"),
                  "done": Step("complete_workflow")})


def new_workflow(store: SqlStore, cid: str | None = None) -> str:
    cid = cid or str(uuid.uuid4())
    state = WorkflowState(correlation_id=cid, client_id="c1", status=Status.RUNNING,
                          current_step="a", fuel_budget=100, initial_request_data={"q": 1})
    assert store.create(co.decide(state, PLAN, co.Start()), PLAN)
    return cid


def apply(store: SqlStore, cid: str, event: co.Event) -> co.Decision:
    return store.transition(cid, lambda s, p: co.decide(s, p, event))


def count(store: SqlStore, table: sa.Table, cid: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)
                            .where(table.c.correlation_id == cid)).scalar_one()


@pytest.fixture
def store(db_url: str) -> SqlStore:
    return SqlStore(make_engine(db_url))


def test_create_is_idempotent_by_correlation_id(store: SqlStore) -> None:
    cid = new_workflow(store)
    state = WorkflowState(correlation_id=cid, client_id="other", status=Status.RUNNING,
                          current_step="a", fuel_budget=5)
    assert not store.create(co.decide(state, PLAN, co.Start()), PLAN)
    got = store.get(cid)
    assert got.client_id == "c1" and got.fuel_spent == 1 and got.version == 1
    assert count(store, fuel_ledger, cid) == 1
    assert store.get_plan(cid) == PLAN


def claim(store: SqlStore, cid: str, step: str = "a", attempt: int = 1,
          lease: float = 30) -> int | None:
    got = store.claim(cid, step, attempt, "t1", lease=lease, timeout=60)
    return None if got is None else got.deliveries


def run_row(store: SqlStore, cid: str, step: str, attempt: int = 1) -> dict[str, object]:
    return next(r for r in store.steps(cid) if (r["step_name"], r["attempt"]) == (step, attempt))


def expire_lease(store: SqlStore, cid: str, step: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(step_runs.update().where(step_runs.c.correlation_id == cid,
                                              step_runs.c.step_name == step)
                     .values(lease_until=now() - timedelta(seconds=1)))


def test_a_claim_holds_a_lease_and_refuses_duplicates_while_it_lives(store: SqlStore) -> None:
    cid = new_workflow(store)
    assert claim(store, cid) == 1
    row = run_row(store, cid, "a")
    assert row["status"] == "RUNNING" and row["lease_until"] > now()
    assert row["deadline"] > now() + timedelta(seconds=50)
    assert claim(store, cid) is None  # a duplicate while the worker lives
    expire_lease(store, cid, "a")
    assert claim(store, cid) == 2  # the worker was lost: redelivered, same attempt
    assert store.renew_leases([row["id"]], 30) == 1
    apply(store, cid, co.StepSucceeded("a", {"ok": 1}))
    assert claim(store, cid) is None  # duplicate of a finished attempt
    assert claim(store, cid, "nope") is None
    assert store.renew_leases([row["id"]], 30) == 0  # finished: nothing to renew


def test_claims_of_a_cancelled_workflow_are_refused(store: SqlStore) -> None:
    cid = new_workflow(store)
    apply(store, cid, co.Cancel("stop"))
    assert claim(store, cid) is None
    assert run_row(store, cid, "a")["status"] == "CANCELLED"


RETRYING = parse_plan({"start_step": "a", "steps": {
    "a": {"action": "flaky", "retry": {"max_attempts": 3, "initial_interval": 600},
          "next_step": "fan"},
    "fan": {"action": "fan_out", "next_step": "done", "sub_tasks": [
        {"step_name": "x", "action": "noop"}, {"step_name": "y", "action": "noop"}]},
    "done": {"action": "complete_workflow"}}})


def retrying_workflow(store: SqlStore) -> str:
    cid = str(uuid.uuid4())
    state = WorkflowState(correlation_id=cid, client_id="c1", status=Status.RUNNING,
                          current_step="a", fuel_budget=100)
    assert store.create(co.decide(state, RETRYING, co.Start()), RETRYING)
    return cid


def test_every_attempt_has_its_row_and_its_debit(store: SqlStore) -> None:
    cid = retrying_workflow(store)
    assert claim(store, cid) == 1
    apply(store, cid, co.StepFailed("a", "flaked", 1, ("ValueError",)))
    first, second = run_row(store, cid, "a", 1), run_row(store, cid, "a", 2)
    assert (first["status"], first["error"], first["error_type"]) == (
        "FAILED", "flaked", "ValueError")
    assert second["status"] == "SCHEDULED" and second["due_at"] > now() + timedelta(seconds=250)
    assert [e["idempotency_key"] for e in store.ledger(cid)] == [f"{cid}:a", f"{cid}:a#2"]
    assert store.due(10) == []
    with store.engine.begin() as conn:
        conn.execute(step_runs.update().where(step_runs.c.id == second["id"])
                     .values(due_at=now() - timedelta(seconds=1)))
    (due,) = store.due(10)
    assert (due.step, due.attempt) == ("a", 2)
    apply(store, cid, co.RetryDue("a", 2))
    assert run_row(store, cid, "a", 2)["status"] == "DISPATCHED"
    assert claim(store, cid, attempt=1) is None  # the old attempt is over
    assert claim(store, cid, attempt=2) == 1
    state = store.get(cid)
    assert state.attempts["a"] == [2, 0, 0]
    assert sum(e["amount"] for e in store.ledger(cid)) == state.fuel_spent == 2


def test_a_sub_tasks_record_is_all_or_nothing(store: SqlStore) -> None:
    """Found by the chaos run: on PostgreSQL the record, its history row and the
    fan-out's count-down were three autocommitted statements, and a worker lost between
    them left the fan-out waiting for ever. The count-down failing (as a crash there
    would) must leave nothing recorded, so that the sub-task runs again."""
    cid = retrying_workflow(store)
    claim(store, cid)
    apply(store, cid, co.StepSucceeded("a", {}, 1))
    claim(store, cid, "x")
    with store.engine.begin() as conn:  # the history insert fails for this workflow
        if store.engine.dialect.name == "postgresql":
            conn.execute(sa.text(
                "CREATE FUNCTION chaos_refuse() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"))
            conn.execute(sa.text(
                "CREATE TRIGGER chaos_refuse BEFORE INSERT ON workflow_events FOR EACH ROW "
                "WHEN (NEW.kind = 'succeeded') EXECUTE FUNCTION chaos_refuse()"))
        else:
            conn.execute(sa.text(
                "CREATE TRIGGER chaos_refuse BEFORE INSERT ON workflow_events "
                "WHEN NEW.kind = 'succeeded' BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    try:
        with pytest.raises(sa.exc.DBAPIError, match="refused"):
            store.record_subtask(cid, "x", 1, {"v": 1})
    finally:
        with store.engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER chaos_refuse"
                                 + (" ON workflow_events" if store.engine.dialect.name ==
                                    "postgresql" else "")))
            if store.engine.dialect.name == "postgresql":
                conn.execute(sa.text("DROP FUNCTION chaos_refuse()"))
    assert run_row(store, cid, "x")["status"] == "RUNNING"  # not recorded: it runs again
    assert run_row(store, cid, "fan")["pending"] == 2
    assert store.record_subtask(cid, "x", 1, {"v": 1}) == (True, 1)  # then it counts


def test_sub_tasks_record_themselves_and_the_last_one_counts_down_to_zero(
        store: SqlStore) -> None:
    cid = retrying_workflow(store)
    claim(store, cid)
    apply(store, cid, co.StepSucceeded("a", {}, 1))
    assert run_row(store, cid, "fan")["pending"] == 2
    assert store.record_subtask(cid, "x", 1, {"v": 1}) == (False, None)  # not claimed
    claim(store, cid, "x")
    claim(store, cid, "y")
    assert store.record_subtask(cid, "x", 1, {"v": 1}) == (True, 1)
    assert store.record_subtask(cid, "x", 1, {"v": 1}) == (False, None)  # twice: once
    assert store.record_subtask(cid, "y", 1, {"v": 2}) == (True, 0)
    assert store.completed_subtasks(cid, "fan") == {"x": (1, {"v": 1}), "y": (1, {"v": 2})}
    assert store.waiting_fan_ins(0, 10) == [(cid, "fan")]
    d = apply(store, cid, co.SubtasksSucceeded("fan", {"x": {"v": 1}, "y": {"v": 2}},
                                               {"x": 1, "y": 1}))
    assert d.state.status is Status.COMPLETED
    assert run_row(store, cid, "fan")["status"] == "COMPLETED"
    assert store.waiting_fan_ins(0, 10) == []


@pytest.mark.parametrize("event", [co.StepFailed("x", "no", 1), co.Cancel("stop")])
def test_a_fan_out_ends_with_every_sub_task_row_finished(store: SqlStore,
                                                        event: co.Event) -> None:
    """Failing or cancelling a fan-out finishes several attempt rows at once."""
    cid = retrying_workflow(store)
    claim(store, cid)
    apply(store, cid, co.StepSucceeded("a", {}, 1))
    claim(store, cid, "x")
    d = apply(store, cid, event)
    assert d.state.status in (Status.FAILED, Status.CANCELLED)
    rows = {(r["step_name"], r["attempt"]): r["status"] for r in store.steps(cid)}
    end = "FAILED" if isinstance(event, co.StepFailed) else "CANCELLED"
    assert rows[("fan", 1)] == end and rows[("y", 1)] == "CANCELLED"
    assert rows[("x", 1)] == ("FAILED" if end == "FAILED" else "CANCELLED")
    assert [type(c) for c in d.commands if isinstance(c, co.Revoke)] == [co.Revoke]


def test_a_guarded_transition_skips_an_attempt_that_finished_meanwhile(
        store: SqlStore) -> None:
    cid = retrying_workflow(store)
    claim(store, cid)
    apply(store, cid, co.StepSucceeded("a", {}, 1))
    claim(store, cid, "x")
    assert store.record_subtask(cid, "x", 1, {"v": 1}) == (True, 1)
    late = store.transition_if(cid, "x", 1, ["RUNNING"], lambda s, p: co.decide(
        s, p, co.StepFailed("x", "timed out after 5 s", 1, ("StepTimeout",))))
    assert not late.changed
    assert run_row(store, cid, "x")["status"] == "COMPLETED"
    claim(store, cid, "y")
    failed = store.transition_if(cid, "y", 1, ["RUNNING"], lambda s, p: co.decide(
        s, p, co.StepFailed("y", "timed out after 5 s", 1, ("StepTimeout",))))
    assert failed.changed and failed.state.status is Status.FAILED
    assert store.record_subtask(cid, "y", 1, {"v": 2}) == (False, None)  # late: ignored


def test_the_sweep_finds_lost_unclaimed_and_overdue_attempts(store: SqlStore) -> None:
    cid = new_workflow(store)
    (unclaimed,) = store.unclaimed(now() + timedelta(seconds=1), 10)
    assert (unclaimed.step, unclaimed.status, unclaimed.sends) == ("a", "DISPATCHED", 0)
    assert store.unclaimed(now() - timedelta(seconds=60), 10) == []
    assert store.mark_resent(unclaimed)
    assert not store.mark_resent(unclaimed)  # a second sweep saw the same row: no-op
    claim(store, cid, lease=30)
    assert store.lost(10) == [] and store.overdue(3600, 10) == []
    expire_lease(store, cid, "a")
    (lost,) = store.lost(10)
    assert (lost.step, lost.deliveries) == ("a", 1)
    with store.engine.begin() as conn:
        conn.execute(step_runs.update().where(step_runs.c.correlation_id == cid)
                     .values(deadline=now() - timedelta(seconds=1)))
    assert [r.step for r in store.overdue(3600, 10)] == ["a"]
    apply(store, cid, co.Cancel())
    assert store.lost(10) == [] and store.overdue(3600, 10) == []


def test_a_replayed_event_writes_nothing(store: SqlStore) -> None:
    cid = new_workflow(store)
    first = apply(store, cid, co.StepSucceeded("a", {"ok": 1}))
    assert first.changed
    ledger, version = store.ledger(cid), store.get(cid).version
    again = apply(store, cid, co.StepSucceeded("a", {"ok": 2}))
    assert not again.changed
    assert store.ledger(cid) == ledger and store.get(cid).version == version
    assert store.get(cid).collected_data["a"] == {"ok": 1}


def test_the_ledger_refuses_a_second_debit_for_a_step(store: SqlStore) -> None:
    cid = new_workflow(store)
    row = {"correlation_id": cid, "client_id": "c1", "step_name": "a", "action": "echo",
           "amount": 1, "idempotency_key": f"{cid}:a", "created_at": sa.func.now()}
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(fuel_ledger.insert().values(**row))
    assert sum(e["amount"] for e in store.ledger(cid)) == store.get(cid).fuel_spent == 1


def test_fan_out_pause_resume_complete_keeps_ledger_equal_to_spent(store: SqlStore) -> None:
    cid = new_workflow(store)
    d = apply(store, cid, co.StepSucceeded("a", {}))
    assert [type(c) for c in d.commands if isinstance(c, co.RunFanOut)] == [co.RunFanOut]
    for name, value in (("x", 1), ("y", 2)):
        claim(store, cid, name)
        store.record_subtask(cid, name, 1, {"v": value})
    apply(store, cid, co.SubtasksSucceeded("fan", {"x": {"v": 1}, "y": {"v": 2}}))
    state = store.get(cid)
    assert state.status is Status.PAUSED_FOR_HUMAN_INPUT
    steps = {r["step_name"]: r for r in store.steps(cid)}
    assert steps["x"]["status"] == "COMPLETED" and steps["x"]["attempt"] == 1
    assert steps["x"]["started_at"] is not None and steps["fan"]["status"] == "COMPLETED"
    notes = store.outbox_for(cid)
    assert [m["payload"]["event_type"] for m in notes] == ["WORKFLOW_PAUSED_FOR_APPROVAL"]
    apply(store, cid, co.Resume(True, {"ok": True}))
    state = store.get(cid)
    assert state.status is Status.COMPLETED
    assert state.final_result["human_feedback"] == {"ok": True}
    assert sum(e["amount"] for e in store.ledger(cid)) == state.fuel_spent == 1 + 7 + 1
    assert count(store, outbox, cid) == 2


def test_a_refused_transition_changes_nothing(store: SqlStore) -> None:
    cid = new_workflow(store)
    version = store.get(cid).version
    with pytest.raises(InvalidTransition):
        apply(store, cid, co.Resume(True, {"x": 1}))
    assert store.get(cid).version == version
    with pytest.raises(WorkflowNotFound):
        apply(store, str(uuid.uuid4()), co.Start())


def test_concurrent_transitions_apply_once(store: SqlStore) -> None:
    """Two deliveries of the same event race: the version column lets one through."""
    cid = new_workflow(store)
    barrier = threading.Barrier(4)
    results: list[bool] = []

    def deliver() -> None:
        barrier.wait()
        results.append(apply(store, cid, co.StepSucceeded("a", {"n": 1})).changed)

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False, False, False, True]
    assert store.get(cid).version == 2
    assert count(store, fuel_ledger, cid) == 1 + 3  # a, then fan_out and its two sub-tasks
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(orchestrator_state.c.fuel_spent).where(
            orchestrator_state.c.correlation_id == cid)).scalar_one() == 8
