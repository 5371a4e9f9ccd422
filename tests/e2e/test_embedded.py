"""The embedded default, as a new user meets it: no CHASSIS_* variables, no servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


def chassis(cwd: Path, *args: str, stdin: str | None = None, within: float = 150,
            **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHASSIS_", "ANTHROPIC_"))}
    return subprocess.run([sys.executable, "-m", "chassis", *args], cwd=cwd,
                          env={**env, **extra}, capture_output=True, text=True,
                          timeout=within, input=stdin)


def test_demo_runs_end_to_end_in_an_empty_folder(tmp_path: Path) -> None:
    proc = chassis(tmp_path, "demo", "--auto-approve")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "embedded mode" in out
    for step in ("research", "web_research", "style_analysis", "generate", "pause_for_review",
                 "finish"):
        assert step in out
    assert "PAUSED_FOR_HUMAN_INPUT" in out and out.rstrip().count("COMPLETED") >= 5
    assert "status        COMPLETED" in out
    assert (tmp_path / ".chassis" / "chassis.db").exists()


def test_demo_without_a_terminal_and_without_auto_approve_leaves_it_paused(
        tmp_path: Path) -> None:
    proc = chassis(tmp_path, "demo", stdin="")
    assert proc.returncode == 0, proc.stderr
    assert "--auto-approve" in proc.stdout and "chassis resume" in proc.stdout


def test_embedded_run_wait_then_resume(tmp_path: Path) -> None:
    plan = str(ROOT / "examples" / "blog_post.yaml")
    doc = json.loads(chassis(tmp_path, "run", plan, "--wait", "--json").stdout)
    assert doc["status"] == "PAUSED_FOR_HUMAN_INPUT"
    cid = doc["correlation_id"]
    proc = chassis(tmp_path, "resume", cid, "--approve", "--feedback", '{"ok": true}',
                   "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    assert done["status"] == "COMPLETED"
    assert done["final_result"]["human_feedback"] == {"ok": True}
    ledger = json.loads(chassis(tmp_path, "ledger", cid, "--json").stdout)
    assert sum(e["amount"] for e in ledger) == done["fuel"]["spent"]


def test_run_wait_timeout_returns_then_a_later_run_finishes_the_workflow(
        tmp_path: Path) -> None:
    """--timeout ran out while a step runs in this process: the command says so and
    exits 4 then, not when the step ends (the subprocess limit is shorter than the
    step); the workflow goes on: a later `run --wait` here sends the abandoned attempt
    again once its lease has expired, and it completes."""
    plan = tmp_path / "slow.json"
    plan.write_text(json.dumps({"start_step": "s", "steps": {
        "s": {"action": "sleep", "params": {"seconds": 12}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}))
    fast = {"CHASSIS_LEASE_SECONDS": "2", "CHASSIS_SWEEP_INTERVAL": "0.5"}
    proc = chassis(tmp_path, "run", str(plan), "--wait", "--timeout", "1", "--json",
                   within=10, **fast)
    assert proc.returncode == 4, proc.stderr
    assert "still RUNNING after 1.0 s" in proc.stderr
    cid = json.loads(proc.stdout)["correlation_id"]
    later = chassis(tmp_path, "run", str(plan), "--correlation-id", cid, "--wait", "--json",
                    within=60, **fast)
    done = json.loads(later.stdout)
    assert done["status"] == "COMPLETED", later.stderr
    runs = [r for r in done["steps"] if r["name"] == "s"]
    assert runs and runs[0]["status"] == "COMPLETED"


def test_work_queued_by_one_process_is_done_by_a_later_one(tmp_path: Path) -> None:
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"start_step": "a", "steps": {
        "a": {"action": "echo", "params": {"n": 1}, "next_step": "b"},
        "b": {"action": "complete_workflow"}}}))
    queued = json.loads(chassis(tmp_path, "run", str(plan), "--json").stdout)
    assert queued["status"] == "RUNNING"
    assert queued["steps"][0]["status"] == "DISPATCHED"
    cid = queued["correlation_id"]
    # starting the same id again is a no-op; --wait brings a worker that drains the queue
    proc = chassis(tmp_path, "run", str(plan), "--correlation-id", cid, "--wait", "--json")
    done = json.loads(proc.stdout)
    assert done["status"] == "COMPLETED" and done["final_result"]["a"] == {"n": 1}


def test_embedded_retries_later_than_a_countdown_are_sent_by_the_in_process_sweep(
        tmp_path: Path) -> None:
    plan = tmp_path / "flaky.json"
    plan.write_text(json.dumps({"start_step": "a", "steps": {
        "a": {"action": "fail", "params": {"message": "down"},
              "retry": {"max_attempts": 2, "initial_interval": 12}}}}))
    proc = chassis(tmp_path, "run", str(plan), "--wait", "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["status"] == "FAILED", proc.stderr
    assert doc["error"] == "step 'a' failed after 2 attempts: down"
    history = doc["steps"][0]["history"]
    assert [(a["attempt"], a["status"]) for a in history] == [(1, "FAILED"), (2, "FAILED")]
    assert history[1]["due_at"] is not None  # it was kept for later, then sent


def test_embedded_cancel_of_queued_work(tmp_path: Path) -> None:
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"start_step": "a", "steps": {
        "a": {"action": "echo", "params": {"n": 1}, "next_step": "b"},
        "b": {"action": "complete_workflow"}}}))
    cid = json.loads(chassis(tmp_path, "run", str(plan), "--json").stdout)["correlation_id"]
    cancelled = json.loads(chassis(tmp_path, "cancel", cid, "--json").stdout)
    assert cancelled["status"] == "CANCELLED"
    # a worker that finds the queued step later does not run it
    proc = chassis(tmp_path, "run", str(plan), "--correlation-id", cid, "--wait", "--json")
    assert json.loads(proc.stdout)["status"] == "CANCELLED"


def test_embedded_steps_run_as_sent_not_when_the_sweep_sends_them_again(
        tmp_path: Path) -> None:
    """A step dispatched from inside the in-process worker is taken at once (a send
    through the worker's own app once waited for the sweep's re-send)."""
    (tmp_path / "three.yaml").write_text(
        "start_step: a\nsteps:\n  a: {action: echo, next_step: b}\n"
        "  b: {action: echo, next_step: c}\n  c: {action: echo}\n")
    proc = chassis(tmp_path, "run", "three.yaml", "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "COMPLETED" in proc.stdout
    assert "sent again" not in proc.stdout + proc.stderr


def test_resume_takes_one_answer(tmp_path: Path) -> None:
    cid = "3e59cf62-79f3-4579-9f62-f9be4c5ba074"
    both = chassis(tmp_path, "resume", cid, "--approve", "--reject")
    assert both.returncode == 2 and "say --approve or --reject, not both" in both.stderr
    neither = chassis(tmp_path, "resume", cid)
    assert neither.returncode == 2 and "say --approve or --reject" in neither.stderr
