"""Workflow tasks. Thin: parse the payload, call one chassis function, return."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_revoked,
    worker_process_init,
)

from chassis import config, inbox, infra, logs, runtime
from chassis.celery_conf import (
    AI_STEP_TASK,
    AI_SUBTASK_TASK,
    CANCEL_TASK,
    RELAY_TASK,
    RESPOND_TASK,
    RESUME_TASK,
    RETRY_TASK,
    START_TASK,
    STATUS_TASK,
    STEP_TASK,
    SUBTASK_TASK,
)
from chassis.errors import (
    InputError,
    PlanError,
    PlanNotFound,
    StepAttemptFailed,
    WorkflowNotFound,
)
from chassis.runtime import engine, relay_outbox
from chassis.store.db import dispose_engines
from tasks.celery_app import app

log = logging.getLogger(__name__)

#: An attempt whose action raised is reported as this, after it is recorded: Celery
#: logs it without a traceback and Flower shows FAILURE (RETRY when another follows).
_ATTEMPT = {"bind": True, "throws": (StepAttemptFailed,)}
#: A request refused for what it says (bad arguments, another client's or an unknown
#: workflow, a plan that is not registered, a conflicting start): FAILURE with the
#: reason, logged in one line, without a traceback.
_REFUSABLE = {"throws": (InputError, PlanError, PlanNotFound, WorkflowNotFound)}
#: The task contract for other apps (chassis.contract): results are stored (with a
#: result backend) so a caller's AsyncResult.get() returns them, or raises the refusal.
_CONTRACT = {**_REFUSABLE, "ignore_result": False}


@app.task(name=STEP_TASK, **_ATTEMPT)
def step(self: Task, payload: dict[str, Any]) -> str:
    """Run one attempt of a step, record its outcome, dispatch what comes next."""
    return engine(app).run_step(payload, self.request.id).report()


@app.task(name=AI_STEP_TASK, **_ATTEMPT)
def ai_step(self: Task, payload: dict[str, Any]) -> str:
    """``chassis.step`` for an AI action, on the chassis.ai queue; its own name carries
    the AI rate limit (CHASSIS_AI_RATE_LIMIT)."""
    return engine(app).run_step(payload, self.request.id).report()


@app.task(name=SUBTASK_TASK, **_ATTEMPT)
def subtask(self: Task, payload: dict[str, Any]) -> str:
    """Run one attempt of a fan-out sub-task; the last one to succeed fans in."""
    return engine(app).run_step(payload, self.request.id).report()


@app.task(name=AI_SUBTASK_TASK, **_ATTEMPT)
def ai_subtask(self: Task, payload: dict[str, Any]) -> str:
    """``chassis.subtask`` for an AI action (rate-limited like ``chassis.ai_step``)."""
    return engine(app).run_step(payload, self.request.id).report()


@app.task(name=CANCEL_TASK, **_CONTRACT)
def cancel(correlation_id: str, reason: str | None = None, client_id: str | None = None,
           compensate: bool = False) -> dict[str, Any]:
    """``client_id`` cancels a workflow (sent by other apps and the Kafka bridge); with
    ``compensate``, its completed steps are undone first (COMPENSATING, then CANCELLED).
    Cancelling one that has already finished changes nothing and is not an error here."""
    return inbox.cancel(engine(app), correlation_id, reason, client_id, compensate)


@app.task(name=RETRY_TASK, **_CONTRACT)
def retry(correlation_id: str, client_id: str | None = None) -> dict[str, Any]:
    """``client_id`` retries a FAILED workflow from its failed step."""
    return inbox.retry(engine(app), correlation_id, client_id)


@app.task(name=RESUME_TASK, **_CONTRACT)
def resume(correlation_id: str, approved: bool, feedback: Any = None,
           client_id: str | None = None) -> dict[str, Any]:
    """``client_id`` resumes a paused workflow (sent by other apps and the Kafka bridge).
    A resume of a workflow no longer paused (a duplicate command) changes nothing and is
    not an error."""
    return inbox.resume(engine(app), correlation_id, approved, feedback, client_id)


@app.task(name=START_TASK, **_CONTRACT)
def start(payload: dict[str, Any]) -> dict[str, Any]:
    """Start a registered plan for a start request (from Kafka or another app;
    idempotent by correlation_id; an unreachable database is waited for): the
    workflow's id and status."""
    cid = payload.get("correlation_id") if isinstance(payload, dict) else None
    started = infra.persist(lambda: runtime.client(app).start_request(payload),
                            "starting a workflow", correlation_id=cid if isinstance(cid, str)
                            else None)
    return {"correlation_id": started,
            "status": engine(app).store.get(started).status.value}


@app.task(name=STATUS_TASK, **_CONTRACT)
def status(correlation_id: str, client_id: str | None = None) -> dict[str, Any]:
    """``client_id``'s workflow's status document (as ``chassis status --json``)."""
    return inbox.status(engine(app), correlation_id, client_id)


@app.task(name=RESPOND_TASK, **_REFUSABLE)
def respond(correlation_id: str, request_id: str, success: bool, data: Any = None,
            error: str | None = None, error_type: str | None = None,
            client_id: str | None = None) -> None:
    """An external agent's TaskResponse to request ``request_id`` (its causation_id),
    for the workflow's client ``client_id``; ``error_type`` is matched against the
    step's ``retry.non_retryable``."""
    inbox.respond(engine(app), correlation_id, request_id, success, data, error, error_type,
                  client_id)


@app.task(name=RELAY_TASK)
def relay() -> int:
    """Publish the outbox to Kafka (beat's fallback for `chassis relay`)."""
    return relay_outbox()


#: The tasks that run a step's attempt (their first argument: the attempt's payload).
_STEP_TASKS = frozenset({STEP_TASK, AI_STEP_TASK, SUBTASK_TASK, AI_SUBTASK_TASK})


@task_revoked.connect
def _revoked(sender: Any = None, request: Any = None, terminated: bool = False,
             signum: Any = None, **_: Any) -> None:
    """A step task revoked or terminated through Celery (``celery control revoke``,
    ``terminate``, Flower) is a failed attempt, not a workflow waiting forever."""
    if getattr(sender, "name", None) not in _STEP_TASKS:
        return
    args = getattr(request, "args", None) or ()
    payload = args[0] if args and isinstance(args[0], dict) else None
    if payload is None:
        return
    try:
        engine(app).revoked(payload, terminated, signum)
    except Exception:  # a signal handler must not break the worker's loop
        log.exception("could not record the revoked task %s",
                      getattr(request, "id", None))


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A forked pool process must not reuse its parent's database connections."""
    runtime.reset()
    dispose_engines()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_context(logger: Any, **_: Any) -> None:
    """Worker log records carry correlation_id, step and task id (JSON if configured)."""
    fmt = config.load().log_format
    for handler in logger.handlers:
        logs.install(handler, fmt)
