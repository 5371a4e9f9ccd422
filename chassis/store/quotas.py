"""Client quotas: fuel per window (day, month, total), charged in the transaction of
every reservation and debit.

Each client whose charges are counted has one ``client_usage`` row: the fuel spent in
its quota's current window (a new window starts from 0) and the fuel its AI attempts
hold now. A transition's decision says what it charges (``charged``: prices and
reservations a quota may refuse; ``released``: holds settled for less; ``forced``:
compensations and consumption beyond a hold, never refused) and how much its holds
changed (``held``). The write adds the fuel spent to the window and the holds to
``held``, in the same row, and refuses the whole transition (:class:`QuotaRace`,
nothing written) when the refusable part takes spent + held past the quota: the store
then reads what is left and decides again, so any number of concurrent workflows of
one client never exceed it. A hold settled in a later window (or after the quota was
set) is taken from ``held``, never from a window that did not count it.

Rows are written for a client with a quota, and for any client whose holds change (so
that a quota set later sees what is held); other transitions touch no shared row.
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
#: A decision's fuel as the quota sees it: (charged, released, forced, held).
Fuel = tuple[int, int, int, int]


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


def _same(a: datetime, b: datetime) -> bool:
    return a.astimezone(UTC) == b.astimezone(UTC)


def read(conn: sa.Connection, client_id: str, ts: datetime) -> Quota | None:
    """The client's quota and what is left of it in the window of ``ts``."""
    row = conn.execute(sa.select(client_quotas.c.per, client_quotas.c.fuel)
                       .where(client_quotas.c.client_id == client_id)).first()
    if row is None:
        return None
    usage = conn.execute(sa.select(client_usage.c.window_start, client_usage.c.fuel,
                                   client_usage.c.held)
                         .where(client_usage.c.client_id == client_id)).first()
    used = held = 0
    if usage is not None:
        held = int(usage.held)
        if _same(usage.window_start, window_starts(ts)[row.per]):
            used = int(usage.fuel)
    return Quota(client_id, row.per, int(row.fuel), int(row.fuel) - used - held, used, held)


def charge(conn: sa.Connection, client_id: str, fuel: Fuel, ts: datetime) -> None:
    """Count a decision's fuel for its client (any database, in the caller's
    transaction); :class:`QuotaRace` when that takes it past its quota (the caller's
    transaction must then be rolled back)."""
    if not any(fuel):  # (a transition that charges nothing reads no quota)
        return
    charged, released, forced, held = fuel
    spent = charged + released + forced - held
    quota = conn.execute(sa.select(client_quotas.c.per, client_quotas.c.fuel)
                         .where(client_quotas.c.client_id == client_id)).first()
    if quota is None and not held:
        return
    start = window_starts(ts)[quota.per] if quota is not None else EPOCH
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    ins = dialect.insert(client_usage).values(
        client_id=client_id, window_start=start,
        fuel=spent if quota is not None else 0, held=held)
    t = client_usage.c
    row = conn.execute(ins.on_conflict_do_update(
        index_elements=["client_id"],
        set_={"fuel": sa.case((t.window_start == ins.excluded.window_start, t.fuel),
                              else_=0) + ins.excluded.fuel,
              "window_start": ins.excluded.window_start,
              "held": t.held + ins.excluded.held})
        .returning(t.fuel, t.held)).one()
    if quota is not None and charged > 0 and row.fuel + row.held - forced > quota.fuel:
        raise QuotaRace(client_id)


def pg_params(client_id: str, fuel: Fuel, ts: datetime) -> dict[str, Any]:
    """Parameters of the ``quota`` part of PostgreSQL's one-statement write."""
    starts = window_starts(ts)
    charged, released, forced, held = fuel
    return {"q_client": client_id, "q_spent": charged + released + forced - held,
            "q_held": held, "q_charged": charged, "q_forced": forced,
            "q_day": starts["day"], "q_month": starts["month"], "q_total": starts["total"]}


#: The quota part of PostgreSQL's write (see chassis.store.pg): the client's row
#: upserted (if it has a quota, or its holds change), and chassis_quota_check raising
#: REFUSED (the statement, all of it, then writes nothing) when the refusable charges
#: take spent + held past the quota. The row is locked by the upsert and RETURNING
#: gives its new values: concurrent charges of one client are counted one after the
#: other.
PG_PART = """INSERT INTO client_usage AS u (client_id, window_start, fuel, held)
  SELECT %(q_client)s,
    CASE q.per WHEN 'day' THEN %(q_day)s::timestamptz
      WHEN 'month' THEN %(q_month)s::timestamptz ELSE %(q_total)s::timestamptz END,
    CASE WHEN q.per IS NULL THEN 0 ELSE %(q_spent)s END, %(q_held)s
  FROM s LEFT JOIN client_quotas q ON q.client_id = %(q_client)s
  WHERE q.client_id IS NOT NULL OR %(q_held)s <> 0
  ON CONFLICT (client_id) DO UPDATE
    SET fuel = CASE WHEN u.window_start = EXCLUDED.window_start THEN u.fuel ELSE 0 END
               + EXCLUDED.fuel,
      window_start = EXCLUDED.window_start, held = u.held + EXCLUDED.held
  RETURNING chassis_quota_check(u.fuel + u.held,
    (SELECT fuel FROM client_quotas WHERE client_id = %(q_client)s),
    %(q_charged)s, %(q_forced)s) AS ok"""

#: Created by migration 0007 on PostgreSQL.
PG_FUNCTION = """CREATE OR REPLACE FUNCTION chassis_quota_check(
    used bigint, quota bigint, charged bigint, forced bigint) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
  IF quota IS NOT NULL AND charged > 0 AND used - forced > quota THEN
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
