"""Initial schema: orchestrator_state, step_runs, fuel_ledger, outbox.

Revision ID: 0001
Revises:
Create Date: 2025-11-25

Unique and foreign-key constraints get the names PostgreSQL would give them anyway, so
both databases carry the same names and later (batch) migrations can refer to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The types as of this revision (deliberately not imported from chassis.store.tables).
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UUID_TYPE = sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")
ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "orchestrator_state",
        sa.Column("correlation_id", UUID_TYPE, primary_key=True),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(50), nullable=False),
        sa.Column("current_step", sa.String(255), nullable=False),
        sa.Column("awaited_steps", JSON_TYPE, nullable=False),
        sa.Column("collected_data", JSON_TYPE, nullable=False),
        sa.Column("initial_request_data", JSON_TYPE),
        sa.Column("final_result", JSON_TYPE),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("project_id", sa.String(255)),
        sa.Column("request_id", sa.String(255)),
        sa.Column("plan", JSON_TYPE, nullable=False),
        sa.Column("plan_name", sa.String(255)),
        sa.Column("plan_version", sa.Integer()),
        sa.Column("fuel_budget", sa.Integer(), nullable=False),
        sa.Column("fuel_spent", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("version", sa.Integer(), nullable=False, server_default="1"),
    )
    op.create_index("idx_orchestrator_state_status", "orchestrator_state", ["status"])
    op.create_index("idx_orchestrator_state_updated_at", "orchestrator_state", ["updated_at"])
    op.create_index("idx_orchestrator_state_client_id", "orchestrator_state", ["client_id"])

    op.create_table(
        "step_runs",
        sa.Column("id", ID_TYPE, primary_key=True, autoincrement=True),
        sa.Column("correlation_id", UUID_TYPE, nullable=False),
        sa.Column("step_name", sa.String(255), nullable=False),
        sa.Column("parent_step", sa.String(255)),
        sa.Column("action", sa.String(255), nullable=False),
        sa.Column("status", sa.String(50), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("request_id", sa.String(255)),
        sa.Column("task_id", sa.String(255)),
        sa.Column("output", JSON_TYPE),
        sa.Column("error", sa.Text()),
        sa.Column("dispatched_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.ForeignKeyConstraint(
            ["correlation_id"],
            ["orchestrator_state.correlation_id"],
            name="step_runs_correlation_id_fkey",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("correlation_id", "step_name", name="uq_step_runs_workflow_step"),
    )
    op.create_index("idx_step_runs_status", "step_runs", ["status"])
    op.create_index("idx_step_runs_request_id", "step_runs", ["request_id"])

    op.create_table(
        "fuel_ledger",
        sa.Column("id", ID_TYPE, primary_key=True, autoincrement=True),
        sa.Column("correlation_id", UUID_TYPE, nullable=False),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("step_name", sa.String(255), nullable=False),
        sa.Column("action", sa.String(255), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(600), nullable=False),
        sa.Column("usage", JSON_TYPE),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["correlation_id"],
            ["orchestrator_state.correlation_id"],
            name="fuel_ledger_correlation_id_fkey",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("idempotency_key", name="fuel_ledger_idempotency_key_key"),
    )
    op.create_index("idx_fuel_ledger_correlation_id", "fuel_ledger", ["correlation_id"])

    op.create_table(
        "outbox",
        sa.Column("id", ID_TYPE, primary_key=True, autoincrement=True),
        sa.Column("correlation_id", UUID_TYPE),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("key", sa.String(255)),
        sa.Column("headers", JSON_TYPE, nullable=False),
        sa.Column("payload", JSON_TYPE, nullable=False),
        sa.Column("dedup_key", sa.String(600)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("published_at", TS),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text()),
        sa.UniqueConstraint("dedup_key", name="outbox_dedup_key_key"),
    )
    op.create_index("idx_outbox_unpublished", "outbox", ["published_at", "id"])


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("fuel_ledger")
    op.drop_table("step_runs")
    op.drop_table("orchestrator_state")
