"""Settings, read from the environment. The only module that reads ``os.environ``.

With nothing set, everything is embedded: SQLite and a file-system broker under
``./.chassis/`` (or ``CHASSIS_HOME``), so that ``chassis demo`` needs no server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


@dataclass(frozen=True)
class Settings:
    """Every configuration variable of agentchassis, with its default."""

    home: Path
    """CHASSIS_HOME: folder of the embedded database and broker (default ./.chassis)."""
    database_url: str
    """CHASSIS_DATABASE_URL: SQLAlchemy URL; postgresql:// URLs use psycopg 3."""
    broker_url: str
    """CHASSIS_BROKER_URL: Celery broker; unset means the embedded file-system broker."""
    result_backend: str
    """CHASSIS_RESULT_BACKEND: Celery result backend (chords need one)."""
    kafka_bootstrap: str | None
    """CHASSIS_KAFKA_BOOTSTRAP: Kafka bootstrap servers; unset turns Kafka features off."""
    action_modules: tuple[str, ...] = ()
    """CHASSIS_ACTION_MODULES: comma-separated modules that register user actions."""
    visibility_timeout: int = 3600
    """CHASSIS_VISIBILITY_TIMEOUT: seconds before Redis redelivers an unacked task."""
    prefetch_multiplier: int = 4
    """CHASSIS_PREFETCH_MULTIPLIER: tasks a worker process reserves ahead."""
    log_format: str = "text"
    """CHASSIS_LOG_FORMAT: ``text`` or ``json``."""
    log_level: str = "INFO"
    """CHASSIS_LOG_LEVEL."""
    kafka_response_pattern: str = r"^system\.responses\..*"
    """CHASSIS_KAFKA_RESPONSE_PATTERN: regex (librdkafka: starts with ^) of the topics
    the bridge reads external agents' responses from."""
    kafka_dlq_topic: str = "dlq.chassis"
    """CHASSIS_KAFKA_DLQ_TOPIC: where the bridge puts messages it cannot use."""
    kafka_group: str = "chassis-bridge"
    """CHASSIS_KAFKA_GROUP: consumer group of ``chassis bridge``."""
    relay_batch_size: int = 500
    """CHASSIS_RELAY_BATCH_SIZE: outbox rows the relay publishes per transaction."""
    relay_poll_interval: float = 0.2
    """CHASSIS_RELAY_POLL_INTERVAL: seconds the relay waits when the outbox is empty."""
    embedded_broker: bool = field(default=False)
    """True when no broker URL was given (derived)."""

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"


def normalize_database_url(url: str) -> str:
    """Use psycopg 3 for plain postgresql:// URLs (psycopg2 is not a dependency)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    home = Path(env.get("CHASSIS_HOME") or Path.cwd() / ".chassis").resolve()
    database_url = normalize_database_url(
        env.get("CHASSIS_DATABASE_URL") or f"sqlite:///{home / 'chassis.db'}"
    )
    broker = env.get("CHASSIS_BROKER_URL") or ""
    embedded = not broker
    if embedded:
        broker = "filesystem://"
    backend = env.get("CHASSIS_RESULT_BACKEND") or ""
    if not backend:
        if broker.startswith(("redis://", "rediss://")):
            backend = broker
        else:
            backend = f"db+sqlite:///{home / 'results.db'}"
    return Settings(
        home=home,
        database_url=database_url,
        broker_url=broker,
        result_backend=backend,
        kafka_bootstrap=env.get("CHASSIS_KAFKA_BOOTSTRAP") or None,
        action_modules=_split(env.get("CHASSIS_ACTION_MODULES")),
        visibility_timeout=int(env.get("CHASSIS_VISIBILITY_TIMEOUT") or 3600),
        prefetch_multiplier=int(env.get("CHASSIS_PREFETCH_MULTIPLIER") or 4),
        log_format=(env.get("CHASSIS_LOG_FORMAT") or "text").lower(),
        log_level=(env.get("CHASSIS_LOG_LEVEL") or "INFO").upper(),
        kafka_response_pattern=(env.get("CHASSIS_KAFKA_RESPONSE_PATTERN")
                                or Settings.kafka_response_pattern),
        kafka_dlq_topic=env.get("CHASSIS_KAFKA_DLQ_TOPIC") or Settings.kafka_dlq_topic,
        kafka_group=env.get("CHASSIS_KAFKA_GROUP") or Settings.kafka_group,
        relay_batch_size=int(env.get("CHASSIS_RELAY_BATCH_SIZE") or Settings.relay_batch_size),
        relay_poll_interval=float(env.get("CHASSIS_RELAY_POLL_INTERVAL")
                                  or Settings.relay_poll_interval),
        embedded_broker=embedded,
    )
