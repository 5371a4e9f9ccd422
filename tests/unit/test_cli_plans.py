"""``chassis validate`` and ``chassis schema`` (chassis.cli.plans)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner, Result

from chassis import actions
from chassis.cli import main
from chassis.plan import json_schema
from tests.unit.test_validation import FOUR_PROBLEMS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BLOG = EXAMPLES / "blog_post.yaml"
RESEARCH = EXAMPLES / "research_assistant.yaml"



def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def assert_four_problems(lines: list[str]) -> None:
    assert len(lines) == 4
    assert lines[0] == "steps.c: next_step 'nowhere' names no step"
    assert lines[1].startswith(
        "steps.d: action 'summarize' is not registered in this process and has no topic")
    assert lines[2] == "steps.e: fan_out needs at least one sub-task"
    assert lines[3] == "cycle: a -> b -> a"


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (BLOG, "valid — 4 steps, 1 fan-out step, 0 external calls, max depth 4"),
        (RESEARCH, "valid — 3 steps, 0 fan-out steps, 0 external calls, max depth 3"),
    ],
)
def test_examples_are_valid(path: Path, line: str) -> None:
    result = run("validate", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: {line}\n"
    assert result.stderr == ""


def test_invalid_plan_lists_every_problem(tmp_path: Path) -> None:
    result = run("validate", str(write(tmp_path / "bad.yaml", FOUR_PROBLEMS)))
    assert result.exit_code == 1
    assert_four_problems(result.stdout.splitlines())


def test_invalid_plan_in_a_real_process(tmp_path: Path) -> None:
    chassis = Path(sys.executable).with_name("chassis")
    plan = tmp_path / "bad.json"
    plan.write_text(json.dumps(FOUR_PROBLEMS), encoding="utf-8")
    done = subprocess.run([str(chassis), "validate", str(plan)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert_four_problems(done.stdout.splitlines())


def test_parse_and_validation_problems_together(tmp_path: Path) -> None:
    data = {"start_step": "a", "steps": {
        "a": {"action": "echo", "nxt_step": "b", "dependencies": "b"},
        "b": {"action": "complete_workflow", "next_step": "a"},
    }}
    result = run("validate", str(write(tmp_path / "p.yaml", data)))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "steps.a: unknown field 'nxt_step'",
        "steps.a.dependencies: expected a list of step names, got str",
        "steps.b: complete_workflow must not have a next_step",
    ]


def test_only_parse_problems_when_the_shape_is_broken(tmp_path: Path) -> None:
    result = run("validate", str(write(tmp_path / "p.yaml", {"steps": {"a": "echo"}, "x": 1})))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "plan: unknown field 'x'",
        "plan: missing required field 'start_step'",
        "steps.a: expected a step mapping, got str",
    ]


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    return lines[0]


def test_missing_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    assert one_error_line(run("validate", str(path))) == f"error: {path}: no such plan file"


def test_directory_exits_2(tmp_path: Path) -> None:
    assert "is a directory" in one_error_line(run("validate", str(tmp_path)))


@pytest.mark.parametrize("text", ["steps: [a\n  b: {\n", "just words\n", "\x00\x01: [\n"])
def test_not_a_yaml_plan_exits_2(tmp_path: Path, text: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text, encoding="utf-8")
    assert str(path) in one_error_line(run("validate", str(path)))


def test_json_output_of_a_valid_plan() -> None:
    result = run("validate", "--json", str(BLOG))
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "valid": True, "problems": [],
        "metrics": {"steps": 4, "fan_out_steps": 1, "external_calls": 0, "max_depth": 4,
                    "sub_tasks": 2}}


def test_json_output_of_an_invalid_plan(tmp_path: Path) -> None:
    result = run("validate", "--json", str(write(tmp_path / "bad.yaml", FOUR_PROBLEMS)))
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["valid"] is False
    assert_four_problems(out["problems"])
    assert out["metrics"]["steps"] == 5


def test_json_output_when_the_shape_is_broken(tmp_path: Path) -> None:
    result = run("validate", "--json", str(write(tmp_path / "p.yaml", {"start_step": "a"})))
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "valid": False, "problems": ["plan: missing required field 'steps'"], "metrics": None}


@pytest.fixture
def actions_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user module that registers ``summarize``."""
    module = f"user_actions_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(
        "from chassis.actions import action\n\n"
        "@action\n"
        "def summarize(data, params):\n"
        "    return {}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module
    actions.unregister("summarize")
    sys.modules.pop(module, None)


def test_actions_module_registers_actions_before_validating(
    tmp_path: Path, actions_module: str
) -> None:
    plan = write(tmp_path / "p.yaml", {"start_step": "d", "steps": {
        "d": {"action": "summarize", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    result = run("validate", "--actions-module", actions_module, str(plan))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{plan}: valid — 2 steps")


def test_actions_module_that_cannot_be_imported_exits_2() -> None:
    line = one_error_line(run("validate", "--actions-module", "no_such_mod", str(BLOG)))
    assert "cannot import actions module 'no_such_mod'" in line


def test_schema_prints_the_json_schema() -> None:
    result = run("schema")
    assert result.exit_code == 0
    assert result.stdout.startswith('{\n  "$schema"')
    schema = json.loads(result.stdout)
    assert schema == json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    for path in (BLOG, RESEARCH):
        validator.validate(yaml.safe_load(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("command", ["validate", "schema"])
def test_every_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    cmd = main.commands[command]
    assert cmd.help and cmd.help.splitlines()[0] in result.stdout
    assert all(getattr(p, "help", None) for p in cmd.params if p.param_type_name == "option")
