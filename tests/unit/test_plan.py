"""Plan parsing, loading, rendering and schema (chassis.plan)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from chassis.errors import PlanError, PlanFileError
from chassis.plan import (
    PLAN_FIELDS,
    STEP_FIELDS,
    SUB_TASK_FIELDS,
    Plan,
    Step,
    SubTask,
    json_schema,
    load_plan,
    loads_plan,
    parse_plan,
    parse_plan_partial,
    plan_to_dict,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def problems_of(data: object) -> list[str]:
    with pytest.raises(PlanError) as info:
        parse_plan(data)
    return info.value.problems


def test_both_examples_exist() -> None:
    assert {p.name for p in EXAMPLE_FILES} >= {"blog_post.yaml", "research_assistant.yaml"}


def test_minimal_plan_gets_defaults() -> None:
    plan = parse_plan({"start_step": "a", "steps": {"a": {"action": "noop"}}})
    assert plan == Plan(start_step="a", steps={"a": Step(action="noop")})
    step = plan.steps["a"]
    assert (step.description, step.topic, step.dependencies, step.next_step) == ("", None, (), None)
    assert (step.sub_tasks, step.params) == ((), {})


def test_blog_post_example_parses_as_documented() -> None:
    plan = load_plan(EXAMPLES / "blog_post.yaml")
    assert plan.name == "Blog Post Generator"
    assert plan.start_step == "research"
    assert list(plan.steps) == ["research", "generate", "pause_for_review", "finish"]
    research = plan.steps["research"]
    assert research.action == "fan_out"
    assert [st.step_name for st in research.sub_tasks] == ["web_research", "style_analysis"]
    assert all(st.resolved_action == "echo" for st in research.sub_tasks)
    assert plan.steps["generate"].dependencies == ("research",)
    assert plan.steps["pause_for_review"].description == "Review the generated blog post"
    assert plan.steps["finish"].action == "complete_workflow"


def test_research_assistant_example_parses_as_documented() -> None:
    plan = load_plan(EXAMPLES / "research_assistant.yaml")
    assert plan.start_step == "web_search"
    assert [(n, s.action, s.next_step) for n, s in plan.steps.items()] == [
        ("web_search", "echo", "analyze_research"),
        ("analyze_research", "ai_text_generate_claude_haiku", "finish"),
        ("finish", "complete_workflow", None),
    ]
    assert all(s.topic is None for s in plan.steps.values())


def test_json_and_yaml_text_give_the_same_plan() -> None:
    data = {"start_step": "a", "steps": {"a": {"action": "echo", "params": {"x": [1, 2]}}}}
    yaml_text = "start_step: a\nsteps:\n  a:\n    action: echo\n    params: {x: [1, 2]}\n"
    assert loads_plan(json.dumps(data)) == loads_plan(yaml_text) == parse_plan(data)


def test_sub_task_action_defaults_to_step_name() -> None:
    plan = parse_plan({"start_step": "f", "steps": {"f": {
        "action": "fan_out", "sub_tasks": [{"step_name": "web_search"},
                                           {"step_name": "b", "action": "echo"}]}}})
    assert [st.resolved_action for st in plan.steps["f"].sub_tasks] == ["web_search", "echo"]


def test_unknown_fields_are_named_at_every_level() -> None:
    problems = problems_of({
        "start_step": "generate", "extra": 1,
        "steps": {
            "generate": {"action": "echo", "nxt_step": "x"},
            "f": {"action": "fan_out", "sub_tasks": [{"step_name": "s", "nme": "y"}]},
        },
    })
    assert problems == [
        "plan: unknown field 'extra'",
        "steps.generate: unknown field 'nxt_step'",
        "steps.f.sub_tasks[0]: unknown field 'nme'",
    ]


def test_wrong_types_are_all_reported_with_their_place() -> None:
    problems = problems_of({
        "name": 3,
        "start_step": "generate",
        "steps": {
            "generate": {
                "action": ["echo"],
                "description": 1.5,
                "topic": True,
                "dependencies": "research",
                "next_step": 7,
                "params": [1, 2],
            },
            "research": {"action": "fan_out", "sub_tasks": {"step_name": "a"},
                         "dependencies": ["generate", 2]},
            "f": {"action": "fan_out", "sub_tasks": [{"step_name": 1, "params": "p"}, "x"]},
        },
    })
    assert problems == [
        "name: expected a string, got int",
        "steps.generate.action: expected a string, got list",
        "steps.generate.description: expected a string, got float",
        "steps.generate.topic: expected a string, got bool",
        "steps.generate.dependencies: expected a list of step names, got str",
        "steps.generate.next_step: expected a string, got int",
        "steps.generate.params: expected a mapping, got list",
        "steps.research.dependencies[1]: expected a step name, got int",
        "steps.research.sub_tasks: expected a list of sub-tasks, got mapping",
        "steps.f.sub_tasks[0].step_name: expected a string, got int",
        "steps.f.sub_tasks[0].params: expected a mapping, got str",
        "steps.f.sub_tasks[1]: expected a sub-task mapping, got str",
    ]


def test_null_and_empty_optional_fields_mean_unset() -> None:
    plan = parse_plan({
        "name": None, "description": None, "start_step": "a",
        "steps": {
            "a": {"action": "fan_out", "description": None, "topic": None, "next_step": "",
                  "dependencies": None, "params": None,
                  "sub_tasks": [{"step_name": "s", "topic": "", "action": None,
                                 "params": None}]},
        },
    })
    assert plan == Plan("a", {"a": Step("fan_out", sub_tasks=(SubTask("s"),))})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], ["plan: expected a mapping with start_step and steps, got list"]),
        ({}, ["plan: missing required field 'start_step'", "plan: missing required field 'steps'"]),
        ({"start_step": "a", "steps": {}}, ["steps: must have at least one step"]),
        ({"start_step": "a", "steps": ["a"]},
         ["steps: expected a mapping of step name to step, got list"]),
        ({"start_step": 1, "steps": {"a": {"action": "noop"}}},
         ["start_step: expected a string, got int"]),
        ({"start_step": "a", "steps": {"a": None}},
         ["steps.a: expected a step mapping, got null"]),
    ],
)
def test_broken_shapes_give_no_plan(data: object, expected: list[str]) -> None:
    plan, problems = parse_plan_partial(data)
    assert plan is None
    assert problems == expected
    assert problems_of(data) == expected


def test_partial_parse_keeps_a_plan_when_only_fields_are_wrong() -> None:
    plan, problems = parse_plan_partial(
        {"start_step": "a", "steps": {"a": {"action": "echo", "next_step": 1, "x": 2}}})
    assert problems == ["steps.a: unknown field 'x'",
                        "steps.a.next_step: expected a string, got int"]
    assert plan == Plan("a", {"a": Step("echo")})


def test_params_must_be_json_values() -> None:
    text = "start_step: a\nsteps:\n  a:\n    action: echo\n    params:\n      when: 2024-01-02\n"
    assert loads_plan(text).steps["a"].params == {"when": "2024-01-02"}  # YAML: text, no date
    assert problems_of({"start_step": "a", "steps": {"a": {"action": "echo",
                                                           "params": {"k": {1: "x"}}}}}) == [
        "steps.a.params.k: keys must be strings, got int 1"]


def test_missing_action_is_left_to_validation() -> None:
    plan = parse_plan({"start_step": "a", "steps": {"a": {"description": "no action"}}})
    assert plan.steps["a"].action == ""


# ----------------------------------------------------------------------------- files


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match="no such plan file"):
        load_plan(tmp_path / "missing.yaml")


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match="is a directory"):
        load_plan(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: [a\n", "not a JSON or YAML plan (invalid YAML: expected ',' or ']'"),
        ('{"start_step": "a",\n "steps": {"a": {"action": "noop"}}\n',
         "not a JSON or YAML plan (invalid JSON: "),
        ("", "empty file"),
        ("just some words\n", "expected a mapping with start_step and steps at the top "
                              "level, got str"),
        ("- start_step: a\n", "got list"),
        ("start_step: a\nsteps:\n  a: {action: echo}\n  a: {action: noop}\n",
         "duplicate key 'a' at line 4"),
        ('{"start_step": "a", "start_step": "b"}', "invalid JSON: duplicate key 'start_step'"),
    ],
)
def test_load_text_that_is_not_a_plan(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PlanFileError) as info:
        load_plan(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.problems == [str(info.value)]


def test_load_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(PlanFileError, match="not a text file"):
        load_plan(path)


def test_load_invalid_plan_lists_problems_with_the_source(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"start_step": "a", "steps": {"a": {"action": 1}}}))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert not isinstance(info.value, PlanFileError)
    assert str(info.value) == f"{path}: plan is invalid"
    assert info.value.problems == ["steps.a.action: expected a string, got int"]


# ------------------------------------------------------------------------ round trip


FULL = Plan(
    start_step="f",
    name="Full",
    description="every field",
    steps={
        "f": Step("fan_out", "parallel", sub_tasks=(
            SubTask("s1"), SubTask("s2", topic="agents.req", action="web_search",
                                   params={"q": "x"}))),
        "g": Step("ai_write", "draft", topic="agents.write", dependencies=("f", "s1"),
                  next_step="done", params={"n": 1, "nested": {"a": [1, None]}}),
        "done": Step("complete_workflow"),
    },
)


@pytest.mark.parametrize("plan", [FULL, *(load_plan(p) for p in EXAMPLE_FILES)],
                         ids=["full", *(p.stem for p in EXAMPLE_FILES)])
def test_round_trip(plan: Plan) -> None:
    data = plan_to_dict(plan)
    assert parse_plan(data) == plan
    assert parse_plan(json.loads(json.dumps(data))) == plan


def test_to_dict_leaves_out_unset_fields() -> None:
    plan = parse_plan({"start_step": "a", "steps": {"a": {
        "action": "fan_out", "topic": None, "dependencies": [], "params": {},
        "sub_tasks": [{"step_name": "s"}]}}})
    assert plan_to_dict(plan) == {
        "start_step": "a", "steps": {"a": {"action": "fan_out",
                                           "sub_tasks": [{"step_name": "s"}]}}}


# ---------------------------------------------------------------------------- schema


def _validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_schema_accepts_the_examples(path: Path) -> None:
    import yaml

    _validator().validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def test_schema_accepts_the_full_plan() -> None:
    _validator().validate(plan_to_dict(FULL))


@pytest.mark.parametrize(
    "data",
    [
        {"start_step": "a", "steps": {"a": {"action": "noop"}}, "extra": 1},
        {"start_step": "a", "steps": {"a": {"action": "noop", "nxt_step": "b"}}},
        {"start_step": "a", "steps": {"a": {"action": "fan_out", "sub_tasks": [{"x": 1}]}}},
        {"start_step": "a", "steps": {"a": {"action": "noop", "dependencies": "b"}}},
        {"start_step": "a", "steps": {}},
        {"steps": {"a": {"action": "noop"}}},
    ],
)
def test_schema_rejects_what_the_parser_rejects(data: dict[str, Any]) -> None:
    assert list(_validator().iter_errors(data))
    assert problems_of(data)


def test_schema_fields_match_the_model_and_are_described() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    objects = [(schema, Plan, PLAN_FIELDS), (schema["$defs"]["step"], Step, STEP_FIELDS),
               (schema["$defs"]["sub_task"], SubTask, SUB_TASK_FIELDS)]
    for obj, model, fields in objects:
        names = {f.name for f in dataclasses.fields(model)}
        assert set(obj["properties"]) == names == set(fields)
        assert obj["additionalProperties"] is False
        assert obj["description"]
        assert all(prop["description"] for prop in obj["properties"].values())
