"""The event history: what happened to each workflow, in order; and its trace.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

``workflow_events`` is append-only: each transition (and each claim of an attempt by a
worker, and each sub-task's own record of its success) adds the rows of what it did,
in its own transaction. Workflows started before this migration have history from
then on. ``orchestrator_state.traceparent``: the trace context of the workflow's root
span (OpenTelemetry), when tracing is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UUID_TYPE = sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("orchestrator_state") as t:
        t.add_column(sa.Column("traceparent", sa.String(64)))
    op.create_table(
        "workflow_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("correlation_id", UUID_TYPE,
                  sa.ForeignKey("orchestrator_state.correlation_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("step", sa.String(255)),
        sa.Column("attempt", sa.Integer),
        sa.Column("actor", sa.String(255)),
        sa.Column("data", JSON_TYPE))
    op.create_index("idx_workflow_events_correlation_id", "workflow_events",
                    ["correlation_id", "id"])


def downgrade() -> None:
    op.drop_index("idx_workflow_events_correlation_id", "workflow_events")
    op.drop_table("workflow_events")
    with op.batch_alter_table("orchestrator_state") as t:
        t.drop_column("traceparent")
