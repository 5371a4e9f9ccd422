"""``chassis bridge``: Kafka messages in, Celery tasks out.

A consumer in a consumer group reads the routing table's topics
(:mod:`chassis.kafka.routing`). Each message becomes a Celery task, or goes to the
dead-letter topic with the reason when it cannot be used. Offsets are committed only
after a batch's tasks are published and its dead letters delivered, so a crash
re-reads, never skips: at-least-once. The tasks are idempotent (a start by
correlation_id, a response by its request id), so a re-read changes nothing.

If publishing fails (the Celery broker is down), the partition is rewound to the
message that failed and the bridge retries after a pause, committing nothing past it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from celery import Celery
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from chassis.celery_conf import celery_settings
from chassis.config import Settings
from chassis.coordinator import CANCEL_TOPIC, RESUME_TOPIC
from chassis.errors import PlanNotFound
from chassis.kafka import clients
from chassis.kafka.publish import TaskPublisher
from chassis.kafka.routing import (
    CONFLICT,
    Rejected,
    Router,
    StartRecord,
    TaskCall,
    routes,
    start_record,
)
from chassis.registry import PlanRegistry
from chassis.store.db import make_engine
from chassis.store.tables import orchestrator_state, plans, step_runs

log = logging.getLogger(__name__)

#: Seconds a "latest version of plan X" answer is reused (a new registration shows
#: up in the bridge within this time). A pinned version is cached for good.
PLAN_CACHE_SECONDS = 2.0
#: Seconds between looks for newly registered plans whose start topic is missing.
TOPIC_CHECK_SECONDS = 30.0
MAX_BACKOFF = 5.0
#: Bytes of a message's value (and key) kept on the dead-letter topic when the whole
#: message, with the reason headers, is too large to be sent again.
DLQ_KEEP_BYTES = 64 * 1024
DLQ_DETAIL_MAX = 1000
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE})
STATS_SECONDS = 30.0
#: Seconds between looks for the first topic of a route that had none.
SUBSCRIPTION_CHECK_SECONDS = 5.0


class DbDirectory:
    """Routing look-ups in the chassis database."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.registry = PlanRegistry(engine)
        self._latest: dict[str, tuple[float, int]] = {}
        self._pinned: set[tuple[str, int]] = set()

    def plan_version(self, name: str, version: int | None) -> int | None:
        if version is not None:
            if (name, version) not in self._pinned:
                try:
                    self.registry.get(name, version)
                except PlanNotFound:
                    return None
                self._pinned.add((name, version))
            return version
        cached = self._latest.get(name)
        if cached is not None and time.monotonic() - cached[0] < PLAN_CACHE_SECONDS:
            return cached[1]
        latest = self.registry.latest_version(name)
        if latest is not None:
            self._latest[name] = (time.monotonic(), latest)
        return latest

    def owner(self, correlation_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(orchestrator_state.c.client_id).where(
                orchestrator_state.c.correlation_id == correlation_id)).scalar()

    def start_of(self, correlation_id: str) -> StartRecord | None:
        o = orchestrator_state.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(o.client_id, o.plan_name, o.plan_version,
                                         o.initial_request_data, o.fuel_budget)
                               .where(o.correlation_id == correlation_id)).first()
        return None if row is None else tuple(row)  # type: ignore[return-value]

    def has_request(self, correlation_id: str, request_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(step_runs.c.id).where(
                step_runs.c.correlation_id == correlation_id,
                step_runs.c.request_id == request_id).limit(1)).first() is not None

    def plan_names(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(plans.c.name).distinct()).scalars())


@dataclass
class BridgeStats:
    """Counters since start (read by tests and the benchmark while the bridge runs)."""

    published: int = 0
    dead_lettered: int = 0
    retried: int = 0
    by_task: dict[str, int] = field(default_factory=dict)


