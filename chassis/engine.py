"""The executor: carries out the coordinator's decisions with the store and Celery.

A step's way through here costs one broker hop (the next step's task) and two database
round trips: the claim (the attempt becomes RUNNING under a lease) and the transition
(outcome recorded, next step priced, debited and dispatched, all at once). A fan-out's
sub-task records its own success instead, and the last one applies the fan-in.
Messages are sent only after the transaction that decided them has committed.

Failures of the infrastructure are not the action's: inside a worker, an operation
that cannot reach the database is tried again until it can, and a publish that keeps
failing is left to the sweep (the attempt's row says it is due). A client (CLI, API)
gets :class:`~chassis.errors.DatabaseUnavailable` or
:class:`~chassis.errors.BrokerUnavailable` instead, saying whether the request was
recorded.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from celery import Celery, group
from celery.exceptions import Retry
from kombu.utils.url import maybe_sanitize_url

from chassis import actions, fuel, hooks, infra, tracing
from chassis import coordinator as co
from chassis.celery_conf import step_task_for, subtask_task_for
from chassis.config import Settings
from chassis.deadline import AttemptDeadline, time_limit
from chassis.errors import BrokerUnavailable, DatabaseUnavailable, StepAttemptFailed
from chassis.heartbeat import Heartbeat
from chassis.plan import FAN_OUT, Plan
from chassis.policy import TIMEOUT_ERROR
from chassis.state import Status, WorkflowState, json_copy
from chassis.store import SqlStore, Stuck
from chassis.store.db import mask_url

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds past an attempt's timeout before Celery's hard time limit kills the process
#: running it (prefork), should the action not stop at its deadline.
HARD_LIMIT_GRACE = 30.0
#: The error type of an attempt whose task was revoked through Celery's own commands.
REVOKED_ERROR = "TaskRevokedError"
#: Seconds a worker keeps trying to publish before leaving the message to the sweep.
PUBLISH_PATIENCE = 30.0


def error_types(exc: BaseException) -> tuple[str, ...]:
    """Names of the exception's class and base classes, most specific first."""
    return tuple(c.__name__ for c in type(exc).__mro__ if c not in (BaseException, object))


def run_action(payload: dict[str, Any], data: dict[str, Any],
               timeout: float | None) -> co.StepSucceeded | co.StepFailed:
    """Run the payload's action on ``data`` within ``timeout`` (where the pool allows
    interrupting it); any exception becomes a failed attempt carrying its message and
    type."""
    step, attempt = payload["step"], int(payload.get("attempt") or 1)
    try:
        fn = actions.get(payload["action"])
        with time_limit(timeout):
            result = fn(data, payload["params"])
        return co.StepSucceeded(step, co.json_roundtrip(result), attempt)
    except AttemptDeadline:
        return co.StepFailed(step, f"timed out after {timeout:g} s", attempt, (TIMEOUT_ERROR,))
    except Exception as exc:  # noqa: BLE001  (a raised exception is a failed attempt)
        message = str(exc) or type(exc).__name__
        log.warning("step %s attempt %d failed: %s", step, attempt, message,
                    extra={"correlation_id": payload["cid"], "step": step})
        usage = getattr(exc, "usage", None)
        return co.StepFailed(step, message, attempt, error_types(exc),
                             dict(usage) if isinstance(usage, dict) else None,
                             getattr(exc, "retry_after", None))


@dataclass
class Outcome:
    """What became of one delivery of an attempt, for the task to report to Celery."""

    correlation_id: str
    step: str
    attempt: int
    ran: bool = True
    """False for a duplicate delivery (the attempt finished, or runs elsewhere)."""
    error: str | None = None
    retrying: bool = False
    ignored: bool = False
    """It ran, but its result was no longer awaited (cancelled, timed out meanwhile)."""

    def report(self) -> str:
        """Tell Celery (and Flower) the truth: a success returns a one-line summary (the
        task's result, which Flower shows), a failed attempt raises RETRY when another
        attempt follows, FAILURE otherwise. The outcome is already recorded."""
        if self.error is None:
            done = "done" if self.ran else "already finished or running elsewhere: ignored"
            return f"{self.correlation_id}/{self.step}#{self.attempt}: {done}"
        exc = StepAttemptFailed(f"step '{self.step}' attempt {self.attempt} failed: "
                                f"{self.error}", correlation_id=self.correlation_id,
                                step=self.step, attempt=self.attempt, retrying=self.retrying)
        if self.retrying:
            raise Retry(str(exc), exc)
        raise exc


