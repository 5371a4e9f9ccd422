"""PostgreSQL: a transition's writes as ONE statement (data-modifying CTEs).

The state update is guarded by its version; every other write selects ``FROM s`` (the
updated state row), so when the version moved nothing at all is written. One statement
in autocommit mode is one atomic transaction: the hot path pays one round trip for all
its writes instead of BEGIN, five statements and COMMIT.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from psycopg.types.json import Jsonb

from chassis.store import quotas
from chassis.store.rows import Row, Rows

_STATE = """s AS (
  UPDATE orchestrator_state SET status = %(status)s, current_step = %(current_step)s,
    awaited_steps = %(awaited_steps)s,
    final_result = %(final_result)s, error = %(error)s, fuel_spent = %(fuel_spent)s,
    fuel_budget = %(fuel_budget)s,
    saga = %(saga)s, version = %(version)s, updated_at = %(updated_at)s
  WHERE correlation_id = %(cid)s AND version = %(b_version)s
  RETURNING correlation_id)"""

_JSON_COLUMNS = ("awaited_steps", "initial_request_data", "final_result", "plan", "saga")
_NEW = """s AS (
  INSERT INTO orchestrator_state ({columns}) VALUES ({values})
  ON CONFLICT (correlation_id) DO NOTHING
  RETURNING correlation_id)"""

_PARTS: dict[str, str] = {
    "ledger": """INSERT INTO fuel_ledger (correlation_id, client_id, step_name, action, amount,
    idempotency_key, created_at, kind, held, model, usage)
  SELECT s.correlation_id, x.client_id, x.step_name, x.action, x.amount, x.idempotency_key,
    x.created_at, x.kind, x.held, x.model, x.usage
  FROM s, jsonb_to_recordset(%(ledger)s) AS x(client_id text, step_name text, action text,
    amount int, idempotency_key text, created_at timestamptz, kind text, held int,
    model text, usage jsonb)""",
    "runs": """INSERT INTO step_runs (correlation_id, step_name, attempt, parent_step, action,
    status, request_id, dispatched_at, started_at, finished_at, due_at, sent_at, deadline,
    pending, output, error, error_type)
  SELECT s.correlation_id, x.step_name, x.attempt, x.parent_step, x.action, x.status,
    x.request_id, x.dispatched_at, x.started_at, x.finished_at, x.due_at, x.sent_at,
    x.deadline, x.pending, x.output, x.error, x.error_type
  FROM s, jsonb_to_recordset(%(runs)s) AS x(step_name text, attempt int, parent_step text,
    action text, status text, request_id text, dispatched_at timestamptz,
    started_at timestamptz, finished_at timestamptz, due_at timestamptz,
    sent_at timestamptz, deadline timestamptz, pending int, output jsonb, error text,
    error_type text)""",
    "usage": """UPDATE fuel_ledger l SET usage = x.usage
  FROM s, jsonb_to_recordset(%(usage)s) AS x(b_key text, usage jsonb)
  WHERE l.idempotency_key = x.b_key""",
    "sent": """UPDATE step_runs r SET status = x.status, sent_at = x.sent_at,
    deadline = x.deadline
  FROM s, jsonb_to_recordset(%(sent)s) AS x(b_step text, b_attempt int, status text,
    sent_at timestamptz, deadline timestamptz)
  WHERE r.correlation_id = s.correlation_id AND r.step_name = x.b_step
    AND r.attempt = x.b_attempt""",
    "finished": """UPDATE step_runs r SET status = x.status, output = x.output,
    error = x.error, error_type = x.error_type, finished_at = x.finished_at
  FROM s, jsonb_to_recordset(%(finished)s) AS x(b_step text, b_attempt int, status text,
    output jsonb, error text, error_type text, finished_at timestamptz)
  WHERE r.correlation_id = s.correlation_id AND r.step_name = x.b_step
    AND r.attempt = x.b_attempt AND r.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')""",
    "progress": """INSERT INTO step_attempts (correlation_id, name, attempt, base, scheduled)
  SELECT s.correlation_id, x.name, x.attempt, x.base, x.scheduled
  FROM s, jsonb_to_recordset(%(progress)s) AS x(name text, attempt int, base int,
    scheduled int)
  ON CONFLICT (correlation_id, name) DO UPDATE SET attempt = EXCLUDED.attempt,
    base = EXCLUDED.base, scheduled = EXCLUDED.scheduled""",
    "collected": """INSERT INTO step_outputs (correlation_id, name, rev, value)
  SELECT s.correlation_id, x.name, x.rev, x.value
  FROM s, jsonb_to_recordset(%(collected)s) AS x(name text, rev int, value jsonb)
  ON CONFLICT (correlation_id, name) DO UPDATE SET rev = EXCLUDED.rev,
    value = EXCLUDED.value""",
    "history": """INSERT INTO workflow_events (correlation_id, version, at, kind, step,
    attempt, actor, data)
  SELECT s.correlation_id, x.version, x.at, x.kind, x.step, x.attempt, x.actor, x.data
  FROM s, jsonb_to_recordset(%(history)s) AS x(version int, at timestamptz, kind text,
    step text, attempt int, actor text, data jsonb)""",
    "messages": """INSERT INTO outbox (correlation_id, topic, key, headers, payload, dedup_key,
    created_at)
  SELECT s.correlation_id, x.topic, x.key, x.headers, x.payload, x.dedup_key, x.created_at
  FROM s, jsonb_to_recordset(%(messages)s) AS x(topic text, key text, headers jsonb,
    payload jsonb, dedup_key text, created_at timestamptz)""",
}
_sql_cache: dict[tuple[str, frozenset[str]], str] = {}


