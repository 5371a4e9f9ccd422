"""Fuel reporting on SQLite and PostgreSQL: `chassis ledger ID` shows each row's kind,
held fuel, model and tokens; `chassis fuel report` (and Client.fuel_report) sums the
spend by client, plan, model and day. The ledger's AI rows (reserve, settle, release)
are written here directly, as the coordinator writes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from chassis import config
from chassis.api import Client, parse_since
from chassis.errors import InputError
from chassis.store.tables import fuel_ledger, orchestrator_state
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.timeout(120)

LINEAR = {"start_step": "a", "steps": {
    "a": {"action": "echo", "next_step": "done"},
    "done": {"action": "complete_workflow"}}}
DAY1 = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
#: 20:30 on March 1st at -05:00, 01:30 on March 2nd in UTC: grouped on the UTC day
DAY2 = datetime(2026, 3, 1, 20, 30, tzinfo=timezone(timedelta(hours=-5)))


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Client:
    settings = config.load({"CHASSIS_DATABASE_URL": db_url, "CHASSIS_BROKER_URL": "memory://",
                            "CHASSIS_HOME": str(tmp_path)})
    return Client(settings, client_id="acme")


def row(engine: sa.Engine, cid: str, who: str, key: str, at: datetime, *,
        kind: str = "debit", amount: int = 0, held: int = 0, model: str | None = None,
        usage: Any = None, step: str = "write") -> None:
    """One ledger row, and the workflow's spent fuel, as the coordinator writes them."""
    with engine.begin() as conn:
        conn.execute(fuel_ledger.insert().values(
            correlation_id=cid, client_id=who, step_name=step, action="ai_text_generate",
            amount=amount, held=held, kind=kind, model=model, usage=usage,
            idempotency_key=f"{cid}:{key}", created_at=at))
        conn.execute(orchestrator_state.update()
                     .where(orchestrator_state.c.correlation_id == cid)
                     .values(fuel_spent=orchestrator_state.c.fuel_spent + amount))


def ai_attempt(engine: sa.Engine, cid: str, who: str, at: datetime, model: str,
               reserve: int, used: int, usage: Any, step: str = "write") -> None:
    """An AI attempt's rows: its worst case held, then settled to ``used``."""
    row(engine, cid, who, f"{step}/r", at, kind="reserve", held=reserve, model=model,
        step=step)
    row(engine, cid, who, f"{step}/s", at, kind="settle", amount=used, held=-used,
        model=model, usage=usage, step=step)
    row(engine, cid, who, f"{step}/x", at, kind="release", held=used - reserve,
        model=model, step=step)


@pytest.fixture
def spent(client: Client) -> dict[str, str]:
    """Workflows of acme (a registered plan's, two days) and globex (a file's); each
    start debited 1 for its first step, now."""
    engine = client.store.engine
    cids = {
        "blog": client.start(LINEAR, client_id="acme", plan_name="blog", plan_version=1),
        "file": client.start(LINEAR, client_id="globex"),
    }
    ai_attempt(engine, cids["blog"], "acme", DAY1, "claude-haiku", 40, 12,
               {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 7})
    ai_attempt(engine, cids["blog"], "acme", DAY2, "claude-haiku", 40, 9,
               {"input_tokens": 50, "output_tokens": "lots"}, step="edit")  # not a count
    ai_attempt(engine, cids["file"], "globex", DAY1, "claude-opus", 90, 30,
               {"input_tokens": 1000, "output_tokens": 300})
    return cids


