"""Traces exported over OTLP/HTTP to a local receiver (issue 16), as a user configures
them: the standard OTEL_* variables. The blog-post plan run and resumed with the CLI
(embedded worker; Claude is the fake Messages API through the real SDK), and a Kafka
start, an external agent's answer and a Kafka resume (bridge, relay, worker and agent
as processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chassis import config
from chassis.api import Client
from chassis.coordinator import CANCEL_TOPIC, NOTIFICATION_TOPIC, RESUME_TOPIC
from chassis.plan import load_plan
from chassis.registry import PlanRegistry
from chassis.store.db import make_engine
from tests.e2e.conftest import KafkaServices, create_topics
from tests.fakes.anthropic_server import FakeAnthropic, message
from tests.fakes.otlp_receiver import OTLPReceiver, Span
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as rx:
        yield rx


def otel(receiver: OTLPReceiver, service: str) -> dict[str, str]:
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": service, "OTEL_BSP_SCHEDULE_DELAY": "200"}


def in_trace(spans: list[Span], trace_id: str) -> dict[str, list[Span]]:
    by: dict[str, list[Span]] = {}
    for s in spans:
        if s.trace_id == trace_id:
            by.setdefault(s.name, []).append(s)
    return by


def test_the_blog_post_plan_is_one_trace_from_run_to_resume(
        receiver: OTLPReceiver, tmp_path: Path) -> None:
    with FakeAnthropic() as claude:
        claude.default = message("A post.", input_tokens=321, output_tokens=45)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CHASSIS_", "ANTHROPIC_", "OTEL_"))}
        env |= {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": claude.url,
                **otel(receiver, "blog-cli")}

        def chassis(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "chassis", *args], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=150)

        run = chassis("run", str(ROOT / "examples" / "blog_post.yaml"), "--wait", "--json")
        assert run.returncode == 0, run.stderr
        cid = json.loads(run.stdout)["correlation_id"]
        resume = chassis("resume", cid, "--approve", "--wait", "--json")
        assert resume.returncode == 0, resume.stderr
        assert json.loads(resume.stdout)["status"] == "COMPLETED"
        events = json.loads(chassis("events", cid, "--json").stdout)
    spans = receiver.wait_for(lambda spans: any(
        s.name == "resume workflow" and s.attributes.get("chassis.correlation_id") == cid
        for s in spans), timeout=30)
    [root] = [s for s in spans if s.name == "workflow Blog Post Generator"
              and s.attributes.get("chassis.correlation_id") == cid]
    by = in_trace(spans, root.trace_id)
    assert root.parent_span_id is None and root.service_name == "blog-cli"
    [fan] = by["fan_out research"]
    assert fan.parent_span_id == root.span_id
    for sub in ("step web_research", "step style_analysis"):
        assert [s.parent_span_id for s in by[sub]] == [fan.span_id]
    [generate] = by["step generate"]
    [chat] = by["chat claude-haiku-5-5"]
    assert chat.parent_span_id == generate.span_id and chat.kind == "CLIENT"
    assert (chat.attributes["gen_ai.usage.input_tokens"],
            chat.attributes["gen_ai.usage.output_tokens"]) == (321, 45)
    assert chat.attributes["gen_ai.system"] == "anthropic"
    [pause] = by["pause pause_for_review"]
    [resumed] = by["resume workflow"]
    assert pause.parent_span_id == resumed.parent_span_id == root.span_id
    assert resumed.service_name == "blog-cli" and resumed.attributes["chassis.approved"]
    # the history says who resumed it
    assert [e["actor"] for e in events if e["kind"] == "resumed"] == ["local"]


REQUESTS = "system.agent.research.requests"
RESPONSES = "system.responses.research"


def test_a_kafka_start_an_agents_answer_and_a_kafka_resume_join_the_callers_trace(
        kafka: KafkaServices, receiver: OTLPReceiver) -> None:
    create_topics(kafka.bootstrap, REQUESTS, RESPONSES, NOTIFICATION_TOPIC, RESUME_TOPIC,
                  CANCEL_TOPIC, "dlq.chassis", "system.agent.research.process")
    PlanRegistry(make_engine(kafka.env["CHASSIS_DATABASE_URL"])).register(
        "research", load_plan(ROOT / "examples" / "external_research.yaml"))
    kafka.start_worker(**otel(receiver, "chassis-worker"))
    kafka.agent(REQUESTS, RESPONSES)  # the example agent: it carries traceparent back
    kafka.relay(**otel(receiver, "chassis-relay"))
    kafka.bridge(**otel(receiver, "chassis-bridge"))
    caller_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    traceparent = f"00-{caller_trace}-{caller_span}-01"
    cid = str(uuid.uuid4())
    kafka.send("system.agent.research.process", {"question": "traces?"},
               {"correlation_id": cid, "request_id": str(uuid.uuid4()), "client_id": "acme",
                "traceparent": traceparent}, key=cid)
    c = Client(config.load(kafka.env), client_id="acme")
    wait_until(lambda: c.status(cid)["status"] == "PAUSED_FOR_HUMAN_INPUT", timeout=90,
               ignore=(Exception,), message="the workflow did not pause")
    kafka.send(RESUME_TOPIC, {"approved": True},
               {"correlation_id": cid, "client_id": "acme", "traceparent": traceparent},
               key=cid)
    wait_until(lambda: c.status(cid)["status"] == "COMPLETED", timeout=60,
               message="the workflow did not complete")
    spans = receiver.wait_for(lambda spans: {"response workflow", "resume workflow"} <= {
        s.name for s in spans if s.trace_id == caller_trace}, timeout=30)
    by = in_trace(spans, caller_trace)
    [root] = by["workflow research"]
    assert root.parent_span_id == caller_span  # the start request's trace goes on
    assert root.attributes["chassis.correlation_id"] == cid
    [response] = by["response workflow"]
    assert response.parent_span_id == root.span_id
    assert response.attributes["chassis.success"] is True
    [resume] = by["resume workflow"]
    assert resume.parent_span_id == root.span_id
    assert (caller_trace, caller_span) in resume.links  # the Kafka resume's own context
    assert {s.service_name for s in spans if s.trace_id == caller_trace} >= {"chassis-worker"}
