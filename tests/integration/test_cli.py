"""The chassis CLI as a user runs it, against Postgres, Redis and a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from chassis.api import Client
from tests.helpers import wait_until
from tests.integration.conftest import ROOT, Services, Worker

pytestmark = pytest.mark.timeout(120)
CHASSIS = [sys.executable, "-m", "chassis"]


def chassis(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHASSIS_")}
    return subprocess.run([*CHASSIS, *args], cwd=ROOT,
                          env={**env, **services.env, "CHASSIS_CLIENT_ID": "acme"},
                          capture_output=True, text=True, timeout=90)


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def test_run_pause_resume_ledger_as_a_user(services: Services, worker: Worker) -> None:
    run = chassis(services, "run", "examples/blog_post.yaml", "--wait", "--json",
                  "--input", '{"topic": "Celery"}', "--client", "acme")
    doc = as_json(run)
    assert run.returncode == 0
    assert doc["status"] == "PAUSED_FOR_HUMAN_INPUT"
    for key in ("correlation_id", "client_id", "status", "current_step", "collected_data",
                "final_result", "error", "fuel", "steps"):
        assert key in doc
    assert {"name", "status", "attempts", "started_at", "finished_at"} <= set(doc["steps"][0])
    cid = doc["correlation_id"]
    resumed = chassis(services, "resume", cid, "--approve", "--feedback", '{"ok": true}')
    assert resumed.returncode == 0, resumed.stderr
    final = as_json(chassis(services, "run", "examples/blog_post.yaml", "--correlation-id",
                            cid, "--wait", "--json", "--input", '{"topic": "Celery"}',
                            "--client", "acme"))
    assert final["status"] == "COMPLETED"  # starting it again is a no-op: same workflow
    other = chassis(services, "run", "examples/blog_post.yaml", "--correlation-id", cid)
    assert other.returncode == 2 and "exists already with another input" in other.stderr
    assert final["final_result"]["human_feedback"] == {"ok": True}
    ledger = as_json(chassis(services, "ledger", cid, "--json"))
    assert all({"step", "action", "amount"} <= set(e) for e in ledger)
    assert sum(e["amount"] for e in ledger) == final["fuel"]["spent"]
    table = chassis(services, "ledger", cid)
    assert "total" in table.stdout and str(final["fuel"]["spent"]) in table.stdout
    listed = as_json(chassis(services, "list", "--status", "COMPLETED", "--json"))
    assert cid in [d["correlation_id"] for d in listed]
    human = chassis(services, "status", cid)
    assert human.returncode == 0 and "COMPLETED" in human.stdout and "steps" in human.stdout


def test_failed_workflow_exits_non_zero(services: Services, worker: Worker,
                                        tmp_path: Path) -> None:
    plan = tmp_path / "fails.json"
    plan.write_text(json.dumps({"start_step": "x", "steps": {
        "x": {"action": "fail", "params": {"message": "nope"}}}}))
    proc = chassis(services, "run", str(plan), "--wait")
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout and "step 'x' failed: nope" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--fuel", "0"], "fuel budget must be a positive integer"),
    (["--fuel", "lots"], "fuel budget must be a positive integer"),
    (["--client", ""], "client_id"),
    (["--correlation-id", "not-a-uuid"], "correlation id must be a UUID"),
])
def test_bad_input_is_refused_and_nothing_is_written(services: Services, args: list[str],
                                                     message: str, client: Client) -> None:
    before = len(client.list(limit=10_000))
    proc = chassis(services, "run", "examples/research_assistant.yaml", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(client.list(limit=10_000)) == before


def test_invalid_plan_names_every_problem(services: Services, tmp_path: Path,
                                          client: Client) -> None:
    plan = tmp_path / "bad.yaml"
    plan.write_text("start_step: a\nsteps:\n  a: {action: fan_out, next_step: b}\n"
                    "  b: {action: nowhere_action, next_step: a}\n")
    before = len(client.list(limit=10_000))
    proc = chassis(services, "run", str(plan))
    assert proc.returncode == 2
    assert "steps.a" in proc.stderr and "steps.b" in proc.stderr and "cycle" in proc.stderr
    assert len(client.list(limit=10_000)) == before


def test_resume_errors(services: Services, worker: Worker, client: Client) -> None:
    proc = chassis(services, "resume", str(uuid.uuid4()), "--approve")
    assert proc.returncode == 1 and "no workflow" in proc.stderr
    cid = client.start("examples/research_assistant.yaml", None, client_id="acme")
    client.wait(cid, timeout=60)
    proc = chassis(services, "resume", cid, "--reject")
    assert proc.returncode == 1 and "not paused" in proc.stderr
    proc = chassis(services, "resume", cid)
    assert proc.returncode == 2 and "--approve or --reject" in proc.stderr


def test_status_shows_attempts_last_error_and_where_it_waits(services: Services,
                                                             worker: Worker,
                                                             tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    plan = tmp_path / "flaky.json"
    plan.write_text(json.dumps({"start_step": "x", "steps": {
        "x": {"action": "flaky", "params": {"key": key, "fail_times": 1},
              "retry": {"max_attempts": 3, "initial_interval": 0.1}, "next_step": "wait"},
        "wait": {"action": "pause_for_human_input", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}))
    # run and validate know the actions of CHASSIS_ACTION_MODULES, as the worker does
    assert chassis(services, "validate", str(plan)).returncode == 0
    doc = as_json(chassis(services, "run", str(plan), "--wait", "--json"))
    cid = doc["correlation_id"]
    human = chassis(services, "status", cid)
    assert "waiting for" in human.stdout and "approval at step 'wait'" in human.stdout
    assert "last error" in human.stdout and "flaky run 1" in human.stdout
    assert "2/3" in human.stdout  # attempt 2 of 3
    step = next(s for s in as_json(chassis(services, "status", cid, "--json"))["steps"]
                if s["name"] == "x")
    assert [a["status"] for a in step["history"]] == ["FAILED", "COMPLETED"]
    elsewhere = chassis(services, "resume", cid, "--approve", "--step", "review")
    assert elsewhere.returncode == 1 and "waits at step 'wait', not 'review'" in \
        elsewhere.stderr, elsewhere.stderr
    again = chassis(services, "resume", cid, "--approve", "--step", "wait")
    assert again.returncode == 0, again.stderr
    repeated = chassis(services, "resume", cid, "--approve")
    assert repeated.returncode == 0 and "approval already recorded" in repeated.stdout


def test_cancel_and_retry_from_the_command_line(services: Services, worker: Worker,
                                                client: Client) -> None:
    key = uuid.uuid4().hex
    slow = {"start_step": "x", "steps": {
        "x": {"action": "flaky", "params": {"key": key, "seconds": 20}}}}
    cid = client.start(slow, None, client_id="acme")
    proc = chassis(services, "cancel", cid, "--reason", "changed my mind", "--json")
    doc = as_json(proc)
    assert doc["status"] == "CANCELLED" and doc["error"] == "Workflow cancelled: changed my mind"
    proc = chassis(services, "cancel", cid)
    assert proc.returncode == 1 and "already CANCELLED" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = chassis(services, "retry", cid)
    assert proc.returncode == 1 and "only a FAILED workflow can be retried" in proc.stderr
    proc = chassis(services, "cancel", str(uuid.uuid4()))
    assert proc.returncode == 1 and "no workflow" in proc.stderr

    flaky = {"start_step": "x", "steps": {
        "x": {"action": "flaky", "params": {"key": uuid.uuid4().hex, "fail_times": 1},
              "next_step": "done"}, "done": {"action": "complete_workflow"}}}
    cid = client.start(flaky, None, client_id="acme")
    assert client.wait(cid, timeout=60)["status"] == "FAILED"
    retried = as_json(chassis(services, "retry", cid, "--wait", "--json"))
    assert retried["status"] == "COMPLETED"
    assert retried["fuel"]["spent"] == sum(e["amount"] for e in client.ledger(cid)) == 3


@pytest.mark.parametrize("retry, timeout, message", [
    ({"max_attempts": 0}, None, "steps.x.retry.max_attempts: must be from 1 to 1000, got 0"),
    ({"initial_interval": -1}, None,
     "steps.x.retry.initial_interval: must be a positive number of seconds, got -1"),
    ({"backoff_coefficient": 0.5}, None, "steps.x.retry.backoff_coefficient: must be from 1"),
    ({"non_retryable": ["not a name"]}, None, "steps.x.retry.non_retryable[0]: expected an "
                                               "error type name"),
    ({"non_retryable": [3]}, None, "steps.x.retry.non_retryable[0]: expected an error type"),
    ({"max_interval": 1, "initial_interval": 5}, None,
     "steps.x: retry.max_interval (1) is shorter than retry.initial_interval (5)"),
    (None, 0, "steps.x.timeout: must be a positive number of seconds, got 0"),
    (None, "soon", "steps.x.timeout: expected a number of seconds, got str"),
])
def test_bad_retry_policies_and_timeouts_are_refused(services: Services, tmp_path: Path,
                                                     client: Client, retry: Any, timeout: Any,
                                                     message: str) -> None:
    step: dict[str, Any] = {"action": "echo"}
    if retry is not None:
        step["retry"] = retry
    if timeout is not None:
        step["timeout"] = timeout
    plan = tmp_path / "bad.json"
    plan.write_text(json.dumps({"start_step": "x", "steps": {"x": step}}))
    before = len(client.list(limit=10_000))
    proc = chassis(services, "run", str(plan))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(client.list(limit=10_000)) == before
    validated = chassis(services, "validate", str(plan))
    assert validated.returncode == 1 and message in validated.stdout + validated.stderr


def bare(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHASSIS_")}
    return subprocess.run([*CHASSIS, *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=90)


def test_setup_problems_are_one_line_that_says_what_to_do(
        postgres_server: Any, tmp_path: Path, redis_url: str) -> None:
    empty = postgres_server.create_database()
    try:
        env = {"CHASSIS_DATABASE_URL": empty, "CHASSIS_BROKER_URL": redis_url,
               "CHASSIS_HOME": str(tmp_path)}
        for args in (["list"], ["status", str(uuid.uuid4())], ["plan", "list"],
                     ["run", "examples/research_assistant.yaml"], ["sweep"]):
            proc = bare(env, *args)
            assert proc.returncode == 3, (args, proc.stderr)
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
            assert "is not migrated to this version: run `chassis db upgrade`" in proc.stderr
        gone = {**env, "CHASSIS_DATABASE_URL": empty.rsplit("/", 1)[0] + "/no_such_db"}
        proc = bare(gone, "list")
        assert proc.returncode == 3 and 'database "no_such_db" does not exist' in proc.stderr
        closed = {**env, "CHASSIS_DATABASE_URL": "postgresql://u:secret@127.0.0.1:1/x"}
        proc = bare(closed, "list")
        assert proc.returncode == 3 and "cannot reach the database at" in proc.stderr
        assert "secret" not in proc.stderr and "u:***@" in proc.stderr
        proc = bare({**env, "CHASSIS_VISIBILITY_TIMEOUT": "abc"}, "list")
        assert proc.returncode == 2
        assert proc.stderr.strip() == ("error: CHASSIS_VISIBILITY_TIMEOUT must be a whole "
                                       "number from 1 to 2147483647, got 'abc'")
        debug = bare(env, "--debug", "list")
        assert debug.returncode != 0 and "Traceback" in debug.stderr
    finally:
        postgres_server.drop_database(empty)


@pytest.mark.parametrize("env", [{"CHASSIS_LOG_FORMAT": "xml"},
                                 {"CHASSIS_BROKER_URL": "rabbit://localhost"},
                                 {"CHASSIS_MAX_DEPTH": "9" * 30}])
def test_a_bad_variable_stops_every_process_in_one_line(tmp_path: Path,
                                                        env: dict[str, str]) -> None:
    name = next(iter(env))
    celery = str(Path(sys.executable).parent / "celery")
    for command in ([*CHASSIS, "list"], [celery, "-A", "chassis.worker", "worker"],
                    [celery, "-A", "chassis.worker", "beat"], [*CHASSIS, "bridge"]):
        base = {k: v for k, v in os.environ.items() if not k.startswith("CHASSIS_")}
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90,
                              env={**base, "CHASSIS_HOME": str(tmp_path), **env})
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.startswith(f"error: {name} must be"), (command, proc.stderr)
        assert proc.stderr.count("\n") == 1, (command, proc.stderr)
    assert not (tmp_path / "chassis.db").exists()  # nothing written


def test_wait_that_runs_out_exits_4_and_the_workflow_goes_on(services: Services,
                                                            worker: Worker) -> None:
    plan = {"start_step": "x", "steps": {"x": {"action": "sleep", "params": {"seconds": 4},
                                               "next_step": "done"},
                                         "done": {"action": "complete_workflow"}}}
    path = Path(services.tmp) / "slow.json"
    path.write_text(json.dumps(plan))
    proc = chassis(services, "run", str(path), "--wait", "--timeout", "1", "--json")
    assert proc.returncode == 4, proc.stderr
    assert "still RUNNING after 1.0 s; the workflow goes on" in proc.stderr
    doc = json.loads(proc.stdout)  # --json: the document still, to pick the id from
    assert doc["status"] == "RUNNING" and doc["current_step"] == "x"
    assert wait_until(lambda: json.loads(chassis(services, "status", doc["correlation_id"],
                                                 "--json").stdout)["status"] == "COMPLETED",
                      timeout=60)


BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)])
STEP = "start_step: s\nsteps:\n  s:\n    action: echo\n"


@pytest.mark.parametrize("text", [
    BOMB + "\n" + STEP,
    STEP + "    params: {v: !!int x}\n",
    STEP + "    params: {v: !!timestamp x}\n",
    '{"start_step": "s", "steps": {"s": {"action": "echo", "params": {"v": NaN}}}}',
    '{"start_step": "s", "steps": {"s": {"action": "echo", "params": {"v": "\\u0000"}}}}',
    '{"start_step": "s", "steps": {"s": {"action": "echo", "params": {"v": "\\udc00"}}}}',
    '{"start_step": "s", "steps": {"s": {"action": "echo", "params": {"v": '
    + "[" * 200 + "]" * 200 + "}}}}",
    '{"start_step": "' + "s" * 300 + '", "steps": {"' + "s" * 300 + '": {"action": "echo"}}}',
    '{"start_step": "a", "steps": {"a": {"action": "echo", "dependencies": ["x"]}, '
    '"x": {"action": "echo"}}}',
])
def test_bad_plans_are_refused_quickly_in_one_line_and_write_nothing(
        services: Services, tmp_path: Path, client: Client, text: str) -> None:
    plan = tmp_path / "bad.yaml"
    plan.write_text(text)
    before = len(client.list(limit=10_000))
    began = time.monotonic()
    proc = chassis(services, "run", str(plan))
    assert time.monotonic() - began < 20
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(client.list(limit=10_000)) == before
    assert chassis(services, "validate", str(plan)).returncode in (1, 2)


@pytest.mark.parametrize("args", [
    ["--fuel", "2147483648"], ["--fuel", "²"], ["--client", "c" * 300],
    ["--project", "p" * 300], ["--input", '{"a": NaN}'], ["--input", '"\\u0000"'],
    ["--correlation-id", "x" * 5000], ["--timeout", "nan", "--wait"],
    ["--timeout", "abc"], ["--bogus"], ["--input", '{"a": 1, "a": 2}'],
])
def test_bad_options_are_refused_in_one_line(services: Services, client: Client,
                                             args: list[str]) -> None:
    before = len(client.list(limit=10_000))
    proc = chassis(services, "run", "examples/research_assistant.yaml", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(client.list(limit=10_000)) == before
