"""The DBOS peer, run as its own process: ``python -m bench.dbos_side``.

DBOS Transact executes workflows inside the application's process (steps run on a thread
pool, queues are polled by a thread), so the bench starts this module as a subprocess:
its CPU time and resident memory are then measurable on their own, like the Celery
worker's, and it competes for the same two cores. It never imports agentchassis or Celery.

The bench drives it with one JSON object per line on stdin and reads one JSON object per
line on stdout (``{"op": "linear", "n": 100}`` -> ``{"ok": true, ...}``); DBOS's own log
goes to stderr. Configuration comes from the environment (set by ``bench.systems.Dbos``):

- ``BENCH_DBOS_URL``: the system database (a fresh ``bench_dbos_<random>`` on the bench's
  PostgreSQL server, created and dropped by the bench);
- ``BENCH_DBOS_THREADS``: ``max_executor_threads`` (0: DBOS's default, unbounded);
- ``BENCH_DBOS_POOL``: ``sys_db_pool_size`` (DBOS's default is 20);
- ``BENCH_DBOS_POLL``: the fan-out queue's ``polling_interval_sec`` (DBOS's default 1 s);
- ``BENCH_DBOS_QUEUE_CONCURRENCY``: that queue's ``worker_concurrency`` (0: unbounded).

Timestamps are ``time.time()`` (the bench's clock: one machine) and DBOS's own
``workflow_status`` columns (``created_at``/``updated_at``, epoch milliseconds, written by
DBOS when the workflow is recorded and when its outcome is), read back over SQL.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import sqlalchemy as sa
from dbos import DBOS, DBOSConfig, Queue


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


POLL = float(os.environ.get("BENCH_DBOS_POLL", "") or 0.05)
QUEUE_CONCURRENCY = _env_int("BENCH_DBOS_QUEUE_CONCURRENCY", 0)

fanout_queue: Queue | None = None  # registered after launch (DBOS.register_queue)


@DBOS.step()
def noop_step() -> float:
    """A no-op step; returns when its body ran (the per-step latency's clock)."""
    return time.time()


@DBOS.step()
def part_step(i: int) -> dict[str, Any]:
    """A fan-out sub-task: like ``bench.part`` on the Celery side, returns {}."""
    return {}


@DBOS.workflow()
def linear_wf(n: int) -> list[float]:
    return [noop_step() for _ in range(n)]


@DBOS.workflow()
def steps_wf(n: int) -> int:
    for _ in range(n):
        noop_step()
    return n


@DBOS.step()
def wait_step(seconds: float) -> float:
    """A step that waits (the agent case's simulated model call)."""
    time.sleep(seconds)
    return time.time()


@DBOS.workflow()
def agent_wf(steps: int, seconds: float) -> int:
    for _ in range(steps):
        wait_step(seconds)
    return steps


@DBOS.workflow()
def fanout_wf(n: int) -> dict[str, Any]:
    assert fanout_queue is not None
    handles = [fanout_queue.enqueue(part_step, i) for i in range(n)]
    enqueued = time.time()  # (not replay-safe; a bench figure only)
    return {"n": len([h.get_result() for h in handles]), "enqueued": enqueued}


class Side:
    def __init__(self, url: str) -> None:
        threads = _env_int("BENCH_DBOS_THREADS", 0)
        pool = _env_int("BENCH_DBOS_POOL", 0)
        config: DBOSConfig = {"name": "bench", "system_database_url": url,
                              "log_level": os.environ.get("BENCH_DBOS_LOGLEVEL", "WARNING")}
        if threads:
            config["max_executor_threads"] = threads
        if pool:
            config["sys_db_pool_size"] = pool
        DBOS(config=config)
        DBOS.launch()
        global fanout_queue
        fanout_queue = DBOS.register_queue("bench_fanout", polling_interval_sec=POLL,
                                           worker_concurrency=QUEUE_CONCURRENCY or None)
        # a separate engine for reading DBOS's timestamps (not DBOS's pool)
        self.db = sa.create_engine(url, pool_size=1, max_overflow=0)
        self.config = {"max_executor_threads": threads or "unbounded (DBOS default)",
                       "sys_db_pool_size": pool or "20 (DBOS default)",
                       "fanout_queue": {"polling_interval_sec": POLL,
                                        "worker_concurrency": QUEUE_CONCURRENCY or None}}

    def _times(self, ids: list[str]) -> tuple[float, float, float]:
        """(min created_at, max updated_at, workflows not SUCCESS) in seconds."""
        with self.db.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT min(created_at), max(updated_at), "
                "count(*) FILTER (WHERE status <> 'SUCCESS'), count(*) "
                "FROM dbos.workflow_status WHERE workflow_uuid = ANY(:ids)"),
                {"ids": ids}).one()
        if row[3] != len(ids) or row[2]:
            raise RuntimeError(f"DBOS: {row[3]} of {len(ids)} workflows recorded, "
                               f"{row[2]} not SUCCESS")
        return row[0] / 1000, row[1] / 1000, row[2]

    def linear(self, n: int) -> dict[str, Any]:
        t0 = time.time()
        handle = DBOS.start_workflow(linear_wf, n)
        stamps = handle.get_result()
        _, end, _ = self._times([handle.workflow_id])
        return {"t0": t0, "end": end, "stamps": stamps}

    def concurrent(self, n: int, steps: int) -> dict[str, Any]:
        t0 = time.time()
        handles = [DBOS.start_workflow(steps_wf, steps) for _ in range(n)]
        for h in handles:
            h.get_result()
        first, end, _ = self._times([h.workflow_id for h in handles])
        return {"t0": t0, "first_created": first, "end": end}

    def agent(self, n: int, steps: int, latency: float) -> dict[str, Any]:
        t0 = time.time()
        handles = [DBOS.start_workflow(agent_wf, steps, latency) for _ in range(n)]
        for h in handles:
            h.get_result()
        first, end, _ = self._times([h.workflow_id for h in handles])
        return {"t0": t0, "first_created": first, "end": end}

    def fanout(self, n: int) -> dict[str, Any]:
        t0 = time.time()
        handle = DBOS.start_workflow(fanout_wf, n)
        got = handle.get_result()
        if got["n"] != n:
            raise RuntimeError(f"DBOS fan-out gathered {got['n']} results, expected {n}")
        _, end, _ = self._times([handle.workflow_id])
        return {"t0": t0, "end": end, "enqueued": got["enqueued"]}

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg["op"]
        if op == "ping":
            return {"config": self.config}
        if op == "linear":
            return self.linear(int(msg["n"]))
        if op == "concurrent":
            return self.concurrent(int(msg["n"]), int(msg["steps"]))
        if op == "fanout":
            return self.fanout(int(msg["n"]))
        if op == "agent":
            return self.agent(int(msg["n"]), int(msg["steps"]), float(msg["latency"]))
        raise ValueError(f"unknown op {op!r}")


def main() -> int:
    out = sys.stdout
    sys.stdout = sys.stderr  # anything DBOS prints must not corrupt the protocol
    side = Side(os.environ["BENCH_DBOS_URL"])
    out.write(json.dumps({"ok": True, "ready": True, "config": side.config}) + "\n")
    out.flush()
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            msg = json.loads(line)
            if msg.get("op") == "quit":
                break
            try:
                reply = {"ok": True, **side.handle(msg)}
            except Exception as exc:  # noqa: BLE001  (reported to the bench)
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        side.db.dispose()
        DBOS.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
