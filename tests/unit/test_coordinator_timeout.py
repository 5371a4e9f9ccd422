"""StepTimedOut: the sweep's event for a step stuck past the timeout (pure decisions)."""

from __future__ import annotations

from chassis import coordinator as co
from chassis.plan import Plan, Step, SubTask
from chassis.state import Status, StepStatus, WorkflowState

CID = "0d9e4c1a-7b3f-4e2a-8c55-1a2b3c4d5e6f"
ERROR = "step 'work' timed out after 60 s (attempt 3 of 3)"


def running(step: str) -> WorkflowState:
    return WorkflowState(correlation_id=CID, client_id="acme", status=Status.RUNNING,
                         current_step=step, fuel_budget=100)


def started(plan: Plan) -> WorkflowState:
    return co.decide(running(plan.start_step), plan, co.Start()).state


LINEAR = Plan("work", {"work": Step("noop", next_step="done"),
                       "done": Step("complete_workflow")})


def test_an_awaited_step_that_timed_out_fails_the_workflow_and_emits_the_failure() -> None:
    d = co.decide(started(LINEAR), LINEAR, co.StepTimedOut("work", ERROR))
    assert d.changed
    assert d.state.status is Status.FAILED and d.state.error == ERROR
    assert d.state.awaited_steps == []
    assert co.FinishStep("work", StepStatus.FAILED, error=ERROR) in d.commands
    (emit,) = [c for c in d.commands if isinstance(c, co.Emit)]
    assert emit.payload["event_type"] == "WORKFLOW_FAILED"
    assert emit.payload["step"] == "work" and emit.payload["error"] == ERROR


def test_a_repeated_or_late_timeout_changes_nothing() -> None:
    failed = co.decide(started(LINEAR), LINEAR, co.StepTimedOut("work", ERROR)).state
    assert not co.decide(failed, LINEAR, co.StepTimedOut("work", ERROR)).changed
    # the step finished before the sweep's event arrived: the workflow goes on
    moved = co.decide(started(LINEAR), LINEAR, co.StepSucceeded("work", {})).state
    late = co.decide(moved, LINEAR, co.StepTimedOut("work", ERROR))
    assert not late.changed and late.state is moved


def test_a_timed_out_sub_task_fails_it_and_its_fan_out() -> None:
    plan = Plan("fan", {"fan": Step("fan_out", next_step="done", sub_tasks=(
        SubTask("a", action="noop"), SubTask("b", action="noop"))),
        "done": Step("complete_workflow")})
    d = co.decide(started(plan), plan, co.StepTimedOut("b", ERROR))
    assert d.state.status is Status.FAILED
    finished = {c.step: c.status for c in d.commands if isinstance(c, co.FinishStep)}
    assert finished == {"b": StepStatus.FAILED, "fan": StepStatus.FAILED}


def test_a_workflow_waiting_for_dependencies_that_never_came_fails_at_that_step() -> None:
    plan = Plan("wait", {"other": Step("noop"),
                         "wait": Step("noop", dependencies=("other",))})
    s = started(plan)
    assert s.status is Status.RUNNING and s.awaited_steps == []
    d = co.decide(s, plan, co.StepTimedOut("wait", "stuck"))
    assert d.state.status is Status.FAILED and d.state.error == "stuck"
    assert not co.decide(s, plan, co.StepTimedOut("other", "stuck")).changed