class Engine:
    """Starts, advances, resumes, cancels and retries workflows; ``app`` sends tasks.

    ``in_worker``: True inside a Celery worker, where an unreachable service is waited
    for; a client gets an error instead.
    """

    def __init__(self, store: SqlStore, app: Celery, settings: Settings, *,
                 in_worker: bool = True, publish_patience: float = PUBLISH_PATIENCE) -> None:
        self.store = store
        self.app = app
        self.settings = settings
        self.in_worker = in_worker
        self.publish_patience = publish_patience
        self.heartbeat = Heartbeat(store.renew_leases, settings.lease_seconds)

    def impatient(self) -> Engine:
        """This engine, but a publish that fails is left to the next sweep at once (the
        sweep must not wait on a broker that is down)."""
        other = copy.copy(self)
        other.publish_patience = 0.0
        return other

    # -------------------------------------------------------------- transitions

    def create(self, decision: co.Decision, plan: Plan, **plan_ref: Any) -> bool:
        """Persist a new workflow's Start decision, then send what it calls for."""
        cid = decision.state.correlation_id
        created = self._db(lambda: self.store.create(decision, plan, **plan_ref),
                           "recording the new workflow", cid)
        if created:
            self.dispatch(decision)
        return created

    def apply(self, cid: str, event: co.Event, state: WorkflowState | None = None,
              names: Sequence[str] | None = None) -> co.Decision:
        """Apply one event durably, then send what it calls for (``state``: a recent
        read of the workflow; ``names``: the steps whose attempts to read with it)."""
        decision = self._db(
            lambda: self.store.transition(
                cid, lambda s, p, settled=None: co.decide(s, p, event, settled), state,
                fan_out=_fan_out_for(event), names=names),
            f"recording {type(event).__name__}", cid)
        if decision.changed:
            self.dispatch(decision)
        return decision

    def apply_if(self, row: Stuck, event: co.Event, statuses: Sequence[str]) -> co.Decision:
        """:meth:`apply`, only while the attempt's row is in one of ``statuses`` (the
        sweep's timeouts and lost workers: a sub-task that recorded its success just
        before is not failed after it)."""
        cid = row.correlation_id
        decision = self._db(lambda: self.store.transition_if(
            cid, row.step, row.attempt, statuses,
            lambda s, p, settled=None: co.decide(s, p, event, settled),
            fan_out=_fan_out_for(event), parent=row.parent_step),
            f"recording {type(event).__name__}", cid)
        if decision.changed:
            self.dispatch(decision)
        return decision

    def revoked(self, payload: dict[str, Any], terminated: bool = False,
                signum: Any = None) -> co.Decision | None:
        """A step task revoked (or terminated) through Celery's own commands (``celery
        control revoke``, ``terminate``, Flower's buttons): the attempt failed, with
        error type ``TaskRevokedError`` (retried by the step's policy unless that type
        is ``non_retryable``). The worker would otherwise discard the task and every
        re-send of it, and the workflow would wait for it forever. One try, no waiting
        (this runs in the worker's main loop): if the database cannot be reached, the
        sweep sends the attempt again and its discard comes back here. An attempt no
        longer awaited (our own revoke after a cancel or a timeout) changes nothing."""
        cid, step = payload.get("cid"), payload.get("step")
        if not isinstance(cid, str) or not isinstance(step, str):
            return None
        attempt = int(payload.get("attempt") or 1)
        how = f"terminated (signal {signum})" if terminated else "revoked"
        event = co.StepFailed(step, f"the task was {how} through Celery", attempt,
                              (REVOKED_ERROR,))
        once = copy.copy(self)
        once.in_worker = False
        try:
            return once.apply(cid, event)
        except (DatabaseUnavailable, BrokerUnavailable) as exc:
            log.warning("step %s attempt %d was %s (%s): the sweep takes it from here",
                        step, attempt, how, exc,
                        extra={"correlation_id": cid, "step": step})
            return None

    def run_step(self, payload: dict[str, Any], task_id: str | None,
                 worker: str | None = None, traceparent: str | None = None) -> Outcome:
        """Body of the step and sub-task tasks: claim the attempt, run its action under
        a lease, record the outcome (a sub-task's success: its own row, then the fan-in
        when it was the last), all inside the attempt's hooks (:mod:`chassis.hooks`:
        the log context, the attempt's span, yours). ``traceparent``: the trace context
        the task's message brought."""
        charged = payload.get("fuel")
        info = hooks.Attempt(
            str(payload["cid"]), str(payload["step"]), str(payload.get("action") or ""),
            int(payload.get("attempt") or 1), payload.get("parent"), task_id, worker,
            traceparent, charged if isinstance(charged, int) else None)
        with hooks.around(info):
            out = self._run_step(payload, task_id, worker, info)
            info.outcome = ("skipped" if not out.ran else "ignored" if out.ignored
                            else "succeeded" if out.error is None
                            else "retrying" if out.retrying else "failed")
            info.error = out.error
        return out

    def _run_step(self, payload: dict[str, Any], task_id: str | None, worker: str | None,
                  info: hooks.Attempt) -> Outcome:
        cid, step = payload["cid"], payload["step"]
        attempt = int(payload.get("attempt") or 1)
        timeout = float(payload.get("timeout") or self.settings.step_timeout)
        plan = self.store.cached_plan(cid)
        names = plan.neighbours(step) if plan is not None else [step]
        claim = infra.persist(lambda: self.store.claim(
            cid, step, attempt, task_id, lease=self.settings.lease_seconds, timeout=timeout,
            names=names, worker=worker), f"claiming step {step}", correlation_id=cid)
        if claim is None:
            log.info("step %s attempt %d finished, cancelled or running elsewhere: "
                     "duplicate delivery ignored", step, attempt)
            return Outcome(cid, step, attempt, ran=False)
        log.debug("step %s attempt %d, delivery %d", step, attempt, claim.deliveries)
        # the message carries ids and params only: the data is the workflow's, read with
        # the claim (PostgreSQL: the same round trip) or just after it
        state = claim.state or self._db(lambda: self.store.get(cid, names),
                                        "reading the workflow", cid)
        with self.heartbeat.hold(claim.row_id), \
                actions.attempt_context(self._attempt(cid, step, attempt)):
            # a copy: an action changing its input must not change the workflow's data
            # (the claim's state is written back by the transition that follows)
            event = run_action(payload, json_copy(state.step_data(step)), timeout)
        if isinstance(event, co.StepFailed):
            info.error_type = event.error_types[0] if event.error_types else None
        parent = payload.get("parent")
        if parent and isinstance(event, co.StepSucceeded):
            recorded, pending = infra.persist(
                lambda: self.store.record_subtask(cid, step, attempt, event.output, worker),
                f"recording sub-task {step}", correlation_id=cid)
            if not recorded:
                log.info("sub-task %s attempt %d is no longer awaited: result ignored",
                         step, attempt)
                return Outcome(cid, step, attempt, ignored=True)
            if pending is not None and pending <= 0:
                self.fan_in(cid, parent)
            return Outcome(cid, step, attempt)
        decision = self.apply(cid, event, claim.state, names)
        settled = fuel.ledger_key(cid, step, attempt) + co.SETTLE_SUFFIX
        info.settled = next((c.amount for c in decision.commands
                             if isinstance(c, co.Debit) and c.key == settled), None)
        if isinstance(event, co.StepFailed):
            return Outcome(cid, step, attempt, error=event.error,
                           retrying=decision.retries(step), ignored=not decision.changed)
        return Outcome(cid, step, attempt, ignored=not decision.changed)

    def _attempt(self, cid: str, step: str, attempt: int) -> actions.Attempt:
        """What an action learns of its attempt: a model response kept by an earlier
        delivery of it (read and written by the store, waiting for the database)."""
        return actions.Attempt(
            cid, step, attempt,
            load=lambda: self._db(lambda: self.store.recorded_response(cid, step, attempt),
                                  "reading a recorded model response", cid),
            keep=lambda r: self._db(lambda: self.store.record_response(cid, step, attempt, r),
                                    "recording a model response", cid),
            breakers=self.store.breakers)

    def fan_in(self, cid: str, parent: str) -> co.Decision:
        """Collect the recorded outputs of fan-out ``parent``'s sub-tasks."""
        done = self._db(lambda: self.store.completed_subtasks(cid, parent),
                        "reading sub-task outputs", cid)
        return self.apply(cid, co.SubtasksSucceeded(
            parent, {n: out for n, (_, out) in done.items()},
            {n: a for n, (a, _) in done.items()}))

    def resume(self, cid: str, approved: bool, feedback: Any = None,
               client_id: str | None = None, add_fuel: int = 0,
               traceparent: str | None = None, by: str | None = None,
               step: str | None = None) -> co.Decision:
        """``client_id`` approves (feedback kept as human_feedback) or rejects a paused
        workflow, adding ``add_fuel`` to its budget first; ``step``: the approval it
        answers (refused when the workflow waits at another). Raises WorkflowNotFound
        (another client's too) or InvalidTransition, having changed nothing."""
        with self._command_span("resume", cid, client_id, traceparent,
                                {"chassis.approved": approved, "chassis.add_fuel": add_fuel}):
            return self.apply(cid, co.Resume(approved, feedback, client_id, add_fuel, by,
                                             step))

    def respond(self, cid: str, response: co.ResponseReceived) -> co.Decision:
        """An external agent's answer (in the workflow's trace, linked to the agent's
        span when its message brought one)."""
        with self._command_span("response", cid, response.client_id, None,
                                {"chassis.success": response.success}):
            return self.apply(cid, response)

    @contextmanager
    def _command_span(self, what: str, cid: str, client_id: str | None,
                      traceparent: str | None,
                      attributes: dict[str, Any] | None = None) -> Iterator[None]:
        """A command's span in the workflow's trace (linked to the caller's, when its
        message brought one): the resume a pause waited for, a cancel, a retry."""
        traceparent = traceparent or tracing.caller()
        if not tracing.active():
            yield
            return
        root = self._db(lambda: self.store.traceparent(cid), "reading the workflow", cid)
        with tracing.span(f"{what} workflow", under=root or traceparent,
                          links=tracing.link(traceparent) if root else None,
                          attributes={tracing.CID: cid, "chassis.client_id": client_id,
                                      **(attributes or {})}):
            yield

    def cancel(self, cid: str, reason: str | None = None, client_id: str | None = None,
               compensate: bool = False, by: str | None = None) -> co.Decision:
        """``client_id`` cancels a workflow that has not finished (InvalidTransition
        otherwise); with ``compensate``, its completed steps are undone first."""
        with self._command_span("cancel", cid, client_id, None,
                                {"chassis.compensate": compensate}):
            return self.apply(cid, co.Cancel(reason, client_id, compensate, by))

    def retry(self, cid: str, client_id: str | None = None,
              by: str | None = None) -> co.Decision:
        """``client_id`` retries a FAILED workflow from its failed step (InvalidTransition
        otherwise); sub-tasks of a failed fan-out that had succeeded are kept."""
        state = self._db(lambda: self.store.get(cid), "reading the workflow", cid)
        outputs: dict[str, tuple[int, Any]] = {}
        plan = self._db(lambda: self.store.get_plan(cid), "reading the plan", cid)
        step = plan.steps.get(state.current_step)
        if step is not None and step.action == FAN_OUT:
            outputs = self._db(lambda: self.store.completed_subtasks(cid, state.current_step),
                               "reading sub-task outputs", cid)
        with self._command_span("retry", cid, client_id, None):
            return self.apply(cid, co.Retry({n: o for n, (_, o) in outputs.items()},
                                            {n: a for n, (a, _) in outputs.items()},
                                            client_id, by))

    # -------------------------------------------------------------- sending

    def dispatch(self, decision: co.Decision) -> None:
        """Send the Celery tasks (and revokes) a committed decision calls for."""
        s = decision.state
        charges = {c.key: c.amount + c.held for c in decision.commands
                   if isinstance(c, co.Debit) and c.kind in ("debit", "reserve")}
        for c in decision.commands:
            if isinstance(c, co.RunStep):
                self._publish(partial(self._send, s, c, charges), s.correlation_id)
            elif isinstance(c, co.RunFanOut):
                self._publish(partial(self._group, s, c, charges), s.correlation_id)
            elif isinstance(c, co.Revoke):
                self._revoke(s.correlation_id, c.task_ids)
        if decision.state.status is Status.PAUSED_FOR_HUMAN_INPUT and any(
                isinstance(c, co.Emit) for c in decision.commands):
            # a pause keeps no span open: a mark in the trace, the resume another
            with tracing.span(f"pause {s.current_step}", under=s.traceparent, attributes={
                    tracing.CID: s.correlation_id, tracing.STEP: s.current_step,
                    "chassis.pause": "fuel" if s.budget_wait else "approval"}):
                pass

    def resend(self, row: Stuck) -> None:
        """Send an attempt again, as it was first sent (the sweep's re-send; the claim
        makes a duplicate harmless)."""
        state = self.store.get(row.correlation_id)
        plan = self.store.get_plan(row.correlation_id)
        params = plan.work(row.step)[2]
        self._send(state, co.RunStep(row.step, row.action, dict(params), row.request_id or "",
                                     row.parent_step, row.attempt, plan.timeout(row.step)))

    def _send(self, s: WorkflowState, c: co.RunStep,
              charges: dict[str, int] | None = None) -> None:
        name = subtask_task_for(c.action) if c.parent_step else step_task_for(c.action)
        self.app.send_task(name, args=[message(s, c, charges)], task_id=c.request_id,
                           countdown=c.delay or None, ignore_result=True,
                           time_limit=self._hard_limit(c), argsrepr=_repr(s, c),
                           kwargsrepr="{}", shadow=shown_name(name, c.action),
                           headers=_trace_headers(s.traceparent))

    def _group(self, s: WorkflowState, c: co.RunFanOut,
               charges: dict[str, int] | None = None) -> None:
        """The fan-out's sub-tasks as one Celery group; traced, a span of the fan-out
        whose children their attempts' spans are."""
        with tracing.span(f"fan_out {c.step}", under=s.traceparent, attributes={
                tracing.CID: s.correlation_id, tracing.STEP: c.step,
                "chassis.subtasks": len(c.subtasks)}) as fan:
            headers = _trace_headers(tracing.traceparent_of(fan) or s.traceparent)
            sigs = [self.app.signature(
                subtask_task_for(t.action) if t.parent_step else step_task_for(t.action),
                args=[message(s, t, charges)],
                options={"task_id": t.request_id, "ignore_result": True,
                         "time_limit": self._hard_limit(t), "argsrepr": _repr(s, t),
                         "kwargsrepr": "{}", "headers": headers,
                         "shadow": shown_name(subtask_task_for(t.action) if t.parent_step
                                              else step_task_for(t.action), t.action)})
                    for t in c.subtasks]
            group(sigs, app=self.app).apply_async(add_to_parent=False)

    def _hard_limit(self, c: co.RunStep) -> float:
        return (c.timeout or self.settings.step_timeout) + HARD_LIMIT_GRACE

    def _revoke(self, cid: str, task_ids: tuple[str, ...]) -> None:
        """Revoke (and on prefork terminate) the tasks; late results are ignored anyway."""
        try:
            self.app.control.revoke(list(task_ids), terminate=True, signal="SIGKILL")
        except Exception as exc:
            if not infra.is_broker_error(exc):
                raise
            log.warning("could not revoke %d task(s), the broker is unreachable (%s); "
                        "their results will be ignored", len(task_ids), exc,
                        extra={"correlation_id": cid})

    def _publish(self, send: Callable[[], None], cid: str) -> None:
        if self.in_worker:
            try:
                infra.persist(send, "publishing a task", correlation_id=cid,
                              give_up_after=self.publish_patience)
            except Exception as exc:
                if not infra.is_broker_error(exc):
                    raise
                log.error("broker unreachable: the task stays dispatched in the database "
                          "and the sweep sends it again (%s)", exc,
                          extra={"correlation_id": cid})
            return
        try:
            send()
        except Exception as exc:
            if not infra.is_broker_error(exc):
                raise
            raise BrokerUnavailable(
                f"the broker at {maybe_sanitize_url(self.settings.broker_url)} is unreachable "
                f"({' '.join(str(exc).split())}): workflow {cid} is saved and goes on by "
                "itself once the broker is back (beat's sweep sends what is due)",
                service="broker", recorded=True, correlation_id=cid) from None

    def _db(self, fn: Callable[[], T], doing: str, cid: str) -> T:
        if self.in_worker:
            return infra.persist(fn, doing, correlation_id=cid)
        try:
            return fn()
        except Exception as exc:
            if not infra.is_database_error(exc):
                raise
            raise DatabaseUnavailable(
                f"cannot reach the database at {mask_url(self.settings.database_url)} "
                f"while {doing} for workflow {cid} "
                f"({' '.join(str(getattr(exc, 'orig', None) or exc).split())[:300]}); "
                "nothing was changed, try again once it is back",
                service="database", recorded=False, correlation_id=cid) from None


