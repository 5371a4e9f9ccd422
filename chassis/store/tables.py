"""Table definitions (SQLAlchemy Core). PostgreSQL gets JSONB and native UUIDs; SQLite JSON text.

Migrations in ``chassis/store/migrations`` create exactly these tables; a test checks
that the migrated schema matches this metadata.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp with time zone, read back aware (UTC) on SQLite too, where the
    column keeps no zone: timestamps read from any database compare with ``now()``."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None and dialect.name == "sqlite":
            return value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

#: JSON everywhere, JSONB on PostgreSQL.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: The seed's correlation_id is a UUID; stored natively on PostgreSQL, as text on SQLite.
UUIDType = sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")
TS = UtcDateTime()



def _id() -> sa.Column[int]:
    """A row id: BIGINT on PostgreSQL, INTEGER (SQLite's rowid alias) on SQLite."""
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                     primary_key=True, autoincrement=True)


def _workflow(primary_key: bool = False) -> sa.Column[str]:
    """The owning workflow; its rows go with it (``primary_key``: the first column of a
    table keyed by workflow and name)."""
    return sa.Column("correlation_id", UUIDType,
                     sa.ForeignKey("orchestrator_state.correlation_id", ondelete="CASCADE"),
                     nullable=False, primary_key=primary_key)


orchestrator_state = sa.Table(
    "orchestrator_state",
    metadata,
    # the seed's columns
    sa.Column("correlation_id", UUIDType, primary_key=True),
    sa.Column("client_id", sa.String(255), nullable=False),
    sa.Column("status", sa.String(50), nullable=False),
    sa.Column("current_step", sa.String(255), nullable=False),
    sa.Column("awaited_steps", JSONType, nullable=False),
    sa.Column("initial_request_data", JSONType),
    sa.Column("final_result", JSONType),
    sa.Column("error", sa.Text),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    # added by agentchassis
    sa.Column("project_id", sa.String(255)),
    sa.Column("request_id", sa.String(255)),
    sa.Column("plan", JSONType, nullable=False),
    sa.Column("plan_name", sa.String(255)),
    sa.Column("plan_version", sa.Integer),
    sa.Column("fuel_budget", sa.Integer, nullable=False),
    sa.Column("fuel_spent", sa.Integer, nullable=False, server_default="0"),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    # 0003: the secret mixed into request ids
    sa.Column("nonce", sa.String(64)),
    # 0004: the saga's progress (see WorkflowState.saga)
    sa.Column("saga", JSONType),
    # 0008: the trace context of the workflow's root span (W3C traceparent), if traced
    sa.Column("traceparent", sa.String(64)),
    sa.Index("idx_orchestrator_state_status", "status"),
    sa.Index("idx_orchestrator_state_updated_at", "updated_at"),
    sa.Index("idx_orchestrator_state_client_id", "client_id"),
    # 0009: the runs list, newest first (of every client, or of one)
    sa.Index("idx_orchestrator_state_created_at", "created_at"),
    sa.Index("idx_orchestrator_state_client_created", "client_id", "created_at"),
)

#: One row per attempt of a step or sub-task (the history: attempt number, started,
#: finished, error), keyed by (workflow, step, attempt).
step_runs = sa.Table(
    "step_runs",
    metadata,
    _id(),
    _workflow(),
    sa.Column("step_name", sa.String(255), nullable=False),
    sa.Column("parent_step", sa.String(255)),
    sa.Column("action", sa.String(255), nullable=False),
    sa.Column("status", sa.String(50), nullable=False),
    # times a worker started this attempt (more than 1 after a worker was lost)
    sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("request_id", sa.String(255)),
    sa.Column("task_id", sa.String(255)),
    sa.Column("output", JSONType),
    sa.Column("error", sa.Text),
    sa.Column("dispatched_at", TS, nullable=False),
    sa.Column("started_at", TS),
    sa.Column("finished_at", TS),
    # 0003: attempts, retries, leases, timeouts
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.Column("error_type", sa.String(255)),
    sa.Column("due_at", TS),  # a retry's time (SCHEDULED, or a countdown)
    sa.Column("sent_at", TS),  # last sent to the broker (or the agent)
    sa.Column("sends", sa.Integer, nullable=False, server_default="0"),  # re-sends
    sa.Column("lease_until", TS),  # RUNNING: renewed by the worker's heartbeat
    sa.Column("deadline", TS),  # the attempt times out then
    sa.Column("pending", sa.Integer),  # fan_out: Celery sub-tasks not yet succeeded
    sa.UniqueConstraint("correlation_id", "step_name", "attempt",
                        name="uq_step_runs_workflow_step_attempt"),
    sa.Index("idx_step_runs_status", "status"),
    sa.Index("idx_step_runs_request_id", "request_id"),
    sa.Index("idx_step_runs_finished_at", "finished_at"),  # 0005: recent runs (metrics)
)

