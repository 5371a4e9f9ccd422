"""The bench's services: a fresh PostgreSQL database, a Redis database, one worker.

Everything the bench creates it removes again: the database ``bench_<random>`` is
created on the server of ``--postgres-url`` and dropped at the end; the Redis database is
claimed with the test suite's protocol (``chassis:test-db-claim:N`` keys in db 0, so a
concurrent ``pytest`` never gets the same one), flushed before and after, and released;
the worker's process group is stopped.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
QUEUES = "chassis.coordination,chassis.steps,chassis.ai"
REDIS_CLAIM_PREFIX = "chassis:test-db-claim:"  # shared with tests/conftest.py
REDIS_CLAIM_SECONDS = 2 * 3600


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the result table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _with_db(url: str, dbname: str) -> str:
    """``url`` (postgresql://...) with its database name replaced."""
    head, sep, tail = url.partition("://")
    rest, q, query = tail.partition("?")
    hostpart = rest.split("/", 1)[0]
    return f"{head}{sep}{hostpart}/{dbname}{q}{query}"


# ------------------------------------------------------------------ PostgreSQL


@dataclass
class PostgresDatabase:
    """``CREATE DATABASE bench_<hex>`` on the server of ``admin_url``; ``drop`` removes it."""

    admin_url: str
    name: str = field(default_factory=lambda: f"bench_{uuid.uuid4().hex[:10]}")

    @property
    def url(self) -> str:
        return _with_db(self.admin_url, self.name)

    def create(self) -> str:
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        return self.url

    def drop(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(self.name)))

    def backend_pids(self) -> list[int]:
        """Server processes connected to the bench database (not this query's own)."""
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s "
                                "AND pid <> pg_backend_pid()", (self.name,)).fetchall()
        return [int(r[0]) for r in rows]

    def set(self, name: str, value: str) -> None:
        """``ALTER DATABASE <bench db> SET name = value`` (applies to new sessions)."""
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(self.name), sql.Identifier(name), sql.Literal(value)))

    def server_info(self) -> dict[str, Any]:
        with psycopg.connect(self.admin_url, connect_timeout=10) as conn:
            def show(name: str) -> str:
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                return str(row[0]) if row else "?"
            return {"version": show("server_version"),
                    "synchronous_commit": show("synchronous_commit"),
                    "fsync": show("fsync"), "shared_buffers": show("shared_buffers")}


# ------------------------------------------------------------------ Redis


@dataclass
class RedisDatabase:
    """A Redis database number claimed like the tests claim theirs (highest free first,
    preferring ``prefer``), flushed on claim and on release."""

    base_url: str  # redis://host:port (no db number)
    prefer: int = 14
    db: int | None = None
    _token: str = field(default_factory=lambda: f"bench-{os.getpid()}-{uuid.uuid4().hex}")

    @property
    def url(self) -> str:
        assert self.db is not None
        return f"{self.base_url.rstrip('/')}/{self.db}"

    def claim(self) -> str:
        claims = redis.Redis.from_url(f"{self.base_url.rstrip('/')}/0", socket_timeout=5)
        try:
            order = [self.prefer, *[n for n in range(15, 0, -1) if n != self.prefer]]
            for n in order:
                if claims.set(f"{REDIS_CLAIM_PREFIX}{n}", self._token, nx=True,
                              ex=REDIS_CLAIM_SECONDS):
                    self.db = n
                    break
            else:
                raise RuntimeError("every Redis database 1..15 is claimed (by test sessions)")
        finally:
            claims.close()
        self.client().flushdb()
        return self.url

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=30)

    def release(self) -> None:
        if self.db is None:
            return
        try:
            self.client().flushdb()
        finally:
            claims = redis.Redis.from_url(f"{self.base_url.rstrip('/')}/0", socket_timeout=5)
            key = f"{REDIS_CLAIM_PREFIX}{self.db}"
            if claims.get(key) == self._token.encode():
                claims.delete(key)
            claims.close()
            self.db = None

    def server_info(self) -> dict[str, Any]:
        info = self.client().info("server")
        return {"version": info.get("redis_version", "?")}


# ------------------------------------------------------------------ worker


@dataclass
class Worker:
    """``celery -A chassis.worker worker`` as a subprocess in its own session (process group)."""

    env: dict[str, str]
    concurrency: int = 2
    pool: str = "prefork"
    loglevel: str = "INFO"
    proc: subprocess.Popen[bytes] | None = None
    logfile: Path | None = None
    name: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:8]}@localhost")

    def start(self, ready: Callable[[], bool], timeout: float = 60) -> None:
        fd, path = tempfile.mkstemp(prefix="bench-worker-", suffix=".log")
        self.logfile = Path(path)
        cmd = [sys.executable, "-m", "celery", "-A", "chassis.worker", "worker",
               "-l", self.loglevel, "-c", str(self.concurrency), "-P", self.pool, "-n", self.name,
               "--without-mingle", "--without-gossip", "-Q", QUEUES]
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **self.env},
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker was not ready after {timeout} s:\n{self.text()}")

    def text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile else ""

    def pids(self) -> dict[str, list[int]]:
        """The main process and its pool children (for py-spy and memory figures)."""
        assert self.proc is not None
        children: list[int] = []
        try:
            tasks_dir = Path(f"/proc/{self.proc.pid}/task")
            for t in tasks_dir.iterdir():
                kids = (t / "children").read_text().split()
                children.extend(int(k) for k in kids)
        except OSError:
            pass
        return {"main": [self.proc.pid], "children": sorted(set(children))}

    def peak_rss_mb(self) -> dict[str, float]:
        """Peak resident set size (VmHWM) of the main process and each pool child."""
        out: dict[str, float] = {}
        p = self.pids()
        for role, pids in p.items():
            for pid in pids:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            out[f"{role}:{pid}"] = round(int(line.split()[1]) / 1024, 1)
                except OSError:
                    pass
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        if self.logfile is not None:
            self.logfile.unlink(missing_ok=True)


