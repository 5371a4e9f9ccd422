"""Property tests of the coordinator: random plans and random orders of events
(successes, failures, timeouts, duplicates, late answers, due retries, cancels)
against the invariants of the failure model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chassis import coordinator as co
from chassis.errors import InvalidTransition
from chassis.plan import Plan, parse_plan
from chassis.policy import TIMEOUT_ERROR
from chassis.state import Status, WorkflowState, request_id_for

CID = "7d3c2b1a-0f9e-4d8c-b7a6-5e4d3c2b1a0f"
AI = "ai_text_generate_claude_haiku"


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(1, 4))
    steps: dict[str, Any] = {}
    for i in range(n):
        name = f"s{i}"
        kind = draw(st.sampled_from(["celery", "ai", "agent", "fan_out"]))
        retry: dict[str, Any] = {"max_attempts": draw(st.integers(1, 4)),
                                 "initial_interval": draw(st.sampled_from([0.1, 2.0, 60.0]))}
        if draw(st.booleans()):
            retry["non_retryable"] = ["Fatal"]
        step: dict[str, Any] = {"action": "work", "retry": retry,
                                "next_step": f"s{i + 1}" if i + 1 < n else "end"}
        if kind == "agent":
            step["topic"] = f"agents.{name}"
        elif kind == "ai":  # priced by tokens: reserved, then settled
            step["action"] = AI
            step["params"] = {"prompt": "p", "max_tokens": 200}
        elif kind == "fan_out":
            step["action"] = "fan_out"
            step["sub_tasks"] = [
                {"step_name": f"{name}_{j}", "action": draw(st.sampled_from(["work", AI])),
                 "params": {"prompt": "p", "max_tokens": 200},
                 **({"topic": f"agents.{name}_{j}"} if draw(st.booleans()) else {})}
                for j in range(draw(st.integers(1, 3)))]
        steps[name] = step
    steps["end"] = {"action": "complete_workflow"}
    return parse_plan({"start_step": "s0", "steps": steps})


def in_flight(s: WorkflowState) -> list[tuple[str, int, bool]]:
    """(step, attempt, scheduled) of every awaited attempt."""
    out = []
    for name, (attempt, _base, scheduled) in s.attempts.items():
        if request_id_for(CID, name, attempt) in s.awaited_steps:
            out.append((name, attempt, bool(scheduled)))
    return sorted(out)


def outcome(plan: Plan, name: str, attempt: int, kind: str) -> co.Event:
    topic = plan.subtask(name)[1].topic if plan.subtask(name) else plan.steps[name].topic
    output = {"n": attempt, "usage": {"input_tokens": 40 * attempt, "output_tokens": 9}}
    if kind == "ok":
        if topic:
            return co.ResponseReceived(request_id_for(CID, name, attempt), True, output)
        owned = plan.subtask(name)
        if owned:
            return co.SubtasksSucceeded(owned[0], {name: output}, {name: attempt})
        return co.StepSucceeded(name, output, attempt)
    if kind == "deferred" and not topic:
        return co.StepFailed(name, "breaker open", attempt, (co.DEFERRED, "ActionError"),
                             {"input_tokens": 0, "output_tokens": 0}, retry_after=5.0)
    types = {"fatal": ("Fatal", "Exception"), "timeout": (TIMEOUT_ERROR,),
             "transient": ("Transient", "Exception"),
             "deferred": ("Transient", "Exception")}[kind]  # (an agent's: not deferred)
    if topic:
        return co.ResponseReceived(request_id_for(CID, name, attempt), False, error=kind,
                                   error_type=types[0])
    return co.StepFailed(name, kind, attempt, types)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(), data=st.data())
def test_random_event_orders_keep_the_invariants(plan: Plan, data: st.DataObject) -> None:
    s = WorkflowState(correlation_id=CID, client_id="acme", status=Status.RUNNING,
                      current_step="s0", fuel_budget=data.draw(st.integers(5, 200)))
    decisions = [co.decide(s, plan, co.Start())]
    s = decisions[0].state
    history: list[co.Event] = []
    budget = sum(plan.policy(n).max_attempts for n in [*plan.steps, *plan._owners]) + 20
    for _ in range(budget * 3):
        if s.status.finished:
            break
        flying = in_flight(s)
        choice = data.draw(st.sampled_from(["outcome", "outcome", "outcome", "replay",
                                            "cancel" if len(history) > 3 else "outcome"]))
        if choice == "replay" and history:
            event: co.Event = data.draw(st.sampled_from(history))
        elif choice == "cancel":
            event = co.Cancel("enough")
        elif flying:
            name, attempt, scheduled = data.draw(st.sampled_from(flying))
            if scheduled:
                event = co.RetryDue(name, attempt)
            else:
                kind = data.draw(st.sampled_from(["ok", "ok", "transient", "fatal",
                                                  "timeout", "deferred"]))
                event = outcome(plan, name, attempt, kind)
        else:
            break
        before = copy.deepcopy(s)
        d = co.decide(s, plan, event)
        assert s == before, "decide mutated its input"
        # what a decision charges the client's quota is what it moved into spent or held
        assert d.charged + d.released + d.forced == (
            d.state.fuel_spent + d.state.fuel_reserved - s.fuel_spent - s.fuel_reserved)
        assert d.charged >= 0 and d.released <= 0 and d.forced >= 0
        assert d.held == d.state.fuel_reserved - s.fuel_reserved
        if not d.changed:
            assert d.state is s and d.commands == []
        else:
            decisions.append(d)
            s = d.state
            history.append(event)
        check(plan, s, decisions)
    # every workflow ends: keep answering what is awaited, successfully
    for _ in range(budget * 3):
        if s.status.finished:
            break
        flying = in_flight(s)
        assert flying, f"{s.status} awaits nothing it can be given: {s}"
        name, attempt, scheduled = flying[0]
        event = co.RetryDue(name, attempt) if scheduled else outcome(plan, name, attempt, "ok")
        d = co.decide(s, plan, event)
        assert d.changed
        decisions.append(d)
        s = d.state
        check(plan, s, decisions)
    assert s.status.finished, s
    if s.status is Status.COMPLETED:
        assert all(name in s.collected_data for name in plan.steps if name != "end")
    for event in history:  # once finished, nothing changes it
        if isinstance(event, co.Cancel):
            with pytest.raises(InvalidTransition):
                co.decide(s, plan, event)
        else:
            assert not co.decide(s, plan, event).changed


def check(plan: Plan, s: WorkflowState, decisions: list[co.Decision]) -> None:
    debits = [c for d in decisions for c in d.commands if isinstance(c, co.Debit)]
    keys = [c.key for c in debits]
    assert len(keys) == len(set(keys)), "an attempt was debited twice"
    assert sum(c.amount for c in debits) == s.fuel_spent, "ledger != spent"
    assert sum(c.held for c in debits) == s.fuel_reserved, "holds != reserved"
    assert s.fuel_spent + s.fuel_reserved <= s.fuel_budget
    if s.status.finished:
        assert s.holds == {}, "a finished workflow holds fuel"
    for name, (attempt, base, _) in s.attempts.items():
        if name in plan.steps and plan.steps[name].action in ("fan_out", "complete_workflow"):
            continue
        assert 0 <= attempt - base <= plan.policy(name).max_attempts, (name, attempt, base)
    current = {request_id_for(CID, n, a) for n, (a, _, _) in s.attempts.items()}
    assert set(s.awaited_steps) <= current, "an attempt no longer current is awaited"
    if s.status.finished:
        assert s.awaited_steps == []
    if s.status is Status.FAILED:
        assert s.error


@settings(max_examples=100, deadline=None)
@given(plan=plans(), data=st.data())
def test_an_operators_retry_reaches_a_final_status_without_charging_twice(
        plan: Plan, data: st.DataObject) -> None:
    s = WorkflowState(correlation_id=CID, client_id="acme", status=Status.RUNNING,
                      current_step="s0", fuel_budget=1000)
    decisions = [co.decide(s, plan, co.Start())]
    s = decisions[0].state
    for _ in range(200):
        if s.status.finished:
            if s.status is Status.FAILED and data.draw(st.booleans()):
                d = co.decide(s, plan, co.Retry())
                decisions.append(d)
                s = d.state
                continue
            break
        name, attempt, scheduled = in_flight(s)[0]
        kind = data.draw(st.sampled_from(["ok", "fatal", "transient"]))
        event = co.RetryDue(name, attempt) if scheduled else outcome(plan, name, attempt, kind)
        d = co.decide(s, plan, event)
        decisions.append(d)
        s = d.state
        check(plan, s, decisions)
    assert s.status.finished or in_flight(s)