class Bridge:
    """The consumer loop; ``run`` until ``stop`` is set."""

    def __init__(self, settings: Settings, *, app: Celery | None = None,
                 batch_size: int = 500, consumer_overrides: dict[str, Any] | None = None
                 ) -> None:
        self.settings = settings
        self.bootstrap = clients.require_bootstrap(settings)
        if app is None:
            app = Celery("agentchassis-bridge", set_as_current=False)
            app.conf.update(celery_settings(settings))
        self.app = app
        self.publisher = TaskPublisher(app)
        self.directory = DbDirectory(make_engine(settings.database_url))
        self.table = routes(settings)
        self.router = Router(self.table, self.directory, settings.limits)
        self.batch_size = batch_size
        self.consumer_conf = clients.consumer_config(self.bootstrap, settings.kafka_group,
                                                     **(consumer_overrides or {}))
        self.stats = BridgeStats()
        self._producer: Producer | None = None
        self._too_large: list[tuple[Message, Rejected]] = []
        self._topics_checked = 0.0
        self._subscribed_at = 0.0

    # ------------------------------------------------------------------ the loop

    def ensure_topics(self) -> None:
        """The DLQ, the resume topic and every registered plan's start topic."""
        names = [f"system.agent.{n}.process" for n in self.directory.plan_names()]
        clients.ensure_topics(self.bootstrap,
                              [self.settings.kafka_dlq_topic, RESUME_TOPIC, CANCEL_TOPIC, *names])
        self._topics_checked = time.monotonic()

    def run(self, stop: threading.Event | None = None,
            on_ready: Callable[[], None] | None = None) -> BridgeStats:
        stop = stop or threading.Event()
        self.ensure_topics()
        consumer = Consumer(self.consumer_conf)
        subscribed = self._subscribe(consumer, [])
        log.info("bridge consuming %s as group %s; dead letters to %s",
                 ", ".join(r.subscription for r in self.table), self.settings.kafka_group,
                 self.settings.kafka_dlq_topic)
        if on_ready is not None:
            on_ready()
        backoff = 0.0
        last_stats = time.monotonic()
        try:
            with self.app.producer_or_acquire() as celery_producer:
                while not stop.is_set():
                    msgs = consumer.consume(self.batch_size, timeout=0.5)
                    if msgs:
                        ok = self._handle(consumer, msgs, celery_producer)
                        backoff = 0.0 if ok else min(MAX_BACKOFF, max(0.2, backoff * 2))
                        if backoff:
                            self.stats.retried += 1
                            stop.wait(backoff)
                    now = time.monotonic()
                    if now - last_stats > STATS_SECONDS:
                        last_stats = now
                        log.info("bridge: %d published, %d dead-lettered",
                                 self.stats.published, self.stats.dead_lettered)
                    if now - self._subscribed_at > SUBSCRIPTION_CHECK_SECONDS:
                        subscribed = self._subscribe(consumer, subscribed)
                    if now - self._topics_checked > TOPIC_CHECK_SECONDS:
                        self._check_topics()
        finally:
            consumer.close()
            if self._producer is not None:
                self._producer.flush(10)
        return self.stats

    def _subscribe(self, consumer: Consumer, current: list[str]) -> list[str]:
        """Subscribe to the routes whose pattern matches an existing topic.

        A regex that matches no topic yet (no agent has created its response topic)
        makes librdkafka rejoin the group again and again, which stalls consumption;
        such a route is added when its first topic appears (checked every few seconds).
        """
        self._subscribed_at = time.monotonic()
        try:
            topics = list(consumer.list_topics(timeout=10).topics)
        except KafkaException as exc:
            log.warning("cannot list topics: %s", exc)
            return current
        routed = {found[0].name for t in topics if (found := self.router.route(t))}
        wanted = [r.subscription for r in self.table if r.name in routed]
        if wanted and wanted != current:
            consumer.subscribe(wanted, on_assign=_log_assignment)
            log.info("subscribed to %s", ", ".join(wanted))
            return wanted
        return current

    def _check_topics(self) -> None:
        try:
            self.ensure_topics()
        except Exception as exc:  # noqa: BLE001  (a slow admin call must not stop the bridge)
            log.warning("could not check start topics: %s", exc)
            self._topics_checked = time.monotonic()

    def _handle(self, consumer: Consumer, msgs: list[Message], celery_producer: Any) -> bool:
        """Publish or dead-letter a batch, then commit; False when something must be
        retried (its partition was rewound)."""
        done: dict[tuple[str, int], int] = {}
        redo: dict[tuple[str, int], int] = {}
        calls: list[tuple[tuple[str, int], int, TaskCall]] = []
        dead: list[tuple[tuple[str, int], int]] = []
        failed_dlq: list[tuple[tuple[str, int], int]] = []
        starts: dict[str | None, StartRecord] = {}
        for m in msgs:
            if m.error() is not None:
                log.warning("consumer error: %s", m.error())
                continue
            tp, offset = _position(m)
            if tp in redo:
                continue  # keep a partition in order: everything after a failure is redone
            try:
                call = self.router.call(tp[0], m.value(), clients.header_dict(m.headers()),
                                        clients.repeated_headers(m.headers()))
                _check_batch(starts, call)
                calls.append((tp, offset, call))
            except Rejected as exc:
                self._dead_letter(m, exc, failed_dlq)
                dead.append((tp, offset))
            except Exception as exc:  # noqa: BLE001  (the database is unreachable: retry)
                log.warning("cannot route %s[%d]@%d, will retry: %s", *tp, offset, exc)
                redo[tp] = offset
                continue
            done[tp] = offset + 1
        if calls and not self._publish_all(calls, celery_producer):
            for tp, offset, _ in calls:  # the broker is down: all of them again
                redo[tp] = min(redo.get(tp, offset), offset)
        if dead:
            unconfirmed = self.producer.flush(30)
            if self._too_large:  # the broker's limit is lower than ours: cut them short
                for big, why in self._too_large:
                    self._dead_letter(big, why, failed_dlq, cut=True)
                self._too_large.clear()
                unconfirmed = self.producer.flush(30)
            if unconfirmed:  # not all confirmed: redo them all, to be sure
                failed_dlq = list(dead)
            for tp, offset in failed_dlq:
                redo[tp] = min(redo.get(tp, offset), offset)
            self.stats.dead_lettered += len(dead) - len(failed_dlq)
        commits = [TopicPartition(t, p, min(off, redo.get((t, p), off)))
                   for (t, p), off in done.items()]
        if commits:
            try:
                consumer.commit(offsets=commits, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit failed (the messages will be read again): %s", exc)
        for (t, p), off in redo.items():
            consumer.seek(TopicPartition(t, p, off))
        return not redo

    def _publish_all(self, calls: list[tuple[tuple[str, int], int, TaskCall]],
                     producer: Any) -> bool:
        """Publish the batch's tasks (see :mod:`chassis.kafka.publish`); False when the
        broker refused them."""
        try:
            self.publisher.publish(producer, [call for _, _, call in calls])
        except Exception as exc:  # noqa: BLE001  (the Celery broker is down: retry)
            log.warning("cannot publish %d tasks, will retry: %s", len(calls), exc)
            return False
        for _, _, call in calls:
            self.stats.by_task[call.task] = self.stats.by_task.get(call.task, 0) + 1
            log.debug("published %s", call.task, extra={"correlation_id": call.correlation_id})
        self.stats.published += len(calls)
        return True

    # ------------------------------------------------------------ dead letters

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(clients.producer_config(self.bootstrap))
        return self._producer

    def _dead_letter(self, m: Message, exc: Rejected,
                     failed: list[tuple[tuple[str, int], int]], cut: bool = False) -> None:
        """Put ``m`` on the dead-letter topic with the reason; never raises. A message
        too large to be sent again with the reason headers (it was at the size limit)
        goes with its value and key cut to :data:`DLQ_KEEP_BYTES` (and its own headers
        left out if they are larger than that), saying so in ``dlq_truncated`` (the
        original size of value and key): the poison is set aside
        either way, and never stops the bridge."""
        tp, offset = _position(m)
        reason = clients.encode_headers({
            "dlq_reason": exc.reason, "dlq_detail": exc.detail[:DLQ_DETAIL_MAX],
            "source_topic": tp[0], "source_partition": tp[1], "source_offset": offset})

        def delivered(err: Any, _msg: Any) -> None:
            if err is None:
                return
            if not cut and err.code() in _TOO_LARGE:
                self._too_large.append((m, exc))  # sent again cut short, after the flush
                return
            log.warning("dead letter of %s[%d]@%d not delivered: %s", *tp, offset, err)
            failed.append((tp, offset))

        if not cut:
            log.warning("dead letter %s[%d]@%d: %s", *tp, offset, exc,
                        extra={"correlation_id": clients.header_dict(m.headers())
                               .get("correlation_id")})
        value, key = m.value(), m.key()
        attempts = [] if cut else [(value, key, clients.message_headers(m.headers()) + reason)]
        size = len(value or b"") + len(key or b"")
        own = clients.message_headers(m.headers())
        if sum(len(k) + len(v or b"") for k, v in own) > DLQ_KEEP_BYTES:
            own = []  # (the headers are what is too large)
        attempts.append(((value or b"")[:DLQ_KEEP_BYTES], (key or b"")[:DLQ_KEEP_BYTES],
                         own + reason + clients.encode_headers({"dlq_truncated": size})))
        for value, key, headers in attempts:
            try:
                self._produce(value, key, headers, delivered)
                return
            except (KafkaException, BufferError, ValueError, TypeError) as error:
                log.warning("dead letter of %s[%d]@%d refused by the producer (%s)%s",
                            *tp, offset, error,
                            "" if headers is attempts[-1][2] else "; sending it cut short")
        failed.append((tp, offset))  # kept, and tried again after a pause

    def _produce(self, value: bytes | None, key: bytes | None, headers: Any,
                 delivered: Callable[[Any, Any], None]) -> None:
        topic = self.settings.kafka_dlq_topic
        try:
            self.producer.produce(topic, value=value, key=key, headers=headers,
                                  on_delivery=delivered)
        except BufferError:  # the local queue is full: let it drain, once
            self.producer.poll(1)
            self.producer.produce(topic, value=value, key=key, headers=headers,
                                  on_delivery=delivered)
        self.producer.poll(0)


def _check_batch(starts: dict[str | None, StartRecord], call: TaskCall) -> None:
    """Two starts of one correlation_id in a batch must be the same start: the database
    cannot tell (neither is written yet), so the second, different one is a conflict."""
    record = start_record(call)
    if record is None:
        return
    first = starts.setdefault(call.correlation_id, record)
    if first != record:
        raise Rejected(CONFLICT, f"correlation id {call.correlation_id} is started twice "
                                 "in a row with another plan, input or budget")


def _position(m: Message) -> tuple[tuple[str, int], int]:
    """((topic, partition), offset) of a consumed message."""
    return (m.topic() or "", m.partition() or 0), m.offset() or 0


def _log_assignment(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
    log.info("assigned %d partitions: %s", len(partitions),
             ", ".join(sorted({p.topic for p in partitions})))
