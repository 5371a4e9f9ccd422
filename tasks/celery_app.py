"""The Celery app (kept for ``from tasks.celery_app import app``): :mod:`chassis.worker`."""

from chassis.worker import app

__all__ = ["app"]
