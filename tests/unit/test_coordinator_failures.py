"""The failure model as pure decisions: retries, timeouts, lost workers, cancel, an
operator's retry (no database, no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from chassis import coordinator as co
from chassis.errors import InvalidTransition
from chassis.plan import Plan, parse_plan
from chassis.policy import TIMEOUT_ERROR, WORKER_LOST_ERROR
from chassis.state import Status, StepStatus, WorkflowState, request_id_for

CID = "2f6b8c1e-0a4d-4f3b-9c7e-5d1a2b3c4e5f"


def plan_of(steps: dict[str, Any], start: str = "a", **top: Any) -> Plan:
    return parse_plan({"start_step": start, "steps": steps, **top})


def linear(retry: dict[str, Any] | None = None, topic: str | None = None,
           timeout: float | None = None) -> Plan:
    a: dict[str, Any] = {"action": "flaky", "next_step": "done"}
    if retry is not None:
        a["retry"] = retry
    if topic:
        a["topic"] = topic
    if timeout:
        a["timeout"] = timeout
    return plan_of({"a": a, "done": {"action": "complete_workflow"}})


def start(plan: Plan, fuel: int = 100) -> co.Decision:
    s = WorkflowState(correlation_id=CID, client_id="acme", status=Status.RUNNING,
                      current_step=plan.start_step, fuel_budget=fuel)
    return co.decide(s, plan, co.Start())


def of(d: co.Decision, kind: type) -> list[Any]:
    return [c for c in d.commands if isinstance(c, kind)]


def test_a_step_that_fails_twice_then_succeeds_completes_with_three_attempts() -> None:
    plan = linear({"max_attempts": 3, "initial_interval": 0.2})
    d = start(plan)
    debits = of(d, co.Debit)
    for attempt in (1, 2):
        d = co.decide(d.state, plan, co.StepFailed("a", "flaked", attempt, ("ValueError",)))
        (fin,) = of(d, co.FinishStep)
        assert (fin.attempt, fin.status, fin.error, fin.error_type) == (
            attempt, StepStatus.FAILED, "flaked", "ValueError")
        (run,) = of(d, co.RunStep)
        assert run.attempt == attempt + 1
        assert run.request_id == request_id_for(CID, "a", attempt + 1)
        assert 0 < run.delay <= 0.2 * 2 ** (attempt - 1)  # backoff, jittered down
        debits += of(d, co.Debit)
    d = co.decide(d.state, plan, co.StepSucceeded("a", {"ok": True}, 3))
    debits += of(d, co.Debit)
    assert d.state.status is Status.COMPLETED
    assert d.state.attempts["a"][0] == 3
    assert [x.key for x in debits] == [f"{CID}:a", f"{CID}:a#2", f"{CID}:a#3", f"{CID}:done"]
    assert sum(x.amount for x in debits) == d.state.fuel_spent == 4


def test_out_of_attempts_the_error_names_the_step_and_the_attempts() -> None:
    plan = linear({"max_attempts": 2, "initial_interval": 0.2})
    d = start(plan)
    d = co.decide(d.state, plan, co.StepFailed("a", "flaked", 1))
    d = co.decide(d.state, plan, co.StepFailed("a", "still flaky", 2))
    assert d.state.status is Status.FAILED
    assert d.state.error == "step 'a' failed after 2 attempts: still flaky"
    (event,) = of(d, co.Emit)
    assert event.payload["event_type"] == "WORKFLOW_FAILED"
    assert event.payload["step"] == "a"
    assert of(d, co.RunStep) == [] and of(d, co.Debit) == []


def test_without_a_policy_one_failure_fails_with_the_original_message() -> None:
    plan = linear()
    d = co.decide(start(plan).state, plan, co.StepFailed("a", "kaboom"))
    assert d.state.error == "step 'a' failed: kaboom"


@pytest.mark.parametrize(("listed", "types", "retried"), [
    (["ValueError"], ("ValueError", "Exception"), False),
    (["LookupError"], ("KeyError", "LookupError", "Exception"), False),  # a base class
    (["mylib.errors.Fatal"], ("Fatal", "Exception"), False),  # dotted names
    (["ValueError"], ("TypeError", "Exception"), True),
    ([TIMEOUT_ERROR], (TIMEOUT_ERROR,), False),
])
def test_non_retryable_error_types_fail_at_once(listed: list[str], types: tuple[str, ...],
                                               retried: bool) -> None:
    plan = linear({"max_attempts": 5, "non_retryable": listed})
    d = co.decide(start(plan).state, plan, co.StepFailed("a", "bad", 1, types))
    assert bool(of(d, co.RunStep)) is retried
    if not retried:
        assert d.state.error == f"step 'a' failed ({types[0]} is not retried): bad"


def test_duplicates_and_late_results_change_nothing() -> None:
    plan = linear({"max_attempts": 3, "initial_interval": 0.2})
    first = start(plan).state
    retried = co.decide(first, plan, co.StepFailed("a", "flaked", 1)).state
    for late in (co.StepFailed("a", "flaked", 1), co.StepSucceeded("a", {"late": 1}, 1),
                 co.StepSucceeded("a", {}, 7)):
        d = co.decide(retried, plan, late)
        assert not d.changed and d.state is retried and d.commands == []


def test_long_delays_are_scheduled_and_sent_once_when_due() -> None:
    plan = linear({"max_attempts": 2, "initial_interval": 600})
    d = co.decide(start(plan).state, plan, co.StepFailed("a", "flaked", 1))
    (later,) = of(d, co.ScheduleStep)
    assert later.attempt == 2 and 300 <= later.delay <= 600 and of(d, co.RunStep) == []
    assert of(d, co.Debit)[0].key == f"{CID}:a#2"  # priced when decided
    due = co.decide(d.state, plan, co.RetryDue("a", 2))
    (run,) = of(due, co.RunStep)
    assert run.scheduled and run.attempt == 2 and run.delay == 0
    assert of(due, co.Debit) == []
    assert not co.decide(due.state, plan, co.RetryDue("a", 2)).changed
    assert not co.decide(d.state, plan, co.RetryDue("a", 1)).changed


def test_the_delay_is_deterministic_and_capped() -> None:
    policy = plan_of({"a": {"action": "x", "retry": {
        "initial_interval": 1, "backoff_coefficient": 3, "max_interval": 10}}}).policy("a")
    assert policy.delay(2, "seed") == policy.delay(2, "seed")
    assert [policy.delay(n, "s") <= min(10, 3 ** (n - 1)) for n in range(1, 60)] == [True] * 59
    assert policy.delay(1000, "s") >= 5  # equal jitter: at least half the cap


def test_an_agents_failed_answer_is_retried_with_a_new_request_id() -> None:
    plan = linear({"max_attempts": 2, "initial_interval": 1}, topic="agents.lookup")
    d = start(plan)
    (first,) = of(d, co.SendRequest)
    d = co.decide(d.state, plan, co.ResponseReceived(first.request_id, False, error="busy"))
    (later,) = of(d, co.ScheduleStep)  # an agent's retry waits for the sweep
    d = co.decide(d.state, plan, co.RetryDue("a", 2))
    (second,) = of(d, co.SendRequest)
    assert second.request_id == request_id_for(CID, "a", 2) != first.request_id
    assert second.headers["request_id"] == second.request_id
    assert second.dedup_key == f"{CID}:request:a#2" and second.scheduled
    # the first request's late answer is ignored once the second is out
    assert not co.decide(d.state, plan, co.ResponseReceived(first.request_id, True, {})).changed
    done = co.decide(d.state, plan, co.ResponseReceived(second.request_id, True, {"r": 1}))
    assert done.state.status is Status.COMPLETED and done.state.collected_data["a"] == {"r": 1}


def test_a_timed_out_attempt_is_a_failed_attempt() -> None:
    plan = linear({"max_attempts": 2, "initial_interval": 0.5}, timeout=2)
    d = start(plan)
    assert of(d, co.RunStep)[0].timeout == 2
    d = co.decide(d.state, plan, co.StepFailed("a", "timed out after 2 s", 1, (TIMEOUT_ERROR,)))
    assert of(d, co.RunStep)[0].attempt == 2
    d = co.decide(d.state, plan, co.StepFailed("a", "timed out after 2 s", 2, (TIMEOUT_ERROR,)))
    assert d.state.status is Status.FAILED
    assert d.state.error == "step 'a' failed after 2 attempts: timed out after 2 s"


def test_a_worker_lost_too_often_is_a_failed_attempt_too() -> None:
    plan = linear()
    d = co.decide(start(plan).state, plan,
                  co.StepFailed("a", "its worker was lost 3 times", 1, (WORKER_LOST_ERROR,)))
    assert d.state.status is Status.FAILED and "worker was lost" in (d.state.error or "")


def test_retrying_without_fuel_fails_with_the_original_message() -> None:
    plan = linear({"max_attempts": 3})
    d = start(plan, fuel=1)
    d = co.decide(d.state, plan, co.StepFailed("a", "flaked", 1))
    assert d.state.status is Status.FAILED
    assert d.state.error == "insufficient fuel for action 'flaky': have 0, need 1"
    assert d.state.fuel_spent == 1


FAN = plan_of({
    "fan": {"action": "fan_out", "next_step": "done", "retry": {"max_attempts": 2},
            "sub_tasks": [{"step_name": "s1", "action": "x"},
                          {"step_name": "s2", "action": "x", "retry": {"max_attempts": 1}},
                          {"step_name": "s3", "action": "x"}]},
    "done": {"action": "complete_workflow"}}, start="fan")


def test_a_sub_task_is_retried_alone_and_the_fan_out_waits_for_it() -> None:
    d = start(FAN)
    assert [t.step for t in of(d, co.RunFanOut)[0].subtasks] == ["s1", "s2", "s3"]
    d = co.decide(d.state, FAN, co.StepFailed("s1", "flaked", 1))
    (again,) = of(d, co.RunStep)
    assert (again.step, again.attempt, again.parent_step) == ("s1", 2, "fan")
    d = co.decide(d.state, FAN, co.SubtasksSucceeded("fan", {"s2": 2, "s3": 3}))
    assert d.state.status is Status.AWAITING_RESPONSES and d.state.current_step == "fan"
    d = co.decide(d.state, FAN, co.SubtasksSucceeded("fan", {"s1": 1, "s2": 2, "s3": 3},
                                                     {"s1": 2, "s2": 1, "s3": 1}))
    assert d.state.status is Status.COMPLETED
    assert d.state.collected_data["fan"] == {"s1": 1, "s2": 2, "s3": 3}


def test_a_sub_task_out_of_attempts_fails_the_fan_out_and_abandons_its_siblings() -> None:
    d = start(FAN)
    d = co.decide(d.state, FAN, co.StepFailed("s2", "no", 1))
    assert d.state.status is Status.FAILED
    assert d.state.error == "sub-task 's2' failed: no"
    finished = {(c.step, c.status) for c in of(d, co.FinishStep)}
    assert finished == {("s2", StepStatus.FAILED), ("s1", StepStatus.CANCELLED),
                        ("s3", StepStatus.CANCELLED), ("fan", StepStatus.FAILED)}
    (revoke,) = of(d, co.Revoke)  # the siblings' work would be wasted
    assert set(revoke.task_ids) == {request_id_for(CID, n) for n in ("s1", "s3")}


def test_cancel_revokes_what_runs_and_ignores_late_results() -> None:
    plan = linear()
    d = start(plan)
    rid = of(d, co.RunStep)[0].request_id
    c = co.decide(d.state, plan, co.Cancel("not needed"))
    assert c.state.status is Status.CANCELLED
    assert c.state.error == "Workflow cancelled: not needed"
    assert of(c, co.Revoke) == [co.Revoke((rid,))]
    assert of(c, co.FinishStep)[0].status is StepStatus.CANCELLED
    (event,) = of(c, co.Emit)
    assert event.payload["event_type"] == "WORKFLOW_CANCELLED"
    assert event.payload["reason"] == "not needed"
    assert not co.decide(c.state, plan, co.StepSucceeded("a", {}, 1)).changed
    with pytest.raises(InvalidTransition, match="already CANCELLED"):
        co.decide(c.state, plan, co.Cancel())


def test_cancel_of_a_paused_or_waiting_workflow_revokes_no_task() -> None:
    plan = plan_of({"p": {"action": "pause_for_human_input", "next_step": "done"},
                    "done": {"action": "complete_workflow"}}, start="p")
    c = co.decide(start(plan).state, plan, co.Cancel())
    assert c.state.status is Status.CANCELLED and of(c, co.Revoke) == []
    agent = linear(topic="agents.x")
    c = co.decide(start(agent).state, agent, co.Cancel())
    assert of(c, co.Revoke) == []


def test_a_finished_workflow_cannot_be_cancelled() -> None:
    plan = plan_of({"a": {"action": "complete_workflow"}})
    done = start(plan).state
    with pytest.raises(InvalidTransition, match="already COMPLETED"):
        co.decide(done, plan, co.Cancel())


def test_an_operators_retry_goes_on_from_the_failed_step_with_fresh_attempts() -> None:
    plan = plan_of({"a": {"action": "echo", "next_step": "b"},
                    "b": {"action": "flaky", "retry": {"max_attempts": 2}, "next_step": "done"},
                    "done": {"action": "complete_workflow"}})
    d = start(plan)
    d = co.decide(d.state, plan, co.StepSucceeded("a", {"kept": True}))
    d = co.decide(d.state, plan, co.StepFailed("b", "down", 1))
    d = co.decide(d.state, plan, co.StepFailed("b", "down", 2))
    failed = d.state
    assert failed.status is Status.FAILED and failed.current_step == "b"
    r = co.decide(failed, plan, co.Retry())
    assert r.state.status is Status.RUNNING and r.state.error is None
    (run,) = of(r, co.RunStep)
    assert (run.step, run.attempt) == ("b", 3)
    assert of(r, co.Debit)[0].key == f"{CID}:b#3"
    assert r.state.collected_data["a"] == {"kept": True}
    # a fresh budget: attempt 3 may fail once more and be retried
    again = co.decide(r.state, plan, co.StepFailed("b", "down", 3))
    assert of(again, co.RunStep)[0].attempt == 4
    with pytest.raises(InvalidTransition, match="only a FAILED workflow"):
        co.decide(r.state, plan, co.Retry())


def test_retrying_a_fan_out_runs_only_the_sub_tasks_without_output() -> None:
    d = start(FAN)
    spent = d.state.fuel_spent
    d = co.decide(d.state, FAN, co.StepFailed("s2", "no", 1))
    r = co.decide(d.state, FAN, co.Retry({"s1": "one"}, {"s1": 1}))
    (group,) = of(r, co.RunFanOut)
    assert [(t.step, t.attempt) for t in group.subtasks] == [("s2", 2), ("s3", 2)]
    assert sum(x.amount for x in of(r, co.Debit)) == 2  # no second fan_out price
    assert r.state.fuel_spent == spent + 2
    (parent,) = of(r, co.RecordStep)
    assert (parent.attempt, parent.pending) == (2, 2)
    done = co.decide(r.state, FAN, co.SubtasksSucceeded("fan", {"s2": 2, "s3": 3},
                                                        {"s2": 2, "s3": 2}))
    assert done.state.status is Status.COMPLETED
    assert done.state.collected_data["fan"] == {"s1": "one", "s2": 2, "s3": 3}


def test_retrying_a_rejected_workflow_asks_again() -> None:
    plan = plan_of({"p": {"action": "pause_for_human_input", "next_step": "done"},
                    "done": {"action": "complete_workflow"}}, start="p")
    rejected = co.decide(start(plan).state, plan, co.Resume(False)).state
    again = co.decide(rejected, plan, co.Retry())
    assert again.state.status is Status.PAUSED_FOR_HUMAN_INPUT
    (note,) = of(again, co.Emit)
    assert note.dedup_key == f"{CID}:paused:p#2"
    assert co.decide(again.state, plan, co.Resume(True)).state.status is Status.COMPLETED


def test_a_stalled_workflow_fails_at_that_step_and_a_late_report_changes_nothing() -> None:
    plan = plan_of({"other": {"action": "noop"},
                    "wait": {"action": "noop", "dependencies": ["other"]}}, start="wait")
    s = start(plan).state
    assert s.status is Status.RUNNING and s.awaited_steps == []
    d = co.decide(s, plan, co.Stalled("wait", "stuck"))
    assert d.state.status is Status.FAILED and d.state.error == "stuck"
    assert not co.decide(s, plan, co.Stalled("other", "stuck")).changed


def test_every_failure_event_gets_its_own_outbox_key() -> None:
    plan = linear()
    failed = co.decide(start(plan).state, plan, co.StepFailed("a", "x")).state
    failed.version = 3
    again = co.decide(co.decide(failed, plan, co.Retry()).state, plan, co.StepFailed("a", "y", 2))
    keys = {c.dedup_key for c in of(again, co.Emit)}
    assert keys == {f"{CID}:WORKFLOW_FAILED:3"}
