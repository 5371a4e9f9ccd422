"""Services of the tests' own, for tests that stop, kill or restart them (never the
shared ones): a redis-server on a free port, and a PostgreSQL cluster made with initdb
in a temporary folder and run as the ``postgres`` user."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
import redis

from tests.helpers import require_service, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A redis-server that keeps nothing on disk: restarted, it is empty."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        require_service("redis-server", binary is not None, "no redis-server on PATH")
        self.binary = binary or "redis-server"
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._ping, timeout=20, ignore=(redis.RedisError,),
                   message=f"redis-server did not start on {self.port}")

    def _ping(self) -> bool:
        with redis.Redis.from_url(self.url, socket_timeout=1) as r:
            return bool(r.ping())

    def kill(self) -> None:
        """SIGKILL: whatever it held is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)


class OwnPostgres:
    """A PostgreSQL cluster of its own (initdb), trust authentication, one port."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        bindir = found[-1].parent if found else None
        if bindir is None and shutil.which("initdb"):
            bindir = Path(shutil.which("initdb") or "").parent
        require_service("PostgreSQL binaries (initdb, pg_ctl)", bindir is not None,
                        "initdb not found under /usr/lib/postgresql/*/bin or on PATH")
        assert bindir is not None
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="chassis-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "postgres.log"),
                  "-w", "-t", "60", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 "
                  f"-c unix_socket_directories={self.folder} -c fsync=off", "start")
        wait_until(self._ready, timeout=30, ignore=(psycopg.Error,),
                   message=f"PostgreSQL did not start on {self.port}")

    def _ready(self) -> bool:
        with psycopg.connect(self.url, connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)
