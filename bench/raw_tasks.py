"""The raw-Celery baseline's tasks, registered on the worker's own app (``chassis.worker``).

The bench starts its worker with ``CHASSIS_ACTION_MODULES=bench.raw_tasks``, so
the app's ``imports`` load this module in the worker next to agentchassis' tasks:
both sides of a comparison run in the same worker processes, on the same queues.

The bench process itself never imports this module (it would configure the ``chassis.worker`` app
from its own environment); it sends these tasks by name.

- ``bench.noop``: one link of a raw chain. It is a no-op that carries the chain's start
  timestamps (each link appends ``time.time()`` and returns the list, which Celery passes
  to the next link), so the bench can compute per-hop latency exactly as it does for our
  steps (from ``started_at``). With ``key`` set (the last link) it pushes the list to that
  Redis key, which the bench waits on with BLPOP: the raw chain needs no result backend.
- ``bench.wait``: a chain link that waits (the agent case's simulated model call).
- ``bench.part``: a chord header task; returns {} through the result backend, as our
  ``chassis.subtask`` does.
- ``bench.join``: the chord callback; pushes its timestamp and the number of results.
- ``bench.ping``: readiness probe of the worker.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from chassis.worker import app

_redis: redis.Redis | None = None


def _r() -> redis.Redis:
    """One Redis client per (forked) worker process, on the broker's database."""
    global _redis
    if _redis is None:
        # blocking: on a threads pool of 512, hundreds of links may push at once
        # (redis-py's own pool then refuses the 101st connection)
        _redis = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            app.conf.broker_url, max_connections=32, timeout=60))
    return _redis


@app.task(name="bench.noop", ignore_result=True)
def noop(stamps: list[float] | None = None, key: str | None = None) -> list[float]:
    stamps = [*(stamps or ()), time.time()]
    if key is not None:
        _r().rpush(key, json.dumps({"stamps": stamps, "end": stamps[-1]}))
    return stamps


@app.task(name="bench.wait", ignore_result=True)
def wait(stamps: list[float] | None = None, seconds: float = 1.0,
         key: str | None = None) -> list[float]:
    """A chain link that waits ``seconds`` (a model call), as our ``sleep`` action."""
    time.sleep(seconds)
    return noop(stamps, key)


@app.task(name="bench.part", ignore_result=False)
def part(i: int) -> dict[str, Any]:
    return {}


@app.task(name="bench.join", ignore_result=True)
def join(results: list[Any], key: str) -> None:
    end = time.time()
    _r().rpush(key, json.dumps({"end": end, "n": len(results)}))


@app.task(name="bench.ping", ignore_result=True)
def ping(key: str) -> None:
    _r().rpush(key, json.dumps({"end": time.time()}))