def _fan_out_for(event: co.Event) -> Callable[[WorkflowState, Plan], str | None] | None:
    """Events that may end a fan-out under way (a failure, a cancel, a retry whose
    request cannot be sent) read its sub-tasks' successes under lock, so that each
    completed one is known, and undone should the workflow fail."""
    if isinstance(event, co.StepFailed | co.Cancel | co.RetryDue) or (
            isinstance(event, co.ResponseReceived) and not event.success):
        return co.open_fan_out
    return None


def shown_name(task: str, action: str) -> str:
    """The name Flower and the worker's log lines show for a step task: the task's and
    the action's, e.g. ``chassis.step web_search`` (Celery's ``shadow``)."""
    return f"{task} {action}"


def _repr(s: WorkflowState, c: co.RunStep) -> str:
    """What Flower and the logs show for a step task (Celery would repr the whole payload,
    collected data included, on every send)."""
    return f"({s.correlation_id}/{c.step}#{c.attempt}: {c.action})"


def message(s: WorkflowState, c: co.RunStep,
            charges: dict[str, int] | None = None) -> dict[str, Any]:
    """The task payload of one attempt: what it runs, not the data it sees (the worker
    reads that with its claim), so a message stays the same size however much the
    workflow has collected; and the fuel charged (or reserved) for it, when known."""
    out = {"cid": s.correlation_id, "step": c.step, "action": c.action, "params": c.params,
           "parent": c.parent_step, "attempt": c.attempt, "timeout": c.timeout}
    charged = (charges or {}).get(fuel.ledger_key(s.correlation_id, c.step, c.attempt))
    if charged is not None:
        out["fuel"] = charged
    return out


def _trace_headers(traceparent: str | None) -> dict[str, str] | None:
    """Celery message headers carrying the trace context (W3C traceparent), if any."""
    return {tracing.TRACEPARENT: traceparent} if traceparent else None
