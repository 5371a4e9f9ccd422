"""Log records about a workflow carry its ids; JSON lines on request."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from chassis import logs

pytestmark = pytest.mark.timeout(30)


def capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.install(handler, fmt)
    logger = logging.getLogger(f"test.logs.{fmt}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_correlation_id_step_and_task_id() -> None:
    logger, stream = capture("json")
    with logs.bind(correlation_id="cid-1", step="generate", task_id="t-9"):
        logger.info("step %s done", "generate")
    logger.info("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "step generate done"
    assert (first["correlation_id"], first["step"], first["task_id"]) == ("cid-1", "generate",
                                                                         "t-9")
    assert second["correlation_id"] == "-" and second["level"] == "INFO"


def test_text_format_names_the_ids_and_explicit_extra_wins() -> None:
    logger, stream = capture("text")
    with logs.bind(correlation_id="cid-2", step="a"):
        logger.warning("hello", extra={"step": "b"})
    line = stream.getvalue()
    assert "cid=cid-2" in line and "step=b" in line and "hello" in line


def test_json_keeps_every_extra_field_and_the_exception() -> None:
    logger, stream = capture("json")
    with logs.bind(correlation_id="cid-3", step="s"):
        logger.warning("retrying", extra={"model": "claude-haiku-5-5", "attempt": 2,
                                          "detail": {"status": 529, "ok": False},
                                          "tags": ["a", "b"], "fee": None})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", extra={"model": "m"})
    warning, error = (json.loads(line) for line in stream.getvalue().splitlines())
    assert warning == {"ts": warning["ts"], "level": "WARNING", "logger": "test.logs.json",
                       "message": "retrying", "correlation_id": "cid-3", "step": "s",
                       "task_id": "-", "model": "claude-haiku-5-5", "attempt": 2,
                       "detail": {"status": 529, "ok": False}, "tags": ["a", "b"],
                       "fee": None}
    assert datetime.fromisoformat(warning["ts"]).tzinfo is not None
    assert error["model"] == "m" and error["level"] == "ERROR"
    assert error["exc"].startswith("Traceback") and "ValueError: boom" in error["exc"]
    assert "exc_info" not in error and "trace_id" not in warning


class Opaque:
    def __str__(self) -> str:
        return "opaque!"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")


def test_json_values_that_json_cannot_hold_become_their_str() -> None:
    logger, stream = capture("json")
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    logger.info("odd", extra={"obj": Opaque(), "when": when, "path": Path("/tmp/x"),
                              "nested": {"inner": Opaque()}, "nan": float("nan"),
                              "tuple_keys": {(1, 2): "x"}, "bad": Unprintable(),
                              "uuid": uuid.UUID(int=1)})
    logger.info({"event": "dict message", "n": 1})
    odd, as_dict = (json.loads(line) for line in stream.getvalue().splitlines())
    assert odd["obj"] == "opaque!" and odd["nested"] == {"inner": "opaque!"}
    assert odd["when"] == str(when) and odd["path"] == "/tmp/x"
    assert odd["nan"] == "nan" and odd["tuple_keys"] == "{(1, 2): 'x'}"
    assert odd["bad"].startswith("<tests.unit.test_logs.Unprintable object at")
    assert odd["uuid"] == str(uuid.UUID(int=1)) and odd["message"] == "odd"
    assert (as_dict["event"], as_dict["n"]) == ("dict message", 1)
    assert as_dict["message"] == "{'event': 'dict message', 'n': 1}"


def test_json_carries_trace_and_span_ids_inside_a_span_only() -> None:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    tracer = sdk_trace.TracerProvider().get_tracer("test.logs")  # not the global provider
    logger, stream = capture("json")
    logger.info("before")
    with tracer.start_as_current_span("step") as span:
        logger.info("inside", extra={"model": "m"})
        with tracer.start_as_current_span("child") as child:
            logger.info("in the child")
    logger.info("after")
    before, inside, in_child, after = (json.loads(line)
                                       for line in stream.getvalue().splitlines())
    ctx, child_ctx = span.get_span_context(), child.get_span_context()
    assert (inside["trace_id"], inside["span_id"]) == (format(ctx.trace_id, "032x"),
                                                       format(ctx.span_id, "016x"))
    assert re.fullmatch("[0-9a-f]{32}", inside["trace_id"])
    assert re.fullmatch("[0-9a-f]{16}", inside["span_id"]) and inside["model"] == "m"
    assert in_child["trace_id"] == inside["trace_id"]
    assert in_child["span_id"] == format(child_ctx.span_id, "016x") != inside["span_id"]
    for outside in (before, after):
        assert "trace_id" not in outside and "span_id" not in outside


def test_json_without_opentelemetry_installed_has_no_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    monkeypatch.setattr(logs, "_otel_trace", lambda: None)  # as when the import fails
    logger, stream = capture("json")
    with sdk_trace.TracerProvider().get_tracer("test.logs").start_as_current_span("s"):
        logger.info("inside", extra={"model": "m"})
    line = json.loads(stream.getvalue())
    assert "trace_id" not in line and "span_id" not in line and line["model"] == "m"


def test_an_extra_cannot_pass_for_the_records_own_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.install(handler, "json")
    logger = logging.getLogger("test.logs.reserved")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    logger.warning("real", extra={"level": "FAKE", "ts": "fake", "logger": "fake"})
    line = json.loads(stream.getvalue())
    assert (line["level"], line["logger"], line["message"]) == (
        "WARNING", "test.logs.reserved", "real")
    assert line["ts"].startswith("20")
