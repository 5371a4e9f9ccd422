"""Every workflow reaches a final status, promptly, through outages, with default
settings (one prefork worker and beat): a worker SIGKILLed, a Redis restarted empty,
PostgreSQL stopped for 15 s, a broker unreachable when a workflow starts. Redis and
PostgreSQL here are the tests' own instances, never the shared ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from chassis import config
from chassis.api import Client
from chassis.store.db import dispose_engines, make_engine, upgrade
from chassis.store.tables import fuel_ledger, step_runs
from tests.conftest import PostgresServer
from tests.helpers import wait_until
from tests.integration.conftest import ROOT, Services
from tests.services import OwnPostgres, OwnRedis, free_port

pytestmark = pytest.mark.timeout(300)

WORKFLOWS = 20
CHASSIS = Path(sys.executable).parent / "chassis"


def three_steps(seconds: float = 0.5) -> dict[str, Any]:
    steps: dict[str, Any] = {
        f"s{i}": {"action": "count", "params": {"key": uuid.uuid4().hex, "seconds": seconds},
                  "next_step": f"s{i + 1}" if i < 3 else "done"} for i in (1, 2, 3)}
    steps["done"] = {"action": "complete_workflow"}
    return {"start_step": "s1", "steps": steps}


def env_for(db: str, broker: str, home: Path) -> dict[str, str]:
    """Default settings, but for where the database and the broker are."""
    return {"CHASSIS_DATABASE_URL": db, "CHASSIS_BROKER_URL": broker,
            "CHASSIS_ACTION_MODULES": "tests.integration.user_actions",
            "CHASSIS_HOME": str(home), "CHASSIS_TEST_COUNTER_URL": broker,
            "CHASSIS_AI_PROVIDER": "offline"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    r = OwnRedis(tmp_path)
    r.start()
    yield r
    r.kill()


@pytest.fixture
def fresh_db(postgres_server: PostgresServer) -> Iterator[str]:
    url = postgres_server.create_database()
    upgrade(url)
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def deployments() -> Iterator[list[Services]]:
    """Every deployment a test starts; their processes are stopped at its end."""
    made: list[Services] = []
    yield made
    for s in made:
        for w in s.workers:
            w.kill()


@pytest.fixture
def deployment(deployments: list[Services]) -> Any:
    """deployment(db, broker, tmp): beat started; start workers with start_worker."""
    import tests.integration.user_actions  # noqa: F401  (the client validates 'count')

    def make(db: str, broker: str, tmp: Path) -> Services:
        s = Services(env_for(db, broker, tmp / "home"), tmp)
        deployments.append(s)
        s.start_beat()
        return s

    return make


def completed_within(client: Client, cids: list[str], seconds: float) -> float:
    """Seconds until every workflow is COMPLETED (AssertionError after ``seconds``)."""
    began = time.monotonic()

    def all_done() -> bool:
        statuses = [client.status(cid)["status"] for cid in cids]
        assert "FAILED" not in statuses and "CANCELLED" not in statuses, statuses
        return all(s == "COMPLETED" for s in statuses)

    wait_until(all_done, timeout=seconds, interval=0.5, ignore=(sa.exc.OperationalError,),
               message=f"not every workflow COMPLETED within {seconds} s")
    return time.monotonic() - began


def assert_exactly_once(client: Client, cids: list[str]) -> None:
    """Each step one COMPLETED attempt; one debit per attempt; the ledger is the spend."""
    db = make_engine(client.settings.database_url)
    with db.connect() as conn:
        for cid in cids:
            runs = conn.execute(sa.select(step_runs.c.step_name, step_runs.c.attempt,
                                          step_runs.c.status)
                                .where(step_runs.c.correlation_id == cid)).all()
            done = sorted(r.step_name for r in runs if r.status == "COMPLETED")
            assert done == ["done", "s1", "s2", "s3"], runs
            keys = conn.execute(sa.select(fuel_ledger.c.idempotency_key, fuel_ledger.c.amount)
                                .where(fuel_ledger.c.correlation_id == cid)).all()
            assert len({k for k, _ in keys}) == len(keys) == len(runs), (runs, keys)
            doc = client.status(cid)
            assert sum(a for _, a in keys) == doc["fuel"]["spent"] == 4, doc


def test_a_worker_killed_with_twenty_workflows_in_flight(
        fresh_db: str, own_redis: OwnRedis, tmp_path: Path, deployment: Any) -> None:
    s = deployment(fresh_db, own_redis.url, tmp_path)
    first = s.start_worker(concurrency=2)
    client = s.client()
    cids = [client.start(three_steps(), client_id="acme") for _ in range(WORKFLOWS)]
    wait_until(lambda: sum(d["status"] == "COMPLETED" for d in map(client.status, cids)) >= 3,
               timeout=60, message="nothing completed before the kill")
    first.kill()
    s.start_worker(concurrency=2)
    took = completed_within(client, cids, 60)
    print(f"\n[measured] worker SIGKILLed with {WORKFLOWS} workflows in flight: all "
          f"COMPLETED {took:.1f} s after the new worker started")
    assert_exactly_once(client, cids)


def test_a_redis_restarted_empty_mid_run(fresh_db: str, own_redis: OwnRedis,
                                         tmp_path: Path, deployment: Any) -> None:
    s = deployment(fresh_db, own_redis.url, tmp_path)
    worker = s.start_worker(concurrency=2)
    client = s.client()
    cids = [client.start(three_steps(1.0), client_id="acme") for _ in range(WORKFLOWS)]
    wait_until(lambda: sum(d["status"] == "COMPLETED" for d in map(client.status, cids)) >= 2,
               timeout=60, message="nothing completed before the restart")
    own_redis.kill()
    own_redis.start()  # empty: every queued message is gone
    took = completed_within(client, cids, 90)
    print(f"\n[measured] Redis restarted empty with {WORKFLOWS} workflows in flight: all "
          f"COMPLETED {took:.1f} s after it came back")
    assert worker.proc.poll() is None, worker.text()[-3000:]
    assert_exactly_once(client, cids)


def test_the_worker_outlives_a_redis_restart_under_running_steps(
        fresh_db: str, own_redis: OwnRedis, tmp_path: Path, deployment: Any) -> None:
    """Redis goes away while the worker runs steps (their messages unacknowledged) and
    comes back empty: the worker reconnects and finishes them. (kombu's Redis transport
    exited the worker here, "Unrecoverable error: AttributeError(... 'hostname')",
    restoring those messages on a connection it had already dropped.)"""
    s = deployment(fresh_db, own_redis.url, tmp_path)
    worker = s.start_worker(concurrency=2)
    client = s.client()
    plan = {"start_step": "s", "steps": {
        "s": {"action": "sleep", "params": {"seconds": 4}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cids = [client.start(plan, client_id="acme") for _ in range(4)]

    def running() -> int:
        return sum(1 for cid in cids for st in client.status(cid)["steps"]
                   if st["name"] == "s" and st["status"] == "RUNNING")

    wait_until(lambda: running() == 2, timeout=60, interval=0.1,
               message="two steps never ran at once")
    own_redis.kill()
    wait_until(lambda: "Connection to broker lost" in worker.text(), timeout=60,
               interval=0.1, message="the worker did not notice Redis was gone")
    own_redis.start()
    took = completed_within(client, cids, 120)
    print(f"\n[measured] Redis restarted under two running steps: the worker stayed, all "
          f"COMPLETED {took:.1f} s after it came back")
    assert worker.proc.poll() is None, worker.text()[-3000:]
    assert "Unrecoverable error" not in worker.text()


def test_postgresql_stopped_for_fifteen_seconds_mid_run(own_redis: OwnRedis, tmp_path: Path,
                                                        deployment: Any) -> None:
    pg = OwnPostgres()
    try:
        pg.start()
        db = config.normalize_database_url(pg.url)
        upgrade(db)
        s = deployment(db, own_redis.url, tmp_path)
        worker = s.start_worker(concurrency=2)
        client = s.client()
        cids = [client.start(three_steps(1.0), client_id="acme") for _ in range(WORKFLOWS)]
        wait_until(lambda: sum(d["status"] == "COMPLETED"
                               for d in map(client.status, cids)) >= 2,
                   timeout=60, message="nothing completed before the outage")
        pg.stop()
        time.sleep(15)  # the outage itself
        pg.start()
        took = completed_within(client, cids, 90)
        print(f"\n[measured] PostgreSQL stopped 15 s with {WORKFLOWS} workflows in flight: "
              f"all COMPLETED {took:.1f} s after it came back")
        assert_exactly_once(client, cids)
        assert "unreachable while" in worker.text()  # tasks waited for it...
        assert "raised unexpected" not in worker.text()  # ...none failed
        dispose_engines(db)
    finally:
        pg.remove()


def test_a_workflow_started_while_the_broker_is_down_runs_once_it_is_back(
        fresh_db: str, own_redis: OwnRedis, tmp_path: Path, deployment: Any) -> None:
    env = env_for(fresh_db, f"redis://127.0.0.1:{free_port()}/0", tmp_path / "home")
    del env["CHASSIS_ACTION_MODULES"]  # the plan uses built-in actions only
    plan = tmp_path / "plan.json"
    steps: dict[str, Any] = {f"s{i}": {"action": "sleep", "params": {"seconds": 0.1},
                                       "next_step": f"s{i + 1}" if i < 3 else "done"}
                             for i in (1, 2, 3)}
    plan.write_text(json.dumps({"start_step": "s1",
                                "steps": {**steps, "done": {"action": "complete_workflow"}}}))
    run = subprocess.run([str(CHASSIS), "run", str(plan), "--client", "acme"], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 3, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert env["CHASSIS_BROKER_URL"] in lines[0]
    cid = lines[0].split("workflow ")[1].split()[0]
    assert lines[0].endswith(f"repeating the command is safe with --correlation-id {cid}")
    # the same command again is the same workflow (and says so, still exit 3)
    again = subprocess.run([str(CHASSIS), "run", str(plan), "--client", "acme",
                            "--correlation-id", cid, "--json"], cwd=ROOT,
                           env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and cid in again.stdout, again
    # with the real broker, a worker and beat, it goes on by itself
    s = deployment(fresh_db, own_redis.url, tmp_path)
    began = time.monotonic()
    s.start_worker(concurrency=2)
    client = s.client()
    took = completed_within(client, [cid], 90)
    print(f"\n[measured] started while the broker was down: COMPLETED "
          f"{time.monotonic() - began:.1f} s after a worker and beat started ({took:.1f})")
    assert_exactly_once(client, [cid])


def test_on_the_threads_pool_the_sweep_times_an_attempt_out(
        fresh_db: str, own_redis: OwnRedis, tmp_path: Path, deployment: Any) -> None:
    """A thread cannot be interrupted: the sweep fails the attempt past its deadline, the
    retry goes ahead, and the first attempt's late result is ignored."""
    s = deployment(fresh_db, own_redis.url, tmp_path)
    worker = s.start_worker(concurrency=4, pool="threads")
    client = s.client()
    key = uuid.uuid4().hex
    plan = {"start_step": "slow", "steps": {
        "slow": {"action": "flaky", "params": {"key": key, "seconds": 8},
                 "timeout": 2, "retry": {"max_attempts": 2, "initial_interval": 0.1},
                 "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    began = time.monotonic()
    cid = client.start(plan, client_id="acme")
    doc = client.wait(cid, timeout=60)
    print(f"\n[measured] threads pool, 8 s step with timeout 2 s, 2 attempts: FAILED after "
          f"{time.monotonic() - began:.1f} s")
    assert doc["status"] == "FAILED", doc
    assert doc["error"] == "step 'slow' failed after 2 attempts: timed out after 2 s"
    # both actions run on, return, and their tasks end: their results change nothing
    done = [f"chassis.step flaky[{client.store.get(cid).rid('slow', n)}] succeeded"
            for n in (1, 2)]  # (the task shows its action: Celery's shadow name)
    wait_until(lambda: all(line in worker.text() for line in done), timeout=30,
               message="the timed-out actions never returned")
    after = client.status(cid)
    assert after["version"] == doc["version"] and "slow" not in after["collected_data"]
