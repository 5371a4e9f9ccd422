"""The systems under comparison. Each one runs a case's workload once and returns a
:class:`Sample`; the runner (``bench.cases``) repeats, warms up and takes medians.

To add a peer (issue 7: DBOS), subclass :class:`System`, give it a ``key``, implement the
workloads it supports (``linear``, ``fanout``, later ``concurrent``...) and list it in
``bench.cli.make_systems``. A system that lacks a workload simply does not define it.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, chain, chord

from chassis import config
from chassis.api import Client
from chassis.celery_conf import COORDINATION_QUEUE, STEPS_QUEUE, celery_settings
from chassis.state import Status

BIG_FUEL = 10**9
CLIENT_ID = "bench"


@dataclass
class Sample:
    """One run of one workload on one system. Times are seconds (wall clock,
    ``time.time()`` in the bench and in the worker: one machine, one clock)."""

    wall_s: float
    hops_s: list[float] = field(default_factory=list)
    """Per-step latencies: start of step i+1's task body minus start of step i's."""
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def per_step_ms(self) -> float | None:
        return statistics.median(self.hops_s) * 1000 if self.hops_s else None


class System:
    key = "?"
    label = "?"

    def supports(self, workload: str) -> bool:
        return callable(getattr(self, workload, None))

    def close(self) -> None:
        pass


def _diffs(ts: list[float]) -> list[float]:
    return [b - a for a, b in zip(ts, ts[1:], strict=False)]


# ------------------------------------------------------------------ agentchassis


def linear_plan(n: int) -> dict[str, Any]:
    steps: dict[str, Any] = {f"s{i}": {"action": "noop", "next_step": f"s{i + 1}"}
                             for i in range(n)}
    steps[f"s{n - 1}"]["next_step"] = "done"
    steps["done"] = {"action": "complete_workflow"}
    return {"start_step": "s0", "steps": steps}


def fanout_plan(n: int) -> dict[str, Any]:
    return {"start_step": "fan", "steps": {
        "fan": {"action": "fan_out", "next_step": "done",
                "sub_tasks": [{"step_name": f"p{i}", "action": "noop"} for i in range(n)]},
        "done": {"action": "complete_workflow"}}}


class Chassis(System):
    """agentchassis through its public API; the end of a run is the workflow's final
    ``updated_at`` (written by the worker in the transaction that completes it)."""

    key = "ours"
    label = "agentchassis"

    def __init__(self, env: dict[str, str], poll: float = 0.02, timeout: float = 600) -> None:
        self.client = Client(config.load(env))
        self.poll = poll
        self.timeout = timeout

    def _run(self, plan: dict[str, Any]) -> tuple[float, str, float]:
        t0 = time.time()
        cid = self.client.start(plan, {}, client_id=CLIENT_ID, fuel_budget=BIG_FUEL)
        deadline = time.monotonic() + self.timeout
        store = self.client.store
        while True:
            state = store.get(cid)
            if state.status.finished:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"workflow {cid} still {state.status} after {self.timeout} s")
            time.sleep(self.poll)
        if state.status is not Status.COMPLETED:
            raise RuntimeError(f"workflow {cid} ended {state.status}: {state.error}")
        assert state.updated_at is not None
        return t0, cid, state.updated_at.timestamp()

    def linear(self, n: int) -> Sample:
        t0, cid, end = self._run(linear_plan(n))
        runs = {r["step_name"]: r for r in self.client.store.steps(cid)}
        starts = [runs[f"s{i}"]["started_at"].timestamp() for i in range(n)]
        return Sample(end - t0, _diffs(starts),
                      {"start_to_first_step_s": starts[0] - t0,
                       "last_step_to_end_s": end - starts[-1]})

    def fanout(self, n: int) -> Sample:
        t0, cid, end = self._run(fanout_plan(n))
        runs = [r for r in self.client.store.steps(cid) if r["parent_step"] == "fan"]
        if len(runs) != n:
            raise RuntimeError(f"workflow {cid}: {len(runs)} sub-task runs, expected {n}")
        starts = sorted(r["started_at"].timestamp() for r in runs if r["started_at"])
        if not starts:  # sub-tasks that record no start time
            return Sample(end - t0)
        return Sample(end - t0, detail={"start_to_first_subtask_s": starts[0] - t0,
                                        "first_to_last_subtask_s": starts[-1] - starts[0],
                                        "last_subtask_to_end_s": end - starts[-1]})

    def close(self) -> None:
        self.client.engine.store.engine.dispose()


# ------------------------------------------------------------------ raw Celery


class RawCelery(System):
    """Plain Celery canvas on the same broker, backend, queues and worker; the tasks are
    in ``bench.raw_tasks``. The end of a run is the timestamp the last task pushes to a
    Redis list, which the bench waits on with BLPOP (no polling)."""

    key = "raw_celery"
    label = "raw Celery"

    def __init__(self, env: dict[str, str], timeout: float = 600) -> None:
        settings = config.load(env)
        self.app = Celery("bench-raw", set_as_current=False)
        self.app.conf.update(celery_settings(settings))
        self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=timeout + 5)
        self.timeout = timeout

    def _wait(self, key: str) -> dict[str, Any]:
        got = self.redis.blpop([key], timeout=self.timeout)
        if got is None:
            raise TimeoutError(f"raw Celery run {key} did not finish in {self.timeout} s")
        return json.loads(got[1])

    def ping(self, timeout: float = 5) -> bool:
        """True when a worker ran ``bench.ping`` within ``timeout`` seconds."""
        key = f"bench:ping:{uuid.uuid4().hex}"
        self.app.send_task("bench.ping", args=[key], queue=STEPS_QUEUE, ignore_result=True)
        return self.redis.blpop([key], timeout=timeout) is not None

    def linear(self, n: int) -> Sample:
        key = f"bench:done:{uuid.uuid4().hex}"
        links = [self.app.signature("bench.noop", queue=STEPS_QUEUE) for _ in range(n - 1)]
        links.append(self.app.signature("bench.noop", kwargs={"key": key}, queue=STEPS_QUEUE))
        t0 = time.time()
        chain(*links).apply_async()
        out = self._wait(key)
        stamps = out["stamps"]
        if len(stamps) != n:
            raise RuntimeError(f"raw chain ran {len(stamps)} links, expected {n}")
        return Sample(out["end"] - t0, _diffs(stamps),
                      {"start_to_first_step_s": stamps[0] - t0})

    def fanout(self, n: int) -> Sample:
        key = f"bench:done:{uuid.uuid4().hex}"
        header = [self.app.signature("bench.part", args=(i,), queue=STEPS_QUEUE)
                  for i in range(n)]
        body = self.app.signature("bench.join", kwargs={"key": key}, queue=COORDINATION_QUEUE)
        t0 = time.time()
        chord(header)(body)
        out = self._wait(key)
        if out["n"] != n:
            raise RuntimeError(f"raw chord joined {out['n']} results, expected {n}")
        return Sample(out["end"] - t0)

    def close(self) -> None:
        self.redis.close()
