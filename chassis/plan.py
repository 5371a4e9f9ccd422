"""The workflow plan model: the original Go platform's format, plus ``params``.

A plan is ``start_step`` and ``steps`` (step name → :class:`Step`). Field names are the
original's. Parsing is strict: unknown fields and wrong types are errors, and every
problem is collected and reported at once, each naming its place
(``steps.generate.dependencies: ...``). ``null`` and, as in the original's JSON, ``""``
for an optional name (``topic``, ``next_step``, a sub-task's ``action``) mean unset.

Parsing checks the *shape* of a plan; :mod:`chassis.validation` checks its meaning
(references, cycles, actions). A missing ``action`` is therefore not a parse problem:
it parses as ``""`` and validation reports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chassis.errors import PlanError, PlanFileError

#: Actions the coordinator carries out itself; they never run as a Celery task.
FAN_OUT = "fan_out"
PAUSE = "pause_for_human_input"
COMPLETE = "complete_workflow"
RESERVED_ACTIONS = frozenset({FAN_OUT, PAUSE, COMPLETE})


@dataclass(frozen=True)
class SubTask:
    """One branch of a ``fan_out`` step."""

    step_name: str
    """Name its output is stored under."""
    topic: str | None = None
    """Kafka topic of an external agent; unset means a Celery action."""
    action: str | None = None
    """Action to run; defaults to ``step_name``."""
    params: dict[str, Any] = field(default_factory=dict)
    """Handed to the action."""

    @property
    def resolved_action(self) -> str:
        return self.action or self.step_name


@dataclass(frozen=True)
class Step:
    """One step of a plan."""

    action: str
    description: str = ""
    topic: str | None = None
    """Kafka topic of an external agent; unset means a Celery action."""
    dependencies: tuple[str, ...] = ()
    """Step names whose outputs must be present before this step runs."""
    next_step: str | None = None
    sub_tasks: tuple[SubTask, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A workflow plan."""

    start_step: str
    steps: dict[str, Step]
    name: str | None = None
    description: str | None = None


# ------------------------------------------------------------------------ field docs
# One table of fields per object: the parser's allowed keys and the schema's
# descriptions come from here, so the two cannot drift apart.

PLAN_FIELDS: Mapping[str, str] = {
    "name": "Human-readable name of the plan.",
    "description": "What the workflow does.",
    "start_step": "Name of the step the workflow starts with.",
    "steps": "The steps, by step name. A step's output is stored under its name.",
}
STEP_FIELDS: Mapping[str, str] = {
    "action": "What the step does: a registered action, an external agent's action "
    "(with topic), or fan_out, pause_for_human_input or complete_workflow.",
    "description": "What the step is for; shown when the workflow pauses for approval.",
    "topic": "Kafka topic of an external agent that carries out the action; "
    "unset means a Celery action of this process.",
    "dependencies": "Names of steps whose outputs must be present before this step runs.",
    "next_step": "Name of the step that runs after this one; unset ends the workflow.",
    "sub_tasks": "For fan_out: the branches run in parallel.",
    "params": "Parameters handed to the action.",
}
SUB_TASK_FIELDS: Mapping[str, str] = {
    "step_name": "Name the sub-task's output is stored under; unique within the plan.",
    "topic": "Kafka topic of an external agent; unset means a Celery action.",
    "action": "Action to run; defaults to step_name.",
    "params": "Parameters handed to the action.",
}


# --------------------------------------------------------------------------- parsing

def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "mapping", list: "list", str: "str", bool: "bool", int: "int",
            float: "float"}.get(type(value), type(value).__name__)


