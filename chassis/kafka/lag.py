"""Read-only Kafka figures for ``chassis metrics``: the bridge group's consumer lag and
the number of dead letters, read from the broker at scrape time.

Both come from Kafka itself, not from the bridge process: they are right with several
bridges or none running, and survive restarts. The dead-letter count is the sum of the
dead-letter topic's end offsets (every message ever written to it; retention does not
lower it). Lag is, per topic the bridge routes, the sum over partitions of the end
offset minus the group's committed offset (from the start of the partition when the
group has committed nothing there). Nothing here joins the group or commits.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition

from chassis.config import Settings
from chassis.kafka import clients
from chassis.kafka.routing import routes


@dataclass
class KafkaFigures:
    lag: dict[str, int] = field(default_factory=dict)
    """Messages not yet committed by the bridge's group, by topic."""
    dead_letters: int = 0
    """Messages ever written to the dead-letter topic."""


class KafkaReader:
    """Reads :class:`KafkaFigures`; one consumer (never subscribed), reused."""

    def __init__(self, settings: Settings, timeout: float = 5.0) -> None:
        self.bootstrap = clients.require_bootstrap(settings)
        self.group = settings.kafka_group
        self.dlq = settings.kafka_dlq_topic
        self.timeout = timeout
        self._routed = [re.compile(r.pattern) for r in routes(settings)]
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()

    def read(self) -> KafkaFigures:
        with self._lock:
            try:
                return self._read(self._get())
            except Exception:
                self.close()  # a fresh connection next time
                raise

    def _get(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer({"bootstrap.servers": self.bootstrap,
                                       "group.id": self.group, "enable.auto.commit": False,
                                       "socket.timeout.ms": int(self.timeout * 1000)})
        return self._consumer

    def _read(self, c: Consumer) -> KafkaFigures:
        topics = c.list_topics(timeout=self.timeout).topics
        out = KafkaFigures()
        dlq = topics.get(self.dlq)
        if dlq is not None:
            out.dead_letters = sum(self._offsets(c, TopicPartition(self.dlq, p))[1]
                                   for p in dlq.partitions)
        parts = [TopicPartition(name, p) for name, meta in topics.items()
                 if any(rx.match(name) for rx in self._routed) for p in meta.partitions]
        if not parts:
            return out
        for tp in c.committed(parts, timeout=self.timeout):
            low, high = self._offsets(c, tp)
            done = tp.offset if tp.offset >= 0 else low
            out.lag[tp.topic] = out.lag.get(tp.topic, 0) + max(0, high - done)
        return out

    def _offsets(self, c: Consumer, tp: TopicPartition) -> tuple[int, int]:
        low, high = c.get_watermark_offsets(tp, timeout=self.timeout, cached=False)
        return int(low), int(high)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