def by_key(groups: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    return {(g["day"], g["client_id"], g["plan"], g["model"]): g for g in groups}


def test_the_report_sums_by_client_plan_model_and_day(client: Client,
                                                      spent: dict[str, str]) -> None:
    today = datetime.now(UTC).date().isoformat()
    groups = client.fuel_report()
    got = by_key(groups)
    assert set(got) == {
        ("2026-03-01", "acme", "blog", "claude-haiku"),
        ("2026-03-01", "globex", "-", "claude-opus"),
        ("2026-03-02", "acme", "blog", "claude-haiku"),
        (today, "acme", "blog", "-"), (today, "globex", "-", "-")}
    assert [g["day"] for g in groups] == sorted(g["day"] for g in groups)  # oldest first
    first = got[("2026-03-01", "acme", "blog", "claude-haiku")]
    assert (first["spent"], first["rows"], first["input_tokens"], first["output_tokens"],
            first["cache_read_input_tokens"], first["cache_creation_input_tokens"]) == (
        12, 1, 100, 20, 7, 0)  # the settle row only: reserve and release charge nothing
    late = got[("2026-03-02", "acme", "blog", "claude-haiku")]
    assert (late["spent"], late["input_tokens"], late["output_tokens"]) == (9, 50, 0)
    assert got[(today, "acme", "blog", "-")]["spent"] == 1  # the first step's debit
    # the report's total is every workflow's spent fuel
    assert sum(g["spent"] for g in groups) == sum(
        client.store.get(cid).fuel_spent for cid in spent.values()) == 1 + 12 + 9 + 1 + 30

    acme = client.fuel_report(client="acme")
    assert {g["client_id"] for g in acme} == {"acme"} and len(acme) == 3
    assert client.fuel_report(client="nobody") == []
    since = client.fuel_report(since="2026-03-02")
    assert {(g["day"], g["client_id"]) for g in since} == {
        ("2026-03-02", "acme"), (today, "acme"), (today, "globex")}
    # a timestamp with its zone: 01:30 UTC is 02:30 at +01:00
    assert by_key(client.fuel_report(since="2026-03-02T02:31:00+01:00")).keys() == {
        (today, "acme", "blog", "-"), (today, "globex", "-", "-")}
    assert client.fuel_report("globex", datetime(2026, 3, 1, 23, 30)) == \
        client.fuel_report("globex", date(2026, 3, 1)) == client.fuel_report("globex")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "", "2026-03-01T25:00",
                                 "0001-01-01T00:00:00+01:00", "2026-03-01\x00", "9" * 200, 42])
def test_a_bad_since_or_client_is_refused(client: Client, bad: Any) -> None:
    with pytest.raises(InputError, match="since must be a date"):
        client.fuel_report(since=bad)
    with pytest.raises(InputError, match="client"):
        client.fuel_report(client="x" * 300)


def test_since_means_utc_without_a_zone() -> None:
    assert parse_since("2026-03-02") == datetime(2026, 3, 2, tzinfo=UTC)
    assert parse_since(" 2026-03-02T10:00 ") == datetime(2026, 3, 2, 10, tzinfo=UTC)
    assert parse_since("2026-03-02T10:00Z") == datetime(2026, 3, 2, 10, tzinfo=UTC)
    assert parse_since("2026-03-02T10:00-02:00") == datetime(2026, 3, 2, 12, tzinfo=UTC)
    assert parse_since(None) is None


