"""Random workflows from a seed, and what each must end as (the model).

A case is a chain of steps, each of one kind, then ``complete_workflow``:

- ``ok``: succeeds (a Celery step, or an external agent's over Kafka);
- ``flaky``: fails its first ``k`` attempts, then succeeds (a retry policy of ``k+1``);
- ``fail``: fails every attempt (``m`` of them): the workflow fails there;
- ``onfail``: fails every attempt, and its ``on_failure`` goes on at the next step;
- ``timeout``: takes longer than its ``timeout`` (1 s): a failed attempt, the workflow
  fails there;
- ``fanout``: a ``fan_out`` of 2 or 3 sub-tasks that succeed;
- ``pause``: ``pause_for_human_input``, answered approve, reject, or a cancel with
  compensation, or (one in four of those to approve) never answered: its 2 s
  ``timeout`` expires it;

and some steps have a ``compensate``; every other step depends on the one before it
(``dependencies``). The model follows the coordinator's rules: a
failed step (or a rejection) undoes the completed steps that have a compensation, last
first, and ends COMPENSATED (FAILED when there is none); a cancel with compensation
undoes them and ends CANCELLED; the fuel is the table price of every attempt (1 a
step, a fan-out 5 + 1 a sub-task, a pause 0, ``complete_workflow`` 1, 1 a compensation).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

#: Where agents' steps are sent (``chassis agent --type chaos``).
AGENT_TOPIC = "system.agent.chaos.requests"
#: Seconds a pause that nobody answers waits before its approval expires.
EXPIRES_AFTER = 2
KINDS = ("ok", "ok", "agent", "flaky", "fanout", "pause", "fail", "onfail", "timeout")


@dataclass
class Expect:
    status: str
    outputs: dict[str, Any] = field(default_factory=dict)
    """Each step or sub-task that completed, and its output."""
    attempts: dict[str, int] = field(default_factory=dict)
    """Attempts of each step or sub-task that ran (its last attempt's number)."""
    compensations: list[str] = field(default_factory=list)
    """Compensation steps, in the order they must run (``step/compensate``)."""
    fuel: int = 0
    error: str | None = None
    """Text the workflow's error holds (None: no error)."""


@dataclass
class Case:
    index: int
    plan: dict[str, Any]
    input: dict[str, Any]
    answer: str | None
    """How the pause is answered: approve, reject, cancel, expire (not answered: its
    approval expires), None: no pause."""
    expect: Expect
    kinds: list[str]


def _output(case: int, tag: str) -> dict[str, Any]:
    return {"tag": tag, "case": case}


def make_case(rng: random.Random, index: int, kafka: bool) -> Case:
    """One random workflow and its model."""
    length = rng.randint(1, 5)
    kinds = []
    for _ in range(length):
        kind = rng.choice(KINDS)
        if kind == "agent" and not kafka:
            kind = "ok"
        if kind == "pause" and "pause" in kinds:
            kind = "ok"  # one pause a workflow: the driver answers it once
        kinds.append(kind)
    steps: dict[str, Any] = {}
    names = [f"s{i}" for i in range(length)]
    expect = Expect(status="COMPLETED")
    completed_undoable: list[str] = []
    answer: str | None = None
    stopped = False
    for i, (name, kind) in enumerate(zip(names, kinds, strict=True)):
        nxt = names[i + 1] if i + 1 < length else "done"
        tag = f"{index}:{name}"
        step: dict[str, Any] = {"next_step": nxt}
        delay = rng.choice((0, 0, 0.01, 0.05, 0.2))
        undoable = kind not in ("pause", "fanout", "onfail") and rng.random() < 0.4
        if undoable:
            step["compensate"] = {"action": "chaos_undo", "params": {"tag": tag}}
        if kind in ("ok", "agent"):
            step.update(action="chaos_ok", params={"tag": tag, "delay": delay})
            if kind == "agent":
                step["topic"] = AGENT_TOPIC
                step["timeout"] = 300
        elif kind == "flaky":
            k = rng.randint(1, 2)
            step.update(action="chaos_flaky", params={"tag": tag, "fail": k, "delay": delay},
                        retry={"max_attempts": k + 1, "initial_interval": 0.1,
                               "backoff_coefficient": 1.0})
        elif kind in ("fail", "onfail"):
            m = rng.randint(1, 2)
            step.update(action="chaos_fail", params={"tag": tag, "delay": delay},
                        retry={"max_attempts": m, "initial_interval": 0.1,
                               "backoff_coefficient": 1.0})
            if kind == "onfail":
                step["on_failure"] = nxt
        elif kind == "timeout":
            step.update(action="chaos_ok", params={"tag": tag, "delay": 3}, timeout=1)
        elif kind == "fanout":
            subs = [f"{name}_{j}" for j in range(rng.randint(2, 3))]
            step.update(action="fan_out", sub_tasks=[
                {"step_name": sub, "action": "chaos_ok",
                 "params": {"tag": f"{index}:{sub}", "delay": delay}} for sub in subs])
        elif kind == "pause":
            step.update(action="pause_for_human_input")
            answer = rng.choice(("approve", "approve", "reject", "cancel"))
            if answer == "approve" and index % 4 == 3:  # (no draw from the seed)
                answer = "expire"
                step["timeout"] = EXPIRES_AFTER
        if i > 0 and i % 2 == 0 and kinds[i - 1] in ("ok", "agent", "flaky", "fanout"):
            # (no draw from the seed: the same cases as without)
            step["dependencies"] = [names[i - 1]]
        steps[name] = step
        if stopped:
            continue
        # --- the model
        if kind in ("ok", "agent"):
            expect.outputs[name] = _output(index, tag)
            expect.attempts[name] = 1
            expect.fuel += 1
        elif kind == "flaky":
            expect.outputs[name] = _output(index, tag)
            expect.attempts[name] = step["retry"]["max_attempts"]
            expect.fuel += step["retry"]["max_attempts"]
        elif kind == "fail":
            expect.attempts[name] = step["retry"]["max_attempts"]
            expect.fuel += step["retry"]["max_attempts"]
            expect.error = f"step {tag} fails for good"
            _undo(expect, completed_undoable, "COMPENSATED")
            stopped = True
            continue
        elif kind == "onfail":
            expect.attempts[name] = step["retry"]["max_attempts"]
            expect.fuel += step["retry"]["max_attempts"]
            continue  # no output, nothing to undo: the workflow goes on
        elif kind == "timeout":
            expect.attempts[name] = 1
            expect.fuel += 1
            expect.error = "timed out after 1 s"
            _undo(expect, completed_undoable, "COMPENSATED")
            stopped = True
            continue
        elif kind == "fanout":
            expect.fuel += 5 + len(step["sub_tasks"])
            expect.attempts[name] = 1
            for sub in step["sub_tasks"]:
                expect.outputs[sub["step_name"]] = _output(index, sub["params"]["tag"])
                expect.attempts[sub["step_name"]] = 1
        elif kind == "pause":
            expect.attempts[name] = 1
            if answer == "reject":
                expect.error = "Workflow rejected by user"
                _undo(expect, completed_undoable, "COMPENSATED")
                stopped = True
                continue
            if answer == "expire":
                expect.error = (f"no answer to the approval within {EXPIRES_AFTER:g} s: "
                                "it expired")
                _undo(expect, completed_undoable, "COMPENSATED")
                stopped = True
                continue
            if answer == "cancel":
                expect.error = "Workflow cancelled: chaos"
                _undo(expect, completed_undoable, "CANCELLED", always="CANCELLED")
                stopped = True
                continue
        if undoable:
            completed_undoable.append(name)
    steps["done"] = {"action": "complete_workflow"}
    if not stopped:
        expect.attempts["done"] = 1
        expect.fuel += 1
    plan = {"name": f"chaos-{'-'.join(kinds)}", "start_step": names[0], "steps": steps}
    return Case(index, plan, {"case": index}, answer, expect, kinds)


def _undo(expect: Expect, completed: list[str], ends: str, always: str | None = None) -> None:
    """The workflow stops: its completed compensable steps are undone, last first."""
    expect.compensations = [f"{name}/compensate" for name in reversed(completed)]
    expect.fuel += len(completed)
    expect.status = ends if completed else (always or "FAILED")


def make_cases(seed: int, count: int, kafka: bool) -> list[Case]:
    rng = random.Random(seed)
    return [make_case(rng, i, kafka) for i in range(count)]


__all__ = ["AGENT_TOPIC", "Case", "Expect", "make_case", "make_cases"]
