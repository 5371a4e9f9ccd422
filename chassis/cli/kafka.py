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


@main.command()
@click.option("--type", "agent_type", default=None, metavar="NAME",
              help="The agent's type (env CHASSIS_AGENT_TYPE): names its topics and group.")
@click.option("--topic", default=None,
              help="Request topic (env CHASSIS_AGENT_TOPIC; default "
                   "system.agent.NAME.requests).")
@click.option("--responses", default=None,
              help="Response topic (env CHASSIS_AGENT_RESPONSES; default "
                   "system.responses.NAME).")
@click.option("--group", default=None,
              help="Consumer group (env CHASSIS_AGENT_GROUP; default NAME-group).")
@click.option("--actions", "--actions-module", "modules", multiple=True, metavar="MODULE",
              help="Import MODULE, whose actions it serves (repeatable; default "
                   "CHASSIS_ACTION_MODULES).")
@click.option("--concurrency", default=None,
              help="Threads running requests (env CHASSIS_AGENT_CONCURRENCY; default 8); a "
                   "partition's requests run in order.")
@click.option("--action-timeout", default=None, metavar="SECONDS",
              help="Seconds an action may run, when its request has no timeout header (its "
                   "step's timeout), before the request is answered as timed out "
                   "(StepTimeout) and its partition goes on (env "
                   "CHASSIS_AGENT_ACTION_TIMEOUT; default CHASSIS_STEP_TIMEOUT).")
@click.option("--health-port", default=None,
              help="Port of /health, /ready and /metrics (env CHASSIS_AGENT_HEALTH_PORT; "
                   "default 8080; 0: none).")
@click.option("--health-host", default="0.0.0.0", show_default=True,
              help="Address of the health server.")
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="A YAML or JSON file of these settings (agent_type, topic, responses, "
                   "kafka_consumer_group, concurrency, health_port, actions, "
                   "action_timeout); options and "
                   "variables win over it.")
@click.option("--log-level", default=None, help="Logging level (default CHASSIS_LOG_LEVEL).")
def agent(agent_type: str | None, topic: str | None, responses: str | None,
          group: str | None, modules: tuple[str, ...], concurrency: str | None,
          action_timeout: str | None, health_port: str | None, health_host: str,
          config_file: str | None, log_level: str | None) -> None:
    """Serve registered actions as a Kafka agent (runs until SIGTERM or Ctrl-C).

    Consumes TaskRequests {action, data, params} from the request topic, runs the
    action each names (your modules' actions, the built-ins and the Claude actions) and
    answers a TaskResponse {success, data, error, error_type} on the response topic
    with the headers the coordinator expects. An offset is committed only after its
    answer is delivered; a request without the ids an answer needs, or not JSON, goes
    to CHASSIS_KAFKA_DLQ_TOPIC with a dlq_reason header; an action that raises is
    answered success: false (the plan's retry policy decides), and one running past
    --action-timeout as timed out (its partition goes on). Needs
    CHASSIS_KAFKA_BOOTSTRAP.
    """
    import os

    from chassis import actions as registry
    from chassis.cli.errors import describe
    from chassis.kafka.agent import AgentRuntime, agent_config, read_config_file, serve_health

    settings, stop = _setup(log_level)
    try:
        file = read_config_file(config_file) if config_file else None
        conf = agent_config({"agent_type": agent_type, "topic": topic, "responses": responses,
                             "group": group, "concurrency": concurrency,
                             "health_port": health_port, "modules": modules or None,
                             "action_timeout": action_timeout},
                            os.environ, file, settings)
        before = set(registry.registered())
        registry.load_modules(conf.modules)
        own = frozenset(set(registry.registered()) - before) if conf.modules else None
        runtime = AgentRuntime(settings, conf, own)
        if conf.health_port:
            serve_health(runtime, health_host, conf.health_port)
        runtime.run(stop)
    except Exception as exc:  # noqa: BLE001  (one line and an exit code, as every command)
        if click.get_current_context().meta.get("chassis.debug"):
            raise
        code, lines = describe(exc)
        for line in lines:
            click.echo(f"error: {line}", err=True)
        raise SystemExit(code) from None
    click.echo(f"agent {conf.agent_type} stopped", err=True)
