"""Celery settings of agentchassis, read from the environment, as a config module:
``app.config_from_object("celeryconfig")`` in this repository. agentchassis' own app
(:mod:`chassis.worker`) is configured the same way without it; the wheel does not
install this module (it would shadow a project's own ``celeryconfig``).
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

globals().update(celery_settings(_settings))

#: The user's action modules (CHASSIS_ACTION_MODULES); chassis' tasks are added by
#: ``chassis.celery_tasks.install(app)``.
imports = tuple(_settings.action_modules)
