"""agentchassis' Celery tasks, for its own app (:mod:`chassis.worker`) or one you have.

``install(app)`` adds the tasks, their queues and routes and beat's entries to an
existing Celery app: a project with its own ``tasks.py`` keeps it, and its workers run
workflows too. Task bodies are thin: parse the payload, call one chassis function,
return.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, ExitStack
from datetime import timedelta
from typing import Any

from celery import Celery, Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_prerun,
    task_revoked,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from kombu import Queue

from chassis import config, inbox, infra, logs, runtime, tracing
from chassis.celery_conf import (
    AI_STEP_TASK,
    AI_SUBTASK_TASK,
    CANCEL_TASK,
    PRUNE_TASK,
    RELAY_TASK,
    RESPOND_TASK,
    RESUME_TASK,
    RETRY_TASK,
    START_TASK,
    STATUS_TASK,
    STEP_TASK,
    SUBTASK_TASK,
    SWEEP_TASK,
    celery_settings,
)
from chassis.config import Settings
from chassis.errors import (
    ConfigError,
    InputError,
    PlanError,
    PlanNotFound,
    StepAttemptFailed,
    WorkflowNotFound,
)
from chassis.runtime import engine, relay_outbox
from chassis.store.db import dispose_engines, make_engine
from chassis.store.prune import prune as prune_workflows
from chassis.sweep import Sweeper

log = logging.getLogger(__name__)

#: Every chassis task: a delivery may come again after a crash, and every task is
#: idempotent (set per task, so an app it is installed into keeps its own defaults).
_ALWAYS = {"acks_late": True, "reject_on_worker_lost": True}

#: An attempt whose action raised is reported as this, after it is recorded: Celery
#: logs it without a traceback and Flower shows FAILURE (RETRY when another follows).
_ATTEMPT = {**_ALWAYS, "bind": True, "throws": (StepAttemptFailed,), "ignore_result": True}
#: A request refused for what it says (bad arguments, another client's or an unknown
#: workflow, a plan that is not registered, a conflicting start): FAILURE with the
#: reason, logged in one line, without a traceback.
_REFUSABLE = {**_ALWAYS, "throws": (InputError, PlanError, PlanNotFound, WorkflowNotFound),
              "ignore_result": True}
#: The task contract for other apps (chassis.contract): results are stored (with a
#: result backend) so a caller's AsyncResult.get() returns them, or raises the refusal.
_CONTRACT = {**_REFUSABLE, "ignore_result": False}


def _register(app: Celery) -> None:
    """Define the tasks on ``app``. Their bodies use the engine of the app running them
    (``self.app``), not of the app they were first defined on: Celery shares a task with
    every app made after it in a process."""

    @app.task(name=STEP_TASK, **_ATTEMPT)
    def step(self: Task, payload: dict[str, Any]) -> str:
        """Run one attempt of a step, record its outcome, dispatch what comes next."""
        return engine(self.app).run_step(payload, self.request.id, self.request.hostname,
                                    _traceparent(self.request)).report()

    @app.task(name=AI_STEP_TASK, **_ATTEMPT)
    def ai_step(self: Task, payload: dict[str, Any]) -> str:
        """``chassis.step`` for an AI action, on the chassis.ai queue; its own name carries
        the AI rate limit (CHASSIS_AI_RATE_LIMIT)."""
        return engine(self.app).run_step(payload, self.request.id, self.request.hostname,
                                    _traceparent(self.request)).report()

    @app.task(name=SUBTASK_TASK, **_ATTEMPT)
    def subtask(self: Task, payload: dict[str, Any]) -> str:
        """Run one attempt of a fan-out sub-task; the last one to succeed fans in."""
        return engine(self.app).run_step(payload, self.request.id, self.request.hostname,
                                    _traceparent(self.request)).report()

    @app.task(name=AI_SUBTASK_TASK, **_ATTEMPT)
    def ai_subtask(self: Task, payload: dict[str, Any]) -> str:
        """``chassis.subtask`` for an AI action (rate-limited like ``chassis.ai_step``)."""
        return engine(self.app).run_step(payload, self.request.id, self.request.hostname,
                                    _traceparent(self.request)).report()

    @app.task(name=CANCEL_TASK, bind=True, **_CONTRACT)
    def cancel(self: Task, correlation_id: str, reason: str | None = None,
               client_id: str | None = None, compensate: bool = False) -> dict[str, Any]:
        """``client_id`` cancels a workflow (sent by other apps and the Kafka bridge); with
        ``compensate``, its completed steps are undone first (COMPENSATING, then CANCELLED).
        Cancelling one that has already finished changes nothing and is not an error here."""
        return inbox.cancel(engine(self.app), correlation_id, reason, client_id, compensate)

    @app.task(name=RETRY_TASK, bind=True, **_CONTRACT)
    def retry(self: Task, correlation_id: str, client_id: str | None = None) -> dict[str, Any]:
        """``client_id`` retries a FAILED workflow from its failed step."""
        return inbox.retry(engine(self.app), correlation_id, client_id)

    @app.task(name=RESUME_TASK, bind=True, **_CONTRACT)
    def resume(self: Task, correlation_id: str, approved: bool, feedback: Any = None,
               client_id: str | None = None, add_fuel: int = 0,
               step: str | None = None) -> dict[str, Any]:
        """``client_id`` resumes a paused workflow (sent by other apps and the Kafka bridge),
        adding ``add_fuel`` to its budget first; ``step``: the approval it answers. A
        resume of a workflow no longer paused, or waiting at another step (a duplicate
        or late command), changes nothing and is not an error."""
        return inbox.resume(engine(self.app), correlation_id, approved, feedback, client_id,
                            add_fuel, step)

    @app.task(name=START_TASK, bind=True, **_CONTRACT)
    def start(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        """Start a registered plan for a start request (from Kafka or another app;
        idempotent by correlation_id; an unreachable database is waited for): the
        workflow's id and status."""
        cid = payload.get("correlation_id") if isinstance(payload, dict) else None
        started = infra.persist(lambda: runtime.client(self.app).start_request(payload),
                                "starting a workflow", correlation_id=cid if isinstance(cid, str)
                                else None)
        return {"correlation_id": started,
                "status": engine(self.app).store.get(started).status.value}

    @app.task(name=STATUS_TASK, bind=True, **_CONTRACT)
    def status(self: Task, correlation_id: str, client_id: str | None = None) -> dict[str, Any]:
        """``client_id``'s workflow's status document (as ``chassis status --json``)."""
        return inbox.status(engine(self.app), correlation_id, client_id)

    @app.task(name=RESPOND_TASK, bind=True, **_REFUSABLE)
    def respond(self: Task, correlation_id: str, request_id: str, success: bool, data: Any = None,
                error: str | None = None, error_type: str | None = None,
                client_id: str | None = None) -> None:
        """An external agent's TaskResponse to request ``request_id`` (its causation_id),
        for the workflow's client ``client_id``; ``error_type`` is matched against the
        step's ``retry.non_retryable``."""
        inbox.respond(engine(self.app), correlation_id, request_id, success, data, error,
                      error_type, client_id)

    @app.task(name=RELAY_TASK, **_ALWAYS, ignore_result=True)
    def relay() -> int:
        """Publish the outbox to Kafka (beat's fallback for `chassis relay`)."""
        return relay_outbox()

    @app.task(name=SWEEP_TASK, bind=True, **_ALWAYS)
    def sweep(self: Task) -> dict[str, int]:
        """Re-dispatch or fail steps and workflows stuck past their time."""
        return Sweeper(runtime.engine(self.app), config.load()).sweep().counts()

    @app.task(name=PRUNE_TASK, **_ALWAYS)
    def prune(days: float) -> dict[str, object]:
        """Remove finished workflows unchanged for ``days`` (beat sends it daily with
        CHASSIS_PRUNE_AFTER_DAYS from its own environment): what ``chassis prune
        --older-than`` does."""
        settings = config.load()
        return prune_workflows(make_engine(settings.database_url),
                               timedelta(days=float(days)),
                               kafka=bool(settings.kafka_bootstrap)).counts()


