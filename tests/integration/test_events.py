"""The event history (issue 16): what happened to a workflow, in order, written in the
transaction of each transition, claim and record; read with `chassis events` and
`Client.events`, pruned with the workflow. A real worker on Redis and PostgreSQL, the
CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from chassis import coordinator as co
from chassis.api import Client
from chassis.errors import WorkflowNotFound
from chassis.plan import parse_plan
from chassis.state import Status, WorkflowState
from chassis.store.rows import history
from tests.integration.conftest import ROOT, Services, Worker
from tests.integration.test_cli import chassis

pytestmark = pytest.mark.timeout(120)
CHASSIS = [sys.executable, "-m", "chassis"]


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events]


def test_the_blog_posts_history_in_order_with_who_resumed_it(
        services: Services, client: Client, worker: Worker) -> None:
    run = chassis(services, "run", "examples/blog_post.yaml", "--wait", "--json",
                  "--input", '{"topic": "Celery"}')
    assert run.returncode == 0, run.stderr
    cid = json.loads(run.stdout)["correlation_id"]
    resume = chassis(services, "resume", cid, "--approve", "--feedback", '{"ok": true}',
                     "--wait")
    assert resume.returncode == 0, resume.stderr
    got = chassis(services, "events", cid, "--json")
    assert got.returncode == 0, got.stderr
    events = json.loads(got.stdout)
    k = kinds(events)
    assert k[0] == "started" and events[0]["actor"] == "acme"
    assert k[-1] == "completed"
    # the fan-out, its two sub-tasks started by the worker and succeeded, then the draft
    assert k.index("fanned_out") < k.index("paused_for_approval") < k.index("resumed")
    subs = [e for e in events if e["kind"] == "attempt_started"
            and e["step"] in ("web_research", "style_analysis")]
    assert len(subs) == 2 and all(e["actor"].startswith("test-") for e in subs)
    assert {e["step"] for e in events if e["kind"] == "succeeded"} >= {
        "web_research", "style_analysis", "research", "generate", "pause_for_review"}
    generate = [e for e in events if e["step"] == "generate"]
    assert [e["kind"] for e in generate] == [
        "fuel_reserve", "dispatched", "attempt_started", "fuel_settle", "fuel_release",
        "succeeded"]
    [resumed] = [e for e in events if e["kind"] == "resumed"]
    assert resumed["actor"] == "acme" and resumed["data"]["feedback"] == {"ok": True}
    # in order: the versions of the transitions' lines never go back
    versions = [e["version"] for e in events if e["version"] is not None]
    assert versions == sorted(versions)
    assert client.events(cid) == events
    table = chassis(services, "events", cid)
    assert table.returncode == 0 and "resumed" in table.stdout and "acme" in table.stdout


def test_another_clients_history_is_unknown(services: Services, client: Client,
                                            worker: Worker) -> None:
    cid = client.start(ROOT / "examples" / "blog_post.yaml", client_id="acme")
    other = Client(client.settings, client_id="globex")
    with pytest.raises(WorkflowNotFound):
        other.events(cid)
    proc = subprocess.run([*CHASSIS, "events", cid, "--client", "globex"], cwd=ROOT,
                          env={**os.environ, **services.env}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "no workflow" in proc.stderr


def test_failures_retries_and_cancels_are_told() -> None:
    plan = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "flaky", "retry": {"max_attempts": 3, "initial_interval": 30}}}})
    s = WorkflowState(correlation_id="c", client_id="acme", status=Status.RUNNING,
                      current_step="a", fuel_budget=10)
    d1 = co.decide(s, plan, co.Start())
    d2 = co.decide(d1.state, plan, co.StepFailed("a", "boom", 1, ("Boom",)))
    d3 = co.decide(d2.state, plan, co.Cancel("stop", "acme"))
    lines = [history("c", d.commands, None, d.state.version)  # type: ignore[arg-type]
             for d in (d1, d2, d3)]
    assert kinds(lines[0]) == ["started", "fuel_debit", "dispatched"]
    assert kinds(lines[1]) == ["failed", "fuel_debit", "retry_scheduled"]
    assert lines[1][0]["data"] == {"error": "boom", "error_type": "Boom"}
    assert lines[1][2]["attempt"] == 2 and lines[1][2]["data"]["due_in"] > 0
    assert kinds(lines[2]) == ["cancel_requested", "abandoned", "cancelled"]
    assert lines[2][0]["actor"] == "acme" and lines[2][0]["data"]["reason"] == "stop"


def test_the_sweeps_resend_is_in_the_history(db_url: str) -> None:
    """An attempt nobody took is sent again by the sweep: the history says so, in the
    transaction that marks it."""
    import uuid as _uuid
    from datetime import timedelta

    from chassis.store import SqlStore
    from chassis.store.db import make_engine
    from chassis.store.sql import now

    store = SqlStore(make_engine(db_url))
    plan = parse_plan({"start_step": "a", "steps": {"a": {"action": "echo"}}})
    cid = str(_uuid.uuid4())
    s = WorkflowState(correlation_id=cid, client_id="acme", status=Status.RUNNING,
                      current_step="a", fuel_budget=10)
    assert store.create(co.decide(s, plan, co.Start()), plan)
    [row] = store.unclaimed(now() + timedelta(seconds=1), 10)
    assert store.mark_resent(row)
    assert not store.mark_resent(row)  # (another sweep got there first: no second line)
    resent = [e for e in store.events(cid) if e["kind"] == "resent"]
    assert len(resent) == 1 and resent[0]["actor"] == "sweep"
    assert resent[0]["data"] == {"why": "it was not taken", "was": "DISPATCHED", "sends": 1}
