"""One client never reaches another's workflow: not through Python, the CLI, Celery
tasks or Kafka (tests/e2e/test_kafka.py). A refusal says no more than an unknown id."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from celery import Celery

from chassis import config
from chassis.api import Client
from chassis.errors import WorkflowConflict, WorkflowNotFound
from chassis.state import request_id_for
from tests.helpers import wait_until
from tests.integration.conftest import ROOT, Services, Worker

pytestmark = pytest.mark.timeout(120)

PAUSING = {"start_step": "draft", "steps": {
    "draft": {"action": "echo", "params": {"secret": "acme's draft"}, "next_step": "review"},
    "review": {"action": "pause_for_human_input", "next_step": "done"},
    "done": {"action": "complete_workflow"}}}
AGENT = {"start_step": "ask", "steps": {
    "ask": {"action": "research", "topic": "agents.research", "next_step": "done"},
    "done": {"action": "complete_workflow"}}}


@pytest.fixture(scope="module")
def evil(services: Services) -> Client:
    return Client(config.load(services.env), client_id="evil")


def paused(client: Client) -> dict[str, Any]:
    cid = client.start(PAUSING, {"private": True})
    return client.wait(cid, timeout=60)


def unknown_message(cid: str) -> str:
    return f"no workflow with correlation_id {cid}"


def test_python_another_clients_workflow_is_unknown(client: Client, evil: Client,
                                                    worker: Worker) -> None:
    doc = paused(client)
    cid = doc["correlation_id"]
    for attempt in (lambda: evil.status(cid), lambda: evil.ledger(cid),
                    lambda: evil.resume(cid, True, {"evil": 1}),
                    lambda: evil.cancel(cid, "mine now"), lambda: evil.retry(cid),
                    lambda: evil.wait(cid, timeout=1)):
        with pytest.raises(WorkflowNotFound) as info:
            attempt()
        assert str(info.value) == unknown_message(cid)  # as if there were none
    assert cid not in {d["correlation_id"] for d in evil.list(limit=10_000)}
    assert client.status(cid)["version"] == doc["version"]
    # starting its id is a conflict that reveals nothing about it
    with pytest.raises(WorkflowConflict) as info:
        evil.start(PAUSING, {"private": True}, correlation_id=cid)
    assert "already in use" in str(info.value) and "acme" not in str(info.value)
    assert client.status(cid)["version"] == doc["version"]


def run_cli(services: Services, client_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHASSIS_")}
    return subprocess.run([sys.executable, "-m", "chassis", *args], cwd=ROOT,
                          env={**env, **services.env, "CHASSIS_CLIENT_ID": client_id},
                          capture_output=True, text=True, timeout=90)


def test_cli_another_clients_workflow_is_unknown(services: Services, client: Client,
                                                 worker: Worker) -> None:
    doc = paused(client)
    cid = doc["correlation_id"]
    for args in (["status", cid], ["ledger", cid], ["resume", cid, "--approve"],
                 ["cancel", cid], ["retry", cid], ["status", cid, "--json"]):
        proc = run_cli(services, "evil", *args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert proc.stderr.strip() == f"error: {unknown_message(cid)}"
        assert "acme's draft" not in proc.stdout + proc.stderr
    stolen = run_cli(services, "evil", "run", "examples/blog_post.yaml", "--correlation-id",
                     cid, "--json")
    assert stolen.returncode == 2 and "already in use" in stolen.stderr
    assert "acme's draft" not in stolen.stdout and stolen.stdout == ""
    mine = run_cli(services, "acme", "status", cid)
    assert mine.returncode == 0 and "PAUSED_FOR_HUMAN_INPUT" in mine.stdout
    assert client.status(cid)["version"] == doc["version"]


def test_celery_tasks_act_for_the_client_they_name(services: Services, client: Client,
                                                   worker: Worker) -> None:
    doc = paused(client)
    cid = doc["correlation_id"]
    other = Celery("another-app", broker=services.env["CHASSIS_BROKER_URL"])
    q = {"queue": "chassis.coordination"}
    other.send_task("chassis.resume", args=[cid, True, {"evil": 1}, "evil"], **q)
    other.send_task("chassis.cancel", args=[cid, "mine", "evil"], **q)
    other.send_task("chassis.retry", args=[cid, "evil"], **q)
    other.send_task("chassis.resume", args=[cid, True, None], **q)  # names no client
    other.send_task("chassis.start", args=[["not", "an", "object"]], **q)
    # then the owner's own resume: the others have been handled before it
    other.send_task("chassis.resume", args=[cid, True, {"ok": 1}, "acme"], **q)
    done = client.wait(cid, timeout=60, until={"COMPLETED", "FAILED", "CANCELLED"})
    assert done["status"] == "COMPLETED"
    assert done["final_result"]["human_feedback"] == {"ok": 1}
    wait_until(lambda: worker.text().count("no workflow with correlation_id") >= 3,
               timeout=30, message="the refusals are not in the worker's log")
    assert "client_id is required" in worker.text()
    # refusals are expected errors: one line each, no traceback
    wait_until(lambda: "a start request must be a JSON object" in worker.text(), timeout=30)
    assert "raised expected: InputError" in worker.text()
    assert "raised unexpected" not in worker.text()


def test_an_agents_answer_must_name_the_client_and_a_real_request(
        services: Services, client: Client, worker: Worker) -> None:
    cid = client.start(AGENT, None)
    assert client.status(cid)["status"] == "AWAITING_RESPONSES"
    real = client.store.get(cid).rid("ask")
    guessed = request_id_for(cid, "ask")  # what one could compute from the id alone
    assert guessed != real
    other = Celery("agent", broker=services.env["CHASSIS_BROKER_URL"])
    q = {"queue": "chassis.coordination"}
    other.send_task("chassis.respond", args=[cid, guessed, True, {"forged": 1}, None, None,
                                             "acme"], **q)
    other.send_task("chassis.respond", args=[cid, real, True, {"forged": 2}, None, None,
                                             "evil"], **q)
    other.send_task("chassis.respond", args=[cid, real, True, {"answer": 42}, None, None,
                                             "acme"], **q)
    done = client.wait(cid, timeout=60)
    assert done["status"] == "COMPLETED"
    assert done["final_result"]["ask"] == {"answer": 42}


def test_starting_the_same_id_again_must_be_the_same_request(client: Client,
                                                             worker: Worker) -> None:
    cid = str(uuid.uuid4())
    plan = {"start_step": "done", "steps": {"done": {"action": "complete_workflow"}}}
    assert client.start(plan, {"n": 1}, correlation_id=cid, fuel_budget=5) == cid
    assert client.start(plan, {"n": 1}, correlation_id=cid, fuel_budget=5) == cid
    for kwargs, what in (({"input": {"n": 2}}, "input"), ({"fuel_budget": 6}, "fuel budget")):
        args = {"input": {"n": 1}, "fuel_budget": 5, **kwargs}
        with pytest.raises(WorkflowConflict, match=f"another {what}"):
            client.start(plan, args["input"], correlation_id=cid,
                         fuel_budget=args["fuel_budget"])
    other = {"start_step": "x", "steps": {"x": {"action": "noop", "next_step": "done"},
                                          "done": {"action": "complete_workflow"}}}
    with pytest.raises(WorkflowConflict, match="another plan"):
        client.start(other, {"n": 1}, correlation_id=cid, fuel_budget=5)
