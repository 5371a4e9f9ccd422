"""Celery settings for ``celery -A tasks worker|beat|flower``, read from the environment.

Everything comes from :mod:`chassis.config` (the one place that reads CHASSIS_*
variables); with nothing set, the embedded file-system broker and SQLite are used.
"""

import sys

from chassis.celery_conf import celery_settings
from chassis.config import load
from chassis.errors import ConfigError

try:
    _settings = load()
except ConfigError as exc:  # a bad variable: one line, as from `chassis`, and exit 2
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
_settings.home.mkdir(parents=True, exist_ok=True)  # beat keeps its schedule file there

globals().update(celery_settings(_settings))

#: Task modules: ours, then the user's action modules (CHASSIS_ACTION_MODULES).
imports = ("tasks.workflow", *_settings.action_modules)
