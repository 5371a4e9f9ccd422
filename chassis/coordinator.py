"""The saga coordinator: pure decision logic, no I/O.

``decide(state, plan, event)`` returns a :class:`Decision`: the new state and the
commands to carry out (debit fuel, dispatch a Celery step or a fan-out group, schedule
a retry, send a request to an external agent, write an outbox message, record an
attempt's outcome, revoke tasks). The executor (``chassis.engine``) persists the state
and the commands' rows in one transaction and only then sends anything, so every
transition is durable before its effects, and replaying an event that was already
applied decides nothing.

Attempts are part of the state: ``state.attempts[step]`` is the latest attempt of each
step or sub-task, and every attempt has its own request id (its Celery task id and an
agent's causation_id), history row and debit. An event names the attempt it is about;
one about an attempt no longer awaited (a duplicate, a late result after a timeout or
a retry) changes nothing.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from chassis import fuel, pricing
from chassis.ai.provider import DEFAULT_MAX_TOKENS
from chassis.commands import (
    Command,
    Debit,
    Decision,
    Emit,
    FinishStep,
    Note,
    RecordStep,
    Revoke,
    RunFanOut,
    RunStep,
    ScheduleStep,
    SendRequest,
    Usage,
)
from chassis.errors import InvalidTransition, StepMismatch, WorkflowNotFound
from chassis.events import (
    AddFuel,
    ApprovalExpired,
    Cancel,
    Event,
    RequestUnanswered,
    ResponseReceived,
    Resume,
    Retry,
    RetryDue,
    Stalled,
    Start,
    StepFailed,
    StepSucceeded,
    SubtasksSucceeded,
)
from chassis.limits import EVENT_FIELD_MAX, INT32_MAX, MESSAGE_MAX
from chassis.plan import COMPLETE, FAN_OUT, PAUSE, Plan, Step
from chassis.policy import TIMEOUT_ERROR
from chassis.state import (
    Status,
    StepStatus,
    WorkflowState,
    compensated_step,
    compensation_of,
    request_id_for,
)

NOTIFICATION_TOPIC = "system.notifications.ui"
#: The notification of a workflow paused because its fuel (or its client's quota) ran out.
PAUSED_FOR_BUDGET = "WORKFLOW_PAUSED_FOR_BUDGET"
RESUME_TOPIC = "system.commands.workflow.resume"
CANCEL_TOPIC = "system.commands.workflow.cancel"
REJECTED_ERROR = "Workflow rejected by user"
#: Retries due later than this are kept in the database (SCHEDULED) and sent by the
#: sweep when due; sooner ones are sent at once with a Celery countdown. A broker holds
#: a countdown message unacknowledged, so long ones would outlive Redis' visibility
#: timeout (and RabbitMQ's consumer timeout) and be delivered twice.
COUNTDOWN_LIMIT = 10.0
#: The error type of an attempt that did not run and asks to be sent again later
#: (:class:`chassis.errors.AttemptDeferred`): it spends none of its step's attempts.
DEFERRED = "AttemptDeferred"
#: The ledger keys of an AI attempt's settlement and release: its debit key with these
#: (a step name cannot hold "/", so no other step's key is one of them).
SETTLE_SUFFIX = "/settle"
#: The longest a deferred attempt waits before it is sent again.
MAX_DEFERRAL = 86400.0
RELEASE_SUFFIX = "/release"
#: The usage of an attempt that called no model.
NOTHING: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0}

# --------------------------------------------------------------------------- decide


def json_roundtrip(value: Any) -> Any:
    """``value`` as it will read back from JSON storage; TypeError if it is not JSON
    (NaN and infinities included) or holds a NUL character, which PostgreSQL refuses."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"not JSON-serialisable: {exc}") from exc
    if "\\u0000" in text:
        raise TypeError("not storable: a string holds a NUL character (\\u0000)")
    return json.loads(text)


def decide(state: WorkflowState, plan: Plan, event: Event,
           settled: Mapping[str, tuple[int, Any]] | None = None) -> Decision:
    """Apply ``event`` to ``state`` under ``plan``. Never mutates its arguments.

    ``settled``: the sub-tasks of the fan-out under way (:func:`open_fan_out`) whose
    success is recorded in their own rows, name → (attempt, output), read under lock
    with the state: they are taken in first, so that a failure or a cancel that ends
    the fan-out knows every sub-task that completed (and undoes it).

    Raises :class:`InvalidTransition` for a resume of a workflow that is not paused,
    a cancel of a finished one, or a retry of one that has not failed.
    """
    _check_owner(state, event)
    _check_allowed(state, event)
    fan = open_fan_out(state, plan) if settled else None
    if fan is None or isinstance(event, SubtasksSucceeded):
        return _decide(state, plan, event)
    first = _decide(state, plan, SubtasksSucceeded(
        fan, {n: out for n, (_, out) in settled.items()},  # type: ignore[union-attr]
        {n: a for n, (a, _) in settled.items()}))  # type: ignore[union-attr]
    _check_allowed(first.state, event)  # (the fan-in may have moved the workflow on)
    then = _decide(first.state, plan, event, first if first.changed else None)
    if not first.changed:
        return then
    return Decision(then.state, first.commands + then.commands, charged=then.charged,
                    released=then.released, forced=then.forced, held=then.held)


def open_fan_out(state: WorkflowState, plan: Plan) -> str | None:
    """The fan-out step whose sub-tasks are under way, if any."""
    step = plan.steps.get(state.current_step)
    if (state.status is Status.AWAITING_RESPONSES and step is not None
            and step.action == FAN_OUT and state.current_step in state.attempts
            and state.current_step not in state.collected_data):
        return state.current_step
    return None


def _decide(state: WorkflowState, plan: Plan, event: Event,
            before: Decision | None = None) -> Decision:
    """``before``: a decision this one follows in the same transition (its charges
    count against the quota too)."""
    handler = _HANDLERS[type(event)]
    if state.status.finished and not isinstance(event, Retry | AddFuel):
        return Decision(state, changed=False)
    new = copy.copy(state)
    new.awaited_steps = list(state.awaited_steps)
    new.collected_data = state.collected_data.copy()
    new.attempts = state.attempts.copy()
    new.completed = list(state.completed)
    new.undo = [list(b) for b in state.undo]
    new.holds = dict(state.holds)
    d = Decision(new)
    if before is not None:
        d.charged, d.released = before.charged, before.released
        d.forced, d.held = before.forced, before.held
    answer = handler(d, plan, event)
    if answer is not None:  # nothing to do: the state as it was
        return Decision(state, changed=False)
    return d


