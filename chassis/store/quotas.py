"""Client quotas: fuel per window (day, month, total), charged in the transaction of
every reservation and debit.

A transition's decision says what it charges its client (``charged``: prices and
reservations a quota may refuse; ``released``: holds settled for less; ``forced``:
compensations and consumption beyond a hold, never refused). The write adds them to
the client's current window, if the client has a quota, and refuses the whole
transition (:class:`QuotaRace`, nothing written) when the refusable part takes the
window past the quota: the store then reads what is left and decides again, so any
number of concurrent workflows of one client never exceed it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from chassis.state import Quota
from chassis.store.tables import client_quotas, client_usage

#: Windows a quota may be counted in.
WINDOWS = ("day", "month", "total")
#: Where a ``total`` quota's one window starts.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: SQLSTATE of PostgreSQL's refusal (raised by chassis_quota_check, migration 0007).
REFUSED = "CQ001"


class QuotaRace(Exception):
    """A transition's charges would take its client past the quota: nothing was
    written; decide again knowing what is left."""

    def __init__(self, client_id: str) -> None:
        super().__init__(f"client {client_id!r}: quota exceeded by a concurrent charge")
        self.client_id = client_id


def window_starts(ts: datetime) -> dict[str, datetime]:
    """Where each kind of window containing ``ts`` starts (UTC)."""
    ts = ts.astimezone(UTC)
    day = ts.replace(hour=0, minute=0, second=0, microsecond=0)
    return {"day": day, "month": day.replace(day=1), "total": EPOCH}


def read(conn: sa.Connection, client_id: str, ts: datetime) -> Quota | None:
    """The client's quota and what is left of it in the window of ``ts``."""
    row = conn.execute(sa.select(client_quotas.c.per, client_quotas.c.fuel)
                       .where(client_quotas.c.client_id == client_id)).first()
    if row is None:
        return None
    used = conn.execute(sa.select(client_usage.c.fuel).where(
        client_usage.c.client_id == client_id,
        client_usage.c.window_start == window_starts(ts)[row.per])).scalar() or 0
    return Quota(client_id, row.per, int(row.fuel), int(row.fuel) - int(used))


def charge(conn: sa.Connection, client_id: str, fuel: tuple[int, int, int],
           ts: datetime) -> None:
    """Add a decision's (charged, released, forced) fuel to the client's window, if it
    has a quota; :class:`QuotaRace` when that takes it past the quota (the caller's
    transaction must then be rolled back)."""
    charged, released, forced = fuel
    delta = charged + released + forced
    if not delta:
        return
    quota = conn.execute(sa.select(client_quotas.c.per, client_quotas.c.fuel)
                         .where(client_quotas.c.client_id == client_id)).first()
    if quota is None:
        return
    start = window_starts(ts)[quota.per]
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    ins = dialect.insert(client_usage).values(client_id=client_id, window_start=start,
                                              fuel=delta)
    used = conn.execute(ins.on_conflict_do_update(
        index_elements=["client_id", "window_start"],
        set_={"fuel": client_usage.c.fuel + ins.excluded.fuel})
        .returning(client_usage.c.fuel)).scalar_one()
    if charged > 0 and used - forced > quota.fuel:
        raise QuotaRace(client_id)


def pg_params(client_id: str, fuel: tuple[int, int, int], ts: datetime) -> dict[str, Any]:
    """Parameters of the ``quota`` part of PostgreSQL's one-statement write."""
    starts = window_starts(ts)
    charged, released, forced = fuel
    return {"q_client": client_id, "q_delta": charged + released + forced,
            "q_charged": charged, "q_forced": forced, "q_day": starts["day"],
            "q_month": starts["month"], "q_total": starts["total"]}


#: The quota part of PostgreSQL's write (see chassis.store.pg): the window's row
#: upserted, and chassis_quota_check raising REFUSED (the statement, all of it, then
#: writes nothing) when the refusable charges take it past the quota.
PG_PART = """INSERT INTO client_usage (client_id, window_start, fuel)
  SELECT q.client_id, CASE q.per WHEN 'day' THEN %(q_day)s::timestamptz
    WHEN 'month' THEN %(q_month)s::timestamptz ELSE %(q_total)s::timestamptz END,
    %(q_delta)s
  FROM s, client_quotas q WHERE q.client_id = %(q_client)s
  ON CONFLICT (client_id, window_start) DO UPDATE
    SET fuel = client_usage.fuel + EXCLUDED.fuel
  RETURNING chassis_quota_check(client_usage.fuel,
    (SELECT fuel FROM client_quotas WHERE client_id = %(q_client)s),
    %(q_charged)s, %(q_forced)s) AS ok"""

#: Created by migration 0007 on PostgreSQL.
PG_FUNCTION = """CREATE OR REPLACE FUNCTION chassis_quota_check(
    used bigint, quota bigint, charged bigint, forced bigint) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
  IF charged > 0 AND used - forced > quota THEN
    RAISE EXCEPTION 'agentchassis: client quota exceeded' USING ERRCODE = 'CQ001';
  END IF;
  RETURN 0;
END $$"""


def is_refusal(exc: BaseException) -> bool:
    """True for PostgreSQL's quota refusal (raised through SQLAlchemy)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == REFUSED


def set_quota(conn: sa.Connection, client_id: str, per: str, fuel: int,
              ts: datetime) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    ins = dialect.insert(client_quotas).values(client_id=client_id, per=per, fuel=fuel,
                                               updated_at=ts)
    conn.execute(ins.on_conflict_do_update(
        index_elements=["client_id"],
        set_={"per": ins.excluded.per, "fuel": ins.excluded.fuel,
              "updated_at": ins.excluded.updated_at}))


def remove_quota(conn: sa.Connection, client_id: str) -> bool:
    return conn.execute(client_quotas.delete().where(
        client_quotas.c.client_id == client_id)).rowcount > 0
