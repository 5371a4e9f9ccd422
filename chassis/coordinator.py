"""The saga coordinator: pure decision logic, no I/O.

``decide(state, plan, event)`` returns a :class:`Decision`: the new state and the
commands to carry out (debit fuel, dispatch a Celery step or a fan-out chord, send a
request to an external agent, write an outbox message, record a step's outcome). The
executor (``chassis.engine``) persists the state and the commands' rows in one
transaction and only then sends anything, so every transition is durable before its
effects, and replaying an event that was already applied decides nothing.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from chassis import fuel
from chassis.errors import InvalidTransition
from chassis.plan import COMPLETE, FAN_OUT, PAUSE, Plan, Step
from chassis.state import Status, StepStatus, WorkflowState, request_id_for

NOTIFICATION_TOPIC = "system.notifications.ui"
RESUME_TOPIC = "system.commands.workflow.resume"
REJECTED_ERROR = "Workflow rejected by user"

# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Start:
    """The workflow was just created (or a sweep asks to re-evaluate it)."""


@dataclass(frozen=True)
class StepSucceeded:
    """A Celery step returned ``output``."""

    step: str
    output: Any


@dataclass(frozen=True)
class StepFailed:
    """A Celery step (or fan-out sub-task) raised; the workflow fails with ``error``."""

    step: str
    error: str


@dataclass(frozen=True)
class StepTimedOut:
    """The sweep found ``step`` stuck past the step timeout, out of attempts (or a
    workflow waiting at ``step`` for dependencies that never came): the workflow fails
    with ``error``. Late (the step moved on meanwhile) or repeated, it changes nothing."""

    step: str
    error: str


@dataclass(frozen=True)
class SubtasksSucceeded:
    """A fan-out chord finished: ``outputs`` by sub-task step name; ``errors`` likewise."""

    step: str
    outputs: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)
    started: dict[str, str] = field(default_factory=dict)
    """When each sub-task started (ISO time): sub-tasks record nothing themselves."""


@dataclass(frozen=True)
class ResponseReceived:
    """An external agent answered the request ``request_id`` (its ``causation_id``)."""

    request_id: str
    success: bool
    data: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Resume:
    """A human approved or rejected a paused workflow."""

    approved: bool
    feedback: Any = None


Event = (Start | StepSucceeded | StepFailed | StepTimedOut | SubtasksSucceeded
         | ResponseReceived | Resume)

# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Debit:
    """Charge ``amount`` fuel for ``step`` (one ledger row, idempotent by step)."""

    step: str
    action: str
    amount: int


@dataclass(frozen=True)
class RunStep:
    """Run ``action`` as a Celery task for ``step``."""

    step: str
    action: str
    params: dict[str, Any]
    request_id: str
    parent_step: str | None = None


@dataclass(frozen=True)
class RunFanOut:
    """Run ``subtasks`` as a Celery group whose chord callback reports back for ``step``."""

    step: str
    subtasks: tuple[RunStep, ...]


@dataclass(frozen=True)
class SendRequest:
    """Send a TaskRequest to an external agent on ``topic`` (through the outbox)."""

    step: str
    action: str
    topic: str
    request_id: str
    headers: dict[str, str]
    payload: dict[str, Any]
    parent_step: str | None = None


@dataclass(frozen=True)
class Emit:
    """Write an outgoing message (notification or event) to the outbox."""

    topic: str
    key: str
    headers: dict[str, str]
    payload: dict[str, Any]
    dedup_key: str


@dataclass(frozen=True)
class FinishStep:
    """Record a step run's outcome."""

    step: str
    status: StepStatus
    output: Any = None
    error: str | None = None
    started_at: str | None = None


@dataclass(frozen=True)
class RecordStep:
    """Record a step the coordinator carried out itself (pause, complete)."""

    step: str
    action: str
    status: StepStatus


Command = Debit | RunStep | RunFanOut | SendRequest | Emit | FinishStep | RecordStep


