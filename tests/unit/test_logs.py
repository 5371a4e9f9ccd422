"""Log records about a workflow carry its ids; JSON lines on request."""

from __future__ import annotations

import io
import json
import logging

from chassis import logs


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
