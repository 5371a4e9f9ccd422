"""Traces of one workflow (issue 16), in this process: the embedded worker (a real Celery
worker in a thread, SQLite and the file-system broker) with an OpenTelemetry SDK
provider and an in-memory exporter; Claude is the fake Messages API, called by the real
anthropic SDK."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chassis import config, hooks, tracing
from chassis.api import Client
from chassis.celery_tasks import own_app
from chassis.embedded import embedded_worker
from tests.fakes.anthropic_server import FakeAnthropic, message

pytestmark = pytest.mark.timeout(120)

PLAN = {"name": "traced", "start_step": "research", "steps": {
    "research": {"action": "fan_out", "next_step": "write", "sub_tasks": [
        {"step_name": "web", "action": "echo", "params": {"q": 1}},
        {"step_name": "style", "action": "echo", "params": {"s": 2}}]},
    "write": {"action": "ai_text_generate_claude_haiku",
              "params": {"prompt": "Write from {{ research.web.q }}"}, "next_step": "review"},
    "review": {"action": "pause_for_human_input", "next_step": "done"},
    "done": {"action": "complete_workflow"}}}


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider exporting to memory, for this module only (the global one,
    which a process sets once, is left alone)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracing, "tracer", lambda: provider.get_tracer("agentchassis"))
        patch.setattr(tracing, "active", lambda: True)
        yield memory
    provider.shutdown()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """One embedded worker for the module (a process registers the tasks of one app)."""
    tmp = tmp_path_factory.mktemp("traced")
    with FakeAnthropic() as claude, pytest.MonkeyPatch.context() as monkeypatch:
        claude.default = message("A draft.", input_tokens=40, output_tokens=9)
        env = {"CHASSIS_HOME": str(tmp / ".chassis"), "ANTHROPIC_API_KEY": "k",
               "ANTHROPIC_BASE_URL": claude.url, "CHASSIS_AI_PROVIDER": "anthropic"}
        for name in [n for n in os.environ if n.startswith("CHASSIS_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():  # (the worker's engine reads the environment)
            monkeypatch.setenv(name, value)
        from chassis.store.db import upgrade

        settings = config.load(env)
        upgrade(settings.database_url)
        # another app of this process first (a Client, a test before): Celery shares
        # tasks with the apps made after it; this one's tasks must still run here
        other = config.load({"CHASSIS_HOME": str(tmp / "other")})
        from chassis import runtime

        first = own_app(other)
        first.finalize()
        monkeypatch.setenv("CHASSIS_HOME", str(tmp / "other"))
        runtime.engine(first)
        monkeypatch.setenv("CHASSIS_HOME", str(tmp / ".chassis"))
        app = own_app(settings)
        with embedded_worker(app, concurrency=4):
            yield Client(settings, client_id="acme", app=app)


def tree(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    by: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        by.setdefault(s.name, []).append(s)
    return by


def parent_of(s: ReadableSpan) -> int | None:
    return s.parent.span_id if s.parent is not None else None


def test_one_trace_from_start_to_end(exporter: InMemorySpanExporter, client: Client) -> None:
    exporter.clear()
    cid = client.start(PLAN, {"topic": "x"})
    assert client.wait(cid, timeout=60)["status"] == "PAUSED_FOR_HUMAN_INPUT"
    client.resume(cid, True, {"ok": 1})
    assert client.wait(cid, timeout=60)["status"] == "COMPLETED"
    spans = [s for s in exporter.get_finished_spans()
             if s.attributes.get("chassis.correlation_id") == cid
             or s.name.startswith("chat ")]
    by = tree(spans)
    [root] = by["workflow traced"]
    trace_id = root.context.trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}  # one trace, start to end
    assert root.parent is None and root.attributes["chassis.client_id"] == "acme"
    # the fan-out under the workflow, its sub-tasks under the fan-out
    [fan] = by["fan_out research"]
    assert parent_of(fan) == root.context.span_id
    for name in ("step web", "step style"):
        [sub] = by[name]
        assert parent_of(sub) == fan.context.span_id
        assert sub.attributes["chassis.parent_step"] == "research"
        assert sub.attributes["chassis.outcome"] == "succeeded"
    # the Claude step, its chat span with the GenAI attributes
    [write] = by["step write"]
    assert parent_of(write) == root.context.span_id
    attrs: dict[str, Any] = dict(write.attributes)
    assert (attrs["chassis.action"], attrs["chassis.attempt"]) == (
        "ai_text_generate_claude_haiku", 1)
    assert attrs["chassis.fuel.charged"] == 11 and attrs["chassis.fuel.settled"] == 10
    [chat] = by["chat claude-haiku-5-5"]
    assert parent_of(chat) == write.context.span_id
    assert chat.kind is trace.SpanKind.CLIENT
    assert dict(chat.attributes).items() >= {
        "gen_ai.system": "anthropic", "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "claude-haiku-5-5", "gen_ai.response.model": "claude-haiku-5-5",
        "gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 9}.items()
    assert tuple(chat.attributes["gen_ai.response.finish_reasons"]) == ("end_turn",)
    # the pause is a mark, not a span held open; the resume is its own span
    [pause] = by["pause review"]
    [resume] = by["resume workflow"]
    assert parent_of(pause) == parent_of(resume) == root.context.span_id
    assert resume.attributes["chassis.approved"] is True
    assert pause.end_time - pause.start_time < 1_000_000_000
    assert all(s.end_time is not None for s in spans)


def test_a_failed_attempt_is_an_error_span_and_hooks_see_the_outcome(
        exporter: InMemorySpanExporter, client: Client) -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    from contextlib import contextmanager

    @contextmanager
    def mine(attempt: hooks.Attempt) -> Iterator[None]:
        yield
        seen.append((attempt.step, attempt.outcome, attempt.error_type))

    hooks.register(mine)
    try:
        exporter.clear()
        cid = client.start({"start_step": "f", "steps": {
            "f": {"action": "fail", "params": {"message": "nope"},
                  "retry": {"max_attempts": 2, "initial_interval": 0.1}}}})
        assert client.wait(cid, timeout=60)["status"] == "FAILED"
    finally:
        hooks.unregister(mine)
    steps = [s for s in exporter.get_finished_spans() if s.name == "step f"]
    assert [s.attributes["chassis.attempt"] for s in steps] == [1, 2]
    assert [s.attributes["chassis.outcome"] for s in steps] == ["retrying", "failed"]
    assert all(s.status.status_code is trace.StatusCode.ERROR for s in steps)
    assert [o for _, o, _ in seen] == ["retrying", "failed"]


def test_a_hook_that_raises_is_left_out_and_the_workflow_goes_on(
        exporter: InMemorySpanExporter, client: Client) -> None:
    def broken(attempt: hooks.Attempt) -> Any:
        raise ValueError("Incorrect label count")

    hooks.register(broken)
    try:
        cid = client.start({"start_step": "a", "steps": {"a": {"action": "echo"}}})
        assert client.wait(cid, timeout=60)["status"] == "COMPLETED"
    finally:
        hooks.unregister(broken)


def test_a_late_result_is_ignored_not_succeeded_and_a_repeated_start_adds_no_root(
        exporter: InMemorySpanExporter, client: Client) -> None:
    from contextlib import contextmanager

    seen: list[str | None] = []

    @contextmanager
    def mine(attempt: hooks.Attempt) -> Iterator[None]:
        yield
        seen.append(attempt.outcome)

    hooks.register(mine)
    try:
        exporter.clear()
        plan = {"name": "slow", "start_step": "s",
                "steps": {"s": {"action": "sleep", "params": {"seconds": 1.5}}}}
        cid = client.start(plan)
        assert client.start(plan, correlation_id=cid) == cid  # the same start again
        from tests.helpers import wait_until

        wait_until(lambda: any(e["kind"] == "attempt_started" for e in client.events(cid)),
                   timeout=30, message="the step did not start")
        client.cancel(cid, "enough")
        wait_until(lambda: seen, timeout=30, message="the attempt did not end")
    finally:
        hooks.unregister(mine)
    assert seen == ["ignored"]
    spans = [s for s in exporter.get_finished_spans()
             if s.attributes.get("chassis.correlation_id") == cid]
    assert len([s for s in spans if s.name == "workflow slow"]) == 1
    [step] = [s for s in spans if s.name == "step s"]
    assert step.attributes["chassis.outcome"] == "ignored"
