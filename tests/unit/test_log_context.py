"""Log records of a worker carry the workflow's ids: from a task's arguments while it
runs, and from Celery's own "received" record before it runs."""

from __future__ import annotations

import io
import json
import logging

from chassis import logs
from chassis.celery_tasks import workflow_ids

CID = "2f1e0c9a-5b4d-4e3f-8a2b-1c0d9e8f7a6b"


def test_ids_from_each_task_shape() -> None:
    payload = {"cid": CID, "step": "draft", "action": "echo"}
    assert workflow_ids("chassis.step", [payload], {}) == (CID, "draft")
    assert workflow_ids("chassis.subtask", (payload,), None) == (CID, "draft")
    assert workflow_ids("chassis.cancel", [CID, "why"], {}) == (CID, None)
    assert workflow_ids("chassis.retry", [CID], {}) == (CID, None)
    assert workflow_ids("chassis.resume", [CID, True, None], {}) == (CID, None)
    assert workflow_ids("chassis.respond", [CID, "rid", True], {}) == (CID, None)
    assert workflow_ids("chassis.start", [{"correlation_id": CID}], {}) == (CID, None)
    assert workflow_ids("chassis.sweep", [], {}) == (None, None)


def test_celerys_received_record_gets_the_ids_from_its_data() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logs.install(handler, "json")
    logger = logging.getLogger("test.log_context.received")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    data = {"id": "task-1", "name": "chassis.step", "args": f"({CID}/draft#2: echo)"}
    logger.info("Task %(name)s[%(id)s] received", data, extra={"data": data})
    bridge = {"id": "task-2", "name": "chassis.start", "args": f"(correlation_id={CID})"}
    logger.info("Task %(name)s[%(id)s] received", bridge, extra={"data": bridge})
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["correlation_id"], first["step"], first["task_id"]) == (CID, "draft", "task-1")
    assert (second["correlation_id"], second["step"], second["task_id"]) == (CID, "-", "task-2")
