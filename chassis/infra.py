"""Infrastructure errors: the database or the broker could not be reached.

They are not the action's failure. A task that meets one waits and tries the same
operation again, with backoff, until the service is back: nothing is acknowledged as
failed because a service blinked. Clients (the CLI, the API) get a clear error instead.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy.exc as sa_exc

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Backoff between two tries: from FIRST_WAIT, doubled, at most MAX_WAIT seconds.
FIRST_WAIT = 0.2
MAX_WAIT = 5.0


def is_database_error(exc: BaseException) -> bool:
    """The database is unreachable, restarting, or locked (SQLite), or every pooled
    connection is busy (many threads): try again later."""
    if isinstance(exc, sa_exc.TimeoutError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def is_broker_error(exc: BaseException) -> bool:
    """The Celery broker is unreachable."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, KombuOperationalError | RedisConnectionError | RedisTimeoutError
                      | ConnectionError | socket.timeout | socket.gaierror)


def is_infrastructure_error(exc: BaseException) -> bool:
    return is_database_error(exc) or is_broker_error(exc)


def _what(exc: BaseException) -> str:
    return "database" if is_database_error(exc) else "broker"


def worker_stopping() -> bool:
    """True when the Celery worker of this process was asked to shut down."""
    from celery.worker import state

    return bool(state.should_stop or state.should_terminate)


def persist(fn: Callable[[], T], doing: str, *, correlation_id: str | None = None,
            give_up_after: float | None = None) -> T:
    """Call ``fn`` until it does not fail with an infrastructure error, waiting longer
    each time; other errors are raised at once. With ``give_up_after`` seconds, the
    last infrastructure error is raised once that time has passed; so it is when the
    worker is shutting down (a shutdown must not wait for a database that may never
    come back: the attempt's lease expires and the sweep sends it again)."""
    wait = FIRST_WAIT
    deadline = None if give_up_after is None else time.monotonic() + give_up_after
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            if deadline is not None and time.monotonic() + wait > deadline:
                raise
            if worker_stopping():
                raise
            log.warning("%s unreachable while %s (%s); trying again in %.1f s", _what(exc),
                        doing, " ".join(str(exc).split())[:200], wait,
                        extra={"correlation_id": correlation_id})
            time.sleep(wait)
            wait = min(MAX_WAIT, wait * 2)


__all__ = ["is_broker_error", "is_database_error", "is_infrastructure_error", "persist"]
