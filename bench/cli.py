"""``python -m bench``: agentchassis against its peers, on one broker and one worker."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cases as casemod
from bench import report
from bench.env import CpuMeter, PostgresDatabase, RedisDatabase, Worker, log, machine
from bench.systems import Chassis, RawCelery, System

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark agentchassis against raw Celery on the same Redis broker, "
                    "the same worker and a fresh PostgreSQL database. Table on stdout, "
                    "progress on stderr, results in bench/results/latest.json.")
    p.add_argument("--quick", action="store_true", help="2 runs per case (default 5)")
    p.add_argument("--runs", type=int, help="measured runs per case and system")
    p.add_argument("--warmup", type=int, default=1, help="discarded runs first (default 1)")
    p.add_argument("--cases", default="linear,fanout", help="comma-separated: linear,fanout")
    p.add_argument("--systems", default="ours,raw_celery",
                   help="comma-separated: ours,raw_celery")
    p.add_argument("--steps", type=int, default=100, help="linear: steps (default 100)")
    p.add_argument("--width", type=int, default=500, help="fanout: sub-tasks (default 500)")
    p.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    p.add_argument("--pool", default="prefork", help="worker -P (default prefork)")
    p.add_argument("--prefetch", type=int, help="CHASSIS_PREFETCH_MULTIPLIER (default: 4)")
    p.add_argument("--loglevel", default="INFO", help="worker -l (default INFO)")
    p.add_argument("--postgres-url",
                   default=os.environ.get("CHASSIS_BENCH_POSTGRES_URL", DEFAULT_PG),
                   help="server (and a database to connect to) where bench_<random> is "
                        "created and dropped; env CHASSIS_BENCH_POSTGRES_URL")
    p.add_argument("--redis-url", default=os.environ.get("CHASSIS_BENCH_REDIS_URL",
                                                         DEFAULT_REDIS),
                   help="Redis server, no db number; env CHASSIS_BENCH_REDIS_URL")
    p.add_argument("--redis-db", type=int, default=14,
                   help="preferred Redis db (claimed like the tests do; default 14)")
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of the worker (experiments; repeatable)")
    p.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="ALTER DATABASE bench_<random> SET NAME=VALUE before the worker "
                        "starts, e.g. synchronous_commit=off to measure without the commit "
                        "fsync (experiments; repeatable)")
    p.add_argument("--output", type=Path, default=report.RESULTS / "latest.json")
    p.add_argument("--no-write", action="store_true", help="do not write the JSON file")
    p.add_argument("--py-spy", type=Path, metavar="DIR",
                   help="record the worker's pool processes with py-spy during each case "
                        "(collapsed stacks in DIR: flamegraph.pl, inferno or speedscope read them)")
    a = p.parse_args(argv)
    if a.runs is None:
        a.runs = 2 if a.quick else 5
    if a.runs < 1 or a.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    for kv in [*a.worker_env, *a.pg_setting]:
        if "=" not in kv:
            p.error(f"expected KEY=VALUE, got {kv!r}")
    return a


class PySpy:
    """py-spy record of every pool process for the duration of a ``with`` block."""

    def __init__(self, folder: Path, worker: Worker, label: str) -> None:
        self.folder, self.worker, self.label = folder, worker, label
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> PySpy:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.folder.mkdir(parents=True, exist_ok=True)
        for pid in self.worker.pids()["children"]:
            out = self.folder / f"{self.label}-{pid}.folded"
            self.procs.append(subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                 "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log(f"py-spy profiles in {self.folder}")


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    all_cases = casemod.cases(a.steps, a.width)
    wanted = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in all_cases]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(all_cases)}",
              file=sys.stderr)
        return 2
    keys = [s.strip() for s in a.systems.split(",") if s.strip()]

    load_start = os.getloadavg()
    if load_start[0] > (os.cpu_count() or 1) * 0.5:
        log(f"warning: load average {load_start[0]:.2f} on {os.cpu_count()} cores: other "
            "processes compete for the CPU and the figures will be noisy")
    pg = PostgresDatabase(a.postgres_url)
    rd = RedisDatabase(a.redis_url, prefer=a.redis_db)
    home = tempfile.mkdtemp(prefix="bench-home-")
    worker: Worker | None = None
    systems: list[System] = []
    owned: list[System] = []
    try:
        log(f"creating database {pg.name}")
        db_url = pg.create()
        from chassis.store.db import upgrade

        upgrade(db_url)
        settings = dict(kv.split("=", 1) for kv in a.pg_setting)
        for name, value in settings.items():
            pg.set(name, value)
            log(f"ALTER DATABASE {pg.name} SET {name} = {value}")
        broker = rd.claim()
        log(f"Redis database {rd.db} (flushed)")
        env = {"CHASSIS_DATABASE_URL": db_url, "CHASSIS_BROKER_URL": broker,
               "CHASSIS_RESULT_BACKEND": broker, "CHASSIS_ACTION_MODULES": "bench.raw_tasks",
               "CHASSIS_HOME": home}
        if a.prefetch is not None:
            env["CHASSIS_PREFETCH_MULTIPLIER"] = str(a.prefetch)
        raw = RawCelery(env)
        owned.append(raw)
        extra = dict(kv.split("=", 1) for kv in a.worker_env)
        worker = Worker({**env, **extra}, concurrency=a.concurrency, pool=a.pool,
                        loglevel=a.loglevel)
        log(f"starting worker -c {a.concurrency} -P {a.pool}")
        worker.start(ready=lambda: raw.ping(timeout=2))
        log(f"worker ready: pids {worker.pids()}")
        ours = Chassis(env)
        owned.append(ours)
        available: dict[str, System] = {"ours": ours, "raw_celery": raw}
        systems = [available[k] for k in keys if k in available]
        if not systems:
            print(f"no known system in {a.systems!r}; known: ours, raw_celery",
                  file=sys.stderr)
            return 2
        entries: list[dict[str, Any]] = []
        meter = CpuMeter(worker, pg)
        for name in wanted:
            case = all_cases[name]
            log(f"case {case.name}: {case.title}, {a.warmup} warm-up + {a.runs} runs")
            if a.py_spy:
                with PySpy(a.py_spy, worker, case.name):
                    entries.append(casemod.run_case(case, systems, a.runs, a.warmup,
                                                    meter=meter))
            else:
                entries.append(casemod.run_case(case, systems, a.runs, a.warmup,
                                                    meter=meter))
        doc = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m bench " + " ".join(argv if argv is not None
                                                     else sys.argv[1:]),
            "quick": a.quick,
            "machine": machine(pg, rd, worker),
            "experiment": {"worker_env": extra, "pg_settings": settings} if extra or settings
            else None,
            "load_average": {"start": [round(x, 2) for x in load_start],
                             "end": [round(x, 2) for x in os.getloadavg()]},
            "worker_peak_rss_mb": worker.peak_rss_mb(),
            "cases": entries,
        }
        labels = {s.key: s.label for s in owned}
        print(report.table(entries, labels))
        if not a.no_write:
            path = report.write(doc, a.output)
            log(f"wrote {path}")
        return 0
    finally:
        if worker is not None:
            worker.stop()
            if worker.proc is not None and worker.proc.returncode not in (0, None):
                log(f"worker exited {worker.proc.returncode}; log tail:\n"
                    + worker.text()[-3000:])
            worker.cleanup()
        for s in owned:
            s.close()
        from chassis.store.db import dispose_engines

        dispose_engines()
        try:
            pg.drop()
            log(f"dropped database {pg.name}")
        except Exception as exc:  # noqa: BLE001  (report, keep cleaning up)
            log(f"could not drop database {pg.name}: {exc}")
        try:
            rd.release()
        except Exception as exc:  # noqa: BLE001
            log(f"could not release Redis db: {exc}")
        shutil.rmtree(home, ignore_errors=True)
