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
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from chassis.errors import InputError, PlanError, PlanFileError
from chassis.limits import DEFAULT, NAME_MAX, Limits, check_json, no_constant, unique_keys
from chassis.policy import (
    ERROR_NAME,
    ERROR_NAME_MAX,
    MAX_ATTEMPTS_LIMIT,
    MAX_NON_RETRYABLE,
    MAX_SECONDS,
    RETRY_FIELDS,
    RetryOptions,
    RetryPolicy,
    last_timeout,
    resolve,
)
from chassis.state import compensated_step, compensation_of

#: Most steps in a plan, and most sub-tasks in a fan_out.
MAX_STEPS = 10_000
#: Longest description; names (steps, actions, topics) are at most NAME_MAX.
DESCRIPTION_MAX = 10_000
#: Most YAML aliases (``*anchor``) in a plan file: each may copy a whole subtree.
MAX_ALIASES = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: Actions the coordinator carries out itself; they never run as a Celery task.
FAN_OUT = "fan_out"
PAUSE = "pause_for_human_input"
COMPLETE = "complete_workflow"
RESERVED_ACTIONS = frozenset({FAN_OUT, PAUSE, COMPLETE})


#: How a compensation is retried unless its ``compensate.retry`` says otherwise: undo
#: must happen, so several attempts with backoff (about 30 s in all).
COMPENSATE_RETRY = RetryOptions(max_attempts=5, initial_interval=1.0,
                                backoff_coefficient=2.0, max_interval=30.0)


@dataclass(frozen=True)
class Compensate:
    """How a completed step (or sub-task) is undone when the workflow fails or is
    cancelled with compensation: an action of this process, or an external agent's."""

    action: str
    topic: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    retry: RetryOptions | None = None
    """Merged over :data:`COMPENSATE_RETRY` (not over the plan's defaults)."""
    timeout: float | None = None
    """Unset: the step's own timeout."""


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
    retry: RetryOptions | None = None
    """How failed attempts are retried (merged over the fan_out step's and the plan's)."""
    timeout: float | None = None
    """Seconds one attempt may run (or an agent take to answer)."""
    compensate: Compensate | None = None
    """How the sub-task is undone (its siblings' compensations run in parallel)."""

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
    retry: RetryOptions | None = None
    """How failed attempts are retried (merged over ``defaults.retry``); on a fan_out
    step, the default of its sub-tasks."""
    timeout: float | None = None
    """Seconds one attempt may run (or an agent take to answer); on a fan_out step, the
    default of its sub-tasks."""
    compensate: Compensate | None = None
    """How the step is undone once it has completed, should the workflow fail."""
    on_failure: str | None = None
    """The step to go on at when this step's attempts are exhausted (on a fan_out: a
    sub-task's), instead of failing; it sees ``error``."""