def _check_owner(s: WorkflowState, event: Event) -> None:
    """An event from outside acts for a client: another client's workflow does not exist
    for it (the refusal says no more than an unknown id would)."""
    actor = getattr(event, "client_id", None)
    if actor is not None and actor != s.client_id:
        raise WorkflowNotFound(not_found(s.correlation_id), correlation_id=s.correlation_id)


def not_found(cid: str) -> str:
    """The message of an unknown workflow, and of another client's."""
    return f"no workflow with correlation_id {cid}"


def _check_allowed(s: WorkflowState, event: Event) -> None:
    cid = s.correlation_id
    if isinstance(event, Resume) and s.status is not Status.PAUSED_FOR_HUMAN_INPUT:
        raise InvalidTransition(
            f"workflow {cid} is not paused for human input (status: {s.status}); only a "
            "paused workflow can be resumed", correlation_id=cid)
    if isinstance(event, Resume) and event.step is not None:
        at = str((s.budget_wait or {}).get("step") or s.current_step)
        if event.step != at:
            raise StepMismatch(
                f"workflow {cid} waits at step '{at}', not '{event.step}': the approval "
                "answered is no longer asked (it expired, or was answered); look again",
                correlation_id=cid)
    if isinstance(event, Cancel) and s.status.finished:
        raise InvalidTransition(
            f"workflow {cid} is already {s.status}; only a workflow that has not finished "
            "can be cancelled", correlation_id=cid)
    if isinstance(event, Cancel) and s.status is Status.COMPENSATING:
        raise InvalidTransition(
            f"workflow {cid} is COMPENSATING: its completed steps are being undone, which "
            "is not stopped; it ends COMPENSATED (or FAILED, to be retried)",
            correlation_id=cid)
    if isinstance(event, Retry) and s.status is not Status.FAILED:
        raise InvalidTransition(
            f"workflow {cid} is {s.status}; only a FAILED workflow can be retried",
            correlation_id=cid)
    if isinstance(event, AddFuel) and s.status.finished and s.status is not Status.FAILED:
        raise InvalidTransition(
            f"workflow {cid} is already {s.status}; fuel can be added to a workflow that "
            "has not finished, or to a FAILED one (to retry it)", correlation_id=cid)
    added = (event.add_fuel if isinstance(event, Resume)
             else event.amount if isinstance(event, AddFuel) else 0)
    if added and s.fuel_budget + added > INT32_MAX:
        raise InvalidTransition(
            f"workflow {cid}: a budget of {s.fuel_budget} + {added} would exceed "
            f"{INT32_MAX}, the most a budget can be", correlation_id=cid)


def _unchanged(d: Decision) -> Decision:
    return Decision(d.state, changed=False)


# ------------------------------------------------------------------------ handlers
# Each returns None (the decision ``d`` as built) or an unchanged Decision.

Handler = Callable[[Decision, Plan, Any], Decision | None]


def _on_start(d: Decision, plan: Plan, event: Start) -> Decision | None:
    if d.state.status is not Status.RUNNING or d.state.awaited_steps:
        return _unchanged(d)
    s = d.state
    d.commands.append(Note("started", s.current_step, actor=event.by or s.client_id,
                           data={"plan": plan.name, "fuel_budget": s.fuel_budget}))
    _advance(d, plan)
    return None


def _on_succeeded(d: Decision, plan: Plan, event: StepSucceeded) -> Decision | None:
    if not _take(d.state, event.step, event.attempt):
        return _unchanged(d)
    if compensated_step(event.step) is not None:
        _undone(d, plan, event.step, event.attempt, event.output)
        return None
    _record_output(d, plan, event.step, event.attempt, event.output)
    d.commands.append(FinishStep(event.step, StepStatus.COMPLETED, output=event.output,
                                 attempt=event.attempt))
    _step_done(d, plan, event.step)
    return None


def _on_failed(d: Decision, plan: Plan, event: StepFailed) -> Decision | None:
    if not _take(d.state, event.step, event.attempt):
        return _unchanged(d)
    _attempt_failed(d, plan, event.step, event.attempt, event.error, event.error_types,
                    event.usage, event.retry_after)
    return None


def _on_subtasks(d: Decision, plan: Plan, event: SubtasksSucceeded) -> Decision | None:
    taken = [name for name in sorted(event.outputs)
             if _take(d.state, name, event.attempts.get(name, 1))]
    if not taken:
        return _unchanged(d)
    for name in taken:
        _record_output(d, plan, name, event.attempts.get(name, 1), event.outputs[name])
    _fan_in(d, plan, event.step)
    return None


def _on_response(d: Decision, plan: Plan, event: ResponseReceived) -> Decision | None:
    found = _awaited_attempt(d.state, plan, event.request_id)
    if found is None:
        return _unchanged(d)
    name, attempt = found
    d.state.awaited_steps.remove(event.request_id)
    if event.success and compensated_step(name) is not None:
        _undone(d, plan, name, attempt, event.data)
    elif event.success:
        _record_output(d, plan, name, attempt, event.data)
        d.commands.append(FinishStep(name, StepStatus.COMPLETED, output=event.data,
                                     attempt=attempt))
        _step_done(d, plan, name)
    else:
        error = event.error or "the agent reported failure without an error message"
        # (an agent's answer is a failed attempt: only a worker's attempt is deferred)
        types = (event.error_type,) if event.error_type and event.error_type != DEFERRED \
            else ()
        _attempt_failed(d, plan, name, attempt, error, types)
    return None


