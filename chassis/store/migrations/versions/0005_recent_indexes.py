"""Indexes for metrics over recent rows: a scrape costs the same at 100 or 100,000
finished workflows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

``chassis metrics`` counts what is under way (by the status indexes) and what finished
in the last hour: step runs by ``finished_at``, ledger rows by ``created_at``, and the
outbox rows Kafka refused by ``failed_at``.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("idx_step_runs_finished_at", "step_runs", ["finished_at"])
    op.create_index("idx_fuel_ledger_created_at", "fuel_ledger", ["created_at"])
    op.create_index("idx_outbox_failed_at", "outbox", ["failed_at"])
    op.create_index("idx_outbox_correlation_id", "outbox", ["correlation_id"])  # prune


def downgrade() -> None:
    op.drop_index("idx_outbox_correlation_id", "outbox")
    op.drop_index("idx_outbox_failed_at", "outbox")
    op.drop_index("idx_fuel_ledger_created_at", "fuel_ledger")
    op.drop_index("idx_step_runs_finished_at", "step_runs")
