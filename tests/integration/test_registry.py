"""The plan registry on SQLite and PostgreSQL: versions, no-op re-registration, races,
the `chassis plan` commands and starting a workflow by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from chassis import config
from chassis.api import Client
from chassis.errors import InputError, PlanFileError, PlanNotFound
from chassis.plan import parse_plan
from chassis.registry import PlanRegistry, content_hash, parse_ref
from chassis.store.db import make_engine
from chassis.store.tables import orchestrator_state

pytestmark = pytest.mark.timeout(120)

CHASSIS = Path(sys.executable).parent / "chassis"


def plan(greeting: str = "hi") -> dict[str, Any]:
    return {"start_step": "a", "steps": {
        "a": {"action": "echo", "params": {"greeting": greeting}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}


def test_same_content_is_a_no_op_and_new_content_a_new_version(db_url: str) -> None:
    reg = PlanRegistry(make_engine(db_url))

    first = reg.register("greet", parse_plan(plan()))
    again = reg.register("greet", parse_plan(plan()))
    second = reg.register("greet", parse_plan(plan("hello")))

    assert (first.created, first.plan.version) == (True, 1)
    assert (again.created, again.plan.version) == (False, 1)
    assert (second.created, second.plan.version) == (True, 2)
    assert reg.get("greet").version == 2
    assert reg.get("greet", 1).content == plan()
    assert [r["latest"] for r in reg.list_plans()] == [2]
    with pytest.raises(PlanNotFound):
        reg.get("greet", 3)
    with pytest.raises(PlanNotFound):
        reg.get("other")
    # versions past what the column holds are not found (not a database error)
    with pytest.raises(PlanNotFound):
        reg.get("greet", 2**31)
    for ref in ("greet@2147483648", "greet@99999999999999999999", "greet@0", "greet@\u0663"):
        with pytest.raises(InputError, match="N from 1 to 2147483647"):
            parse_ref(ref)
    assert parse_ref("greet@2147483647") == ("greet", 2147483647)


def test_hash_ignores_layout_and_key_order() -> None:
    reordered = {"steps": {"done": {"action": "complete_workflow"},
                           "a": {"next_step": "done", "params": {"greeting": "hi"},
                                 "action": "echo"}},
                 "start_step": "a"}
    assert content_hash(parse_plan(reordered)) == content_hash(parse_plan(plan()))


def test_concurrent_registrations_get_distinct_versions_without_gaps(db_url: str) -> None:
    reg = PlanRegistry(make_engine(db_url))
    contents = [parse_plan(plan(f"g{i}")) for i in range(8)] * 2  # each twice

    with ThreadPoolExecutor(max_workers=8) as pool:
        done = list(pool.map(lambda p: reg.register("race", p), contents))

    assert sorted(r.plan.version for r in done if r.created) == list(range(1, 9))
    assert sum(r.created for r in done) == 8
    by_hash = {r.plan.content_hash: r.plan.version for r in done}
    assert len(by_hash) == 8


def test_start_by_name_keeps_the_snapshot_and_version(db_url: str, tmp_path: Path) -> None:
    client = Client(config.load({"CHASSIS_DATABASE_URL": db_url,
                                 "CHASSIS_HOME": str(tmp_path)}))
    client.registry.register("greet", parse_plan(plan()))
    cid = client.start("greet", {"x": 1}, client_id="acme")
    client.registry.register("greet", parse_plan(plan("changed")))
    pinned = client.start("greet@1", None, client_id="acme")

    with make_engine(db_url).connect() as conn:
        rows = {str(r.correlation_id): r for r in conn.execute(sa.select(
            orchestrator_state.c.correlation_id, orchestrator_state.c.plan,
            orchestrator_state.c.plan_name, orchestrator_state.c.plan_version))}
    assert (rows[cid].plan_name, rows[cid].plan_version) == ("greet", 1)
    assert rows[cid].plan == plan()  # the snapshot, not the newer version
    assert rows[pinned].plan_version == 1
    with pytest.raises(PlanFileError, match="no such plan file, and no registered plan"):
        client.start("nothing", None, client_id="acme")


def run_chassis(*args: str, db_url: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHASSIS_DATABASE_URL": db_url, "CHASSIS_HOME": str(home)}
    return subprocess.run([str(CHASSIS), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_cli_register_list_show(db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "greet.yaml"
    f.write_text(json.dumps(plan()))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"start_step": "x", "steps": {"a": {"action": "nope"}}}))

    first = run_chassis("plan", "register", "greet", str(f), db_url=db_url, home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "registered plan greet version 1" in first.stdout
    same = run_chassis("plan", "register", "greet", str(f), db_url=db_url, home=tmp_path)
    assert same.returncode == 0 and "unchanged" in same.stdout and "version 1" in same.stdout
    f.write_text(json.dumps(plan("hello")))
    new = run_chassis("plan", "register", "greet", str(f), "--json", db_url=db_url,
                      home=tmp_path)
    assert json.loads(new.stdout)["version"] == 2 and json.loads(new.stdout)["created"]

    invalid = run_chassis("plan", "register", "broken", str(bad), db_url=db_url, home=tmp_path)
    assert invalid.returncode == 1
    assert "start_step" in invalid.stderr and "nope" in invalid.stderr

    listed = run_chassis("plan", "list", "--json", db_url=db_url, home=tmp_path)
    assert [(r["name"], r["latest"], r["versions"]) for r in json.loads(listed.stdout)] == [
        ("greet", 2, 2)]
    shown = run_chassis("plan", "show", "greet", "--version", "1", "--json", db_url=db_url,
                        home=tmp_path)
    assert json.loads(shown.stdout)["plan"] == plan()
    text = run_chassis("plan", "show", "greet", db_url=db_url, home=tmp_path)
    assert "version 2" in text.stdout and "greeting: hello" in text.stdout
    missing = run_chassis("plan", "show", "nope", db_url=db_url, home=tmp_path)
    assert missing.returncode == 1 and "no registered plan 'nope'" in missing.stderr
    huge = run_chassis("plan", "show", "greet", "--version", "2147483648", db_url=db_url,
                       home=tmp_path)
    assert huge.returncode == 2 and "2147483648" in huge.stderr
    assert "Traceback" not in huge.stderr
