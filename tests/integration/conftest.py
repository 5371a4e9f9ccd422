"""Real Celery workers (``celery -A chassis.worker worker`` subprocesses) on Redis and
PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chassis import config
from chassis.api import Client
from chassis.store.db import upgrade
from tests.helpers import wait_until
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes: no warm shutdown, no ack."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Services:
    """Environment of a test deployment: Postgres state, Redis broker and backend."""

    env: dict[str, str]
    tmp: Path
    workers: list[Worker] = field(default_factory=list)

    def client(self) -> Client:
        return Client(config.load(self.env), client_id="acme")

    def _celery(self, name: str, args: list[str], ready: str, env: dict[str, str]) -> Worker:
        """``celery -A chassis.worker <args>`` in the repository, logging to a file, once ready."""
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "chassis.worker", *args],
                                    cwd=ROOT, env={**os.environ, **self.env, **env},
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        w = Worker(proc, log)
        self.workers.append(w)
        wait_until(lambda: ready in w.text() or proc.poll() is not None, timeout=60,
                   message=f"{name} did not start: {log}")
        assert proc.poll() is None, w.text()
        return w

    def start_beat(self, **env: str) -> Worker:
        """``celery -A chassis.worker beat``: it sends the sweep every CHASSIS_SWEEP_INTERVAL."""
        name = f"beat-{uuid.uuid4().hex[:8]}"
        return self._celery(name, ["beat", "-l", "INFO", "-s", str(self.tmp / name)],
                            "beat: Starting", env)

    def start_worker(self, concurrency: int = 2, queues: str | None = None,
                     pool: str = "prefork", events: bool = False, **env: str) -> Worker:
        name = f"test-{uuid.uuid4().hex[:8]}"
        return self._celery(name, [
            "worker", "-l", "INFO", "-c", str(concurrency), "-n", f"{name}@localhost",
            "--without-mingle", "--without-gossip", "-P", pool,
            "-Q", queues or "chassis.coordination,chassis.steps,chassis.ai",
            *(["-E"] if events else [])], "ready.", env)


@dataclass
class Web:
    """A ``chassis web`` process (the README's command) serving ``url``."""

    worker: Worker
    url: str
    env: dict[str, str]

    def key(self, client: str, admin: bool = False) -> str:
        """A new API key of ``client`` (``chassis keys create``)."""
        proc = subprocess.run([sys.executable, "-m", "chassis", "keys", "create", client,
                               *(["--admin"] if admin else [])], cwd=ROOT,
                              env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()


def start_web(services: Services, **env: str) -> Web:
    """``chassis web`` on a free port with the services' settings, once it answers."""
    import httpx

    port = free_port()
    log = services.tmp / f"web-{port}.log"
    full = {**services.env, **env}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chassis", "web", "--port", str(port)],
                                cwd=ROOT, env={**os.environ, **full}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    w = Worker(proc, log)
    services.workers.append(w)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: proc.poll() is not None or httpx.get(f"{url}/healthz").is_success,
               timeout=60, ignore=(httpx.HTTPError,), message=f"chassis web: {log}")
    assert proc.poll() is None, w.text()
    return Web(w, url, full)


@pytest.fixture(scope="module")
def services(postgres_url: str, redis_url: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    upgrade(postgres_url)
    tmp = tmp_path_factory.mktemp("services")
    env = {
        "CHASSIS_DATABASE_URL": postgres_url,
        "CHASSIS_BROKER_URL": redis_url,
        "CHASSIS_RESULT_BACKEND": redis_url,
        "CHASSIS_ACTION_MODULES": "tests.integration.user_actions",
        "CHASSIS_HOME": str(tmp / ".chassis"),
        "CHASSIS_TEST_COUNTER_URL": redis_url,
        "CHASSIS_AI_PROVIDER": "offline",  # never the real API from a developer's shell
    }
    s = Services(env, tmp)
    yield s
    for w in s.workers:
        w.stop()


@pytest.fixture(scope="module")
def worker(services: Services) -> Worker:
    """One worker for the module's tests."""
    return services.start_worker()


@pytest.fixture(scope="module")
def client(services: Services) -> Client:
    import tests.integration.user_actions  # noqa: F401  (the client validates 'count')

    return services.client()