def test_the_ledger_shows_each_rows_kind_held_fuel_model_and_tokens(
        client: Client, spent: dict[str, str], db_url: str, tmp_path: Path) -> None:
    cid = spent["blog"]
    entries = client.ledger(cid)
    assert [(e["kind"], e["step"], e["amount"], e["held"], e["model"]) for e in entries] == [
        ("debit", "a", 1, 0, None),
        ("reserve", "write", 0, 40, "claude-haiku"),
        ("settle", "write", 12, -12, "claude-haiku"),
        ("release", "write", 0, -28, "claude-haiku"),
        ("reserve", "edit", 0, 40, "claude-haiku"),
        ("settle", "edit", 9, -9, "claude-haiku"),
        ("release", "edit", 0, -31, "claude-haiku")]
    settle = entries[2]
    assert (settle["input_tokens"], settle["output_tokens"]) == (100, 20)
    assert settle["usage"]["cache_read_input_tokens"] == 7
    assert (entries[5]["input_tokens"], entries[5]["output_tokens"]) == (50, None)
    assert entries[0]["input_tokens"] is None  # no usage

    proc = chassis(db_url, tmp_path, "ledger", cid, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(entries, default=str))
    # a hold not settled yet: reserved until it is
    row(client.store.engine, cid, "acme", "later/r", datetime.now(UTC), kind="reserve",
        held=25, model="claude-haiku", step="later")
    table = chassis(db_url, tmp_path, "ledger", cid)
    assert table.returncode == 0, table.stderr
    for word in ("kind", "held", "model", "tokens in", "tokens out", "settle", "release",
                 "claude-haiku"):
        assert word in table.stdout, word
    spent_fuel = client.status(cid)["fuel"]["spent"]
    assert spent_fuel == 1 + 12 + 9
    budget = client.status(cid)["fuel"]["budget"]
    assert (f"budget {budget}, spent {spent_fuel}, reserved 25, "
            f"remaining {budget - spent_fuel - 25}") in table.stdout


def chassis(db_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHASSIS_")}
    env.update({"CHASSIS_DATABASE_URL": db_url, "CHASSIS_HOME": str(tmp_path),
                "CHASSIS_CLIENT_ID": "acme"})
    return subprocess.run([sys.executable, "-m", "chassis", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)


def test_the_fuel_report_command(client: Client, spent: dict[str, str], db_url: str,
                                 tmp_path: Path) -> None:
    as_json = chassis(db_url, tmp_path, "fuel", "report", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == client.fuel_report()  # every client's

    table = chassis(db_url, tmp_path, "fuel", "report")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    for word in ("day", "client", "plan", "model", "spent", "tokens in", "claude-opus",
                 "globex", "2026-03-02"):
        assert word in table.stdout, word
    total = [cell for cell in next(line for line in lines if "total" in line).split()
             if cell.isalnum()]
    spent_all = sum(g["spent"] for g in client.fuel_report())
    assert total[1:] == [str(spent_all), "1150", "320", "5"], total

    mine = json.loads(chassis(db_url, tmp_path, "fuel", "report", "--client", "globex",
                              "--since", "2026-03-01T23:00:00", "--json").stdout)
    assert mine == client.fuel_report("globex", "2026-03-01T23:00")
    assert {g["client_id"] for g in mine} == {"globex"} and len(mine) == 2

    nobody = chassis(db_url, tmp_path, "fuel", "report", "--client", "nobody")
    assert nobody.returncode == 0 and "no fuel spent" in nobody.stdout
    assert json.loads(chassis(db_url, tmp_path, "fuel", "report", "--client", "nobody",
                              "--json").stdout) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("args, says", [
    (["--since", "last tuesday"], "--since"),
    (["--since", "2026-02-30"], "--since"),
    (["--since"], "--since"),
    (["--client", "x" * 300], "--client"),
    (["--client", ""], "--client"),
    (["--until", "2026-01-01"], "--until"),
])
def test_bad_report_options_are_one_line_and_exit_2(db_url: str, tmp_path: Path,
                                                    args: list[str], says: str) -> None:
    proc = chassis(db_url, tmp_path, "fuel", "report", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_fuel_command_and_option_has_help(db_url: str, tmp_path: Path) -> None:
    from click import Group

    from chassis.cli import main

    group = main.commands["fuel"]
    assert isinstance(group, Group) and group.help
    for command in group.commands.values():
        assert command.help, command.name
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert getattr(param, "help", None), (command.name, param.name)
    proc = chassis(db_url, tmp_path, "fuel", "report", "--help")
    assert proc.returncode == 0 and "--since" in proc.stdout and "--client" in proc.stdout
    assert "report" in chassis(db_url, tmp_path, "fuel", "--help").stdout
