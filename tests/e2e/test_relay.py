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


def relay_setup(db_url: str, kafka_bootstrap: str, tmp_path: Any) -> tuple[str, Any]:
    """A new topic, and the settings of a relay from this database to this Kafka."""
    return f"test.relay.{uuid.uuid4().hex[:8]}", config.load({
        "CHASSIS_DATABASE_URL": db_url, "CHASSIS_HOME": str(tmp_path),
        "CHASSIS_KAFKA_BOOTSTRAP": kafka_bootstrap})


def test_relay_publishes_in_order_and_marks_rows(db_url: str, kafka_bootstrap: str,
                                                 tmp_path: Any) -> None:
    topic, settings = relay_setup(db_url, kafka_bootstrap, tmp_path)
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


def test_a_row_kafka_refuses_is_set_aside_and_blocks_nothing(db_url: str, kafka_bootstrap: str,
                                                             tmp_path: Any) -> None:
    topic, settings = relay_setup(db_url, kafka_bootstrap, tmp_path)
    cids = fill_outbox(db_url, topic, workflows=3, messages=5)
    huge = cids[1]
    with make_engine(db_url).begin() as conn:  # one message of 2 MB, in the middle
        conn.execute(outbox.insert().values(
            correlation_id=huge, topic=topic, key=huge, headers={"correlation_id": huge},
            payload={"correlation_id": huge, "seq": 99, "blob": "x" * 2_000_000},
            dedup_key=f"{huge}:huge", created_at=datetime.now(UTC)))
    cids_after = fill_outbox(db_url, topic, workflows=2, messages=3)
    relay = OutboxRelay(settings, batch_size=4)

    relay.drain()
    assert relay.drain() == 0  # it does not come back for it

    with make_engine(db_url).connect() as conn:
        rows = conn.execute(sa.select(outbox.c.dedup_key, outbox.c.published_at,
                                      outbox.c.failed_at, outbox.c.last_error)
                            .where(outbox.c.topic == topic)).all()
    refused = [r for r in rows if r.failed_at is not None]
    assert [r.dedup_key for r in refused] == [f"{huge}:huge"]
    assert "too large" in refused[0].last_error.lower()
    assert all(r.published_at is not None for r in rows if r.failed_at is None)
    msgs = read_topic(kafka_bootstrap, topic, lambda ms: len(
        {(json_of(m)["correlation_id"], json_of(m)["seq"]) for m in ms}) >= 5 * 3 + 3 * 2,
        timeout=90)
    for group, n in ((cids, 5), (cids_after, 3)):
        mine = [m for m in msgs if json_of(m)["correlation_id"] in group]
        assert_in_order(mine, group, n)
    assert not any(json_of(m).get("seq") == 99 for m in msgs)


def test_a_workflow_with_a_2_mb_output_sends_a_small_event(kafka: KafkaServices) -> None:
    """The WORKFLOW_COMPLETED event carries a reference, not the 2 MB: it is published,
    and so are the other workflows' events."""
    import tests.integration.user_actions  # noqa: F401  (the client validates 'big')
    from chassis.coordinator import NOTIFICATION_TOPIC

    for w in kafka.workers:  # this test's worker knows the action 'big'
        if "test-" in w.log.name:
            w.stop()
    kafka.start_worker(CHASSIS_ACTION_MODULES="tests.integration.user_actions")
    if not any("relay" in w.log.name and w.proc.poll() is None for w in kafka.workers):
        kafka.relay()
    client = Client(config.load(kafka.env), client_id="acme")
    big = client.start({"start_step": "a", "steps": {
        "a": {"action": "big", "params": {"size": 2_000_000}, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}, None)
    small = client.start({"start_step": "done", "steps": {
        "done": {"action": "complete_workflow"}}}, {"n": 1})
    assert client.wait(big, timeout=60)["status"] == "COMPLETED"
    assert client.wait(small, timeout=60)["status"] == "COMPLETED"

    def both(ms: list[Message]) -> bool:
        return {big, small} <= {json_of(m).get("correlation_id") for m in ms
                                if json_of(m).get("event_type") == "WORKFLOW_COMPLETED"}

    msgs = read_topic(kafka.bootstrap, NOTIFICATION_TOPIC, both, timeout=60)
    event = next(json_of(m) for m in msgs if json_of(m).get("correlation_id") == big)
    assert event["final_result"]["truncated"] is True
    assert event["final_result"]["see"] == f"chassis status {big}"
    assert event["final_result"]["bytes"] > 2_000_000
    assert len(client.status(big)["final_result"]["a"]["blob"]) == 2_000_000
