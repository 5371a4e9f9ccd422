"""The Celery app of agentchassis: ``celery -A tasks worker``."""

from tasks.app import app

__all__ = ["app"]
