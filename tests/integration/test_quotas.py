"""Client quotas in the store, on SQLite and on PostgreSQL: every charge is counted in
its transition's transaction, a transition that would go past the quota writes nothing
and is decided again knowing what is left, and concurrent transitions of one client's
workflows never exceed it."""

from __future__ import annotations

import concurrent.futures
import secrets
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from chassis import config
from chassis import coordinator as co
from chassis.api import Client
from chassis.errors import InputError
from chassis.plan import Plan, parse_plan
from chassis.state import Status, WorkflowState
from chassis.store import SqlStore
from chassis.store.db import make_engine
from chassis.store.tables import client_usage, fuel_ledger

pytestmark = pytest.mark.timeout(120)


def echo_plan(steps: int) -> Plan:
    names = [f"s{i}" for i in range(steps)]
    data: dict[str, Any] = {n: {"action": "echo", "next_step": nxt}
                            for n, nxt in zip(names, [*names[1:], "done"], strict=True)}
    data["done"] = {"action": "complete_workflow"}
    return parse_plan({"start_step": "s0", "steps": data})


def client_for(db_url: str, tmp_path: Path, who: str) -> Client:
    return Client(config.load({"CHASSIS_DATABASE_URL": db_url,
                               "CHASSIS_HOME": str(tmp_path / ".chassis")}), client_id=who)


def succeed(store: SqlStore, cid: str, step: str) -> co.Decision:
    return store.transition(cid, lambda s, p, *settled: co.decide(
        s, p, co.StepSucceeded(step, {"ok": True}, 1), *settled))


def used(db_url: str, who: str) -> int:
    with make_engine(db_url).connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(client_usage.c.fuel), 0))
                                .where(client_usage.c.client_id == who)).scalar_one())


def ledger_sum(db_url: str, cid: str) -> int:
    with make_engine(db_url).connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(fuel_ledger.c.amount), 0))
                                .where(fuel_ledger.c.correlation_id == cid)).scalar_one())


def test_a_charge_past_the_quota_fails_the_step_and_writes_no_more(
        db_url: str, tmp_path: Path) -> None:
    who = "acme"
    client = client_for(db_url, tmp_path, who)
    assert client.set_quota(who, 4, "total") == {"client_id": who, "per": "total", "fuel": 4,
                                                  "used": 0, "held": 0, "left": 4}
    plan = echo_plan(2)  # s0, s1 and done: 3 fuel
    a = client.start(plan, fuel_budget=100, check_actions=False)
    b = client.start(plan, fuel_budget=100, check_actions=False)
    assert client.quota(who)["used"] == 2
    succeed(client.store, a, "s0")
    d = succeed(client.store, a, "s1")
    assert d.state.status is Status.COMPLETED  # a's 3, and b's first step: 4 used
    d = succeed(client.store, b, "s0")  # s1 needs 1, 0 left: refused, decided again
    assert d.state.status is Status.FAILED
    assert d.state.error == ("quota exceeded for client 'acme': action 'echo' needs 1, "
                             "0 left of 4 per total")
    assert used(db_url, who) == 4
    for cid in (a, b):
        assert ledger_sum(db_url, cid) == client.store.get(cid).fuel_spent
    # a start past the quota: FAILED at once, nothing charged
    c = client.start(plan, fuel_budget=100, check_actions=False)
    assert client.status(c)["status"] == "FAILED"
    assert client.status(c)["fuel"]["spent"] == 0
    assert used(db_url, who) == 4
    # another client has its own window (none: no limit)
    other = client_for(db_url, tmp_path, "globex")
    assert other.status(other.start(plan, fuel_budget=100, check_actions=False))[
        "status"] != "FAILED"
    assert other.quota("globex")["per"] is None
    # raising the quota lets a retry go on
    client.set_quota(who, 10, "total")
    client.retry(b)
    assert client.status(b)["status"] == "RUNNING"
    assert used(db_url, who) == 5


