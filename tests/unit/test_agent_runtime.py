"""The agent runtime's settings, request checks and answers (no broker: the runtime
itself is tested against Tansu in tests/e2e/test_agent_runtime.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chassis import actions, config
from chassis.errors import ConfigError
from chassis.kafka.agent import (
    Request,
    Unusable,
    agent_config,
    answer_headers,
    parse_request,
    read_config_file,
    run,
)

SETTINGS = config.load({})


def test_the_topics_group_and_pool_derive_from_the_type() -> None:
    c = agent_config({"agent_type": "research"}, {}, None, SETTINGS)
    assert (c.topic, c.responses, c.group) == (
        "system.agent.research.requests", "system.responses.research", "research-group")
    assert (c.concurrency, c.health_port, c.dlq) == (8, 8080, "dlq.chassis")
    assert c.action_timeout == SETTINGS.step_timeout  # the coordinator's default
    c = agent_config({"agent_type": "research"}, {"CHASSIS_STEP_TIMEOUT": "99"}, None,
                     config.load({"CHASSIS_STEP_TIMEOUT": "99"}))
    assert c.action_timeout == 99.0


def test_a_long_step_timeout_is_capped_and_a_requests_own_timeout_is_read() -> None:
    from chassis.kafka.agent import _request_timeout

    long = config.load({"CHASSIS_STEP_TIMEOUT": "864000"})  # ten days
    assert agent_config({"agent_type": "a"}, {}, None, long).action_timeout == 604800
    def request(**headers: str) -> Request:
        return Request("a", {}, {}, {"correlation_id": "c", "request_id": "r", **headers})
    assert _request_timeout(request(timeout="7200")) == 7200.0
    assert _request_timeout(request(timeout="0.5")) == 0.5
    for bad in ("", "0", "-1", "nan", "inf", "soon", "1e9"):
        assert _request_timeout(request(timeout=bad)) is None, bad
    assert _request_timeout(request()) is None


def test_the_action_timeout_from_an_option_a_variable_or_the_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("agent_type: w\naction_timeout: 2.5\n")
    file = read_config_file(f)
    assert agent_config({}, {}, file, SETTINGS).action_timeout == 2.5
    env = {"CHASSIS_AGENT_ACTION_TIMEOUT": "30"}
    assert agent_config({}, env, file, SETTINGS).action_timeout == 30.0
    assert agent_config({"action_timeout": "0.5"}, env, file, SETTINGS).action_timeout == 0.5


def test_options_win_over_variables_which_win_over_the_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("agent_type: writer\nkafka_consumer_group: from-file\ntopic: t.file\n"
                 "concurrency: 3\nhealth_port: 9000\nactions: [a.b]\n")
    file = read_config_file(f)
    c = agent_config({}, {}, file, SETTINGS)
    assert (c.agent_type, c.group, c.topic, c.concurrency, c.health_port, c.modules) == (
        "writer", "from-file", "t.file", 3, 9000, ("a.b",))
    assert c.responses == "system.responses.writer"
    env = {"CHASSIS_AGENT_GROUP": "from-env", "CHASSIS_AGENT_CONCURRENCY": "5",
           "CHASSIS_AGENT_TYPE": "critic"}
    c = agent_config({}, env, file, SETTINGS)
    assert (c.agent_type, c.group, c.concurrency) == ("critic", "from-env", 5)
    c = agent_config({"group": "from-option", "health_port": "0"}, env, file, SETTINGS)
    assert (c.group, c.health_port) == ("from-option", 0)


@pytest.mark.parametrize(("given", "env", "message"), [
    ({}, {}, "the agent's type is required"),
    ({"agent_type": "a b"}, {}, "agent type 'a b'"),
    ({"agent_type": "a", "topic": "bad topic"}, {}, "not a valid Kafka topic name"),
    ({"agent_type": "a", "concurrency": "0"}, {}, "concurrency must be a whole number"),
    ({"agent_type": "a"}, {"CHASSIS_AGENT_CONCURRENCY": "many"}, "concurrency"),
    ({"agent_type": "a", "health_port": "70000"}, {}, "health port"),
    ({"agent_type": "a", "concurrency": "\u00b2"}, {}, "concurrency"),
    ({"agent_type": "a", "group": "x y"}, {}, "consumer group 'x y'"),
    ({"agent_type": "a", "action_timeout": "0"}, {}, "action timeout must be a number"),
    ({"agent_type": "a", "action_timeout": "nan"}, {}, "action timeout"),
    ({"agent_type": "a"}, {"CHASSIS_AGENT_ACTION_TIMEOUT": "soon"}, "action timeout"),
    ({"agent_type": "a", "action_timeout": "1e9"}, {}, "at most 604800"),
    ({"agent_type": "a", "responses": "answers.a"}, {}, "does not match "
     "CHASSIS_KAFKA_RESPONSE_PATTERN"),
])
def test_bad_settings_are_refused_with_one_line(given: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        agent_config(given, env, None, SETTINGS)


def test_a_config_files_zero_or_wrong_types_are_refused_too(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("agent_type: a\nconcurrency: 0\n")
    with pytest.raises(ConfigError, match="concurrency must be a whole number from 1"):
        agent_config({}, {}, read_config_file(f), SETTINGS)
    f.write_text("agent_type: a\nactions: 5\n")
    with pytest.raises(ConfigError, match="actions must be a list"):
        agent_config({}, {}, read_config_file(f), SETTINGS)
    f.write_text("agent_type: a\nhealth_port: 0\n")
    assert agent_config({}, {}, read_config_file(f), SETTINGS).health_port == 0


def test_a_config_file_that_is_not_a_map_or_has_unknown_names(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a map"):
        read_config_file(f)
    f.write_text("agent_type: a\ncolour: red\n")
    with pytest.raises(ConfigError, match="unknown setting.*colour"):
        read_config_file(f)
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_file(tmp_path / "missing.yaml")


HEADERS = {"correlation_id": "c1", "request_id": "r1", "client_id": "acme",
           "project_id": "p", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}


@pytest.mark.parametrize(("value", "headers", "reason"), [
    (b'{"action": "echo"}', {**HEADERS, "client_id": "\udcff"}, "bad_header"),
    (b"[" * 100_000, HEADERS, "bad_json"),
    (b'{"action": "echo"}', {"correlation_id": "c1"}, "missing_header"),
    (b'{"action": "echo"}', {"request_id": "r1"}, "missing_header"),
    (b"not json", HEADERS, "bad_json"),
    (b"\xff\xfe", HEADERS, "bad_json"),
    (b"[1, 2]", HEADERS, "bad_request"),
    (b'{"data": {}}', HEADERS, "bad_request"),
    (b'{"action": "echo", "params": [1]}', HEADERS, "bad_request"),
    (None, HEADERS, "bad_json"),
])
def test_unusable_requests_name_their_reason(value: bytes | None, headers: dict,
                                             reason: str) -> None:
    with pytest.raises(Unusable) as info:
        parse_request(value, headers)
    assert info.value.reason == reason


def test_answers_success_failure_and_an_unknown_action() -> None:
    ok = run(parse_request(json.dumps({"action": "echo", "params": {"a": 1}}).encode(),
                           HEADERS))
    assert ok == {"success": True, "data": {"a": 1}, "error": None}
    failed = run(Request("fail", {}, {"message": "boom"}, HEADERS))
    assert failed == {"success": False, "data": None, "error": "boom",
                      "error_type": "ActionError"}
    unknown = run(Request("no_such_action", {}, {}, HEADERS))
    assert unknown["success"] is False and "no_such_action" in unknown["error"]
    def leaves(data: dict, params: dict) -> None:
        raise SystemExit(3)  # (an action ending its thread: answered as a failure)

    actions.action("test_exits", replace=True)(leaves)
    try:
        exits = run(Request("test_exits", {}, {}, HEADERS))
    finally:
        actions.unregister("test_exits")
    assert exits["success"] is False and exits["error_type"] == "SystemExit"
    not_json = run(Request("echo", {}, {"x": float("nan")}, HEADERS))
    assert not_json["success"] is False and "not a JSON number" in not_json["error"]


def test_the_answer_carries_the_coordinators_headers() -> None:
    h = answer_headers(Request("echo", {}, {}, HEADERS), None)
    assert h == {"correlation_id": "c1", "causation_id": "r1", "client_id": "acme",
                 "project_id": "p", "traceparent": HEADERS["traceparent"]}
    mine = "00-" + "3" * 32 + "-" + "4" * 16 + "-01"
    assert answer_headers(Request("echo", {}, {}, HEADERS), mine)["traceparent"] == mine