def _on_resume(d: Decision, plan: Plan, event: Resume) -> Decision | None:
    s = d.state
    d.commands.append(Note("resumed" if event.approved else "rejected", s.current_step,
                           actor=event.by or event.client_id,
                           data={"feedback": _small(s, event.feedback),
                                 "add_fuel": event.add_fuel} if event.add_fuel
                           else {"feedback": _small(s, event.feedback)}))
    s.fuel_budget += event.add_fuel
    if s.budget_wait is not None:  # paused for fuel: the same step, once more
        wait, s.budget_wait = s.budget_wait, None
        if not event.approved:
            _fail(d, plan, str(wait.get("error") or REJECTED_ERROR), step=wait.get("step"))
            return None
        if event.feedback is not None:
            s.collected_data["human_feedback"] = event.feedback
        s.status = Status.RUNNING
        _again(d, plan, wait)
        return None
    pause = None
    for rid in s.awaited_steps:  # the pause step waits for this answer
        found = _awaited_attempt(s, plan, rid)
        if found is not None:
            pause = found
            d.commands.append(FinishStep(
                found[0], StepStatus.COMPLETED if event.approved else StepStatus.FAILED,
                output={"approved": event.approved, "feedback": event.feedback},
                attempt=found[1]))
    s.awaited_steps = []
    if not event.approved:
        if pause is not None:
            s.current_step = pause[0]  # failed there: a retry asks again
        _fail(d, plan, REJECTED_ERROR, step=pause[0] if pause else None)
        return None
    if event.feedback is not None:
        s.collected_data["human_feedback"] = event.feedback
    s.status = Status.RUNNING
    if pause is not None:
        s.current_step = plan.steps[pause[0]].next_step or ""
    _advance(d, plan)
    return None


def _on_retry_due(d: Decision, plan: Plan, event: RetryDue) -> Decision | None:
    s = d.state
    progress = s.attempts.get(event.step)
    rid = s.rid(event.step, event.attempt)
    if (progress is None or progress[0] != event.attempt or not _scheduled(progress)
            or rid not in s.awaited_steps):
        return _unchanged(d)
    progress[2] = 0
    action, topic, params = plan.work(event.step)
    owned = plan.subtask(event.step)
    parent = owned[0] if owned else None
    timeout = plan.timeout(event.step)
    if topic:
        d.commands.append(_request(s, event.step, action, topic, event.attempt, params,
                                   parent, timeout, scheduled=True))
    else:
        d.commands.append(RunStep(event.step, action, dict(params), rid, parent,
                                  event.attempt, timeout, scheduled=True))
    return None


def _on_request_unanswered(d: Decision, plan: Plan,
                           event: RequestUnanswered) -> Decision | None:
    """Ask an agent again: the same request (same id, data and params) on its topic,
    through the outbox; the step's deadline stays as it was, and the first answer wins."""
    s = d.state
    progress = s.attempts.get(event.step)
    rid = s.rid(event.step, event.attempt)
    if (progress is None or progress[0] != event.attempt or _scheduled(progress)
            or rid not in s.awaited_steps):
        return _unchanged(d)
    action, topic, params = plan.work(event.step)
    if not topic:
        return _unchanged(d)
    owned = plan.subtask(event.step)
    again = _request(s, event.step, action, topic, event.attempt, params,
                     owned[0] if owned else None, plan.timeout(event.step))
    d.commands.append(Emit(topic, s.correlation_id, again.headers, again.payload,
                           f"{again.dedup_key}:again{event.times}"))
    d.commands.append(Note("request_resent", event.step, event.attempt,
                           data={"topic": topic, "times": event.times}))
    return None


def _on_approval_expired(d: Decision, plan: Plan,
                         event: ApprovalExpired) -> Decision | None:
    """Nobody answered a pause within its ``timeout``: the pause fails (``StepTimeout``,
    not retried: a retry of the workflow asks again) and the workflow goes on at its
    ``on_failure``, or fails, undoing what it did."""
    s = d.state
    if s.status is not Status.PAUSED_FOR_HUMAN_INPUT or s.budget_wait is not None \
            or not _take(s, event.step, event.attempt):
        return _unchanged(d)
    error = f"no answer to the approval within {event.timeout:g} s: it expired"
    d.commands.append(FinishStep(event.step, StepStatus.FAILED, error=error,
                                 attempt=event.attempt, error_type=TIMEOUT_ERROR))
    # (whoever showed the approval learns it is no longer asked)
    d.commands.append(_event(s, "WORKFLOW_APPROVAL_EXPIRED", {"step": event.step,
                                                              "message": error},
                             f"{s.correlation_id}:expired:{event.step}#{event.attempt}"))
    s.status = Status.RUNNING
    s.current_step = event.step  # failed there: a retry asks again
    message = f"step '{event.step}' failed: {error}"
    handler = plan.steps[event.step].on_failure
    if handler is not None:
        _go_on_failure(d, plan, handler, {"step": event.step, "message": message,
                                          "attempts": 1})
        return None
    _fail(d, plan, message, step=event.step)
    return None


def _on_cancel(d: Decision, plan: Plan, event: Cancel) -> Decision | None:
    s = d.state
    s.budget_wait = None
    d.commands.append(Note("cancel_requested", s.current_step or None,
                           actor=event.by or event.client_id,
                           data={"reason": event.reason, "compensate": event.compensate}))
    error = "Workflow cancelled" + (f": {event.reason}" if event.reason else "")
    revoke = _abandon(d, plan, "cancelled")
    if revoke:
        d.commands.append(Revoke(tuple(revoke)))
    _finish_fan_out(d, plan, StepStatus.CANCELLED, error)
    if event.compensate and s.completed:
        _start_compensation(d, plan, error, Status.CANCELLED, step=None)
        return None
    s.status = Status.CANCELLED
    s.error = error
    d.commands.append(_event(s, "WORKFLOW_CANCELLED", {"reason": event.reason},
                             f"{s.correlation_id}:WORKFLOW_CANCELLED"))
    return None


def _on_retry(d: Decision, plan: Plan, event: Retry) -> Decision | None:
    s = d.state
    d.commands.append(Note("retried", s.current_step or None,
                           actor=event.by or event.client_id))
    for progress in s.attempts.values():  # a fresh retry budget for every step
        progress[1] = progress[0]
        progress[2] = 0
    if s.undo:  # a compensation ran out of attempts: compensate on
        s.status = Status.COMPENSATING
        s.error = s.cause
        s.undo_failed = None
        d.commands.append(_event(s, "WORKFLOW_COMPENSATING",
                                 {"error": s.cause, "retry": True},
                                 f"{s.correlation_id}:WORKFLOW_COMPENSATING:{s.version}"))
        _next_batch(d, plan)
        return None
    s.status = Status.RUNNING
    s.error = None
    s.final_result = None
    step = plan.steps.get(s.current_step)
    if step is not None and step.action == FAN_OUT:
        for st in step.sub_tasks:
            name = st.step_name
            if name in event.outputs and name not in s.collected_data:
                _record_output(d, plan, name, event.attempts.get(name, 1),
                               event.outputs[name])
    _advance(d, plan)
    return None


