#!/usr/bin/env python3
"""An example external agent, as the original platform's Go agents were.

It consumes TaskRequests {action, data, params} from a request topic and answers each
with a TaskResponse {success, data, error} on a response topic, copying
correlation_id (and client_id, project_id) and setting causation_id to the request's
request_id: that is how agentchassis knows which step the answer is for.

    python examples/agent.py --bootstrap localhost:9092 \\
        --requests system.agent.research.requests --responses system.responses.research

Its "research" is canned text built from the request; replace ``work`` with a real one.
Offsets are committed after the answer is delivered, so a crash answers again
(agentchassis ignores a duplicate answer).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger("agent")


def work(request: dict[str, Any]) -> dict[str, Any]:
    """The agent's job: here, a canned summary of what it was asked."""
    question = (request.get("data") or {}).get("input") or request.get("params")
    return {"action": request.get("action"),
            "summary": f"Findings on {json.dumps(question)}: three sources agree.",
            "sources": ["https://example.org/a", "https://example.org/b"]}


def answer(value: bytes | None) -> dict[str, Any]:
    try:
        return {"success": True, "data": work(json.loads(value or b"{}")), "error": None}
    except Exception as exc:  # noqa: BLE001  (report any failure to the workflow)
        return {"success": False, "data": None, "error": f"agent failed: {exc}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", default=os.environ.get("CHASSIS_KAFKA_BOOTSTRAP",
                                                         "localhost:9092"))
    p.add_argument("--requests", default="system.agent.research.requests")
    p.add_argument("--responses", default="system.responses.research")
    p.add_argument("--group", default="research-agent")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent: %(message)s")

    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    existing = admin.list_topics(timeout=10).topics
    missing = [NewTopic(t, 3, 1) for t in (args.requests, args.responses) if t not in existing]
    for future in (admin.create_topics(missing) if missing else {}).values():
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001  (created meanwhile by someone else)
            log.info("%s", exc)

    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "session.timeout.ms": 6000, "max.poll.interval.ms": 7000})
    producer = Producer({"bootstrap.servers": args.bootstrap, "enable.idempotence": True})
    consumer.subscribe([args.requests])
    running = True

    def stop(*_: Any) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("answering %s on %s", args.requests, args.responses)
    while running:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        h = {k: (v or b"").decode() for k, v in msg.headers() or []}
        headers = {"correlation_id": h.get("correlation_id", ""),
                   "causation_id": h.get("request_id", ""),
                   "client_id": h.get("client_id", ""), "project_id": h.get("project_id", "")}
        if h.get("traceparent"):  # the workflow's trace: the answer goes on in it
            headers["traceparent"] = h["traceparent"]
        producer.produce(args.responses, key=msg.key(), value=json.dumps(answer(msg.value())),
                         headers=[(k, v.encode()) for k, v in headers.items()])
        producer.flush(30)
        consumer.commit(message=msg, asynchronous=False)
        log.info("answered request %s of workflow %s", headers["causation_id"],
                 headers["correlation_id"])
    consumer.close()


if __name__ == "__main__":
    main()
