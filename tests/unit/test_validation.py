"""Plan validation and metrics (chassis.validation)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chassis import actions
from chassis.errors import PlanError
from chassis.plan import load_plan, parse_plan
from chassis.validation import check, metrics, validate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BUILTINS = frozenset({"noop", "echo", "sleep", "fail"})
AI_ACTIONS = frozenset({"ai_text_generate_claude_haiku", "ai_text_generate_claude_sonnet",
                        "ai_text_generate_claude_opus", "ai_text_generate"})

#: The acceptance case: four problems of four kinds in one plan.
FOUR_PROBLEMS: dict[str, Any] = {
    "start_step": "a",
    "steps": {
        "a": {"action": "echo", "next_step": "b"},
        "b": {"action": "echo", "next_step": "a"},
        "c": {"action": "echo", "next_step": "nowhere"},
        "d": {"action": "summarize"},
        "e": {"action": "fan_out"},
    },
}
FOUR_PROBLEM_LINES = [
    "steps.c: next_step 'nowhere' names no step",
    "steps.d: action 'summarize' is not registered in this process and has no topic "
    "(registered: echo, fail, noop, sleep)",
    "steps.e: fan_out needs at least one sub-task",
    "cycle: a -> b -> a",
]


def plan_of(steps: dict[str, Any], start: str = "a") -> Any:
    return parse_plan({"start_step": start, "steps": steps})


def problems(steps: dict[str, Any], start: str = "a") -> list[str]:
    return validate(plan_of(steps, start), BUILTINS)


@pytest.mark.parametrize("name", ["blog_post.yaml", "research_assistant.yaml",
                                  "booking_saga.yaml"])
def test_examples_are_valid_with_the_builtins(name: str) -> None:
    assert validate(load_plan(EXAMPLES / name)) == []
    assert validate(load_plan(EXAMPLES / name), BUILTINS | AI_ACTIONS) == []


def test_all_four_problems_are_reported_at_once() -> None:
    assert validate(parse_plan(FOUR_PROBLEMS), BUILTINS) == FOUR_PROBLEM_LINES


def test_check_raises_with_every_problem() -> None:
    with pytest.raises(PlanError) as info:
        check(parse_plan(FOUR_PROBLEMS), BUILTINS)
    assert str(info.value) == "plan is invalid"
    assert info.value.problems == FOUR_PROBLEM_LINES


def test_check_passes_a_valid_plan() -> None:
    check(load_plan(EXAMPLES / "blog_post.yaml"))


def test_start_step_must_exist() -> None:
    assert problems({"a": {"action": "noop"}}, start="b") == ["start_step: 'b' names no step"]


def test_every_step_needs_an_action() -> None:
    assert problems({"a": {"description": "x", "next_step": "b"}, "b": {"action": ""}}) == [
        "steps.a: has no action", "steps.b: has no action"]


def test_dependencies_must_name_steps_or_sub_tasks() -> None:
    assert problems({
        "a": {"action": "fan_out", "sub_tasks": [{"step_name": "s", "action": "noop"}],
              "next_step": "b"},
        "b": {"action": "noop", "dependencies": ["a", "s", "ghost"]},
    }) == ["steps.b: dependency 'ghost' names no step"]


@pytest.mark.parametrize(
    ("steps", "cycle"),
    [
        ({"a": {"action": "noop", "next_step": "a"}}, "cycle: a -> a"),
        ({"a": {"action": "noop", "next_step": "b"},
          "b": {"action": "noop", "next_step": "c"},
          "c": {"action": "noop", "next_step": "a"}}, "cycle: a -> b -> c -> a"),
        # a runs before b, but needs b's output
        ({"a": {"action": "noop", "next_step": "b", "dependencies": ["b"]},
          "b": {"action": "noop"}}, "cycle: a -> b -> a"),
        ({"a": {"action": "noop", "dependencies": ["b"]},
          "b": {"action": "noop", "dependencies": ["a"]}}, "cycle: a -> b -> a"),
        # a fan_out's sub-task output counts as the fan_out step's
        ({"a": {"action": "fan_out", "dependencies": ["b"], "next_step": "b",
                "sub_tasks": [{"step_name": "s", "action": "noop"}]},
          "b": {"action": "noop", "dependencies": ["s"]}}, "cycle: a -> b -> a"),
    ],
)
def test_cycles_over_next_step_and_dependencies(steps: dict[str, Any], cycle: str) -> None:
    assert problems(steps) == [cycle]


def test_each_cycle_is_reported_once() -> None:
    found = problems({
        "a": {"action": "noop", "next_step": "b"},
        "b": {"action": "noop", "next_step": "a", "dependencies": ["a"]},
        "c": {"action": "noop", "next_step": "d"},
        "d": {"action": "noop", "next_step": "c"},
    })
    assert found == ["cycle: a -> b -> a", "cycle: c -> d -> c"]


def test_dependency_in_the_order_of_next_steps_is_no_cycle() -> None:
    assert problems({"a": {"action": "noop", "next_step": "b"},
                     "b": {"action": "noop", "dependencies": ["a"]}}) == []


def test_long_chain_needs_no_recursion() -> None:
    steps = {f"s{i}": {"action": "noop", "next_step": f"s{i + 1}"} for i in range(3000)}
    steps["s3000"] = {"action": "complete_workflow"}
    plan = plan_of(steps, start="s0")
    assert validate(plan, BUILTINS) == []
    assert metrics(plan)["max_depth"] == 3001


def test_fan_out_sub_tasks() -> None:
    assert problems({
        "a": {"action": "fan_out", "next_step": "b", "sub_tasks": [
            {"step_name": ""}, {"step_name": "b", "action": "noop"},
            {"step_name": "s", "action": "noop"}, {"step_name": "input", "action": "noop"}]},
        "b": {"action": "fan_out", "sub_tasks": [{"step_name": "s", "action": "noop"}]},
    }) == [
        "steps.a.sub_tasks[0]: has no step_name",
        "steps.a.sub_tasks[1]: step_name 'b' is also a step's name (outputs are stored by name)",
        "steps.a.sub_tasks[3]: step_name 'input' is reserved for workflow data",
        "steps.b.sub_tasks[0]: step_name 's' is already used by a sub-task of steps.a",
    ]


def test_step_names_of_workflow_data_are_refused() -> None:
    assert problems({"a": {"action": "noop", "next_step": "human_feedback"},
                     "human_feedback": {"action": "noop"}}) == [
        "steps.human_feedback: the name 'human_feedback' is reserved for workflow data"]


def test_sub_task_actions_default_to_step_name_and_need_registration_or_topic() -> None:
    assert problems({"a": {"action": "fan_out", "sub_tasks": [
        {"step_name": "web_search"},
        {"step_name": "ext", "topic": "agents.requests"},
        {"step_name": "e", "action": "echo"},
        {"step_name": "p", "action": "pause_for_human_input"},
    ]}}) == [
        "steps.a.sub_tasks[0]: action 'web_search' is not registered in this process and has "
        "no topic (registered: echo, fail, noop, sleep)",
        "steps.a.sub_tasks[3]: reserved action 'pause_for_human_input' cannot run as a "
        "sub-task",
    ]


def test_sub_tasks_only_on_fan_out() -> None:
    assert problems({"a": {"action": "noop", "sub_tasks": [{"step_name": "s"}]}}) == [
        "steps.a: sub_tasks are only used by fan_out, not by action 'noop'"]


def test_complete_workflow_has_no_next_step() -> None:
    assert problems({"a": {"action": "complete_workflow", "next_step": "b"},
                     "b": {"action": "noop"}}) == [
        "steps.a: complete_workflow must not have a next_step"]


def test_reserved_action_with_topic() -> None:
    assert problems({"a": {"action": "pause_for_human_input", "topic": "t", "next_step": "b"},
                     "b": {"action": "complete_workflow", "topic": "t"}}) == [
        "steps.a: reserved action 'pause_for_human_input' cannot have a topic",
        "steps.b: reserved action 'complete_workflow' cannot have a topic",
    ]


def test_external_agent_with_topic_needs_no_registration() -> None:
    assert problems({"a": {"action": "ai_text_generate_claude_opus", "topic": "agents.req"}}) == []


def test_known_actions_argument_replaces_the_registry() -> None:
    plan = plan_of({"a": {"action": "summarize"}})
    assert validate(plan, {"summarize"}) == []
    assert validate(plan, set()) == [
        "steps.a: action 'summarize' is not registered in this process and has no topic "
        "(registered: none)"]


@pytest.fixture
def summarize() -> Iterator[str]:
    actions.action("summarize")(lambda data, params: {})
    yield "summarize"
    actions.unregister("summarize")


def test_default_known_actions_are_the_registry(summarize: str) -> None:
    assert validate(plan_of({"a": {"action": summarize}})) == []


def test_metrics_of_the_examples() -> None:
    assert metrics(load_plan(EXAMPLES / "blog_post.yaml")) == {
        "steps": 4, "fan_out_steps": 1, "external_calls": 0, "max_depth": 4, "sub_tasks": 2}
    assert metrics(load_plan(EXAMPLES / "research_assistant.yaml")) == {
        "steps": 3, "fan_out_steps": 0, "external_calls": 0, "max_depth": 3, "sub_tasks": 0}


def test_metrics_count_external_calls_and_stop_at_cycles() -> None:
    plan = plan_of({
        "a": {"action": "fan_out", "next_step": "b", "sub_tasks": [
            {"step_name": "s1", "topic": "t"}, {"step_name": "s2"}]},
        "b": {"action": "x", "topic": "t", "next_step": "a"},
        "c": {"action": "noop"},
    })
    assert metrics(plan) == {
        "steps": 3, "fan_out_steps": 1, "external_calls": 2, "max_depth": 2, "sub_tasks": 2}
    assert metrics(plan_of({"a": {"action": "noop"}}, start="zz"))["max_depth"] == 0


def test_names_may_not_hold_the_attempt_separators() -> None:
    plan = parse_plan({"start_step": "a#2", "steps": {
        "a#2": {"action": "fan_out", "sub_tasks": [{"step_name": "b/1", "action": "echo"}]}}})
    assert validate(plan) == [
        "steps.a#2: step name 'a#2' may not contain '#'",
        "steps.a#2.sub_tasks[0]: step_name 'b/1' may not contain '/'"]


def test_a_dependency_that_cannot_have_completed_is_refused() -> None:
    # on the way from the start step, a later dependency is a cycle (reported as such)
    later = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "echo", "next_step": "b"},
        "b": {"action": "echo", "dependencies": ["c"], "next_step": "c"},
        "c": {"action": "echo"}}})
    assert validate(later) == ["cycle: b -> c -> b"]
    # off that way: the step it depends on never runs
    off_path = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "echo", "dependencies": ["x"], "next_step": "b"},
        "b": {"action": "echo", "dependencies": ["s"]},
        "x": {"action": "echo"},
        "side": {"action": "fan_out", "sub_tasks": [{"step_name": "s", "action": "echo"}]}}})
    assert validate(off_path) == [
        "steps.a: dependency 'x' cannot have completed when 'a' is reached (it is not on "
        "the way from start_step 'a'): the workflow would wait for ever",
        "steps.b: dependency 's' cannot have completed when 'b' is reached (it is not on "
        "the way from start_step 'a'): the workflow would wait for ever"]
    fine = parse_plan({"start_step": "fan", "steps": {
        "fan": {"action": "fan_out", "sub_tasks": [{"step_name": "s1", "action": "echo"}],
                "next_step": "use"},
        "use": {"action": "echo", "dependencies": ["s1", "fan"]}}})
    assert validate(fine) == []


def test_topics_must_be_kafka_topic_names() -> None:
    plan = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "x", "topic": "has space", "next_step": "f"},
        "f": {"action": "fan_out", "sub_tasks": [{"step_name": "s", "topic": "ok.topic-1"},
                                                 {"step_name": "t", "topic": "bad/topic"}]}}})
    assert validate(plan) == [
        "steps.a: topic 'has space' is not a Kafka topic name (letters, digits, '.', '_' "
        "and '-', at most 249)",
        "steps.f.sub_tasks[1]: topic 'bad/topic' is not a Kafka topic name (letters, digits, "
        "'.', '_' and '-', at most 249)"]


def test_compensate_needs_an_action_that_can_run() -> None:
    done = {"action": "complete_workflow"}
    assert problems({"a": {"action": "echo", "compensate": {"params": {}},
                            "next_step": "z"}, "z": done}) == [
        "steps.a.compensate: has no action"]
    assert problems({"a": {"action": "echo", "compensate": {"action": "release"},
                            "next_step": "z"}, "z": done}) == [
        "steps.a.compensate: action 'release' is not registered in this process and has "
        "no topic (registered: echo, fail, noop, sleep)"]
    assert problems({"a": {"action": "echo", "next_step": "z", "compensate": {
        "action": "release", "topic": "agents.release"}}, "z": done}) == []
    assert problems({"a": {"action": "echo", "compensate": {"action": "fan_out"},
                            "next_step": "z"}, "z": done}) == [
        "steps.a.compensate: reserved action 'fan_out' cannot undo a step"]
    assert problems({"a": {"action": "echo", "next_step": "z", "compensate": {
        "action": "echo", "retry": {"max_attempts": 3, "initial_interval": 10,
                                    "max_interval": 5}}}, "z": done})[0].startswith(
        "steps.a.compensate")


def test_compensate_on_a_reserved_action_is_refused() -> None:
    done = {"action": "complete_workflow"}
    found = problems({
        "a": {"action": "fan_out", "sub_tasks": [{"step_name": "s", "action": "echo"}],
              "compensate": {"action": "echo"}, "next_step": "p"},
        "p": {"action": "pause_for_human_input", "compensate": {"action": "echo"},
              "next_step": "z"},
        "z": {**done, "compensate": {"action": "echo"}}})
    assert found == [
        "steps.a.compensate: a fan_out step has nothing to undo (give its sub-tasks a "
        "compensate)",
        "steps.p.compensate: a pause_for_human_input step has nothing to undo",
        "steps.z.compensate: a complete_workflow step has nothing to undo"]
    assert problems({"a": {"action": "fan_out", "next_step": "z", "sub_tasks": [
        {"step_name": "s", "action": "echo", "compensate": {"action": "nope"}}]},
        "z": done})[0].startswith("steps.a.sub_tasks[0].compensate: action 'nope'")


def test_on_failure_must_name_another_step() -> None:
    done = {"action": "complete_workflow"}
    assert problems({"a": {"action": "echo", "on_failure": "nowhere", "next_step": "z"},
                      "z": done}) == ["steps.a: on_failure 'nowhere' names no step"]
    assert problems({"a": {"action": "echo", "on_failure": "a", "next_step": "z"},
                      "z": done}) == ["steps.a: on_failure names the step itself"]
    assert problems({"a": {"action": "pause_for_human_input", "on_failure": "z",
                            "next_step": "z"}, "z": done}) == [
        "steps.a: on_failure on pause_for_human_input is where the workflow goes on when "
        "its approval expires: give the step a timeout too"]
    assert problems({"a": {"action": "pause_for_human_input", "on_failure": "z",
                            "timeout": 86400, "next_step": "z"}, "z": done}) == []
    assert problems({"a": {"action": "complete_workflow", "on_failure": "z"},
                      "z": done}) == [
        "steps.a: on_failure does not apply to complete_workflow (it makes no attempts)"]


def test_a_pause_may_expire_but_not_retry() -> None:
    done = {"action": "complete_workflow"}
    assert problems({"a": {"action": "pause_for_human_input", "timeout": 60,
                            "next_step": "z"}, "z": done}) == []
    with pytest.raises(PlanError) as refused:
        problems({"a": {"action": "pause_for_human_input", "timeout": 0, "next_step": "z"},
                  "z": done})
    assert any(p.startswith("steps.a.timeout") for p in refused.value.problems)
    assert problems({"a": {"action": "pause_for_human_input", "retry": {"max_attempts": 2},
                            "next_step": "z"}, "z": done}) == [
        "steps.a: retry does not apply to pause_for_human_input (a retry of the workflow "
        "asks again)"]
    assert problems({"a": {"action": "complete_workflow", "timeout": 5}}) == [
        "steps.a: retry and timeout do not apply to complete_workflow"]
    assert problems({"a": {"action": "echo", "on_failure": "h", "next_step": "z"},
                      "h": {"action": "echo", "next_step": "z"}, "z": done}) == []


def test_an_on_failure_loop_is_a_cycle() -> None:
    assert problems({"a": {"action": "echo", "on_failure": "h", "next_step": "z"},
                      "h": {"action": "echo", "next_step": "a"},
                      "z": {"action": "complete_workflow"}}) == ["cycle: a -> h -> a"]


def test_an_on_failure_path_may_not_wait_for_the_step_that_failed() -> None:
    found = problems({
        "a": {"action": "echo", "next_step": "b"},
        "b": {"action": "echo", "on_failure": "h", "next_step": "z"},
        "h": {"action": "echo", "dependencies": ["a", "b"], "next_step": "z"},
        "z": {"action": "complete_workflow"}})
    assert found == [
        "steps.h: dependency 'b' cannot have completed when 'h' is reached (it may not "
        "have completed when on_failure leads to 'h'): the workflow would wait for ever"]


@pytest.mark.parametrize("name", ["error", "output"])
def test_the_names_a_compensation_and_on_failure_see_are_reserved(name: str) -> None:
    assert f"steps.{name}: the name {name!r} is reserved for workflow data" in problems(
        {"a": {"action": "echo", "next_step": name}, name: {"action": "complete_workflow"}})


def test_a_step_with_a_compensate_leaves_room_for_its_suffix_in_names() -> None:
    name = "s" * 250
    found = problems({name: {"action": "echo", "compensate": {"action": "echo"},
                             "next_step": "z"}, "z": {"action": "complete_workflow"}},
                     start=name)
    assert found == [f"steps.{name}.compensate: the step's name is too long to have a "
                     "compensate (at most 244 characters)"]
