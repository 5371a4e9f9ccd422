"""The agent runtime (``chassis agent``): serve registered actions as a Kafka agent, as
the original platform's ``agentbase`` did, without losing work.

It consumes TaskRequests ``{action, data, params}`` from the agent's request topic,
runs the registered action the request names (the same registry, templates and Claude
actions as Celery steps) and answers each with a TaskResponse ``{success, data, error,
error_type}`` on its response topic, with the headers the coordinator matches:
``correlation_id``, ``causation_id`` (the request's ``request_id``), ``client_id``,
``project_id`` and ``traceparent``.

At least once, never lost: a request's offset is committed only after its answer is
delivered (acknowledged by the broker); a crash or a rebalance answers again what was
not committed, and the coordinator ignores an answer it already has. Requests run on a
bounded pool of ``concurrency`` threads, one partition's requests in order (a partition
is a lane: its next request starts when the one before is answered); the consumer
pauses when ``concurrency * BUFFER_PER_THREAD`` requests wait. A request that cannot be
answered (not JSON, not an object, without the ids an answer needs) goes to the
dead-letter topic with a ``dlq_reason`` header and the agent goes on. An action that
raises, or an action it does not have, is answered ``success: false`` with the error
and its type: the workflow's retry policy (the coordinator's) decides what follows.
SIGTERM stops taking requests, lets those running finish and be answered and hands the
others back (uncommitted: the group's next member answers them).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from chassis import actions, tracing
from chassis.config import Settings
from chassis.engine import error_types
from chassis.errors import ConfigError, ServiceUnavailable
from chassis.kafka import clients
from chassis.limits import MESSAGE_MAX, check_json

log = logging.getLogger(__name__)

#: Requests a pool thread may have waiting before the consumer pauses.
BUFFER_PER_THREAD = 16
#: Seconds between two tries to deliver an answer the broker did not take.
REDELIVER_WAIT = 1.0
#: Seconds a stopping agent keeps trying to deliver the answers of the requests that
#: were running (then they are handed back: answered again by the group's next member).
SHUTDOWN_GRACE = 30.0
#: Seconds without a turn of the main loop after which /health says it is stuck.
STUCK_AFTER = 30.0
#: Seconds for which a successful look at Kafka keeps /ready ready.
KAFKA_FRESH = 30.0
_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


# ------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AgentConfig:
    """Where an agent listens and answers (see :func:`agent_config`)."""

    agent_type: str
    topic: str
    responses: str
    group: str
    concurrency: int = 8
    health_port: int = 8080
    """0: no health server."""
    dlq: str = "dlq.chassis"
    modules: tuple[str, ...] = ()


#: The options, their variables and their names in a config file (the original's
#: names where it had them).
OPTIONS = {
    "agent_type": ("CHASSIS_AGENT_TYPE", ("agent_type", "type")),
    "topic": ("CHASSIS_AGENT_TOPIC", ("topic",)),
    "responses": ("CHASSIS_AGENT_RESPONSES", ("responses", "response_topic")),
    "group": ("CHASSIS_AGENT_GROUP", ("kafka_consumer_group", "group")),
    "concurrency": ("CHASSIS_AGENT_CONCURRENCY", ("concurrency", "pool_size")),
    "health_port": ("CHASSIS_AGENT_HEALTH_PORT", ("health_port",)),
    "modules": ("CHASSIS_ACTION_MODULES", ("actions",)),
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """An agent's config file (YAML or JSON): a map of the names in :data:`OPTIONS`."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the agent's config file {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"the agent's config file {path} must be a map of settings")
    known = {name for _, names in OPTIONS.values() for name in names}
    unknown = sorted(str(k) for k in doc if k not in known)
    if unknown:
        raise ConfigError(f"the agent's config file {path}: unknown setting(s) "
                          f"{', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out: dict[str, Any] = {}
    for option, (_, names) in OPTIONS.items():
        for name in names:
            if name in doc and doc[name] is not None:
                out[option] = doc[name]
    return out


def _whole(value: Any, what: str, least: int, most: int) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isascii() or not text.isdigit() \
            or not least <= int(text) <= most:
        raise ConfigError(f"{what} must be a whole number from {least} to {most}, got "
                          f"{str(value)[:40]!r}")
    return int(text)


def agent_config(given: Mapping[str, Any], env: Mapping[str, str],
                 file: Mapping[str, Any] | None, settings: Settings) -> AgentConfig:
    """The agent's settings: an option given (``given``, None when not), else its
    variable, else the config file, else the default derived from the type: requests on
    ``system.agent.TYPE.requests``, answers on ``system.responses.TYPE`` (the response
    pattern the bridge reads), group ``TYPE-group``, 8 threads, health on 8080."""
    def pick(option: str) -> Any:
        if given.get(option) not in (None, ""):
            return given[option]
        variable = OPTIONS[option][0]
        if (env.get(variable) or "").strip():
            return env[variable].strip()
        return (file or {}).get(option)

    kind = pick("agent_type")
    if kind is None:
        raise ConfigError("the agent's type is required: --type NAME (or CHASSIS_AGENT_TYPE, "
                          "or agent_type in --config FILE)")
    kind = str(kind).strip()
    if not _TYPE.match(kind):
        raise ConfigError(f"agent type {kind[:60]!r}: use letters, digits, '_', '-' and "
                          "'.', starting with a letter or digit")
    topic = str(pick("topic") or f"system.agent.{kind}.requests")
    responses = str(pick("responses") or f"system.responses.{kind}")
    for what, name in (("request topic", topic), ("response topic", responses)):
        if not re.match(r"^[A-Za-z0-9._-]{1,249}$", name):
            raise ConfigError(f"{what} {name[:60]!r} is not a valid Kafka topic name")
    if not re.match(settings.kafka_response_pattern, responses):
        log.warning("the response topic %s does not match CHASSIS_KAFKA_RESPONSE_PATTERN "
                    "(%s): the bridge will not read the answers", responses,
                    settings.kafka_response_pattern)
    modules = pick("modules") or ()
    if isinstance(modules, str):
        modules = tuple(m.strip() for m in modules.split(",") if m.strip())
    return AgentConfig(
        agent_type=kind, topic=topic, responses=responses,
        group=str(pick("group") or f"{kind}-group"),
        concurrency=_whole(pick("concurrency") or 8, "concurrency", 1, 1024),
        health_port=_whole(pick("health_port") if pick("health_port") is not None else 8080,
                           "health port", 0, 65535),
        dlq=settings.kafka_dlq_topic, modules=tuple(str(m) for m in modules))


# -------------------------------------------------------------------------- metrics


class AgentMetrics:
    """The original's metric names where they fit, on a registry of the agent's own."""

    def __init__(self, agent_type: str, concurrency: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pool_size = Gauge("agent_pool_size", "Threads that run requests", ["agent_type"],
                               registry=r).labels(agent_type)
        self.pool_size.set(concurrency)
        self.in_flight = Gauge("agent_tasks_in_flight", "Requests running now",
                               ["agent_type"], registry=r).labels(agent_type)
        self.received = Counter("agent_tasks_received", "Requests taken from Kafka",
                                ["agent_type"], registry=r).labels(agent_type)
        self.processed = Counter("agent_tasks_processed",
                                 "Requests answered (success, failure) or dead-lettered",
                                 ["agent_type", "outcome"], registry=r)
        self.consumed = Counter("kafka_messages_consumed", "Messages consumed",
                                ["topic"], registry=r)
        self.duration = Histogram("agent_task_duration_seconds",
                                  "Seconds from a request's start to its answer delivered",
                                  ["agent_type"], registry=r).labels(agent_type)
        self.agent_type = agent_type

    def outcome(self, outcome: str) -> None:
        self.processed.labels(self.agent_type, outcome).inc()


# ------------------------------------------------------------------------- requests


class Unusable(Exception):
    """A request no answer can be made for: it goes to the dead-letter topic."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Request:
    action: str
    data: dict[str, Any]
    params: dict[str, Any]
    headers: dict[str, str]


def parse_request(value: bytes | None, headers: Mapping[str, str]) -> Request:
    """A TaskRequest and the headers its answer needs; :class:`Unusable` otherwise."""
    for name in ("correlation_id", "request_id"):
        if not headers.get(name):
            raise Unusable("missing_header", f"the request has no {name} header: no "
                                             "answer could be matched to it")
    try:
        doc = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unusable("bad_json", f"the request is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Unusable("bad_request", "a TaskRequest is a JSON object {action, data, params}")
    action = doc.get("action")
    if not isinstance(action, str) or not action:
        raise Unusable("bad_request", "the request names no action")
    data, params = doc.get("data") or {}, doc.get("params") or {}
    if not isinstance(data, dict) or not isinstance(params, dict):
        raise Unusable("bad_request", "the request's data and params must be objects")
    return Request(action, data, params, dict(headers))


def run(request: Request) -> dict[str, Any]:
    """The TaskResponse of a request: the action's output, or its failure."""
    try:
        fn = actions.get(request.action)
    except Exception as exc:  # noqa: BLE001  (an action this agent does not have)
        return {"success": False, "data": None, "error": str(exc),
                "error_type": type(exc).__name__}
    try:
        output = check_json(fn(request.data, request.params), "the action's output")
    except Exception as exc:  # noqa: BLE001  (a failed attempt, answered as such)
        log.warning("action %s failed: %s", request.action, exc,
                    extra={"correlation_id": request.headers.get("correlation_id")})
        return {"success": False, "data": None, "error": str(exc) or type(exc).__name__,
                "error_type": error_types(exc)[0]}
    return {"success": True, "data": output, "error": None}


def answer_headers(request: Request, traceparent: str | None) -> dict[str, str | None]:
    h = request.headers
    return {"correlation_id": h.get("correlation_id"), "causation_id": h.get("request_id"),
            "client_id": h.get("client_id"), "project_id": h.get("project_id") or None,
            "traceparent": traceparent or h.get("traceparent") or None}


# -------------------------------------------------------------------------- runtime


@dataclass
class _Lane:
    """One partition's requests, answered in order."""

    waiting: deque[Message] = field(default_factory=deque)
    running: bool = False
    generation: int = 0


class AgentRuntime:
    """Consume, run on the pool, answer, commit (see the module docstring)."""

    def __init__(self, settings: Settings, config: AgentConfig) -> None:
        self.settings, self.config = settings, config
        self.bootstrap = clients.require_bootstrap(settings)
        self.metrics = AgentMetrics(config.agent_type, config.concurrency)
        self._lock = threading.Lock()
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._done: queue.Queue[tuple[tuple[str, int], int, int]] = queue.Queue()
        self._buffered = 0
        self._paused = False
        self._stop = threading.Event()  # asked to stop: consume no more
        self._stopping = threading.Event()  # no new request starts
        self._closed = threading.Event()  # the producer is done: nothing more is sent
        self._give_up_at = float("inf")
        self._beat = time.monotonic()
        self._kafka_ok_at = 0.0
        self._assigned: set[tuple[str, int]] = set()
        self.producer = Producer(clients.producer_config(self.bootstrap))

    # ------------------------------------------------------------------ health

    def healthy(self) -> bool:
        return time.monotonic() - self._beat < STUCK_AFTER and not self._stop.is_set()

    def ready(self) -> tuple[bool, str]:
        if not self.healthy():
            return False, "the consumer loop is not running"
        if time.monotonic() - self._kafka_ok_at > KAFKA_FRESH:
            return False, f"Kafka at {self.bootstrap} did not answer lately"
        if not actions.registered():
            return False, "no action is registered (--actions MODULE)"
        return True, (f"consuming {self.config.topic} as {self.config.group}, "
                      f"{len(self._assigned)} partition(s) assigned")

    # --------------------------------------------------------------------- run

    def run(self, stop: threading.Event | None = None,
            on_ready: Callable[[], None] | None = None) -> None:
        """Serve until ``stop`` is set (or SIGTERM, through the command)."""
        if stop is not None:
            self._stop = stop
        try:
            clients.ensure_topics(self.bootstrap, [self.config.topic, self.config.responses,
                                                   self.config.dlq])
        except KafkaException as exc:
            raise ServiceUnavailable(f"cannot reach Kafka at {self.bootstrap}: "
                                     f"{exc.args[0].str() if exc.args else exc}",
                                     service="kafka", recorded=False) from None
        self._kafka_ok_at = time.monotonic()
        consumer = Consumer(clients.consumer_config(self.bootstrap, self.config.group))
        consumer.subscribe([self.config.topic], on_assign=self._on_assign,
                           on_revoke=self._on_revoke, on_lost=self._on_revoke)
        pool = ThreadPoolExecutor(self.config.concurrency,
                                  thread_name_prefix=f"agent-{self.config.agent_type}")
        poller = threading.Thread(target=self._poll_producer, daemon=True,
                                  name="agent-delivery")
        poller.start()
        log.info("agent %s answering %s on %s as group %s, %d threads; dead letters to %s",
                 self.config.agent_type, self.config.topic, self.config.responses,
                 self.config.group, self.config.concurrency, self.config.dlq)
        if on_ready is not None:
            on_ready()
        last_look = time.monotonic()
        try:
            while not self._stop.is_set():
                self._beat = time.monotonic()
                msgs = consumer.consume(64, timeout=0.2)
                for m in msgs:
                    error = m.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", error)
                        continue
                    self._kafka_ok_at = time.monotonic()
                    self.metrics.consumed.labels(m.topic()).inc()
                    self.metrics.received.inc()
                    self._take(m, pool)
                self._commit(consumer)
                self._flow(consumer)
                if time.monotonic() - last_look > 10:
                    last_look = time.monotonic()
                    self._look(consumer)
        finally:
            self._stop.set()
            self._give_up_at = time.monotonic() + SHUTDOWN_GRACE
            self._stopping.set()
            with self._lock:
                waiting = self._buffered
            log.info("agent %s stopping: the running requests finish, %d waiting ones are "
                     "handed back", self.config.agent_type, waiting)
            pool.shutdown(wait=True, cancel_futures=True)  # running ones finish
            self._commit(consumer)
            consumer.close()
            self._closed.set()
            poller.join(15)
            log.info("agent %s stopped", self.config.agent_type)

    def _look(self, consumer: Consumer) -> None:
        """A light look at the cluster, for /ready."""
        try:
            consumer.list_topics(self.config.topic, timeout=5)
            self._kafka_ok_at = time.monotonic()
        except KafkaException as exc:
            log.warning("Kafka does not answer: %s", exc)

    def _take(self, m: Message, pool: ThreadPoolExecutor) -> None:
        tp, _ = _position(m)
        with self._lock:
            lane = self._lanes.setdefault(tp, _Lane())
            lane.waiting.append(m)
            self._buffered += 1
            if lane.running:
                return
            lane.running = True
            generation = lane.generation
        pool.submit(self._drain, tp, generation)

    def _drain(self, tp: tuple[str, int], generation: int) -> None:
        """Answer a lane's requests one after another while it has any."""
        while True:
            with self._lock:
                lane = self._lanes.get(tp)
                if lane is None or lane.generation != generation or not lane.waiting \
                        or self._stopping.is_set():
                    if lane is not None and lane.generation == generation:
                        lane.running = False
                    return
                m = lane.waiting.popleft()
                self._buffered -= 1
            try:
                delivered = self._handle(m)
            except Exception:  # noqa: BLE001  (never lose the lane: log, hand it back)
                log.exception("request %s[%d]@%d failed unexpectedly", *tp, m.offset())
                delivered = False
            if not delivered:  # not answered (stopping): handed back, the lane stops here
                with self._lock:
                    if lane.generation == generation:
                        self._buffered -= len(lane.waiting)
                        lane.waiting.clear()
                        lane.running = False
                return
            self._done.put((tp, _position(m)[1], generation))

    def _handle(self, m: Message) -> bool:
        """Answer one request (or dead-letter it); True once the broker has it."""
        started = time.monotonic()
        headers = clients.header_dict(m.headers())
        try:
            request = parse_request(m.value(), headers)
        except Unusable as exc:
            log.warning("dead letter %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), exc,
                        extra={"correlation_id": headers.get("correlation_id")})
            ok = self._deliver(self.config.dlq, m.value(), m.key(), [
                *clients.message_headers(m.headers()), *clients.encode_headers({
                    "dlq_reason": exc.reason, "dlq_detail": exc.detail[:1000],
                    "source_topic": m.topic(), "source_partition": m.partition(),
                    "source_offset": m.offset()})])
            if ok:
                self.metrics.outcome("dead_letter")
            return ok
        self.metrics.in_flight.inc()
        try:
            with tracing.span(f"agent {request.action}", under=headers.get("traceparent"),
                              attributes={tracing.CID: headers.get("correlation_id"),
                                          tracing.ACTION: request.action,
                                          "chassis.agent_type": self.config.agent_type}
                              ) as span:
                response = run(request)
                if not response["success"]:
                    tracing.failed(span, str(response["error"]), response.get("error_type"))
                traceparent = tracing.traceparent_of(span) if span.is_recording() else None
            value = json.dumps(response).encode()
            if len(value) > MESSAGE_MAX:
                response = {"success": False, "data": None, "error_type": "AnswerTooLarge",
                            "error": f"the action's answer is {len(value)} bytes of JSON, "
                                     f"more than a message may carry ({MESSAGE_MAX})"}
                value = json.dumps(response).encode()
            ok = self._deliver(self.config.responses, value,
                               m.key() or headers["correlation_id"].encode(),
                               clients.encode_headers(answer_headers(request, traceparent)))
        finally:
            self.metrics.in_flight.dec()
        if ok:
            self.metrics.outcome("success" if response["success"] else "failure")
            self.metrics.duration.observe(time.monotonic() - started)
            log.info("answered request %s of workflow %s: %s", headers["request_id"],
                     headers["correlation_id"], "success" if response["success"] else
                     f"failure ({response['error']})",
                     extra={"correlation_id": headers["correlation_id"]})
        return ok

    def _deliver(self, topic: str, value: bytes | None, key: bytes | None,
                 headers: clients.Headers) -> bool:
        """Produce and wait for the broker's acknowledgement, trying again until it
        comes; False when a stopping agent's grace runs out first (the request is
        handed back)."""
        while time.monotonic() < self._give_up_at:
            got = threading.Event()
            errors: list[Any] = []

            def delivered(err: Any, _msg: Any, errors: list[Any] = errors,
                          got: threading.Event = got) -> None:
                if err is not None:
                    errors.append(err)
                got.set()

            try:
                self.producer.produce(topic, value=value, key=key, headers=headers,
                                      on_delivery=delivered)
            except BufferError:
                time.sleep(0.2)
                continue
            except (KafkaException, ValueError, TypeError) as exc:
                log.warning("cannot produce to %s: %s; trying again", topic, exc)
                time.sleep(REDELIVER_WAIT)
                continue
            while not got.wait(0.5):
                if time.monotonic() >= self._give_up_at:
                    return False
            if not errors:
                return True
            log.warning("answer to %s not delivered (%s); trying again", topic, errors[0])
            time.sleep(REDELIVER_WAIT)
        return False

    def _poll_producer(self) -> None:
        """Serve the producer's delivery reports (for the pool's threads) until the
        runtime is closed."""
        while not self._closed.is_set():
            self.producer.poll(0.1)
        self.producer.flush(10)

    # ------------------------------------------------------------- offsets, flow

    def _commit(self, consumer: Consumer) -> None:
        """Commit the offsets after every answered request (a lane answers in order)."""
        upto: dict[tuple[str, int], int] = {}
        while True:
            try:
                tp, offset, generation = self._done.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                lane = self._lanes.get(tp)
                if lane is None or lane.generation != generation or tp not in self._assigned:
                    continue  # the partition went to another member meanwhile
            upto[tp] = max(upto.get(tp, -1), offset + 1)
        if not upto:
            return
        try:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in upto.items()],
                            asynchronous=False)
            self._kafka_ok_at = time.monotonic()
        except KafkaException as exc:
            log.warning("commit failed (the requests will be answered again): %s", exc)

    def _flow(self, consumer: Consumer) -> None:
        """Pause consuming while too many requests wait; resume once half of them ran."""
        most = self.config.concurrency * BUFFER_PER_THREAD
        with self._lock:
            buffered = self._buffered
        if not self._paused and buffered >= most:
            consumer.pause([TopicPartition(t, p) for t, p in self._assigned])
            self._paused = True
        elif self._paused and buffered <= most // 2:
            consumer.resume([TopicPartition(t, p) for t, p in self._assigned])
            self._paused = False

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self._assigned |= {(p.topic, p.partition) for p in partitions}
        if self._paused:
            consumer.pause(partitions)
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is answered; what waits is dropped (its next owner answers it)."""
        self._commit(consumer)
        with self._lock:
            for p in partitions:
                tp = (p.topic, p.partition)
                self._assigned.discard(tp)
                lane = self._lanes.get(tp)
                if lane is not None:
                    self._buffered -= len(lane.waiting)
                    lane.waiting.clear()
                    lane.generation += 1
                    lane.running = False
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))


def _position(m: Message) -> tuple[tuple[str, int], int]:
    """((topic, partition), offset) of a consumed message."""
    return (str(m.topic()), int(m.partition() or 0)), int(m.offset() or 0)


# --------------------------------------------------------------------- health server


def serve_health(runtime: AgentRuntime, host: str, port: int) -> ThreadingHTTPServer:
    """/health (the loop turns), /ready (Kafka answers and actions are registered) and
    /metrics (Prometheus text), on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._send(200, generate_latest(runtime.metrics.registry),
                           CONTENT_TYPE_LATEST)
            elif path in ("/health", "/healthz"):
                ok = runtime.healthy()
                self._json(200 if ok else 503, {"status": "ok" if ok else "stuck",
                                                "agent_type": runtime.config.agent_type})
            elif path in ("/ready", "/readyz"):
                ok, why = runtime.ready()
                self._json(200 if ok else 503, {"status": "ready" if ok else "not ready",
                                                "detail": why})
            else:
                self._json(404, {"error": "not_found", "message": "try /health, /ready or "
                                                                  "/metrics"})

        def _json(self, status: int, doc: dict[str, Any]) -> None:
            self._send(status, json.dumps(doc).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("health: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="agent-health").start()
    return server


__all__ = ["AgentConfig", "AgentRuntime", "Unusable", "agent_config", "parse_request",
           "read_config_file", "run", "serve_health"]