#: 0006: the collected data (the seed's collected_data column), one row per name (a
#: step's output, ``human_feedback``, ``error``) with the workflow version that wrote
#: it: a transition writes the values it sets, never the whole collection.
step_outputs = sa.Table(
    "step_outputs",
    metadata,
    _workflow(primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("rev", sa.Integer, nullable=False),
    sa.Column("value", JSONType),
)

#: 0006: the coordinator's attempts of each step or sub-task (0003 kept them as a map in
#: the workflow's row; see WorkflowState.attempts), one row per name: a transition
#: writes the ones it changes.
step_attempts = sa.Table(
    "step_attempts",
    metadata,
    _workflow(primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("attempt", sa.Integer, nullable=False),  # the latest attempt's number
    sa.Column("base", sa.Integer, nullable=False),  # attempts before this round
    sa.Column("scheduled", sa.Integer, nullable=False),  # 1: it waits for its time
)

fuel_ledger = sa.Table(
    "fuel_ledger",
    metadata,
    _id(),
    _workflow(),
    sa.Column("client_id", sa.String(255), nullable=False),
    sa.Column("step_name", sa.String(255), nullable=False),
    sa.Column("action", sa.String(255), nullable=False),
    sa.Column("amount", sa.Integer, nullable=False),
    sa.Column("idempotency_key", sa.String(600), nullable=False, unique=True),
    sa.Column("usage", JSONType),
    sa.Column("created_at", TS, nullable=False),
    # 0007: debit, reserve, settle or release; ``amount`` charges (its sum is the spent
    # fuel), ``held`` holds (+) or lets go (-) (its sum is the fuel reserved)
    sa.Column("kind", sa.String(16), nullable=False, server_default="debit"),
    sa.Column("held", sa.Integer, nullable=False, server_default="0"),
    sa.Column("model", sa.String(255)),  # the model an AI row was priced for
    sa.Index("idx_fuel_ledger_correlation_id", "correlation_id"),
    sa.Index("idx_fuel_ledger_created_at", "created_at"),  # 0005: recent debits (metrics)
    sa.Index("idx_fuel_ledger_client_id", "client_id"),  # 0007: reports by client
)

#: 0007: a client's fuel quota per window (``per``: day, month or total).
client_quotas = sa.Table(
    "client_quotas",
    metadata,
    sa.Column("client_id", sa.String(255), primary_key=True),
    sa.Column("per", sa.String(16), nullable=False),
    sa.Column("fuel", sa.BigInteger, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

#: 0007: one row per client whose charges are counted: the fuel spent in its quota's
#: current window (``window_start``; a new window starts from 0) and the fuel its AI
#: attempts hold now (whatever the window), written in the transaction of each charge.
client_usage = sa.Table(
    "client_usage",
    metadata,
    sa.Column("client_id", sa.String(255), primary_key=True),
    sa.Column("window_start", TS, nullable=False),
    sa.Column("fuel", sa.BigInteger, nullable=False),
    sa.Column("held", sa.BigInteger, nullable=False),
)

#: 0007: a model's answer to one attempt, kept as soon as it arrives: a redelivered
#: attempt uses it instead of calling (and paying) again.
model_responses = sa.Table(
    "model_responses",
    metadata,
    _workflow(primary_key=True),
    sa.Column("step_name", sa.String(255), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("response", JSONType, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

#: 0007: one circuit breaker per AI provider, shared by every worker.
circuit_breakers = sa.Table(
    "circuit_breakers",
    metadata,
    sa.Column("provider", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # closed, open, half_open
    sa.Column("failures", sa.Integer, nullable=False),  # in a row
    sa.Column("opened_until", TS),
    sa.Column("updated_at", TS, nullable=False),
)

outbox = sa.Table(
    "outbox",
    metadata,
    _id(),
    sa.Column("correlation_id", UUIDType),
    sa.Column("topic", sa.String(255), nullable=False),
    sa.Column("key", sa.String(255)),
    sa.Column("headers", JSONType, nullable=False),
    sa.Column("payload", JSONType, nullable=False),
    sa.Column("dedup_key", sa.String(600), unique=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("published_at", TS),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    # 0003: a row Kafka refused for good (too large, an invalid topic) is set aside
    sa.Column("failed_at", TS),
    sa.Index("idx_outbox_unpublished", "published_at", "id"),
    sa.Index("idx_outbox_failed_at", "failed_at"),  # 0005: refused rows (metrics)
    sa.Index("idx_outbox_correlation_id", "correlation_id"),  # 0005: prune
)

plans = sa.Table(
    "plans",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("content", JSONType, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("name", "content_hash", name="uq_plans_name_content_hash"),
)

#: 0008: what happened to each workflow, in order (append-only; written in the
#: transaction of the transition, claim or record it tells of): ``kind`` (started,
#: dispatched, attempt_started, succeeded, failed, paused, resumed, ...), the step and
#: attempt it is about, who did it (a client, or a worker) and a few details.
workflow_events = sa.Table(
    "workflow_events",
    metadata,
    _id(),
    _workflow(),
    sa.Column("version", sa.Integer),  # the workflow version its transition wrote
    sa.Column("at", TS, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("step", sa.String(255)),
    sa.Column("attempt", sa.Integer),
    sa.Column("actor", sa.String(255)),
    sa.Column("data", JSONType),
    sa.Index("idx_workflow_events_correlation_id", "correlation_id", "id"),
)

#: 0009: API keys of the HTTP API and web console (``chassis keys``): the key's id (shown
#: in lists and the event history), the client it acts for (``admin``: every client's
#: workflows), the SHA-256 of its secret (the key itself is shown once, never stored),
#: and when it was made, last used and revoked.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("client_id", sa.String(255), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("label", sa.String(255)),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("last_used_at", TS),
    sa.Column("revoked_at", TS),
    sa.Column("expires_at", TS),  # 0010: when the key stops working (NULL: never)
)
