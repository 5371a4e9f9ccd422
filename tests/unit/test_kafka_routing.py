"""The bridge's routing table, without a broker: which topic becomes which task, and
the reason code of every unusable message."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from chassis import config
from chassis.kafka import clients, routing
from chassis.kafka.routing import Rejected, Router, StartRecord, routes

CID = str(uuid.uuid4())


class FakeDirectory:
    def __init__(self) -> None:
        self.plans = {"research": 3}
        self.owners = {CID: "acme"}
        self.requests = {(CID, "req-1")}
        self.starts: dict[str, StartRecord] = {}

    def plan_version(self, name: str, version: int | None) -> int | None:
        latest = self.plans.get(name)
        if latest is None or (version is not None and version > latest):
            return None
        return version or latest

    def owner(self, correlation_id: str) -> str | None:
        return self.owners.get(correlation_id)

    def start_of(self, correlation_id: str) -> StartRecord | None:
        return self.starts.get(correlation_id)

    def has_request(self, correlation_id: str, request_id: str) -> bool:
        return (correlation_id, request_id) in self.requests


@pytest.fixture
def router(tmp_path: Path) -> Router:
    return Router(routes(config.load({"CHASSIS_HOME": str(tmp_path)})), FakeDirectory())


def reason(router: Router, topic: str, value: object, headers: dict[str, str]) -> str:
    raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
    with pytest.raises(Rejected) as info:
        router.call(topic, raw, headers)
    assert info.value.detail
    return info.value.reason


def test_start_request_becomes_chassis_start_of_the_latest_version(router: Router) -> None:
    call = router.call("system.agent.research.process", b'{"q": 1}', {
        "correlation_id": CID.upper(), "client_id": "acme", "request_id": "r1",
        "project_id": "p", "fuel_budget": "40"})
    assert call.task == routing.START_TASK and call.task_id == f"start-{CID}"
    assert call.args == [{"plan": "research", "version": 3, "input": {"q": 1},
                          "correlation_id": CID, "client_id": "acme", "project_id": "p",
                          "request_id": "r1", "fuel_budget": 40}]


def test_plan_header_names_the_plan_and_version(router: Router) -> None:
    call = router.call("system.agent.other.process", None, {
        "correlation_id": CID, "client_id": "acme", "plan": "research@2"})
    assert (call.args[0]["plan"], call.args[0]["version"], call.args[0]["input"]) == (
        "research", 2, None)
    assert reason(router, "system.agent.other.process", None, {
        "correlation_id": CID, "client_id": "acme", "plan": "research@9"}) == "unknown_plan"


@pytest.mark.parametrize(("value", "headers", "expected"), [
    (b"{nope", {"correlation_id": CID, "client_id": "a"}, "bad_json"),
    ({"q": 1}, {"correlation_id": CID}, "missing_header"),
    ({"q": 1}, {"client_id": "a"}, "missing_header"),
    ({"q": 1}, {"correlation_id": "x", "client_id": "a"}, "bad_header"),
    ({"q": 1}, {"correlation_id": CID, "client_id": "a", "fuel_budget": "-3"}, "bad_header"),
])
def test_unusable_start_requests(router: Router, value: object, headers: dict[str, str],
                                 expected: str) -> None:
    assert reason(router, "system.agent.research.process", value, headers) == expected


def test_unknown_or_invalid_plan_name(router: Router) -> None:
    headers = {"correlation_id": CID, "client_id": "a"}
    assert reason(router, "system.agent.ghost.process", {}, headers) == "unknown_plan"
    assert reason(router, "system.agent.bad name.process", {}, headers) == "unknown_plan"


def test_resume_is_only_for_the_owner_of_an_existing_workflow(router: Router) -> None:
    topic = "system.commands.workflow.resume"
    call = router.call(topic, b'{"approved": false, "feedback": "no"}',
                       {"correlation_id": CID, "client_id": "acme"})
    assert (call.task, call.args) == (routing.RESUME_TASK, [CID, False, "no", "acme"])
    ok = {"approved": True}
    assert reason(router, topic, ok, {"correlation_id": CID, "client_id": "eve"}) == \
        "unknown_workflow"  # another client's workflow is as unknown as a missing one
    assert reason(router, topic, ok, {"correlation_id": str(uuid.uuid4()),
                                      "client_id": "acme"}) == "unknown_workflow"
    assert reason(router, topic, ok, {"correlation_id": CID}) == "missing_header"
    assert reason(router, topic, [1], {"correlation_id": CID, "client_id": "acme"}) == \
        "bad_payload"


def test_a_resume_may_add_fuel_a_whole_number_from_1(router: Router) -> None:
    topic = "system.commands.workflow.resume"
    owner = {"correlation_id": CID, "client_id": "acme"}
    call = router.call(topic, b'{"approved": true, "add_fuel": 20}', owner)
    assert call.args == [CID, True, None, "acme", 20]
    for none in (b'{"approved": true, "add_fuel": null}', b'{"approved": true, "add_fuel": 0}'):
        assert router.call(topic, none, owner).args == [CID, True, None, "acme"]
    for bad in (-1, 1.5, 0.0, "20", True, False, 2**31):
        assert reason(router, topic, {"approved": True, "add_fuel": bad}, owner) == \
            "bad_payload"


def test_a_resume_may_name_the_pause_it_answers(router: Router) -> None:
    topic = "system.commands.workflow.resume"
    owner = {"correlation_id": CID, "client_id": "acme"}
    call = router.call(topic, b'{"approved": true, "step": "review"}', owner)
    assert call.args == [CID, True, None, "acme", 0, "review"]
    call = router.call(topic, b'{"approved": true, "add_fuel": 5, "step": "review"}', owner)
    assert call.args == [CID, True, None, "acme", 5, "review"]
    for bad in ("", " ", 7, ["review"], "x" * 256, "re\nview", "re\x00view"):
        assert reason(router, topic, {"approved": True, "step": bad}, owner) == "bad_payload"


def test_cancel_is_only_for_the_owner_of_an_existing_workflow(router: Router) -> None:
    topic = "system.commands.workflow.cancel"
    owner = {"correlation_id": CID, "client_id": "acme"}
    call = router.call(topic, b'{"reason": "budget cut"}', owner)
    assert (call.task, call.args) == ("chassis.cancel", [CID, "budget cut", "acme", False])
    assert router.call(topic, None, owner).args == [CID, None, "acme", False]  # empty is fine
    undo = router.call(topic, b'{"compensate": true}', owner)
    assert undo.args == [CID, None, "acme", True]
    assert reason(router, topic, {"compensate": "yes"}, owner) == "bad_payload"
    assert reason(router, topic, {}, {**owner, "client_id": "eve"}) == "unknown_workflow"
    assert reason(router, topic, {}, {**owner, "correlation_id": str(uuid.uuid4())}) == \
        "unknown_workflow"
    assert reason(router, topic, {}, {"correlation_id": CID}) == "missing_header"
    assert reason(router, topic, [1], owner) == "bad_payload"
    assert reason(router, topic, {"reason": 7}, owner) == "bad_payload"
    assert reason(router, topic, {"reason": "x" * 1001}, owner) == "bad_payload"
    assert reason(router, topic, b"{nope", owner) == "bad_json"


def test_response_becomes_chassis_respond(router: Router) -> None:
    topic = "system.responses.research"
    call = router.call(topic, b'{"success": false, "error": {"code": 7}}',
                       {"correlation_id": CID, "causation_id": "req-1", "client_id": "acme"})
    assert (call.task, call.args) == (routing.RESPOND_TASK,
                                      [CID, "req-1", False, None, '{"code": 7}', None, "acme"])
    h = {"correlation_id": CID, "causation_id": "req-1", "client_id": "acme"}
    assert reason(router, topic, {"success": True}, {**h, "client_id": "eve"}) == \
        "unknown_workflow"
    no_client = {"correlation_id": CID, "causation_id": "req-1"}
    assert reason(router, topic, {"success": True}, no_client) == "missing_header"
    assert reason(router, topic, {"success": True}, {**h, "causation_id": "req-2"}) == \
        "unknown_request"
    assert reason(router, topic, {"data": 1}, h) == "bad_payload"
    assert reason(router, topic, {"success": True}, {"correlation_id": CID}) == \
        "missing_header"


def test_topics_without_a_route(router: Router) -> None:
    assert reason(router, "something.else", {}, {}) == "no_route"


def test_subscriptions_are_librdkafka_regexes(tmp_path: Path) -> None:
    settings = config.load({"CHASSIS_HOME": str(tmp_path)})
    assert [r.subscription for r in routes(settings)] == [
        r"^system\.commands\.workflow\.resume$", r"^system\.commands\.workflow\.cancel$",
        r"^system\.agent\.(.+)\.process$", r"^system\.responses\..*"]
    literal = replace(settings, kafka_response_pattern="agents.answers")
    assert routes(literal)[3].subscription == r"^agents\.answers$"


def test_kafka_settings_from_the_environment(tmp_path: Path) -> None:
    s = config.load({"CHASSIS_HOME": str(tmp_path)})
    assert (s.kafka_bootstrap, s.kafka_dlq_topic, s.kafka_group) == (
        None, "dlq.chassis", "chassis-bridge")
    assert (s.relay_batch_size, s.relay_poll_interval) == (500, 0.2)
    s = config.load({"CHASSIS_HOME": str(tmp_path), "CHASSIS_KAFKA_BOOTSTRAP": "k:9092",
                     "CHASSIS_KAFKA_DLQ_TOPIC": "dead", "CHASSIS_KAFKA_GROUP": "g",
                     "CHASSIS_KAFKA_RESPONSE_PATTERN": "^answers\\..*",
                     "CHASSIS_RELAY_BATCH_SIZE": "50", "CHASSIS_RELAY_POLL_INTERVAL": "1.5"})
    assert (s.kafka_bootstrap, s.kafka_dlq_topic, s.kafka_group, s.kafka_response_pattern,
            s.relay_batch_size, s.relay_poll_interval) == (
        "k:9092", "dead", "g", "^answers\\..*", 50, 1.5)


def test_start_without_correlation_id_derives_it_from_the_request_id(router: Router) -> None:
    topic, headers = "system.agent.research.process", {"client_id": "a", "request_id": "r9"}
    first = router.call(topic, b"{}", headers)
    again = router.call(topic, b"{}", headers)
    other = router.call(topic, b"{}", {**headers, "request_id": "r10"})
    assert first.correlation_id == again.correlation_id != other.correlation_id
    assert uuid.UUID(str(first.correlation_id))
    assert reason(router, topic, {}, {"client_id": "a"}) == "missing_header"
    # another client's request with the same id is another workflow
    theirs = router.call(topic, b"{}", {**headers, "client_id": "b"})
    assert theirs.correlation_id != first.correlation_id


def test_an_identity_header_given_twice_with_different_values_is_refused(
        router: Router) -> None:
    topic, headers = "system.agent.research.process", {"client_id": "a", "request_id": "r9"}
    with pytest.raises(Rejected) as info:
        router.call(topic, b"{}", headers, repeated={"client_id"})
    assert info.value.reason == "bad_header" and "client_id" in info.value.detail
    assert router.call(topic, b"{}", headers, repeated={"x-trace"}).task == "chassis.start"
    assert clients.repeated_headers([("client_id", b"a"), ("client_id", b"b"),
                                     ("x", b"1"), ("x", b"1")]) == {"client_id"}
    # bytes that are not UTF-8 are refused, not replaced by a valid name
    assert clients.header_dict([("client_id", b"ac\xffme")])["client_id"] != "ac\ufffdme"
    assert reason(router, topic, {}, clients.header_dict(
        [("client_id", b"ac\xffme"), ("request_id", b"r1")])) == "bad_header"


START = "system.agent.research.process"
OK = {"correlation_id": str(uuid.uuid4()), "client_id": "acme"}


@pytest.mark.parametrize("topic, value, headers, expected", [
    (START, {"q": 1}, {**OK, "fuel_budget": "²"}, "bad_header"),
    (START, {"q": 1}, {**OK, "fuel_budget": "99999999999"}, "bad_header"),
    (START, {"q": 1}, {**OK, "client_id": "c" * 300}, "bad_header"),
    (START, {"q": 1}, {**OK, "client_id": "a\x01b"}, "bad_header"),
    (START, {"q": 1}, {**OK, "project_id": "p" * 300}, "bad_header"),
    (START, b"[" * 100_000 + b"]" * 100_000, OK, "bad_payload"),
    (START, b'{"n": 1' + b"0" * 5000 + b"}", OK, "bad_json"),
    (START, b'{"n": NaN}', OK, "bad_json"),
    (START, b'{"n": Infinity}', OK, "bad_json"),
    (START, b'{"n": "\\u0000"}', OK, "bad_payload"),
    (START, b'{"n": "\\ud800"}', OK, "bad_payload"),
    (START, b"\xff\xfe", OK, "bad_json"),
    (START, b'"' + b"x" * 2_000_000 + b'"', OK, "bad_payload"),
    ("system.commands.workflow.resume", b'{"approved": true, "feedback": NaN}',
     {"correlation_id": CID, "client_id": "acme"}, "bad_json"),
    ("system.responses.research", b'{"success": true, "data": {"x": NaN}}',
     {"correlation_id": CID, "causation_id": "req-1", "client_id": "acme"}, "bad_json"),
    ("system.responses.research", {"success": False, "error_type": "not a name"},
     {"correlation_id": CID, "causation_id": "req-1", "client_id": "acme"}, "bad_payload"),
])
def test_poison_messages_get_a_reason(router: Router, topic: str, value: object,
                                      headers: dict[str, str], expected: str) -> None:
    assert reason(router, topic, value, headers) == expected


def test_a_start_with_an_id_in_use_otherwise_is_a_conflict(router: Router) -> None:
    d = router.directory
    assert isinstance(d, FakeDirectory)
    d.starts[CID] = ("acme", "research", 3, {"q": 1}, 40)
    same = {"correlation_id": CID, "client_id": "acme", "fuel_budget": "40"}
    assert router.call(START, b'{"q": 1}', same).task == routing.START_TASK  # a repeat
    assert reason(router, START, {"q": 2}, same) == "conflict"
    assert reason(router, START, {"q": 1}, {**same, "client_id": "eve"}) == "conflict"
    assert reason(router, START, {"q": 1}, {**same, "fuel_budget": "41"}) == "conflict"


def test_an_unexpected_error_is_a_dead_letter_not_a_retry(tmp_path: Path) -> None:
    class Broken(FakeDirectory):
        def plan_version(self, name: str, version: int | None) -> int | None:
            raise ValueError("something odd in the registry")

    router = Router(routes(config.load({"CHASSIS_HOME": str(tmp_path)})), Broken())
    assert reason(router, START, {"q": 1}, OK) == "bad_message"
