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

from chassis.errors import ConfigError
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

    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "cannot connect to the database at" in result.stderr
    assert "postgres:***@127.0.0.1:1/x" in result.stderr
    assert "s3cret" not in output


def test_upgrade_unreachable_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:1/x.*Check that") as info:
        upgrade(UNREACHABLE)
    assert "s3cret" not in str(info.value)
