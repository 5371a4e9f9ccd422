"""The Celery app, configured from ``celeryconfig``."""

from celery import Celery

app = Celery("agentchassis")
app.config_from_object("celeryconfig")

import tasks.workflow  # noqa: E402,F401  (register the tasks)
