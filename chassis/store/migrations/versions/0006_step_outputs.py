"""Collected data and attempts one row per name: a transition writes what it changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

The seed kept a workflow's collected data (every step's output, ``human_feedback``,
``error``) in one JSON column of its row, and 0003 added the coordinator's attempts of
every step as another: both were rewritten by every transition, so with 1,000 steps of
10 KB each the thousandth step rewrote 10 MB. Now each value is a row of
``step_outputs`` (with the workflow version that wrote it) and each step's attempts a
row of ``step_attempts``; a transition writes the rows it changes. Existing values move
over (their rev: the row's current version) and the two columns are dropped; the
downgrade puts them back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UUID_TYPE = sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")


def _workflow() -> sa.Column[str]:
    return sa.Column("correlation_id", UUID_TYPE,
                     sa.ForeignKey("orchestrator_state.correlation_id", ondelete="CASCADE"),
                     primary_key=True)


def upgrade() -> None:
    op.create_table("step_outputs", _workflow(),
                    sa.Column("name", sa.String(255), primary_key=True),
                    sa.Column("rev", sa.Integer, nullable=False),
                    sa.Column("value", JSON_TYPE))
    op.create_table("step_attempts", _workflow(),
                    sa.Column("name", sa.String(255), primary_key=True),
                    sa.Column("attempt", sa.Integer, nullable=False),
                    sa.Column("base", sa.Integer, nullable=False),
                    sa.Column("scheduled", sa.Integer, nullable=False))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""INSERT INTO step_outputs (correlation_id, name, rev, value)
            SELECT o.correlation_id, e.key, o.version, e.value
            FROM orchestrator_state o, jsonb_each(o.collected_data) e
            WHERE jsonb_typeof(o.collected_data) = 'object'""")
        op.execute("""INSERT INTO step_attempts (correlation_id, name, attempt, base, scheduled)
            SELECT o.correlation_id, e.key, (e.value ->> 0)::int,
              COALESCE((e.value ->> 1)::int, 0), COALESCE((e.value ->> 2)::int, 0)
            FROM orchestrator_state o, jsonb_each(o.attempts) e
            WHERE jsonb_typeof(o.attempts) = 'object'""")
    else:
        _move_sqlite()
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.drop_column("collected_data")
        batch.drop_column("attempts")


def downgrade() -> None:
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.add_column(sa.Column("collected_data", JSON_TYPE))
        batch.add_column(sa.Column("attempts", JSON_TYPE))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""UPDATE orchestrator_state o SET
            collected_data = COALESCE((SELECT jsonb_object_agg(v.name,
                COALESCE(v.value, 'null'::jsonb)) FROM step_outputs v
              WHERE v.correlation_id = o.correlation_id), '{}'::jsonb),
            attempts = COALESCE((SELECT jsonb_object_agg(a.name,
                jsonb_build_array(a.attempt, a.base, a.scheduled)) FROM step_attempts a
              WHERE a.correlation_id = o.correlation_id), '{}'::jsonb)""")
    else:
        _move_back_sqlite()
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.alter_column("collected_data", existing_type=JSON_TYPE, nullable=False)
    op.drop_table("step_attempts")
    op.drop_table("step_outputs")


def _move_sqlite() -> None:
    """SQLite: in Python (its json_each hands numbers over as SQL REALs, which would come
    back with 15 digits); an embedded database is small."""
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT correlation_id, version, collected_data, attempts FROM orchestrator_state"))
    for cid, version, data, attempts in rows.all():
        data = json.loads(data) if isinstance(data, str) else data
        attempts = json.loads(attempts) if isinstance(attempts, str) else attempts
        for name, value in (data if isinstance(data, dict) else {}).items():
            conn.execute(sa.text("INSERT INTO step_outputs (correlation_id, name, rev, value) "
                                 "VALUES (:c, :n, :r, :v)"),
                         {"c": cid, "n": name, "r": version, "v": json.dumps(value)})
        for name, p in (attempts if isinstance(attempts, dict) else {}).items():
            p = [*p, 0, 0]
            conn.execute(sa.text("INSERT INTO step_attempts (correlation_id, name, attempt, "
                                 "base, scheduled) VALUES (:c, :n, :a, :b, :s)"),
                         {"c": cid, "n": name, "a": int(p[0]), "b": int(p[1] or 0),
                          "s": int(p[2] or 0)})


def _move_back_sqlite() -> None:
    conn = op.get_bind()
    data: dict[str, dict[str, object]] = {}
    attempts: dict[str, dict[str, list[int]]] = {}
    for cid, name, value in conn.execute(sa.text(
            "SELECT correlation_id, name, value FROM step_outputs")).all():
        # (the column's NUMERIC affinity keeps a bare number as an INTEGER or REAL)
        data.setdefault(cid, {})[name] = json.loads(value) if isinstance(value, str) else value
    for cid, name, a, b, sch in conn.execute(sa.text(
            "SELECT correlation_id, name, attempt, base, scheduled FROM step_attempts")).all():
        attempts.setdefault(cid, {})[name] = [a, b, sch]
    for (cid,) in conn.execute(sa.text("SELECT correlation_id FROM orchestrator_state")).all():
        conn.execute(sa.text("UPDATE orchestrator_state SET collected_data = :d, attempts = :a "
                             "WHERE correlation_id = :c"),
                     {"c": cid, "d": json.dumps(data.get(cid, {})),
                      "a": json.dumps(attempts.get(cid, {}))})
