"""Logging context: every record about a workflow carries correlation_id, step and the
Celery task id; ``CHASSIS_LOG_FORMAT=json`` writes JSON lines (python-json-logger) that
keep every ``extra`` field and carry trace_id/span_id inside an OpenTelemetry span.

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
from functools import cache, partial
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

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
    """Celery logs "Task ... received" before the task runs, outside any context (and
    before any signal or hook: its task_received signal comes after the line), with the
    task's id and argument summary in ``record.data``: take the ids from there (the
    summary is the engine's own, see chassis.engine._repr). Everything logged while an
    attempt runs has its context from the attempt's hooks (chassis.hooks)."""
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


def _text(value: object) -> str:
    """What a value that JSON cannot hold becomes: its str (its repr if str fails)."""
    try:
        return str(value)
    except Exception:  # a log line must not fail
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


@cache
def _otel_trace() -> Any:
    """``opentelemetry.trace``, imported on first use; None when opentelemetry-api is not
    installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``,
    ``correlation_id``, ``step``, ``task_id``, every ``extra`` field of the record,
    ``exc`` for a traceback, and ``trace_id``/``span_id`` inside a valid span."""

    def __init__(self) -> None:
        super().__init__(["levelname", "name", "message", *FIELDS],
                         rename_fields={"levelname": "level", "name": "logger",
                                        "exc_info": "exc"},
                         json_default=_text,
                         json_serializer=partial(json.dumps, allow_nan=False))

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        try:
            return super().jsonify_log_record(log_data)
        except (TypeError, ValueError):  # NaN, a dict with tuple keys, a cycle: its str
            safe: dict[str, Any] = {}
            for key, value in log_data.items():
                try:
                    super().jsonify_log_record({"v": value})
                except (TypeError, ValueError):
                    value = _text(value)
                safe[_text(key)] = value
            return super().jsonify_log_record(safe)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        log_data["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat()
        super().add_fields(log_data, record, message_dict)
        # the record's own fields win over an extra of the same name
        log_data["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat()
        log_data["level"], log_data["logger"] = record.levelname, record.name
        if isinstance(record.msg, dict):  # logger.info({...}): its keys are fields too
            log_data["message"] = record.getMessage()
        for name in FIELDS:
            if log_data.get(name) is None:
                log_data[name] = "-"
        trace = _otel_trace()
        if trace is not None:  # inside a valid span (nothing when tracing is off)
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                log_data["trace_id"] = format(span.trace_id, "032x")
                log_data["span_id"] = format(span.span_id, "016x")


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
