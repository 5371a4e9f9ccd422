"""Collected data and attempts one row per name (migration 0006), on SQLite and on
PostgreSQL: a transition writes the values and attempts it changes, never the whole
collection; the workflow's row stays the same size however long the workflow; a
process reads only what was written since it last looked, and a value written again is
never served stale."""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa

from chassis import coordinator as co
from chassis.plan import parse_plan
from chassis.state import Status, WorkflowState
from chassis.store import SqlStore
from chassis.store.db import make_engine
from chassis.store.tables import orchestrator_state, step_attempts, step_outputs

pytestmark = pytest.mark.timeout(60)

STEPS = 40
PLAN = parse_plan({"start_step": "s0", "steps": {
    **{f"s{i}": {"action": "echo", "next_step": f"s{i + 1}" if i + 1 < STEPS else "fix",
                 "on_failure": "fix"} for i in range(STEPS)},
    "fix": {"action": "echo", "next_step": "done"},
    "done": {"action": "complete_workflow"}}})


@pytest.fixture
def store(db_url: str) -> SqlStore:
    return SqlStore(make_engine(db_url))


def start(store: SqlStore) -> str:
    cid = str(uuid.uuid4())
    state = WorkflowState(correlation_id=cid, client_id="c1", status=Status.RUNNING,
                          current_step="s0", fuel_budget=10_000, initial_request_data={})
    assert store.create(co.decide(state, PLAN, co.Start()), PLAN)
    return cid


def rows(store: SqlStore, cid: str) -> dict[str, tuple[int, object]]:
    with store.engine.connect() as conn:
        return {r.name: (r.rev, r.value) for r in conn.execute(
            sa.select(step_outputs).where(step_outputs.c.correlation_id == cid))}


def state_row_bytes(store: SqlStore, cid: str) -> int:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(orchestrator_state)
                           .where(orchestrator_state.c.correlation_id == cid)).one()
    return len(json.dumps(list(row), default=str))


def attempts(store: SqlStore, cid: str) -> dict[str, list[int]]:
    with store.engine.connect() as conn:
        return {r.name: [r.attempt, r.base, r.scheduled] for r in conn.execute(
            sa.select(step_attempts).where(step_attempts.c.correlation_id == cid))}


def test_each_step_writes_its_own_value_and_the_row_stays_small(store: SqlStore) -> None:
    cid = start(store)
    blob = "z" * 5_000
    sizes = []
    for i in range(STEPS):
        d = store.transition(cid, lambda s, p, i=i: co.decide(
            s, p, co.StepSucceeded(f"s{i}", {"blob": blob, "i": i})))
        assert d.state.version == i + 2
        got = rows(store, cid)
        assert len(got) == i + 1
        assert got[f"s{i}"] == (i + 2, {"blob": blob, "i": i})  # rev: the version that wrote it
        assert all(got[f"s{k}"][0] == k + 2 for k in range(i))  # older rows untouched
        sizes.append(state_row_bytes(store, cid))
    # the workflow's row does not grow with the steps it has run (one more digit in
    # a step's name and the version aside)
    assert max(sizes) - min(sizes) <= 8, sizes
    assert attempts(store, cid) == {f"s{i}": [1, 0, 0] for i in range(STEPS)} | {
        "fix": [1, 0, 0]}
    fresh = SqlStore(store.engine)  # another process: nothing kept
    state = fresh.get(cid, names=["fix"])
    assert state.collected_data.revs == {f"s{i}": i + 2 for i in range(STEPS)}
    assert state.step_data("fix")[f"s{STEPS - 1}"] == {"blob": blob, "i": STEPS - 1}
    assert not state.attempts.complete and state.attempts["s3"] == [1, 0, 0]
    assert state.attempts == attempts(store, cid)  # read whole when iterated


RECOVER = parse_plan({"start_step": "a", "steps": {
    "a": {"action": "echo", "on_failure": "b", "next_step": "c"},
    "b": {"action": "echo", "on_failure": "c", "next_step": "c"},
    "c": {"action": "echo", "next_step": "done"},
    "done": {"action": "complete_workflow"}}})


def test_a_value_written_again_is_read_anew_in_every_process(store: SqlStore) -> None:
    """``error`` is written by a's failure, then again by b's (its on_failure path): a
    process that had read (and cached) the first value reads the second."""
    cid = str(uuid.uuid4())
    state = WorkflowState(correlation_id=cid, client_id="c1", status=Status.RUNNING,
                          current_step="a", fuel_budget=100, initial_request_data={})
    assert store.create(co.decide(state, RECOVER, co.Start()), RECOVER)
    other = SqlStore(store.engine)
    store.transition(cid, lambda s, p: co.decide(s, p, co.StepFailed("a", "first", 1)))
    assert other.get(cid).step_data("b")["error"]["message"].endswith("first")
    store.transition(cid, lambda s, p: co.decide(s, p, co.StepFailed("b", "second", 1)))
    assert other.get(cid).step_data("c")["error"]["message"].endswith("second")
    d = store.transition(cid, lambda s, p: co.decide(s, p, co.StepSucceeded("c", {"ok": 1})))
    assert d.state.status is Status.COMPLETED
    state = other.get(cid)
    assert state.final_result == state.collected_data.to_dict()
    assert state.final_result["error"]["message"].endswith("second")
    assert rows(store, cid)["error"][0] == state.collected_data.revs["error"] == 3


