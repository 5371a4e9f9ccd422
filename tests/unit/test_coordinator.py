"""The seed's coordinator_test.go scenarios, as tests of pure decisions (no I/O)."""

from __future__ import annotations

import pytest

from chassis import coordinator as co
from chassis.errors import InvalidTransition
from chassis.plan import Plan, Step, SubTask
from chassis.state import Status, StepStatus, WorkflowState, request_id_for

CID = "5b0c3c5e-8f3a-4f0e-9a51-2f7d7c1e0a11"


def state(step: str, fuel: int = 1000, **kw: object) -> WorkflowState:
    return WorkflowState(correlation_id=CID, client_id="test_client_123", status=Status.RUNNING,
                         current_step=step, fuel_budget=fuel, request_id="parent_req_1", **kw)


def of(d: co.Decision, kind: type) -> list:
    return [c for c in d.commands if isinstance(c, kind)]


def test_initial_step_sends_request_with_headers_and_debits_default_step() -> None:
    plan = Plan("step1", {"step1": Step("do_something", topic="topic.do_something",
                                        next_step="finish"),
                          "finish": Step("complete_workflow")})
    d = co.decide(state("step1"), plan, co.Start())
    (req,) = of(d, co.SendRequest)
    assert req.topic == "topic.do_something"
    assert req.headers["correlation_id"] == CID
    assert req.headers["causation_id"] == "parent_req_1"
    assert req.headers["request_id"] not in ("", "parent_req_1")
    assert req.headers["fuel_budget"] == "999"  # 1000 - 1 for default_step
    assert of(d, co.Debit) == [co.Debit("step1", "do_something", 1, f"{CID}:step1")]
    assert d.state.status is Status.AWAITING_RESPONSES
    assert d.state.current_step == "step1"  # where it waits (the seed moved on at once)
    assert d.state.awaited_steps == [req.request_id]


def test_already_completed_decides_nothing() -> None:
    s = state("step1", final_result={"result": "done"})
    s.status = Status.COMPLETED
    d = co.decide(s, Plan("step1", {"step1": Step("do_something")}), co.Start())
    assert not d.changed and d.commands == [] and d.state is s


def test_dependencies_not_met_waits() -> None:
    plan = Plan("step2", {"step1": Step("do_something"),
                          "step2": Step("do_something_else", dependencies=("step1",))})
    d = co.decide(state("step2"), plan, co.Start())
    assert [type(c) for c in d.commands] == [co.Note]  # started, and nothing to do yet
    assert d.state.status is Status.RUNNING and d.state.current_step == "step2"
    assert d.state.fuel_spent == 0


def test_insufficient_fuel_fails_with_the_original_message() -> None:
    plan = Plan("step1", {"step1": Step("ai_text_generate_claude_opus", topic="topic.expensive")})
    d = co.decide(state("step1", fuel=5), plan, co.Start())
    assert d.state.status is Status.FAILED
    assert d.state.error == (
        "insufficient fuel for action 'ai_text_generate_claude_opus': have 5, need 50")
    assert of(d, co.Debit) == [] and of(d, co.SendRequest) == []
    assert d.state.fuel_spent == 0


def test_fan_out_sends_all_sub_tasks_priced_all_or_nothing() -> None:
    plan = Plan("fan", {
        "fan": Step("fan_out", next_step="aggregate_results", sub_tasks=(
            SubTask("get_research", topic="topic.research"),
            SubTask("get_style", topic="topic.style"))),
        "aggregate_results": Step("complete_workflow")})
    d = co.decide(state("fan"), plan, co.Start())
    reqs = of(d, co.SendRequest)
    assert [r.topic for r in reqs] == ["topic.research", "topic.style"]
    assert all(r.headers["causation_id"] == "parent_req_1" for r in reqs)
    assert len({r.headers["request_id"] for r in reqs}) == 2
    # fan_out 5 + two default-priced sub-tasks
    assert {r.headers["fuel_budget"] for r in reqs} == {"993"}
    assert sum(x.amount for x in of(d, co.Debit)) == 7 == d.state.fuel_spent
    assert d.state.status is Status.AWAITING_RESPONSES
    assert d.state.current_step == "fan"
    assert len(d.state.awaited_steps) == 2
    poor = co.decide(state("fan", fuel=6), plan, co.Start())
    assert poor.state.status is Status.FAILED and "have 6, need 7" in (poor.state.error or "")