@dataclass(frozen=True)
class Defaults:
    """Plan-level settings for every step that sets nothing."""

    retry: RetryOptions | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class Plan:
    """A workflow plan."""

    start_step: str
    steps: dict[str, Step]
    name: str | None = None
    description: str | None = None
    defaults: Defaults = field(default_factory=Defaults)
    on_budget_exhausted: str = "fail"
    """``fail`` or ``pause``: what a workflow does when its fuel runs out."""

    @cached_property
    def _owners(self) -> dict[str, tuple[str, SubTask]]:
        """Sub-task step_name → (its fan_out step, the sub-task)."""
        out: dict[str, tuple[str, SubTask]] = {}
        for name, step in self.steps.items():
            for st in step.sub_tasks:
                out.setdefault(st.step_name, (name, st))
        return out

    def subtask(self, name: str) -> tuple[str, SubTask] | None:
        """(fan_out step, sub-task) of a sub-task's step_name; None for a step."""
        return self._owners.get(name)

    def neighbours(self, name: str) -> list[str]:
        """The steps (and sub-tasks) a decision about step or sub-task ``name`` is
        likely to touch: itself, its compensation, where it goes on (next, on failure)
        and those steps' sub-tasks. A worker reads their attempts with its claim."""
        names = {name, compensation_of(name)}
        owned = self.subtask(name)
        if owned is not None:  # its fan-out and siblings (a failure may end them)
            names.add(owned[0])
            names.update(st.step_name for st in self.steps[owned[0]].sub_tasks)
        step = self.steps.get(owned[0] if owned else name)
        if step is not None:
            for target in (step.next_step, step.on_failure):
                if target:
                    names.add(target)
                    after = self.steps.get(target)
                    if after is not None:
                        names.update(st.step_name for st in after.sub_tasks)
        return sorted(names)

    def compensation(self, name: str) -> Compensate | None:
        """The ``compensate`` of a step or sub-task (None when it has none)."""
        owned = self.subtask(name)
        if owned is not None:
            return owned[1].compensate
        step = self.steps.get(name)
        return step.compensate if step is not None else None

    def compensations(self) -> list[Compensate]:
        """Every ``compensate`` of the plan's steps and sub-tasks."""
        out = [s.compensate for s in self.steps.values() if s.compensate is not None]
        out += [t.compensate for s in self.steps.values() for t in s.sub_tasks
                if t.compensate is not None]
        return out

    def work(self, name: str) -> tuple[str, str | None, dict[str, Any]]:
        """(action, topic, params) of a step, a sub-task or a compensation."""
        undone = compensated_step(name)
        if undone is not None:
            comp = self.compensation(undone)
            if comp is None:
                raise KeyError(name)
            return comp.action, comp.topic, comp.params
        owned = self.subtask(name)
        if owned is not None:
            st = owned[1]
            return st.resolved_action, st.topic, st.params
        step = self.steps[name]
        return step.action, step.topic, step.params

    def policy(self, name: str) -> RetryPolicy:
        """The retry policy of a step, sub-task or compensation, its layers merged."""
        undone = compensated_step(name)
        if undone is not None:
            comp = self.compensation(undone)
            return resolve((COMPENSATE_RETRY, comp.retry if comp else None))
        owned = self.subtask(name)
        if owned is not None:
            return resolve((self.defaults.retry, self.steps[owned[0]].retry, owned[1].retry))
        step = self.steps.get(name)
        return resolve((self.defaults.retry, step.retry if step else None))

    def timeout(self, name: str) -> float | None:
        """Seconds one attempt of a step, sub-task or compensation may take; None when
        unset."""
        undone = compensated_step(name)
        if undone is not None:
            comp = self.compensation(undone)
            if comp is not None and comp.timeout is not None:
                return comp.timeout
            return self.timeout(undone)
        owned = self.subtask(name)
        if owned is not None:
            return last_timeout((self.defaults.timeout, self.steps[owned[0]].timeout,
                                 owned[1].timeout))
        step = self.steps.get(name)
        return last_timeout((self.defaults.timeout, step.timeout if step else None))


# ------------------------------------------------------------------------ field docs
# One table of fields per object: the parser's allowed keys and the schema's
# descriptions come from here, so the two cannot drift apart.

