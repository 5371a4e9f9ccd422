"""The embedded broker (chassis.filebroker), as Celery is configured to use it: every
message published while consumers in other processes poll the folder is delivered,
whole, exactly once. kombu's own file-system transport lost about 1 in 300 here (a
consumer took a file created but not yet written)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from chassis.celery_conf import celery_settings
from chassis.config import load

pytestmark = pytest.mark.timeout(120)

MESSAGES = 3000
CONSUMERS = 2
PAD = "x" * 2000  # a write that takes a little while


def _app(home: str) -> Celery:
    app = Celery("broker-test")
    app.conf.update(celery_settings(load({"CHASSIS_HOME": home})))
    return app


def _publish(home: str) -> None:
    app = _app(home)
    with app.producer_or_acquire() as producer:
        queue = app.amqp.queues["steps"]
        for i in range(MESSAGES):
            producer.publish({"i": i, "pad": PAD}, exchange=queue.exchange,
                             routing_key=queue.routing_key, declare=[queue])


def _consume(home: str, ready: Any, done: Any, out: Any) -> None:
    app = _app(home)
    got: list[int] = []
    errors: list[str] = []
    with app.connection_for_read() as conn:
        queue = app.amqp.queues["steps"](conn.default_channel)
        queue.declare()
        ready.set()
        while True:
            last_round = done.is_set()  # (before the look: nothing is sent after it)
            try:
                message = queue.get(no_ack=True)
            except Exception as exc:  # a message read half written: the defect
                errors.append(repr(exc))
                continue
            if message is not None:
                assert message.payload["pad"] == PAD
                got.append(message.payload["i"])
            elif last_round:
                break
    out.put((got, errors))


def test_messages_published_while_others_poll_arrive_whole_and_once(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    conf = celery_settings(load({"CHASSIS_HOME": home}))
    assert conf["broker_transport"] == "chassis-files"
    ctx = mp.get_context("spawn")
    done, out = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(CONSUMERS)]
    consumers = [ctx.Process(target=_consume, args=(home, r, done, out)) for r in readies]
    for p in consumers:
        p.start()
    for r in readies:
        assert r.wait(60), "a consumer did not start"
    _publish(home)
    done.set()  # each consumer drains the queue, then stops
    results = [out.get(timeout=60) for _ in consumers]
    for p in consumers:
        p.join(30)
    received = [i for got, _ in results for i in got]
    errors = [e for _, errs in results for e in errs]
    assert errors == []
    assert sorted(received) == list(range(MESSAGES))  # none lost, none twice
    assert all(got for got, _ in results), "one consumer took everything"
    queue_dir = Path(home) / "broker" / "queue"
    assert os.listdir(queue_dir) == [] and os.listdir(Path(home) / "broker" / "taken") == []
