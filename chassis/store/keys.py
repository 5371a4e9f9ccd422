"""API keys of the HTTP API and the web console (``chassis keys``).

A key reads ``chassis_<key id>_<secret>``: the id (12 hex digits) names it in lists
and in the event history; only the SHA-256 of the secret is stored (a key is shown
once, when made). The secret is 256 random bits, so a plain hash is as strong as a
slow one; it is compared in constant time. A revoked key is refused at once, and so is
a key past its expiry (``expires_at``, when it was made with one).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from chassis.errors import InputError
from chassis.store.tables import api_keys

PREFIX = "chassis_"
_KEY = re.compile(r"^chassis_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
#: A key's last use is written at most this often (reads stay reads).
TOUCH_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class ApiKey:
    """A key as stored (never its secret)."""

    key_id: str
    client_id: str
    admin: bool
    label: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime | None = None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and datetime.now(UTC) >= _aware(self.expires_at)

    def as_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "client_id": self.client_id, "admin": self.admin,
                "label": self.label, "created_at": _iso(self.created_at),
                "last_used_at": _iso(self.last_used_at),
                "revoked_at": _iso(self.revoked_at), "expires_at": _iso(self.expires_at),
                "expired": self.expired}


def _aware(ts: datetime) -> datetime:
    """(SQLite gives times back without their zone: they were written in UTC.)"""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _row(r: Any) -> ApiKey:
    return ApiKey(r.key_id, r.client_id, bool(r.admin), r.label, r.created_at,
                  r.last_used_at, r.revoked_at, r.expires_at)


def create(engine: sa.Engine, client_id: str, admin: bool = False,
           label: str | None = None,
           expires_in: timedelta | None = None) -> tuple[ApiKey, str]:
    """Make a key for ``client_id`` (working for ``expires_in`` only, when given);
    returns it and the key text (shown once)."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    expires_at = None if expires_in is None else now + expires_in
    with engine.begin() as conn:
        conn.execute(sa.insert(api_keys).values(
            key_id=key_id, client_id=client_id, admin=admin, secret_hash=_digest(secret),
            label=label, created_at=now, expires_at=expires_at))
    return ApiKey(key_id, client_id, admin, label, now, None, None, expires_at), \
        f"{PREFIX}{key_id}_{secret}"


#: How long a key may be made to work: "90s", "30m", "12h", "30d", "2w" (or seconds).
_DURATION = re.compile(r"^\s*(\d{1,9}(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: The longest a key may be made to work for with --expires-in (ten years).
MAX_LIFETIME = timedelta(days=3650)


def parse_lifetime(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or seconds: more than 0, at most ten
    years; InputError otherwise."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    seconds = float(m.group(1)) * _UNIT[m.group(2)] if m else 0.0
    if not m or not 0 < seconds <= MAX_LIFETIME.total_seconds():
        raise InputError(f"a lifetime is a number with s, m, h, d or w (e.g. 30d, 12h), "
                         f"above 0 and at most ten years, got {str(text)[:40]!r}")
    return timedelta(seconds=seconds)


def list_keys(engine: sa.Engine, include_revoked: bool = False) -> list[ApiKey]:
    """Every key, oldest first (revoked ones too with ``include_revoked``)."""
    q = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
    if not include_revoked:
        q = q.where(api_keys.c.revoked_at.is_(None))
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(q)]


def revoke(engine: sa.Engine, key_id: str) -> ApiKey:
    """Revoke a key (at once: its next request is refused). Revoking a revoked key
    changes nothing; an unknown id raises InputError."""
    key_id = key_id.strip().removeprefix(PREFIX)[:12] if isinstance(key_id, str) else ""
    with engine.begin() as conn:
        conn.execute(sa.update(api_keys).where(api_keys.c.key_id == key_id,
                                               api_keys.c.revoked_at.is_(None))
                     .values(revoked_at=datetime.now(UTC)))
        row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
    if row is None:
        raise InputError(f"no API key with id {key_id!r} (see `chassis keys list`)")
    return _row(row)


def verify(engine: sa.Engine, key: str) -> ApiKey | None:
    """The key ``key`` is, if it is a key that exists, is not revoked and has not
    expired; else None."""
    m = _KEY.match(key) if isinstance(key, str) and len(key) < 100 else None
    if m is None:
        return None
    key_id, secret = m.groups()
    with engine.connect() as conn:
        row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
    if row is None or not hmac.compare_digest(row.secret_hash, _digest(secret)) \
            or row.revoked_at is not None:
        return None
    found = _row(row)
    if found.expired:
        return None
    now = datetime.now(UTC)
    if found.last_used_at is None or now - found.last_used_at > TOUCH_EVERY:
        with engine.begin() as conn:
            conn.execute(sa.update(api_keys).where(api_keys.c.key_id == key_id)
                         .values(last_used_at=now))
    return found


__all__ = ["MAX_LIFETIME", "PREFIX", "ApiKey", "create", "list_keys", "parse_lifetime",
           "revoke", "verify"]