def test_windows_are_per_day_and_per_month(db_url: str, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from chassis.store import quotas

    starts = quotas.window_starts(datetime(2026, 3, 17, 23, 59, tzinfo=UTC))
    assert starts == {"day": datetime(2026, 3, 17, tzinfo=UTC),
                      "month": datetime(2026, 3, 1, tzinfo=UTC), "total": quotas.EPOCH}
    client = client_for(db_url, tmp_path, "acme")
    client.set_quota("acme", 100, "month")
    client.start(echo_plan(1), fuel_budget=100, check_actions=False)
    with make_engine(db_url).connect() as conn:
        [row] = conn.execute(sa.select(client_usage)).all()
    assert row.fuel == 1
    assert row.window_start == quotas.window_starts(datetime.now(UTC))["month"]


def test_bad_quotas_are_refused_and_write_nothing(db_url: str, tmp_path: Path) -> None:
    client = client_for(db_url, tmp_path, "acme")
    for fuel, per in ((-1, "day"), (1.5, "day"), ("x", "day"), (True, "day"),
                      (10, "week"), (10, None), (2**31, "day")):
        with pytest.raises(InputError):
            client.set_quota("acme", fuel, per)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        client.set_quota("", 10, "day")
    assert client.quota("acme")["per"] is None
    assert client.remove_quota("acme") is False
    client.set_quota("acme", 0, "day")  # nothing allowed
    cid = client.start(echo_plan(1), fuel_budget=100, check_actions=False)
    assert client.status(cid)["status"] == "FAILED"
    assert client.remove_quota("acme") is True


def test_concurrent_transitions_of_one_client_never_exceed_its_quota(
        db_url: str, tmp_path: Path) -> None:
    who = f"c-{uuid.uuid4().hex[:6]}"
    client = client_for(db_url, tmp_path, who)
    client.set_quota(who, 25, "day")
    plan = echo_plan(5)  # 6 fuel each, 10 workflows: 60 asked for
    store = client.store
    cids = []
    for _ in range(10):  # each start charges its first step (1 of the 25)
        cid = str(uuid.uuid4())
        s = WorkflowState(correlation_id=cid, client_id=who, status=Status.RUNNING,
                          current_step="s0", fuel_budget=100, nonce=secrets.token_hex(16))
        s.quota = store.quota(who)
        assert store.create(co.decide(s, plan, co.Start()), plan)
        cids.append(cid)

    def drive(cid: str) -> str:
        for step in ("s0", "s1", "s2", "s3", "s4"):
            d = succeed(store, cid, step)
            if d.state.status is not Status.RUNNING:
                break
        return store.get(cid).status.value

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(drive, cids))
    assert used(db_url, who) == 25  # exactly up to the quota, never past it
    spent = 0
    for cid in cids:
        s = store.get(cid)
        assert ledger_sum(db_url, cid) == s.fuel_spent
        spent += s.fuel_spent
        if s.status is Status.FAILED:
            assert s.error is not None and s.error.startswith(
                f"quota exceeded for client '{who}'")
    assert spent == 25
    assert statuses.count("COMPLETED") <= 4


def test_a_hold_settled_in_a_later_window_is_taken_from_what_is_held(db_url: str) -> None:
    """A reservation made on day D and settled on D+1 counts what it spent in D+1's
    window and frees its hold: no window is credited what it did not count."""
    from datetime import UTC, datetime

    from chassis.store import quotas

    engine = make_engine(db_url)
    day, next_day = datetime(2026, 3, 17, 23, 59, 59, tzinfo=UTC), datetime(
        2026, 3, 18, 0, 0, 1, tzinfo=UTC)
    with engine.begin() as conn:
        quotas.set_quota(conn, "acme", "day", 100, day)
        quotas.charge(conn, "acme", (81, 0, 0, 81), day)  # reserve 81
        assert quotas.read(conn, "acme", day).left == 19
        quotas.charge(conn, "acme", (0, -71, 0, -81), next_day)  # settle 10, release 71
        q = quotas.read(conn, "acme", next_day)
    assert (q.used, q.held, q.left) == (10, 0, 90)
    # held before the client had a quota: a quota set later sees the hold, and the
    # settlement takes it back from what is held, not from the window
    with engine.begin() as conn:
        quotas.charge(conn, "globex", (81, 0, 0, 81), day)  # no quota: only held counted
        quotas.set_quota(conn, "globex", "total", 50, day)
        assert quotas.read(conn, "globex", day).left == 50 - 81
        quotas.charge(conn, "globex", (0, -71, 0, -81), next_day)
        q = quotas.read(conn, "globex", next_day)
    assert (q.used, q.held, q.left) == (10, 0, 40)
    # a charge the quota does not allow is refused, in the caller's transaction
    with pytest.raises(quotas.QuotaRace), engine.begin() as conn:
        quotas.charge(conn, "globex", (41, 0, 0, 0), next_day)
    with engine.connect() as conn:
        assert quotas.read(conn, "globex", next_day).used == 10  # rolled back


def test_resume_adding_fuel_to_a_workflow_not_paused_is_refused(
        db_url: str, tmp_path: Path) -> None:
    from chassis.errors import InvalidTransition

    client = client_for(db_url, tmp_path, "acme")
    cid = client.start(echo_plan(1), fuel_budget=10, check_actions=False)
    with pytest.raises(InvalidTransition, match="not paused"):
        client.resume(cid, True, add_fuel=500)
    assert client.status(cid)["fuel"]["budget"] == 10
