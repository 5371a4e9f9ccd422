"""Bad plan files are refused quickly and clearly: a YAML alias bomb, custom tags, NaN,
Infinity, NUL, lone surrogates, over-long names, deep nesting, endless files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from chassis.cli import main
from chassis.errors import PlanFileError
from chassis.limits import Limits
from chassis.plan import load_plan_data, loads_plan_data

pytestmark = pytest.mark.timeout(60)

STEP = "start_step: a\nsteps:\n  a:\n    action: echo\n"


def refused(text: str, match: str) -> None:
    began = time.monotonic()
    with pytest.raises(PlanFileError, match=match):
        loads_plan_data(text, "p.yaml")
    assert time.monotonic() - began < 5


def test_a_yaml_alias_bomb_is_refused_at_once() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
    refused("\n".join(levels) + "\n" + STEP, "more than 100 aliases")
    # fewer aliases, nested, still too much: refused by size, not expanded
    few = ["b0: &b0 [" + ", ".join(["xxxxxxxx"] * 200) + "]"]
    few += [f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 9) + "]" for i in range(1, 11)]
    refused("\n".join(few) + "\n" + STEP, "more than")


@pytest.mark.parametrize("value, match", [
    ("!!int x", "invalid YAML"),
    ("!!timestamp x", "not allowed in a plan"),
    ("!!binary aGk=", "not allowed in a plan"),
    ("!!python/object:os.system x", "not allowed in a plan|could not determine"),
    (".nan", "nan at steps.a.params.v is not a JSON number"),
    (".inf", "inf at steps.a.params.v is not a JSON number"),
])
def test_yaml_values_json_cannot_carry(value: str, match: str) -> None:
    refused(f"{STEP}    params: {{v: {value}}}\n", match)


@pytest.mark.parametrize("text, match", [
    ('{"start_step": "a", "steps": {"a": {"action": "echo", "params": {"v": NaN}}}}',
     "NaN is not a JSON number"),
    ('{"start_step": "a", "steps": {"a": {"action": "echo", "params": {"v": Infinity}}}}',
     "Infinity is not a JSON number"),
    ('{"start_step": "a", "steps": {"a": {"action": "echo", "params": {"v": "\\u0000"}}}}',
     "NUL character at steps.a.params.v"),
    ('{"start_step": "a", "steps": {"a": {"action": "echo", "params": {"v": "\\ud800"}}}}',
     "lone surrogate at steps.a.params.v"),
    ('{"start_step": "a", "steps": {"a": {"action": "echo", "params": {"v": '
     + "[" * 100 + "]" * 100 + "}}}}", "nested more than 64 levels"),
    ('{"start_step": "a", "steps": {"a": {"action": "echo", "params": {"v": 1'
     + "0" * 5000 + "}}}}", "invalid JSON"),
])
def test_json_values_json_cannot_carry(text: str, match: str) -> None:
    refused(text, match)


def test_deep_yaml_and_a_huge_document_are_refused() -> None:
    refused(STEP + "    params: {v: " + "[" * 500 + "]" * 500 + "}\n",
            "nested more than 64 levels|invalid YAML")
    refused(STEP + "    params: {v: '" + "x" * 2_000_000 + "'}\n", "more than the 1048576")


def test_an_endless_file_is_read_only_up_to_the_limit(tmp_path: Path) -> None:
    began = time.monotonic()
    with pytest.raises(PlanFileError, match="larger than the 2048 bytes"):
        load_plan_data("/dev/zero", Limits(max_bytes=2048))
    assert time.monotonic() - began < 5
    result = CliRunner().invoke(main, ["validate", "/dev/zero"])
    assert result.exit_code == 2 and "larger than the 1048576 bytes" in result.output


def test_names_over_255_characters_and_control_characters(tmp_path: Path) -> None:
    long = "s" * 256
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"start_step": long, "steps": {
        long: {"action": "echo"}, "b": {"action": "e\u0001cho", "topic": "t" * 300}}}))
    result = CliRunner().invoke(main, ["validate", str(plan)])
    assert result.exit_code == 1, result.output
    assert "start_step: 256 characters, more than 255" in result.output
    assert "steps.b.action: must not contain control characters" in result.output
    assert "steps.b.topic: 300 characters, more than 255" in result.output
    assert "Traceback" not in result.output


def test_too_many_steps(tmp_path: Path) -> None:
    steps = {f"s{i}": {"action": "echo"} for i in range(10_001)}
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"start_step": "s0", "steps": steps}))
    result = CliRunner().invoke(main, ["validate", str(plan)])
    assert result.exit_code == 1 and "10001 steps, more than 10000" in result.output


def test_too_many_sub_tasks_says_so_and_only_that(tmp_path: Path) -> None:
    subs = [{"step_name": f"b{i}", "action": "echo"} for i in range(10_001)]
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"start_step": "f", "steps": {
        "f": {"action": "fan_out", "sub_tasks": subs, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}))
    result = CliRunner().invoke(main, ["validate", str(plan)])
    assert result.exit_code == 1 and "10001 sub-tasks, more than 10000" in result.output
    assert "at least one sub-task" not in result.output
