"""The AI providers' circuit breakers: one row of ``circuit_breakers`` per provider,
shared by every worker (the rules are :mod:`chassis.ai.breaker`'s; this is their SQL).

Every change is one conditional statement, so concurrent workers agree without a lock
held across a request: the cool-down's end is taken by exactly one caller (an UPDATE
that only matches while the breaker is still open and due), failures are counted by
``failures = failures + 1`` in the row. PostgreSQL re-checks a conditional UPDATE
against the row a concurrent one committed; SQLite runs writers one at a time. A
provider without a row is closed. Times are the workers' clocks (keep them in sync).

States: ``closed`` (requests go; ``failures`` in a row are counted), ``open`` (no
request until ``opened_until``), ``half_open`` (one caller's probe request is under
way; the others wait; ``opened_until`` is the end of the probe's lease, after which
another caller may probe, should the prober have died).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from chassis.store.tables import circuit_breakers

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)

b = circuit_breakers.c


@dataclass(frozen=True)
class BreakerState:
    """One provider's breaker, as read."""

    provider: str
    state: str = CLOSED
    failures: int = 0
    """Counted failures in a row."""
    opened_until: datetime | None = None
    """Open: the end of the cool-down; half-open: the end of the probe's lease."""

    def wait(self, now: datetime) -> float:
        """Seconds until ``opened_until`` (0 when it has passed or is unset)."""
        if self.opened_until is None:
            return 0.0
        return max(0.0, (self.opened_until - now).total_seconds())


@dataclass(frozen=True)
class Permit:
    """May a request go now? ``probe``: this caller holds the half-open probe (its
    outcome closes or re-opens the breaker). ``state``: the breaker as it was decided."""

    allowed: bool
    state: BreakerState
    probe: bool = False


def _row(provider: str, row: Any) -> BreakerState:
    if row is None:
        return BreakerState(provider)
    return BreakerState(provider, row.state, int(row.failures), row.opened_until)


def _read(conn: sa.Connection, provider: str) -> BreakerState:
    return _row(provider, conn.execute(
        sa.select(b.state, b.failures, b.opened_until).where(b.provider == provider)).first())


def now() -> datetime:
    return datetime.now(UTC)


class CircuitBreakers:
    """The breakers' rows in one database (the store role's part for them)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def get(self, provider: str) -> BreakerState:
        """The provider's breaker (closed, no failures, when it has no row)."""
        with self.engine.connect() as conn:
            return _read(conn, provider)

    def acquire(self, provider: str, *, lease: float, at: datetime | None = None) -> Permit:
        """Whether a request to ``provider`` may go now. Closed: yes. Open or half-open
        before ``opened_until``: no. After it: the one caller whose UPDATE moves the
        breaker to half-open (with a probe lease of ``lease`` seconds) may, as the
        probe; the others are told to wait."""
        t = at or now()
        with self.engine.connect() as conn:
            seen = _read(conn, provider)
            if seen.state == CLOSED:
                return Permit(True, seen)
            if seen.wait(t) > 0:
                return Permit(False, seen)
        with self.engine.begin() as conn:
            until = t + timedelta(seconds=lease)
            won = conn.execute(
                circuit_breakers.update()
                .where(b.provider == provider, b.state.in_((OPEN, HALF_OPEN)),
                       b.opened_until <= t)
                .values(state=HALF_OPEN, opened_until=until, updated_at=t)).rowcount
            if won:
                return Permit(True, BreakerState(provider, HALF_OPEN, seen.failures, until),
                              probe=True)
            latest = _read(conn, provider)
        return Permit(latest.state == CLOSED, latest)

    def failed(self, provider: str, *, threshold: int, cooldown: float, probe: bool = False,
               at: datetime | None = None) -> tuple[BreakerState, bool]:
        """Count a failure. Closed: ``failures`` + 1, opening for ``cooldown`` seconds at
        ``threshold``. ``probe``: the half-open probe failed, it opens again. A failure
        while the breaker is open (a request sent before it opened) changes nothing.
        Returns the breaker afterwards, and whether this failure was counted."""
        t = at or now()
        until = t + timedelta(seconds=cooldown)
        with self.engine.begin() as conn:
            if probe:
                done = conn.execute(circuit_breakers.update()
                                    .where(b.provider == provider, b.state == HALF_OPEN)
                                    .values(state=OPEN, failures=b.failures + 1,
                                            opened_until=until, updated_at=t))
                return _read(conn, provider), bool(done.rowcount)
            insert: Any = (postgresql.insert if conn.dialect.name == "postgresql"
                           else sqlite.insert)(circuit_breakers)
            conn.execute(insert.values(provider=provider, state=CLOSED, failures=0,
                                       opened_until=None, updated_at=t)
                         .on_conflict_do_nothing(index_elements=[b.provider]))
            opens = b.failures + 1 >= threshold
            done = conn.execute(circuit_breakers.update()
                                .where(b.provider == provider, b.state == CLOSED)
                                .values(failures=b.failures + 1,
                                        state=sa.case((opens, OPEN), else_=CLOSED),
                                        opened_until=sa.case(
                                            (opens, sa.literal(until, b.opened_until.type)),
                                            else_=sa.null()),
                                        updated_at=t))
            return _read(conn, provider), bool(done.rowcount)

    def succeeded(self, provider: str, *, at: datetime | None = None) -> bool:
        """The provider answered: the breaker closes and its count starts again. True
        when that changed anything (no write when it was closed with no failures)."""
        t = at or now()
        with self.engine.begin() as conn:
            return bool(conn.execute(
                circuit_breakers.update()
                .where(b.provider == provider,
                       sa.or_(b.state != CLOSED, b.failures != 0))
                .values(state=CLOSED, failures=0, opened_until=None, updated_at=t)).rowcount)

    def reset(self, provider: str) -> None:
        """Forget the provider's breaker (closed, no failures): for operators and tests."""
        with self.engine.begin() as conn:
            conn.execute(circuit_breakers.delete().where(b.provider == provider))


def states(conn: sa.Connection) -> list[BreakerState]:
    """Every breaker that has a row, by provider (for the metrics)."""
    return [BreakerState(r.provider, r.state, int(r.failures), r.opened_until)
            for r in conn.execute(sa.select(b.provider, b.state, b.failures, b.opened_until)
                                  .order_by(b.provider))]


__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "STATES", "BreakerState", "CircuitBreakers",
           "Permit", "states"]
