"""Collected data one row per name: a transition writes what it adds, not everything.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

The seed kept a workflow's collected data (every step's output, ``human_feedback``,
``error``) in one JSON column of its row, rewritten by every transition: with 1,000
steps of 10 KB each, the thousandth step rewrote 10 MB. Now each value is a row of
``step_outputs`` (written when it is set), and ``orchestrator_state.outputs`` keeps the
names, each with the workflow version that wrote it. Existing values are moved over
(with the row's current version), and the old column is dropped; the downgrade puts
them back.
"""

from __future__ import annotations

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


def upgrade() -> None:
    op.create_table(
        "step_outputs",
        sa.Column("correlation_id", UUID_TYPE,
                  sa.ForeignKey("orchestrator_state.correlation_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("rev", sa.Integer, nullable=False),
        sa.Column("value", JSON_TYPE),
    )
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.add_column(sa.Column("outputs", JSON_TYPE))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""INSERT INTO step_outputs (correlation_id, name, rev, value)
            SELECT o.correlation_id, e.key, o.version, e.value
            FROM orchestrator_state o, jsonb_each(o.collected_data) e""")
        op.execute("""UPDATE orchestrator_state o SET outputs = COALESCE(
            (SELECT jsonb_object_agg(e.key, o.version) FROM jsonb_each(o.collected_data) e),
            '{}'::jsonb)""")
    else:
        op.execute("""INSERT INTO step_outputs (correlation_id, name, rev, value)
            SELECT o.correlation_id, e.key, o.version,
              CASE e.type WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'
                ELSE json_quote(e.value) END
            FROM orchestrator_state o, json_each(o.collected_data) e""")
        op.execute("""UPDATE orchestrator_state SET outputs = COALESCE(
            (SELECT json_group_object(e.key, orchestrator_state.version)
             FROM json_each(orchestrator_state.collected_data) e), '{}')""")
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.alter_column("outputs", existing_type=JSON_TYPE, nullable=False)
        batch.drop_column("collected_data")


def downgrade() -> None:
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.add_column(sa.Column("collected_data", JSON_TYPE))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""UPDATE orchestrator_state o SET collected_data = COALESCE(
            (SELECT jsonb_object_agg(v.name, COALESCE(v.value, 'null'::jsonb))
             FROM step_outputs v WHERE v.correlation_id = o.correlation_id), '{}'::jsonb)""")
    else:
        op.execute("""UPDATE orchestrator_state SET collected_data = COALESCE(
            (SELECT json_group_object(v.name, json(COALESCE(v.value, 'null')))
             FROM step_outputs v
             WHERE v.correlation_id = orchestrator_state.correlation_id), '{}')""")
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.alter_column("collected_data", existing_type=JSON_TYPE, nullable=False)
        batch.drop_column("outputs")
    op.drop_table("step_outputs")
