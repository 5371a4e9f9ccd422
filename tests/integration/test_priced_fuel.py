"""Fuel that means money (issue 15's acceptance), as a user runs it: real Celery workers
on Redis, PostgreSQL, the real anthropic SDK against the fake Messages API, the CLI as a
subprocess."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from chassis import config
from chassis.api import Client
from chassis.errors import InputError
from chassis.store.db import make_engine
from chassis.store.tables import client_usage, outbox
from tests.fakes.anthropic_server import FakeAnthropic, message
from tests.integration.conftest import ROOT, Services, Worker

pytestmark = pytest.mark.timeout(180)
CHASSIS = [sys.executable, "-m", "chassis"]


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@pytest.fixture(scope="module")
def ai_worker(services: Services, claude: FakeAnthropic) -> Iterator[Worker]:
    env = {**services.env, "ANTHROPIC_BASE_URL": claude.url, "ANTHROPIC_API_KEY": "test-key",
           "CHASSIS_AI_PROVIDER": "anthropic", "CHASSIS_AI_BACKOFF": "0.05",
           "CHASSIS_AI_MAX_BACKOFF": "0.2", "CHASSIS_AI_TIMEOUT": "20"}
    worker = Services(env, services.tmp).start_worker(concurrency=8, pool="threads")
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def fresh(claude: FakeAnthropic) -> None:
    claude.reset()


def chassis(services: Services, *args: str,
            client: str = "acme") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHASSIS_")}
    return subprocess.run([*CHASSIS, *args], cwd=ROOT,
                          env={**env, **services.env, "CHASSIS_CLIENT_ID": client},
                          capture_output=True, text=True, timeout=90)


def sums(client: Client, cid: str) -> tuple[int, int]:
    rows = client.ledger(cid)
    return sum(r["amount"] for r in rows), sum(r["held"] for r in rows)


def test_an_ai_steps_net_charge_is_the_documented_price_of_its_usage(
        client: Client, ai_worker: Worker, claude: FakeAnthropic) -> None:
    claude.default = message("Priced.", input_tokens=4000, output_tokens=3000)
    plan = {"start_step": "write", "steps": {
        "write": {"action": "ai_text_generate_claude_haiku",
                  "params": {"prompt": "Hi", "max_tokens": 4000}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = client.start(plan, client_id="acme", fuel_budget=100)
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    rows = [r for r in client.ledger(cid) if r["step"] == "write"]
    # haiku: 4000 in x 1000/M + 3000 out x 5000/M = 4 + 15 = 19; reserved 4000 x 5000/M
    # + the prompt's estimate = 21; the rest released
    assert [(r["kind"], r["amount"], r["held"]) for r in rows] == [
        ("reserve", 0, 21), ("settle", 19, -19), ("release", 0, -2)]
    assert rows[1]["model"] == "claude-haiku-5-5"
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (4000, 3000)
    assert doc["fuel"] == {"budget": 100, "spent": 20, "reserved": 0, "remaining": 80}
    assert sums(client, cid) == (20, 0)


def test_ai_text_generate_with_model_opus_is_priced_as_opus(
        client: Client, ai_worker: Worker, claude: FakeAnthropic) -> None:
    claude.default = message("Opus.", input_tokens=4000, output_tokens=4000)
    plan = {"start_step": "write", "steps": {
        "write": {"action": "ai_text_generate",
                  "params": {"prompt": "Hi", "model": "opus", "max_tokens": 8000}}}}
    cid = client.start(plan, client_id="acme", fuel_budget=1000)
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "COMPLETED", doc
    [seen] = claude.requests
    assert seen.body["model"] == "claude-opus-5-5"
    settle = next(r for r in client.ledger(cid) if r["kind"] == "settle")
    # opus: 4000 x 5000/M + 4000 x 25000/M = 20 + 100 = 120
    assert (settle["amount"], settle["model"]) == (120, "claude-opus-5-5")
    assert sums(client, cid) == (doc["fuel"]["spent"], 0) == (120, 0)


def six_fuel_plan() -> dict[str, Any]:
    steps: dict[str, Any] = {f"s{i}": {"action": "echo", "next_step": f"s{i + 1}"}
                             for i in range(1, 5)}
    steps["s5"] = {"action": "echo", "next_step": "done"}
    steps["done"] = {"action": "complete_workflow"}
    return {"start_step": "s1", "steps": steps}


def test_a_quota_holds_against_ten_concurrent_workflows(
        services: Services, client: Client, ai_worker: Worker) -> None:
    who = f"quota-{uuid.uuid4().hex[:8]}"
    set_ = chassis(services, "quota", "set", who, "--fuel", "30", "--per", "day", "--json")
    assert set_.returncode == 0, set_.stderr
    assert json.loads(set_.stdout) == {"client_id": who, "per": "day", "fuel": 30, "used": 0,
                                       "held": 0, "left": 30}
    mine = Client(config.load(services.env), client_id=who)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        cids = list(pool.map(lambda _: mine.start(six_fuel_plan(), fuel_budget=6), range(10)))
    docs = [mine.wait(cid, timeout=90) for cid in cids]
    done = [d for d in docs if d["status"] == "COMPLETED"]
    failed = [d for d in docs if d["status"] == "FAILED"]
    assert len(done) + len(failed) == 10
    assert len(done) <= 5
    for d in failed:
        assert d["error"].startswith(f"quota exceeded for client '{who}': action "), d["error"]
        assert d["error"].endswith("0 left of 30 per day")
    for d in docs:
        assert sums(mine, d["correlation_id"]) == (d["fuel"]["spent"], 0)
    charged = sum(d["fuel"]["spent"] for d in docs)
    with make_engine(services.env["CHASSIS_DATABASE_URL"]).connect() as conn:
        used = conn.execute(sa.select(client_usage.c.fuel)
                            .where(client_usage.c.client_id == who)).scalar_one()
    assert used == charged == 30  # 60 asked for, never more than 30 charged
    show = chassis(services, "quota", "show", who)
    assert show.returncode == 0
    assert f"{who}: 30 fuel per day, 30 used, 0 held, 0 left" in show.stdout


def test_pause_for_fuel_then_fuel_add_and_approve_completes(
        services: Services, client: Client, worker: Worker) -> None:
    plan = {**six_fuel_plan(), "on_budget_exhausted": "pause"}
    cid = client.start(plan, client_id="acme", fuel_budget=3)
    doc = client.wait(cid, timeout=60)
    assert doc["status"] == "PAUSED_FOR_HUMAN_INPUT", doc
    assert doc["current_step"] == "s4"
    assert doc["paused_for_fuel"]["needed"] == 1 and doc["paused_for_fuel"]["available"] == 0
    with make_engine(services.env["CHASSIS_DATABASE_URL"]).connect() as conn:
        notes = [r.payload for r in conn.execute(sa.select(outbox.c.payload)
                                                 .where(outbox.c.correlation_id == cid))]
    [paused] = [n for n in notes if n["event_type"] == "WORKFLOW_PAUSED_FOR_BUDGET"]
    assert (paused["step"], paused["needed"], paused["available"]) == ("s4", 1, 0)
    shown = chassis(services, "status", cid)
    assert "paused for fuel" in shown.stdout and "needs 1, 0 available" in shown.stdout
    add = chassis(services, "fuel", "add", cid, "20", "--json")
    assert add.returncode == 0, add.stderr
    assert json.loads(add.stdout)["fuel"]["budget"] == 23
    go = chassis(services, "resume", cid, "--approve", "--wait", "--json")
    assert go.returncode == 0, go.stderr
    end = json.loads(go.stdout)
    assert end["status"] == "COMPLETED", end
    assert end["fuel"]["spent"] == 6
    assert sums(client, cid) == (6, 0)


def test_a_rejected_pause_for_fuel_fails_with_the_original_message(
        client: Client, worker: Worker) -> None:
    plan = {**six_fuel_plan(), "on_budget_exhausted": "pause"}
    cid = client.start(plan, client_id="acme", fuel_budget=5)
    assert client.wait(cid, timeout=60)["status"] == "PAUSED_FOR_HUMAN_INPUT"
    doc = client.resume(cid, False)
    assert doc["status"] == "FAILED"
    assert doc["error"] == "insufficient fuel for action 'complete_workflow': have 0, need 1"


def test_bad_amounts_and_windows_are_refused_and_change_nothing(
        services: Services, client: Client, worker: Worker) -> None:
    who = f"bad-{uuid.uuid4().hex[:8]}"
    for args, says in (
            (("quota", "set", who, "--fuel", "-1", "--per", "day"), "whole number from 0"),
            (("quota", "set", who, "--fuel", "2.5", "--per", "day"), "whole number from 0"),
            (("quota", "set", who, "--fuel", "10", "--per", "week"), "'week' is not one of"),
            (("quota", "set", "", "--fuel", "10", "--per", "day"), "client"),
    ):
        proc = chassis(services, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert client.quota(who) == {"client_id": who, "per": None, "fuel": None, "used": None,
                                 "held": None, "left": None}
    cid = client.start(six_fuel_plan(), client_id="acme", fuel_budget=100)
    before = client.status(cid)["fuel"]["budget"]
    for amount in ("-5", "0", "1.5", "ten", "99999999999"):
        proc = chassis(services, "fuel", "add", cid, amount)
        assert proc.returncode == 2, (amount, proc.stderr)
        assert "fuel to add must be a whole number" in proc.stderr
    with pytest.raises(InputError):
        client.add_fuel(cid, True)
    assert client.status(cid)["fuel"]["budget"] == before


def test_a_bad_price_file_stops_commands_before_anything_is_written(
        services: Services, tmp_path: Path) -> None:
    bad = tmp_path / "prices.yaml"
    bad.write_text("models:\n  gpt-4: {input: 1}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHASSIS_")}
    for args in (("fuel", "prices"), ("run", "examples/blog_post.yaml")):
        proc = subprocess.run([*CHASSIS, *args], cwd=ROOT, capture_output=True, text=True,
                              env={**env, **services.env, "CHASSIS_FUEL_PRICES": str(bad)},
                              timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "unknown model 'gpt-4'" in proc.stderr
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"models": {"haiku": {"input": 2000}}}))
    proc = subprocess.run([*CHASSIS, "fuel", "prices", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**env, **services.env, "CHASSIS_FUEL_PRICES": str(good)})
    assert proc.returncode == 0, proc.stderr
    table = json.loads(proc.stdout)
    assert table["models"]["haiku"]["input"] == 2000
    assert table["models"]["opus"]["output"] == 25000
    assert table["source"].endswith("good.json")
