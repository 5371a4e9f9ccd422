"""``chassis health``: can this process reach the database, the broker and Kafka?

For container probes and operators: each part is checked with a real connection and
a short timeout, and a failure names its part and the address tried (passwords
masked), e.g. ``broker: cannot connect to redis://127.0.0.1:1/0: Error 111 ...``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.pool import NullPool

from chassis.celery_conf import celery_settings
from chassis.config import Settings
from chassis.store import db


@dataclass(frozen=True)
class PartHealth:
    part: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.part}: {'ok, ' if self.ok else ''}{self.detail}"


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    return " ".join(str(orig or exc).split()) or type(exc).__name__


def check_database(settings: Settings, timeout: float) -> PartHealth:
    """Connects, runs ``SELECT 1`` and compares the migration revision with the head."""
    url = settings.database_url
    shown = db.mask_url(url)
    try:
        if url.startswith("postgresql"):  # a fresh connection, within the timeout
            engine = sa.create_engine(url, poolclass=NullPool, connect_args={
                "connect_timeout": max(1, round(timeout))})
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
            finally:
                engine.dispose()
        revision = db.current_revision(url)
    except Exception as exc:  # noqa: BLE001  (any failure is the answer)
        return PartHealth("database", False, f"cannot connect to {shown}: {_reason(exc)}")
    head = db.head_revision()
    if revision != head:
        return PartHealth("database", False, f"{shown} is at revision {revision or 'none'}, "
                          f"this version needs {head}: run `chassis db upgrade`")
    return PartHealth("database", True, f"{shown} (revision {revision})")


def check_broker(settings: Settings, timeout: float) -> PartHealth:
    """Opens a connection to the Celery broker (kombu), one try."""
    shown = maybe_sanitize_url(settings.broker_url)
    options = celery_settings(settings)["broker_transport_options"]
    try:
        with Connection(settings.broker_url, connect_timeout=timeout,
                        transport_options=options) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                   timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        return PartHealth("broker", False, f"cannot connect to {shown}: {_reason(exc)}")
    return PartHealth("broker", True, shown)


def check_kafka(settings: Settings, timeout: float) -> PartHealth:
    """Asks the Kafka cluster for its topics; "off" (healthy) when Kafka is not configured."""
    if not settings.kafka_bootstrap:
        return PartHealth("kafka", True, "off (CHASSIS_KAFKA_BOOTSTRAP is not set)")
    from confluent_kafka.admin import AdminClient  # only when Kafka is on

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap,
                         "socket.timeout.ms": int(timeout * 1000)})
    try:
        meta = admin.list_topics(timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        return PartHealth("kafka", False,
                          f"cannot connect to {settings.kafka_bootstrap}: {_reason(exc)}")
    return PartHealth("kafka", True, f"{settings.kafka_bootstrap} "
                      f"({len(meta.brokers)} broker(s), {len(meta.topics)} topics)")


CHECKS: dict[str, Callable[[Settings, float], PartHealth]] = {
    "database": check_database, "broker": check_broker, "kafka": check_kafka}


def check(settings: Settings, timeout: float = 5.0,
          parts: tuple[str, ...] = tuple(CHECKS)) -> list[PartHealth]:
    """Every part's health, in order."""
    return [CHECKS[p](settings, timeout) for p in parts]
