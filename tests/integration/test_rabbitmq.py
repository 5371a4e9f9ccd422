"""The queues on RabbitMQ (a vhost of its own on the local server): one direct exchange,
each queue bound by its own name, so one publish reaches one queue; tasks go to the
queue their route names, and a task sent without a queue reaches `chassis.steps`."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from kombu import Connection, Producer

from chassis import config
from chassis.celery_conf import (
    AI_QUEUE,
    COORDINATION_QUEUE,
    EXCHANGE,
    STEPS_QUEUE,
    celery_settings,
)
from tests.helpers import require_service

pytestmark = pytest.mark.timeout(60)

QUEUES = (COORDINATION_QUEUE, STEPS_QUEUE, AI_QUEUE)
BASE = os.environ.get("CHASSIS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh vhost (rabbitmqctl on this machine), deleted afterwards."""
    ok, why = shutil.which("rabbitmqctl") is not None, "rabbitmqctl is not installed"
    if ok:
        try:
            with Connection(f"{BASE}//", connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1)
        except Exception as exc:  # noqa: BLE001  (any failure: the server is not there)
            ok, why = False, f"cannot connect to {BASE}: {exc}"
    require_service("RabbitMQ", ok, why)
    name = f"chassis_test_{uuid.uuid4().hex[:8]}"
    assert _ctl("add_vhost", name).returncode == 0
    assert _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*").returncode == 0
    yield name
    _ctl("delete_vhost", name)


def depths(conn: Connection) -> dict[str, int]:
    ch = conn.channel()
    try:
        return {q: ch.queue_declare(q, passive=True).message_count for q in QUEUES}
    finally:
        ch.close()


def test_one_publish_lands_in_one_queue(vhost: str) -> None:
    settings = config.load({"CHASSIS_BROKER_URL": f"{BASE}/{vhost}"})
    app = Celery("rabbit-test", set_as_current=False)
    app.conf.update(celery_settings(settings))
    try:
        with app.connection_for_write() as conn:
            for q in app.amqp.queues.values():  # as a worker declares them
                q(conn.default_channel).declare()
            assert depths(conn) == dict.fromkeys(QUEUES, 0)
            producer = Producer(conn.default_channel)
            for q in QUEUES:  # straight to the exchange, by routing key
                producer.publish({"x": 1}, exchange=EXCHANGE.name, routing_key=q)
            assert depths(conn) == dict.fromkeys(QUEUES, 1)
            # tasks: routed by name; one without a route goes to chassis.steps
            app.send_task("chassis.resume", args=["00000000-0000-0000-0000-000000000000"])
            app.send_task("chassis.step", args=[{}])
            app.send_task("chassis.ai_step", args=[{}])
            app.send_task("someone.elses.task", args=[])
            assert depths(conn) == {COORDINATION_QUEUE: 2, STEPS_QUEUE: 3, AI_QUEUE: 2}
    finally:
        app.close()