def _on_add_fuel(d: Decision, plan: Plan, event: AddFuel) -> Decision | None:
    d.state.fuel_budget += event.amount
    d.commands.append(Note("fuel_added", actor=event.by or event.client_id,
                           data={"amount": event.amount, "budget": d.state.fuel_budget}))
    return None


def _on_stalled(d: Decision, plan: Plan, event: Stalled) -> Decision | None:
    s = d.state
    if s.status is not Status.RUNNING or s.awaited_steps or s.current_step != event.step:
        return _unchanged(d)  # it moved on since the sweep looked
    _fail(d, plan, event.error, step=event.step)
    return None


_HANDLERS: dict[type, Handler] = {
    Start: _on_start, StepSucceeded: _on_succeeded, StepFailed: _on_failed,
    SubtasksSucceeded: _on_subtasks, ResponseReceived: _on_response, Resume: _on_resume,
    RetryDue: _on_retry_due, RequestUnanswered: _on_request_unanswered, Cancel: _on_cancel,
    ApprovalExpired: _on_approval_expired,
    Retry: _on_retry, Stalled: _on_stalled, AddFuel: _on_add_fuel,
}

# ------------------------------------------------------------------------- helpers


def _scheduled(progress: list[int]) -> bool:
    return len(progress) > 2 and bool(progress[2])


def _take(s: WorkflowState, step: str, attempt: int) -> bool:
    """Remove an attempt's request from the awaited list; False when it was not awaited."""
    rid = s.rid(step, attempt)
    if rid not in s.awaited_steps:
        return False
    s.awaited_steps.remove(rid)
    return True


def _awaited_attempt(s: WorkflowState, plan: Plan, request_id: str) -> tuple[str, int] | None:
    """(step, attempt) of an awaited request id; None when it is not awaited."""
    if request_id not in s.awaited_steps:
        return None
    cid = s.correlation_id
    # where it is likely to be first (without reading every step's attempts)
    step = plan.steps.get(s.current_step)
    likely = [s.current_step, *(st.step_name for st in (step.sub_tasks if step else ()))]
    for name in likely + [compensation_of(n) for batch in s.undo[:1] for n in batch]:
        progress = s.attempts.get(name)
        if progress is not None and s.rid(name, progress[0]) == request_id:
            return name, progress[0]
    for name, progress in s.attempts.items():
        if s.rid(name, progress[0]) == request_id:
            return name, progress[0]
    # a workflow started before attempts were recorded: first attempts only
    for name, step in plan.steps.items():
        if request_id_for(cid, name) == request_id:
            return name, 1
        for st in step.sub_tasks:
            if request_id_for(cid, st.step_name) == request_id:
                return st.step_name, 1
    return None


def _record_output(d: Decision, plan: Plan, name: str, attempt: int, output: Any) -> None:
    s = d.state
    s.collected_data[name] = output
    if plan.compensation(name) is not None and name not in s.completed:
        s.completed.append(name)  # to be undone, should the workflow fail
    usage = output.get("usage") if isinstance(output, dict) else None
    if not _settle(d, name, attempt, usage if isinstance(usage, dict) else None) \
            and usage is not None:
        # not priced by tokens: the usage is kept with the attempt's debit
        d.commands.append(Usage(fuel.ledger_key(s.correlation_id, name, attempt), usage))


def _step_done(d: Decision, plan: Plan, name: str) -> None:
    """After a step (or sub-task) succeeded: fan in, or move on to the next step."""
    s = d.state
    owned = plan.subtask(name)
    if owned is not None:
        _fan_in(d, plan, owned[0])
        return
    if not s.awaited_steps:
        s.current_step = plan.steps[name].next_step or ""
        s.status = Status.RUNNING
        _advance(d, plan)


def _fan_in(d: Decision, plan: Plan, fan_step: str) -> None:
    """When no sub-task is awaited any more, the fan_out step's name holds their map."""
    s = d.state
    if s.awaited_steps:
        return
    outputs = {st.step_name: s.collected_data.get(st.step_name)
               for st in plan.steps[fan_step].sub_tasks}
    s.collected_data[fan_step] = outputs
    d.commands.append(FinishStep(fan_step, StepStatus.COMPLETED, output=outputs,
                                 attempt=_attempt_of(s, fan_step)))
    s.current_step = plan.steps[fan_step].next_step or ""
    s.status = Status.RUNNING
    _advance(d, plan)


def _attempt_of(s: WorkflowState, name: str) -> int:
    progress = s.attempts.get(name)
    return progress[0] if progress else 1


