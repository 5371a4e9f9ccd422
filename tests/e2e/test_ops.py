"""The Procfile's processes under honcho, as an operator runs them: worker, beat,
flower, bridge, relay and metrics against PostgreSQL, Redis and a Kafka broker
(Tansu). A workflow started from this process through the public API completes, and
shows up in Flower's HTTP API, in the metrics (equal to the database) and in the
worker's JSON log lines with its ids."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from chassis import config
from chassis.api import Client
from chassis.coordinator import RESUME_TOPIC
from chassis.kafka.clients import ensure_topics
from chassis.kafka.lag import KafkaReader
from chassis.store.db import upgrade
from tests.conftest import PostgresServer
from tests.e2e.conftest import tansu_broker
from tests.helpers import require_service, wait_until
from tests.integration.test_metrics import database_figures, samples

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
AUTH = ("ops", "s3cret")
RESEARCH = ROOT / "examples" / "research_assistant.yaml"
FAILING = {"start_step": "a", "steps": {"a": {"action": "fail", "params": {"message": "no"}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """`honcho start` of the Procfile, and how to reach what it runs."""

    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path
    flower: str
    metrics: str

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def output(self, process: str) -> list[str]:
        """Lines printed by ``process`` (honcho prefixes each with time and name)."""
        out = []
        for line in self.text().splitlines():
            head, sep, rest = line.partition(" | ")
            if sep and head.split()[-1].startswith(f"{process}."):
                out.append(rest)
        return out

    def settings(self) -> config.Settings:
        return config.load(self.env)

    def get(self, path: str, auth: bool = True) -> Any:
        req = urllib.request.Request(self.flower + path)
        if auth:
            token = base64.b64encode(":".join(AUTH).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def scrape(self) -> dict[Any, float]:
        with urllib.request.urlopen(self.metrics, timeout=10) as resp:
            return samples(resp.read().decode())


def honcho_binary() -> str | None:
    local = Path(sys.executable).parent / "honcho"
    return str(local) if local.exists() else shutil.which("honcho")


@pytest.fixture(scope="module")
def own_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Kafka broker (Tansu) for this module alone: the session's broker holds other
    modules' messages on the topics the bridge reads, which would reach its DLQ."""
    with tansu_broker(tmp_path_factory.mktemp("ops-kafka")) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="module")
