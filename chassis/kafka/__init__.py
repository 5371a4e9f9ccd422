"""Kafka: the bridge (Kafka → Celery) and the outbox relay (database → Kafka).

- :mod:`chassis.kafka.clients`: client configuration, topics, headers.
- :mod:`chassis.kafka.routing`: the declared routing table: which topic becomes which
  Celery task, and what makes a message unusable (it then goes to the DLQ).
- :mod:`chassis.kafka.bridge`: ``chassis bridge``, the consumer-group loop.
- :mod:`chassis.kafka.relay`: ``chassis relay`` and the ``chassis.relay`` beat task.

Nothing here is imported unless Kafka is used; confluent-kafka is a dependency all the
same, so that ``chassis bridge`` works wherever agentchassis is installed.
"""

from __future__ import annotations

from chassis.kafka.clients import require_bootstrap
from chassis.kafka.routing import RESPOND_TASK, START_TASK, Rejected, Route, TaskCall

__all__ = ["RESPOND_TASK", "START_TASK", "Rejected", "Route", "TaskCall", "require_bootstrap"]
