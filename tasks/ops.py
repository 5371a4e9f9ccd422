"""Beat's maintenance tasks (the schedule is in :func:`chassis.celery_conf.beat_schedule`)."""

from __future__ import annotations

from chassis import config, runtime
from chassis.celery_conf import SWEEP_TASK
from chassis.sweep import Sweeper
from tasks.celery_app import app


@app.task(name=SWEEP_TASK)
def sweep() -> dict[str, int]:
    """Re-dispatch or fail steps and workflows stuck past CHASSIS_STEP_TIMEOUT."""
    return Sweeper(runtime.engine(app), config.load()).sweep().counts()
