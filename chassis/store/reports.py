"""Fuel reports: what the ledger says was spent and is reserved, summed in the database.

- :func:`fuel_report`: fuel spent (Σ ``amount``) and tokens by client, plan, model and
  day (the UTC date of each row), from the rows that charge (``debit`` and ``settle``;
  a ``reserve`` or ``release`` row only holds fuel, it charges nothing and consumed no
  tokens). Over indexed columns (``client_id``, ``created_at``); the same on SQLite and
  PostgreSQL.
- :func:`reserved_by_client`: fuel held now (Σ ``held``) by the workflows under way,
  per client, the biggest ``top`` each on their own and the rest as ``other`` (for
  metrics: bounded series).

Tokens are read from each row's ``usage`` JSON; a count that is not a number (an action
may return any ``usage``) counts as none rather than failing the report.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import sqlalchemy as sa

from chassis.state import Status
from chassis.store.tables import fuel_ledger, orchestrator_state

#: The token counts a report sums, as the ``usage`` JSON names them.
TOKENS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
          "cache_read_input_tokens")
#: Rows that only hold or let go of fuel: they charge nothing.
HOLDING_KINDS = ("reserve", "release")
#: What the report shows for a workflow started from a file, or a row priced for no model.
NONE = "-"


def _day(dialect: str) -> Any:
    """The UTC date of a row's created_at, in SQL."""
    ts = fuel_ledger.c.created_at
    if dialect == "postgresql":
        return sa.cast(sa.func.timezone("UTC", ts), sa.Date)
    return sa.func.date(ts)  # SQLite keeps UTC text (see tables.UtcDateTime)


def _tokens(dialect: str, name: str) -> Any:
    """Σ of ``usage[name]`` where it is a number (no overflow: numeric, or SQLite's
    floating total())."""
    usage = fuel_ledger.c.usage
    if dialect == "postgresql":
        value = sa.func.jsonb_extract_path(usage, name)
        number = sa.case((sa.func.jsonb_typeof(value) == "number",
                          sa.cast(sa.func.jsonb_extract_path_text(usage, name), sa.Numeric)),
                         else_=None)
        return sa.func.coalesce(sa.func.sum(number), 0)
    path = f"$.{name}"
    number = sa.case((sa.func.json_type(usage, path).in_(("integer", "real")),
                      sa.func.json_extract(usage, path)), else_=None)
    return sa.func.total(number)


def _iso_day(value: date | str) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


def fuel_report(engine: sa.Engine, client: str | None = None,
                since: datetime | None = None) -> list[dict[str, Any]]:
    """Fuel spent and tokens by client, plan, model and day, oldest day first: one
    dict per group (client_id, plan, model, day, spent, rows and each of
    :data:`TOKENS`). ``client``: that client's rows only; ``since``: rows created then
    or later (an aware datetime)."""
    led, o = fuel_ledger.c, orchestrator_state.c
    dialect = engine.dialect.name
    day = _day(dialect).label("day")
    plan = sa.func.coalesce(o.plan_name, NONE).label("plan")
    model = sa.func.coalesce(led.model, NONE).label("model")
    q = (sa.select(led.client_id, plan, model, day,
                   sa.func.coalesce(sa.func.sum(led.amount), 0).label("spent"),
                   sa.func.count().label("rows"),
                   *(_tokens(dialect, t).label(t) for t in TOKENS))
         .select_from(fuel_ledger.join(orchestrator_state,
                                       led.correlation_id == o.correlation_id))
         .where(led.kind.not_in(HOLDING_KINDS))
         .group_by(led.client_id, plan, model, day)
         .order_by(day, led.client_id, plan, model))
    if client is not None:
        q = q.where(led.client_id == client)
    if since is not None:
        q = q.where(led.created_at >= since)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return [{"client_id": r.client_id, "plan": r.plan, "model": r.model,
             "day": _iso_day(r.day), "spent": int(r.spent), "rows": int(r.rows),
             **{t: int(getattr(r, t) or 0) for t in TOKENS}} for r in rows]


def reserved_by_client(conn: sa.Connection, top: int) -> dict[str, int]:
    """Fuel reserved now (Σ ``held``) by the workflows under way, per client that
    holds some: the ``top`` biggest by name, the rest summed as ``other``."""
    led, o = fuel_ledger.c, orchestrator_state.c
    under_way = [s.value for s in Status if not s.finished]
    held = sa.func.sum(led.held)
    joined = fuel_ledger.join(orchestrator_state, led.correlation_id == o.correlation_id)
    rows = conn.execute(
        sa.select(led.client_id, held.label("held")).select_from(joined)
        .where(o.status.in_(under_way))
        .group_by(led.client_id).having(held != 0)
        .order_by(held.desc(), led.client_id).limit(top + 1)).all()
    out = {r.client_id: int(r.held) for r in rows[:top]}
    if len(rows) > top:
        total = conn.execute(sa.select(held).select_from(joined)
                             .where(o.status.in_(under_way))).scalar_one()
        out["other"] = int(total or 0) - sum(out.values())
    return out


__all__ = ["HOLDING_KINDS", "NONE", "TOKENS", "fuel_report", "reserved_by_client"]
