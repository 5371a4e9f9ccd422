"""Prometheus metrics of agentchassis, computed from the database at scrape time.

A custom collector queries the tables on every scrape, so the figures are the
database's own: they match ``chassis status``/``chassis list``, whichever process did
the work, and need no state in the metrics process. Every name starts with
``agentchassis_``. Celery's own figures (tasks, workers) stay with Flower's /metrics.

=======================================  =========  ==================================
name                                     type       labels / meaning
=======================================  =========  ==================================
agentchassis_workflows                   gauge      status: workflows in that status
agentchassis_step_runs                   gauge      status: attempts in that status
agentchassis_step_duration_seconds       histogram  action: started → finished, of
                                                    finished step runs
agentchassis_fuel_spent_total            counter    action, client_id: ledger sum
agentchassis_outbox_backlog              gauge      outbox rows not yet published
agentchassis_outbox_refused              gauge      outbox rows Kafka refused for good
agentchassis_dead_letters_total          counter    messages on the dead-letter topic
agentchassis_bridge_lag                  gauge      topic: messages the bridge's group
                                                    has not committed yet
agentchassis_database_up                 gauge      1 when the queries succeeded
agentchassis_kafka_up                    gauge      1 when Kafka answered (with Kafka)
=======================================  =========  ==================================

The Kafka figures are present only when CHASSIS_KAFKA_BOOTSTRAP is set (see
:mod:`chassis.kafka.lag`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from chassis.config import Settings
from chassis.state import Status, StepStatus
from chassis.store.db import make_engine
from chassis.store.tables import fuel_ledger, orchestrator_state, outbox, step_runs

log = logging.getLogger(__name__)

PREFIX = "agentchassis_"
#: Upper bounds (seconds) of the step-duration buckets: milliseconds to an hour.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                    900.0, 3600.0)


def _duration(dialect: str) -> Any:
    """Seconds from started_at to finished_at, in SQL."""
    r = step_runs.c
    if dialect == "postgresql":
        return sa.extract("epoch", r.finished_at - r.started_at)
    return (sa.func.julianday(r.finished_at) - sa.func.julianday(r.started_at)) * 86400.0


class DatabaseCollector(Collector):
    """The chassis tables' figures, queried at each scrape."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(PREFIX + "database_up", "1 when the database answered the "
                                                       "metrics queries, else 0")
        try:
            with self.engine.connect() as conn:
                families = list(self._families(conn))
        except Exception as exc:  # noqa: BLE001  (a scrape reports it, never crashes)
            log.warning("metrics: database queries failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, conn: sa.Connection) -> Iterator[Metric]:
        ws = dict.fromkeys([s.value for s in Status], 0)
        ws.update((status, n) for status, n in conn.execute(
            sa.select(orchestrator_state.c.status, sa.func.count())
            .group_by(orchestrator_state.c.status)))
        yield _gauges("workflows", "Workflows by status.", "status", ws)

        rs = dict.fromkeys([s.value for s in StepStatus], 0)
        rs.update((status, n) for status, n in conn.execute(
            sa.select(step_runs.c.status, sa.func.count()).group_by(step_runs.c.status)))
        yield _gauges("step_runs", "Step runs by status.", "status", rs)
        yield self._durations(conn)

        fuel = CounterMetricFamily(PREFIX + "fuel_spent", "Fuel debited, by action and "
                                   "client (the ledger's sum).", labels=["action", "client_id"])
        for action, client, amount in conn.execute(
                sa.select(fuel_ledger.c.action, fuel_ledger.c.client_id,
                          sa.func.sum(fuel_ledger.c.amount))
                .group_by(fuel_ledger.c.action, fuel_ledger.c.client_id)).all():
            fuel.add_metric([action, client], float(amount))
        yield fuel

        backlog = conn.execute(sa.select(sa.func.count()).select_from(outbox)
                               .where(outbox.c.published_at.is_(None),
                                      outbox.c.failed_at.is_(None))).scalar_one()
        yield GaugeMetricFamily(PREFIX + "outbox_backlog", "Outbox messages not yet "
                                "published to Kafka.", value=backlog)
        refused = conn.execute(sa.select(sa.func.count()).select_from(outbox)
                               .where(outbox.c.failed_at.is_not(None))).scalar_one()
        yield GaugeMetricFamily(PREFIX + "outbox_refused", "Outbox messages Kafka refused "
                                "for good, set aside by the relay.", value=refused)

    def _durations(self, conn: sa.Connection) -> Metric:
        r = step_runs.c
        dur = _duration(conn.dialect.name)
        cols = [sa.func.count(), sa.func.sum(dur),
                *(sa.func.sum(sa.case((dur <= b, 1), else_=0)) for b in DURATION_BUCKETS)]
        hist = HistogramMetricFamily(PREFIX + "step_duration_seconds",
                                     "Seconds from a step run's start to its finish, by "
                                     "action (finished step runs).", labels=["action"])
        for action, count, total, *cumulative in conn.execute(
                sa.select(r.action, *cols)
                .where(r.started_at.is_not(None), r.finished_at.is_not(None))
                .group_by(r.action)).all():
            buckets = [(floatToGoString(b), float(n or 0))
                       for b, n in zip(DURATION_BUCKETS, cumulative, strict=True)]
            hist.add_metric([action], [*buckets, ("+Inf", float(count))], float(total or 0))
        return hist


class KafkaCollector(Collector):
    """Bridge lag and dead letters, read from Kafka at each scrape."""

    def __init__(self, settings: Settings) -> None:
        from chassis.kafka.lag import KafkaReader  # confluent-kafka only with Kafka on

        self.reader = KafkaReader(settings)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(PREFIX + "kafka_up", "1 when Kafka answered, else 0")
        try:
            figures = self.reader.read()
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: Kafka did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield CounterMetricFamily(PREFIX + "dead_letters", "Messages the bridge put on "
                                  "the dead-letter topic.", value=figures.dead_letters)
        yield _gauges("bridge_lag", "Messages on the bridge's topics its consumer group "
                      "has not committed yet.", "topic", figures.lag)


def _gauges(name: str, doc: str, label: str, values: dict[str, Any]) -> Metric:
    g = GaugeMetricFamily(PREFIX + name, doc, labels=[label])
    for key, value in sorted(values.items()):
        g.add_metric([key], float(value))
    return g


def registry(settings: Settings) -> CollectorRegistry:
    """A registry holding only agentchassis' collectors (no process metrics)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DatabaseCollector(make_engine(settings.database_url)))
    if settings.kafka_bootstrap:
        reg.register(KafkaCollector(settings))
    return reg