def _attempt_failed(d: Decision, plan: Plan, name: str, attempt: int, error: str,
                    error_types: tuple[str, ...], usage: dict[str, Any] | None = None,
                    retry_after: float | None = None) -> None:
    """An attempt failed (its request is no longer awaited): retry it, or fail. One
    that was deferred (it did not run: the provider's circuit breaker is open) is sent
    again after ``retry_after`` seconds without spending an attempt."""
    s = d.state
    d.commands.append(FinishStep(name, StepStatus.FAILED, error=error, attempt=attempt,
                                 error_type=error_types[0] if error_types else None))
    _settle(d, name, attempt, usage)
    policy = plan.policy(name)
    progress = s.attempts.setdefault(name, [attempt, 0, 0])
    undone = compensated_step(name)
    if DEFERRED in error_types:
        progress[1] += 1  # not one of the step's attempts
        action, topic, params = plan.work(name)
        if _charge(d, plan, name, action, _need(plan, name, action, s),
                   force=undone is not None):
            owned = plan.subtask(name)
            _dispatch(d, plan, name, action, topic, params, attempt + 1,
                      owned[0] if owned else None, _deferral(retry_after))
        return
    used = attempt - progress[1]
    retryable = policy.retryable(error_types)
    if retryable and used < policy.max_attempts:
        action, topic, params = plan.work(name)
        if _charge(d, plan, name, action, _need(plan, name, action, s),
                   force=undone is not None):
            owned = plan.subtask(name)
            delay = policy.delay(used, seed=f"{s.correlation_id}/{name}/{attempt}")
            _dispatch(d, plan, name, action, topic, params, attempt + 1,
                      owned[0] if owned else None, delay)
        if undone is not None and s.undo_failed is not None:
            _batch_settled(d, plan)
        return
    if undone is not None:
        what = f"compensation of '{undone}'"
    else:
        what = f"{'sub-task' if plan.subtask(name) else 'step'} '{name}'"
    if not retryable and used < policy.max_attempts:
        why = f" ({error_types[0]} is not retried)"
    elif policy.max_attempts > 1 or used > 1:
        why = f" after {used} attempt{'s' if used != 1 else ''}"
    else:
        why = ""
    message = f"{what} failed{why}: {error}"
    if undone is not None:
        s.undo_failed = s.undo_failed or message
        _batch_settled(d, plan)
        return
    owned = plan.subtask(name)
    handler = plan.steps[owned[0] if owned else name].on_failure
    if handler is not None and s.status is not Status.COMPENSATING:
        _go_on_failure(d, plan, handler, {"step": name, "message": message,
                                          "attempts": used})
        return
    _fail(d, plan, message, step=name)


def _deferral(retry_after: float | None) -> float:
    """Seconds until a deferred attempt is sent again: as asked, within [0, a day]."""
    if retry_after is None or not math.isfinite(retry_after):
        return MAX_DEFERRAL if retry_after is not None and retry_after > 0 else 0.0
    return min(max(0.0, retry_after), MAX_DEFERRAL)


def _go_on_failure(d: Decision, plan: Plan, handler: str, error: dict[str, Any]) -> None:
    """A step ran out of attempts and says where to go on: its siblings (a fan-out's)
    are abandoned, the workflow goes on at ``handler``, which sees ``error``."""
    s = d.state
    revoke = _abandon(d, plan, "not needed: the step failed and on_failure goes on")
    if revoke:
        d.commands.append(Revoke(tuple(revoke)))
    _finish_fan_out(d, plan, StepStatus.FAILED, error["message"])
    s.collected_data["error"] = error
    s.current_step = handler
    s.status = Status.RUNNING
    _advance(d, plan)


def _charge(d: Decision, plan: Plan, name: str, action: str, amount: int,
            force: bool = False) -> bool:
    """Check that ``amount`` (an attempt's price, or its reservation) can be charged
    before the attempt is dispatched (:func:`_debit` charges it); False when the
    workflow's fuel or its client's quota is short: the workflow then fails with the
    original's message (or the quota's), or pauses (``on_budget_exhausted: pause``).
    ``force``: a compensation, priced but never refused (undo must happen)."""
    s = d.state
    if force:
        return True
    if s.fuel_remaining < amount:
        _out_of_fuel(d, plan, name, action, amount, s.fuel_remaining, "budget",
                     f"insufficient fuel for action '{action}': "
                     f"have {s.fuel_remaining}, need {amount}")
        return False
    q = s.quota
    if q is not None and amount > 0:
        left = q.left - d.charged - d.released
        if amount > left:
            _out_of_fuel(d, plan, name, action, amount, max(0, left), "quota",
                         f"quota exceeded for client '{q.client_id}': action '{action}' "
                         f"needs {amount}, {max(0, left)} left of {q.fuel} per {q.per}")
            return False
    return True


def _out_of_fuel(d: Decision, plan: Plan, name: str, action: str, need: int,
                 available: int, reason: str, error: str) -> None:
    """Fail with ``error``, or pause for fuel when the plan says so (a step, or a
    fan-out as a whole; a sub-task's retry in a fan-out under way fails)."""
    s = d.state
    if (plan.on_budget_exhausted != "pause" or plan.subtask(name) is not None
            or s.status is Status.COMPENSATING):
        _fail(d, plan, error, step=name)
        return
    s.status = Status.PAUSED_FOR_HUMAN_INPUT
    s.awaited_steps = []
    s.current_step = name
    s.budget_wait = {"step": name, "action": action, "error": error, "needed": need,
                     "available": available, "reason": reason}
    what = (f"add fuel (chassis fuel add {s.correlation_id} N) and approve"
            if reason == "budget" else "raise the client's quota and approve")
    payload = {"event_type": PAUSED_FOR_BUDGET, "correlation_id": s.correlation_id,
               "project_id": s.project_id, "client_id": s.client_id,
               "message": f"Step '{name}' needs {need} fuel, {available} available: "
                          f"{what}, or reject to fail with: {error}",
               "step": name, "action": action, "reason": reason, "needed": need,
               "available": available, "error": error,
               "fuel": {"budget": s.fuel_budget, "spent": s.fuel_spent,
                        "reserved": s.fuel_reserved}}
    d.commands.append(Emit(NOTIFICATION_TOPIC, s.correlation_id, base_headers(s), payload,
                           f"{s.correlation_id}:{PAUSED_FOR_BUDGET}:{s.version}"))


def _again(d: Decision, plan: Plan, wait: dict[str, Any]) -> None:
    """Approved after a pause for fuel: the step that waited is priced again."""
    step = wait.get("step")
    if isinstance(step, str) and step in plan.steps:
        d.state.current_step = step
    _advance(d, plan)


def _need(plan: Plan, name: str, action: str, s: WorkflowState) -> int:
    """What an attempt of ``action`` for ``name`` is charged at dispatch: its price
    from the table, or for an AI action its reservation (worst case)."""
    priced = _ai_price(plan, name, action, s)
    return fuel.cost(action) if priced is None else priced[2]


def _ai_price(plan: Plan, name: str, action: str,
              s: WorkflowState) -> tuple[str, pricing.ModelPrice, int] | None:
    """(model, price, reservation) of an AI action's attempt run by a worker; None for
    other actions, and for an external agent's (priced by the table, as the original
    platform did: its model and tokens are the agent's)."""
    if action not in pricing.AI_ACTIONS:
        return None
    _, topic, params = plan.work(name)
    if topic:
        return None
    model, price = pricing.resolve(action, params)
    max_tokens = params.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        max_tokens = DEFAULT_MAX_TOKENS  # (the attempt fails on it, having called nothing)
    texts = [t for t in (params.get("prompt"), params.get("system")) if isinstance(t, str)]
    estimate = pricing.input_estimate(texts, s.step_data(name))
    return model, price, price.worst_case(max_tokens, estimate)


