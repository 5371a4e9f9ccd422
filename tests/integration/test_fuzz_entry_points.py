"""Fuzzing the entry points that write, on SQLite and PostgreSQL: the Python API's start
(what the CLI's options and a Kafka start end in) and the Celery tasks' requests (resume,
cancel, retry, an agent's answer). Each call is accepted, or refused with the documented
error and nothing written; never a traceback of another kind, never a partial write."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chassis import config, inbox
from chassis.api import Client
from chassis.errors import InputError, PlanError, WorkflowNotFound
from chassis.store.db import make_engine
from chassis.store.tables import fuel_ledger, orchestrator_state, outbox, step_runs
from tests.unit.test_fuzz_boundaries import JSON, ODD_TEXT

pytestmark = pytest.mark.timeout(600)

PLAN = {"start_step": "review", "steps": {
    "review": {"action": "pause_for_human_input", "next_step": "done"},
    "done": {"action": "complete_workflow"}}}
SLOW = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def counts(url: str) -> tuple[int, ...]:
    with make_engine(url).connect() as conn:
        return tuple(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                     for t in (orchestrator_state, step_runs, fuel_ledger, outbox))


@pytest.fixture
def acme(db_url: str, tmp_path: Path) -> Client:
    return Client(config.load({"CHASSIS_DATABASE_URL": db_url, "CHASSIS_BROKER_URL": "memory://",
                               "CHASSIS_HOME": str(tmp_path)}), client_id="acme")


@SLOW
@given(input_=JSON, client_id=st.one_of(st.none(), ODD_TEXT),
       fuel=st.one_of(st.integers(-5, 2**40), ODD_TEXT, st.floats(allow_nan=True)),
       cid=st.one_of(st.none(), ODD_TEXT, st.just(str(uuid.uuid4()))),
       project=st.one_of(st.none(), ODD_TEXT))
def test_start_accepts_or_refuses_cleanly(acme: Client, db_url: str, input_: Any,
                                          client_id: Any, fuel: Any, cid: Any,
                                          project: Any) -> None:
    before = counts(db_url)
    try:
        started = acme.start(PLAN, input_, client_id=client_id, fuel_budget=fuel,
                             correlation_id=cid, project_id=project)
    except (InputError, PlanError) as exc:
        assert str(exc)
        assert counts(db_url) == before  # refused: nothing written
        return
    assert acme.store.get(started).client_id == (client_id or "acme").strip()


@SLOW
@given(approved=st.one_of(st.booleans(), JSON), feedback=JSON,
       client_id=st.one_of(st.none(), st.just("acme"), st.just("evil"), ODD_TEXT),
       cid=st.one_of(st.none(), ODD_TEXT), which=st.sampled_from(["resume", "cancel",
                                                                   "retry", "respond"]),
       data=JSON, success=st.one_of(st.booleans(), JSON), error=st.one_of(st.none(), JSON))
def test_celery_requests_are_applied_or_refused_cleanly(
        acme: Client, db_url: str, approved: Any, feedback: Any, client_id: Any, cid: Any,
        which: str, data: Any, success: Any, error: Any) -> None:
    target = acme.start(PLAN, None)
    version = acme.store.get(target).version
    engine = acme.engine
    real = cid if cid is not None else target
    try:
        if which == "resume":
            inbox.resume(engine, real, approved, feedback, client_id)
        elif which == "cancel":
            inbox.cancel(engine, real, feedback, client_id)
        elif which == "retry":
            inbox.retry(engine, real, client_id)
        else:
            inbox.respond(engine, real, acme.store.get(target).rid("review"), success, data,
                          error, None, client_id)
    except (InputError, WorkflowNotFound) as exc:
        assert str(exc)
        assert acme.store.get(target).version == version  # refused: unchanged
        return
    after = acme.store.get(target)
    if not (isinstance(client_id, str) and client_id.strip() == "acme"):
        pytest.fail(f"{which} by {client_id!r} was applied to acme's workflow")
    assert after.version >= version
