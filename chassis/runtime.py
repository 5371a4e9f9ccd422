"""One :class:`Engine` per process and Celery app, made on first use (after any fork)."""

from __future__ import annotations

from celery import Celery

from chassis import config
from chassis.engine import Engine
from chassis.store import SqlStore
from chassis.store.db import make_engine

_engines: dict[int, Engine] = {}


def engine(app: Celery) -> Engine:
    """The engine that sends with ``app`` and stores in CHASSIS_DATABASE_URL."""
    eng = _engines.get(id(app))
    if eng is None:
        store = SqlStore(make_engine(config.load().database_url))
        eng = _engines[id(app)] = Engine(store, app)
    return eng


def reset() -> None:
    """Forget engines (after a fork: connections must not be shared)."""
    _engines.clear()