def _sql(head: str, parts: frozenset[str]) -> str:
    sql = _sql_cache.get((head, parts))
    if sql is None:
        ctes = [head] + [f"{name} AS ({_PARTS[name]})" for name in _PARTS if name in parts]
        if "quota" in parts:  # (its RETURNING refuses, raising, past the quota)
            ctes.append(f"quota AS ({quotas.PG_PART})")
        sql = "WITH " + ",\n".join(ctes) + "\nSELECT count(*) FROM s"
        _sql_cache[(head, parts)] = sql
    return sql


def _json(value: Any) -> Jsonb | None:
    """SQL NULL stays NULL; anything else is stored as JSONB."""
    return None if value is None else Jsonb(value)


def _run(conn: sa.Connection, head: str, params: dict[str, Any], rows: Rows) -> bool:
    parts = set()
    for name in _PARTS:
        batch = getattr(rows, name)
        if batch:
            parts.add(name)
            params[name] = _plain(batch)
    if rows.quota:
        parts.add("quota")
        params.update(rows.quota)
    count = conn.exec_driver_sql(_sql(head, frozenset(parts)), params).scalar_one()
    return int(count) == 1


def create(conn: sa.Connection, values: dict[str, Any], rows: Rows) -> bool:
    """Insert a new workflow and its first rows at once; False when it already exists."""
    columns = sorted(values)
    head = _NEW.format(columns=", ".join(columns),
                       values=", ".join(f"%({c})s" for c in columns))
    params = {c: _json(values[c]) if c in _JSON_COLUMNS else values[c] for c in columns}
    return _run(conn, head, params, rows)


def _plain(rows: list[Row]) -> Jsonb:
    return Jsonb([{k: v.isoformat() if isinstance(v, datetime) else v for k, v in r.items()}
                  for r in rows])


def write(conn: sa.Connection, values: dict[str, Any], cid: str, version: int,
          rows: Rows) -> bool:
    """Write the new state and its rows at once; False when ``version`` is stale."""
    params: dict[str, Any] = {
        **values, "cid": cid, "b_version": version,
        **{c: _json(values[c]) for c in _JSON_COLUMNS if c in values},
    }
    return _run(conn, _STATE, params, rows)