def _json_only(app: Celery) -> None:
    """agentchassis' messages and results are JSON: an app that sends or accepts
    anything else (pickle) is refused, naming the setting."""
    conf = app.conf
    accepted = {str(c).split("/")[-1] for c in (conf.accept_content or ())}
    wrong = [name for name, ok in (
        ("task_serializer", conf.task_serializer == "json"),
        ("result_serializer", conf.result_serializer == "json"),
        ("accept_content", accepted == {"json"})) if not ok]
    if wrong:
        raise ConfigError(
            f"agentchassis needs JSON messages: set {', '.join(wrong)} of the Celery app "
            f"{app.main!r} to json (task_serializer='json', result_serializer='json', "
            "accept_content=['json'])")


def _merged_routes(routes: Any, ours: Mapping[str, Any]) -> Any:
    if not routes:
        return dict(ours)
    if isinstance(routes, Mapping):
        return {**routes, **ours}
    return (*routes, dict(ours))  # a list of routers: ours last, theirs first


def install(app: Celery, settings: Settings | None = None) -> Celery:
    """Add agentchassis to an existing Celery ``app``: its tasks (``chassis.*``), its
    three queues and their routes, beat's entries (the sweep, the relay fallback,
    pruning), and the user action modules of CHASSIS_ACTION_MODULES. The app keeps its
    broker, backend and settings; it must use JSON (ConfigError otherwise). Returns the
    app. Its workers consume the app's queues and the chassis ones (a plain ``celery
    -A yourapp worker``), or each its own (``-Q``), as the README shows."""
    settings = settings or config.load()
    _json_only(app)
    ours = celery_settings(settings)
    # the app's own queues stay; with none declared, its default one (which Celery
    # would have made by itself) is declared so its worker goes on consuming it
    theirs = list(app.conf.task_queues or ()) or [Queue(app.conf.task_default_queue)]
    have = {q.name for q in theirs}
    app.conf.task_queues = (*theirs, *(q for q in ours["task_queues"] if q.name not in have))
    app.conf.task_routes = _merged_routes(app.conf.task_routes, ours["task_routes"])
    app.conf.beat_schedule = {**ours["beat_schedule"], **(app.conf.beat_schedule or {})}
    app.conf.imports = (*tuple(app.conf.imports or ()), *settings.action_modules)
    _register(app)
    return app


