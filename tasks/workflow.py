"""Workflow tasks. Thin: parse the payload, call one chassis function, return."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_init

from chassis import config, logs, runtime
from chassis.coordinator import ResponseReceived
from chassis.errors import InvalidTransition
from chassis.runtime import engine, relay_outbox
from chassis.store.db import dispose_engines
from tasks.celery_app import app

log = logging.getLogger(__name__)


@app.task(name="chassis.step", bind=True)
def step(self: Task, payload: dict[str, Any]) -> None:
    """Run one step's action, record its outcome, dispatch what comes next."""
    engine(app).run_step(payload, self.request.id)


@app.task(name="chassis.ai_step", bind=True)
def ai_step(self: Task, payload: dict[str, Any]) -> None:
    """``chassis.step`` for an AI action, on the chassis.ai queue; its own name carries
    the AI rate limit (CHASSIS_AI_RATE_LIMIT)."""
    engine(app).run_step(payload, self.request.id)


@app.task(name="chassis.subtask", bind=True, ignore_result=False)
def subtask(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one fan-out sub-task; its result goes to the chord callback."""
    return engine(app).run_subtask(payload, self.request.id)


@app.task(name="chassis.ai_subtask", bind=True, ignore_result=False)
def ai_subtask(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """``chassis.subtask`` for an AI action (rate-limited like ``chassis.ai_step``)."""
    return engine(app).run_subtask(payload, self.request.id)


@app.task(name="chassis.join")
def join(results: list[dict[str, Any]], correlation_id: str, step: str) -> None:
    """Chord callback: record every sub-task's output and continue the workflow."""
    engine(app).join(correlation_id, step, results)


@app.task(name="chassis.fanout")
def fanout(correlation_id: str, step: str) -> None:
    """Send the chord of a fan-out that an app decided (apps don't build chords)."""
    engine(app).fan_out(correlation_id, step)


@app.task(name="chassis.resume")
def resume(correlation_id: str, approved: bool, feedback: Any = None) -> None:
    """Resume a paused workflow (sent by other apps and the Kafka bridge). A resume of a
    workflow no longer paused (a duplicate command) changes nothing and is not an error."""
    try:
        engine(app).resume(correlation_id, approved, feedback)
    except InvalidTransition as exc:
        log.info("resume ignored: %s", exc, extra={"correlation_id": correlation_id})


@app.task(name="chassis.start")
def start(payload: dict[str, Any]) -> str:
    """Start a registered plan for a Kafka start request (idempotent by correlation_id)."""
    return runtime.client(app).start_request(payload)


@app.task(name="chassis.respond")
def respond(correlation_id: str, request_id: str, success: bool, data: Any = None,
            error: str | None = None) -> None:
    """An external agent's TaskResponse to request ``request_id`` (its causation_id)."""
    engine(app).apply(correlation_id, ResponseReceived(request_id, success, data, error))


@app.task(name="chassis.relay")
def relay() -> int:
    """Publish the outbox to Kafka (beat's fallback for `chassis relay`)."""
    return relay_outbox()


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
