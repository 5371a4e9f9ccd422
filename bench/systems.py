"""The systems under comparison. Each one runs a case's workload once and returns a
:class:`Sample`; the runner (``bench.cases``) repeats, warms up and takes medians.

To add a peer, subclass :class:`System`, give it a ``key``, implement the workloads it
supports (``linear``, ``concurrent``, ``fanout``, ``fuel``) and list it in ``bench.cli``.
A system that lacks a workload simply does not define it. ``pids`` tells the CPU meter
which processes (and PostgreSQL backends) are the system's.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import redis
import sqlalchemy as sa
from celery import Celery, chain, chord

import bench.actions  # noqa: F401  (the growth case's action, known to the client)
from bench.env import ROOT, PostgresDatabase, log, tree_pids
from chassis import config, fuel
from chassis.api import Client
from chassis.celery_conf import COORDINATION_QUEUE, STEPS_QUEUE, celery_settings
from chassis.state import Status
from chassis.store.tables import fuel_ledger, orchestrator_state

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
    tree = "celery_worker"
    """The process tree whose memory is this system's (see ``bench.env.RssSampler``)."""
    pids: Callable[[], dict[str, list[int]]] | None = None
    """For the CPU meter: {"worker": the system's processes, "postgres": its backends}."""

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

    def growth(self, n: int, size: int = 10_240, window: int = 100) -> Sample:
        """One workflow of ``n`` steps, each adding an output of ``size`` bytes: does a
        step cost the same at the end (all earlier outputs collected) as at the start?
        The gap between two steps' starts, median over the first and the last
        ``window`` steps."""
        steps: dict[str, Any] = {
            f"s{i}": {"action": "bench_blob", "params": {"bytes": size},
                      "next_step": f"s{i + 1}" if i + 1 < n else "done"} for i in range(n)}
        steps["done"] = {"action": "complete_workflow"}
        t0, cid, end = self._run({"start_step": "s0", "steps": steps})
        runs = {r["step_name"]: r for r in self.client.store.steps(cid)}
        gaps = _diffs([runs[f"s{i}"]["started_at"].timestamp() for i in range(n)])
        w = max(1, min(window, len(gaps) // 2))
        first, last = statistics.median(gaps[:w]), statistics.median(gaps[-w:])
        return Sample(end - t0, gaps, {"gap_start_ms": first * 1000,
                                       "gap_end_ms": last * 1000,
                                       "end_over_start": last / first,
                                       "collected_mb": n * size / 1e6})

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

    def _start_many(self, plan: dict[str, Any], n: int, client_id: str) -> list[str]:
        return [self.client.start(plan, {}, client_id=client_id, fuel_budget=BIG_FUEL)
                for _ in range(n)]

    def _wait_all(self, cids: list[str]) -> tuple[float, float]:
        """Poll (one query) until every workflow finished; (first created_at, last
        updated_at) in seconds, both written by agentchassis in its own transactions."""
        st = orchestrator_state.c
        q = sa.select(
            sa.func.count().filter(st.status.notin_([Status.COMPLETED, Status.FAILED])),
            sa.func.count().filter(st.status == Status.FAILED),
            sa.func.min(st.created_at), sa.func.max(st.updated_at),
        ).where(st.correlation_id.in_(cids))
        deadline = time.monotonic() + self.timeout
        while True:
            with self.client.store.engine.connect() as conn:
                pending, failed, first, last = conn.execute(q).one()
            if not pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pending} of {len(cids)} workflows unfinished after "
                                   f"{self.timeout} s")
            time.sleep(self.poll)
        if failed:
            raise RuntimeError(f"{failed} of {len(cids)} workflows FAILED")
        return first.timestamp(), last.timestamp()

    def concurrent(self, n: int, steps: int = 3) -> Sample:
        """``n`` workflows of ``steps`` no-op steps started at once (one after the other
        through ``Client.start``, as an app would); throughput from the first one's
        ``created_at`` to the last one's final ``updated_at``."""
        t0 = time.time()
        cids = self._start_many(linear_plan(steps), n, CLIENT_ID)
        started = time.time()
        first, last = self._wait_all(cids)
        wall = last - first
        return Sample(wall, detail={"wf_per_s": n / wall, "start_calls_s": started - t0,
                                    "t0_to_first_created_s": first - t0})

    def agent(self, n: int, steps: int = 3, latency: float = 1.0) -> Sample:
        """``n`` workflows of ``steps`` steps that each wait ``latency`` s (a model call),
        started at once; from the first start call to the last workflow's end."""
        plan = {"start_step": "s0", "steps": {
            **{f"s{i}": {"action": "sleep", "params": {"seconds": latency},
                         "next_step": f"s{i + 1}" if i + 1 < steps else "done"}
               for i in range(steps)},
            "done": {"action": "complete_workflow"}}}
        t0 = time.time()
        cids = self._start_many(plan, n, CLIENT_ID)
        started = time.time()
        _first, last = self._wait_all(cids)
        wall = last - t0
        return Sample(wall, detail={"vs_ideal": wall / (steps * latency),
                                    "start_calls_s": started - t0})

    def fuel(self, n: int, workflows: int = 8) -> Sample:
        """``workflows`` workflows of one client, ``n`` no-op steps each, started
        together; every step debits fuel. Then the ledger is checked against each
        workflow's ``fuel_spent`` and the plan: lost debits (a step that ran without its
        ledger row, or fuel_spent above the ledger) and double debits (a second row for
        a step, or the ledger above fuel_spent) must both be 0."""
        plan = linear_plan(n)
        costs = {name: fuel.cost(step["action"]) for name, step in plan["steps"].items()}
        want_rows = sum(1 for c in costs.values() if c)
        want_amount = sum(costs.values())
        client_id = f"bench-fuel-{uuid.uuid4().hex[:8]}"
        cids = self._start_many(plan, workflows, client_id)
        first, last = self._wait_all(cids)
        fl, st = fuel_ledger.c, orchestrator_state.c
        with self.client.store.engine.connect() as conn:
            per_wf = {str(r[0]): (int(r[1]), int(r[2] or 0), int(r[3])) for r in conn.execute(
                sa.select(st.correlation_id, sa.func.count(fl.id), sa.func.sum(fl.amount),
                          st.fuel_spent)
                .select_from(orchestrator_state.outerjoin(
                    fuel_ledger, fl.correlation_id == st.correlation_id))
                .where(st.client_id == client_id)
                .group_by(st.correlation_id, st.fuel_spent))}
            dup_steps = conn.execute(sa.select(sa.func.count()).select_from(
                sa.select(fl.correlation_id, fl.step_name).where(fl.client_id == client_id)
                .group_by(fl.correlation_id, fl.step_name)
                .having(sa.func.count() > 1).subquery())).scalar_one()
            dup_keys = conn.execute(sa.select(sa.func.count()).select_from(
                sa.select(fl.idempotency_key).where(fl.client_id == client_id)
                .group_by(fl.idempotency_key).having(sa.func.count() > 1).subquery())
            ).scalar_one()
            last_debit = conn.execute(sa.select(sa.func.max(fl.created_at))
                                      .where(fl.client_id == client_id)).scalar_one()
        lost = double = mismatched = 0
        for cid in cids:
            rows, amount, spent = per_wf.get(cid, (0, 0, 0))
            lost += max(0, want_rows - rows)
            double += max(0, rows - want_rows)
            if not (amount == spent == want_amount):
                mismatched += 1
        double += dup_steps + dup_keys
        debits = sum(v[0] for v in per_wf.values())
        end = max(last, last_debit.timestamp()) if last_debit else last
        wall = end - first
        return Sample(wall, detail={
            "debits_per_s": debits / wall, "debits": debits,
            "expected_debits": want_rows * workflows, "lost_debits": lost,
            "double_debits": double, "mismatched_workflows": mismatched,
            "fuel_spent_total": sum(v[2] for v in per_wf.values())})

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

    def concurrent(self, n: int, steps: int = 3) -> Sample:
        """``n`` chains of ``steps`` no-op links sent one after the other; from the first
        ``apply_async`` to the last chain's last link (a floor: nothing is durable)."""
        key = f"bench:done:{uuid.uuid4().hex}"
        chains = [chain(*[self.app.signature("bench.noop", queue=STEPS_QUEUE)
                          for _ in range(steps - 1)],
                        self.app.signature("bench.noop", kwargs={"key": key},
                                           queue=STEPS_QUEUE)) for _ in range(n)]
        t0 = time.time()
        for c in chains:
            c.apply_async()
        sent = time.time()
        ends = []
        for _ in range(n):
            out = self._wait(key)
            if len(out["stamps"]) != steps:
                raise RuntimeError(f"raw chain ran {len(out['stamps'])} links, expected {steps}")
            ends.append(out["end"])
        wall = max(ends) - t0
        return Sample(wall, detail={"wf_per_s": n / wall, "start_calls_s": sent - t0})

    def agent(self, n: int, steps: int = 3, latency: float = 1.0) -> Sample:
        """``n`` chains of ``steps`` links that each wait ``latency`` s, sent at once;
        from the first ``apply_async`` to the last chain's end (nothing durable)."""
        key = f"bench:done:{uuid.uuid4().hex}"
        chains = [chain(*[self.app.signature("bench.wait", kwargs={"seconds": latency},
                                             queue=STEPS_QUEUE) for _ in range(steps - 1)],
                        self.app.signature("bench.wait", kwargs={"seconds": latency,
                                                                 "key": key},
                                           queue=STEPS_QUEUE)) for _ in range(n)]
        t0 = time.time()
        for c in chains:
            c.apply_async()
        sent = time.time()
        ends = [self._wait(key)["end"] for _ in range(n)]
        wall = max(ends) - t0
        return Sample(wall, detail={"vs_ideal": wall / (steps * latency),
                                    "start_calls_s": sent - t0})

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


