"""The store suite, run on SQLite and on PostgreSQL: idempotency is the database's."""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from chassis import coordinator as co
from chassis.errors import InvalidTransition, WorkflowNotFound
from chassis.plan import Plan, Step, SubTask
from chassis.state import Status, WorkflowState
from chassis.store import SqlStore
from chassis.store.db import make_engine
from chassis.store.tables import fuel_ledger, orchestrator_state, outbox

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


def test_claim_counts_attempts_and_refuses_a_finished_step(store: SqlStore) -> None:
    cid = new_workflow(store)
    assert store.claim_step(cid, "a", "t1") == 1
    assert store.claim_step(cid, "a", "t1") == 2  # redelivered after a crash
    apply(store, cid, co.StepSucceeded("a", {"ok": 1}))
    assert store.claim_step(cid, "a", "t1") is None  # duplicate of a finished step
    assert store.claim_step(cid, "nope", "t1") is None


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
    apply(store, cid, co.SubtasksSucceeded("fan", {"x": {"v": 1}, "y": {"v": 2}},
                                           started={"x": "2026-01-01T00:00:00+00:00"}))
    state = store.get(cid)
    assert state.status is Status.PAUSED_FOR_HUMAN_INPUT
    steps = {r["step_name"]: r for r in store.steps(cid)}
    assert steps["x"]["status"] == "COMPLETED" and steps["x"]["attempts"] == 1
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
