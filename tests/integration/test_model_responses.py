"""Never pay a model twice for one attempt: an AI step's answer is recorded as soon as it
arrives, keyed by workflow, step and attempt, and the same attempt delivered again uses
it instead of calling again. On SQLite and PostgreSQL (the store, ``generate`` with the
real anthropic SDK against a local Messages API server), and with a real worker
SIGKILLed between the answer and the step's transition (PostgreSQL, Redis, beat)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from chassis import config
from chassis import coordinator as co
from chassis.actions import Attempt, attempt_context, current_attempt
from chassis.ai.actions import generate
from chassis.plan import parse_plan
from chassis.state import Status, WorkflowState
from chassis.store import SqlStore
from chassis.store.db import make_engine
from chassis.store.prune import prune
from chassis.store.tables import model_responses, orchestrator_state
from tests.fakes.anthropic_server import FakeAnthropic, message
from tests.helpers import wait_until
from tests.integration.conftest import Services

pytestmark = pytest.mark.timeout(180)

PLAN = parse_plan({"start_step": "write", "steps": {
    "write": {"action": "ai_text_generate_claude_haiku", "params": {"prompt": "p"},
              "next_step": "done"},
    "done": {"action": "complete_workflow"}}})
OUTPUT = {"text": "Hi.", "model": "m", "stop_reason": "end_turn",
          "usage": {"input_tokens": 3, "output_tokens": 2}, "provider": "anthropic"}


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(claude: FakeAnthropic) -> None:
    claude.reset()


def ai_env(claude: FakeAnthropic) -> dict[str, str]:
    return {"ANTHROPIC_BASE_URL": claude.url, "ANTHROPIC_API_KEY": "test-key",
            "CHASSIS_AI_PROVIDER": "anthropic", "CHASSIS_AI_MAX_RETRIES": "0",
            "CHASSIS_AI_TIMEOUT": "20"}


@pytest.fixture
def store(db_url: str) -> SqlStore:
    return SqlStore(make_engine(db_url))


def started(store: SqlStore) -> str:
    cid = str(uuid.uuid4())
    s = WorkflowState(correlation_id=cid, client_id="c1", status=Status.RUNNING,
                      current_step=PLAN.start_step, fuel_budget=100)
    assert store.create(co.decide(s, PLAN, co.Start()), PLAN)
    return cid


def attempt_of(store: SqlStore, cid: str, step: str = "write", n: int = 1) -> Attempt:
    """The attempt context the engine gives an action (without the waiting for the
    database: this is a test of the store and of ``generate``)."""
    return Attempt(cid, step, n, load=lambda: store.recorded_response(cid, step, n),
                   keep=lambda r: store.record_response(cid, step, n, r))


def kept(store: SqlStore, cid: str) -> list[tuple[str, int, dict[str, Any]]]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(model_responses.c.step_name, model_responses.c.attempt,
                                      model_responses.c.response)
                            .where(model_responses.c.correlation_id == cid)
                            .order_by(model_responses.c.step_name, model_responses.c.attempt))
        return [(r.step_name, r.attempt, r.response) for r in rows]


# ------------------------------------------------------------------ the store


def test_the_first_response_of_an_attempt_is_kept_and_read_back(store: SqlStore) -> None:
    cid = started(store)
    assert store.recorded_response(cid, "write", 1) is None
    assert store.record_response(cid, "write", 1, OUTPUT) is True
    assert store.record_response(cid, "write", 1, {**OUTPUT, "text": "other"}) is False
    assert store.recorded_response(cid, "write", 1) == OUTPUT  # the first wins
    assert store.recorded_response(cid, "write", 2) is None  # per attempt
    assert store.recorded_response(cid, "other", 1) is None  # per step
    assert store.recorded_response(str(uuid.uuid4()), "write", 1) is None


def test_pruning_a_workflow_removes_and_counts_its_responses(store: SqlStore) -> None:
    cid = started(store)
    store.record_response(cid, "write", 1, OUTPUT)
    store.record_response(cid, "write", 2, OUTPUT)
    # finished: the AI step and complete_workflow
    store.transition(cid, lambda s, p: co.decide(s, p, co.StepSucceeded("write", OUTPUT, 1)))
    store.transition(cid, lambda s, p: co.decide(s, p, co.StepSucceeded("done", {}, 1)))
    assert store.get(cid).status is Status.COMPLETED
    dry = prune(store.engine, timedelta(0), kafka=False, dry_run=True)
    assert (dry.workflows, dry.model_responses) == (1, 2)
    assert len(kept(store, cid)) == 2  # a dry run removes nothing
    report = prune(store.engine, timedelta(0), kafka=False)
    assert (report.workflows, report.model_responses) == (1, 2)
    assert report.counts()["model_responses"] == 2
    assert kept(store, cid) == []


# ------------------------------------------------------------------ generate()


def test_a_recorded_response_is_returned_without_a_request(
        store: SqlStore, claude: FakeAnthropic) -> None:
    settings = config.load(ai_env(claude))
    claude.default = message("Paid for once.", input_tokens=30, output_tokens=4)
    cid = started(store)

    def call(attempt: Attempt, prompt: str = "Write about {{ input.topic }}.") -> Any:
        with attempt_context(attempt):
            assert current_attempt() is attempt
            return generate("ai_text_generate", {"input": {"topic": "Celery"}},
                            {"prompt": prompt}, "claude-haiku-5-5", settings)

    first = call(attempt_of(store, cid))
    assert current_attempt() is None  # only inside the block
    assert first == {"text": "Paid for once.", "model": "claude-haiku-5-5",
                     "stop_reason": "end_turn",
                     "usage": {"input_tokens": 30, "output_tokens": 4},
                     "provider": "anthropic"}
    assert len(claude.requests) == 1
    [(step, n, response)] = kept(store, cid)
    assert (step, n) == ("write", 1)
    assert {k: v for k, v in response.items() if k != "request_sha256"} == first
    # the same attempt delivered again: the recorded answer, no request
    claude.default = message("Paid for twice!")
    assert call(attempt_of(store, cid)) == first
    assert len(claude.requests) == 1
    # another attempt of the step is another request (and its own record)
    assert call(attempt_of(store, cid, n=2))["text"] == "Paid for twice!"
    assert len(claude.requests) == 2
    # a different request in the same attempt is never answered with the recorded text
    assert call(attempt_of(store, cid), prompt="Something else.")["text"] == "Paid for twice!"
    assert len(claude.requests) == 3
    assert [(s, n) for s, n, _ in kept(store, cid)] == [("write", 1), ("write", 2)]
    assert kept(store, cid)[0][2]["text"] == "Paid for once."  # the first still wins


def test_without_an_attempt_generate_calls_every_time_and_records_nothing(
        store: SqlStore, claude: FakeAnthropic) -> None:
    settings = config.load(ai_env(claude))
    cid = started(store)
    assert current_attempt() is None
    outputs = [generate("ai_text_generate", {}, {"prompt": "p"}, "claude-haiku-5-5",
                        settings) for _ in range(2)]
    assert outputs[0] == outputs[1] and outputs[0]["text"] == "Hello from the fake Messages API."
    assert len(claude.requests) == 2
    assert kept(store, cid) == []


# ------------------------------------------------------------------ a worker killed


def blocked_by(conn: sa.Connection, pid: int) -> list[int]:
    """Backends waiting for a lock that ``pid`` holds."""
    return list(conn.execute(sa.text(
        "SELECT pid FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
        {"pid": pid}).scalars())


def test_a_worker_killed_after_the_answer_arrived_never_pays_twice(
        services: Services, claude: FakeAnthropic) -> None:
    """The answer is recorded, the worker dies before the step's transition commits;
    the redelivered attempt completes the workflow with the recorded text and the
    Messages API server has had one request."""
    for w in services.workers:  # (another test's worker would take the work)
        w.stop()
    fast = {"CHASSIS_LEASE_SECONDS": "2", "CHASSIS_SWEEP_INTERVAL": "0.5"}
    # workers that talk to the fake server (stopped with the module's others)
    ai = Services({**services.env, **ai_env(claude), **fast}, services.tmp, services.workers)
    claude.default = message("Recorded once.", input_tokens=21, output_tokens=5)
    services.start_beat(**fast)
    client = services.client()
    plan = {"start_step": "write", "steps": {
        "write": {"action": "ai_text_generate_claude_haiku",
                  "params": {"prompt": "Write about {{ input.topic }}."}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    # no worker yet: the step's task waits in the queue
    cid = client.start(plan, {"topic": "Celery"}, client_id="acme", fuel_budget=100)
    db = make_engine(services.env["CHASSIS_DATABASE_URL"])
    holder = db.connect()
    lock = holder.begin()
    # hold the workflow's row: the worker's transition (an UPDATE of it) waits, the
    # response's insert (its foreign key check: FOR KEY SHARE) does not
    holder.execute(sa.text("SELECT 1 FROM orchestrator_state WHERE correlation_id = :c "
                           "FOR NO KEY UPDATE"), {"c": cid}).one()
    pid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    try:
        first = ai.start_worker(concurrency=1)
        with db.connect() as conn:
            wait_until(lambda: conn.execute(
                sa.select(sa.func.count()).select_from(model_responses)
                .where(model_responses.c.correlation_id == cid)).scalar_one() == 1,
                timeout=60, message="the response was never recorded")
            wait_until(lambda: blocked_by(conn, pid), timeout=60,
                       message="the worker's transition never came")
            assert len(claude.requests) == 1
            first.kill()
            # a dead worker's transaction never commits: end the one waiting on our lock
            # (a backend blocked on a lock notices its client is gone only afterwards)
            for other in blocked_by(conn, pid):
                conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": other})
            wait_until(lambda: not blocked_by(conn, pid), timeout=30,
                       message="the dead worker's statement is still waiting")
    finally:
        lock.rollback()
        holder.close()
    with db.connect() as conn:
        status = conn.execute(sa.select(orchestrator_state.c.status).where(
            orchestrator_state.c.correlation_id == cid)).scalar_one()
    assert status == "RUNNING"  # the step's outcome was never recorded
    second = ai.start_worker(concurrency=1)
    doc = client.wait(cid, timeout=90, until={"COMPLETED", "FAILED"})
    assert doc["status"] == "COMPLETED", doc
    assert doc["final_result"]["write"] == {
        "text": "Recorded once.", "model": "claude-haiku-5-5", "stop_reason": "end_turn",
        "usage": {"input_tokens": 21, "output_tokens": 5}, "provider": "anthropic"}
    assert len(claude.requests) == 1  # paid once
    write = next(s for s in doc["steps"] if s["name"] == "write")
    # the same attempt, delivered again
    assert write["attempts"] == 1 and write["history"][0]["deliveries"] == 2
    assert "using the model response recorded by an earlier delivery" in second.text()
    # charged once: one ledger row of each kind for the step (debit, or reserve, settle
    # and release), its usage the recorded one
    rows = [e for e in client.ledger(cid) if e["step"] == "write"]
    assert len({e["kind"] for e in rows}) == len(rows), rows
    assert all(e["usage"] in (None, {"input_tokens": 21, "output_tokens": 5}) for e in rows
               if e["kind"] != "reserve"), rows
    db.dispose()
