"""The outbox relay against a real broker: order per workflow, at-least-once across a
SIGKILL, no double publishing by concurrent relays (PostgreSQL), the beat task."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Message

from chassis import config
from chassis.api import Client
from chassis.kafka.relay import OutboxRelay
from chassis.store.db import make_engine
from chassis.store.tables import outbox
from tests.e2e.conftest import KafkaServices, headers_of, json_of, read_topic
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(180)


def fill_outbox(url: str, topic: str, workflows: int, messages: int) -> list[str]:
    """``messages`` rows for each of ``workflows`` workflows, interleaved by id."""
    cids = [str(uuid.uuid4()) for _ in range(workflows)]
    ts = datetime.now(UTC)
    rows = [{"correlation_id": cid, "topic": topic, "key": cid,
             "headers": {"correlation_id": cid, "seq": str(seq)},
             "payload": {"correlation_id": cid, "seq": seq},
             "dedup_key": f"{cid}:{seq}", "created_at": ts}
            for seq in range(messages) for cid in cids]
    with make_engine(url).begin() as conn:
        conn.execute(outbox.insert(), rows)
    return cids


def unpublished(url: str, topic: str) -> int:
    with make_engine(url).connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(outbox).where(
            outbox.c.topic == topic, outbox.c.published_at.is_(None))).scalar_one()


def read_all(bootstrap: str, topic: str, cids: list[str], messages: int) -> list[Message]:
    want = len(cids) * messages

    def complete(ms: list[Message]) -> bool:
        return len({(json_of(m)["correlation_id"], json_of(m)["seq"]) for m in ms}) >= want

    return read_topic(bootstrap, topic, complete, timeout=90)


def assert_in_order(msgs: list[Message], cids: list[str], messages: int) -> None:
    """Every workflow's messages all there, first occurrences in order, keyed by it."""
    seen: dict[str, list[int]] = {cid: [] for cid in cids}
    for m in msgs:
        doc = json_of(m)
        assert m.key() == doc["correlation_id"].encode()
        assert headers_of(m)["seq"] == str(doc["seq"])
        if doc["seq"] not in seen[doc["correlation_id"]]:
            seen[doc["correlation_id"]].append(doc["seq"])
    for cid, seqs in seen.items():
        assert seqs == list(range(messages)), cid


def test_relay_publishes_in_order_and_marks_rows(db_url: str, kafka_bootstrap: str,
                                                 tmp_path: Any) -> None:
    topic = f"test.relay.{uuid.uuid4().hex[:8]}"
    settings = config.load({"CHASSIS_DATABASE_URL": db_url, "CHASSIS_HOME": str(tmp_path),
                            "CHASSIS_KAFKA_BOOTSTRAP": kafka_bootstrap})
    cids = fill_outbox(db_url, topic, workflows=5, messages=40)
    relay = OutboxRelay(settings, batch_size=64)

    assert relay.drain() == 200
    assert relay.drain() == 0

    assert unpublished(db_url, topic) == 0
    msgs = read_all(kafka_bootstrap, topic, cids, 40)
    assert len(msgs) == 200
    assert_in_order(msgs, cids, 40)
    with make_engine(db_url).connect() as conn:
        assert conn.execute(sa.select(sa.func.min(outbox.c.attempts))).scalar_one() == 1


def test_relay_killed_midway_loses_and_reorders_nothing(kafka: KafkaServices) -> None:
    url, topic = kafka.env["CHASSIS_DATABASE_URL"], f"test.relay.{uuid.uuid4().hex[:8]}"
    workflows, messages = 20, 150
    cids = fill_outbox(url, topic, workflows, messages)
    total = workflows * messages
    relay = kafka.relay(CHASSIS_RELAY_BATCH_SIZE="20")

    wait_until(lambda: unpublished(url, topic) <= total - 300, timeout=60,
               message="the relay published nothing")
    relay.kill()
    assert unpublished(url, topic) > 0, "too late: the relay had published everything"
    kafka.relay(CHASSIS_RELAY_BATCH_SIZE="20")
    wait_until(lambda: unpublished(url, topic) == 0, timeout=90,
               message="the restarted relay did not publish the rest")

    msgs = read_all(kafka.bootstrap, topic, cids, messages)
    assert_in_order(msgs, cids, messages)
    assert len(msgs) <= total + 20  # at most the one batch in flight again


def test_concurrent_relays_publish_each_row_once(kafka: KafkaServices) -> None:
    url, topic = kafka.env["CHASSIS_DATABASE_URL"], f"test.relay.{uuid.uuid4().hex[:8]}"
    for w in kafka.workers:  # relays of earlier tests
        if "relay" in w.log.name:
            w.stop()
    workflows, messages = 30, 100
    first = kafka.relay(CHASSIS_RELAY_BATCH_SIZE="25")
    second = kafka.relay(CHASSIS_RELAY_BATCH_SIZE="25")
    cids = fill_outbox(url, topic, workflows, messages)

    wait_until(lambda: unpublished(url, topic) == 0, timeout=90,
               message="the relays did not publish everything")

    msgs = read_all(kafka.bootstrap, topic, cids, messages)
    assert len(msgs) == workflows * messages  # no row twice
    assert_in_order(msgs, cids, messages)
    first.stop()
    second.stop()
    shares = [int(re.search(r"relay stopped: (\d+) messages", w.text()).group(1))  # type: ignore[union-attr]
              for w in (first, second)]
    assert all(shares), f"one relay did all the work: {shares}"


def test_beat_task_publishes_the_outbox(kafka: KafkaServices) -> None:
    url, topic = kafka.env["CHASSIS_DATABASE_URL"], f"test.relay.{uuid.uuid4().hex[:8]}"
    for w in kafka.workers:
        if "relay" in w.log.name:
            w.stop()
    if not any("test-" in w.log.name and w.proc.poll() is None for w in kafka.workers):
        kafka.start_worker()
    cids = fill_outbox(url, topic, workflows=3, messages=10)

    Client(config.load(kafka.env)).app.send_task("chassis.relay")

    wait_until(lambda: unpublished(url, topic) == 0, timeout=60,
               message="the chassis.relay task did not publish the outbox")
    assert_in_order(read_all(kafka.bootstrap, topic, cids, 10), cids, 10)
