"""Alembic migrations on real PostgreSQL and SQLite, through the API and `chassis db`."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url

from chassis.errors import DatabaseUnavailable
from chassis.store.db import (
    MIGRATIONS_DIR,
    current_revision,
    head_revision,
    make_engine,
    upgrade,
)
from chassis.store.tables import metadata

TABLES = set(metadata.tables)
CHASSIS = Path(sys.executable).parent / "chassis"
UNREACHABLE = "postgresql://postgres:s3cret@127.0.0.1:1/x"


def all_revisions() -> list[str]:
    """Every migration shipped, oldest first."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def schema_snapshot(url: str) -> dict[str, Any]:
    """Everything the inspector sees, plus the alembic_version rows, as comparable text."""
    with make_engine(url).connect() as conn:
        inspector = sa.inspect(conn)
        snapshot: dict[str, Any] = {}
        for table in sorted(inspector.get_table_names()):
            snapshot[table] = [
                repr(
                    [
                        (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                        for c in inspector.get_columns(table)
                    ]
                ),
                repr(inspector.get_pk_constraint(table)),
                repr(sorted(inspector.get_indexes(table), key=lambda i: str(i["name"]))),
                repr(sorted(inspector.get_unique_constraints(table), key=lambda u: str(u["name"]))),
                repr(sorted(inspector.get_foreign_keys(table), key=lambda f: str(f["name"]))),
            ]
        snapshot["alembic_version rows"] = conn.execute(
            sa.text("SELECT version_num FROM alembic_version")
        ).all()
    return snapshot


def schema_diff(url: str, target: sa.MetaData) -> list[Any]:
    with make_engine(url).connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, target))


