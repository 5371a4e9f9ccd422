"""Fixtures for the real services the tests use: PostgreSQL, Redis, SQLite files.

A missing service skips the tests that need it, or fails them under CI=true (see
``tests.helpers.require_service``). Overrides: CHASSIS_TEST_POSTGRES_URL (a database the
tests may connect to in order to create and drop their own; default
postgresql://postgres@127.0.0.1:5432/test) and CHASSIS_TEST_REDIS_URL (a Redis database
the tests own and flush; by default a free one of 1..15 is claimed for the session).

Fixtures:
    postgres_url   session: a fresh, empty PostgreSQL database (dropped at the end)
    redis_url      session: a flushed Redis database
    sqlite_url     a SQLite file URL under tmp_path (no file yet, not migrated)
    empty_db_url   [sqlite, postgres]: a new, empty database per test
    db_url         [sqlite, postgres]: a migrated database with empty tables per test
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url

from chassis.config import normalize_database_url
from chassis.store.db import dispose_engines, make_engine, upgrade
from chassis.store.tables import metadata
from tests.helpers import require_service

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379"
#: Redis databases a test session may claim (database 0 holds the claims).
REDIS_TEST_DBS = range(1, 16)
REDIS_CLAIM_SECONDS = 2 * 3600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the services they use, so ``-m 'not postgres'`` works."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "postgres_url" in names or "postgres" in (
            params.get("db_url"),
            params.get("empty_db_url"),
        ):
            item.add_marker(pytest.mark.postgres)
        if "redis_url" in names:
            item.add_marker(pytest.mark.redis)


# --- PostgreSQL -------------------------------------------------------------------------


class PostgresServer:
    """Creates and drops uniquely named databases through the admin database."""

    def __init__(self, admin_url: str) -> None:
        self.url = make_url(normalize_database_url(admin_url))
        self.conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)

    def check(self) -> str | None:
        """None when the server answers, else why not."""
        try:
            with self._admin() as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            return f"cannot connect to {self.url.render_as_string(hide_password=True)}: " + (
                " ".join(str(exc).split())
            )
        return None

    def create_database(self) -> str:
        """Create an empty database; return its SQLAlchemy (psycopg 3) URL."""
        name = f"chassis_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url.set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )

    def drop_database(self, url: str) -> None:
        dispose_engines(url)
        name = make_url(url).database
        assert name, url
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    server = PostgresServer(os.environ.get("CHASSIS_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)
    why = server.check()
    require_service("PostgreSQL", why is None, why or "")
    return server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test session: postgresql+psycopg://.../<name>."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(scope="session")
def _migrated_postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    url = postgres_server.create_database()
    upgrade(url)
    yield url
    postgres_server.drop_database(url)


def _truncate_all(url: str) -> None:
    names = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
    with make_engine(url).begin() as conn:
        # A test that left a transaction open would otherwise make this wait forever.
        conn.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
        conn.execute(sa.text(f"TRUNCATE TABLE {names} RESTART IDENTITY CASCADE"))


# --- Redis ------------------------------------------------------------------------------


def _redis_ping(url: str) -> str | None:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
        with client:
            client.ping()
    except redis.RedisError as exc:
        return f"cannot reach {url}: {exc}"
    return None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database owned by this test session, flushed at the start and the end."""
    override = os.environ.get("CHASSIS_TEST_REDIS_URL")
    base = override or f"{DEFAULT_REDIS}/0"
    why = _redis_ping(base)
    require_service("Redis", why is None, why or "")
    release: Callable[[], None] | None = None
    if override:
        url = override
    else:
        url, release = _claim_redis_db()
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        client.flushdb()
        yield url
        client.flushdb()
    finally:
        client.close()
        if release is not None:
            release()


def _claim_redis_db() -> tuple[str, Callable[[], None]]:
    """Claim a database no other concurrent test session uses (claims live in db 0)."""
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    claims = redis.Redis.from_url(f"{DEFAULT_REDIS}/0", socket_timeout=5)
    for n in REDIS_TEST_DBS:
        key = f"chassis:test-db-claim:{n}"
        if claims.set(key, token, nx=True, ex=REDIS_CLAIM_SECONDS):

            def release(key: str = key) -> None:
                if claims.get(key) == token.encode():
                    claims.delete(key)
                claims.close()

            return f"{DEFAULT_REDIS}/{n}", release
    claims.close()
    require_service("Redis", False, "every test database 1..15 is claimed by other sessions")
    raise AssertionError("unreachable")


# --- SQLite and both --------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """A SQLite URL for a file under tmp_path (not created, not migrated)."""
    url = f"sqlite:///{tmp_path / 'chassis.db'}"
    yield url
    dispose_engines(url)


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty (not migrated) database for each test, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
        yield url
        dispose_engines(url)
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database()
        yield url
        server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database with empty tables for each test, on SQLite and on PostgreSQL.

    SQLite: a new file per test. PostgreSQL: one migrated database per session whose
    tables are truncated before each test (identities restarted).
    """
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        upgrade(url)
        yield url
        dispose_engines(url)
    else:
        url = request.getfixturevalue("_migrated_postgres_url")
        _truncate_all(url)
        yield url
