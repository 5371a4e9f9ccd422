"""``python -m bench``: agentchassis against its peers, on one broker and one worker."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import cases as casemod
from bench import report
from bench.env import (
    OtherLoad,
    PostgresDatabase,
    RedisDatabase,
    RssSampler,
    Worker,
    cpu_seconds,
    git_state,
    log,
    machine,
    tree_pids,
)
from bench.systems import Chassis, Dbos, DbosOptions, RawCelery, System

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379"
CASES = ("linear", "concurrent", "fanout", "fuel")
#: Cases run only when named (--cases agent,growth): they take minutes each.
EXTRA_CASES = ("agent", "growth")
SYSTEMS = ("ours", "raw_celery", "dbos")
#: What the worker imports: the raw-Celery tasks and the bench's own actions.
ACTION_MODULES = "bench.raw_tasks,bench.actions"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark agentchassis against raw Celery and DBOS on the same Redis "
                    "broker and PostgreSQL server: one Celery worker for ours and raw "
                    "Celery, one DBOS process. Table on stdout, progress on stderr, results "
                    "in bench/results/latest.json and latest.md.")
    p.add_argument("--quick", action="store_true",
                   help="2 runs per case (default 5), smaller warm-up workloads: under "
                        "two minutes")
    p.add_argument("--runs", type=int, help="measured runs per case and system")
    p.add_argument("--warmup", type=int, default=1, help="discarded runs first (default 1)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: "
                   + ",".join(CASES + EXTRA_CASES) + " (default: all but "
                   + ",".join(EXTRA_CASES) + ")")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated: " + ",".join(SYSTEMS))
    p.add_argument("--steps", type=int, default=100, help="linear: steps (default 100)")
    p.add_argument("--width", type=int, default=500, help="fanout: sub-tasks (default 500)")
    p.add_argument("--workflows", type=int, default=200,
                   help="concurrent: workflows started at once (default 200)")
    p.add_argument("--workflow-steps", type=int, default=3,
                   help="concurrent: steps per workflow (default 3)")
    p.add_argument("--fuel-workflows", type=int, default=8,
                   help="fuel: workflows of one client (default 8)")
    p.add_argument("--fuel-steps", type=int, default=25,
                   help="fuel: debiting steps per workflow (default 25)")
    p.add_argument("--agent-workflows", type=int, default=1000,
                   help="agent: workflows of 3 waiting steps (default 1000)")
    p.add_argument("--agent-latency", type=float, default=1.0,
                   help="agent: seconds each step waits, a model call (default 1)")
    p.add_argument("--growth-steps", type=int, default=1000,
                   help="growth: steps of the one workflow (default 1000)")
    p.add_argument("--growth-bytes", type=int, default=10_240,
                   help="growth: bytes of each step's output (default 10240)")
    p.add_argument("--concurrency", type=int, default=512,
                   help="worker -c (default 512, the shipped worker's)")
    p.add_argument("--pool", default="threads",
                   help="worker -P (default threads, the shipped worker's)")
    p.add_argument("--prefetch", type=int, default=1,
                   help="CHASSIS_PREFETCH_MULTIPLIER (default 1, the shipped worker's)")
    p.add_argument("--loglevel", default="INFO",
                   help="worker -l, and DBOS's log_level (default INFO)")
    p.add_argument("--dbos-threads", type=int, default=0,
                   help="DBOS max_executor_threads (default 0: DBOS's default, unbounded)")
    p.add_argument("--dbos-pool", type=int, default=0,
                   help="DBOS sys_db_pool_size (default 0: DBOS's default, 20)")
    p.add_argument("--dbos-poll", type=float, default=0.05,
                   help="DBOS fan-out queue polling_interval_sec (default 0.05; DBOS's "
                        "own default of 1 s would add up to a second per fan-out)")
    p.add_argument("--dbos-queue-concurrency", type=int, default=0,
                   help="DBOS fan-out queue worker_concurrency (default 0: unbounded)")
    p.add_argument("--postgres-url",
                   default=os.environ.get("CHASSIS_BENCH_POSTGRES_URL", DEFAULT_PG),
                   help="server (and a database to connect to) where bench_<random> and "
                        "bench_dbos_<random> are created and dropped; env "
                        "CHASSIS_BENCH_POSTGRES_URL")
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
                        "fsync (experiments; repeatable; ours and raw Celery only)")
    p.add_argument("--output", type=Path, default=report.RESULTS / "latest.json")
    p.add_argument("--markdown", type=Path, default=report.RESULTS / "latest.md",
                   help="the README's table (default bench/results/latest.md)")
    p.add_argument("--no-write", action="store_true", help="write neither file")
    p.add_argument("--py-spy", type=Path, metavar="DIR",
                   help="record the worker's pool processes and the DBOS process with "
                        "py-spy during each case (collapsed stacks in DIR: flamegraph.pl, "
                        "inferno or speedscope read them)")
    p.add_argument("--py-spy-idle", action="store_true",
                   help="with --py-spy: sample waiting threads too (where wall time goes, "
                        "not only CPU)")
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
    """py-spy record of the given processes for the duration of a ``with`` block."""

    def __init__(self, folder: Path, pids: dict[str, int], label: str,
                 idle: bool = False) -> None:
        self.folder, self.pids, self.label, self.idle = folder, pids, label, idle
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> PySpy:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            out = self.folder / f"{self.label}-{name}-{pid}.folded"
            self.procs.append(subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                 "-o", str(out), *(["--idle"] if self.idle else [])],
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


def memory_entry(rss: RssSampler, systems: Sequence[System]) -> dict[str, Any]:
    """Peak memory of each system's process tree while its own runs ran: the sum of
    RSS (the headline, as issue 7 asks) and the sum of PSS (shared pages counted once)."""
    metrics: dict[str, Any] = {}
    for name, pss in (("peak_rss", False), ("peak_pss", True)):
        peaks = {s.key: rss.peak(s.tree, s.key, pss=pss) for s in systems}
        mine = peaks.pop("ours", None)
        ratios = {k: (mine / v if mine is not None and v else None) for k, v in peaks.items()}
        metrics[name] = {"unit": "MB", "better": "lower", "targets": {}, "expect": None,
                         "ours": mine, "peers": peaks, "ratios": ratios, "meets_target": {},
                         "samples": {}}
    head = metrics["peak_rss"]
    return {"name": "memory", "title": "peak worker memory", "size": None,
            "params": {}, "metric": "peak_rss", "unit": "MB", "better": "lower",
            "ours": head["ours"], "peers": head["peers"], "ratios": head["ratios"],
            "targets": {}, "meets_target": {}, "metrics": metrics,
            "detail_medians": {"overall_peak_rss_mb": {t: rss.peak(t) for t in sorted(rss.trees)},
                               "overall_peak_pss_mb": {t: rss.peak(t, pss=True)
                                                       for t in sorted(rss.trees)}},
            "how": "sum over the process tree (Celery worker: main process and its pool "
                   "children; DBOS: its process) of VmRSS (peak_rss) and of PSS "
                   f"(peak_pss), sampled every {rss.interval:g} s; each system's figure is "
                   "the peak while its own runs (warm-ups included) ran. Ours and raw Celery "
                   "share one worker, so memory that one side's runs left in it is also in "
                   "the other's."}


def idle_cpu(trees: dict[str, int], seconds: float = 1.0) -> dict[str, float]:
    """CPU seconds per second each process tree burns while nothing is asked of it (the
    DBOS process polls its queues; the Celery worker waits on the broker)."""
    before = {n: sum(cpu_seconds(p) for p in tree_pids(r)) for n, r in trees.items()}
    time.sleep(seconds)
    return {n: round((sum(cpu_seconds(p) for p in tree_pids(r)) - before[n]) / seconds, 3)
            for n, r in trees.items()}


def config_notes(a: argparse.Namespace, dbos: Dbos | None,
                 idle: dict[str, float]) -> list[str]:
    notes = [
        f"agentchassis and raw Celery: one `celery worker -P {a.pool} -c {a.concurrency}` "
        f"(prefetch multiplier {a.prefetch}) serving both, Redis broker and result "
        "backend; ours starts workflows from the bench process through "
        "`chassis.api.Client.start`.",
    ]
    if dbos is not None:
        c = dbos.config
        q = c.get("fanout_queue", {})
        notes.append(
            "DBOS: one process (`python -m bench.dbos_side`) running workflows on its "
            f"thread pool (max_executor_threads {c.get('max_executor_threads')}, "
            f"sys_db_pool_size {c.get('sys_db_pool_size')}), its own system database on "
            "the same PostgreSQL server; it starts its workflows itself "
            "(`DBOS.start_workflow`); fan-out enqueues each sub-task (a step) on a DBOS "
            f"queue (polling_interval_sec {q.get('polling_interval_sec')}, "
            f"worker_concurrency {q.get('worker_concurrency') or 'unbounded'}) from "
            "inside the parent workflow and gathers the handles' results.")
    notes.append(
        "Idle CPU (CPU seconds per second, nothing asked of it): "
        + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in idle.items())
        + " (DBOS polls its queues and system tables in the background while the others "
        "run).")
    notes.append(
        "All on the same 2-core machine with the same PostgreSQL and Redis; per step: "
        "median gap between consecutive step starts; throughput: workflows / (first "
        "workflow recorded -> last recorded complete, database timestamps); fuel: ledger "
        "rows / (first workflow recorded -> last completion); worker_cpu: CPU seconds of "
        "the system's own processes per run (the bench process's Client.start calls "
        "are not in ours; DBOS's start_workflow calls are in DBOS's).")
    return notes


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    all_cases = casemod.cases(a.steps, a.width, a.workflows, a.workflow_steps,
                              a.fuel_workflows, a.fuel_steps, a.agent_workflows,
                              a.agent_latency, a.growth_steps, a.growth_bytes)
    wanted = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in all_cases]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(all_cases)}",
              file=sys.stderr)
        return 2
    keys = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [k for k in keys if k not in SYSTEMS]
    if unknown or not keys:
        print(f"unknown system(s) {a.systems!r}; known: {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2

    if "dbos" in keys and importlib.util.find_spec("dbos") is None:
        print("the DBOS peer needs the `dbos` package: pip install -e '.[bench]' "
              "(or leave it out: --systems ours,raw_celery)", file=sys.stderr)
        return 2

    load_start = os.getloadavg()
    others = OtherLoad()
    code = git_state()  # what the worker and the bench import: the work tree, now
    if load_start[0] > (os.cpu_count() or 1) * 0.5:
        log(f"warning: load average {load_start[0]:.2f} on {os.cpu_count()} cores: other "
            "processes compete for the CPU and the figures will be noisy")
    pg = PostgresDatabase(a.postgres_url)
    dbos_pg = PostgresDatabase(a.postgres_url, name=f"bench_dbos_{pg.name[6:]}")
    rd = RedisDatabase(a.redis_url, prefer=a.redis_db)
    home = tempfile.mkdtemp(prefix="bench-home-")
    worker: Worker | None = None
    dbos: Dbos | None = None
    owned: list[System] = []
    created: list[PostgresDatabase] = []
    rss = RssSampler(interval=0.1)
    try:
        if "dbos" in keys:  # DBOS.launch takes a few seconds: overlap it with the worker's
            log(f"creating database {dbos_pg.name} (DBOS system database)")
            dbos_pg.create()
            created.append(dbos_pg)
            dbos = Dbos(dbos_pg, DbosOptions(threads=a.dbos_threads, pool=a.dbos_pool,
                                             poll=a.dbos_poll,
                                             queue_concurrency=a.dbos_queue_concurrency,
                                             loglevel=a.loglevel))
            owned.append(dbos)
            dbos.spawn()
        log(f"creating database {pg.name}")
        db_url = pg.create()
        created.append(pg)
        from chassis.store.db import upgrade

        upgrade(db_url)
        settings = dict(kv.split("=", 1) for kv in a.pg_setting)
        for name, value in settings.items():
            pg.set(name, value)
            log(f"ALTER DATABASE {pg.name} SET {name} = {value}")
        broker = rd.claim()
        log(f"Redis database {rd.db} (flushed)")
        env = {"CHASSIS_DATABASE_URL": db_url, "CHASSIS_BROKER_URL": broker,
               "CHASSIS_RESULT_BACKEND": broker, "CHASSIS_ACTION_MODULES": ACTION_MODULES,
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
        assert worker.proc is not None
        wpid = worker.proc.pid
        celery_pids = lambda: {"worker": tree_pids(wpid),  # noqa: E731
                               "postgres": pg.backend_pids()}
        ours.pids = raw.pids = celery_pids
        rss.watch("celery_worker", wpid)
        if dbos is not None:
            dbos.wait_ready()
            assert dbos.proc is not None
            rss.watch("dbos", dbos.proc.pid)
            log(f"DBOS ready: pid {dbos.proc.pid}, {dbos.config}")
        idle = idle_cpu(rss.trees)
        log(f"idle CPU (s per s) of each process tree: {idle}")
        available: dict[str, System] = {"ours": ours, "raw_celery": raw}
        if dbos is not None:
            available["dbos"] = dbos
        systems = [available[k] for k in keys if k in available]
        entries: list[dict[str, Any]] = []
        with rss:
            for name in wanted:
                case = all_cases[name]
                wsize = max(1, case.size // 10) if a.quick else None
                log(f"case {case.name}: {case.title}, {a.warmup} warm-up"
                    f"{f' (size {wsize})' if wsize else ''} + {a.runs} runs")
                spy_pids = {f"pool{i}": p for i, p in enumerate(worker.pids()["children"])}
                if dbos is not None and dbos.proc is not None:
                    spy_pids["dbos"] = dbos.proc.pid
                if a.py_spy:
                    with PySpy(a.py_spy, spy_pids, case.name, idle=a.py_spy_idle):
                        entries.append(casemod.run_case(case, systems, a.runs, a.warmup,
                                                        rss=rss, warmup_size=wsize))
                else:
                    entries.append(casemod.run_case(case, systems, a.runs, a.warmup,
                                                    rss=rss, warmup_size=wsize))
            rss.sample()
        entries.append(memory_entry(rss, systems))
        busy = others.stop(pg.backend_pids() + (dbos_pg.backend_pids() if dbos else []))
        log(f"the rest of the machine used {busy['other_processes_share']:.0%} of the CPU "
            f"during the bench (the bench itself and its databases excluded)")
        code_end = git_state()
        if code_end != code:
            code = {**code, "changed_during_run": code_end}
            log(f"warning: the engine's code changed during the run: {code_end} (the "
                f"worker ran what was there at the start: {code})")
        mach = machine(pg, rd, worker, git=code)
        mach["dbos"] = _version("dbos")
        mach["dbos_config"] = dbos.config if dbos is not None else None
        doc = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m bench " + " ".join(argv if argv is not None
                                                     else sys.argv[1:]),
            "quick": a.quick, "runs": a.runs, "warmup": a.warmup,
            "machine": mach,
            "config_notes": config_notes(a, dbos, idle),
            "experiment": {"worker_env": extra, "pg_settings": settings} if extra or settings
            else None,
            "load_average": {"start": [round(x, 2) for x in load_start],
                             "end": [round(x, 2) for x in os.getloadavg()]},
            "cpu_during_bench": busy,
            "worker_peak_rss_mb": worker.peak_rss_mb(),
            "idle_cpu_s_per_s": idle,
            "cases": entries,
        }
        doc["command"] = doc["command"].strip()
        labels = {"ours": "agentchassis", **{s.key: s.label for s in owned}}
        print(report.table(entries, labels))
        print()
        for note in doc["config_notes"]:
            print(f"- {note}")
        print(f"- load average {doc['load_average']['start'][0]:.2f} before the bench "
              f"started; during it, other processes used {busy['other_processes_share']:.0%} "
              f"of the {os.cpu_count()} cores (the whole machine "
              f"{busy['machine_busy_share']:.0%})")
        if not a.no_write:
            log(f"wrote {report.write(doc, a.output)}")
            log(f"wrote {report.write_text(report.markdown(doc, labels), a.markdown)}")
        return 0
    finally:
        if worker is not None:
            worker.stop()
            if worker.proc is not None and worker.proc.returncode not in (0, None):
                log(f"worker exited {worker.proc.returncode}; log tail:\n"
                    + worker.text()[-3000:])
            worker.cleanup()
        for s in owned:
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001  (report, keep cleaning up)
                log(f"could not close {s.key}: {exc}")
        from chassis.store.db import dispose_engines

        dispose_engines()
        for db in created:
            try:
                db.drop()
                log(f"dropped database {db.name}")
            except Exception as exc:  # noqa: BLE001  (report, keep cleaning up)
                log(f"could not drop database {db.name}: {exc}")
        try:
            rd.release()
        except Exception as exc:  # noqa: BLE001
            log(f"could not release Redis db: {exc}")
        shutil.rmtree(home, ignore_errors=True)
