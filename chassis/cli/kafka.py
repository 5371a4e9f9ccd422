"""``chassis bridge`` and ``chassis relay``: the long-running Kafka processes."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import click

from chassis import config, logs
from chassis.cli.base import main
from chassis.cli.output import fail
from chassis.errors import ChassisError


def _setup(level: str | None) -> tuple[config.Settings, threading.Event]:
    """Logging to stderr (the CLI's job) and a stop event set by SIGTERM and SIGINT."""
    settings = config.load()
    logs.configure(settings.log_format, (level or settings.log_level).upper())
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return settings, stop


@main.command()
@click.option("--batch-size", default=500, show_default=True,
              help="Messages handled per poll (and per offset commit).")
@click.option("--log-level", default=None, help="Logging level (default CHASSIS_LOG_LEVEL).")
def bridge(batch_size: int, log_level: str | None) -> None:
    """Turn Kafka messages into Celery tasks (runs until SIGTERM or Ctrl-C).

    Reads start requests (system.agent.<plan>.process), agents' responses
    (CHASSIS_KAFKA_RESPONSE_PATTERN) and resume commands
    (system.commands.workflow.resume) as consumer group CHASSIS_KAFKA_GROUP; unusable
    messages go to CHASSIS_KAFKA_DLQ_TOPIC with a dlq_reason header. Offsets are
    committed only after the tasks are published. Needs CHASSIS_KAFKA_BOOTSTRAP.
    """
    settings, stop = _setup(log_level)
    try:
        from chassis.kafka.bridge import Bridge

        stats = Bridge(settings, batch_size=batch_size).run(stop)
    except ChassisError as exc:
        fail(str(exc))
    click.echo(f"bridge stopped: {stats.published} tasks published, "
               f"{stats.dead_lettered} dead-lettered", err=True)


@main.command()
@click.option("--batch-size", type=int, default=None,
              help="Rows per transaction (default CHASSIS_RELAY_BATCH_SIZE).")
@click.option("--log-level", default=None, help="Logging level (default CHASSIS_LOG_LEVEL).")
def relay(batch_size: int | None, log_level: str | None) -> None:
    """Publish the outbox (task requests, notifications, events) to Kafka, in order
    (runs until SIGTERM or Ctrl-C). Needs CHASSIS_KAFKA_BOOTSTRAP.

    Several relays may run against PostgreSQL; with SQLite run one. `celery beat`
    also sends a chassis.relay task every few seconds as a fallback.
    """
    settings, stop = _setup(log_level)
    try:
        from chassis.kafka.relay import OutboxRelay

        published = OutboxRelay(settings, batch_size=batch_size).run(stop)
    except ChassisError as exc:
        fail(str(exc))
    click.echo(f"relay stopped: {published} messages published", err=True)
