"""Prometheus metrics of agentchassis, computed from the database at scrape time.

A custom collector queries the tables on every scrape, so the figures are the
database's own: they match ``chassis status``/``chassis list``, whichever process did
the work, and need no state in the metrics process. Every query is bounded by what is
under way or by the last hour, over indexed columns: a scrape costs about the same with
100 or 100,000 finished workflows kept. Every name starts with ``agentchassis_``, but
``circuit_breaker_state``, a name kept from the original platform.
Celery's own figures (tasks, workers) stay with Flower's /metrics.

==============================================  =========  ===========================
name                                            type       labels / meaning
==============================================  =========  ===========================
agentchassis_workflows                          gauge      status: workflows under way
                                                           (RUNNING, AWAITING_RESPONSES,
                                                           PAUSED_FOR_HUMAN_INPUT,
                                                           COMPENSATING)
agentchassis_workflows_finished_last_hour       gauge      status: workflows that ended
                                                           in the last hour
agentchassis_step_runs                          gauge      status: attempts under way
agentchassis_step_runs_finished_last_hour       gauge      status: attempts that ended
                                                           in the last hour
agentchassis_step_duration_seconds              histogram  action: started → finished,
                                                           of the last hour's attempts
agentchassis_fuel_spent_last_hour               gauge      action: fuel charged (the
                                                           ledger's amounts: debits and
                                                           settled AI attempts)
agentchassis_fuel_spent_last_hour_by_client     gauge      client_id: the 10 clients
                                                           that spent most (the rest:
                                                           "other")
agentchassis_fuel_reserved_by_client            gauge      client_id: fuel held now by
                                                           AI attempts of workflows
                                                           under way (Σ held), the 10
                                                           clients holding most (the
                                                           rest: "other")
agentchassis_outbox_backlog                     gauge      outbox rows not yet published
agentchassis_outbox_refused                     gauge      outbox rows Kafka refused for
                                                           good
agentchassis_dead_letters_total                 counter    messages on the dead-letter
                                                           topic
agentchassis_bridge_lag                         gauge      topic: messages the bridge's
                                                           group has not committed yet
agentchassis_database_up                        gauge      1 when the queries succeeded
agentchassis_kafka_up                           gauge      1 when Kafka answered
circuit_breaker_state                           gauge      provider: its AI circuit
                                                           breaker, 0 closed, 1 open,
                                                           2 half-open
==============================================  =========  ===========================

The Kafka figures are present only when CHASSIS_KAFKA_BOOTSTRAP is set (see
:mod:`chassis.kafka.lag`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
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

from chassis.ai.breaker import PROVIDERS, STATE_VALUES
from chassis.config import Settings
from chassis.state import Status, StepStatus
from chassis.store import breaker
from chassis.store.db import make_engine
from chassis.store.reports import reserved_by_client
from chassis.store.tables import fuel_ledger, orchestrator_state, outbox, step_runs

log = logging.getLogger(__name__)

PREFIX = "agentchassis_"
#: What "recent" means: the figures of ended work cover this much time.
WINDOW = timedelta(hours=1)
#: Clients with their own series of fuel spent (the others are summed as "other").
TOP_CLIENTS = 10
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
        since = datetime.now(UTC) - WINDOW
        o, r, led = orchestrator_state.c, step_runs.c, fuel_ledger.c
        under_way = [st.value for st in Status if not st.finished]
        yield _gauges("workflows", "Workflows under way, by status.", "status",
                      _by_status(conn, o.status, under_way, o.status.in_(under_way)))
        finished = [st.value for st in Status if st.finished]
        yield _gauges("workflows_finished_last_hour", "Workflows that ended in the last "
                      "hour, by status.", "status",
                      _by_status(conn, o.status, finished, o.updated_at >= since,
                                 o.status.in_(finished)))
        live = [st.value for st in StepStatus if not st.finished]
        yield _gauges("step_runs", "Attempts under way, by status.", "status",
                      _by_status(conn, r.status, live, r.status.in_(live)))
        ended = [st.value for st in StepStatus if st.finished]
        yield _gauges("step_runs_finished_last_hour", "Attempts that ended in the last "
                      "hour, by status.", "status",
                      _by_status(conn, r.status, ended, r.finished_at >= since))
        yield self._durations(conn, since)

        by_action = conn.execute(sa.select(led.action, sa.func.sum(led.amount))
                                 .where(led.created_at >= since).group_by(led.action)).all()
        yield _gauges("fuel_spent_last_hour", "Fuel debited in the last hour, by action.",
                      "action", dict(by_action))
        spent = sa.func.sum(led.amount).label("spent")
        by_client = conn.execute(sa.select(led.client_id, spent)
                                 .where(led.created_at >= since).group_by(led.client_id)
                                 .order_by(spent.desc()).limit(TOP_CLIENTS + 1)).all()
        clients = {c: float(n) for c, n in by_client[:TOP_CLIENTS]}
        if len(by_client) > TOP_CLIENTS:
            total = conn.execute(sa.select(sa.func.sum(led.amount))
                                 .where(led.created_at >= since)).scalar_one()
            clients["other"] = float(total or 0) - sum(clients.values())
        yield _gauges("fuel_spent_last_hour_by_client", f"Fuel debited in the last hour by "
                      f"the {TOP_CLIENTS} clients that spent most (the rest: other).",
                      "client_id", clients)
        yield _gauges("fuel_reserved_by_client", f"Fuel held now by AI attempts of "
                      f"workflows under way, for the {TOP_CLIENTS} clients that hold most "
                      f"(the rest: other).", "client_id",
                      reserved_by_client(conn, TOP_CLIENTS))

        backlog = conn.execute(sa.select(sa.func.count()).select_from(outbox)
                               .where(outbox.c.published_at.is_(None),
                                      outbox.c.failed_at.is_(None))).scalar_one()
        yield GaugeMetricFamily(PREFIX + "outbox_backlog", "Outbox messages not yet "
                                "published to Kafka.", value=backlog)
        refused = conn.execute(sa.select(sa.func.count()).select_from(outbox)
                               .where(outbox.c.failed_at.is_not(None))).scalar_one()
        yield GaugeMetricFamily(PREFIX + "outbox_refused", "Outbox messages Kafka refused "
                                "for good, set aside by the relay.", value=refused)
        yield _breaker_states(conn)

    def _durations(self, conn: sa.Connection, since: datetime) -> Metric:
        r = step_runs.c
        dur = _duration(conn.dialect.name)
        cols = [sa.func.count(), sa.func.sum(dur),
                *(sa.func.sum(sa.case((dur <= b, 1), else_=0)) for b in DURATION_BUCKETS)]
        hist = HistogramMetricFamily(PREFIX + "step_duration_seconds",
                                     "Seconds from an attempt's start to its end, by action "
                                     "(attempts that ended in the last hour).",
                                     labels=["action"])
        for action, count, total, *cumulative in conn.execute(
                sa.select(r.action, *cols)
                .where(r.finished_at >= since, r.started_at.is_not(None))
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


def _breaker_states(conn: sa.Connection) -> Metric:
    """Each AI provider's circuit breaker (chassis.ai.breaker), under the original
    platform's name, without the prefix."""
    states = dict.fromkeys(PROVIDERS, STATE_VALUES[breaker.CLOSED])
    states.update({b.provider: STATE_VALUES[b.state] for b in breaker.states(conn)
                   if b.state in STATE_VALUES})
    g = GaugeMetricFamily("circuit_breaker_state", "AI provider circuit breaker: 0 closed, "
                          "1 open, 2 half-open.", labels=["provider"])
    for provider, value in sorted(states.items()):
        g.add_metric([provider], float(value))
    return g


def _by_status(conn: sa.Connection, status: sa.ColumnElement[str], listed: list[str],
               *where: sa.ColumnElement[bool]) -> dict[str, Any]:
    """Rows by status, every listed status present (0 when none)."""
    counts: dict[str, Any] = dict.fromkeys(listed, 0)
    counts.update(conn.execute(sa.select(status, sa.func.count()).where(*where)
                               .group_by(status)).all())
    return counts


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
