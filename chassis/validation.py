"""Plan validation: the seed's WorkflowValidator, completed.

:func:`validate` checks what a plan means (parsing in :mod:`chassis.plan` has already
checked its shape) and returns every problem at once, each line naming its step
(``steps.generate: next_step 'x' names no step``) or, for a cycle, the steps on it.

Decisions beyond the original's checks, because outputs are stored by name in one map:
a dependency may name a fan-out sub-task (its output is stored under its step_name);
sub-task names must be unique and distinct from step names; ``input`` and
``human_feedback`` are taken by the workflow's own data; a sub-task cannot run a
reserved action; ``sub_tasks`` on a step that is not a fan_out would be ignored, so
they are a problem.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from chassis import actions
from chassis.errors import PlanError
from chassis.limits import NAME_MAX
from chassis.plan import COMPLETE, FAN_OUT, PAUSE, RESERVED_ACTIONS, Compensate, Plan, Step
from chassis.policy import merged_problems
from chassis.state import COMPENSATE_SUFFIX, compensation_of

#: What Kafka accepts as a topic name.
KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
#: Keys of a step's data that are not step outputs.
RESERVED_NAMES = frozenset({"input", "human_feedback", "error", "output"})
#: Characters a step or sub-task name may not hold: they separate the attempt number in
#: request ids and ledger keys (``<id>/<step>/<n>``, ``<id>:<step>#<n>``).
NAME_SEPARATORS = ("#", "/")


def validate(plan: Plan, known_actions: Collection[str] | None = None) -> list[str]:
    """Every problem of ``plan``; empty when it is valid.

    ``known_actions`` are the actions that may run without a topic (default: those
    registered in this process, :func:`chassis.actions.registered`).
    """
    known = actions.registered() if known_actions is None else known_actions
    problems: list[str] = []
    if plan.start_step not in plan.steps:
        problems.append(f"start_step: {plan.start_step!r} names no step")
    owner = _sub_task_owners(plan)
    seen_subs: dict[str, str] = {}
    for name, step in plan.steps.items():
        place = f"steps.{name}"
        if name in RESERVED_NAMES:
            problems.append(f"{place}: the name {name!r} is reserved for workflow data")
        problems += _name_problems(place, "step name", name)
        if step.next_step is not None and step.next_step not in plan.steps:
            problems.append(f"{place}: next_step {step.next_step!r} names no step")
        for dep in step.dependencies:
            if dep not in plan.steps and dep not in owner:
                problems.append(f"{place}: dependency {dep!r} names no step")
        problems += _action_problems(place, step, known)
        if step.action == FAN_OUT:
            problems += _sub_task_problems(name, step, plan, seen_subs, known)
        elif step.sub_tasks:
            problems.append(f"{place}: sub_tasks are only used by fan_out, "
                            f"not by action {step.action!r}")
        problems += _failure_problems(place, name, step, plan)
        problems += _compensate_problems(place, step, step.compensate, known, name)
        problems += _on_failure_problems(place, name, step, plan)
    cycles = _cycles(plan, owner)
    problems += [f"cycle: {' -> '.join([*cycle, cycle[0]])}" for cycle in cycles]
    if not cycles:
        problems += _unreachable_dependencies(plan, owner)
    return problems


#: Most steps the reachability check walks (a plan of many on_failure paths would
#: otherwise cost the square of its size); past it, the rest is not checked.
WALK_BUDGET = 200_000


def _unreachable_dependencies(plan: Plan, owner: dict[str, str]) -> list[str]:
    """A step runs when the workflow reaches it along next_step from start_step (or from
    an on_failure step, which is reached with only the steps before the failed one
    completed); a dependency that cannot have completed by then (a later step, a step
    off that way, a sub-task of a later fan-out) would make the workflow wait for ever."""
    problems: list[str] = []
    reported: set[tuple[str, str]] = set()
    handlers: dict[str, set[str]] = {}  # on_failure step -> steps surely completed then
    queue: list[str] = []
    budget = WALK_BUDGET

    def walk(start: str, completed: set[str]) -> None:
        nonlocal budget
        path: list[str] = []
        done = set(completed)
        name: str | None = start
        while name is not None and name in plan.steps and name not in path and budget > 0:
            budget -= 1
            path.append(name)
            step = plan.steps[name]
            for dep in step.dependencies:
                if dep in done or (dep not in plan.steps and dep not in owner):
                    continue  # fine, or already reported as naming no step
                if (name, dep) in reported:
                    continue
                reported.add((name, dep))
                step_of = owner.get(dep, dep)
                if step_of in path and path.index(step_of) >= path.index(name):
                    why = "it runs after it"
                elif start == plan.start_step:
                    why = f"it is not on the way from start_step {plan.start_step!r}"
                else:
                    why = f"it may not have completed when on_failure leads to {start!r}"
                problems.append(f"steps.{name}: dependency {dep!r} cannot have completed "
                                f"when {name!r} is reached ({why}): the workflow would "
                                "wait for ever")
            target = step.on_failure
            if target in plan.steps:
                before = handlers.get(target)
                if before is None or not before <= done:
                    handlers[target] = set(done) if before is None else before & done
                    queue.append(target)  # (again: fewer steps are sure to be done)
            done.add(name)
            done.update(st.step_name for st in step.sub_tasks)
            name = step.next_step

    walk(plan.start_step, set())
    while queue and budget > 0:
        target = queue.pop(0)
        walk(target, handlers[target])
    return problems


def check(plan: Plan, known_actions: Collection[str] | None = None) -> None:
    """Raise :class:`PlanError` listing every problem when ``plan`` is invalid."""
    problems = validate(plan, known_actions)
    if problems:
        raise PlanError("plan is invalid", problems)


def metrics(plan: Plan) -> dict[str, int]:
    """Size of a plan (the original's GetWorkflowMetrics): ``steps``, ``fan_out_steps``,
    ``external_calls`` (steps and sub-tasks with a topic), ``max_depth`` (steps on the
    next_step path from the start step) and ``sub_tasks``."""
    subs = [st for step in plan.steps.values() for st in step.sub_tasks]
    depth, seen = 0, set()
    name: str | None = plan.start_step
    while name is not None and name in plan.steps and name not in seen:
        seen.add(name)
        depth += 1
        name = plan.steps[name].next_step
    return {
        "steps": len(plan.steps),
        "fan_out_steps": sum(step.action == FAN_OUT for step in plan.steps.values()),
        "external_calls": sum(bool(step.topic) for step in plan.steps.values())
        + sum(bool(st.topic) for st in subs),
        "max_depth": depth,
        "sub_tasks": len(subs),
    }


def _unknown(place: str, action: str, known: Collection[str]) -> str:
    listed = ", ".join(sorted(known)) or "none"
    return (f"{place}: action {action!r} is not registered in this process and has no "
            f"topic (registered: {listed})")


def _action_problems(place: str, step: Step, known: Collection[str]) -> list[str]:
    if not step.action:
        return [f"{place}: has no action"]
    if step.action in RESERVED_ACTIONS:
        problems = []
        if step.topic:
            problems.append(f"{place}: reserved action {step.action!r} cannot have a topic")
        if step.action == COMPLETE and step.next_step is not None:
            problems.append(f"{place}: complete_workflow must not have a next_step")
        return problems
    if step.action not in known and not step.topic:
        return [_unknown(place, step.action, known)]
    return _topic_problems(place, step.topic)


def _topic_problems(place: str, topic: str | None) -> list[str]:
    if topic and not KAFKA_TOPIC.match(topic):
        return [f"{place}: topic {topic[:80]!r} is not a Kafka topic name (letters, digits, "
                "'.', '_' and '-', at most 249)"]
    return []


def _sub_task_problems(name: str, step: Step, plan: Plan, seen: dict[str, str],
                       known: Collection[str]) -> list[str]:
    place = f"steps.{name}"
    if not step.sub_tasks:
        return [f"{place}: fan_out needs at least one sub-task"]
    problems = []
    for i, st in enumerate(step.sub_tasks):
        sp = f"{place}.sub_tasks[{i}]"
        if not st.step_name:
            problems.append(f"{sp}: has no step_name")
            continue
        problems += _name_problems(sp, "step_name", st.step_name)
        if st.step_name in plan.steps:
            problems.append(f"{sp}: step_name {st.step_name!r} is also a step's name "
                            "(outputs are stored by name)")
        elif st.step_name in RESERVED_NAMES:
            problems.append(f"{sp}: step_name {st.step_name!r} is reserved for workflow data")
        elif st.step_name in seen:
            problems.append(f"{sp}: step_name {st.step_name!r} is already used by a sub-task "
                            f"of steps.{seen[st.step_name]}")
        seen.setdefault(st.step_name, name)
        action = st.resolved_action
        if action in RESERVED_ACTIONS:
            problems.append(f"{sp}: reserved action {action!r} cannot run as a sub-task")
        elif action not in known and not st.topic:
            problems.append(_unknown(sp, action, known))
        problems += _topic_problems(sp, st.topic)
        problems += _compensate_problems(sp, None, st.compensate, known, st.step_name)
        if st.compensate is not None and plan.subtask(st.step_name) == (name, st):
            problems += merged_problems(f"{sp}.compensate", plan.policy(
                compensation_of(st.step_name)))
    return problems


def _compensate_problems(place: str, step: Step | None, comp: Compensate | None,
                         known: Collection[str], name: str) -> list[str]:
    """A compensation needs an action that can run; a reserved step has none (a
    fan_out's compensation is its sub-tasks'). It runs under the step's name and
    COMPENSATE_SUFFIX, which must fit a name's length."""
    if comp is None:
        return []
    cp = f"{place}.compensate"
    problems = []
    if len(compensation_of(name)) > NAME_MAX:
        problems.append(f"{cp}: the step's name is too long to have a compensate (at most "
                        f"{NAME_MAX - len(COMPENSATE_SUFFIX)} characters)")
    if step is not None and step.action in RESERVED_ACTIONS:
        why = " (give its sub-tasks a compensate)" if step.action == FAN_OUT else ""
        problems.append(f"{cp}: a {step.action} step has nothing to undo{why}")
    if not comp.action:
        problems.append(f"{cp}: has no action")
    elif comp.action in RESERVED_ACTIONS:
        problems.append(f"{cp}: reserved action {comp.action!r} cannot undo a step")
    elif comp.action not in known and not comp.topic:
        problems.append(_unknown(cp, comp.action, known))
    problems += _topic_problems(cp, comp.topic)
    return problems


def _on_failure_problems(place: str, name: str, step: Step, plan: Plan) -> list[str]:
    target = step.on_failure
    if target is None:
        return []
    if step.action == PAUSE and step.timeout is None:
        return [f"{place}: on_failure on {PAUSE} is where the workflow goes on when its "
                "approval expires: give the step a timeout too"]
    if step.action in RESERVED_ACTIONS - {FAN_OUT, PAUSE}:
        return [f"{place}: on_failure does not apply to {step.action} (it makes no attempts)"]
    if target == name:
        return [f"{place}: on_failure names the step itself"]
    if target not in plan.steps:
        return [f"{place}: on_failure {target!r} names no step"]
    return []


def _name_problems(place: str, what: str, name: str) -> list[str]:
    bad = [c for c in NAME_SEPARATORS if c in name]
    if bad:
        return [f"{place}: {what} {name!r} may not contain {' or '.join(map(repr, bad))}"]
    return []


def _failure_problems(place: str, name: str, step: Step, plan: Plan) -> list[str]:
    """retry and timeout: only where an attempt runs (a fan_out passes them on to its
    sub-tasks; a pause's timeout is its approval's expiry); merged layers must still
    make sense."""
    if step.action == PAUSE:
        if step.retry is not None:
            return [f"{place}: retry does not apply to {PAUSE} (a retry of the workflow "
                    "asks again)"]
        return []
    if step.action in RESERVED_ACTIONS - {FAN_OUT}:
        if step.retry is not None or step.timeout is not None:
            return [f"{place}: retry and timeout do not apply to {step.action}"]
        return []
    problems = merged_problems(place, plan.policy(name))
    if step.compensate is not None and step.action not in RESERVED_ACTIONS:
        problems += merged_problems(f"{place}.compensate", plan.policy(compensation_of(name)))
    if step.action == FAN_OUT:
        for i, st in enumerate(step.sub_tasks):
            if st.step_name and plan.subtask(st.step_name) == (name, st):
                problems += merged_problems(f"{place}.sub_tasks[{i}]",
                                            plan.policy(st.step_name))
    return problems


def _sub_task_owners(plan: Plan) -> dict[str, str]:
    """Sub-task step_name → its fan_out step (the first one, when names clash)."""
    owner: dict[str, str] = {}
    for name, step in plan.steps.items():
        if step.action == FAN_OUT:
            for st in step.sub_tasks:
                if st.step_name:
                    owner.setdefault(st.step_name, name)
    return owner


def _cycles(plan: Plan, owner: dict[str, str]) -> list[list[str]]:
    """Cycles over "runs before" edges: a step → its next_step and its on_failure, and a
    dependency's step
    (a sub-task's fan_out step) → the step that depends on it."""
    edges: dict[str, list[str]] = {name: [] for name in plan.steps}
    for name, step in plan.steps.items():
        if step.next_step in edges:
            edges[name].append(step.next_step)
        if (step.on_failure in edges and step.on_failure != name  # (reported apart)
                and step.on_failure not in edges[name]):
            edges[name].append(step.on_failure)
        for dep in step.dependencies:
            before = dep if dep in edges else owner.get(dep)
            if before is not None and name not in edges[before]:
                edges[before].append(name)
    order = {name: i for i, name in enumerate(plan.steps)}
    found: list[list[str]] = []
    done: set[str] = set()
    for root in plan.steps:
        if root in done:
            continue
        path, on_path = [root], {root}
        stack = [iter(edges[root])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                done.add(path[-1])
                on_path.discard(path.pop())
                stack.pop()
            elif nxt in on_path:
                cycle = path[path.index(nxt):]
                first = min(range(len(cycle)), key=lambda i: order[cycle[i]])
                cycle = cycle[first:] + cycle[:first]
                if cycle not in found:
                    found.append(cycle)
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(edges[nxt]))
    return found


__all__ = ["RESERVED_NAMES", "check", "metrics", "validate"]
