"""The Celery app, configured from ``celeryconfig``."""

from celery import Celery

app = Celery("agentchassis")
app.config_from_object("celeryconfig")

import tasks.log_context  # noqa: E402,F401  (log context of every task)
import tasks.ops  # noqa: E402,F401  (beat's tasks)
import tasks.workflow  # noqa: E402,F401  (register the tasks)