def test_celery_fan_out_is_one_group() -> None:
    plan = Plan("fan", {"fan": Step("fan_out", next_step="done", sub_tasks=(
        SubTask("a", action="echo", params={"x": 1}), SubTask("b", action="noop"))),
        "done": Step("complete_workflow")})
    d = co.decide(state("fan"), plan, co.Start())
    (group,) = of(d, co.RunFanOut)
    assert [t.step for t in group.subtasks] == ["a", "b"]
    assert group.subtasks[0].params == {"x": 1} and group.subtasks[0].parent_step == "fan"
    (parent,) = of(d, co.RecordStep)
    assert (parent.step, parent.status, parent.pending) == ("fan", StepStatus.AWAITING, 2)
    done = co.decide(d.state, plan, co.SubtasksSucceeded("fan", {"a": {"x": 1}, "b": {}}))
    assert done.state.status is Status.COMPLETED
    assert done.state.final_result == {"a": {"x": 1}, "b": {}, "fan": {"a": {"x": 1}, "b": {}}}
    again = co.decide(done.state, plan, co.SubtasksSucceeded("fan", {"a": {}, "b": {}}))
    assert not again.changed


def test_pause_for_human_input_emits_notification() -> None:
    plan = Plan("review", {"review": Step("pause_for_human_input", next_step="after_approval",
                                          description="Review generated content"),
                           "after_approval": Step("complete_workflow")})
    s = state("review", collected_data={"generated_content": "Some content to review"})
    s.project_id = "project_123"
    d = co.decide(s, plan, co.Start())
    (note,) = of(d, co.Emit)
    assert note.topic == co.NOTIFICATION_TOPIC
    assert note.payload["event_type"] == "WORKFLOW_PAUSED_FOR_APPROVAL"
    assert note.payload["correlation_id"] == CID
    assert note.payload["project_id"] == "project_123"
    assert note.payload["client_id"] == "test_client_123"
    assert note.payload["message"] == "Step 'Review generated content' requires your approval"
    assert note.payload["data_for_review"] == {"generated_content": "Some content to review"}
    assert d.state.status is Status.PAUSED_FOR_HUMAN_INPUT
    assert d.state.current_step == "review"  # where it waits
    assert of(d, co.Debit) == []  # pausing costs nothing
    approved = co.decide(d.state, plan, co.Resume(True, {"ok": 1}))
    assert approved.state.status is Status.COMPLETED
    assert approved.state.collected_data["human_feedback"] == {"ok": 1}


def test_handle_response_keeps_awaiting_until_the_last_then_continues() -> None:
    plan = Plan("fan", {"fan": Step("fan_out", next_step="aggregate", sub_tasks=(
        SubTask("r1", topic="t.r1"), SubTask("r2", topic="t.r2"))),
        "aggregate": Step("complete_workflow")})
    s = co.decide(state("fan", collected_data={"existing": "data"}), plan, co.Start()).state
    r1, r2 = request_id_for(CID, "r1"), request_id_for(CID, "r2")
    d = co.decide(s, plan, co.ResponseReceived(r1, True, {"result": "task completed"}))
    assert d.state.status is Status.AWAITING_RESPONSES
    assert d.state.current_step == "fan"
    assert d.state.awaited_steps == [r2]
    # keyed by step name, not request id (the seed's keys could never match dependencies)
    assert d.state.collected_data["r1"] == {"result": "task completed"}
    dup = co.decide(d.state, plan, co.ResponseReceived(r1, True, {"again": 1}))
    assert not dup.changed
    # the seed's TODO: the last response continues with the next step
    last = co.decide(d.state, plan, co.ResponseReceived(r2, True, {"b": 2}))
    assert last.state.status is Status.COMPLETED
    assert last.state.final_result["fan"] == {"r1": {"result": "task completed"}, "r2": {"b": 2}}