# ------------------------------------------------------------------ DBOS


@dataclass
class DbosOptions:
    """How the DBOS process is configured (recorded in the JSON and the table's notes)."""

    threads: int = 0  # max_executor_threads; 0: DBOS's default (unbounded)
    pool: int = 0  # sys_db_pool_size; 0: DBOS's default (20)
    poll: float = 0.05  # fan-out queue polling_interval_sec (DBOS's default is 1 s)
    queue_concurrency: int = 0  # fan-out queue worker_concurrency; 0: unbounded
    loglevel: str = "WARNING"


class Dbos(System):
    """DBOS Transact (PyPI ``dbos``) in its own process (``bench.dbos_side``), on its own
    fresh system database on the same PostgreSQL server. Workflows run on DBOS's thread
    pool inside that process, as DBOS runs them in an application; the bench sends each
    workload over a pipe and DBOS reports its own timestamps (step bodies'
    ``time.time()``, ``workflow_status.created_at``/``updated_at``)."""

    key = "dbos"
    label = "DBOS"
    tree = "dbos"

    def __init__(self, db: PostgresDatabase, opts: DbosOptions, timeout: float = 600) -> None:
        self.db, self.opts, self.timeout = db, opts, timeout
        self.proc: subprocess.Popen[str] | None = None
        self.config: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._log: IO[bytes] | None = None

    def spawn(self) -> None:
        """Start the process (DBOS.launch runs there); ``wait_ready`` waits for it."""
        url = self.db.url.replace("postgresql://", "postgresql+psycopg://", 1)
        env = {**os.environ, "BENCH_DBOS_URL": url,
               "BENCH_DBOS_THREADS": str(self.opts.threads),
               "BENCH_DBOS_POOL": str(self.opts.pool),
               "BENCH_DBOS_POLL": str(self.opts.poll),
               "BENCH_DBOS_QUEUE_CONCURRENCY": str(self.opts.queue_concurrency),
               "BENCH_DBOS_LOGLEVEL": self.opts.loglevel}
        self._log = tempfile.NamedTemporaryFile(prefix="bench-dbos-", suffix=".log",
                                                delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.dbos_side"], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        ready = self._read(timeout=timeout)
        self.config = ready.get("config", {})
        self.pids = lambda: {"worker": self.tree_pids(), "postgres": self.db.backend_pids()}

    def tree_pids(self) -> list[int]:
        assert self.proc is not None
        return tree_pids(self.proc.pid)

    def log_tail(self, n: int = 3000) -> str:
        if self._log is None:
            return ""
        try:
            with open(self._log.name, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            state = ("exited " + str(self.proc.poll())) if self.proc.poll() is not None \
                else f"no answer in {timeout} s"
            raise RuntimeError(f"DBOS process {state}; its log:\n{self.log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"DBOS: {reply.get('error')}\n{reply.get('traceback', '')}")
        return reply

    def ask(self, **msg: Any) -> dict[str, Any]:
        with self._lock:
            assert self.proc is not None and self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            return self._read(self.timeout)

    def linear(self, n: int) -> Sample:
        r = self.ask(op="linear", n=n)
        stamps = r["stamps"]
        if len(stamps) != n:
            raise RuntimeError(f"DBOS workflow ran {len(stamps)} steps, expected {n}")
        return Sample(r["end"] - r["t0"], _diffs(stamps),
                      {"start_to_first_step_s": stamps[0] - r["t0"],
                       "last_step_to_end_s": r["end"] - stamps[-1]})

    def concurrent(self, n: int, steps: int = 3) -> Sample:
        r = self.ask(op="concurrent", n=n, steps=steps)
        wall = r["end"] - r["first_created"]
        return Sample(wall, detail={"wf_per_s": n / wall,
                                    "t0_to_first_created_s": r["first_created"] - r["t0"]})

    def agent(self, n: int, steps: int = 3, latency: float = 1.0) -> Sample:
        r = self.ask(op="agent", n=n, steps=steps, latency=latency)
        wall = r["end"] - r["t0"]
        return Sample(wall, detail={"vs_ideal": wall / (steps * latency),
                                    "t0_to_first_created_s": r["first_created"] - r["t0"]})

    def fanout(self, n: int) -> Sample:
        r = self.ask(op="fanout", n=n)
        return Sample(r["end"] - r["t0"], detail={"enqueue_all_s": r["enqueued"] - r["t0"],
                                                  "enqueued_to_end_s": r["end"] - r["enqueued"]})

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                log("DBOS process did not quit: killing it")
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            os.unlink(self._log.name)
            self._log = None
