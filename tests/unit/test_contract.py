"""The task contract document: valid JSON Schemas, and they say what the tasks take."""

from __future__ import annotations

import json
import uuid

import jsonschema
import pytest
from click.testing import CliRunner

from chassis.cli import main
from chassis.contract import TASKS, VERSION, document

CID = str(uuid.uuid4())
GOOD = {
    "chassis.start": [{"plan": "review", "correlation_id": CID, "client_id": "acme",
                       "input": {"topic": "x"}}],
    "chassis.status": [CID, "acme"],
    "chassis.resume": [CID, True, {"ok": 1}, "acme", 0, "review"],
    "chassis.cancel": [CID, "not needed", "acme", False],
    "chassis.retry": [CID, "acme"],
}
BAD = {
    "chassis.start": [{"plan": "review"}],
    "chassis.status": [CID],
    "chassis.resume": [CID, "yes", None, "acme"],
    "chassis.cancel": [CID, "why", "acme", False, "extra"],
    "chassis.retry": [CID, ""],
}


def test_the_document_is_json_with_a_version_queue_and_every_task() -> None:
    doc = json.loads(CliRunner().invoke(main, ["contract"]).output)
    assert doc == json.loads(json.dumps(document()))
    assert doc["version"] == VERSION == 1
    assert doc["queue"] == "chassis.coordination" and doc["default_queue"] == "celery"
    assert set(doc["tasks"]) == set(GOOD) == set(TASKS)


@pytest.mark.parametrize("task", sorted(GOOD))
def test_each_schema_takes_good_arguments_and_refuses_bad_ones(task: str) -> None:
    schema = document()["tasks"][task]["args"]
    jsonschema.Draft202012Validator.check_schema(schema)
    check = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    assert not list(check.iter_errors(GOOD[task]))
    assert list(check.iter_errors(BAD[task]))
