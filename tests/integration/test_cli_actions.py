"""Your actions from the command line: the installed `chassis` command (a console
script, which has no current folder on its path) run in your project's folder loads
CHASSIS_ACTION_MODULES and --actions modules that only exist there, for `run` (checking
and, embedded, running the plan), `validate` and `plan register`. Embedded mode: no
server, a fresh folder per test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

CHASSIS = str(Path(sys.executable).parent / "chassis")
ACTIONS = '''
from chassis.actions import action


@action("summarise")
def summarise(data, params):
    return {"summary": data["input"]["text"][: params.get("limit", 5)]}
'''
PLAN = """start_step: s
steps:
  s: {action: summarise, params: {limit: 4}, next_step: done}
  done: {action: complete_workflow}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "yours.py").write_text(ACTIONS)
    (tmp_path / "plan.yaml").write_text(PLAN)
    return tmp_path


def cli(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("CHASSIS_") and k != "PYTHONPATH"}
    return subprocess.run([CHASSIS, *args], cwd=project, capture_output=True, text=True,
                          timeout=90, env={**base, "CHASSIS_HOME": str(project / ".chassis"),
                                           **env})


def test_the_console_script_is_the_one_tested() -> None:
    assert Path(CHASSIS).is_file(), f"{CHASSIS}: install the package (pip install -e .)"


@pytest.mark.parametrize("how", ["env", "option"])
def test_run_wait_completes_with_your_actions(project: Path, how: str) -> None:
    args = ["run", "plan.yaml", "--wait", "--json", "--input", '{"text": "hello world"}']
    proc = (cli(project, *args, CHASSIS_ACTION_MODULES="yours") if how == "env"
            else cli(project, *args, "--actions", "yours"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "COMPLETED"
    assert doc["final_result"]["s"] == {"summary": "hell"}


def test_without_the_module_the_plan_is_refused_naming_the_action(project: Path) -> None:
    proc = cli(project, "run", "plan.yaml", "--wait")
    assert proc.returncode == 2
    assert "summarise" in proc.stderr and "Traceback" not in proc.stderr
    assert not (project / ".chassis" / "chassis.db").exists() or "started" not in proc.stdout


def test_validate_and_register_load_them_too(project: Path) -> None:
    assert cli(project, "validate", "plan.yaml").returncode == 1
    ok = cli(project, "validate", "plan.yaml", "--actions", "yours")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ok = cli(project, "validate", "plan.yaml", CHASSIS_ACTION_MODULES="yours")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    reg = cli(project, "plan", "register", "summary", "plan.yaml", "--actions", "yours")
    assert reg.returncode == 0, reg.stderr
    run = cli(project, "run", "summary", "--wait", "--json", "--input", '{"text": "abcdefg"}',
              CHASSIS_ACTION_MODULES="yours")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["final_result"]["s"] == {"summary": "abcd"}


def test_a_module_that_cannot_be_imported_is_one_line(project: Path) -> None:
    proc = cli(project, "run", "plan.yaml", "--actions", "nowhere_to_be_found")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "nowhere_to_be_found" in proc.stderr
