"""``chassis metrics``' figures equal the database's (SQLite and PostgreSQL), served
over HTTP by the real command; ``chassis health`` names the part that fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from chassis import config, engine, metrics
from chassis import coordinator as co
from chassis.api import Client
from chassis.config import Settings
from chassis.state import StepStatus
from chassis.store.db import make_engine
from chassis.store.tables import fuel_ledger, orchestrator_state, outbox, step_runs
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]

LINEAR = {"start_step": "a", "steps": {
    "a": {"action": "echo", "params": {"x": 1}, "next_step": "b"},
    "b": {"action": "sleep", "params": {"seconds": 0.05}, "next_step": "done"},
    "done": {"action": "complete_workflow"}}}
FAILING = {"start_step": "a", "steps": {"a": {"action": "fail", "params": {"message": "no"}}}}
EXTERNAL = {"start_step": "ask", "steps": {"ask": {"action": "research", "topic": "t.r"}}}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(reg: CollectorRegistry) -> Samples:
    from prometheus_client import generate_latest

    return samples(generate_latest(reg).decode())


def run_to_the_end(client: Client, cid: str) -> None:
    """Play the worker: run each dispatched step in this process until none is left."""
    while True:
        state = client.store.get(cid)
        todo = [r for r in client.store.steps(cid) if r["status"] == StepStatus.DISPATCHED]
        if not todo:
            return
        r = todo[0]
        plan = client.store.get_plan(cid)
        step = co.RunStep(r["step_name"], r["action"], dict(plan.steps[r["step_name"]].params),
                          r["request_id"])
        client.engine.run_step(engine.message(state, step), f"task-{r['step_name']}")


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return config.load({"CHASSIS_DATABASE_URL": db_url, "CHASSIS_BROKER_URL": "memory://",
                        "CHASSIS_HOME": str(tmp_path)})


@pytest.fixture
def filled(settings: Settings) -> Settings:
    """Completed, failed, waiting and external workflows of two clients."""
    client = Client(settings)
    for who, plan in (("acme", LINEAR), ("acme", FAILING), ("globex", LINEAR),
                      ("globex", EXTERNAL)):
        run_to_the_end(client, client.start(plan, client_id=who))
    client.start(LINEAR, client_id="initech")  # left DISPATCHED
    return settings


def database_figures(url: str) -> Samples:
    """The same figures, straight from the tables (everything here is recent)."""
    from chassis.state import Status, StepStatus

    out: Samples = {}
    finished = {s.value for s in Status if s.finished}
    ended = {s.value for s in StepStatus if s.finished}
    with make_engine(url).connect() as conn:
        for status, n in conn.execute(sa.select(orchestrator_state.c.status, sa.func.count())
                                      .group_by(orchestrator_state.c.status)):
            name = "workflows_finished_last_hour" if status in finished else "workflows"
            out[(f"agentchassis_{name}", (("status", status),))] = n
        for status, n in conn.execute(sa.select(step_runs.c.status, sa.func.count())
                                      .group_by(step_runs.c.status)):
            name = "step_runs_finished_last_hour" if status in ended else "step_runs"
            out[(f"agentchassis_{name}", (("status", status),))] = n
        for action, amount in conn.execute(
                sa.select(fuel_ledger.c.action, sa.func.sum(fuel_ledger.c.amount))
                .group_by(fuel_ledger.c.action)):
            out[("agentchassis_fuel_spent_last_hour", (("action", action),))] = amount
        for client, amount in conn.execute(
                sa.select(fuel_ledger.c.client_id, sa.func.sum(fuel_ledger.c.amount))
                .group_by(fuel_ledger.c.client_id)):
            out[("agentchassis_fuel_spent_last_hour_by_client",
                 (("client_id", client),))] = amount
        for action, n in conn.execute(
                sa.select(step_runs.c.action, sa.func.count())
                .where(step_runs.c.started_at.is_not(None), step_runs.c.finished_at.is_not(None))
                .group_by(step_runs.c.action)):
            out[("agentchassis_step_duration_seconds_count", (("action", action),))] = n
        out[("agentchassis_outbox_backlog", ())] = conn.execute(
            sa.select(sa.func.count()).select_from(outbox)
            .where(outbox.c.published_at.is_(None))).scalar_one()
    return out


def test_every_figure_equals_the_database(filled: Settings) -> None:
    got = scrape(metrics.registry(filled))
    want = database_figures(filled.database_url)
    assert got[("agentchassis_database_up", ())] == 1
    for key, value in want.items():
        assert got.get(key) == value, key
    # statuses with no workflow are there, at zero
    assert got[("agentchassis_workflows", (("status", "PAUSED_FOR_HUMAN_INPUT"),))] == 0
    assert got[("agentchassis_workflows_finished_last_hour", (("status", "COMPLETED"),))] == 2
    assert ("agentchassis_workflows", (("status", "COMPLETED"),)) not in got  # not under way
    assert got[("agentchassis_fuel_spent_last_hour_by_client",
                (("client_id", "globex"),))] >= 1
    # the sleep steps took at least their 50 ms: not in the 10 ms bucket, in the 2.5 s one
    bucket = "agentchassis_step_duration_seconds_bucket"
    assert got[(bucket, (("action", "sleep"), ("le", "0.01")))] == 0
    assert got[(bucket, (("action", "sleep"), ("le", "2.5")))] == 2
    assert got[("agentchassis_step_duration_seconds_sum", (("action", "sleep"),))] >= 0.1
    assert not any(name.startswith("agentchassis_kafka") for name, _ in got)  # Kafka off
    # the one name kept from the original platform: its AI providers' circuit breakers
    assert got[("circuit_breaker_state", (("provider", "anthropic"),))] == 0
    assert all(name.startswith("agentchassis_") or name == "circuit_breaker_state"
               for name, _ in got)


def test_what_ended_over_an_hour_ago_is_not_counted_and_clients_are_bounded(
        filled: Settings) -> None:
    """History does not weigh on a scrape: work that ended more than an hour ago is out
    of every figure, and only the 10 biggest spenders have their own series."""
    from datetime import timedelta

    from chassis.store.sql import now

    engine = make_engine(filled.database_url)
    old = now() - timedelta(hours=2)
    with engine.begin() as conn:
        conn.execute(orchestrator_state.update().values(updated_at=old)
                     .where(orchestrator_state.c.status == "COMPLETED"))
        conn.execute(step_runs.update().values(finished_at=old, started_at=old)
                     .where(step_runs.c.finished_at.is_not(None)))
        conn.execute(fuel_ledger.update().values(created_at=old))
    got = scrape(metrics.registry(filled))
    assert got[("agentchassis_workflows_finished_last_hour", (("status", "COMPLETED"),))] == 0
    assert got[("agentchassis_step_runs_finished_last_hour", (("status", "COMPLETED"),))] == 0
    assert not any(n == "agentchassis_fuel_spent_last_hour" for n, _ in got)
    assert got[("agentchassis_workflows", (("status", "RUNNING"),))] == 1  # still under way
    client = Client(filled)
    for i in range(12):
        client.start(LINEAR, client_id=f"client-{i:02d}")  # each debits its first step
    got = scrape(metrics.registry(filled))
    series = {labels for n, labels in got if n == "agentchassis_fuel_spent_last_hour_by_client"}
    assert len(series) == 11 and (("client_id", "other"),) in series
    spent = sum(v for (n, _), v in got.items()
                if n == "agentchassis_fuel_spent_last_hour_by_client")
    assert spent == 12  # the top 10 and the rest: every debit of the hour, once


def test_fuel_reserved_is_what_workflows_under_way_hold_per_client_bounded(
        filled: Settings) -> None:
    """Σ held of each client's workflows under way (reserve +, settle and release -);
    a finished workflow's holds are not counted; 10 clients and the rest as other."""
    from chassis.store.sql import now

    engine = make_engine(filled.database_url)
    name = "agentchassis_fuel_reserved_by_client"

    def hold(cid: str, who: str, key: str, held: int, kind: str = "reserve") -> None:
        with engine.begin() as conn:
            conn.execute(fuel_ledger.insert().values(
                correlation_id=cid, client_id=who, step_name="w", action="ai_text_generate",
                amount=0, held=held, kind=kind, model="claude-haiku",
                idempotency_key=f"{cid}:{key}", created_at=now()))

    def workflow(who: str, status: str) -> str:
        with engine.connect() as conn:
            return str(conn.execute(sa.select(orchestrator_state.c.correlation_id).where(
                orchestrator_state.c.client_id == who,
                orchestrator_state.c.status == status).limit(1)).scalar_one())

    assert not any(n == name for n, _ in scrape(metrics.registry(filled)))  # none held
    running = workflow("initech", "RUNNING")
    hold(running, "initech", "r1", 40)
    hold(running, "initech", "s1", -12, "settle")
    hold(running, "initech", "x1", -28, "release")  # settled: nothing held
    hold(running, "initech", "r2", 25)
    hold(workflow("acme", "COMPLETED"), "acme", "r1", 99)  # finished: not counted
    got = scrape(metrics.registry(filled))
    assert {labels: v for (n, labels), v in got.items() if n == name} == {
        (("client_id", "initech"),): 25}

    client = Client(filled)
    for i in range(12):
        cid = client.start(LINEAR, client_id=f"client-{i:02d}")
        hold(cid, f"client-{i:02d}", "r", 100 + i)
    got = scrape(metrics.registry(filled))
    held = {dict(labels)["client_id"]: v for (n, labels), v in got.items() if n == name}
    assert len(held) == 11 and held["other"] == 25 + 100 + 101  # the 3 smallest
    assert held["client-11"] == 111 and held["client-02"] == 102 and "client-01" not in held
    assert sum(held.values()) == 25 + sum(100 + i for i in range(12))


