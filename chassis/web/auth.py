"""Who is asking: an API key, from ``Authorization: Bearer KEY`` (other apps) or the
console's session cookie (people).

A key acts for its client: another client's workflow does not exist for it (404, as an
unknown id). An admin key reaches every client's workflows. Whatever a key does is
recorded in the event history as ``CLIENT via key KEY_ID``.

Cross-site requests: the cookie is HttpOnly and SameSite=Strict, and a request that
changes something with the cookie must also carry the session's CSRF token (a form
field ``csrf_token`` or the header ``X-CSRF-Token``: an HMAC of the key, so it dies
with the key) and, when the browser sends one, an ``Origin`` of this very site. A
Bearer request carries no ambient credential and needs neither.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request

from chassis.api import Client
from chassis.store import keys
from chassis.store.keys import ApiKey

COOKIE = "chassis_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AuthError(Exception):
    """401 (no usable key), 403 (a key, but not this) or 429 (a key over its rate
    limit: ``retry_after`` seconds): ``status`` and a message."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RateLimit:
    """At most ``per_minute`` requests a minute per key: a bucket of that many tokens
    per key, refilled evenly (a burst of the whole minute's, then one every 60/N s)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # key id: (tokens, when)
        self._lock = threading.Lock()

    def wait_for(self, key_id: str) -> float:
        """0 when a request of ``key_id`` may go now (and it is counted), else the
        seconds until one may."""
        rate = self.per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(key_id, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - then) * rate)
            if tokens >= 1:
                self._buckets[key_id] = (tokens - 1, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / rate


_limits: dict[int, RateLimit] = {}


@dataclass(frozen=True)
class Principal:
    """The key a request came with, and the client view it acts through."""

    key: ApiKey
    client: Client
    secret: str
    by_cookie: bool

    @property
    def admin(self) -> bool:
        return self.key.admin

    @property
    def csrf_token(self) -> str:
        return csrf_token(self.secret)

    def require_admin(self, doing: str) -> None:
        if not self.key.admin:
            raise AuthError(403, f"{doing} needs an admin key (`chassis keys create "
                                 "CLIENT --admin`)")


def csrf_token(key: str) -> str:
    """The CSRF token of a session: an HMAC of its key (nothing stored)."""
    return hmac.new(key.encode(), b"chassis-csrf", hashlib.sha256).hexdigest()


def actor(key: ApiKey) -> str:
    """How the event history names what a key did (within the column's 255
    characters: a long client id is cut, the key id never)."""
    return f"{key.client_id[:230]} via key {key.key_id}"


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError(401, "the Authorization header must be 'Bearer <API key>'")
    return value.strip()


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", request.url.netloc)


def authenticate(request: Request, base: Client, form: dict[str, Any] | None = None, *,
                 cookie_only: bool = False) -> Principal:
    """The principal of ``request`` (AuthError when none). ``form``: the request's
    form fields, for a form's CSRF token. ``cookie_only``: a console page, signed in by
    its cookie alone (an Authorization header there may be a proxy's Basic auth)."""
    key_text = None if cookie_only else bearer(request)
    by_cookie = key_text is None
    if by_cookie:
        key_text = request.cookies.get(COOKIE)
    if not key_text:
        raise AuthError(401, "an API key is required: send 'Authorization: Bearer <key>' "
                             "(make one with `chassis keys create CLIENT`)")
    found = keys.verify(base.store.engine, key_text)
    if found is None:
        raise AuthError(401, "this API key is not valid (unknown, mistyped, revoked or "
                             "expired)")
    if by_cookie and request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER) or (form or {}).get("csrf_token") or ""
        if not (isinstance(sent, str) and hmac.compare_digest(sent, csrf_token(key_text))
                and same_origin(request)):
            raise AuthError(403, "cross-site request refused: the form's CSRF token is "
                                 "missing or wrong (reload the page and try again)")
    per_minute = base.settings.web_rate_limit
    if per_minute and not cookie_only:  # every /api/ request, by key or by cookie (the
        # console's own pages are people's and not limited)
        limit = _limits.get(per_minute) or _limits.setdefault(per_minute,
                                                              RateLimit(per_minute))
        wait = limit.wait_for(found.key_id)
        if wait:
            seconds = max(1, math.ceil(wait))
            raise AuthError(429, f"this key made more than {per_minute} requests in a "
                                 f"minute (CHASSIS_WEB_RATE_LIMIT): try again in {seconds} s",
                            retry_after=seconds)
    client = base.acting_as(found.client_id, admin=found.admin, by=actor(found))
    return Principal(found, client, key_text, by_cookie)


__all__ = ["COOKIE", "CSRF_HEADER", "AuthError", "Principal", "RateLimit", "actor",
           "authenticate", "csrf_token", "same_origin"]