# ------------------------------------------------------------------ CPU time

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (``/proc/<pid>/task/*/children``)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for t in Path(f"/proc/{pid}/task").iterdir():
                try:
                    todo.extend(int(k) for k in (t / "children").read_text().split())
                except OSError:
                    pass
        except OSError:
            pass
    return sorted(set(out))


def _kb_field(path: str, name: str) -> float:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    """Current resident set size of one process in MiB (0 when it is gone)."""
    return _kb_field(f"/proc/{pid}/status", "VmRSS:")


def pss_mb(pid: int) -> float:
    """Proportional set size in MiB: pages shared by several processes (a prefork pool's
    copy-on-write pages) split between them, so a tree's sum counts them once."""
    return _kb_field(f"/proc/{pid}/smaps_rollup", "Pss:")


class CpuMeter:
    """CPU seconds spent by a system's processes (the Celery worker's tree, or the DBOS
    process) and by the PostgreSQL backends of its database between ``start`` and
    ``stop``. On a busy machine wall times are noisy; CPU per run is much steadier (it
    misses time spent waiting, e.g. for the commit's fsync)."""

    def __init__(self, pids: Callable[[], dict[str, list[int]]]) -> None:
        self.pids = pids  # {"worker": [...], "postgres": [...]}
        self._before: dict[str, dict[int, float]] = {}

    def start(self) -> None:
        self._before = {k: {pid: cpu_seconds(pid) for pid in v}
                        for k, v in self.pids().items()}

    def stop(self) -> dict[str, float]:
        out = {}
        for k, pids in self.pids().items():
            before = self._before.get(k, {})
            out[f"{k}_cpu_s"] = round(sum(max(0.0, cpu_seconds(pid) - before.get(pid, 0.0))
                                          for pid in pids), 3)
        return out


class RssSampler:
    """Samples the resident memory of process trees every ``interval`` seconds in a
    thread: the sum of VmRSS over a tree (the Celery worker: main process and pool
    children; DBOS: its one process), and the sum of PSS (shared pages counted once).
    ``label`` says which system is running, so each system's peak is the peak of its own
    process tree while its own runs ran."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.trees: dict[str, int] = {}  # tree name -> root pid
        self.label: str | None = None
        self.peaks: dict[tuple[str | None, str], float] = {}
        self.pss_peaks: dict[tuple[str | None, str], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, name: str, root: int) -> None:
        self.trees[name] = root

    def sample(self) -> None:
        label = self.label
        for name, root in list(self.trees.items()):
            pids = tree_pids(root)
            rss = sum(rss_mb(p) for p in pids)
            pss = sum(pss_mb(p) for p in pids)
            for key in ((label, name), (None, name)):
                if rss > self.peaks.get(key, 0.0):
                    self.peaks[key] = rss
                if pss > self.pss_peaks.get(key, 0.0):
                    self.pss_peaks[key] = pss

    def peak(self, tree: str, label: str | None = None, pss: bool = False) -> float | None:
        v = (self.pss_peaks if pss else self.peaks).get((label, tree))
        return None if v is None else round(v, 1)

    def __enter__(self) -> RssSampler:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.sample()
        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class OtherLoad:
    """How busy the rest of the machine was during the bench: CPU time of the whole
    machine (``/proc/stat``) minus the bench's own process tree (the bench, the worker,
    DBOS) and the PostgreSQL backends of its databases, as a share of all cores. The
    load average cannot tell: the bench's own processes are in it. Approximate: the
    PostgreSQL server's background processes (WAL writer, checkpointer) count as other."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.own0 = self._own([])

    @staticmethod
    def _busy() -> float:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        vals = [int(x) for x in fields]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return (sum(vals[:8]) - idle) / _TICK  # without guest time (counted in user)

    @staticmethod
    def _own(backends: list[int]) -> float:
        return sum(cpu_seconds(p) for p in [*tree_pids(os.getpid()), *backends]) + \
            sum(os.times()[2:4])  # reaped children (py-spy runs, psql...)

    def stop(self, backends: list[int]) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        cores = os.cpu_count() or 1
        busy = self._busy() - self.busy0
        own = self._own(backends) - self.own0
        other = max(0.0, busy - own)
        return {"wall_s": round(wall, 1), "machine_busy_share": round(busy / (wall * cores), 3),
                "other_processes_share": round(other / (wall * cores), 3)}


# ------------------------------------------------------------------ machine


def machine(pg: PostgresDatabase, rd: RedisDatabase, worker: Worker,
            git: dict[str, Any] | None = None) -> dict[str, Any]:
    import celery
    import kombu
    import sqlalchemy

    return {
        "cores": os.cpu_count(),
        "git": git or git_state(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": pg.server_info(),
        "redis": rd.server_info(),
        "celery": celery.__version__, "kombu": kombu.__version__,
        "sqlalchemy": sqlalchemy.__version__, "psycopg": psycopg.__version__,
        "worker": {"pool": worker.pool, "concurrency": worker.concurrency,
                   "loglevel": worker.loglevel,
                   "prefetch_multiplier": int(worker.env.get("CHASSIS_PREFETCH_MULTIPLIER")
                                              or 4)},
    }


def git_state() -> dict[str, Any]:
    """HEAD, and the engine's files that differ from it (the worker imports the work
    tree as it is when the worker starts; ``bench.cli`` records it then)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no",
                                        "--", "chassis", "tasks", "celeryconfig.py")
               .splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "modified_engine_files": changed}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