def test_failed_response_fails_the_workflow_with_the_agent_error() -> None:
    plan = Plan("s", {"s": Step("lookup", topic="t.lookup", next_step="f"),
                      "f": Step("complete_workflow")})
    s = co.decide(state("s"), plan, co.Start()).state
    d = co.decide(s, plan, co.ResponseReceived(request_id_for(CID, "s"), False, error="boom"))
    assert d.state.status is Status.FAILED and d.state.error == "step 's' failed: boom"


def paused(plan_next: str = "after_approval") -> WorkflowState:
    """A workflow paused before this version: current_step already names the step after
    the pause, and the pause's request (attempt 1) is awaited."""
    s = state(plan_next)
    s.status = Status.PAUSED_FOR_HUMAN_INPUT
    s.awaited_steps = [request_id_for(CID, "review")]
    return s


RESUME_PLAN = Plan("review", {
    "review": Step("pause_for_human_input", next_step="after_approval"),
    "after_approval": Step("echo", next_step="finish"),
    "finish": Step("complete_workflow")})


def test_resume_approved_stores_feedback_and_continues() -> None:
    d = co.decide(paused(), RESUME_PLAN, co.Resume(True, {"comment": "Looks good!"}))
    assert d.state.status is Status.RUNNING
    assert d.state.collected_data["human_feedback"] == {"comment": "Looks good!"}
    (run,) = of(d, co.RunStep)
    assert run.step == "after_approval"


def test_resume_rejected_fails() -> None:
    d = co.decide(paused(), RESUME_PLAN, co.Resume(False))
    assert d.state.status is Status.FAILED
    assert d.state.error == "Workflow rejected by user"
    assert of(d, co.FinishStep)[0].status is StepStatus.FAILED


def test_who_acted_is_noted_and_an_admin_reaches_any_clients_workflow() -> None:
    """A key's action (``by``) names the key in the history; the client is still checked
    against the owner (None: an admin key, any owner)."""
    by = "test_client_123 via key 0123456789ab"
    d = co.decide(paused(), RESUME_PLAN, co.Resume(True, None, "test_client_123", 0, by))
    (note,) = [n for n in of(d, co.Note) if n.kind == "resumed"]
    assert note.actor == by
    admin = "ops via key ba9876543210"
    d = co.decide(paused(), RESUME_PLAN, co.Cancel("stop", None, False, admin))
    assert [n.actor for n in of(d, co.Note) if n.kind == "cancel_requested"] == [admin]
    d = co.decide(state("s"), Plan("s", {"s": Step("echo")}), co.Start(by))
    assert [n.actor for n in of(d, co.Note) if n.kind == "started"] == [by]
    plain = co.decide(state("s"), Plan("s", {"s": Step("echo")}), co.Start())
    assert [n.actor for n in of(plain, co.Note)] == ["test_client_123"]
    from chassis.errors import WorkflowNotFound

    with pytest.raises(WorkflowNotFound):  # another client's key: as an unknown id
        co.decide(paused(), RESUME_PLAN, co.Resume(True, None, "other", 0, "other via key x"))


def test_an_unanswered_agents_request_is_sent_again_as_it_was() -> None:
    plan = Plan("ask", {"ask": Step("research", topic="agents.research",
                                    params={"depth": 2}, next_step="done"),
                        "done": Step("complete_workflow")})
    s = co.decide(state("ask"), plan, co.Start()).state
    (first,) = of(co.decide(state("ask"), plan, co.Start()), co.SendRequest)
    d = co.decide(s, plan, co.RequestUnanswered("ask", 1, 2))
    (again,) = of(d, co.Emit)
    assert again.topic == "agents.research" and again.key == CID
    assert again.headers == first.headers and again.payload == first.payload
    assert again.headers["request_id"] == request_id_for(CID, "ask")
    assert again.dedup_key == first.dedup_key + ":again2"
    assert [n.kind for n in of(d, co.Note)] == ["request_resent"]
    assert not of(d, co.Debit)  # asking again costs nothing
    # answered meanwhile, or another attempt under way: nothing to do
    answered = co.decide(s, plan, co.ResponseReceived(request_id_for(CID, "ask"), True,
                                                      {"ok": 1})).state
    assert not co.decide(answered, plan, co.RequestUnanswered("ask", 1, 1)).changed
    assert not co.decide(s, plan, co.RequestUnanswered("ask", 2, 1)).changed


