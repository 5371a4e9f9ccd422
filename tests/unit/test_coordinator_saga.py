"""Sagas as pure decisions: compensation in reverse order of completion, a fan-out's
sub-tasks undone in parallel, on_failure, cancel with compensation, a compensation
that fails and an operator's retry of it (no database, no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from chassis import coordinator as co
from chassis.errors import InvalidTransition
from chassis.plan import Plan, parse_plan
from chassis.state import Status, StepStatus, WorkflowState
from tests.unit.test_coordinator_failures import CID, of, start


def undo(name: str, **extra: Any) -> dict[str, Any]:
    return {"action": "undo", "params": {"of": name}, **extra}


def booking(**ship: Any) -> Plan:
    """reserve -> charge -> ship, each with a compensation."""
    return parse_plan({"start_step": "reserve", "steps": {
        "reserve": {"action": "work", "compensate": undo("reserve"), "next_step": "charge"},
        "charge": {"action": "work", "compensate": undo("charge"), "next_step": "ship"},
        "ship": {"action": "work", "compensate": undo("ship"), "next_step": "done", **ship},
        "done": {"action": "complete_workflow"}}})


def sent(d: co.Decision) -> list[str]:
    """Names of the attempts a decision sends (Celery tasks and agents' requests)."""
    names = [c.step for c in d.commands if isinstance(c, co.RunStep | co.SendRequest)]
    for group in of(d, co.RunFanOut):
        names += [t.step for t in group.subtasks]
    return names


def events(d: co.Decision) -> list[str]:
    return [e.payload["event_type"] for e in of(d, co.Emit)]


def ok(d: co.Decision, plan: Plan, *names: str, attempt: int = 1) -> co.Decision:
    for name in names:
        d = co.decide(d.state, plan, co.StepSucceeded(name, {"did": name}, attempt))
    return d


def test_a_failed_last_step_undoes_the_others_last_first() -> None:
    plan = booking()
    d = ok(start(plan), plan, "reserve", "charge")
    d = co.decide(d.state, plan, co.StepFailed("ship", "no courier", 1))
    assert d.state.status is Status.COMPENSATING
    assert events(d) == ["WORKFLOW_COMPENSATING"]
    assert sent(d) == ["charge/compensate"]  # one at a time, the last completed first
    (run,) = of(d, co.RunStep)
    assert run.params == {"of": "charge"}
    data = co.json_roundtrip(d.state.step_data("charge/compensate"))
    assert data["output"] == {"did": "charge"} and data["reserve"] == {"did": "reserve"}
    assert data["error"]["message"] == "step 'ship' failed: no courier"
    d = ok(d, plan, "charge/compensate")
    assert sent(d) == ["reserve/compensate"] and d.state.status is Status.COMPENSATING
    d = ok(d, plan, "reserve/compensate")
    assert d.state.status is Status.COMPENSATED
    assert d.state.error == "step 'ship' failed: no courier"
    assert events(d) == ["WORKFLOW_COMPENSATED"]
    assert of(d, co.Emit)[0].payload["error"] == "step 'ship' failed: no courier"
    assert not ok(d, plan, "reserve/compensate").changed  # a duplicate report


@pytest.mark.parametrize(("failing", "undone"), [
    ("reserve", []),
    ("charge", ["reserve"]),
    ("ship", ["charge", "reserve"]),
])
def test_only_completed_steps_are_undone(failing: str, undone: list[str]) -> None:
    plan = booking()
    d = start(plan)
    order = ["reserve", "charge", "ship"]
    d = ok(d, plan, *order[:order.index(failing)])
    d = co.decide(d.state, plan, co.StepFailed(failing, "boom", 1))
    ran = []
    while d.state.status is Status.COMPENSATING:
        (name,) = sent(d)
        ran.append(name.removesuffix("/compensate"))
        d = ok(d, plan, name)
    assert ran == undone
    assert d.state.status is (Status.COMPENSATED if undone else Status.FAILED)
    assert d.state.error == f"step '{failing}' failed: boom"


def test_a_fan_outs_sub_tasks_are_undone_together_then_the_steps_before() -> None:
    plan = parse_plan({"start_step": "reserve", "steps": {
        "reserve": {"action": "work", "compensate": undo("reserve"), "next_step": "fan"},
        "fan": {"action": "fan_out", "next_step": "ship", "sub_tasks": [
            {"step_name": f"b{i}", "action": "work", "compensate": undo(f"b{i}")}
            for i in range(3)]},
        "ship": {"action": "work", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    d = ok(start(plan), plan, "reserve")
    for i in (2, 0, 1):
        d = co.decide(d.state, plan, co.SubtasksSucceeded("fan", {f"b{i}": i}, {f"b{i}": 1}))
    d = co.decide(d.state, plan, co.StepFailed("ship", "boom", 1))
    (group,) = of(d, co.RunFanOut)  # in parallel: one Celery group
    assert group.step == "fan/compensate"
    assert sorted(t.step for t in group.subtasks) == [f"b{i}/compensate" for i in range(3)]
    assert all(t.parent_step is None for t in group.subtasks)
    d = ok(d, plan, "b1/compensate", "b0/compensate")
    assert sent(d) == []  # the batch has not settled
    d = ok(d, plan, "b2/compensate")
    assert sent(d) == ["reserve/compensate"]
    assert ok(d, plan, "reserve/compensate").state.status is Status.COMPENSATED


def test_a_sub_task_that_fails_undoes_the_siblings_that_completed() -> None:
    plan = parse_plan({"start_step": "fan", "steps": {
        "fan": {"action": "fan_out", "next_step": "done", "sub_tasks": [
            {"step_name": f"b{i}", "action": "work", "compensate": undo(f"b{i}")}
            for i in range(3)]},
        "done": {"action": "complete_workflow"}}})
    d = start(plan)
    # b0's success is recorded in its own row only; the store hands it over, read
    # under lock, with the failure of b1 (b2 still runs: it is abandoned)
    d = co.decide(d.state, plan, co.StepFailed("b1", "boom", 1), settled={"b0": (1, "x")})
    assert d.state.status is Status.COMPENSATING
    assert sent(d) == ["b0/compensate"]
    finished = {(c.step, c.status) for c in of(d, co.FinishStep)}
    assert ("b2", StepStatus.CANCELLED) in finished and ("fan", StepStatus.FAILED) in finished
    assert ok(d, plan, "b0/compensate").state.status is Status.COMPENSATED


def test_a_rejected_review_undoes_the_steps_before_it() -> None:
    plan = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "work", "compensate": undo("a"), "next_step": "b"},
        "b": {"action": "work", "compensate": undo("b"), "next_step": "review"},
        "review": {"action": "pause_for_human_input", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    d = ok(start(plan), plan, "a", "b")
    assert d.state.status is Status.PAUSED_FOR_HUMAN_INPUT
    d = co.decide(d.state, plan, co.Resume(False, "no"))
    assert sent(d) == ["b/compensate"]
    d = ok(ok(d, plan, "b/compensate"), plan, "a/compensate")
    assert d.state.status is Status.COMPENSATED
    assert d.state.error == co.REJECTED_ERROR


def test_an_approval_that_expires_undoes_or_goes_on_at_on_failure() -> None:
    """A pause with a ``timeout``: its deadline is recorded and the notification says
    when it expires; expired (the sweep's ApprovalExpired), the workflow undoes what it
    did, or goes on at ``on_failure``; a late expiry (resumed meanwhile) or a resume
    after it changes nothing."""
    steps = {"a": {"action": "work", "compensate": undo("a"), "next_step": "review"},
             "review": {"action": "pause_for_human_input", "timeout": 3600,
                        "next_step": "done"},
             "done": {"action": "complete_workflow"}}
    plan = parse_plan({"start_step": "a", "steps": steps})
    d = ok(start(plan), plan, "a")
    assert d.state.status is Status.PAUSED_FOR_HUMAN_INPUT
    (record,) = [c for c in of(d, co.RecordStep) if c.step == "review"]
    assert record.timeout == 3600
    (note,) = of(d, co.Emit)
    assert note.payload["expires_in_seconds"] == 3600
    assert isinstance(note.payload["expires_in_seconds"], int)
    paused_state = d.state
    d = co.decide(paused_state, plan, co.ApprovalExpired("review", 1, 3600))
    assert d.state.status is Status.COMPENSATING and sent(d) == ["a/compensate"]
    told = [e.payload for e in of(d, co.Emit)]
    assert told[0]["event_type"] == "WORKFLOW_APPROVAL_EXPIRED"
    assert told[0]["step"] == "review" and "it expired" in told[0]["message"]
    assert told[1]["event_type"] == "WORKFLOW_COMPENSATING"
    (fin,) = [c for c in of(d, co.FinishStep) if c.step == "review"]
    assert fin.status is StepStatus.FAILED and fin.error_type == "StepTimeout"
    assert fin.error == "no answer to the approval within 3600 s: it expired"
    d = ok(d, plan, "a/compensate")
    assert d.state.status is Status.COMPENSATED
    assert d.state.error == ("step 'review' failed: no answer to the approval within "
                             "3600 s: it expired")
    with pytest.raises(InvalidTransition, match="not paused"):
        co.decide(d.state, plan, co.Resume(True))
    # resumed first: the expiry that comes late changes nothing
    resumed = co.decide(paused_state, plan, co.Resume(True)).state
    assert not co.decide(resumed, plan, co.ApprovalExpired("review", 1, 3600)).changed
    assert not co.decide(paused_state, plan, co.ApprovalExpired("review", 2, 3600)).changed
    # on_failure: the workflow goes on there, and sees why
    steps["review"]["on_failure"] = "escalate"
    steps["escalate"] = {"action": "work", "next_step": "done"}
    plan = parse_plan({"start_step": "a", "steps": steps})
    d = co.decide(ok(start(plan), plan, "a").state, plan,
                  co.ApprovalExpired("review", 1, 3600))
    assert d.state.status is Status.RUNNING and sent(d) == ["escalate"]
    assert d.state.step_data()["error"]["step"] == "review"
    # the approval answered late, naming the pause it saw, is refused: the workflow now
    # waits at another (an escalation that is itself a pause)
    steps["escalate"] = {"action": "pause_for_human_input", "next_step": "done"}
    plan = parse_plan({"start_step": "a", "steps": steps})
    d = co.decide(ok(start(plan), plan, "a").state, plan,
                  co.ApprovalExpired("review", 1, 3600))
    assert d.state.status is Status.PAUSED_FOR_HUMAN_INPUT
    with pytest.raises(InvalidTransition, match="waits at step 'escalate', not 'review'"):
        co.decide(d.state, plan, co.Resume(True, step="review"))
    answered = co.decide(d.state, plan, co.Resume(True, step="escalate"))
    assert answered.state.status is Status.COMPLETED
    steps["escalate"] = {"action": "work", "next_step": "done"}
    # a pause without a timeout has no deadline and says nothing of expiry
    del steps["review"]["timeout"]
    plan = parse_plan({"start_step": "a", "steps": steps})
    d = ok(start(plan), plan, "a")
    assert [c.timeout for c in of(d, co.RecordStep) if c.step == "review"] == [None]
    assert "expires_in_seconds" not in of(d, co.Emit)[0].payload


def test_on_failure_goes_on_at_the_handler_which_sees_the_error() -> None:
    plan = parse_plan({"start_step": "reserve", "steps": {
        "reserve": {"action": "work", "compensate": undo("reserve"), "next_step": "charge"},
        "charge": {"action": "work", "compensate": undo("charge"), "next_step": "ship"},
        "ship": {"action": "work", "on_failure": "notify", "next_step": "done",
                 "retry": {"max_attempts": 2, "initial_interval": 0.1}},
        "notify": {"action": "work", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    d = ok(start(plan), plan, "reserve", "charge")
    d = co.decide(d.state, plan, co.StepFailed("ship", "no courier", 1))
    assert sent(d) == ["ship"]  # a retry first
    d = co.decide(d.state, plan, co.StepFailed("ship", "no courier", 2))
    assert sent(d) == ["notify"] and d.state.status is Status.RUNNING
    error = d.state.step_data()["error"]
    assert error == {"step": "ship", "message": "step 'ship' failed after 2 attempts: "
                                                "no courier", "attempts": 2}
    d = ok(d, plan, "notify")
    assert d.state.status is Status.COMPLETED
    assert d.state.final_result["error"]["step"] == "ship"


def test_a_failing_on_failure_path_compensates_everything_completed() -> None:
    plan = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "work", "compensate": undo("a"), "next_step": "b"},
        "b": {"action": "work", "on_failure": "h", "next_step": "done"},
        "h": {"action": "work", "compensate": undo("h"), "next_step": "h2"},
        "h2": {"action": "work", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    d = ok(start(plan), plan, "a")
    d = co.decide(d.state, plan, co.StepFailed("b", "x", 1))
    d = ok(d, plan, "h")
    d = co.decide(d.state, plan, co.StepFailed("h2", "y", 1))
    assert sent(d) == ["h/compensate"]
    d = ok(d, plan, "h/compensate")
    assert sent(d) == ["a/compensate"]


def test_a_compensation_is_retried_then_fails_with_both_errors_and_a_retry_resumes_it() -> None:
    plan = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "work", "compensate": undo("a"), "next_step": "b"},
        "b": {"action": "work", "next_step": "c",
              "compensate": undo("b", retry={"max_attempts": 2, "initial_interval": 0.5})},
        "c": {"action": "work", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    d = ok(start(plan, fuel=3), plan, "a", "b")
    d = co.decide(d.state, plan, co.StepFailed("c", "boom", 1))
    d = co.decide(d.state, plan, co.StepFailed("b/compensate", "undo broke", 1))
    assert sent(d) == ["b/compensate"]  # its own policy: 2 attempts
    d = co.decide(d.state, plan, co.StepFailed("b/compensate", "undo broke", 2))
    assert d.state.status is Status.FAILED
    assert d.state.error == ("step 'c' failed: boom; then the compensation of 'b' failed "
                             "after 2 attempts: undo broke")
    assert events(d) == ["WORKFLOW_FAILED"]
    r = co.decide(d.state, plan, co.Retry())
    assert r.state.status is Status.COMPENSATING and sent(r) == ["b/compensate"]
    assert of(r, co.RunStep)[0].attempt == 3
    r = ok(r, plan, "b/compensate", attempt=3)
    r = ok(r, plan, "a/compensate")
    assert r.state.status is Status.COMPENSATED and r.state.error == "step 'c' failed: boom"
    # compensations are priced, and run past the budget (3): undo must happen
    assert r.state.fuel_spent == 3 + 4 and r.state.fuel_remaining < 0


def test_cancel_with_compensation_undoes_then_ends_cancelled() -> None:
    plan = booking()
    d = ok(start(plan), plan, "reserve", "charge")
    running = of(d, co.RunStep)[0].request_id
    c = co.decide(d.state, plan, co.Cancel("changed my mind", compensate=True))
    assert of(c, co.Revoke) == [co.Revoke((running,))]
    assert c.state.status is Status.COMPENSATING and sent(c) == ["charge/compensate"]
    with pytest.raises(InvalidTransition, match="COMPENSATING"):
        co.decide(c.state, plan, co.Cancel())
    c = ok(ok(c, plan, "charge/compensate"), plan, "reserve/compensate")
    assert c.state.status is Status.CANCELLED
    assert c.state.error == "Workflow cancelled: changed my mind"
    assert events(c) == ["WORKFLOW_CANCELLED"]
    assert of(c, co.Emit)[0].payload["reason"] == "changed my mind"
    plain = co.decide(d.state, plan, co.Cancel())
    assert plain.state.status is Status.CANCELLED and sent(plain) == []


def test_an_agents_compensation_goes_out_as_a_request_and_its_answer_completes_it() -> None:
    plan = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "work", "next_step": "b",
              "compensate": {"action": "release", "topic": "agents.release"}},
        "b": {"action": "work", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    d = ok(start(plan), plan, "a")
    d = co.decide(d.state, plan, co.StepFailed("b", "boom", 1))
    (req,) = of(d, co.SendRequest)
    assert req.topic == "agents.release" and req.payload["data"]["output"] == {"did": "a"}
    d = co.decide(d.state, plan, co.ResponseReceived(req.request_id, True, {"ok": 1}))
    assert d.state.status is Status.COMPENSATED


def test_every_saga_event_gets_its_own_outbox_key() -> None:
    plan = booking()
    d = ok(start(plan), plan, "reserve")
    d = co.decide(d.state, plan, co.StepFailed("charge", "boom", 1))
    keys = [e.dedup_key for e in of(d, co.Emit)]
    d = co.decide(d.state, plan, co.StepFailed("reserve/compensate", "x", 1))
    for attempt in range(2, 6):
        d = co.decide(d.state, plan, co.StepFailed("reserve/compensate", "x", attempt))
    assert d.state.status is Status.FAILED
    keys += [e.dedup_key for e in of(d, co.Emit)]
    d.state.version = 7  # (the store counts versions up; a retry comes later)
    d = co.decide(d.state, plan, co.Retry())
    keys += [e.dedup_key for e in of(d, co.Emit)]
    d = ok(d, plan, "reserve/compensate", attempt=6)
    keys += [e.dedup_key for e in of(d, co.Emit)]
    assert len(keys) == len(set(keys)) == 4


# ----------------------------------------------------------------- property-based

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from chassis.state import compensated_step, request_id_for  # noqa: E402


@st.composite
def sagas(draw: st.DrawFn) -> Plan:
    """Random plans of Celery steps, agents' steps and fan-outs, some of them (and some
    sub-tasks) with a compensation of one or two attempts, Celery's or an agent's."""
    def compensate() -> dict[str, Any] | None:
        if draw(st.integers(0, 2)) == 0:
            return None
        c: dict[str, Any] = {"action": "undo", "retry": {
            "max_attempts": draw(st.integers(1, 2)), "initial_interval": 0.1}}
        if draw(st.booleans()):
            c["topic"] = "agents.undo"
        return c

    n = draw(st.integers(1, 5))
    steps: dict[str, Any] = {}
    for i in range(n):
        kind = draw(st.sampled_from(["celery", "agent", "fan_out"]))
        step: dict[str, Any] = {"action": "work", "next_step": f"s{i + 1}" if i + 1 < n
                                else "end",
                                "retry": {"max_attempts": draw(st.integers(1, 2)),
                                          "initial_interval": 0.1}}
        if kind == "agent":
            step["topic"] = f"agents.s{i}"
        if kind == "fan_out":
            step["action"] = "fan_out"
            step["sub_tasks"] = []
            for j in range(draw(st.integers(1, 3))):
                sub: dict[str, Any] = {"step_name": f"s{i}_{j}", "action": "work"}
                if draw(st.booleans()):
                    sub["topic"] = f"agents.s{i}_{j}"
                if (c := compensate()) is not None:
                    sub["compensate"] = c
                step["sub_tasks"].append(sub)
        elif (c := compensate()) is not None:
            step["compensate"] = c
        steps[f"s{i}"] = step
    steps["end"] = {"action": "complete_workflow"}
    return parse_plan({"start_step": "s0", "steps": steps})


def _in_flight(s: WorkflowState) -> list[tuple[str, int, bool]]:
    return sorted((name, a, bool(sched)) for name, (a, _b, sched) in s.attempts.items()
                  if request_id_for(CID, name, a) in s.awaited_steps)


def _report(plan: Plan, name: str, attempt: int, good: bool) -> co.Event:
    topic = plan.work(name)[1]
    if topic:
        return co.ResponseReceived(request_id_for(CID, name, attempt), good,
                                   {"n": attempt} if good else None,
                                   None if good else "broke", None if good else "Broke")
    owned = plan.subtask(name)
    if good and owned:
        return co.SubtasksSucceeded(owned[0], {name: {"n": attempt}}, {name: attempt})
    if good:
        return co.StepSucceeded(name, {"n": attempt}, attempt)
    return co.StepFailed(name, "broke", attempt, ("Broke", "Exception"))


def _batch(plan: Plan, name: str) -> str:
    owned = plan.subtask(name)
    return owned[0] if owned else name


def _batches(plan: Plan, names: list[str]) -> list[set[str]]:
    out: list[set[str]] = []
    keys: list[str] = []
    for name in names:
        key = _batch(plan, name)
        if keys and keys[-1] == key:
            out[-1].add(name)
        else:
            keys.append(key)
            out.append({name})
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=sagas(), data=st.data())
def test_every_completed_step_is_undone_once_in_reverse_order(plan: Plan,
                                                              data: st.DataObject) -> None:
    s = WorkflowState(correlation_id=CID, client_id="acme", status=Status.RUNNING,
                      current_step="s0", fuel_budget=data.draw(st.integers(8, 80)))
    d = co.decide(s, plan, co.Start())
    spent = sum(c.amount for c in of(d, co.Debit))
    completed: list[str] = []  # steps and sub-tasks whose success was taken, in order
    undone: list[str] = []  # compensations whose success was taken, in order
    # Celery sub-tasks record their success in their own rows (the store); the
    # coordinator takes them in at the fan-in, or read under lock with an event that
    # may end the fan-out (a failure, a cancel, a due retry)
    recorded: dict[str, tuple[int, Any]] = {}
    retries = 0
    for _ in range(300):
        s = d.state
        flying = [f for f in _in_flight(s) if f[0] not in recorded]
        before = set(s.awaited_steps)
        settled = dict(recorded) or None
        if s.status is Status.FAILED and s.undo and retries < 2 and data.draw(st.booleans()):
            retries += 1
            d = co.decide(s, plan, co.Retry())
        elif recorded and (not flying or data.draw(st.integers(0, 3)) == 0):
            owner = _batch(plan, next(iter(recorded)))
            d = co.decide(s, plan, co.SubtasksSucceeded(
                owner, {n: o for n, (_, o) in recorded.items()},
                {n: a for n, (a, _) in recorded.items()}))
        elif not flying:
            break
        elif (s.status in (Status.RUNNING, Status.AWAITING_RESPONSES)
              and data.draw(st.integers(0, 59)) == 0):
            try:
                d = co.decide(s, plan, co.Cancel(compensate=True), settled)
            except InvalidTransition:  # the fan-in it took in went on to compensate
                continue
        else:
            name, attempt, scheduled = data.draw(st.sampled_from(flying))
            odds = 3 if compensated_step(name) else 7  # failing 1 in odds + 1
            good = not scheduled and data.draw(st.integers(0, odds)) > 0
            if scheduled:
                d = co.decide(s, plan, co.RetryDue(name, attempt), settled)
            elif good and plan.subtask(name) and not plan.work(name)[1]:
                recorded[name] = (attempt, {"n": attempt})  # its own row, for now
                continue
            else:
                d = co.decide(s, plan, _report(plan, name, attempt, good),
                              None if good else settled)
                if good and d.changed:
                    (undone if compensated_step(name) else completed).append(name)
        # recorded sub-tasks the decision took in (none is ever abandoned: it is read
        # with every event that could abandon it)
        left = set(d.state.awaited_steps)
        for name, (attempt, _) in list(recorded.items()):
            rid = request_id_for(CID, name, attempt)
            if rid in before and rid not in left:
                assert not any(isinstance(c, co.FinishStep) and c.step == name
                               and c.status is StepStatus.CANCELLED for c in d.commands)
                completed.append(name)
                del recorded[name]
        spent += sum(c.amount for c in of(d, co.Debit))
    s = d.state
    assert s.status.finished or s.status is Status.PAUSED_FOR_HUMAN_INPUT, s.status
    assert spent == s.fuel_spent  # every debit is a ledger row
    compensable = [n for n in completed if plan.compensation(n) is not None]
    event(f"{s.status.value} {bool(s.cause)} undone={min(len(undone), 3)}")
    ran = [compensated_step(n) for n in undone]
    assert len(ran) == len(set(ran)), "a compensation was taken twice"
    assert set(ran) <= set(compensable), "a step that did not complete was undone"
    if s.status is Status.COMPLETED:
        assert ran == []
    if s.status is Status.COMPENSATED or (s.status is Status.CANCELLED and s.cause):
        assert sorted(ran) == sorted(compensable)  # every one, exactly once
        assert _batches(plan, ran) == list(reversed(_batches(plan, compensable)))
        assert s.error == s.cause
    if s.status is Status.FAILED and s.undo:
        # what ran so far is a prefix of the reverse order; the rest is still to do
        left = [n for b in s.undo for n in b]
        assert sorted(ran + left) == sorted(compensable)


def test_a_cancel_that_finds_the_fan_in_already_compensating_is_refused() -> None:
    """The fan-out's sub-tasks all recorded success; taken in with the cancel, the
    fan-in moves on to a step without fuel: the workflow compensates, and the cancel
    (of a COMPENSATING workflow) is refused rather than dropping the compensation."""
    plan = parse_plan({"start_step": "reserve", "steps": {
        "reserve": {"action": "work", "compensate": undo("reserve"), "next_step": "fan"},
        "fan": {"action": "fan_out", "next_step": "ship", "sub_tasks": [
            {"step_name": "b0", "action": "work"}, {"step_name": "b1", "action": "work"}]},
        "ship": {"action": "work", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})
    d = ok(start(plan, fuel=8), plan, "reserve")  # 1 + 5 + 1 + 1: nothing left for ship
    with pytest.raises(InvalidTransition, match="COMPENSATING"):
        co.decide(d.state, plan, co.Cancel("stop", compensate=True),
                  settled={"b0": (1, "x"), "b1": (1, "y")})
    fan_in = co.decide(d.state, plan, co.SubtasksSucceeded("fan", {"b0": "x", "b1": "y"},
                                                            {"b0": 1, "b1": 1}))
    assert fan_in.state.status is Status.COMPENSATING
    assert sent(fan_in) == ["reserve/compensate"]


def test_an_agents_request_too_large_fails_the_fan_out_before_anything_is_sent() -> None:
    plan = parse_plan({"start_step": "reserve", "steps": {
        "reserve": {"action": "work", "compensate": undo("reserve"), "next_step": "fan"},
        "fan": {"action": "fan_out", "next_step": "done", "sub_tasks": [
            {"step_name": "a1", "action": "work"},
            {"step_name": "a0", "action": "agent_work", "topic": "agents.big"}]},
        "done": {"action": "complete_workflow"}}})
    s = WorkflowState(correlation_id=CID, client_id="acme", status=Status.RUNNING,
                      current_step="reserve", fuel_budget=100,
                      initial_request_data="x" * 1_100_000)
    d = ok(co.decide(s, plan, co.Start()), plan, "reserve")
    assert d.state.status is Status.COMPENSATING
    assert sent(d) == ["reserve/compensate"]  # a1 was not sent, nor charged
    assert "more than a Kafka message takes" in d.state.error
    assert d.state.fuel_spent == 1 + 1  # reserve and its compensation
    assert ok(d, plan, "reserve/compensate").state.status is Status.COMPENSATED