@dataclass
class Decision:
    """The coordinator's answer: the new state and what to do. ``changed`` is False when
    the event was a duplicate or arrived too late: nothing is to be written or sent."""

    state: WorkflowState
    commands: list[Command] = field(default_factory=list)
    changed: bool = True


# --------------------------------------------------------------------------- decide


def json_roundtrip(value: Any) -> Any:
    """``value`` as it will read back from JSON storage; TypeError if it is not JSON."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"not JSON-serialisable: {exc}") from exc


def decide(state: WorkflowState, plan: Plan, event: Event) -> Decision:
    """Apply ``event`` to ``state`` under ``plan``. Never mutates its arguments.

    Raises :class:`InvalidTransition` for a resume of a workflow that is not paused.
    """
    if isinstance(event, Resume) and state.status is not Status.PAUSED_FOR_HUMAN_INPUT:
        raise InvalidTransition(
            f"workflow {state.correlation_id} is not paused for human input "
            f"(status: {state.status}); only a paused workflow can be resumed",
            correlation_id=state.correlation_id,
        )
    if state.status.finished:
        return Decision(state, changed=False)
    new = copy.copy(state)
    new.awaited_steps = list(state.awaited_steps)
    new.collected_data = dict(state.collected_data)
    d = Decision(new)
    if isinstance(event, Start):
        if new.status is not Status.RUNNING or new.awaited_steps:
            return Decision(state, changed=False)
    elif isinstance(event, StepSucceeded):
        if not _take(new, event.step):
            return Decision(state, changed=False)
        new.collected_data[event.step] = event.output
        d.commands.append(FinishStep(event.step, StepStatus.COMPLETED, output=event.output))
        _step_done(new, plan, event.step)
    elif isinstance(event, StepFailed):
        if request_id_for(new.correlation_id, event.step) not in new.awaited_steps:
            return Decision(state, changed=False)
        d.commands.append(FinishStep(event.step, StepStatus.FAILED, error=event.error))
        _fail(d, f"step '{event.step}' failed: {event.error}", step=event.step)
        return d
    elif isinstance(event, StepTimedOut):
        return _timed_out(d, plan, event)
    elif isinstance(event, SubtasksSucceeded):
        return _subtasks(d, plan, event)
    elif isinstance(event, ResponseReceived):
        return _response(d, plan, event)
    elif isinstance(event, Resume):
        for rid in new.awaited_steps:  # the pause step waits for this answer
            name, _ = _step_of_request(new.correlation_id, plan, rid)
            if name is not None:
                d.commands.append(FinishStep(
                    name, StepStatus.COMPLETED if event.approved else StepStatus.FAILED,
                    output={"approved": event.approved, "feedback": event.feedback}))
        new.awaited_steps = []
        if not event.approved:
            _fail(d, REJECTED_ERROR)
            return d
        if event.feedback is not None:
            new.collected_data["human_feedback"] = event.feedback
        new.status = Status.RUNNING
    _advance(d, plan)
    return d


def _take(state: WorkflowState, step: str) -> bool:
    """Remove ``step``'s request from the awaited list; False when it was not awaited."""
    rid = request_id_for(state.correlation_id, step)
    if rid not in state.awaited_steps:
        return False
    state.awaited_steps.remove(rid)
    return True


def _step_done(state: WorkflowState, plan: Plan, step: str) -> None:
    """After a Celery step: move on to its next step."""
    if not state.awaited_steps:
        state.current_step = plan.steps[step].next_step or ""
        state.status = Status.RUNNING


def _subtasks(d: Decision, plan: Plan, event: SubtasksSucceeded) -> Decision:
    s = d.state
    taken = [name for name in sorted({*event.outputs, *event.errors}) if _take(s, name)]
    if not taken:
        return Decision(d.state, changed=False)
    for name in taken:
        started = event.started.get(name)
        if name in event.errors:
            d.commands.append(FinishStep(name, StepStatus.FAILED, error=event.errors[name],
                                         started_at=started))
        else:
            s.collected_data[name] = event.outputs[name]
            d.commands.append(FinishStep(name, StepStatus.COMPLETED, output=event.outputs[name],
                                         started_at=started))
    failed = [n for n in taken if n in event.errors]
    if failed:
        d.commands.append(FinishStep(event.step, StepStatus.FAILED, error=event.errors[failed[0]]))
        _fail(d, f"sub-task '{failed[0]}' failed: {event.errors[failed[0]]}", step=failed[0])
        return d
    _fan_in(d, plan, event.step)
    return d