PLAN_FIELDS: Mapping[str, str] = {
    "name": "Human-readable name of the plan.",
    "description": "What the workflow does.",
    "start_step": "Name of the step the workflow starts with.",
    "steps": "The steps, by step name. A step's output is stored under its name.",
    "defaults": "Settings for every step that sets nothing: retry, timeout.",
    "on_budget_exhausted": "What happens when a step's fuel (or its client's quota) runs "
                           "out: fail (the default) or pause (for fuel to be added and "
                           "an approval).",
}
#: Values of a plan's ``on_budget_exhausted``.
BUDGET_CHOICES = ("fail", "pause")
DEFAULTS_FIELDS: Mapping[str, str] = {
    "retry": "Retry policy of every step (a step's own retry is merged over it).",
    "timeout": "Seconds one attempt of a step may run (or an agent take to answer).",
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
    "retry": "Retry policy of failed attempts, merged over defaults.retry (on a fan_out "
             "step: the default of its sub-tasks).",
    "timeout": "Seconds one attempt may run, or an external agent take to answer; a "
               "later result is ignored (on a fan_out step: the default of its sub-tasks; "
               "on a pause_for_human_input: how long its approval may wait before it "
               "expires, unset: for ever).",
    "compensate": "How the step is undone once completed, should the workflow fail (or be "
                  "cancelled with compensation): {action, params} or {action, topic}.",
    "on_failure": "Step to go on at when this step's attempts are exhausted (on a "
                  "fan_out: a sub-task's; on a pause_for_human_input: when its approval "
                  "expires); it sees error = {step, message, attempts}.",
}
SUB_TASK_FIELDS: Mapping[str, str] = {
    "step_name": "Name the sub-task's output is stored under; unique within the plan.",
    "topic": "Kafka topic of an external agent; unset means a Celery action.",
    "action": "Action to run; defaults to step_name.",
    "params": "Parameters handed to the action.",
    "retry": "Retry policy of failed attempts, merged over the fan_out step's and "
             "defaults.retry.",
    "timeout": "Seconds one attempt may run, or an external agent take to answer.",
    "compensate": "How the sub-task is undone once completed, should the workflow fail: "
                  "{action, params} or {action, topic}.",
}
COMPENSATE_FIELDS: Mapping[str, str] = {
    "action": "The action that undoes the step: registered in this process, or an "
              "external agent's (with topic).",
    "topic": "Kafka topic of an external agent that carries out the compensation.",
    "params": "Parameters handed to the action (its data: the step's, with output and "
              "error).",
    "retry": "Retry policy of the compensation (default: 5 attempts, 1 s doubling up to "
             "30 s).",
    "timeout": "Seconds one attempt may run (default: the step's timeout).",
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

    def text(self, place: str, value: object, default: str = "",
             max_length: int = DESCRIPTION_MAX) -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            self.problem(place, f"expected a string, got {_type_name(value)}")
            return default
        if len(value) > max_length:
            self.problem(place, f"{len(value)} characters, more than {max_length}")
            return default
        return value

    def ident(self, place: str, value: object) -> str:
        """A name (step, action, topic): at most 255 characters, no control characters;
        "" when unset or refused."""
        text = self.text(place, value, max_length=NAME_MAX)
        if text and _CONTROL.search(text):
            self.problem(place, "must not contain control characters")
            return ""
        return text

    def name(self, place: str, value: object) -> str | None:
        """An optional name: null and "" mean unset."""
        return self.ident(place, value) or None

    def names(self, place: str, value: object) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problem(place, f"expected a list of step names, got {_type_name(value)}")
            return ()
        good = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                if self.ident(f"{place}[{i}]", item):
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

    def seconds(self, place: str, value: object) -> float | None:
        """An optional positive number of seconds (at most a week)."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(place, f"expected a number of seconds, got {_type_name(value)}")
            return None
        if not math.isfinite(value) or value <= 0:
            self.problem(place, f"must be a positive number of seconds, got {value!r}")
            return None
        if value > MAX_SECONDS:
            self.problem(place, f"must be at most {MAX_SECONDS:g} seconds (a week), "
                                f"got {value!r}")
            return None
        return float(value)

    def retry(self, place: str, value: object) -> RetryOptions | None:
        """An optional retry policy mapping; every bad field is a problem."""
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(place, f"expected a retry mapping, got {_type_name(value)}")
            return None
        self.fields(place, value, RETRY_FIELDS)
        attempts = value.get("max_attempts")
        if attempts is not None:
            if isinstance(attempts, bool) or not isinstance(attempts, int):
                self.problem(f"{place}.max_attempts",
                             f"expected a whole number, got {_type_name(attempts)}")
                attempts = None
            elif not 1 <= attempts <= MAX_ATTEMPTS_LIMIT:
                self.problem(f"{place}.max_attempts", f"must be from 1 to "
                                                      f"{MAX_ATTEMPTS_LIMIT}, got {attempts}")
                attempts = None
        coefficient = value.get("backoff_coefficient")
        if coefficient is not None:
            if isinstance(coefficient, bool) or not isinstance(coefficient, int | float):
                self.problem(f"{place}.backoff_coefficient",
                             f"expected a number, got {_type_name(coefficient)}")
                coefficient = None
            elif not (math.isfinite(coefficient) and 1 <= coefficient <= 100):
                self.problem(f"{place}.backoff_coefficient",
                             f"must be from 1 to 100, got {coefficient!r}")
                coefficient = None
        return RetryOptions(
            max_attempts=attempts,
            initial_interval=self.seconds(f"{place}.initial_interval",
                                          value.get("initial_interval")),
            backoff_coefficient=None if coefficient is None else float(coefficient),
            max_interval=self.seconds(f"{place}.max_interval", value.get("max_interval")),
            non_retryable=self.error_names(f"{place}.non_retryable",
                                           value.get("non_retryable")),
        )

    def error_names(self, place: str, value: object) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            self.problem(place, f"expected a list of error type names, got "
                                f"{_type_name(value)}")
            return None
        if len(value) > MAX_NON_RETRYABLE:
            self.problem(place, f"at most {MAX_NON_RETRYABLE} names, got {len(value)}")
            return None
        good = []
        for i, item in enumerate(value):
            if (isinstance(item, str) and len(item) <= ERROR_NAME_MAX
                    and ERROR_NAME.match(item)):
                good.append(item)
            else:
                shown = repr(item) if isinstance(item, str) else _type_name(item)
                self.problem(f"{place}[{i}]", f"expected an error type name such as "
                                              f"ValueError, got {shown[:80]}")
        return tuple(good)

    def defaults(self, place: str, value: object) -> Defaults:
        if value is None:
            return Defaults()
        if not isinstance(value, dict):
            self.problem(place, f"expected a mapping, got {_type_name(value)}")
            return Defaults()
        self.fields(place, value, DEFAULTS_FIELDS)
        return Defaults(retry=self.retry(f"{place}.retry", value.get("retry")),
                        timeout=self.seconds(f"{place}.timeout", value.get("timeout")))

    def sub_task(self, place: str, data: object) -> SubTask | None:
        if not isinstance(data, dict):
            self.problem(place, f"expected a sub-task mapping, got {_type_name(data)}")
            return None
        self.fields(place, data, SUB_TASK_FIELDS)
        return SubTask(
            step_name=self.ident(f"{place}.step_name", data.get("step_name")),
            topic=self.name(f"{place}.topic", data.get("topic")),
            action=self.name(f"{place}.action", data.get("action")),
            params=self.params(f"{place}.params", data.get("params")),
            retry=self.retry(f"{place}.retry", data.get("retry")),
            timeout=self.seconds(f"{place}.timeout", data.get("timeout")),
            compensate=self.compensate(f"{place}.compensate", data.get("compensate")),
        )

    def compensate(self, place: str, value: object) -> Compensate | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(place, f"expected a mapping with an action, got {_type_name(value)}")
            return None
        self.fields(place, value, COMPENSATE_FIELDS)
        return Compensate(
            action=self.ident(f"{place}.action", value.get("action")),
            topic=self.name(f"{place}.topic", value.get("topic")),
            params=self.params(f"{place}.params", value.get("params")),
            retry=self.retry(f"{place}.retry", value.get("retry")),
            timeout=self.seconds(f"{place}.timeout", value.get("timeout")),
        )

    def step(self, place: str, data: object) -> Step | None:
        if not isinstance(data, dict):
            self.problem(place, f"expected a step mapping, got {_type_name(data)}")
            return None
        self.fields(place, data, STEP_FIELDS)
        return Step(
            action=self.ident(f"{place}.action", data.get("action")),
            description=self.text(f"{place}.description", data.get("description")),
            topic=self.name(f"{place}.topic", data.get("topic")),
            dependencies=self.names(f"{place}.dependencies", data.get("dependencies")),
            next_step=self.name(f"{place}.next_step", data.get("next_step")),
            sub_tasks=self.sub_tasks(f"{place}.sub_tasks", data.get("sub_tasks")),
            params=self.params(f"{place}.params", data.get("params")),
            retry=self.retry(f"{place}.retry", data.get("retry")),
            timeout=self.seconds(f"{place}.timeout", data.get("timeout")),
            compensate=self.compensate(f"{place}.compensate", data.get("compensate")),
            on_failure=self.name(f"{place}.on_failure", data.get("on_failure")),
        )

    def sub_tasks(self, place: str, value: object) -> tuple[SubTask, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.problem(place, f"expected a list of sub-tasks, got {_type_name(value)}")
            return ()
        if len(value) > MAX_STEPS:
            self.problem(place, f"{len(value)} sub-tasks, more than {MAX_STEPS}")
            value = value[:MAX_STEPS]  # (the rest is not looked at)
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
    defaults = r.defaults("defaults", data.get("defaults"))
    exhausted = data.get("on_budget_exhausted")
    if exhausted is not None and exhausted not in BUDGET_CHOICES:
        r.problem("on_budget_exhausted", f"must be fail or pause, got {exhausted!r}"[:300])
        exhausted = None
    start = data.get("start_step")
    if start is None or start == "":
        r.problem("plan", "missing required field 'start_step'")
    start_step = r.ident("start_step", start)
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
    elif len(raw_steps) > MAX_STEPS:
        r.problem("steps", f"{len(raw_steps)} steps, more than {MAX_STEPS}")
        complete = False
    else:
        for key, raw in raw_steps.items():
            if not isinstance(key, str) or not key:
                r.problem("steps", f"step names must be non-empty strings, got {key!r}"[:300])
                complete = False
                continue
            if not r.ident(f"steps.{key[:80]}", key):
                complete = False
                continue
            step = r.step(f"steps.{key}", raw)
            if step is None:
                complete = False
            else:
                steps[key] = step
    if not complete:
        return None, r.problems
    return Plan(start_step, steps, name, description, defaults,
                exhausted or "fail"), r.problems


def parse_plan(data: object, limits: Limits | None = None) -> Plan:
    """Parse a plan from decoded JSON/YAML; :class:`PlanError` lists every problem. With
    ``limits`` (a plan from outside), the document is checked against them first."""
    if limits is not None:
        try:
            check_json(data, "plan", limits)
        except InputError as exc:
            raise PlanError("plan is invalid", [str(exc)]) from None
    plan, problems = parse_plan_partial(data)
    if problems or plan is None:
        raise PlanError("plan is invalid", problems)
    return plan


# --------------------------------------------------------------------------- loading

class _PlanLoader(yaml.SafeLoader):
    """YAML for plans: the JSON types only (no ``!!timestamp``, ``!!binary``, ``!!set``;
    an unquoted date stays text), duplicate keys refused (a repeated step name would
    silently replace the first), and at most MAX_ALIASES aliases (each may copy a
    whole subtree: a few of them nested expand into billions of nodes)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases", event.start_mark)
        return super().compose_node(parent, index)

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

    def construct_undefined(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(
            None, None, f"the tag {node.tag} is not allowed in a plan (JSON types only)",
            node.start_mark)


_JSON_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "seq",
                                                   "map", "merge")}