def own_app(settings: Settings) -> Celery:
    """agentchassis' own app, configured from ``settings`` (:mod:`chassis.worker`)."""
    app = Celery("agentchassis")
    app.conf.update(celery_settings(settings))
    app.conf.imports = tuple(settings.action_modules)
    _register(app)
    return app


# ------------------------------------------------------------- worker signals

_bound: dict[str, AbstractContextManager[Any]] = {}


def workflow_ids(task: str, args: Any, kwargs: Any) -> tuple[str | None, str | None]:
    """(correlation_id, step) from a chassis task's arguments."""
    args = list(args or ())
    first = args[0] if args else None
    if isinstance(first, dict):  # step and sub-task payloads; a start request
        return first.get("cid") or first.get("correlation_id"), first.get("step")
    if task in (RESUME_TASK, RESPOND_TASK, CANCEL_TASK, RETRY_TASK, STATUS_TASK) and args:
        return args[0], None
    cid = (kwargs or {}).get("correlation_id")
    return cid, (kwargs or {}).get("step")


def _traceparent(request: Any) -> str | None:
    """The trace context (W3C traceparent) a task's message brought in its headers."""
    found = getattr(request, "traceparent", None)
    if found is None:
        headers = getattr(request, "headers", None)
        found = headers.get("traceparent") if isinstance(headers, dict) else None
    return found if isinstance(found, str) and len(found) <= 128 else None


@task_prerun.connect
def _bind(task_id: str, task: Any, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    """Every record logged while a task runs (Celery's own "succeeded" line included)
    carries the workflow's correlation_id, the step and the Celery task id; the trace
    context its message brought is the caller's (chassis.tracing.caller)."""
    cid, step = workflow_ids(task.name, args, kwargs)
    ctx = ExitStack()
    ctx.enter_context(logs.bind(correlation_id=cid, step=step, task_id=task_id))
    ctx.enter_context(tracing.incoming(_traceparent(getattr(task, "request", None))))
    _bound[task_id] = ctx


@task_postrun.connect
def _unbind(task_id: str, **_: Any) -> None:
    ctx = _bound.pop(task_id, None)
    if ctx is not None:
        ctx.__exit__(None, None, None)


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
        engine(sender.app).revoked(payload, terminated, signum)
    except Exception:  # a signal handler must not break the worker's loop
        log.exception("could not record the revoked task %s",
                      getattr(request, "id", None))


@worker_process_shutdown.connect
@worker_shutdown.connect
def _flush_spans(**_: Any) -> None:
    """A pool process (or the worker) ending sends the spans it still buffers (a forked
    pool process ends without the exit hooks that would)."""
    tracing.flush()


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


__all__ = ["install", "own_app", "workflow_ids"]
