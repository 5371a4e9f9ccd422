"""Every record logged while a task runs (Celery's own "succeeded" line included)
carries the workflow's correlation_id, the step and the Celery task id."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from celery.signals import task_postrun, task_prerun

from chassis import logs

_bound: dict[str, AbstractContextManager[None]] = {}


def workflow_ids(task: str, args: Any, kwargs: Any) -> tuple[str | None, str | None]:
    """(correlation_id, step) from a chassis task's arguments (see tasks.workflow)."""
    args = list(args or ())
    first = args[0] if args else None
    if isinstance(first, dict):  # step and sub-task payloads; a Kafka start request
        return first.get("cid") or first.get("correlation_id"), first.get("step")
    if task in ("chassis.resume", "chassis.respond", "chassis.cancel", "chassis.retry") \
            and args:
        return args[0], None
    cid = (kwargs or {}).get("correlation_id")
    return cid, (kwargs or {}).get("step")


@task_prerun.connect
def _bind(task_id: str, task: Any, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    cid, step = workflow_ids(task.name, args, kwargs)
    ctx = logs.bind(correlation_id=cid, step=step, task_id=task_id)
    ctx.__enter__()
    _bound[task_id] = ctx


@task_postrun.connect
def _unbind(task_id: str, **_: Any) -> None:
    ctx = _bound.pop(task_id, None)
    if ctx is not None:
        ctx.__exit__(None, None, None)