_PlanLoader.yaml_constructors = {
    tag: fn for tag, fn in yaml.SafeLoader.yaml_constructors.items() if tag in _JSON_TAGS}
_PlanLoader.yaml_constructors[None] = _PlanLoader.construct_undefined  # type: ignore[index]
_PlanLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag in _JSON_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def loads_plan_data(text: str, source: str = "<string>",
                    limits: Limits = DEFAULT) -> dict[str, Any]:
    """Decode plan text (JSON, else YAML); :class:`PlanFileError` when it is neither,
    holds what JSON cannot (NaN, NUL, a custom tag), exceeds the limits, or its top level
    is not a mapping."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise PlanFileError(f"{source}: {size} bytes, more than the {limits.max_bytes} "
                            "allowed (CHASSIS_MAX_DOCUMENT_BYTES)")
    try:
        data: object = json.loads(text, object_pairs_hook=unique_keys,
                                  parse_constant=no_constant)
    except json.JSONDecodeError as json_exc:
        try:
            data = yaml.load(text, Loader=_PlanLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as yaml_exc:
            if text.lstrip().startswith(("{", "[")):
                reason = f"invalid JSON: {json_exc}"
            else:
                reason = f"invalid YAML: {_yaml_reason(yaml_exc)}"
            raise PlanFileError(f"{source}: not a JSON or YAML plan ({reason})") from None
        except (ValueError, TypeError, RecursionError) as exc:  # e.g. !!int x
            raise PlanFileError(f"{source}: invalid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a duplicate key, NaN, too deep
        raise PlanFileError(f"{source}: invalid JSON: {exc}") from None
    if data is None:
        raise PlanFileError(f"{source}: empty file, expected a plan with start_step and steps")
    if not isinstance(data, dict):
        raise PlanFileError(f"{source}: expected a mapping with start_step and steps at the "
                            f"top level, got {_type_name(data)}")
    try:
        check_json(data, source, limits)
    except InputError as exc:
        raise PlanFileError(str(exc)) from None
    return data


def _yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(exc).replace("\n", " ")


def load_plan_data(path: str | os.PathLike[str], limits: Limits = DEFAULT) -> dict[str, Any]:
    """Read and decode a plan file; :class:`PlanFileError` says clearly what is wrong.
    At most ``limits.max_bytes`` are read (a device such as /dev/zero is refused)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(limits.max_bytes + 1)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise PlanFileError(f"{path}: no such plan file") from None
    except IsADirectoryError:
        raise PlanFileError(f"{path}: is a directory, expected a plan file") from None
    except UnicodeDecodeError:
        raise PlanFileError(f"{path}: not a text file (expected UTF-8 JSON or YAML)") from None
    except OSError as exc:
        raise PlanFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > limits.max_bytes:
        raise PlanFileError(f"{path}: larger than the {limits.max_bytes} bytes allowed "
                            "(CHASSIS_MAX_DOCUMENT_BYTES)")
    return loads_plan_data(text, str(path), limits)


