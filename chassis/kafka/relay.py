"""The outbox relay: publish the outbox table's rows to Kafka, in order, at least once.

Every outgoing message (an external step's TaskRequest, a notification, a completion
or failure event) was written to ``outbox`` in the transaction of the state change
that decided it. The relay reads unpublished rows in id order, produces them with an
idempotent producer (key = correlation_id, so one workflow's messages share a
partition and keep their order), waits until Kafka confirms them (flush), and only
then marks them published, in the same transaction that read them.

A crash between delivery and the commit publishes those rows again on restart
(at-least-once, consumers dedupe by request_id / event); it never loses one. On
PostgreSQL the rows are read ``FOR UPDATE SKIP LOCKED`` and the lock is held until
delivery is confirmed, so concurrent relays share the work without publishing a row
twice; a row whose workflow has an earlier row held by another relay waits for the
next round, so a workflow's messages stay in order. SQLite has no row locks: run one
relay there.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from confluent_kafka import KafkaError, KafkaException, Producer

from chassis.config import Settings
from chassis.kafka import clients
from chassis.store.db import make_engine
from chassis.store.tables import outbox

log = logging.getLogger(__name__)

#: Seconds to wait for Kafka to confirm a batch; unconfirmed rows are tried again.
FLUSH_TIMEOUT = 30.0
MAX_BACKOFF = 5.0


class OutboxRelay:
    """Publishes outbox rows; one per process (the producer is not shared across forks)."""

    def __init__(self, settings: Settings, *, batch_size: int | None = None,
                 producer: Producer | None = None) -> None:
        self.settings = settings
        self.bootstrap = clients.require_bootstrap(settings)
        self.engine = make_engine(settings.database_url)
        self.locking = self.engine.dialect.name == "postgresql"
        self.batch_size = batch_size or settings.relay_batch_size
        self._producer = producer
        self._topics: set[str] = set()
        self.published = 0
        self.last_rows = 0

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(clients.producer_config(self.bootstrap))
        return self._producer

    def publish_batch(self) -> int:
        """Publish up to ``batch_size`` rows; the number published."""
        with self.engine.begin() as conn:
            q = (sa.select(outbox.c.id, outbox.c.correlation_id, outbox.c.topic,
                           outbox.c.key, outbox.c.headers, outbox.c.payload)
                 .where(outbox.c.published_at.is_(None), outbox.c.failed_at.is_(None))
                 .order_by(outbox.c.id).limit(self.batch_size))
            if self.locking:
                q = q.with_for_update(skip_locked=True)
            rows: list[Any] = list(conn.execute(q).all())
            self.last_rows = len(rows)  # a full batch: there may be more
            if self.locking and rows:
                rows = _in_workflow_order(conn, rows)
            if not rows:
                return 0
            errors = self._produce(rows)
            ts = datetime.now(UTC)
            ok = [r.id for r in rows if r.id in errors and errors[r.id] is None]
            if ok:
                conn.execute(outbox.update().where(outbox.c.id.in_(ok))
                             .values(published_at=ts, attempts=outbox.c.attempts + 1))
            for row_id, err in errors.items():
                if err is None:
                    continue
                for_good = isinstance(err, Refused)
                conn.execute(outbox.update().where(outbox.c.id == row_id).values(
                    attempts=outbox.c.attempts + 1, last_error=str(err)[:2000],
                    failed_at=ts if for_good else None))
                if for_good:
                    log.error("relay: outbox row %d set aside, Kafka refuses it for good: "
                              "%s", row_id, err)
        self.published += len(ok)
        if len(ok) < len(rows):
            log.warning("relay: %d of %d messages not confirmed; they will be sent again",
                        len(rows) - len(ok), len(rows))
        return len(ok)

    def _produce(self, rows: list[Any]) -> dict[int, str | Refused | None]:
        """Produce the rows and wait for Kafka; row id → None (delivered), the error
        (to try again), or :class:`Refused` (Kafka will never take it). Rows missing from
        the answer were not confirmed in time."""
        new = {r.topic for r in rows} - self._topics
        if new:
            clients.ensure_topics(self.bootstrap, new)
            self._topics |= new
        results: dict[int, str | Refused | None] = {}
        producer = self.producer
        for r in rows:
            def delivered(err: Any, _msg: Any, row_id: int = r.id) -> None:
                results[row_id] = None if err is None else _judge(err)

            value = json.dumps(r.payload).encode()
            key = str(r.correlation_id or r.key or "") or None
            while True:
                try:
                    producer.produce(r.topic, value=value, key=key,
                                     headers=clients.encode_headers(r.headers or {}),
                                     on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: let deliveries drain
                    producer.poll(0.1)
                except KafkaException as exc:  # refused at once (too large, bad topic)
                    results[r.id] = _judge(exc.args[0] if exc.args else exc)
                    break
        producer.flush(FLUSH_TIMEOUT)
        return results

    def drain(self, max_batches: int = 100) -> int:
        """Publish until the outbox is empty (or ``max_batches``); the number published."""
        total = 0
        for _ in range(max_batches):
            total += self.publish_batch()
            if self.last_rows < self.batch_size:
                break
        return total

    def run(self, stop: threading.Event | None = None) -> int:
        """Publish until ``stop`` is set; waits ``relay_poll_interval`` when idle."""
        stop = stop or threading.Event()
        backoff = 0.0
        log.info("relay publishing the outbox of %s to %s", self.engine.url.render_as_string(
            hide_password=True), self.bootstrap)
        while not stop.is_set():
            try:
                n = self.publish_batch()
                backoff = 0.0
            except Exception as exc:  # noqa: BLE001  (database or Kafka away: try again)
                backoff = min(MAX_BACKOFF, max(0.2, backoff * 2))
                log.warning("relay: %s; retrying in %.1f s", exc, backoff)
                stop.wait(backoff)
                continue
            if n == 0 or self.last_rows < self.batch_size:
                stop.wait(self.settings.relay_poll_interval)
        if self._producer is not None:
            self._producer.flush(FLUSH_TIMEOUT)
        return self.published


class Refused(str):
    """Kafka refuses the message for good (too large, invalid topic, not authorised):
    sending it again would fail again."""


#: Errors about the message itself: sending it again would fail again. Any other error
#: (a broker away, a timeout, a leader election) is tried again.
_FOR_GOOD = frozenset(getattr(KafkaError, name) for name in (
    "MSG_SIZE_TOO_LARGE", "_MSG_SIZE_TOO_LARGE", "INVALID_MSG_SIZE", "RECORD_LIST_TOO_LARGE",
    "TOPIC_EXCEPTION",
    "INVALID_TOPIC_EXCEPTION", "TOPIC_AUTHORIZATION_FAILED", "INVALID_RECORD", "INVALID_MSG",
    "_INVALID_ARG") if hasattr(KafkaError, name))


def _judge(err: Any) -> str | Refused:
    """A delivery error: Refused when it is permanent, else its text (try again)."""
    code = getattr(err, "code", None)
    if callable(code) and code() in _FOR_GOOD:
        return Refused(str(err))
    return str(err)


def _in_workflow_order(conn: sa.Connection, rows: list[Any]) -> list[Any]:
    """Drop the rows that another relay's earlier, still unpublished row of the same
    workflow must precede (that relay holds its lock; this row waits a round)."""
    ours = {r.id for r in rows}
    cids = {r.correlation_id for r in rows if r.correlation_id is not None}
    if not cids:
        return rows
    earlier = conn.execute(
        sa.select(outbox.c.id, outbox.c.correlation_id)
        .where(outbox.c.published_at.is_(None), outbox.c.failed_at.is_(None),
               outbox.c.correlation_id.in_(cids),
               outbox.c.id <= max(ours))
        .order_by(outbox.c.id)).all()
    blocked: set[str] = set()
    held: set[int] = set()
    for row_id, cid in earlier:
        if row_id not in ours:
            blocked.add(cid)
        elif cid in blocked:
            held.add(row_id)
    return [r for r in rows if r.id not in held]


_shared: OutboxRelay | None = None


def relay_once(settings: Settings) -> int:
    """Body of the ``chassis.relay`` beat task: drain the outbox with this process's relay."""
    global _shared
    if _shared is None or _shared.settings != settings:
        _shared = OutboxRelay(settings)
    return _shared.drain()


def reset() -> None:
    """Forget the process's relay (after a fork)."""
    global _shared
    _shared = None
