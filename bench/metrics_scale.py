"""What a metrics scrape costs with 100 and with 100,000 finished workflows kept.

    python -m bench.metrics_scale [--postgres-url URL] [--sizes 100,100000] [--runs 7]

For each size, a fresh PostgreSQL database is migrated and filled (in SQL, with
generate_series) with that many finished workflows, each with 3 step runs, 3 ledger
rows and a published outbox row, all ended two days ago, plus 100 workflows under way
and 100 finished in the last hour. Then ``chassis.metrics``' collector is scraped
(``--runs`` times, after one warm-up) and the median is printed, with the ratio to the
smallest size. A benchmark, not a test: nothing here is pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

import sqlalchemy as sa

from chassis import config, metrics
from chassis.store.db import dispose_engines, make_engine, normalize_database_url, upgrade

FILL = """
INSERT INTO orchestrator_state (correlation_id, client_id, status, current_step,
  awaited_steps, created_at, updated_at, plan, fuel_budget, fuel_spent)
SELECT md5(CAST(:tag AS text) || g)::uuid, 'client-' || (g % 50), CAST(:status AS text),
  'done', '[]',
  now() - CAST(:age AS int) * interval '1 second', now() - CAST(:age AS int) * interval '1 second',
  '{"start_step": "done", "steps": {"done": {"action": "complete_workflow"}}}', 100, 3
FROM generate_series(1, CAST(:n AS int)) g;
INSERT INTO step_runs (correlation_id, step_name, attempt, action, status, dispatched_at,
  started_at, finished_at)
SELECT md5(CAST(:tag AS text) || g)::uuid, 's' || k, 1, 'echo', CAST(:run_status AS text),
  now() - CAST(:age AS int) * interval '1 second', now() - CAST(:age AS int) * interval '1 second',
  CASE WHEN CAST(:run_status AS text) = 'RUNNING' THEN NULL
       ELSE now() - CAST(:age AS int) * interval '1 second' END
FROM generate_series(1, CAST(:n AS int)) g, generate_series(1, 3) k;
INSERT INTO fuel_ledger (correlation_id, client_id, step_name, action, amount,
  idempotency_key, created_at)
SELECT md5(CAST(:tag AS text) || g)::uuid, 'client-' || (g % 50), 's' || k, 'echo', 1,
  md5(CAST(:tag AS text) || g) || '-s' || k, now() - CAST(:age AS int) * interval '1 second'
FROM generate_series(1, CAST(:n AS int)) g, generate_series(1, 3) k;
INSERT INTO outbox (correlation_id, topic, key, headers, payload, dedup_key, created_at,
  published_at)
SELECT md5(CAST(:tag AS text) || g)::uuid, 'system.notifications.ui', 'k', '{}',
  '{"event_type": "WORKFLOW_COMPLETED"}', md5(CAST(:tag AS text) || g) || '-done',
  now() - CAST(:age AS int) * interval '1 second', now() - CAST(:age AS int) * interval '1 second'
FROM generate_series(1, CAST(:n AS int)) g;
"""


def fill(url: str, n: int, tag: str, status: str, run_status: str, age: int) -> None:
    with make_engine(url).begin() as conn:
        for statement in FILL.split(";"):
            if statement.strip():
                conn.execute(sa.text(statement), {"n": n, "tag": tag, "status": status,
                                                  "run_status": run_status, "age": age})
        conn.execute(sa.text("ANALYZE"))


def scrape_seconds(url: str, runs: int) -> float:
    reg = metrics.registry(config.load({"CHASSIS_DATABASE_URL": url,
                                        "CHASSIS_BROKER_URL": "memory://"}))
    list(reg.collect())  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        list(reg.collect())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--sizes", default="100,100000",
                    help="comma-separated numbers of old finished workflows")
    ap.add_argument("--runs", type=int, default=7, help="scrapes measured per size")
    args = ap.parse_args(argv)
    admin = sa.create_engine(normalize_database_url(args.postgres_url),
                             isolation_level="AUTOCOMMIT")
    base = None
    for size in (int(x) for x in args.sizes.split(",")):
        name = f"bench_metrics_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        url = str(sa.make_url(normalize_database_url(args.postgres_url)).set(database=name))
        try:
            upgrade(url)
            print(f"filling {size} old finished workflows ...", file=sys.stderr)
            fill(url, size, "old", "COMPLETED", "COMPLETED", 2 * 86400)
            fill(url, 100, "recent", "COMPLETED", "COMPLETED", 60)
            fill(url, 100, "live", "RUNNING", "RUNNING", 10)
            took = scrape_seconds(url, args.runs)
            base = base or took
            print(f"{size:>9} finished workflows kept: scrape {took * 1000:.1f} ms "
                  f"(x{took / base:.2f})")
        finally:
            dispose_engines(url)
            with admin.connect() as conn:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
