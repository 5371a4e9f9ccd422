"""agentchassis in a project that has its own Celery app: the package installs no
top-level `tasks` or `celeryconfig`, the project's `tasks.py` stays its own, and
`chassis.celery_tasks.install(app)` adds the chassis tasks, queues and routes to it, so
`celery -A tasks worker` of the project runs workflows to COMPLETED (real Redis,
PostgreSQL and a Celery worker started in the project's folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

from chassis.celery_tasks import install
from chassis.errors import ConfigError
from tests.helpers import wait_until
from tests.integration.conftest import Services

pytestmark = pytest.mark.timeout(120)

PROJECT_TASKS = '''
import os

from celery import Celery

from chassis.celery_tasks import install

app = Celery("billing", broker=os.environ["CHASSIS_BROKER_URL"],
             backend=os.environ["CHASSIS_RESULT_BACKEND"])


@app.task(name="billing.invoice")
def invoice(n):
    return n * 2


install(app)
'''


def project_env(services: Services) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**base, **services.env, "CHASSIS_ACTION_MODULES": ""}


def test_a_project_keeps_its_tasks_module_and_runs_workflows_on_its_app(
        services: Services, tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(PROJECT_TASKS)
    env = project_env(services)
    which = subprocess.run([sys.executable, "-c", "import tasks; print(tasks.app.main)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert which.stdout.strip() == "billing", which.stderr
    nothing = subprocess.run([sys.executable, "-c", "import celeryconfig"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=60)
    assert nothing.returncode != 0 and "No module named 'celeryconfig'" in nothing.stderr
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            # a plain worker of the project's app: its own queue and the chassis ones
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-l", "INFO", "-P",
             "threads", "-c", "8", "-n", "billing@localhost", "--without-mingle",
             "--without-gossip"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_until(lambda: "ready." in log.read_text(errors="replace")
                   or worker.poll() is not None, timeout=60, message="worker never ready")
        assert worker.poll() is None, log.read_text()
        client = services.client()
        cid = client.start({"start_step": "a", "steps": {
            "a": {"action": "echo", "params": {"x": 1}, "next_step": "done"},
            "done": {"action": "complete_workflow"}}})
        doc = client.wait(cid, timeout=60)
        assert doc["status"] == "COMPLETED" and doc["final_result"]["a"] == {"x": 1}
        # the project's own task runs on the same worker
        billing = Celery("caller", broker=env["CHASSIS_BROKER_URL"],
                         backend=env["CHASSIS_RESULT_BACKEND"])
        assert billing.send_task("billing.invoice", args=[21]).get(timeout=30) == 42
        queues = {"celery", "chassis.coordination", "chassis.steps", "chassis.ai"}
        assert all(f".> {q} " in log.read_text(errors="replace") for q in queues)
        text = log.read_text(errors="replace")
        assert "billing" in text and "chassis.step" in text
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_an_app_that_is_not_json_only_is_refused() -> None:
    app = Celery("pickled", set_as_current=False)
    app.conf.task_serializer = "pickle"
    app.conf.accept_content = ["pickle", "json"]
    with pytest.raises(ConfigError, match="task_serializer, accept_content"):
        install(app)
    assert "chassis.step" not in app.tasks
