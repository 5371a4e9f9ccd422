"""End to end over Kafka: a start message, an external step answered by the example
agent, the pause notification, a resume message, completion; dead letters; the bridge
killed in the middle of 1,000 start messages."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, Message, TopicPartition

from chassis import config
from chassis.api import Client
from chassis.coordinator import CANCEL_TOPIC, NOTIFICATION_TOPIC, RESUME_TOPIC
from chassis.plan import load_plan, parse_plan
from chassis.registry import PlanRegistry
from chassis.store.db import make_engine
from chassis.store.tables import orchestrator_state
from tests.e2e.conftest import KafkaServices, create_topics, headers_of, json_of
from tests.helpers import wait_until
from tests.integration.conftest import Worker

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = "system.agent.research.requests"
RESPONSES = "system.responses.research"
DLQ = "dlq.chassis"


@pytest.fixture(scope="module")
def running(kafka: KafkaServices) -> KafkaServices:
    """A worker, the bridge, the relay and the example agent, with the topics made."""
    create_topics(kafka.bootstrap, REQUESTS, RESPONSES, NOTIFICATION_TOPIC, RESUME_TOPIC,
                  CANCEL_TOPIC, DLQ, "system.agent.research.process",
                  "system.agent.quick.process")
    registry = PlanRegistry(make_engine(kafka.env["CHASSIS_DATABASE_URL"]))
    registry.register("research", load_plan(ROOT / "examples" / "external_research.yaml"))
    registry.register("quick", parse_plan({"start_step": "done", "steps": {
        "done": {"action": "complete_workflow"}}}))
    kafka.start_worker()
    kafka.start_beat()  # the sweep sends agents' retries when due
    kafka.agent(REQUESTS, RESPONSES)
    kafka.relay()
    kafka.bridge()
    return kafka


def client(kafka: KafkaServices) -> Client:
    return Client(config.load(kafka.env), client_id="acme")


def events_for(cid: str, event_type: str) -> Any:
    def until(msgs: list[Message]) -> bool:
        return any(json_of(m).get("correlation_id") == cid
                   and json_of(m).get("event_type") == event_type for m in msgs)
    return until


def test_start_external_step_pause_resume_complete(running: KafkaServices) -> None:
    cid, rid = str(uuid.uuid4()), str(uuid.uuid4())
    c = client(running)

    running.send("system.agent.research.process", {"question": "durable workflows?"},
                 {"correlation_id": cid, "request_id": rid, "client_id": "acme",
                  "project_id": "p1", "fuel_budget": "50"}, key=cid)

    paused = wait_until(lambda: (d := c.status(cid))["status"] == "PAUSED_FOR_HUMAN_INPUT"
                        and d, timeout=90, ignore=(Exception,),
                        message="workflow did not pause after the agent's answer")
    research = paused["collected_data"]["research"]
    assert research["action"] == "research" and "durable workflows" in research["summary"]
    assert paused["input"] == {"question": "durable workflows?"}

    # the TaskRequest the relay published: causation = the start request, fuel remaining
    request = [m for m in running.read(REQUESTS, lambda ms: any(
        headers_of(m).get("correlation_id") == cid for m in ms))
        if headers_of(m).get("correlation_id") == cid][0]
    h = headers_of(request)
    assert h["causation_id"] == rid and h["request_id"] == c.store.get(cid).rid("research")
    assert (h["client_id"], h["project_id"], h["fuel_budget"]) == ("acme", "p1", "49")
    assert request.key() == cid.encode()
    assert json_of(request)["action"] == "research"
    assert json_of(request)["data"]["input"] == {"question": "durable workflows?"}

    notes = running.read(NOTIFICATION_TOPIC,
                         events_for(cid, "WORKFLOW_PAUSED_FOR_APPROVAL"))
    pause = next(json_of(m) for m in notes if json_of(m).get("correlation_id") == cid)
    assert pause["client_id"] == "acme" and pause["project_id"] == "p1"
    assert pause["data_for_review"]["research"] == research

    running.send(RESUME_TOPIC, {"approved": True, "feedback": {"ok": "ship it"}},
                 {"correlation_id": cid, "client_id": "acme"}, key=cid)

    done = wait_until(lambda: (d := c.status(cid))["status"] == "COMPLETED" and d,
                      timeout=60, message="workflow did not complete after the resume")
    assert done["final_result"]["human_feedback"] == {"ok": "ship it"}
    notes = running.read(NOTIFICATION_TOPIC, events_for(cid, "WORKFLOW_COMPLETED"))
    mine = [json_of(m)["event_type"] for m in notes if json_of(m).get("correlation_id") == cid]
    assert mine == ["WORKFLOW_PAUSED_FOR_APPROVAL", "WORKFLOW_COMPLETED"]

    # a duplicate start message (same ids) changes nothing
    version = done["version"]
    running.send("system.agent.research.process", {"question": "again"},
                 {"correlation_id": cid, "request_id": rid, "client_id": "acme"}, key=cid)
    marker = str(uuid.uuid4())
    running.send("system.agent.quick.process", None, {"correlation_id": marker,
                                                      "client_id": "acme"})
    wait_until(lambda: c.status(marker)["status"] == "COMPLETED", timeout=60,
               ignore=(Exception,), message="a later start was not handled")
    assert c.status(cid)["version"] == version and c.status(cid)["input"] == {
        "question": "durable workflows?"}


def test_failed_agent_answer_fails_the_step(running: KafkaServices) -> None:
    c = client(running)
    cid = str(uuid.uuid4())
    # started directly (the relay sends its request); answered by hand with a failure
    plan = {"start_step": "research", "steps": {
        "research": {"action": "research", "topic": "system.agent.manual.requests",
                     "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    c.start(plan, {"q": 1}, client_id="acme", correlation_id=cid)
    running.read("system.agent.manual.requests", lambda ms: any(
        headers_of(m).get("correlation_id") == cid for m in ms))
    create_topics(running.bootstrap, "system.responses.manual")
    running.send("system.responses.manual", {"success": False, "error": "quota exceeded"},
                 {"correlation_id": cid, "causation_id": c.store.get(cid).rid("research"),
                  "client_id": "acme"}, key=cid)

    failed = wait_until(lambda: (d := c.status(cid))["status"] == "FAILED" and d,
                        timeout=90, message="the failure answer was not applied")
    assert failed["error"] == "step 'research' failed: quota exceeded"
    notes = running.read(NOTIFICATION_TOPIC, events_for(cid, "WORKFLOW_FAILED"))
    assert any(json_of(m).get("error") == failed["error"] for m in notes)


def test_a_failed_answer_is_retried_with_a_new_request_then_cancel_by_kafka(
        running: KafkaServices) -> None:
    c = client(running)
    cid = str(uuid.uuid4())
    topic, answers = "system.agent.retrying.requests", "system.responses.retrying"
    plan = {"start_step": "ask", "steps": {
        "ask": {"action": "research", "topic": topic, "next_step": "done",
                "retry": {"max_attempts": 3, "initial_interval": 0.1}},
        "done": {"action": "complete_workflow"}}}
    c.start(plan, {"q": 1}, client_id="acme", correlation_id=cid)
    create_topics(running.bootstrap, answers)
    first, second = c.store.get(cid).rid("ask", 1), c.store.get(cid).rid("ask", 2)

    def requests(n: int) -> list[Message]:
        got = running.read(topic, lambda ms: sum(
            headers_of(m).get("correlation_id") == cid for m in ms) >= n)
        return [m for m in got if headers_of(m).get("correlation_id") == cid]

    assert headers_of(requests(1)[0])["request_id"] == first
    running.send(answers, {"success": False, "error": "busy", "error_type": "Overloaded"},
                 {"correlation_id": cid, "causation_id": first, "client_id": "acme"}, key=cid)
    assert headers_of(requests(2)[1])["request_id"] == second  # sent by beat's sweep
    # the first request's late answer is ignored: the second attempt is awaited now
    running.send(answers, {"success": True, "data": {"late": True}},
                 {"correlation_id": cid, "causation_id": first, "client_id": "acme"}, key=cid)
    running.send(CANCEL_TOPIC, {"reason": "the customer left"},
                 {"correlation_id": cid, "client_id": "acme"}, key=cid)
    done = wait_until(lambda: (d := c.status(cid))["status"] == "CANCELLED" and d,
                      timeout=60, message="the cancel message was not applied")
    assert done["error"] == "Workflow cancelled: the customer left"
    assert "ask" not in done["collected_data"]
    history = next(s for s in done["steps"] if s["name"] == "ask")["history"]
    assert [(a["status"], a["error_type"]) for a in history] == [
        ("FAILED", "Overloaded"), ("CANCELLED", None)]
    notes = running.read(NOTIFICATION_TOPIC, events_for(cid, "WORKFLOW_CANCELLED"))
    event = next(json_of(m) for m in notes if json_of(m).get("correlation_id") == cid)
    assert event["reason"] == "the customer left"


def test_unusable_messages_go_to_the_dlq_with_their_reason(running: KafkaServices) -> None:
    c = client(running)
    owned = str(uuid.uuid4())
    c.start({"start_step": "wait", "steps": {
        "wait": {"action": "pause_for_human_input", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}, None, client_id="acme",
        correlation_id=owned)
    run = uuid.uuid4().hex
    start = "system.agent.research.process"
    bad: list[tuple[str, str, Any, dict[str, str]]] = [
        ("bad_json", start, b"{not json", {"correlation_id": str(uuid.uuid4()),
                                          "client_id": "acme"}),
        ("missing_header", start, {"q": 1}, {"correlation_id": str(uuid.uuid4())}),
        ("bad_header", start, {"q": 1}, {"correlation_id": "not-a-uuid",
                                         "client_id": "acme"}),
        ("unknown_plan", "system.agent.nosuchplan.process", {"q": 1},
         {"correlation_id": str(uuid.uuid4()), "client_id": "acme"}),
        ("unknown_workflow", RESUME_TOPIC, {"approved": True},  # another client's
         {"correlation_id": owned, "client_id": "mallory"}),
        ("unknown_workflow", RESUME_TOPIC, {"approved": True},
         {"correlation_id": str(uuid.uuid4()), "client_id": "acme"}),
        ("bad_payload", RESUME_TOPIC, {"approve": "yes"},
         {"correlation_id": owned, "client_id": "acme"}),
        ("unknown_workflow", RESPONSES, {"success": True, "data": {}},
         {"correlation_id": str(uuid.uuid4()), "causation_id": "x", "client_id": "acme"}),
        ("unknown_request", RESPONSES, {"success": True, "data": {}},
         {"correlation_id": owned, "causation_id": "not-a-request-of-it",
          "client_id": "acme"}),
        ("missing_header", RESPONSES, {"success": True, "data": {}},  # names no client
         {"correlation_id": owned, "causation_id": "x"}),
        ("bad_json", RESPONSES, b"\xff\xfe", {"correlation_id": owned, "causation_id": "x",
                                               "client_id": "acme"}),
        # poison that once blocked a partition or was lost after the commit
        ("bad_header", start, {"q": 1}, {"correlation_id": str(uuid.uuid4()),
                                         "client_id": "acme", "fuel_budget": "\u00b2"}),
        ("bad_header", start, {"q": 1}, {"correlation_id": str(uuid.uuid4()),
                                         "client_id": "acme", "fuel_budget": "99999999999"}),
        ("bad_header", start, {"q": 1}, {"correlation_id": str(uuid.uuid4()),
                                         "client_id": "c" * 300}),
        ("bad_payload", start, b"[" * 100_000 + b"]" * 100_000,
         {"correlation_id": str(uuid.uuid4()), "client_id": "acme"}),
        ("bad_json", start, b'{"n": 1' + b"0" * 5000 + b"}",
         {"correlation_id": str(uuid.uuid4()), "client_id": "acme"}),
        ("bad_json", start, b'{"n": NaN}', {"correlation_id": str(uuid.uuid4()),
                                            "client_id": "acme"}),
        ("bad_payload", start, b'{"n": "\\u0000"}', {"correlation_id": str(uuid.uuid4()),
                                                      "client_id": "acme"}),
        ("bad_json", RESUME_TOPIC, b'{"approved": true, "feedback": NaN}',
         {"correlation_id": owned, "client_id": "acme"}),
        ("bad_json", RESPONSES, b'{"success": true, "data": NaN}',
         {"correlation_id": owned, "causation_id": "x", "client_id": "acme"}),
        ("bad_header", "system.agent.quick.process", None,
         {"correlation_id": str(uuid.uuid4()), "client_id": "acme", "fuel_budget": "-1"}),
    ]
    create_topics(running.bootstrap, "system.agent.nosuchplan.process")
    for i, (_, topic, value, headers) in enumerate(bad):
        running.send(topic, value, {**headers, "test_run": run, "test_case": str(i)},
                     key="same-key")
    # good messages after them, on the same partitions: the bridge goes on
    running.send(RESUME_TOPIC, {"approved": True}, {"correlation_id": owned,
                                                    "client_id": "acme"}, key="same-key")
    after = str(uuid.uuid4())
    running.send("system.agent.quick.process", None,
                 {"correlation_id": after, "client_id": "acme"}, key="same-key")

    def mine(msgs: list[Message]) -> list[Message]:
        return [m for m in msgs if headers_of(m).get("test_run") == run]

    dead = mine(running.read(DLQ, lambda ms: len(mine(ms)) >= len(bad)))
    by_case = {int(headers_of(m)["test_case"]): m for m in dead}
    assert len(dead) == len(bad) and sorted(by_case) == list(range(len(bad)))
    for i, (reason, topic, value, _) in enumerate(bad):
        h = headers_of(by_case[i])
        assert h["dlq_reason"] == reason, (i, h)
        assert h["dlq_detail"]
        assert h["source_topic"] == topic
        assert int(h["source_partition"]) >= 0 and int(h["source_offset"]) >= 0
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        assert by_case[i].value() == raw
    assert "header client_id is required" in headers_of(by_case[1])["dlq_detail"]
    assert wait_until(lambda: c.status(owned)["status"] == "COMPLETED", timeout=60)
    assert wait_until(lambda: c.status(after)["status"] == "COMPLETED", timeout=60,
                      ignore=(Exception,))


def test_poison_at_the_size_limit_two_starts_in_a_row_and_repeated_headers(
        running: KafkaServices) -> None:
    """A message that fits Kafka's limit only without the reason headers goes to the
    dead-letter topic cut short (the bridge once died on it, and again on every
    restart); two different starts of one id in one batch: the first starts, the second
    is a conflict; an identity header given twice with different values is refused."""
    c = client(running)
    run = uuid.uuid4().hex
    start = "system.agent.quick.process"
    producer = running.producer()
    big_headers = [("correlation_id", str(uuid.uuid4()).encode()), ("client_id", b"acme"),
                   ("test_run", run.encode()), ("test_case", b"big")]
    # not JSON, and just under the producer's 1,000,000 bytes (key, value and headers)
    size = 1_000_000 - 8 - sum(len(k) + len(v) for k, v in big_headers) - 60
    big = b"{" + b"x" * (size - 1)
    producer.produce(start, value=big, key=b"same-key", headers=big_headers)
    twice = str(uuid.uuid4())
    for i in (1, 2):
        producer.produce(start, value=json.dumps({"n": i}).encode(), key=b"same-key",
                         headers=[("correlation_id", twice.encode()), ("client_id", b"acme"),
                                  ("test_run", run.encode()), ("test_case", f"twice{i}")])
    producer.produce(start, value=b"{}", key=b"same-key", headers=[
        ("correlation_id", str(uuid.uuid4()).encode()), ("client_id", b"acme"),
        ("client_id", b"mallory"), ("test_run", run.encode()), ("test_case", b"repeated")])
    producer.produce(start, value=b"{}", key=b"same-key", headers=[
        ("correlation_id", str(uuid.uuid4()).encode()), ("client_id", b"ac\xffme"),
        ("test_run", run.encode()), ("test_case", b"not-utf8")])
    after = str(uuid.uuid4())
    producer.produce(start, value=b"{}", key=b"same-key", headers=[
        ("correlation_id", after.encode()), ("client_id", b"acme")])
    assert producer.flush(30) == 0

    def mine(msgs: list[Message]) -> list[Message]:
        return [m for m in msgs if headers_of(m).get("test_run") == run]

    dead = {headers_of(m)["test_case"]: m
            for m in mine(running.read(DLQ, lambda ms: len(mine(ms)) >= 4, timeout=90))}
    assert sorted(dead) == ["big", "not-utf8", "repeated", "twice2"]
    h = headers_of(dead["big"])
    assert h["dlq_reason"] == "bad_json" and int(h["dlq_truncated"]) == len(big) + 8
    assert dead["big"].value() == big[:64 * 1024]
    assert headers_of(dead["twice2"])["dlq_reason"] == "conflict"
    assert json_of(dead["twice2"]) == {"n": 2}
    assert headers_of(dead["repeated"])["dlq_reason"] == "bad_header"
    assert "client_id" in headers_of(dead["repeated"])["dlq_detail"]
    assert headers_of(dead["not-utf8"])["dlq_reason"] == "bad_header"
    # the bridge is alive: the message after them all starts its workflow
    assert wait_until(lambda: c.status(after)["status"] == "COMPLETED", timeout=60,
                      ignore=(Exception,))
    assert wait_until(lambda: c.status(twice)["status"] == "COMPLETED", timeout=60,
                      ignore=(Exception,))
    assert c.status(twice)["input"] == {"n": 1}


def count_workflows(kafka: KafkaServices, client_id: str) -> int:
    with make_engine(kafka.env["CHASSIS_DATABASE_URL"]).connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(orchestrator_state)
                            .where(orchestrator_state.c.client_id == client_id)).scalar_one()


def committed(kafka: KafkaServices, topic: str) -> int:
    c = Consumer({"bootstrap.servers": kafka.bootstrap,
                  "group.id": kafka.env["CHASSIS_KAFKA_GROUP"]})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        c.close()


@pytest.mark.timeout(300)
def test_bridge_killed_during_1000_starts_makes_exactly_1000(running: KafkaServices) -> None:
    n, client_id = 1000, f"bulk-{uuid.uuid4().hex[:8]}"
    topic = "system.agent.quick.process"
    bridge: Worker = next(w for w in running.workers if "bridge" in w.log.name)
    producer = running.producer()
    sent, killed = threading.Event(), threading.Event()

    def produce() -> None:
        for i in range(n):
            if i == 600:  # the kill lands before the last 400, however slow things are
                killed.wait(120)
            producer.produce(topic, value=json.dumps({"i": i}).encode(),
                             headers=[("correlation_id", str(uuid.uuid4()).encode()),
                                      ("client_id", client_id.encode())])
            if i % 10 == 9:  # ~250 a second: the kill lands while they still come
                producer.flush(30)
                time.sleep(0.04)
        producer.flush(30)
        sent.set()

    t = threading.Thread(target=produce)
    before = committed(running, topic)
    t.start()
    wait_until(lambda: count_workflows(running, client_id) >= 100, timeout=120,
               message="the bridge made no progress")
    bridge.kill()
    killed.set()
    assert not sent.is_set()
    running.bridge()
    t.join(120)
    assert sent.is_set()

    wait_until(lambda: count_workflows(running, client_id) == n, timeout=180,
               message=f"expected exactly {n} workflows")
    wait_until(lambda: committed(running, topic) - before >= n, timeout=60,
               message="offsets not committed")
    assert count_workflows(running, client_id) == n


def test_an_agents_compensation_over_kafka_after_a_cancel_with_compensation(
        running: KafkaServices) -> None:
    """A step undone by an external agent: the cancel command asks for compensation,
    the relay sends the agent its TaskRequest (with the step's output), its answer
    completes the undo, and the workflow ends CANCELLED."""
    c = client(running)
    cid = str(uuid.uuid4())
    undo, answers = "system.agent.release.requests", "system.responses.release"
    create_topics(running.bootstrap, undo, answers)
    plan = {"start_step": "reserve", "steps": {
        "reserve": {"action": "echo", "params": {"seat": "12A"}, "next_step": "wait",
                    "compensate": {"action": "release", "topic": undo,
                                   "params": {"why": "cancelled"}}},
        "wait": {"action": "pause_for_human_input", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    c.start(plan, {"q": 1}, client_id="acme", correlation_id=cid)
    wait_until(lambda: c.status(cid)["status"] == "PAUSED_FOR_HUMAN_INPUT", timeout=60,
               message="the workflow did not pause")
    running.send(CANCEL_TOPIC, {"reason": "no longer wanted", "compensate": True},
                 {"correlation_id": cid, "client_id": "acme"}, key=cid)
    got = running.read(undo, lambda ms: any(
        headers_of(m).get("correlation_id") == cid for m in ms))
    request = next(m for m in got if headers_of(m).get("correlation_id") == cid)
    body = json_of(request)
    assert body["action"] == "release" and body["params"] == {"why": "cancelled"}
    assert body["data"]["output"] == {"seat": "12A"}
    assert body["data"]["error"]["message"] == "Workflow cancelled: no longer wanted"
    assert c.status(cid)["status"] == "COMPENSATING"
    running.send(answers, {"success": True, "data": {"released": "12A"}},
                 {"correlation_id": cid, "causation_id": headers_of(request)["request_id"],
                  "client_id": "acme"}, key=cid)
    done = wait_until(lambda: (d := c.status(cid))["status"] == "CANCELLED" and d,
                      timeout=60, message="the agent's answer did not end the undo")
    undone = next(s for s in done["steps"] if s["name"] == "reserve/compensate")
    assert (undone["status"], undone["compensates"]) == ("COMPLETED", "reserve")
    notes = running.read(NOTIFICATION_TOPIC, events_for(cid, "WORKFLOW_CANCELLED"))
    mine = [json_of(m)["event_type"] for m in notes if json_of(m).get("correlation_id") == cid]
    assert mine == ["WORKFLOW_PAUSED_FOR_APPROVAL", "WORKFLOW_COMPENSATING",
                    "WORKFLOW_CANCELLED"]
