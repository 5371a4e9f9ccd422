"""``chassis agent``: the agent runtime against a Kafka-protocol broker (Tansu), with a
real worker, bridge and relay on PostgreSQL and Redis."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
import uuid
from typing import Any

import pytest

from chassis import config
from chassis.api import Client
from tests.e2e.conftest import (
    KafkaServices,
    create_topics,
    headers_of,
    json_of,
)
from tests.helpers import wait_until
from tests.integration.conftest import Worker, free_port

pytestmark = pytest.mark.timeout(300)

REQUESTS = "system.agent.rt.requests"
RESPONSES = "system.responses.rt"
DLQ = "dlq.chassis"


@pytest.fixture(scope="module")
def running(kafka: KafkaServices) -> KafkaServices:
    create_topics(kafka.bootstrap, REQUESTS, RESPONSES, DLQ)
    kafka.start_worker(concurrency=4)
    kafka.start_beat()
    kafka.relay()
    kafka.bridge()
    return kafka


def agent(kafka: KafkaServices, port: int, *args: str, group: str | None = None) -> Worker:
    """``chassis agent --type rt`` with the example's and the tests' actions."""
    return kafka.spawn("agent", "-m", "chassis", "agent", "--type", "rt",
                       "--actions", "examples.agent", "--actions", "tests.e2e.agent_actions",
                       "--health-port", str(port), "--health-host", "127.0.0.1",
                       *(["--group", group] if group else []), *args,
                       ready="answering")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text``."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == name + (f"{{{want}}}" if want else "") or (
                head.startswith(name + "{") and all(f'{k}="{v}"' in head
                                                    for k, v in labels.items())):
            return float(value)
    return 0.0


def client(kafka: KafkaServices) -> Client:
    return Client(config.load(kafka.env), client_id="acme")


def plan(action: str, **params: Any) -> dict[str, Any]:
    return {"name": f"rt-{action}", "start_step": "ask", "steps": {
        "ask": {"action": action, "topic": REQUESTS, "params": params, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}


def test_a_step_served_by_chassis_agent_completes_with_health_and_metrics(
        running: KafkaServices) -> None:
    port = free_port()
    a = agent(running, port)
    c = client(running)
    cid = c.start(plan("research", depth="brief"), {"question": "sagas?"})
    done = c.wait(cid, timeout=90)
    assert done["status"] == "COMPLETED", done
    research = done["collected_data"]["ask"]
    assert research["action"] == "research" and "sagas?" in research["summary"]
    answers = running.read(RESPONSES, lambda ms: any(
        headers_of(m).get("correlation_id") == cid for m in ms))
    answer = next(m for m in answers if headers_of(m).get("correlation_id") == cid)
    h = headers_of(answer)
    request_id = c.store.get(cid).rid("ask", 1)
    assert h["causation_id"] == request_id and h["client_id"] == "acme"
    assert json_of(answer)["success"] is True
    status, body = get(f"http://127.0.0.1:{port}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = get(f"http://127.0.0.1:{port}/ready")
    assert status == 200 and "rt-group" in json.loads(body)["detail"]
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert metric(text, "agent_pool_size", agent_type="rt") == 8
    assert metric(text, "agent_tasks_received_total", agent_type="rt") >= 1
    assert metric(text, "agent_tasks_processed_total", agent_type="rt",
                  outcome="success") >= 1
    assert metric(text, "kafka_messages_consumed_total", topic=REQUESTS) >= 1
    assert metric(text, "agent_task_duration_seconds_count", agent_type="rt") >= 1
    assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    # SIGTERM: it stops cleanly, saying so
    os.killpg(a.proc.pid, signal.SIGTERM)
    assert a.proc.wait(timeout=60) == 0, a.text()
    assert "agent rt stopped" in a.text()


def test_a_failing_or_unknown_action_is_answered_as_a_failure(running: KafkaServices) -> None:
    a = agent(running, 0, group="rt-failures")
    c = client(running)
    failing = plan("explode", what="the launch pad")
    failing["steps"]["ask"]["retry"] = {"max_attempts": 2, "initial_interval": 0.1}
    cid = c.start(failing, {"q": 1})
    doc = c.wait(cid, timeout=90)
    assert doc["status"] == "FAILED"
    assert "exploded on the launch pad" in doc["error"]
    ask = next(s for s in doc["steps"] if s["name"] == "ask")
    assert ask["attempts"] == 2  # the plan's retry policy ran a second request
    unknown = c.start(plan("no_such_action"), {"q": 2})
    doc = c.wait(unknown, timeout=90)
    assert doc["status"] == "FAILED" and "no_such_action" in doc["error"]
    a.stop()  # (each test's agents are alone in answering the topic)


def test_an_unusable_request_goes_to_the_dlq_and_the_agent_goes_on(
        running: KafkaServices) -> None:
    a = agent(running, 0, group="rt-dlq")
    marker = str(uuid.uuid4())
    running.send(REQUESTS, b"not json at all", {"correlation_id": marker,
                                                "request_id": "r-1"}, key=marker)
    running.send(REQUESTS, {"action": "research"}, {"correlation_id": marker}, key=marker)

    def dead(ms: list[Any]) -> bool:
        return len([m for m in ms if headers_of(m).get("correlation_id") == marker
                    and headers_of(m).get("source_topic") == REQUESTS]) >= 2

    got = [m for m in running.read(DLQ, dead) if headers_of(m).get("correlation_id") == marker]
    reasons = sorted(headers_of(m)["dlq_reason"] for m in got)
    assert reasons[:2] == ["bad_json", "missing_header"]
    assert got[0].value() in (b"not json at all", json.dumps({"action": "research"}).encode())
    # poison just before a workflow's request on its partition (the same key): set aside,
    # and the request behind it is answered (never skipped)
    cid = str(uuid.uuid4())
    p = running.producer()
    p.produce(REQUESTS, key=cid, value=json.dumps({"action": "research"}).encode(),
              headers=[("correlation_id", cid.encode()), ("request_id", b"r-2"),
                       ("client_id", b"\xff\xfe")])
    p.produce(REQUESTS, key=cid, value=b"[" * 100_000,
              headers=[("correlation_id", cid.encode()), ("request_id", b"r-3")])
    assert p.flush(30) == 0
    c = client(running)
    c.start(plan("research"), {"question": "still there?"}, correlation_id=cid)
    assert c.wait(cid, timeout=90)["status"] == "COMPLETED"
    got = running.read(DLQ, lambda ms: len([m for m in ms if headers_of(m).get(
        "correlation_id") == cid]) >= 2)
    assert sorted(headers_of(m)["dlq_reason"] for m in got
                  if headers_of(m).get("correlation_id") == cid) == ["bad_header", "bad_json"]
    a.stop()


def test_sigterm_lets_the_running_request_be_answered(running: KafkaServices) -> None:
    port = free_port()
    a = agent(running, port, group="rt-term")
    c = client(running)
    cid = c.start(plan("slow_research", delay=3), {"i": "last"})
    wait_until(lambda: metric(get(f"http://127.0.0.1:{port}/metrics")[1],
                              "agent_tasks_in_flight", agent_type="rt") >= 1,
               timeout=60, interval=0.05, message="the request did not start")
    os.killpg(a.proc.pid, signal.SIGTERM)
    assert a.proc.wait(timeout=60) == 0, a.text()
    assert "the running requests finish" in a.text()
    doc = c.wait(cid, timeout=60)  # answered before it left: no other agent runs
    assert doc["status"] == "COMPLETED" and doc["collected_data"]["ask"] == {
        "answer_for": {"i": "last"}}


def test_an_action_past_the_action_timeout_is_answered_and_its_partition_goes_on(
        running: KafkaServices) -> None:
    """One thread, an action that would take 120 s and a 1 s action timeout: its request
    is answered as timed out, the workflow's next request (the same key, so the same
    partition) is answered while that action still runs, and /health says the agent
    is worn out (every thread's worth of actions hangs)."""
    port = free_port()
    topic = "system.agent.rt.hang"  # its own: no other test's requests to answer first
    a = agent(running, port, "--concurrency", "1", "--action-timeout", "1",
              "--topic", topic, group="rt-timeout")
    try:
        hung_action_test(running, port, topic)
    finally:
        a.stop()


def hung_action_test(running: KafkaServices, port: int, topic: str) -> None:
    c = client(running)
    p = {"name": "rt-hang", "start_step": "hang", "steps": {
        "hang": {"action": "slow_research", "topic": topic, "params": {"delay": 120},
                 "on_failure": "ask"},
        "ask": {"action": "research", "topic": topic, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    cid = c.start(p, {"question": "still going?"})
    doc = c.wait(cid, timeout=100)
    metrics = get(f"http://127.0.0.1:{port}/metrics")[1]
    assert doc["status"] == "COMPLETED", doc
    hang = next(s for s in doc["steps"] if s["name"] == "hang")
    assert hang["status"] == "FAILED" and "action timeout (1 s)" in hang["error"], hang
    failed = [e for e in c.events(cid) if e["step"] == "hang" and e["kind"] == "failed"]
    assert failed and failed[0]["data"]["error_type"] == "StepTimeout", failed
    assert doc["collected_data"]["ask"]["action"] == "research"
    # the hung action still runs (it would end 120 s after it began): the partition
    # did not wait for it
    assert metric(metrics, "agent_actions_overdue", agent_type="rt") == 1
    assert metric(metrics, "agent_actions_timed_out_total", agent_type="rt") == 1
    status, body = get(f"http://127.0.0.1:{port}/health")
    assert status == 503 and json.loads(body)["overdue_actions"] == 1
    status, body = get(f"http://127.0.0.1:{port}/ready")
    assert status == 503 and "restart the agent" in json.loads(body)["detail"]


def test_sigkill_in_the_middle_of_200_requests_loses_none_and_changes_no_record(
        running: KafkaServices) -> None:
    port = free_port()
    group = f"rt-kill-{uuid.uuid4().hex[:6]}"
    first = agent(running, port, "--concurrency", "4", group=group)
    c = client(running)
    cids = [c.start(plan("slow_research", delay=0.05), {"i": i}) for i in range(200)]
    started = time.monotonic()

    def answered() -> float:
        return metric(get(f"http://127.0.0.1:{port}/metrics")[1],
                      "agent_tasks_processed_total", agent_type="rt", outcome="success")

    wait_until(lambda: answered() >= 40, timeout=120, interval=0.05,
               message="the agent did not answer 40 requests")
    before = answered()
    os.killpg(first.proc.pid, signal.SIGKILL)  # no shutdown, no commit of what is open
    first.proc.wait(timeout=30)
    assert before < 200, "every request was answered before the kill: nothing proven"
    agent(running, free_port(), "--concurrency", "4", group=group)

    def finished() -> bool:
        return all(c.status(cid)["status"] == "COMPLETED" for cid in cids)

    wait_until(finished, timeout=240, interval=0.5, message="not every workflow completed")
    settle = time.monotonic() - started
    answers = running.read(RESPONSES, lambda ms: {headers_of(m).get("correlation_id")
                                                  for m in ms} >= set(cids), timeout=60)
    per_workflow: dict[str, int] = {}
    for m in answers:
        cid = headers_of(m).get("correlation_id")
        per_workflow[cid] = per_workflow.get(cid, 0) + 1
    duplicates = sum(n - 1 for cid, n in per_workflow.items() if cid in set(cids))
    for i, cid in enumerate(cids):
        doc = c.status(cid)
        ask = next(s for s in doc["steps"] if s["name"] == "ask")
        assert ask["attempts"] == 1 and ask["status"] == "COMPLETED", ask
        assert doc["collected_data"]["ask"] == {"answer_for": {"i": i}}
        succeeded = [e for e in c.events(cid) if e["step"] == "ask"
                     and e["kind"] == "succeeded"]
        assert len(succeeded) == 1, succeeded
        assert sum(e["amount"] for e in c.ledger(cid)) == doc["fuel"]["spent"]
    # answered again: at most what was under way or answered but not yet committed
    assert duplicates <= 200 - before, duplicates
    print(f"200 workflows, agent SIGKILLed after {before:.0f} answers: all COMPLETED "
          f"{settle:.1f} s after the start, {duplicates} duplicate answers ignored")
