"""The Procfile, docker-compose.yml, Dockerfile and .env.example: complete and valid.

``docker-compose config`` (the Debian package docker-compose) validates the compose
file; the test skips when the binary is not installed (it is not needed to run the
tests, and no Docker engine is: `config` only reads the file).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import require_service

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = {"migrate", "worker", "coordinator", "beat", "flower", "bridge", "relay",
                "metrics", "web", "agent"}


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if line and not line.startswith("#"))


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_procfile_runs_every_process_with_the_real_commands() -> None:
    procs = {name: cmd.strip() for name, cmd in procfile().items()}
    assert set(procs) == {"worker", "coordinator", "beat", "flower", "bridge", "relay",
                          "metrics", "web", "agent"}
    for name in ("worker", "coordinator"):
        assert procs[name].startswith("celery -A chassis.worker worker")
        assert "--events" in procs[name]  # Flower sees tasks only from workers' events
        assert "--pool=threads" in procs[name]  # steps mostly wait (model calls)
    assert procs["worker"].endswith("--queues=${CHASSIS_WORKER_QUEUES:-chassis.steps,chassis.ai}")
    assert "--prefetch-multiplier=1" in procs["worker"]
    # the coordinator also takes what other apps send without a queue (Celery's default)
    assert procs["coordinator"].endswith(
        "--queues=${CHASSIS_COORDINATOR_QUEUES:-chassis.coordination,celery}")
    assert procs["beat"].startswith("celery -A chassis.worker beat")
    assert procs["flower"] == "celery -A chassis.worker flower"
    assert (procs["bridge"], procs["relay"]) == ("chassis bridge", "chassis relay")
    assert procs["metrics"] == "chassis metrics"
    assert procs["web"] == ("chassis web --host ${CHASSIS_WEB_HOST:-127.0.0.1} "
                            "--port ${CHASSIS_WEB_PORT:-8000}")
    assert procs["agent"].startswith("chassis agent --type research --actions examples.agent")


def test_compose_has_every_service_with_health_checks_and_start_order() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "kafka"} | APP_SERVICES == set(services)
    for name in ("postgres", "redis", "kafka"):
        assert services[name]["healthcheck"]["test"], name
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert services["migrate"]["command"] == ["chassis", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in APP_SERVICES - {"migrate", "agent"}:
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
    # Kafka is optional: it, the bridge, the relay and the example agent come with the
    # profile "kafka"; nothing else waits for it, and Kafka features are off unless the
    # bootstrap is set. The agent needs Kafka alone (no database, no Celery broker).
    kafka_ones = {n for n, svc in services.items() if "kafka" in svc.get("profiles", ())}
    assert kafka_ones == {"kafka", "bridge", "relay", "agent"}
    for name in ("bridge", "relay", "agent"):
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert set(services["agent"]["depends_on"]) == {"kafka"}
    assert services["agent"]["command"][:2] == ["chassis", "agent"]
    for name in APP_SERVICES - {"bridge", "relay", "agent"}:
        assert "kafka" not in services[name].get("depends_on", {}), name
        assert not services[name].get("profiles"), name
    assert services["worker"]["environment"]["CHASSIS_KAFKA_BOOTSTRAP"] == (
        "${CHASSIS_KAFKA_BOOTSTRAP:-}")
    flower = services["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert flower["environment"]["CHASSIS_DATABASE_URL"].startswith("postgresql://")


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    require_service("docker-compose", binary is not None,
                    "not installed (apt-get install docker-compose; .ci/run installs it)")
    assert binary is not None
    empty = tmp_path / "empty.env"  # a developer's .env must not change the verdict
    empty.write_text("")
    done = subprocess.run([binary, "--env-file", str(empty), "-f", "docker-compose.yml",
                           "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert services["worker"]["environment"]["CHASSIS_BROKER_URL"] == "redis://redis:6379/0"


def test_dockerfile_installs_the_package_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert re.search(r"^USER chassis", text, re.M)
    assert "chassis\", \"health\"" in text


def test_env_example_names_only_known_variables() -> None:
    """Each variable is read by chassis/config.py, or is Flower's own (FLOWER_*)."""
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(),
                           re.M))
    source = (ROOT / "chassis" / "config.py").read_text()
    assert {"CHASSIS_DATABASE_URL", "CHASSIS_BROKER_URL", "FLOWER_BASIC_AUTH"} <= names
    assert not {n for n in names if f'"{n}"' not in source and not n.startswith("FLOWER_")}


def test_the_readme_has_every_variable_in_its_one_table() -> None:
    source = (ROOT / "chassis" / "config.py").read_text()
    read = set(re.findall(r'"((?:CHASSIS|ANTHROPIC)_[A-Z0-9_]+)"', source))
    guide = (ROOT / "README.md").read_text()
    start = guide.index("\n## Configuration\n")
    table = guide[start:guide.index("\n## ", start + 1)]
    rows = set(re.findall(r"^\| `([A-Z0-9_]+)`", table, re.M))
    rows |= {f"CHASSIS_CLAUDE_{tier}_MODEL" for tier in ("HAIKU", "SONNET", "OPUS")}
    assert read - rows == set()