def _debit(d: Decision, plan: Plan, name: str, action: str, attempt: int) -> None:
    """Charge one attempt (checked by :func:`_charge`): its table price as spent, with
    a debit row; or, for an AI action, hold its reservation, with a reserve row (settled
    when the attempt ends)."""
    s = d.state
    key = fuel.ledger_key(s.correlation_id, name, attempt)
    forced = compensated_step(name) is not None
    priced = _ai_price(plan, name, action, s)
    if priced is None:
        amount = fuel.cost(action)
        s.fuel_spent += amount
        if amount:
            d.commands.append(Debit(name, action, amount, key))
    else:
        model, price, amount = priced
        s.holds[f"{name}#{attempt}"] = {
            "amount": amount, "action": action, "model": model,
            "price": [price.input, price.output, price.cache_write, price.cache_read,
                      price.floor]}
        d.commands.append(Debit(name, action, 0, key, kind="reserve", held=amount,
                                model=model))
        d.held += amount
    if forced:
        d.forced += amount
    else:
        d.charged += amount


def _settle(d: Decision, name: str, attempt: int, usage: dict[str, Any] | None) -> bool:
    """An AI attempt ended: charge what it consumed (``usage``; None: unknown, the
    floor) at the price it was reserved at, and release the rest of its hold. False
    when it held nothing (not an AI attempt, or settled already)."""
    s = d.state
    hold = s.holds.pop(f"{name}#{attempt}", None)
    if hold is None:
        return False
    price = pricing.ModelPrice(*(int(p) for p in hold["price"]))
    held = int(hold["amount"])
    amount = price.of(usage)
    taken = min(amount, held)
    s.fuel_spent += amount
    d.held -= held
    key = fuel.ledger_key(s.correlation_id, name, attempt)
    action, model = str(hold.get("action") or ""), hold.get("model")
    d.commands.append(Debit(name, action, amount, key + SETTLE_SUFFIX, kind="settle",
                            held=-taken, model=model, usage=usage))
    if held > taken:
        d.commands.append(Debit(name, action, 0, key + RELEASE_SUFFIX, kind="release",
                                held=taken - held, model=model))
        d.released += amount - held
    else:
        d.forced += amount - held
    return True


def _is_task(plan: Plan, name: str) -> bool:
    """True when attempts of this step or sub-task are Celery tasks."""
    action, topic, _ = plan.work(name)
    return not topic and action != PAUSE


def _abandon(d: Decision, plan: Plan, why: str) -> list[str]:
    """Mark every awaited attempt CANCELLED (a late result then records nothing); the
    request ids of those that are Celery tasks."""
    s = d.state
    tasks = []
    for rid in list(s.awaited_steps):
        found = _awaited_attempt(s, plan, rid)
        if found is None:
            continue
        name, attempt = found
        d.commands.append(FinishStep(name, StepStatus.CANCELLED, error=why, attempt=attempt))
        progress = s.attempts.get(name)
        # a retry still waiting for its time was never sent: it consumed nothing; any
        # other may have called its model (unknown: settled at the floor)
        _settle(d, name, attempt, NOTHING if progress is not None and _scheduled(progress)
                and progress[0] == attempt else None)
        if _is_task(plan, name):
            tasks.append(rid)
    s.awaited_steps = []
    return tasks


def _finish_fan_out(d: Decision, plan: Plan, status: StepStatus, error: str) -> None:
    """A fan_out step whose sub-tasks were under way ends with the workflow."""
    s = d.state
    step = plan.steps.get(s.current_step)
    if step is not None and step.action == FAN_OUT and s.current_step in s.attempts \
            and s.current_step not in s.collected_data:
        d.commands.append(FinishStep(s.current_step, status, error=error,
                                     attempt=_attempt_of(s, s.current_step)))


def _fail(d: Decision, plan: Plan, error: str, step: str | None = None) -> None:
    """The workflow cannot go on: undo its completed steps that have a compensate
    (COMPENSATING), or end FAILED."""
    s = d.state
    if s.status is Status.COMPENSATING:  # a compensation could not even be sent
        s.undo_failed = s.undo_failed or error  # (failed once its batch has settled)
        return
    revoke = _abandon(d, plan, "not needed: the workflow failed")
    if revoke:  # siblings of a failed sub-task: their work would be wasted
        d.commands.append(Revoke(tuple(revoke)))
    _finish_fan_out(d, plan, StepStatus.FAILED, error)
    if s.completed:
        _start_compensation(d, plan, error, Status.COMPENSATED, step)
        return
    _failed(d, error, step)


def _failed(d: Decision, error: str, step: str | None) -> None:
    s = d.state
    s.status = Status.FAILED
    s.error = error
    s.awaited_steps = []
    d.commands.append(_event(s, "WORKFLOW_FAILED", {"error": error, "step": step},
                             f"{s.correlation_id}:WORKFLOW_FAILED:{s.version}"))


# --------------------------------------------------------------------- compensation


def _batches(plan: Plan, completed: list[str]) -> list[list[str]]:
    """Compensations in reverse order of completion, one batch per step; the sub-tasks
    of one fan-out form one batch (run in parallel)."""
    batches: list[list[str]] = []
    last_owner: str | None = None
    for name in reversed(completed):
        owned = plan.subtask(name)
        owner = owned[0] if owned else None
        if owner is not None and owner == last_owner:
            batches[-1].append(name)
        else:
            batches.append([name])
        last_owner = owner
    return batches


def _start_compensation(d: Decision, plan: Plan, cause: str, then: Status,
                        step: str | None) -> None:
    """COMPENSATING: the completed steps' compensations run, last completed first."""
    s = d.state
    s.status = Status.COMPENSATING
    s.error = cause
    s.cause = cause
    s.then = then.value
    s.undo = _batches(plan, s.completed)
    s.completed = []
    s.undo_failed = None
    s.awaited_steps = []
    d.commands.append(_event(
        s, "WORKFLOW_COMPENSATING",
        {"error": cause, "step": step, "compensations": [c for b in s.undo for c in b]},
        f"{s.correlation_id}:WORKFLOW_COMPENSATING:{s.version}"))
    _next_batch(d, plan)


