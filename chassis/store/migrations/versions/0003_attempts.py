"""Attempts: one step_runs row per attempt, leases, deadlines, scheduled retries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

``step_runs.attempts`` counted deliveries of a step; it becomes ``deliveries`` and the
key (workflow, step) becomes (workflow, step, attempt). Existing rows are attempt 1.
``orchestrator_state.attempts`` keeps each step's latest attempt for the coordinator
(filled in for the workflows already there: every step with a row is at attempt 1),
``nonce`` a workflow's secret for its request ids (none for the workflows already there,
whose request ids stay as they were), and ``outbox.failed_at`` marks a row Kafka refused
for good, set aside so that it blocks nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.add_column(sa.Column("attempts", JSON_TYPE))
        batch.add_column(sa.Column("nonce", sa.String(64)))
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("failed_at", TS))
    with op.batch_alter_table("step_runs") as batch:
        batch.alter_column("attempts", new_column_name="deliveries",
                           existing_type=sa.Integer(), existing_nullable=False,
                           existing_server_default="0")
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False,
                                   server_default="1"))
        batch.add_column(sa.Column("error_type", sa.String(255)))
        batch.add_column(sa.Column("due_at", TS))
        batch.add_column(sa.Column("sent_at", TS))
        batch.add_column(sa.Column("sends", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_until", TS))
        batch.add_column(sa.Column("deadline", TS))
        batch.add_column(sa.Column("pending", sa.Integer()))
        batch.drop_constraint("uq_step_runs_workflow_step", type_="unique")
        batch.create_unique_constraint("uq_step_runs_workflow_step_attempt",
                                       ["correlation_id", "step_name", "attempt"])
    op.execute("UPDATE step_runs SET sent_at = dispatched_at")
    # a fan-out under way when upgrading: its Celery sub-tasks not yet back
    op.execute("""UPDATE step_runs SET pending = (
        SELECT count(*) FROM step_runs c
        WHERE c.correlation_id = step_runs.correlation_id
          AND c.parent_step = step_runs.step_name
          AND c.status IN ('DISPATCHED', 'RUNNING'))
      WHERE action = 'fan_out' AND status = 'AWAITING'""")
    # the coordinator's attempts of each workflow: every step with a row had attempt 1
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""UPDATE orchestrator_state o SET attempts = r.a FROM (
            SELECT correlation_id, jsonb_object_agg(step_name, jsonb_build_array(1, 0, 0)) a
            FROM step_runs GROUP BY correlation_id) r
          WHERE o.correlation_id = r.correlation_id""")
    else:
        op.execute("""UPDATE orchestrator_state SET attempts = (
            SELECT json_group_object(step_name, json_array(1, 0, 0)) FROM step_runs r
            WHERE r.correlation_id = orchestrator_state.correlation_id)
          WHERE EXISTS (SELECT 1 FROM step_runs r
                        WHERE r.correlation_id = orchestrator_state.correlation_id)""")


def downgrade() -> None:
    op.execute("DELETE FROM step_runs WHERE attempt > 1")
    with op.batch_alter_table("step_runs") as batch:
        batch.drop_constraint("uq_step_runs_workflow_step_attempt", type_="unique")
        batch.create_unique_constraint("uq_step_runs_workflow_step",
                                       ["correlation_id", "step_name"])
        for name in ("pending", "deadline", "lease_until", "sends", "sent_at", "due_at",
                     "error_type", "attempt"):
            batch.drop_column(name)
        batch.alter_column("deliveries", new_column_name="attempts",
                           existing_type=sa.Integer(), existing_nullable=False,
                           existing_server_default="0")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("failed_at")
    with op.batch_alter_table("orchestrator_state") as batch:
        batch.drop_column("nonce")
        batch.drop_column("attempts")