class _Reader:
    """Collects problems while reading one plan."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, place: str, text: str) -> None:
        self.problems.append(f"{place}: {text}")

    def fields(self, place: str, data: Mapping[Any, Any], allowed: Mapping[str, str]) -> None:
        for key in data:
            if key not in allowed:
                self.problem(place, f"unknown field {key!r}")

    def text(self, place: str, value: object, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            self.problem(place, f"expected a string, got {_type_name(value)}")
            return default
        return value

    def name(self, place: str, value: object) -> str | None:
        """An optional name: null and "" mean unset."""
        return self.text(place, value) or None

    def names(self, place: str, value: object) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problem(place, f"expected a list of step names, got {_type_name(value)}")
            return ()
        good = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                good.append(item)
            else:
                self.problem(f"{place}[{i}]", f"expected a step name, got {_type_name(item)}")
        return tuple(good)

    def params(self, place: str, value: object) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(place, f"expected a mapping, got {_type_name(value)}")
            return {}
        bad = _first_non_json(value, place)
        if bad is not None:
            self.problem(*bad)
            return {}
        return dict(value)

    def sub_task(self, place: str, data: object) -> SubTask | None:
        if not isinstance(data, dict):
            self.problem(place, f"expected a sub-task mapping, got {_type_name(data)}")
            return None
        self.fields(place, data, SUB_TASK_FIELDS)
        return SubTask(
            step_name=self.text(f"{place}.step_name", data.get("step_name")),
            topic=self.name(f"{place}.topic", data.get("topic")),
            action=self.name(f"{place}.action", data.get("action")),
            params=self.params(f"{place}.params", data.get("params")),
        )

    def step(self, place: str, data: object) -> Step | None:
        if not isinstance(data, dict):
            self.problem(place, f"expected a step mapping, got {_type_name(data)}")
            return None
        self.fields(place, data, STEP_FIELDS)
        return Step(
            action=self.text(f"{place}.action", data.get("action")),
            description=self.text(f"{place}.description", data.get("description")),
            topic=self.name(f"{place}.topic", data.get("topic")),
            dependencies=self.names(f"{place}.dependencies", data.get("dependencies")),
            next_step=self.name(f"{place}.next_step", data.get("next_step")),
            sub_tasks=self.sub_tasks(f"{place}.sub_tasks", data.get("sub_tasks")),
            params=self.params(f"{place}.params", data.get("params")),
        )

    def sub_tasks(self, place: str, value: object) -> tuple[SubTask, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problem(place, f"expected a list of sub-tasks, got {_type_name(value)}")
            return ()
        subs = (self.sub_task(f"{place}[{i}]", item) for i, item in enumerate(value))
        return tuple(sub for sub in subs if sub is not None)


def _first_non_json(value: object, place: str) -> tuple[str, str] | None:
    """(place, problem) of the first value that JSON cannot carry, or None."""
    if value is None or isinstance(value, str | int | float | bool):
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            bad = _first_non_json(item, f"{place}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return place, f"keys must be strings, got {_type_name(key)} {key!r}"
            bad = _first_non_json(item, f"{place}.{key}")
            if bad:
                return bad
        return None
    return place, f"{_type_name(value)} is not a JSON value"


def parse_plan_partial(data: object) -> tuple[Plan | None, list[str]]:
    """Read a plan as far as possible: ``(plan, problems)``.

    ``plan`` is None when the shape is too broken to check its meaning (no start step,
    no steps, a step that is not a mapping); otherwise fields with problems are left
    unset in it, so :func:`chassis.validation.validate` can still report the rest.
    """
    r = _Reader()
    if not isinstance(data, dict):
        r.problem("plan", f"expected a mapping with start_step and steps, got "
                          f"{_type_name(data)}")
        return None, r.problems
    r.fields("plan", data, PLAN_FIELDS)
    name = r.name("name", data.get("name"))
    description = r.text("description", data.get("description"), "") or None
    start = data.get("start_step")
    if start is None or start == "":
        r.problem("plan", "missing required field 'start_step'")
    start_step = r.text("start_step", start)
    raw_steps = data.get("steps")
    steps: dict[str, Step] = {}
    complete = bool(start_step)
    if raw_steps is None:
        r.problem("plan", "missing required field 'steps'")
        complete = False
    elif not isinstance(raw_steps, dict):
        r.problem("steps", f"expected a mapping of step name to step, "
                           f"got {_type_name(raw_steps)}")
        complete = False
    elif not raw_steps:
        r.problem("steps", "must have at least one step")
        complete = False
    else:
        for key, raw in raw_steps.items():
            if not isinstance(key, str) or not key:
                r.problem("steps", f"step names must be non-empty strings, got {key!r}")
                complete = False
                continue
            step = r.step(f"steps.{key}", raw)
            if step is None:
                complete = False
            else:
                steps[key] = step
    if not complete:
        return None, r.problems
    return Plan(start_step, steps, name, description), r.problems


def parse_plan(data: object) -> Plan:
    """Parse a plan from decoded JSON/YAML; :class:`PlanError` lists every problem."""
    plan, problems = parse_plan_partial(data)
    if problems or plan is None:
        raise PlanError("plan is invalid", problems)
    return plan


# --------------------------------------------------------------------------- loading

class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys: a repeated step name would silently
    replace the first step."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_plan_data(text: str, source: str = "<string>") -> dict[str, Any]:
    """Decode plan text (JSON, else YAML); :class:`PlanFileError` when it is neither
    or its top level is not a mapping."""
    try:
        data: object = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as json_exc:
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as yaml_exc:
            if text.lstrip().startswith(("{", "[")):
                reason = f"invalid JSON: {json_exc}"
            else:
                reason = f"invalid YAML: {_yaml_reason(yaml_exc)}"
            raise PlanFileError(f"{source}: not a JSON or YAML plan ({reason})") from None
    except ValueError as exc:  # a duplicate key
        raise PlanFileError(f"{source}: invalid JSON: {exc}") from None
    if data is None:
        raise PlanFileError(f"{source}: empty file, expected a plan with start_step and steps")
    if not isinstance(data, dict):
        raise PlanFileError(f"{source}: expected a mapping with start_step and steps at the "
                            f"top level, got {_type_name(data)}")
    return data


def _yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(exc).replace("\n", " ")


def load_plan_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and decode a plan file; :class:`PlanFileError` says clearly what is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanFileError(f"{path}: no such plan file") from None
    except IsADirectoryError:
        raise PlanFileError(f"{path}: is a directory, expected a plan file") from None
    except UnicodeDecodeError:
        raise PlanFileError(f"{path}: not a text file (expected UTF-8 JSON or YAML)") from None
    except OSError as exc:
        raise PlanFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return loads_plan_data(text, str(path))


def loads_plan(text: str, source: str = "<string>") -> Plan:
    """Parse plan text (JSON or YAML)."""
    return _parsed(loads_plan_data(text, source), source)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Parse a plan file (JSON or YAML)."""
    return _parsed(load_plan_data(path), str(path))


