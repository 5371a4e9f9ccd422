"""Workflow tasks. Thin: parse the payload, call one chassis function, return."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.signals import worker_process_init

from chassis import runtime
from chassis.runtime import engine
from chassis.store.db import dispose_engines
from tasks.celery_app import app


@app.task(name="chassis.step", bind=True)
def step(self: Task, payload: dict[str, Any]) -> None:
    """Run one step's action, record its outcome, dispatch what comes next."""
    engine(app).run_step(payload, self.request.id)


@app.task(name="chassis.subtask", bind=True, ignore_result=False)
def subtask(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one fan-out sub-task; its result goes to the chord callback."""
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
    """Resume a paused workflow (sent by other apps and the Kafka bridge)."""
    engine(app).resume(correlation_id, approved, feedback)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A forked pool process must not reuse its parent's database connections."""
    runtime.reset()
    dispose_engines()
