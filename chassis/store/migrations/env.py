"""Alembic environment of agentchassis.

``chassis.store.db.upgrade`` puts an open connection (inside its transaction) in
``config.attributes["connection"]`` and the URL in ``config.attributes["url"]``. Run
through the ``alembic`` command instead, the URL is CHASSIS_DATABASE_URL.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import sqlalchemy as sa
from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo

from chassis.store.tables import metadata

config = context.config


def _record_applied(
    ctx: MigrationContext,
    step: MigrationInfo,
    heads: Collection[Any],
    run_args: Mapping[str, Any],
) -> None:
    applied = config.attributes.get("applied_revisions")
    if applied is not None and step.is_upgrade and step.up_revision_id:
        applied.append(step.up_revision_id)


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        on_version_apply=_record_applied,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from chassis.store.db import _create_engine, _resolve

    engine = _create_engine(_resolve(config.attributes.get("url")), for_migrations=True)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("agentchassis migrations run online only: use `chassis db upgrade`.")
run_migrations_online()