def stack(postgres_server: PostgresServer, redis_url: str, own_kafka: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    kafka_bootstrap = own_kafka
    honcho = honcho_binary()
    require_service("honcho", honcho is not None, "pip install honcho (the test extra)")
    assert honcho is not None
    tmp = tmp_path_factory.mktemp("ops")
    db = postgres_server.create_database()
    upgrade(db)
    redis.Redis.from_url(redis_url).flushdb()  # no task left over by another module
    flower_port, metrics_port, web_port = free_port(), free_port(), free_port()
    agent_port = free_port()
    settings = {
        "CHASSIS_DATABASE_URL": db, "CHASSIS_BROKER_URL": redis_url,
        "CHASSIS_RESULT_BACKEND": redis_url, "CHASSIS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CHASSIS_KAFKA_GROUP": f"bridge-{uuid.uuid4().hex[:8]}",
        "CHASSIS_HOME": str(tmp / "home"), "CHASSIS_LOG_FORMAT": "json",
        "CHASSIS_SWEEP_INTERVAL": "1", "CHASSIS_RELAY_POLL_INTERVAL": "0.05",
        "CHASSIS_AI_PROVIDER": "offline", "CHASSIS_METRICS_PORT": str(metrics_port),
        "FLOWER_PORT": str(flower_port), "FLOWER_ADDRESS": "127.0.0.1",
        "FLOWER_BASIC_AUTH": ":".join(AUTH), "CHASSIS_WEB_PORT": str(web_port),
        "CHASSIS_AGENT_HEALTH_PORT": str(agent_port),
    }
    env_file = tmp / ".env"  # as an operator would: see .env.example
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CHASSIS_", "FLOWER_"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    log = tmp / "honcho.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([honcho, "-f", "Procfile", "-e", str(env_file), "--no-colour",
                                 "start"], cwd=ROOT, env=base, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    s = Stack(settings, proc, log, f"http://127.0.0.1:{flower_port}",
              f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        def up() -> bool:
            assert proc.poll() is None, s.text()
            text = s.text()
            return all(mark in text for mark in ("ready.", "bridge consuming",
                                                 "relay publishing", "beat: Starting",
                                                 "serving metrics", "answering"))

        wait_until(up, timeout=90, message=f"the processes did not start: {log}")
        wait_until(lambda: urllib.request.urlopen(s.flower + "/healthcheck", timeout=5),
                   timeout=60, ignore=(OSError,), message="flower did not answer")
        yield s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        postgres_server.drop_database(db)


def rid(stack: Stack, cid: str, step: str, attempt: int = 1) -> str:
    """The request id (and Celery task id) of an attempt of a step."""
    return Client(stack.settings(), client_id="acme").store.get(cid).rid(step, attempt)


@pytest.fixture(scope="module")
def completed(stack: Stack) -> str:
    """A workflow started from this process through the public API, run to the end."""
    client = Client(stack.settings(), client_id="acme")
    cid = client.start(RESEARCH, {"question": "how do sagas recover?"}, client_id="acme")
    doc = client.wait(cid, timeout=90)
    assert doc["status"] == "COMPLETED", doc
    return cid


def test_flower_sees_the_worker_and_wants_a_password(stack: Stack) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        stack.get("/api/workers", auth=False)
    assert refused.value.code == 401
    def both() -> dict[str, Any] | None:
        workers = stack.get("/api/workers?refresh=1")  # (each once it told its queues)
        told = [w for w in workers.values() if w.get("active_queues")]
        return workers if len(told) == 2 else None

    workers = wait_until(both, timeout=60, message="flower does not list both workers")
    # node names from the Procfile: steps-<PORT>@host, coordinator-<PORT>@host
    queues = {name.split("@")[0].split("-")[0]: {q["name"] for q in w["active_queues"]}
              for name, w in workers.items()}
    # the steps' worker (threads) and the coordinator, each on its own queues (and the
    # coordinator on Celery's default one, for other apps' tasks sent without a queue)
    assert queues == {"steps": {"chassis.steps", "chassis.ai"},
                      "coordinator": {"chassis.coordination", "celery"}}


def test_a_workflow_completes_and_its_tasks_show_in_flower(stack: Stack,
                                                           completed: str) -> None:
    # each step task shows its action by name (Celery's shadow name)
    wanted = {rid(stack, completed, "web_search"): "chassis.step echo",
              rid(stack, completed, "analyze_research"):
                  "chassis.ai_step ai_text_generate_claude_haiku"}

    def seen() -> bool:
        tasks = stack.get("/api/tasks?limit=1000")
        return all(tasks.get(tid, {}).get("state") == "SUCCESS" and tasks[tid]["name"] == name
                   for tid, name in wanted.items())

    wait_until(seen, timeout=60, interval=0.5, message="flower does not show the tasks")
    tid = rid(stack, completed, "web_search")
    info = stack.get(f"/api/task/info/{tid}")
    assert completed in info["args"]  # the summary names the workflow and step
    assert info["result"].strip("'\"") == f"{completed}/web_search#1: done"  # a short result
    # one workflow's tasks: Flower's search matches the workflow's id in the arguments
    found = stack.get(f"/api/tasks?search={completed}&limit=100")
    assert tid in found and all(completed in t["args"] for t in found.values())


def test_beat_sends_the_sweep_and_the_relay_fallback(stack: Stack) -> None:
    def beat_tasks() -> bool:
        names = {t["name"] for t in stack.get("/api/tasks?limit=1000").values()
                 if t.get("state") == "SUCCESS"}
        return {"chassis.sweep", "chassis.relay"} <= names

    wait_until(beat_tasks, timeout=60, interval=0.5, message="beat's tasks never ran")


def test_metrics_equal_the_database(stack: Stack, completed: str) -> None:
    client = Client(stack.settings(), client_id="globex")
    failed = client.start(FAILING)
    assert client.wait(failed, timeout=60)["status"] == "FAILED"
    # a message the bridge cannot use goes to the dead-letter topic
    producer = Producer({"bootstrap.servers": stack.env["CHASSIS_KAFKA_BOOTSTRAP"]})
    producer.produce(RESUME_TOPIC, value=b"not json", headers=[("correlation_id", b"x")])
    assert producer.flush(30) == 0

    def settled() -> dict[Any, float] | None:
        got = stack.scrape()
        want = database_figures(stack.env["CHASSIS_DATABASE_URL"])
        quiet = (got.get(("agentchassis_dead_letters_total", ())) == 1
                 and got.get(("agentchassis_bridge_lag", (("topic", RESUME_TOPIC),))) == 0
                 and want[("agentchassis_outbox_backlog", ())] == 0)
        return got if quiet and all(got.get(k) == v for k, v in want.items()) else None

    got = wait_until(settled, timeout=90, interval=0.5,
                     message="metrics never matched the database")
    finished = "agentchassis_workflows_finished_last_hour"
    assert got[(finished, (("status", "COMPLETED"),))] == 1
    assert got[(finished, (("status", "FAILED"),))] == 1
    assert got[("agentchassis_fuel_spent_last_hour",
                (("action", "ai_text_generate_claude_haiku"),))] == 10
    assert got[("agentchassis_step_duration_seconds_count", (("action", "echo"),))] == 1
    assert got[("agentchassis_kafka_up", ())] == 1 and got[("agentchassis_database_up", ())] == 1


def test_flower_shows_a_retried_attempt_as_retry_and_the_last_as_failure(
        stack: Stack) -> None:
    client = Client(stack.settings(), client_id="acme")
    plan = {"start_step": "a", "steps": {"a": {
        "action": "fail", "params": {"message": "no"},
        "retry": {"max_attempts": 2, "initial_interval": 0.1}}}}
    cid = client.start(plan, client_id="acme")
    assert client.wait(cid, timeout=60)["error"] == "step 'a' failed after 2 attempts: no"
    first, last = rid(stack, cid, "a", 1), rid(stack, cid, "a", 2)

    def states() -> tuple[str | None, str | None]:
        tasks = stack.get("/api/tasks?limit=1000")
        return tasks.get(first, {}).get("state"), tasks.get(last, {}).get("state")

    wait_until(lambda: states() == ("RETRY", "FAILURE"), timeout=60, interval=0.5,
               message=f"flower does not show RETRY then FAILURE: {states()}")


def test_worker_logs_are_json_lines_with_the_workflow_ids(stack: Stack, completed: str) -> None:
    records = [json.loads(line) for line in stack.output("worker") if line.startswith("{")]
    ours = [r for r in records if r["correlation_id"] == completed]
    mentioning = [r for r in records if completed in r["message"]]
    assert all(r["correlation_id"] == completed for r in mentioning)
    assert all(r["step"] != "-" and r["task_id"] != "-" for r in ours), ours
    for step in ("web_search", "analyze_research"):
        rid_ = rid(stack, completed, step)
        task = [r for r in ours if r["task_id"] == rid_]
        assert all(r["step"] == step for r in task), task
        # Celery's own lines, before the task runs and after: "Task name[id] received"
        kinds = {r["message"].split("] ", 1)[1].split()[0] for r in task
                 if r["message"].startswith("Task ")}
        assert {"received", "succeeded"} <= kinds, task


def test_health_of_the_running_stack(stack: Stack) -> None:
    done = subprocess.run([sys.executable, "-m", "chassis", "health"], cwd=ROOT,
                          env={**os.environ, **stack.env}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    parts = [line.split(":")[0] for line in done.stdout.splitlines()]
    assert parts == ["database", "broker", "kafka"]
    assert all(": ok" in line for line in done.stdout.splitlines())


def test_the_web_process_serves_the_api_with_a_key(stack: Stack, completed: str) -> None:
    """The Procfile's `web`: ready, and a key of acme reads acme's workflow."""
    url = f"http://127.0.0.1:{stack.env['CHASSIS_WEB_PORT']}"
    ready = wait_until(lambda: urllib.request.urlopen(f"{url}/readyz", timeout=5), timeout=60,
                       ignore=(OSError,), message="chassis web did not answer")
    assert json.loads(ready.read())["status"] == "ok"
    made = subprocess.run([sys.executable, "-m", "chassis", "keys", "create", "acme"], cwd=ROOT,
                          env={**os.environ, **stack.env}, capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    request = urllib.request.Request(f"{url}/api/v1/workflows/{completed}", headers={
        "Authorization": f"Bearer {made.stdout.strip()}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        assert json.loads(r.read())["status"] == "COMPLETED"


def test_the_example_agent_process_is_ready(stack: Stack) -> None:
    """The Procfile's `agent` (examples/agent.py's actions): /ready and /metrics."""
    url = f"http://127.0.0.1:{stack.env['CHASSIS_AGENT_HEALTH_PORT']}"
    ready = wait_until(lambda: urllib.request.urlopen(f"{url}/ready", timeout=5), timeout=60,
                       ignore=(OSError,), message="the agent is not ready")
    assert json.loads(ready.read())["status"] == "ready"
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        assert 'agent_pool_size{agent_type="research"} 8.0' in r.read().decode()


def test_lag_counts_what_a_group_has_not_committed(kafka_bootstrap: str,
                                                   tmp_path: Path) -> None:
    topic = f"system.responses.lag-{uuid.uuid4().hex[:8]}"
    group = f"nobody-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [topic], partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for n in range(3):
        producer.produce(topic, value=b"{}", key=str(n).encode())
        # one record per batch: Tansu's end offset after a batch of several records
        # counts the batch as one (Kafka's counts every record)
        assert producer.flush(30) == 0
    settings = config.load({"CHASSIS_KAFKA_BOOTSTRAP": kafka_bootstrap,
                            "CHASSIS_KAFKA_GROUP": group, "CHASSIS_HOME": str(tmp_path)})
    reader = KafkaReader(settings)
    try:
        assert reader.read().lag[topic] == 3
        # the group commits two of them: two fewer behind
        c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group,
                      "enable.auto.commit": False})
        try:
            low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
            committed = [TopicPartition(topic, 0, high),
                         TopicPartition(topic, 1, 0)]
            c.commit(offsets=committed, asynchronous=False)
        finally:
            c.close()
        assert reader.read().lag[topic] == 3 - (high - low)
    finally:
        reader.close()
