"""API keys of the HTTP API and the web console.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

``api_keys``: one row per key (``chassis keys create``): the client it acts for, whether
it is an admin key, the SHA-256 of its secret (the key is shown once and never stored),
when it was made, last used and revoked. Two indexes for the runs list of the HTTP
API and console (newest first, of every client or of one).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("label", sa.String(255)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS),
        sa.Column("revoked_at", TS))
    op.create_index("idx_orchestrator_state_created_at", "orchestrator_state", ["created_at"])
    op.create_index("idx_orchestrator_state_client_created", "orchestrator_state",
                    ["client_id", "created_at"])


def downgrade() -> None:
    op.drop_index("idx_orchestrator_state_client_created", "orchestrator_state")
    op.drop_index("idx_orchestrator_state_created_at", "orchestrator_state")
    op.drop_table("api_keys")
