"""The Redis broker: kombu's Redis transport, without the crash on a Redis restart.

When Redis goes away while a worker holds unacknowledged messages (steps in flight),
Celery closes the broken connection; closing its channel restores those messages
(``restore_unacked``), which needs a Redis client, which kombu builds from the
connection's settings, which closing has already dropped: ``AttributeError:
'NoneType' object has no attribute 'hostname'``. That is not a connection error, so
Celery does not reconnect: the worker exits ("Unrecoverable error"), measured every
time Redis was killed under a prefork worker running steps. Here a channel whose
connection is gone raises a connection error instead: Celery ignores it while
closing, reconnects once Redis is back, and the messages not restored stay in Redis'
unacked index, restored once their visibility timeout passes (those lost with Redis
itself are sent again by the sweep).

Celery uses it for ``redis://`` brokers (``broker_transport``); a ``rediss://`` URL
keeps kombu's own transport, whose TLS defaults follow the scheme.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; a lost connection is a connection error."""

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the connection to Redis is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


__all__ = ["Channel", "Transport"]
