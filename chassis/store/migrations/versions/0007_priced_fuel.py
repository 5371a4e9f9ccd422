"""Fuel that means money: ledger rows of a kind, client quotas, recorded model
responses, circuit breakers.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

- ``fuel_ledger.kind``: ``debit`` (a price from the table, as before), ``reserve`` (an AI
  attempt's worst case, held at dispatch), ``settle`` (what the attempt consumed) and
  ``release`` (the rest of the hold). ``amount`` is what a row charges (the ledger's sum
  is still the workflow's spent fuel); ``held`` what it holds (+) or lets go (-), whose
  sum is the fuel reserved. ``model`` is the model an AI row was priced for. Existing
  rows are debits.
- ``client_quotas``: a client's fuel per window (day, month, total);
  ``client_usage``: what its current window has spent, and what its AI attempts hold.
- ``model_responses``: a model's answer to an attempt, kept as soon as it arrives, so
  a redelivered attempt does not call (and pay) again.
- ``circuit_breakers``: one per provider, shared by every worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UUID_TYPE = sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("fuel_ledger") as t:
        t.add_column(sa.Column("kind", sa.String(16), nullable=False,
                               server_default="debit"))
        t.add_column(sa.Column("held", sa.Integer, nullable=False, server_default="0"))
        t.add_column(sa.Column("model", sa.String(255)))
    op.create_index("idx_fuel_ledger_client_id", "fuel_ledger", ["client_id"])
    op.create_table(
        "client_quotas",
        sa.Column("client_id", sa.String(255), primary_key=True),
        sa.Column("per", sa.String(16), nullable=False),
        sa.Column("fuel", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TS, nullable=False))
    op.create_table(
        "client_usage",
        sa.Column("client_id", sa.String(255), primary_key=True),
        sa.Column("window_start", TS, nullable=False),
        sa.Column("fuel", sa.BigInteger, nullable=False),
        sa.Column("held", sa.BigInteger, nullable=False))
    op.create_table(
        "model_responses",
        sa.Column("correlation_id", UUID_TYPE,
                  sa.ForeignKey("orchestrator_state.correlation_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("step_name", sa.String(255), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("response", JSON_TYPE, nullable=False),
        sa.Column("created_at", TS, nullable=False))
    op.create_table(
        "circuit_breakers",
        sa.Column("provider", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("opened_until", TS),
        sa.Column("updated_at", TS, nullable=False))
    if op.get_bind().dialect.name == "postgresql":
        from chassis.store.quotas import PG_FUNCTION

        op.execute(PG_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS chassis_quota_check(bigint, bigint, bigint, "
                   "bigint)")
    op.drop_table("circuit_breakers")
    op.drop_table("model_responses")
    op.drop_table("client_usage")
    op.drop_table("client_quotas")
    op.drop_index("idx_fuel_ledger_client_id", "fuel_ledger")
    with op.batch_alter_table("fuel_ledger") as t:
        t.drop_column("model")
        t.drop_column("held")
        t.drop_column("kind")