def _parsed(data: object, source: str) -> Plan:
    plan, problems = parse_plan_partial(data)
    if problems or plan is None:
        raise PlanError(f"{source}: plan is invalid", problems)
    return plan


# ------------------------------------------------------------------------- rendering

def _sub_task_to_dict(st: SubTask) -> dict[str, Any]:
    out: dict[str, Any] = {"step_name": st.step_name}
    if st.topic is not None:
        out["topic"] = st.topic
    if st.action is not None:
        out["action"] = st.action
    if st.params:
        out["params"] = dict(st.params)
    return out


def _step_to_dict(step: Step) -> dict[str, Any]:
    out: dict[str, Any] = {"action": step.action}
    if step.description:
        out["description"] = step.description
    if step.topic is not None:
        out["topic"] = step.topic
    if step.dependencies:
        out["dependencies"] = list(step.dependencies)
    if step.next_step is not None:
        out["next_step"] = step.next_step
    if step.sub_tasks:
        out["sub_tasks"] = [_sub_task_to_dict(st) for st in step.sub_tasks]
    if step.params:
        out["params"] = dict(step.params)
    return out


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data, unset fields left out; ``parse_plan`` reads it back."""
    out: dict[str, Any] = {}
    if plan.name is not None:
        out["name"] = plan.name
    if plan.description is not None:
        out["description"] = plan.description
    out["start_step"] = plan.start_step
    out["steps"] = {name: _step_to_dict(step) for name, step in plan.steps.items()}
    return out


# --------------------------------------------------------------------------- schema

def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the plan format, for editors and other languages."""
    optional_name: dict[str, Any] = {"type": ["string", "null"]}
    params = {"type": ["object", "null"]}

    def props(fields: Mapping[str, str], types: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        return {key: {**types[key], "description": doc} for key, doc in fields.items()}

    sub_task = {
        "type": "object",
        "description": "One branch of a fan_out step.",
        "additionalProperties": False,
        "required": ["step_name"],
        "properties": props(SUB_TASK_FIELDS, {
            "step_name": {"type": "string", "minLength": 1},
            "topic": optional_name, "action": optional_name, "params": params,
        }),
    }
    step = {
        "type": "object",
        "description": "One step of the plan.",
        "additionalProperties": False,
        "required": ["action"],
        "properties": props(STEP_FIELDS, {
            "action": {"type": "string", "minLength": 1},
            "description": {"type": ["string", "null"]},
            "topic": optional_name,
            "dependencies": {"type": ["array", "null"], "items": {"type": "string"}},
            "next_step": optional_name,
            "sub_tasks": {"type": ["array", "null"], "items": {"$ref": "#/$defs/sub_task"}},
            "params": params,
        }),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:agentchassis:plan",
        "title": "agentchassis workflow plan",
        "description": "A workflow: a start step and the steps, by name.",
        "type": "object",
        "additionalProperties": False,
        "required": ["start_step", "steps"],
        "properties": props(PLAN_FIELDS, {
            "name": {"type": ["string", "null"]},
            "description": {"type": ["string", "null"]},
            "start_step": {"type": "string", "minLength": 1},
            "steps": {"type": "object", "minProperties": 1,
                      "propertyNames": {"minLength": 1},
                      "additionalProperties": {"$ref": "#/$defs/step"}},
        }),
        "$defs": {"step": step, "sub_task": sub_task},
    }


__all__ = [
    "COMPLETE", "FAN_OUT", "PAUSE", "RESERVED_ACTIONS", "Plan", "Step", "SubTask",
    "json_schema", "load_plan", "load_plan_data", "loads_plan", "loads_plan_data",
    "parse_plan", "parse_plan_partial", "plan_to_dict",
]
