"""The chaos suite's small configuration (``python -m chaos``, see chaos/__init__.py):
random workflows under injected faults, every one checked against the model. It runs
its own PostgreSQL cluster, redis-server and Kafka-protocol broker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_service

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_the_small_chaos_configuration_finds_no_violation() -> None:
    require_service("redis-server", shutil.which("redis-server") is not None,
                    "no redis-server on PATH")
    require_service("initdb", bool(list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))),
                    "no PostgreSQL binaries under /usr/lib/postgresql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHASSIS_")}
    proc = subprocess.run([sys.executable, "-m", "chaos", "--seed", "1", "--workflows", "80",
                           "--faults", "16"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=560)
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, out[-6000:]
    assert "no violation" in proc.stdout, out[-6000:]
    injected = next(line for line in proc.stdout.splitlines() if "faults injected" in line)
    assert int(injected.split("|")[2].split(":")[0]) >= 12, injected  # faults were done