def _next_batch(d: Decision, plan: Plan) -> None:
    """Send the batch of compensations under way (those not yet done), or end the
    compensation when none is left."""
    s = d.state
    while s.undo and not s.undo[0]:
        s.undo.pop(0)
    if not s.undo:
        _compensated(d)
        return
    celery: list[RunStep] = []
    for undone in s.undo[0]:
        name = compensation_of(undone)
        action, topic, params = plan.work(name)
        attempt = _attempt_of(s, name) + 1 if name in s.attempts else 1
        _charge(d, plan, name, action, _need(plan, name, action, s), force=True)
        _dispatch(d, plan, name, action, topic, params, attempt, None, 0.0, celery)
    if len(celery) > 1:
        owned = plan.subtask(s.undo[0][0])
        d.commands.append(RunFanOut(compensation_of(owned[0] if owned else s.undo[0][0]),
                                    tuple(celery)))
    elif celery:
        d.commands.append(celery[0])
    if s.status is Status.COMPENSATING and not s.awaited_steps:
        _batch_settled(d, plan)  # (nothing could be sent)


def _undone(d: Decision, plan: Plan, name: str, attempt: int, output: Any) -> None:
    """A compensation completed: it leaves its batch; the next batch follows once the
    whole batch has settled."""
    s = d.state
    d.commands.append(FinishStep(name, StepStatus.COMPLETED, output=output, attempt=attempt))
    usage = output.get("usage") if isinstance(output, dict) else None
    _settle(d, name, attempt, usage if isinstance(usage, dict) else None)
    undone = compensated_step(name)
    if s.undo and undone in s.undo[0]:
        s.undo[0].remove(undone)
    _batch_settled(d, plan)


def _batch_settled(d: Decision, plan: Plan) -> None:
    s = d.state
    if s.awaited_steps:
        return  # others of the batch are still under way
    if s.undo_failed is not None:
        _failed(d, f"{s.cause}; then the {s.undo_failed}", None)
        return
    if s.undo and not s.undo[0]:
        s.undo.pop(0)
    _next_batch(d, plan)


def _compensated(d: Decision) -> None:
    s = d.state
    s.undo = []
    s.error = s.cause
    if s.then == Status.CANCELLED.value:
        s.status = Status.CANCELLED
        reason = (s.cause or "").removeprefix("Workflow cancelled").removeprefix(": ")
        d.commands.append(_event(s, "WORKFLOW_CANCELLED",
                                 {"reason": reason or None, "compensated": True},
                                 f"{s.correlation_id}:WORKFLOW_CANCELLED"))
        return
    s.status = Status.COMPENSATED
    d.commands.append(_event(s, "WORKFLOW_COMPENSATED", {"error": s.cause},
                             f"{s.correlation_id}:WORKFLOW_COMPENSATED"))


def _event(s: WorkflowState, event_type: str, extra: dict[str, Any], dedup: str) -> Emit:
    payload = {"event_type": event_type, "correlation_id": s.correlation_id,
               "project_id": s.project_id, "client_id": s.client_id,
               **{k: _small(s, v) for k, v in extra.items()}}
    return Emit(NOTIFICATION_TOPIC, s.correlation_id, base_headers(s), payload, dedup)


def _small(s: WorkflowState, value: Any) -> Any:
    """An event's data, or a reference to the workflow when it is large: events stay
    small (the workflow's status has it all)."""
    size = len(json.dumps(value, default=str))
    if size <= EVENT_FIELD_MAX:
        return value
    return {"truncated": True, "bytes": size,
            "see": f"chassis status {s.correlation_id}"}


def base_headers(s: WorkflowState) -> dict[str, str]:
    """Headers every outgoing message of this workflow carries."""
    headers = {"correlation_id": s.correlation_id, "client_id": s.client_id,
               "project_id": s.project_id or "", fuel.FUEL_HEADER: str(s.fuel_remaining)}
    if s.request_id:
        headers["causation_id"] = s.request_id
    if s.traceparent:  # (the workflow's trace: an agent that propagates it joins it)
        headers["traceparent"] = s.traceparent
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
        _fail(d, plan, f"step '{name}' not found in plan", step=name)
        return
    if any(dep not in s.collected_data for dep in step.dependencies):
        return  # waits until its dependencies' outputs are present
    if step.action == FAN_OUT:
        _fan_out(d, plan, name, step)
        return
    attempt = _attempt_of(s, name) + 1 if name in s.attempts else 1
    if not _charge(d, plan, name, step.action, _need(plan, name, step.action, s)):
        return
    if step.action == COMPLETE:
        _debit(d, plan, name, step.action, attempt)
        _set_attempt(s, name, attempt)
        d.commands.append(RecordStep(name, COMPLETE, StepStatus.COMPLETED, attempt))
        _complete(d)
    elif step.action == PAUSE:
        _debit(d, plan, name, step.action, attempt)
        _pause(d, name, step, attempt)
    else:
        _dispatch(d, plan, name, step.action, step.topic, step.params, attempt, None, 0.0)


def _set_attempt(s: WorkflowState, name: str, attempt: int, scheduled: bool = False) -> None:
    base = s.attempts[name][1] if name in s.attempts else 0
    s.attempts[name] = [attempt, base, int(scheduled)]


def _dispatch(d: Decision, plan: Plan, name: str, action: str, topic: str | None,
              params: dict[str, Any], attempt: int, parent: str | None, delay: float,
              group: list[RunStep] | None = None, debit: bool = True) -> None:
    """Debit, then send (or schedule) attempt ``attempt`` of a step or sub-task, whose
    price :func:`_charge` has counted. A Celery sub-task sent at once joins ``group``."""
    s = d.state
    if debit:
        _debit(d, plan, name, action, attempt)
    rid = s.rid(name, attempt)
    timeout = plan.timeout(name)
    later = delay > COUNTDOWN_LIMIT or (topic is not None and delay > 0)
    _set_attempt(s, name, attempt, scheduled=later)
    if later:
        d.commands.append(ScheduleStep(name, action, rid, attempt, delay, parent))
    elif topic:
        request = _request(s, name, action, topic, attempt, params, parent, timeout)
        if not _fits(d, plan, request):
            return
        d.commands.append(request)
    else:
        run = RunStep(name, action, dict(params), rid, parent, attempt, timeout, delay)
        (group if group is not None else d.commands).append(run)  # type: ignore[arg-type]
    s.awaited_steps.append(rid)
    if (topic or parent is not None) and s.status is not Status.COMPENSATING:
        s.status = Status.AWAITING_RESPONSES