def test_a_request_says_how_long_its_step_waits_for_the_answer() -> None:
    plan = Plan("ask", {"ask": Step("research", topic="agents.research", timeout=7200,
                                    next_step="done"),
                        "done": Step("complete_workflow")})
    (req,) = of(co.decide(state("ask"), plan, co.Start()), co.SendRequest)
    assert req.headers["timeout"] == "7200"
    plan.steps["ask"] = Step("research", topic="agents.research", next_step="done")
    (req,) = of(co.decide(state("ask"), plan, co.Start()), co.SendRequest)
    assert "timeout" not in req.headers  # the agent's own limit then


def test_resume_of_a_workflow_not_paused_is_an_error() -> None:
    with pytest.raises(InvalidTransition, match="not paused"):
        co.decide(state("after_approval"), RESUME_PLAN, co.Resume(True))


def test_complete_workflow_sets_final_result_and_charges_default_step() -> None:
    s = state("final", collected_data={"step1_result": "data1", "step2_result": "data2"})
    d = co.decide(s, Plan("final", {"final": Step("complete_workflow")}), co.Start())
    assert d.state.status is Status.COMPLETED
    assert d.state.final_result == {"step1_result": "data1", "step2_result": "data2"}
    assert of(d, co.Debit) == [co.Debit("final", "complete_workflow", 1, f"{CID}:final")]
    assert of(d, co.Emit)[0].payload["event_type"] == "WORKFLOW_COMPLETED"


def test_celery_steps_chain_and_duplicates_are_ignored() -> None:
    plan = Plan("a", {"a": Step("echo", params={"v": 1}, next_step="b"),
                      "b": Step("noop", dependencies=("a",), next_step="c"),
                      "c": Step("complete_workflow")})
    d = co.decide(state("a"), plan, co.Start())
    assert of(d, co.RunStep) == [co.RunStep("a", "echo", {"v": 1}, request_id_for(CID, "a"))]
    d2 = co.decide(d.state, plan, co.StepSucceeded("a", {"v": 1}))
    assert of(d2, co.FinishStep) == [co.FinishStep("a", StepStatus.COMPLETED, output={"v": 1},
                                                   attempt=1)]
    assert [c.step for c in of(d2, co.RunStep)] == ["b"]
    assert not co.decide(d2.state, plan, co.StepSucceeded("a", {"v": 1})).changed
    d3 = co.decide(d2.state, plan, co.StepSucceeded("b", {}))
    assert d3.state.status is Status.COMPLETED and d3.state.fuel_spent == 3


def test_step_failure_fails_the_workflow_with_its_message() -> None:
    plan = Plan("a", {"a": Step("fail", next_step="c"), "c": Step("complete_workflow")})
    d = co.decide(state("a"), plan, co.Start())
    f = co.decide(d.state, plan, co.StepFailed("a", "kaboom"))
    assert f.state.status is Status.FAILED and f.state.error == "step 'a' failed: kaboom"
    assert of(f, co.Emit)[0].payload["event_type"] == "WORKFLOW_FAILED"


def test_decide_does_not_mutate_its_input() -> None:
    plan = Plan("a", {"a": Step("echo", next_step="c"), "c": Step("complete_workflow")})
    s = state("a")
    co.decide(s, plan, co.Start())
    assert s.awaited_steps == [] and s.fuel_spent == 0 and s.status is Status.RUNNING
