"""The task contract from a Celery client nobody here wrote: Node.js with celery-node
(npm, tests/e2e/node) starts a registered plan, waits on the task's result, reads the
status until the workflow waits for approval, resumes it and reads COMPLETED; another
client's request and bad arguments come back as task failures with the reason; a start
sent to Celery's default queue is served too. Real PostgreSQL, Redis and a Celery
worker (the coordinator's queues, default queue included). Skips locally when Node or
the npm package is missing; fails under CI=true (.ci/run installs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from chassis.plan import parse_plan
from chassis.registry import PlanRegistry
from chassis.store.db import make_engine
from tests.helpers import require_service
from tests.integration.conftest import Services, services  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(120)

NODE_DIR = Path(__file__).resolve().parent / "node"
PLAN = {"start_step": "draft", "steps": {
    "draft": {"action": "echo", "params": {"text": "a draft"}, "next_step": "review"},
    "review": {"action": "pause_for_human_input", "next_step": "done"},
    "done": {"action": "complete_workflow"}}}


def node_client() -> list[str]:
    node = shutil.which("node")
    require_service("Node.js", node is not None, "node is not installed")
    installed = (NODE_DIR / "node_modules" / "celery-node").is_dir()
    require_service("celery-node", installed,
                    f"run `npm ci --prefix {NODE_DIR}` (.ci/run does)")
    assert node is not None
    return [node, str(NODE_DIR / "contract_client.js")]


def test_a_node_app_runs_a_workflow_through_the_task_contract(
        services: Services) -> None:  # noqa: F811  (the fixture imported above)
    command = node_client()
    PlanRegistry(make_engine(services.env["CHASSIS_DATABASE_URL"])).register(
        "node-review", parse_plan(PLAN))
    services.start_worker(queues="chassis.coordination,celery,chassis.steps,chassis.ai")
    cid, cid2 = str(uuid.uuid4()), str(uuid.uuid4())
    env = {**os.environ, "BROKER": services.env["CHASSIS_BROKER_URL"],
           "BACKEND": services.env["CHASSIS_RESULT_BACKEND"], "CID": cid, "CID2": cid2,
           "PLAN": "node-review", "CLIENT": "acme"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        item = json.loads(line)
        seen[item["what"]] = item["value"]
    assert seen["start"] == {"correlation_id": cid, "status": "RUNNING"}
    assert seen["start_again"]["correlation_id"] == cid  # idempotent by correlation_id
    assert seen["paused"] == {"status": "PAUSED_FOR_HUMAN_INPUT", "current_step": "review"}
    assert seen["resume"] == {"correlation_id": cid, "status": "COMPLETED"}
    assert seen["done"]["status"] == "COMPLETED"
    assert seen["done"]["final_result"]["human_feedback"] == {"by": "node"}
    assert seen["done"]["final_result"]["draft"] == {"text": "a draft"}
    # refusals: a task FAILURE whose stored exception says why (nothing was written)
    assert seen["not_yours"] == {"refused": True, "state": "FAILURE",
                                 "type": "WorkflowNotFound",
                                 "message": f"no workflow with correlation_id {cid}"}
    assert seen["bad_args"]["refused"] is True and seen["bad_args"]["type"] == "InputError"
    assert "approved must be true or false" in seen["bad_args"]["message"]
    assert seen["default_queue"]["correlation_id"] == cid2