def _fits(d: Decision, plan: Plan, request: SendRequest) -> bool:
    """False (and the workflow failed) when an agent's request is larger than Kafka
    takes."""
    size = len(json.dumps(request.payload))
    if size <= MESSAGE_MAX:
        return True
    _fail(d, plan, f"step '{request.step}': its request to the agent would be {size} bytes, "
                   f"more than a Kafka message takes ({MESSAGE_MAX})", step=request.step)
    return False


def _complete(d: Decision) -> None:
    s = d.state
    s.status = Status.COMPLETED
    s.final_result = s.collected_data.to_dict()
    d.commands.append(_event(s, "WORKFLOW_COMPLETED", {"final_result": s.final_result},
                             f"{s.correlation_id}:WORKFLOW_COMPLETED"))


def _pause(d: Decision, name: str, step: Step, attempt: int) -> None:
    s = d.state
    s.status = Status.PAUSED_FOR_HUMAN_INPUT
    _set_attempt(s, name, attempt)
    s.awaited_steps = [s.rid(name, attempt)]  # the human's answer
    d.commands.append(RecordStep(name, PAUSE, StepStatus.AWAITING, attempt,
                                 timeout=step.timeout))
    payload = {
        "event_type": "WORKFLOW_PAUSED_FOR_APPROVAL",
        "correlation_id": s.correlation_id,
        "project_id": s.project_id,
        "client_id": s.client_id,
        "message": f"Step '{step.description or name}' requires your approval",
        "data_for_review": _small(s, s.collected_data.to_dict()),
    }
    if step.timeout is not None:  # (a whole number when it is one: 86400, not 86400.0)
        payload["expires_in_seconds"] = int(step.timeout) if float(step.timeout).is_integer() \
            else step.timeout
    dedup = f"{s.correlation_id}:paused:{name}" + (f"#{attempt}" if attempt > 1 else "")
    d.commands.append(Emit(NOTIFICATION_TOPIC, s.correlation_id, base_headers(s), payload,
                           dedup))


def _fan_out(d: Decision, plan: Plan, name: str, step: Step) -> None:
    """Price all sub-tasks still to run (and the fan_out itself, the first time) at
    once, then send them: Celery ones as one group, agents' through the outbox."""
    s = d.state
    again = name in s.attempts  # an operator's retry: only the sub-tasks without output
    todo = [st for st in step.sub_tasks if not (again and st.step_name in s.collected_data)]
    for st in todo:  # an agent's request too large for Kafka fails the fan-out at once
        if st.topic:
            n = _attempt_of(s, st.step_name) + 1 if st.step_name in s.attempts else 1
            if not _fits(d, plan, _request(s, st.step_name, st.resolved_action, st.topic, n,
                                           st.params)):
                return
    need = sum(_need(plan, st.step_name, st.resolved_action, s) for st in todo) + (
        0 if again else fuel.cost(FAN_OUT))
    if not _charge(d, plan, name, FAN_OUT, need):
        return
    attempt = _attempt_of(s, name) + 1 if again else 1
    if not again:
        _debit(d, plan, name, FAN_OUT, 1)
    _set_attempt(s, name, attempt)
    tasks = sum(_is_task(plan, st.step_name) for st in todo)
    d.commands.append(RecordStep(name, FAN_OUT, StepStatus.AWAITING, attempt,
                                 pending=tasks or None))  # None: no Celery sub-task counts down
    celery: list[RunStep] = []
    numbers = [_attempt_of(s, st.step_name) + 1 if st.step_name in s.attempts else 1
               for st in todo]
    for st, n in zip(todo, numbers, strict=True):  # all charged before any is sent
        _debit(d, plan, st.step_name, st.resolved_action, n)
    for st, n in zip(todo, numbers, strict=True):
        _dispatch(d, plan, st.step_name, st.resolved_action, st.topic, st.params, n, name,
                  0.0, celery, debit=False)
    if celery:
        d.commands.append(RunFanOut(name, tuple(celery)))
    s.status = Status.AWAITING_RESPONSES
    if not todo:
        _fan_in(d, plan, name)


def _request(s: WorkflowState, step: str, action: str, topic: str, attempt: int,
             params: dict[str, Any], parent: str | None = None,
             timeout: float | None = None, scheduled: bool = False) -> SendRequest:
    rid = s.rid(step, attempt)
    headers = base_headers(s)
    headers["causation_id"] = s.request_id or s.correlation_id
    headers["request_id"] = rid
    if timeout is not None:  # how long the workflow waits for the answer
        headers["timeout"] = f"{timeout:g}"
    payload = {"action": action, "data": s.step_data(step), "params": dict(params)}
    dedup = f"{s.correlation_id}:request:{step}" + (f"#{attempt}" if attempt > 1 else "")
    return SendRequest(step, action, topic, rid, headers, payload, parent, attempt, timeout,
                       dedup, scheduled)


__all__ = [
    "CANCEL_TOPIC", "COUNTDOWN_LIMIT", "NOTIFICATION_TOPIC", "PAUSED_FOR_BUDGET",
    "REJECTED_ERROR", "RESUME_TOPIC", "AddFuel",
    "Cancel", "Command", "Debit", "Decision", "Emit", "Event", "FinishStep", "Note",
    "ApprovalExpired", "RecordStep", "RequestUnanswered",
    "ResponseReceived", "Resume", "Retry", "RetryDue", "Revoke", "RunFanOut", "RunStep",
    "ScheduleStep", "SendRequest", "Stalled", "Start", "StepFailed", "StepSucceeded",
    "SubtasksSucceeded", "Usage", "base_headers", "decide", "json_roundtrip", "not_found",
    "open_fan_out",
]
