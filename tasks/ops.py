"""Beat's maintenance tasks (the schedule is in :func:`chassis.celery_conf.beat_schedule`)."""

from __future__ import annotations

from datetime import timedelta

from chassis import config, runtime
from chassis.celery_conf import PRUNE_TASK, SWEEP_TASK
from chassis.store.db import make_engine
from chassis.store.prune import prune as prune_workflows
from chassis.sweep import Sweeper
from tasks.celery_app import app


@app.task(name=SWEEP_TASK)
def sweep() -> dict[str, int]:
    """Re-dispatch or fail steps and workflows stuck past CHASSIS_STEP_TIMEOUT."""
    return Sweeper(runtime.engine(app), config.load()).sweep().counts()


@app.task(name=PRUNE_TASK)
def prune(days: float) -> dict[str, object]:
    """Remove finished workflows unchanged for ``days`` (beat sends it daily with
    CHASSIS_PRUNE_AFTER_DAYS from its own environment): what ``chassis prune
    --older-than`` does."""
    settings = config.load()
    return prune_workflows(make_engine(settings.database_url), timedelta(days=float(days)),
                           kafka=bool(settings.kafka_bootstrap)).counts()