def run_chassis(*args: str, database_url: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHASSIS_DATABASE_URL": database_url, "CHASSIS_HOME": str(home)}
    return subprocess.run(
        [str(CHASSIS), *args], env=env, capture_output=True, text=True, timeout=60
    )


def as_typed_by_user(url: str) -> str:
    """postgresql+psycopg://... → postgresql://... (what a user puts in the variable)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        parsed = parsed.set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def test_upgrade_creates_the_tables(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None

    applied = upgrade(empty_db_url)

    assert applied == all_revisions()
    assert applied[0] == "0001" and applied[-1] == head_revision()
    assert current_revision(empty_db_url) == head_revision()
    tables = set(sa.inspect(make_engine(empty_db_url)).get_table_names())
    assert tables == TABLES | {"alembic_version"}


def test_second_upgrade_applies_nothing_and_changes_nothing(empty_db_url: str) -> None:
    upgrade(empty_db_url)
    before = schema_snapshot(empty_db_url)

    assert upgrade(empty_db_url) == []

    assert schema_snapshot(empty_db_url) == before


def test_migrated_schema_matches_tables_metadata(empty_db_url: str) -> None:
    upgrade(empty_db_url)

    assert schema_diff(empty_db_url, metadata) == []

    # The comparison is not vacuous: a column the database lacks is reported.
    changed = sa.MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["outbox"].append_column(sa.Column("extra", sa.Integer))
    assert [d[0] for d in schema_diff(empty_db_url, changed)] == ["add_column"]


def test_json_and_uuid_column_types(db_url: str) -> None:
    columns = {
        c["name"]: c["type"]
        for c in sa.inspect(make_engine(db_url)).get_columns("orchestrator_state")
    }
    if make_url(db_url).get_backend_name() == "postgresql":
        assert isinstance(columns["plan"], postgresql.JSONB)
        assert isinstance(columns["correlation_id"], postgresql.UUID)
    else:
        assert isinstance(columns["plan"], sa.JSON)
        assert isinstance(columns["correlation_id"], sa.String)
        assert columns["correlation_id"].length == 36


def test_concurrent_upgrades_apply_once(empty_db_url: str) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(upgrade, [empty_db_url] * 3))

    assert sorted(results, key=len) == [[], [], all_revisions()]
    assert current_revision(empty_db_url) == head_revision()


def test_cli_upgrade_then_up_to_date(empty_db_url: str, tmp_path: Path) -> None:
    url = as_typed_by_user(empty_db_url)

    first = run_chassis("db", "upgrade", database_url=url, home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "0001" in first.stdout and "applied" in first.stdout

    second = run_chassis("db", "upgrade", database_url=url, home=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"database is up to date at revision {head_revision()}" in second.stdout

    current = run_chassis("db", "current", database_url=url, home=tmp_path)
    assert current.returncode == 0, current.stderr
    assert current.stdout.startswith(f"{head_revision()} (head)")


@pytest.mark.parametrize("command", ["upgrade", "current"])
def test_cli_unreachable_database_is_a_clear_error(command: str, tmp_path: Path) -> None:
    result = run_chassis("db", command, database_url=UNREACHABLE, home=tmp_path)

    assert result.returncode == 3  # a service unreachable
    assert result.stderr.startswith("error: cannot connect")
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "cannot connect to the database at" in result.stderr
    assert "postgres:***@127.0.0.1:1/x" in result.stderr
    assert "s3cret" not in output


def test_upgrade_unreachable_raises_database_unavailable() -> None:
    with pytest.raises(DatabaseUnavailable, match=r"127\.0\.0\.1:1/x.*Check that") as info:
        upgrade(UNREACHABLE)
    assert "s3cret" not in str(info.value)


def upgrade_to(url: str, revision: str, down: bool = False) -> None:
    """Migrate to ``revision`` only (what an older release left behind); ``down``:
    downgrade to it."""
    from alembic import command

    from chassis.store.db import _alembic_config, _create_engine, _resolve

    target = _resolve(url)
    config = _alembic_config(target)
    engine = _create_engine(target, for_migrations=True)
    try:
        with engine.connect() as connection, connection.begin():
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)
    finally:
        engine.dispose()


def test_workflows_in_flight_before_0003_go_on_after_it(empty_db_url: str) -> None:
    """Rows as the release before attempts wrote them: a workflow paused for approval
    (its current_step already the step after the pause) and a fan-out under way (its
    sub-tasks recorded nothing yet). After the upgrade both run to the end."""
    import json
    import uuid
    from datetime import UTC, datetime

    from chassis import coordinator as co
    from chassis.plan import parse_plan, plan_to_dict
    from chassis.state import Status, request_id_for
    from chassis.store import SqlStore

    upgrade_to(empty_db_url, "0002")
    paused, fanning, rejected = (str(uuid.uuid4()) for _ in range(3))
    review = parse_plan({"start_step": "draft", "steps": {
        "draft": {"action": "echo", "next_step": "review"},
        "review": {"action": "pause_for_human_input", "next_step": "publish"},
        "publish": {"action": "echo", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    fan = parse_plan({"start_step": "fan", "steps": {
        "fan": {"action": "fan_out", "next_step": "done", "sub_tasks": [
            {"step_name": "x", "action": "noop"}, {"step_name": "y", "action": "noop"}]},
        "done": {"action": "complete_workflow"}}})
    now = datetime.now(UTC)
    pg = make_url(empty_db_url).get_backend_name() == "postgresql"

    def state(cid: str, plan: Any, status: str, current: str, awaited: list[str],
              data: dict[str, Any], spent: int) -> dict[str, Any]:
        return {"correlation_id": cid, "client_id": "c1", "status": status,
                "current_step": current, "awaited_steps": json.dumps(awaited),
                "collected_data": json.dumps(data), "plan": json.dumps(plan_to_dict(plan)),
                "fuel_budget": 100, "fuel_spent": spent, "version": 3,
                "created_at": now, "updated_at": now}

    def run(cid: str, step: str, action: str, status: str, attempts: int,
            parent: str | None = None) -> dict[str, Any]:
        return {"correlation_id": cid, "step_name": step, "action": action,
                "status": status, "attempts": attempts, "parent_step": parent,
                "request_id": request_id_for(cid, step), "dispatched_at": now,
                "started_at": now if attempts else None}

    cast = "CAST(:{} AS JSONB)" if pg else ":{}"
    with make_engine(empty_db_url).begin() as conn:
        for row in (state(paused, review, "PAUSED_FOR_HUMAN_INPUT", "publish",
                          [request_id_for(paused, "review")], {"draft": {}}, 1),
                    state(rejected, review, "PAUSED_FOR_HUMAN_INPUT", "publish",
                          [request_id_for(rejected, "review")], {"draft": {}}, 1),
                    state(fanning, fan, "AWAITING_RESPONSES", "done",
                          [request_id_for(fanning, "x"), request_id_for(fanning, "y")], {}, 7)):
            cols = list(row)
            values = ", ".join(cast.format(c) if c in ("awaited_steps", "collected_data", "plan")
                               else f":{c}" for c in cols)
            conn.execute(sa.text(f"INSERT INTO orchestrator_state ({', '.join(cols)}) "
                                 f"VALUES ({values})"), row)
        for row in (run(paused, "draft", "echo", "COMPLETED", 1),
                    run(paused, "review", "pause_for_human_input", "AWAITING", 1),
                    run(rejected, "draft", "echo", "COMPLETED", 1),
                    run(rejected, "review", "pause_for_human_input", "AWAITING", 1),
                    run(fanning, "fan", "fan_out", "AWAITING", 1),
                    run(fanning, "x", "noop", "DISPATCHED", 0, "fan"),
                    run(fanning, "y", "noop", "RUNNING", 1, "fan")):
            conn.execute(sa.text(
                "INSERT INTO step_runs (correlation_id, step_name, action, status, attempts, "
                "parent_step, request_id, dispatched_at, started_at) VALUES (:correlation_id, "
                ":step_name, :action, :status, :attempts, :parent_step, :request_id, "
                ":dispatched_at, :started_at)"), row)

    assert upgrade(empty_db_url) == ["0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010"]
    store = SqlStore(make_engine(empty_db_url))
    assert store.get(paused).collected_data == {"draft": {}}
    assert store.get(fanning).collected_data == {}
    assert store.get(paused).attempts == {"draft": [1, 0, 0], "review": [1, 0, 0]}
    # rejected, then retried by an operator: it asks again (attempt 2 of the pause)
    store.transition(rejected, lambda s, p: co.decide(s, p, co.Resume(False)))
    again = store.transition(rejected, lambda s, p: co.decide(s, p, co.Retry()))
    assert again.state.status is Status.PAUSED_FOR_HUMAN_INPUT
    assert again.state.attempts["review"][0] == 2
    d = store.transition(paused, lambda s, p: co.decide(s, p, co.Resume(True, {"ok": 1})))
    d = store.transition(paused, lambda s, p: co.decide(s, p, co.StepSucceeded("publish", {})))
    assert d.state.status is Status.COMPLETED
    assert d.state.final_result["human_feedback"] == {"ok": 1}
    for name in ("x", "y"):  # y's worker was lost in the upgrade: its claim is taken over
        assert store.claim(fanning, name, 1, "t", lease=15, timeout=60) is not None
    assert store.record_subtask(fanning, "x", 1, {"x": 1}) == (True, 1)
    assert store.record_subtask(fanning, "y", 1, {"y": 1}) == (True, 0)
    done = store.completed_subtasks(fanning, "fan")
    d = store.transition(fanning, lambda s, p: co.decide(s, p, co.SubtasksSucceeded(
        "fan", {n: o for n, (_, o) in done.items()}, {n: a for n, (a, _) in done.items()})))
    assert d.state.status is Status.COMPLETED
    assert d.state.final_result["fan"] == {"x": {"x": 1}, "y": {"y": 1}}


def test_0006_moves_collected_data_to_rows_and_back(empty_db_url: str) -> None:
    """Values of every JSON kind move from the old column to one row each (with the
    row's version as their rev), attempts too; they read back equal, and the downgrade
    restores them."""
    import json
    import uuid
    from datetime import UTC, datetime

    from chassis.plan import parse_plan, plan_to_dict
    from chassis.store import SqlStore

    upgrade_to(empty_db_url, "0005")
    data = {"text": "hello", "n": 3, "x": 1.5, "yes": True, "no": False, "nothing": None,
            "list": [1, "two", None], "map": {"a": {"b": [True]}}, "human_feedback": "ok",
            "quote\"d": "\u00e9\u4e2d", "float": 0.30000000000000004, "pi": 3.141592653589793,
            "big": 2**63 - 1, "neg": -2**63, "tiny": 5e-324}
    cid, empty = str(uuid.uuid4()), str(uuid.uuid4())
    plan = parse_plan({"start_step": "a", "steps": {"a": {"action": "complete_workflow"}}})
    pg = make_url(empty_db_url).get_backend_name() == "postgresql"
    cast = "CAST(:{} AS JSONB)" if pg else ":{}"
    now = datetime.now(UTC)
    with make_engine(empty_db_url).begin() as conn:
        for wf, values in ((cid, data), (empty, {})):
            row = {"correlation_id": wf, "client_id": "c1", "status": "COMPLETED",
                   "current_step": "a", "awaited_steps": "[]",
                   "collected_data": json.dumps(values), "plan": json.dumps(plan_to_dict(plan)),
                   "fuel_budget": 10, "fuel_spent": 0, "version": 7, "created_at": now,
                   "updated_at": now,
                   "attempts": json.dumps({"a": [2, 1, 0], "b": [1, 0, 1]} if values else {})}
            cols = list(row)
            vals = ", ".join(cast.format(c) if c in ("awaited_steps", "collected_data", "plan",
                                                     "attempts")
                             else f":{c}" for c in cols)
            conn.execute(sa.text(f"INSERT INTO orchestrator_state ({', '.join(cols)}) "
                                 f"VALUES ({vals})"), row)
    assert upgrade(empty_db_url) == ["0006", "0007", "0008", "0009", "0010"]
    store = SqlStore(make_engine(empty_db_url))
    got = store.get(cid)
    assert got.collected_data.revs == dict.fromkeys(data, 7)
    assert got.collected_data.to_dict() == data
    assert got.attempts == {"a": [2, 1, 0], "b": [1, 0, 1]}
    assert store.get(empty).collected_data.to_dict() == {}
    assert store.get(empty).attempts == {}
    store.engine.dispose()

    upgrade_to(empty_db_url, "0005", down=True)
    with make_engine(empty_db_url).connect() as conn:
        back = {str(r[0]): [v if isinstance(v, dict | type(None)) else json.loads(v)
                            for v in r[1:]] for r in conn.execute(sa.text(
                    "SELECT correlation_id, collected_data, attempts FROM orchestrator_state"))}
        assert "step_outputs" not in sa.inspect(conn).get_table_names()
        assert "step_attempts" not in sa.inspect(conn).get_table_names()
    assert back == {cid: [data, {"a": [2, 1, 0], "b": [1, 0, 1]}], empty: [{}, {}]}
