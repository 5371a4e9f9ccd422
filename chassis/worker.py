"""agentchassis' own Celery app: ``celery -A chassis.worker worker|beat|flower``.

Configured from the environment (:mod:`chassis.config`, the one place that reads
CHASSIS_* variables); with nothing set, the embedded file-system broker and SQLite. To
run workflows on a Celery app you already have, call
:func:`chassis.celery_tasks.install` on it instead.
"""

from __future__ import annotations

import sys

from chassis.celery_tasks import own_app
from chassis.config import load
from chassis.errors import ConfigError

try:
    _settings = load()
except ConfigError as exc:  # a bad variable: one line, as from `chassis`, and exit 2
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
_settings.home.mkdir(parents=True, exist_ok=True)  # beat keeps its schedule file there

app = own_app(_settings)

__all__ = ["app"]
