"""The hot path of a linear step, counted: on PostgreSQL one claim and one transition
statement per step, and what they carry does not grow with the workflow (a step late in
a 300-step workflow of 2 KB outputs costs the same statements, of the same size, as an
early one). Run in-process: a real store on PostgreSQL, the engine's own ``run_step``,
messages sent to an in-memory broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from chassis import config
from chassis import coordinator as co
from chassis.engine import Engine, message
from chassis.plan import parse_plan
from chassis.state import Status, WorkflowState
from chassis.store import SqlStore
from chassis.store.db import make_engine

pytestmark = pytest.mark.timeout(120)

STEPS = 300
BLOB = "b" * 2_000


@pytest.fixture
def store(_migrated_postgres_url: str) -> SqlStore:
    """PostgreSQL: the one-claim-one-transition path is PostgreSQL's."""
    return SqlStore(make_engine(_migrated_postgres_url))


class Statements:
    """Every statement the store's engines run, with the size of its parameters."""

    def __init__(self, *engines: sa.Engine) -> None:
        self.seen: list[tuple[str, int]] = []
        self.engines = engines
        for e in engines:
            sa.event.listen(e, "before_cursor_execute", self._on)

    def _on(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
            executemany: bool) -> None:
        self.seen.append((statement.split(None, 1)[0].upper(), len(repr(parameters))))

    def close(self) -> None:
        for e in self.engines:
            sa.event.remove(e, "before_cursor_execute", self._on)


@pytest.fixture
def engine(store: SqlStore) -> Iterator[Engine]:
    settings = config.load({"CHASSIS_DATABASE_URL": str(store.engine.url),
                            "CHASSIS_LEASE_SECONDS": "300"})
    app = Celery("hot-path", broker="memory://", set_as_current=False)
    yield Engine(store, app, settings)
    app.close()


def test_a_linear_step_is_one_claim_and_one_transition_at_any_length(
        store: SqlStore, engine: Engine) -> None:
    plan = parse_plan({"start_step": "s0", "steps": {
        **{f"s{i}": {"action": "echo", "params": {"blob": BLOB},
                     "next_step": f"s{i + 1}" if i + 1 < STEPS else "done"}
           for i in range(STEPS)},
        "done": {"action": "complete_workflow"}}})
    cid = str(uuid.uuid4())
    state = WorkflowState(correlation_id=cid, client_id="c1", status=Status.RUNNING,
                          current_step="s0", fuel_budget=10**6, initial_request_data={})
    assert engine.create(co.decide(state, plan, co.Start()), plan)
    assert store._claims is not None
    counted = Statements(store.engine, store._claims)
    per_step: list[list[tuple[str, int]]] = []
    try:
        for i in range(STEPS):
            s = store.get(cid) if i in (0, STEPS - 1) else None
            if s is not None:
                assert s.current_step == f"s{i}"
            counted.seen.clear()
            run = co.RunStep(f"s{i}", "echo", {"blob": BLOB}, "rid", None, 1, 30.0)
            payload = message(state, run)
            outcome = engine.run_step(payload, f"task-{i}")
            assert outcome.ran and outcome.error is None
            per_step.append(list(counted.seen))
    finally:
        counted.close()
    final = store.get(cid)
    assert final.status is Status.COMPLETED
    assert len(final.collected_data) == STEPS
    for i, seen in enumerate(per_step):
        # the claim (an UPDATE ... RETURNING in a CTE: WITH) and one transition (WITH)
        assert [kind for kind, _ in seen] == ["WITH", "WITH"], (i, seen)
    early = [size for _, size in per_step[5]]
    late = [size for _, size in per_step[-2]]
    # the statements carry a step's output and ids: no more late than early
    assert all(b <= a * 1.1 + 64 for a, b in zip(early, late, strict=True)), (early, late)
