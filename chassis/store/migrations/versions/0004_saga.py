"""Saga: compensation progress of each workflow.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

``orchestrator_state.saga`` keeps what the coordinator needs to undo a workflow: its
completed steps that have a ``compensate`` (in order of completion), and while it is
COMPENSATING (or FAILED in a compensation) the compensations still to run, the error
that started them and the status to end with. NULL for a workflow with none of that
(every workflow already there).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.add_column(sa.Column("saga", JSON_TYPE))


def downgrade() -> None:
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.drop_column("saga")