def test_an_unreachable_database_is_reported_not_raised(tmp_path: Path) -> None:
    s = config.load({"CHASSIS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                     "CHASSIS_HOME": str(tmp_path)})
    assert scrape(metrics.registry(s)) == {("agentchassis_database_up", ()): 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def metrics_process(filled: Settings, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "CHASSIS_DATABASE_URL": filled.database_url,
           "CHASSIS_HOME": str(tmp_path), "CHASSIS_METRICS_PORT": str(port)}
    env.pop("CHASSIS_KAFKA_BOOTSTRAP", None)
    proc = subprocess.Popen([sys.executable, "-m", "chassis", "metrics", "--host", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_metrics_command_serves_the_same_figures(metrics_process: str,
                                                     filled: Settings) -> None:
    text = wait_until(lambda: urllib.request.urlopen(metrics_process, timeout=5).read(),
                      timeout=30, ignore=(OSError,), message="metrics endpoint not up")
    got = samples(text.decode())
    for key, value in database_figures(filled.database_url).items():
        assert got.get(key) == value, key


# ---------------------------------------------------------------------------- health


def health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CHASSIS_")}
    return subprocess.run([sys.executable, "-m", "chassis", "health", "--timeout", "3"],
                          cwd=ROOT, env={**full, **env}, capture_output=True, text=True,
                          timeout=60)


def test_health_is_ok_with_a_migrated_database_and_a_running_broker(
        db_url: str, redis_url: str, tmp_path: Path) -> None:
    done = health({"CHASSIS_DATABASE_URL": db_url, "CHASSIS_BROKER_URL": redis_url,
                   "CHASSIS_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("database: ok") and "revision" in lines[0]
    assert lines[1] == f"broker: ok, {redis_url}"
    assert lines[2] == "kafka: ok, off (CHASSIS_KAFKA_BOOTSTRAP is not set)"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_health_fails_naming_the_broker_when_redis_is_unreachable(
        db_url: str, tmp_path: Path) -> None:
    done = health({"CHASSIS_DATABASE_URL": db_url, "CHASSIS_HOME": str(tmp_path),
                   "CHASSIS_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 1
    assert "broker: cannot connect to redis://127.0.0.1:1/0: " in done.stderr
    assert "error: unhealthy: broker" in done.stderr
    assert done.stdout.startswith("database: ok")


def test_health_fails_naming_a_database_that_is_not_migrated(empty_db_url: str,
                                                              tmp_path: Path) -> None:
    done = health({"CHASSIS_DATABASE_URL": empty_db_url, "CHASSIS_HOME": str(tmp_path)})
    assert done.returncode == 1
    assert "run `chassis db upgrade`" in done.stderr
    assert "error: unhealthy: database" in done.stderr
