"""Fuzzing the edges without services: plan documents and Kafka messages are either
accepted or refused cleanly (the documented error), never a traceback or a hang; and a
message the bridge forwards is valid enough for its task."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chassis import config
from chassis.errors import ChassisError, InputError, PlanError
from chassis.kafka.routing import Rejected, Router, TaskCall, routes
from chassis.limits import check_json, check_name
from chassis.plan import loads_plan_data, parse_plan_partial
from chassis.validation import validate
from tests.unit.test_kafka_routing import CID, FakeDirectory

pytestmark = pytest.mark.timeout(300)

ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "\ud800", "NaN", "Infinity", "-1", "0", "²", "1e400",
                     "9" * 30, "a" * 300, "../../etc", "${x}", "{{ 7*7 }}", "\t\n"]))
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True, allow_infinity=True), ODD_TEXT)
JSON = st.recursive(JSON_LEAF, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(ODD_TEXT, kids, max_size=4)), max_leaves=30)

STEP_KEYS = ["action", "description", "topic", "dependencies", "next_step", "sub_tasks",
             "params", "retry", "timeout", "bogus"]


@st.composite
def plan_docs(draw: st.DrawFn) -> Any:
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "fan", "x#1", "s/2", "done"]),
                          min_size=1, max_size=5, unique=True))
    steps = {}
    for name in names:
        step: dict[str, Any] = {}
        for key in draw(st.lists(st.sampled_from(STEP_KEYS), max_size=5, unique=True)):
            step[key] = draw(st.one_of(JSON, st.sampled_from(names),
                                       st.just([{"step_name": "sub", "action": "echo"}]),
                                       st.just({"max_attempts": 3, "initial_interval": 0.1}),
                                       st.sampled_from(["echo", "fan_out", "complete_workflow",
                                                        "pause_for_human_input"])))
        steps[name] = draw(st.one_of(st.just(step), JSON))
    doc = {"start_step": draw(st.one_of(st.sampled_from(names), JSON)), "steps": steps}
    if draw(st.booleans()):
        doc["defaults"] = draw(st.one_of(JSON, st.just({"retry": {"max_attempts": 0}})))
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=plan_docs(), as_yaml=st.booleans())
def test_any_plan_document_is_accepted_or_refused_cleanly(doc: Any, as_yaml: bool) -> None:
    import yaml

    began = time.monotonic()
    try:
        text = yaml.safe_dump(doc) if as_yaml else json.dumps(doc, allow_nan=True)
    except (ValueError, yaml.YAMLError, UnicodeEncodeError):
        return  # not even serialisable: nothing to send
    try:
        data = loads_plan_data(text, "fuzz")
        plan, problems = parse_plan_partial(data)
        if plan is not None:
            problems += validate(plan, {"echo"})
    except PlanError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
    assert time.monotonic() - began < 5


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_any_plan_text_is_accepted_or_refused_cleanly(text: str) -> None:
    try:
        loads_plan_data(text, "fuzz")
    except PlanError:
        pass


HEADER_NAMES = ["correlation_id", "client_id", "request_id", "causation_id", "project_id",
                "fuel_budget", "plan"]
TOPICS = ["system.agent.research.process", "system.commands.workflow.resume",
          "system.commands.workflow.cancel", "system.responses.research", "other.topic"]


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes | None, dict[str, str]]:
    topic = draw(st.sampled_from(TOPICS))
    headers = {}
    for name in draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=7, unique=True)):
        headers[name] = draw(st.one_of(ODD_TEXT, st.just(CID), st.just(str(uuid.uuid4())),
                                       st.just("acme"), st.just("req-1"), st.just("40")))
    body = draw(st.one_of(
        st.none(), st.binary(max_size=60),
        JSON.map(lambda v: json.dumps(v, allow_nan=True).encode()),
        st.just(b'{"approved": true, "feedback": {"ok": 1}}'),
        st.just(b'{"success": true, "data": {"x": 1}}'),
        st.just(b"[" * 5000 + b"]" * 5000)))
    return topic, body, headers


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages())
def test_any_kafka_message_becomes_a_valid_task_or_a_dead_letter(
        msg: tuple[str, bytes | None, dict[str, str]], tmp_path_factory: Any) -> None:
    topic, body, headers = msg
    router = Router(routes(config.load({"CHASSIS_HOME": str(Path("/tmp"))})), FakeDirectory())
    try:
        call = router.call(topic, body, headers)
    except Rejected as exc:
        assert exc.reason and exc.detail
        return
    assert isinstance(call, TaskCall)
    forwarded_is_valid(call)


def forwarded_is_valid(call: TaskCall) -> None:
    """What the task will check again: it must pass (the task cannot fail on it)."""
    try:
        uuid.UUID(str(call.correlation_id))
        if call.task == "chassis.start":
            payload = call.args[0]
            check_name(payload["client_id"], "client_id")
            check_json(payload["input"], "input")
            for key in ("project_id", "request_id"):
                if payload[key] is not None:
                    check_name(payload[key], key)
            assert payload["fuel_budget"] is None or 1 <= payload["fuel_budget"] <= 2**31 - 1
        elif call.task == "chassis.cancel":
            _cid, reason, client_id, compensate = call.args
            check_name(client_id, "client_id")
            check_json(reason, "reason")
            assert isinstance(compensate, bool)
        else:
            check_name(call.args[-1], "client_id")
            for value in call.args[1:-1]:
                check_json(value, "argument")
    except (InputError, ChassisError, ValueError) as exc:  # pragma: no cover - the failure
        pytest.fail(f"the bridge forwarded what its task refuses: {call}: {exc}")
