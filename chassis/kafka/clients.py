"""confluent-kafka client configuration, topic creation and header helpers."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from chassis.config import Settings
from chassis.errors import ConfigError

log = logging.getLogger(__name__)

#: Partitions of the topics chassis creates when they are missing (keys keep a
#: workflow's messages on one partition, so in order).
DEFAULT_PARTITIONS = 3
#: A consumer group on a fresh broker otherwise waits for librdkafka's long defaults
#: before its first assignment; these keep a restart's rebalance to a few seconds.
#: The bridge polls at least every second, far inside max.poll.interval.ms.
SESSION_TIMEOUT_MS = 6000
MAX_POLL_INTERVAL_MS = 7000
#: How often a regex subscription looks for new matching topics.
METADATA_REFRESH_MS = 5000

Headers = list[tuple[str, str | bytes | None]]


def require_bootstrap(settings: Settings) -> str:
    """The bootstrap servers, or a ConfigError saying how to turn Kafka on."""
    if not settings.kafka_bootstrap:
        raise ConfigError("Kafka is off: set CHASSIS_KAFKA_BOOTSTRAP to the broker's "
                          "host:port (e.g. CHASSIS_KAFKA_BOOTSTRAP=localhost:9092)")
    return settings.kafka_bootstrap


def consumer_config(bootstrap: str, group: str, **extra: Any) -> dict[str, Any]:
    """A consumer in ``group`` that commits only when told to."""
    return {"bootstrap.servers": bootstrap, "group.id": group,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
            "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS, **extra}


def producer_config(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """An idempotent producer: no duplicates or reordering from its own retries."""
    return {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
            "linger.ms": 5, **extra}


def ensure_topics(bootstrap: str, topics: Iterable[str],
                  partitions: int = DEFAULT_PARTITIONS, timeout: float = 15.0) -> list[str]:
    """Create the topics that do not exist yet; returns those created."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = sorted(set(topics) - existing)
    if not missing:
        return []
    futures = admin.create_topics([NewTopic(t, partitions, 1) for t in missing],
                                  operation_timeout=timeout, request_timeout=timeout)
    for future in futures.values():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    log.info("created topics %s", ", ".join(missing))
    return missing


def header_dict(headers: Sequence[tuple[str, str | bytes | None]] | Mapping[str, Any] | None
                ) -> dict[str, str]:
    """Message headers as text (the last of a repeated name wins; None → ""). Bytes
    that are not UTF-8 become lone surrogates, which the routes' checks refuse (they are
    not silently replaced by another, valid, value)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    out: dict[str, str] = {}
    for name, value in pairs:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        out[name] = "" if value is None else str(value)
    return out


def repeated_headers(headers: Sequence[tuple[str, str | bytes | None]] | Mapping[str, Any]
                     | None) -> set[str]:
    """Names of the headers given more than once with different values."""
    if headers is None or isinstance(headers, Mapping):
        return set()
    seen: dict[str, str | bytes | None] = {}
    out: set[str] = set()
    for name, value in headers:
        if name in seen and seen[name] != value:
            out.add(name)
        seen.setdefault(name, value)
    return out


def message_headers(headers: Sequence[tuple[str, str | bytes | None]] | Mapping[str, Any]
                    | None) -> Headers:
    """A consumed message's headers as a list for ``produce`` (order kept)."""
    if isinstance(headers, Mapping):
        return list(headers.items())
    return [(k, v) for k, v in headers or ()]


def encode_headers(headers: Mapping[str, object]) -> Headers:
    """Headers for ``produce``: every value as UTF-8 text; None values are left out."""
    return [(k, str(v).encode()) for k, v in headers.items() if v is not None]