def _timed_out(d: Decision, plan: Plan, event: StepTimedOut) -> Decision:
    s = d.state
    rid = request_id_for(s.correlation_id, event.step)
    if rid in s.awaited_steps:
        d.commands.append(FinishStep(event.step, StepStatus.FAILED, error=event.error))
        parent = _step_of_request(s.correlation_id, plan, rid)[1]
        if parent is not None:
            d.commands.append(FinishStep(parent, StepStatus.FAILED, error=event.error))
    elif s.awaited_steps or s.current_step != event.step:
        return Decision(d.state, changed=False)  # it moved on since the sweep looked
    _fail(d, event.error, step=event.step)
    return d


def _response(d: Decision, plan: Plan, event: ResponseReceived) -> Decision:
    s = d.state
    step_name, parent = _step_of_request(s.correlation_id, plan, event.request_id)
    if step_name is None or event.request_id not in s.awaited_steps:
        return Decision(d.state, changed=False)
    s.awaited_steps.remove(event.request_id)
    if not event.success:
        error = event.error or "the agent reported failure without an error message"
        d.commands.append(FinishStep(step_name, StepStatus.FAILED, error=error))
        _fail(d, f"step '{step_name}' failed: {error}", step=step_name)
        return d
    s.collected_data[step_name] = event.data
    d.commands.append(FinishStep(step_name, StepStatus.COMPLETED, output=event.data))
    if parent is not None:
        _fan_in(d, plan, parent)
    elif not s.awaited_steps:
        s.status = Status.RUNNING
        _advance(d, plan)
    return d


def _fan_in(d: Decision, plan: Plan, fan_step: str) -> None:
    """When no sub-task is awaited any more, the fan_out step's name holds their map."""
    s = d.state
    if s.awaited_steps:
        return
    outputs = {st.step_name: s.collected_data.get(st.step_name)
               for st in plan.steps[fan_step].sub_tasks}
    s.collected_data[fan_step] = outputs
    d.commands.append(FinishStep(fan_step, StepStatus.COMPLETED, output=outputs))
    s.status = Status.RUNNING
    _advance(d, plan)


def _step_of_request(cid: str, plan: Plan, request_id: str) -> tuple[str | None, str | None]:
    """(step name, parent fan_out step or None) of a request id."""
    for name, step in plan.steps.items():
        if request_id_for(cid, name) == request_id:
            return name, None
        for st in step.sub_tasks:
            if request_id_for(cid, st.step_name) == request_id:
                return st.step_name, name
    return None, None


def _fail(d: Decision, error: str, step: str | None = None) -> None:
    s = d.state
    s.status = Status.FAILED
    s.error = error
    s.awaited_steps = []
    d.commands.append(_event(s, "WORKFLOW_FAILED", {"error": error, "step": step}))


def _event(s: WorkflowState, event_type: str, extra: dict[str, Any]) -> Emit:
    payload = {"event_type": event_type, "correlation_id": s.correlation_id,
               "project_id": s.project_id, "client_id": s.client_id, **extra}
    return Emit(NOTIFICATION_TOPIC, s.correlation_id, base_headers(s),
                payload, f"{s.correlation_id}:{event_type}")


def base_headers(s: WorkflowState) -> dict[str, str]:
    """Headers every outgoing message of this workflow carries."""
    headers = {"correlation_id": s.correlation_id, "client_id": s.client_id,
               "project_id": s.project_id or "", fuel.FUEL_HEADER: str(s.fuel_remaining)}
    if s.request_id:
        headers["causation_id"] = s.request_id
    return headers