def test_status_snapshot_reads_values_with_the_state(store: SqlStore) -> None:
    cid = start(store)
    store.transition(cid, lambda s, p: co.decide(s, p, co.StepSucceeded("s0", [1, None])))
    state, runs, _plan, _refused = SqlStore(store.engine).snapshot(cid)
    assert state.collected_data.to_dict() == {"s0": [1, None]}
    assert [r["step_name"] for r in runs] == ["s0", "s1"]


def test_a_claim_reads_what_was_written_since_this_process_looked(store: SqlStore) -> None:
    """Another process moves the workflow on; this one's next read brings the values
    written meanwhile, and the attempts of the steps named (others when asked)."""
    cid = start(store)
    worker = SqlStore(store.engine)
    claim = worker.claim(cid, "s0", 1, "t0", lease=15, timeout=60, names=["s0", "s1"])
    assert claim is not None and claim.state is not None or worker.get(cid)
    state = claim.state or worker.get(cid, ["s0", "s1"])
    assert dict(state.collected_data) == {}
    assert state.attempts.get("s0") == [1, 0, 0] and "s1" not in state.attempts
    for i in range(3):  # elsewhere
        store.transition(cid, lambda s, p, i=i: co.decide(
            s, p, co.StepSucceeded(f"s{i}", {"i": i})))
    claim = worker.claim(cid, "s3", 1, "t3", lease=15, timeout=60, names=["s3", "s4"])
    state = (claim.state if claim is not None and claim.state is not None
             else worker.get(cid, ["s3", "s4"]))
    assert state.collected_data.to_dict() == {f"s{i}": {"i": i} for i in range(3)}
    assert state.attempts.get("s3") == [1, 0, 0] and state.attempts.get("s1") == [1, 0, 0]
    d = worker.transition(cid, lambda s, p: co.decide(s, p, co.StepSucceeded("s3", 3)),
                          state, names=["s3", "s4"])
    assert d.state.attempts.get("s4") == [1, 0, 0]
    assert attempts(store, cid)["s4"] == [1, 0, 0]
    assert rows(store, cid)["s3"] == (d.state.version, 3)


def test_what_a_process_keeps_is_a_copy_of_what_was_stored(store: SqlStore) -> None:
    """The values a transition set are kept as stored (plain JSON), not as the caller's
    objects: changing them afterwards, or handing a tuple, changes nothing read later."""
    cid = start(store)
    feedback = {"notes": ["ok"], "pair": (1, 2)}
    store.transition(cid, lambda s, p: co.decide(s, p, co.StepSucceeded("s0", feedback)))
    feedback["notes"].append("changed later")
    here, fresh = store.get(cid), SqlStore(store.engine).get(cid)
    assert here.step_data("s1")["s0"] == fresh.step_data("s1")["s0"] == {
        "notes": ["ok"], "pair": [1, 2]}
    doc_value = here.collected_data["s0"]
    assert store.get(cid).collected_data["s0"] is not doc_value or doc_value == {
        "notes": ["ok"], "pair": [1, 2]}


def test_an_id_used_again_after_prune_is_a_new_workflow_here_too(store: SqlStore) -> None:
    """A workflow removed (prune) and started again under the same id, with another
    plan: this process, which kept the first one's data and plan, sees only the new."""
    cid = start(store)
    for i in range(3):
        store.transition(cid, lambda s, p, i=i: co.decide(
            s, p, co.StepSucceeded(f"s{i}", f"old-{i}")))
    assert store.get(cid).collected_data.to_dict() == {f"s{i}": f"old-{i}" for i in range(3)}
    with store.engine.begin() as conn:
        conn.execute(orchestrator_state.delete().where(orchestrator_state.c.correlation_id == cid))
    other = parse_plan({"start_step": "x", "steps": {
        "x": {"action": "echo", "next_step": "s1"}, "s1": {"action": "echo", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    state = WorkflowState(correlation_id=cid, client_id="c1", status=Status.RUNNING,
                          current_step="x", fuel_budget=100, initial_request_data={})
    assert store.create(co.decide(state, other, co.Start()), other)
    d = store.transition(cid, lambda s, p: co.decide(s, p, co.StepSucceeded("x", "new")))
    assert d.state.current_step == "s1" and "s1" in store.get_plan(cid).steps
    assert store.get(cid).collected_data.to_dict() == {"x": "new"}
    assert set(store.get_plan(cid).steps) == {"x", "s1", "done"}
