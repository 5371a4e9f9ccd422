"""``celery -A tasks worker`` in this repository: agentchassis' app
(:mod:`chassis.worker`, which is what an installed package runs: ``celery -A
chassis.worker``). Not installed by the wheel, so it never shadows a project's own
``tasks`` module."""

from chassis.worker import app

__all__ = ["app"]
