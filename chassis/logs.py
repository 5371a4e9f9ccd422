"""Logging context: every record about a workflow carries correlation_id, step and the
Celery task id; ``CHASSIS_LOG_FORMAT=json`` writes JSON lines.

The library only adds context (a contextvar and a filter); handlers are installed by
the CLI and by the worker's logging signals, never on import.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_context: contextvars.ContextVar[dict[str, str | None] | None] = contextvars.ContextVar(
    "chassis_log_context", default=None)
FIELDS = ("correlation_id", "step", "task_id")


@contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Records logged inside the block carry these fields (unless a record sets its own)."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


#: A correlation id, then maybe "/step": how the engine summarises a step task's
#: arguments ("(cid/step#attempt: action)") and the bridge its tasks'
#: ("(correlation_id=cid)").
_SUMMARY = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
                      r"(?:/([^:)#]+))?")


def _celery_received(record: logging.LogRecord) -> dict[str, str | None]:
    """Celery logs "Task ... received" before the task runs, outside any context, with
    the task's id and argument summary in ``record.data``: take the ids from there."""
    data = getattr(record, "data", None)
    if not isinstance(data, dict) or "id" not in data:
        return {}
    found = _SUMMARY.search(str(data.get("args") or ""))
    return {"task_id": data["id"], "correlation_id": found and found.group(1),
            "step": found and found.group(2)}


class ContextFilter(logging.Filter):
    """Puts correlation_id, step and task_id on every record ("-" when unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get() or _celery_received(record)
        for name in FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, ctx.get(name) or _celery_task_id(name) or "-")
        return True


def _celery_task_id(name: str) -> str | None:
    if name != "task_id":
        return None
    try:
        from celery import current_task
    except ImportError:  # pragma: no cover
        return None
    request = getattr(current_task, "request", None)
    return getattr(request, "id", None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for name in FIELDS:
            doc[name] = getattr(record, name, "-")
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


TEXT_FORMAT = ("%(asctime)s %(levelname)s %(name)s [cid=%(correlation_id)s step=%(step)s "
               "task=%(task_id)s] %(message)s")


def install(handler: logging.Handler, log_format: str) -> None:
    """Give ``handler`` the context filter and the chosen format."""
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))


def configure(log_format: str, level: str) -> None:
    """For the CLI's long-running commands: one stderr handler on the root logger."""
    handler = logging.StreamHandler()
    install(handler, log_format)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
