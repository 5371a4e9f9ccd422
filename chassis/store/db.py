"""Database engines and migrations.

``make_engine`` gives one cached engine per URL and process. SQLite connections get WAL,
a 30 s busy timeout, foreign keys and ``synchronous=NORMAL``; PostgreSQL uses psycopg 3
with a small pool and a 10 s connect timeout (libpq's default is to wait forever).

``upgrade`` runs the Alembic migrations shipped inside the package (``alembic.ini`` and
``migrations/`` next to this file, so it works from an installed wheel). Migrations run
in one transaction and are serialised between processes: a PostgreSQL advisory lock,
``BEGIN IMMEDIATE`` on SQLite. Several workers may call ``upgrade`` at start-up.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from chassis.config import load, normalize_database_url
from chassis.errors import ConfigError, DatabaseUnavailable

__all__ = [
    "current_revision",
    "dispose_engines",
    "head_revision",
    "make_engine",
    "mask_url",
    "upgrade",
]

_HERE = Path(__file__).resolve().parent
ALEMBIC_INI = _HERE / "alembic.ini"
MIGRATIONS_DIR = _HERE / "migrations"
#: pg_advisory_xact_lock key that serialises concurrent ``upgrade`` calls.
_MIGRATION_LOCK_KEY = 0x636861737369  # "chassi"
_SQLITE_BUSY_TIMEOUT_S = 30

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


def _resolve(url: str | None) -> str:
    return normalize_database_url(url if url is not None else load().database_url)


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except sa.exc.ArgumentError as exc:
        shown = re.sub(r":[^:@/]*@", ":***@", url)
        raise ConfigError(
            f"not a valid database URL: {shown!r}. Expected e.g. "
            "postgresql://user:password@host:5432/dbname or sqlite:////path/to/chassis.db "
            "(CHASSIS_DATABASE_URL)."
        ) from exc


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid database URL>"


def _create_engine(url: str, *, for_migrations: bool = False) -> sa.Engine:
    parsed = _parse(url)
    kwargs: dict[str, Any] = {}
    if for_migrations:
        kwargs["poolclass"] = NullPool
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        _make_sqlite_parent(parsed)
    elif backend == "postgresql":
        if not for_migrations:
            kwargs.update(pool_pre_ping=False, pool_size=5, max_overflow=10)
        if "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ImportError, sa.exc.NoSuchModuleError) as exc:
        raise ConfigError(
            f"no database driver for {mask_url(url)}: {exc}. Use postgresql:// "
            "(psycopg 3) or sqlite:// URLs."
        ) from exc
    if backend == "sqlite":
        _install_sqlite_pragmas(engine, for_migrations=for_migrations)
    return engine


def _make_sqlite_parent(parsed: URL) -> None:
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    try:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the folder of the SQLite database {database}: {exc}. "
            "Check CHASSIS_DATABASE_URL (or CHASSIS_HOME) and the folder's permissions."
        ) from exc


def _install_sqlite_pragmas(engine: sa.Engine, *, for_migrations: bool) -> None:
    # With foreign keys on, batch mode's "copy and drop table" would cascade deletes.
    foreign_keys = "OFF" if for_migrations else "ON"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if for_migrations:
            # Let SQLAlchemy emit BEGIN (below) so DDL is transactional (sqlite3's legacy
            # mode would autocommit every CREATE TABLE).
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_S * 1000}")
            _enable_wal(cursor)
            cursor.execute(f"PRAGMA foreign_keys={foreign_keys}")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    if for_migrations:

        @event.listens_for(engine, "begin")
        def _on_begin(connection: sa.Connection) -> None:
            # IMMEDIATE takes the write lock up front: a second migrator waits
            # (busy_timeout) and then sees the first one's result.
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def _enable_wal(cursor: sqlite3.Cursor) -> None:
    """Switch to WAL. The switch needs the database to itself and SQLite does not wait
    for it (no busy handler), so a new file opened by several processes at once retries."""
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
    while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def make_engine(url: str | None = None) -> sa.Engine:
    """The engine for ``url`` (default: CHASSIS_DATABASE_URL), cached per URL in-process."""
    key = _resolve(url)
    engine = _engines.get(key)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _create_engine(key)
    return engine


def dispose_engines(url: str | None = None) -> None:
    """Close and forget the cached engine of ``url``, or every cached engine."""
    with _lock:
        if url is None:
            engines = list(_engines.values())
            _engines.clear()
        else:
            engine = _engines.pop(normalize_database_url(url), None)
            engines = [engine] if engine is not None else []
    for engine in engines:
        engine.dispose()


def _forget_engines_after_fork() -> None:
    # A forked child (Celery prefork) must not reuse the parent's sockets or files.
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_engines_after_fork)


def _connect(engine: sa.Engine, url: str) -> sa.Connection:
    try:
        return engine.connect()
    except sa.exc.DBAPIError as exc:
        reason = " ".join(str(exc.orig if exc.orig is not None else exc).split())
        raise DatabaseUnavailable(
            f"cannot connect to the database at {mask_url(url)} ({reason}). Check that "
            "the database server is running and reachable, that the database exists, and "
            "the user name and password in CHASSIS_DATABASE_URL.",
            service="database", recorded=False) from exc


def _alembic_config(url: str) -> Config:
    config = Config(str(ALEMBIC_INI))
    # Absolute, so neither the working directory nor an installed location matters.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["url"] = url
    return config


def head_revision() -> str:
    """The newest migration shipped with this version of agentchassis."""
    head = ScriptDirectory.from_config(_alembic_config("")).get_current_head()
    assert head is not None, "the package ships no migrations"
    return head


def upgrade(url: str | None = None) -> list[str]:
    """Migrate the database to the newest revision; return the revisions applied, oldest
    first (empty when it was already up to date). Raises DatabaseUnavailable when unreachable."""
    target = _resolve(url)
    config = _alembic_config(target)
    applied: list[str] = []
    config.attributes["applied_revisions"] = applied
    engine = _create_engine(target, for_migrations=True)
    try:
        with _connect(engine, target) as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()
    return applied


def current_revision(url: str | None = None) -> str | None:
    """The database's migration revision; None when it has never been migrated."""
    target = _resolve(url)
    with _connect(make_engine(target), target) as connection:
        return MigrationContext.configure(connection).get_current_revision()