def _advance(d: Decision, plan: Plan) -> None:
    """Run the current step if it can run: check dependencies, price and debit, dispatch."""
    s = d.state
    if s.status is not Status.RUNNING or s.awaited_steps:
        return
    name = s.current_step
    if not name:
        # a step without next_step ends the workflow (no complete step to charge for)
        _complete(d)
        return
    step = plan.steps.get(name)
    if step is None:
        _fail(d, f"step '{name}' not found in plan", step=name)
        return
    if any(dep not in s.collected_data for dep in step.dependencies):
        return  # waits until its dependencies' outputs are present
    subs = [st.resolved_action for st in step.sub_tasks] if step.action == FAN_OUT else []
    need = fuel.price(step.action, subs)
    if s.fuel_remaining < need:
        _fail(d, f"insufficient fuel for action '{step.action}': "
                 f"have {s.fuel_remaining}, need {need}", step=name)
        return
    s.fuel_spent += need
    if fuel.cost(step.action):
        d.commands.append(Debit(name, step.action, fuel.cost(step.action)))
    if step.action == COMPLETE:
        d.commands.append(RecordStep(name, COMPLETE, StepStatus.COMPLETED))
        _complete(d)
    elif step.action == PAUSE:
        _pause(d, name, step)
    elif step.action == FAN_OUT:
        _fan_out(d, name, step)
    elif step.topic:
        rid = request_id_for(s.correlation_id, name)
        d.commands.append(_request(s, name, step.action, step.topic, rid, step.params))
        s.awaited_steps = [rid]
        s.status = Status.AWAITING_RESPONSES
        s.current_step = step.next_step or ""
    else:
        rid = request_id_for(s.correlation_id, name)
        d.commands.append(RunStep(name, step.action, dict(step.params), rid))
        s.awaited_steps = [rid]


def _complete(d: Decision) -> None:
    s = d.state
    s.status = Status.COMPLETED
    s.final_result = dict(s.collected_data)
    d.commands.append(_event(s, "WORKFLOW_COMPLETED", {"final_result": s.final_result}))


def _pause(d: Decision, name: str, step: Step) -> None:
    s = d.state
    s.status = Status.PAUSED_FOR_HUMAN_INPUT
    s.current_step = step.next_step or ""
    s.awaited_steps = [request_id_for(s.correlation_id, name)]  # awaits the human's answer
    d.commands.append(RecordStep(name, PAUSE, StepStatus.AWAITING))
    payload = {
        "event_type": "WORKFLOW_PAUSED_FOR_APPROVAL",
        "correlation_id": s.correlation_id,
        "project_id": s.project_id,
        "client_id": s.client_id,
        "message": f"Step '{step.description or name}' requires your approval",
        "data_for_review": dict(s.collected_data),
    }
    d.commands.append(Emit(NOTIFICATION_TOPIC, s.correlation_id, base_headers(s), payload,
                           f"{s.correlation_id}:paused:{name}"))


def _fan_out(d: Decision, name: str, step: Step) -> None:
    s = d.state
    celery: list[RunStep] = []
    for st in step.sub_tasks:
        action = st.resolved_action
        rid = request_id_for(s.correlation_id, st.step_name)
        if fuel.cost(action):
            d.commands.append(Debit(st.step_name, action, fuel.cost(action)))
        if st.topic:
            d.commands.append(_request(s, st.step_name, action, st.topic, rid, st.params, name))
        else:
            celery.append(RunStep(st.step_name, action, dict(st.params), rid, parent_step=name))
        s.awaited_steps.append(rid)
    if celery:
        d.commands.append(RunFanOut(name, tuple(celery)))
    s.status = Status.AWAITING_RESPONSES
    s.current_step = step.next_step or ""


def _request(s: WorkflowState, step: str, action: str, topic: str, rid: str,
             params: dict[str, Any], parent: str | None = None) -> SendRequest:
    headers = base_headers(s)
    headers["causation_id"] = s.request_id or s.correlation_id
    headers["request_id"] = rid
    payload = {"action": action, "data": s.step_data(), "params": dict(params)}
    return SendRequest(step, action, topic, rid, headers, payload, parent_step=parent)
