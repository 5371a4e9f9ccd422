"""One :class:`Engine` per process and Celery app, made on first use (after any fork)."""

from __future__ import annotations

from celery import Celery

from chassis import config
from chassis.api import Client
from chassis.engine import Engine

_clients: dict[int, Client] = {}


def engine(app: Celery) -> Engine:
    """The engine that sends with ``app`` and stores in CHASSIS_DATABASE_URL (the
    worker's client's: one store, and one set of connection pools, per process)."""
    return client(app).engine


def client(app: Celery) -> Client:
    """A :class:`Client` that starts workflows from inside a worker of ``app``."""
    c = _clients.get(id(app))
    if c is None:
        settings = config.load()
        # the embedded file-system broker: a task published from a worker thread through
        # the very app whose worker consumes in this process is not taken until the
        # sweep sends it again (20 s and more, measured): it sends through an app of
        # its own
        c = _clients[id(app)] = Client(settings, app=None if settings.embedded_broker
                                       else app, in_worker=True)
    return c


def relay_outbox() -> int:
    """Publish the outbox once (the ``chassis.relay`` task); 0 when Kafka is off."""
    settings = config.load()
    if not settings.kafka_bootstrap:
        return 0
    from chassis.kafka.relay import relay_once  # confluent-kafka only when Kafka is on

    return relay_once(settings)


def reset() -> None:
    """Forget engines, clients and the relay (after a fork: connections must not be
    shared)."""
    _clients.clear()
    from chassis.kafka import relay

    relay.reset()