def loads_plan(text: str, source: str = "<string>") -> Plan:
    """Parse plan text (JSON or YAML)."""
    return _parsed(loads_plan_data(text, source), source)


def load_plan(path: str | os.PathLike[str], limits: Limits = DEFAULT) -> Plan:
    """Parse a plan file (JSON or YAML)."""
    return _parsed(load_plan_data(path, limits), str(path))


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
    _failure_fields(out, st.retry, st.timeout)
    if st.compensate is not None:
        out["compensate"] = _compensate_to_dict(st.compensate)
    return out


def _compensate_to_dict(c: Compensate) -> dict[str, Any]:
    out: dict[str, Any] = {"action": c.action}
    if c.topic is not None:
        out["topic"] = c.topic
    if c.params:
        out["params"] = dict(c.params)
    _failure_fields(out, c.retry, c.timeout)
    return out


def _failure_fields(out: dict[str, Any], retry: RetryOptions | None,
                    timeout: float | None) -> None:
    if retry is not None:
        out["retry"] = retry.to_dict()
    if timeout is not None:
        out["timeout"] = timeout


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
    _failure_fields(out, step.retry, step.timeout)
    if step.compensate is not None:
        out["compensate"] = _compensate_to_dict(step.compensate)
    if step.on_failure is not None:
        out["on_failure"] = step.on_failure
    return out


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data, unset fields left out; ``parse_plan`` reads it back."""
    out: dict[str, Any] = {}
    if plan.name is not None:
        out["name"] = plan.name
    if plan.description is not None:
        out["description"] = plan.description
    defaults: dict[str, Any] = {}
    _failure_fields(defaults, plan.defaults.retry, plan.defaults.timeout)
    if defaults:
        out["defaults"] = defaults
    if plan.on_budget_exhausted != "fail":
        out["on_budget_exhausted"] = plan.on_budget_exhausted
    out["start_step"] = plan.start_step
    out["steps"] = {name: _step_to_dict(step) for name, step in plan.steps.items()}
    return out


# --------------------------------------------------------------------------- schema

def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the plan format, for editors and other languages."""
    optional_name: dict[str, Any] = {"type": ["string", "null"]}
    params = {"type": ["object", "null"]}
    seconds = {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_SECONDS}

    def props(fields: Mapping[str, str], types: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        return {key: {**types[key], "description": doc} for key, doc in fields.items()}

    retry_ref = {"anyOf": [{"$ref": "#/$defs/retry"}, {"type": "null"}]}
    retry = {
        "type": "object",
        "description": "How failed attempts are retried: exponential backoff with jitter.",
        "additionalProperties": False,
        "properties": props(RETRY_FIELDS, {
            "max_attempts": {"type": ["integer", "null"], "minimum": 1,
                             "maximum": MAX_ATTEMPTS_LIMIT},
            "initial_interval": seconds,
            "backoff_coefficient": {"type": ["number", "null"], "minimum": 1,
                                    "maximum": 100},
            "max_interval": seconds,
            "non_retryable": {"type": ["array", "null"], "maxItems": MAX_NON_RETRYABLE,
                              "items": {"type": "string", "pattern": ERROR_NAME.pattern,
                                        "maxLength": ERROR_NAME_MAX}},
        }),
    }
    compensate = {
        "type": "object",
        "description": "How a completed step is undone.",
        "additionalProperties": False,
        "required": ["action"],
        "properties": props(COMPENSATE_FIELDS, {
            "action": {"type": "string", "minLength": 1}, "topic": optional_name,
            "params": params, "retry": retry_ref, "timeout": seconds,
        }),
    }
    compensate_ref = {"anyOf": [{"$ref": "#/$defs/compensate"}, {"type": "null"}]}
    sub_task = {
        "type": "object",
        "description": "One branch of a fan_out step.",
        "additionalProperties": False,
        "required": ["step_name"],
        "properties": props(SUB_TASK_FIELDS, {
            "step_name": {"type": "string", "minLength": 1},
            "topic": optional_name, "action": optional_name, "params": params,
            "retry": retry_ref, "timeout": seconds, "compensate": compensate_ref,
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
            "retry": retry_ref, "timeout": seconds, "compensate": compensate_ref,
            "on_failure": optional_name,
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
            "defaults": {"anyOf": [{"type": "null"}, {
                "type": "object", "additionalProperties": False,
                "properties": props(DEFAULTS_FIELDS, {"retry": retry_ref,
                                                      "timeout": seconds})}]},
            "on_budget_exhausted": {"enum": [*BUDGET_CHOICES, None]},
        }),
        "$defs": {"step": step, "sub_task": sub_task, "retry": retry,
                  "compensate": compensate},
    }


__all__ = [
    "COMPENSATE_RETRY", "COMPLETE", "FAN_OUT", "PAUSE", "RESERVED_ACTIONS", "Compensate",
    "Defaults", "Plan", "Step", "SubTask",
    "json_schema", "load_plan", "load_plan_data", "loads_plan", "loads_plan_data",
    "parse_plan", "parse_plan_partial", "plan_to_dict",
]
