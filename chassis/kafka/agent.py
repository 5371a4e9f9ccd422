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
and its type: the workflow's retry policy (the coordinator's) decides what follows. An
action still running after the action timeout is answered as timed out (``StepTimeout``)
and its partition goes on; /health fails once as many actions as threads hang so.
SIGTERM stops taking requests, gives those running SHUTDOWN_GRACE seconds to be
answered and hands the others back (uncommitted: the group's next member answers them).
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
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
from chassis.policy import TIMEOUT_ERROR

log = logging.getLogger(__name__)

#: Requests a pool thread may have waiting before the consumer pauses.
BUFFER_PER_THREAD = 16
#: Seconds between two tries to deliver an answer the broker did not take.
REDELIVER_WAIT = 1.0
#: Seconds a stopping agent keeps trying to deliver the answers of the requests that
#: were running (then they are handed back: answered again by the group's next member).
SHUTDOWN_GRACE = 30.0
#: The longest action timeout one may set (a week).
MAX_ACTION_TIMEOUT = 7 * 86400.0
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
    action_timeout: float = 3600.0
    """Seconds an action may run before its request is answered as timed out (the
    action is left to finish on its own; its result is dropped), for a request without
    a ``timeout`` header (a step's own timeout, which wins)."""


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
    "action_timeout": ("CHASSIS_AGENT_ACTION_TIMEOUT", ("action_timeout",)),
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


def _seconds(value: Any, what: str) -> float:
    try:
        seconds = float(str(value).strip()) if not isinstance(value, bool) else math.nan
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_ACTION_TIMEOUT):
        raise ConfigError(f"{what} must be a number of seconds above 0 and at most "
                          f"{MAX_ACTION_TIMEOUT:g}, got {str(value)[:40]!r}")
    return seconds


def agent_config(given: Mapping[str, Any], env: Mapping[str, str],
                 file: Mapping[str, Any] | None, settings: Settings) -> AgentConfig:
    """The agent's settings: an option given (``given``, None when not), else its
    variable, else the config file, else the default derived from the type: requests on
    ``system.agent.TYPE.requests``, answers on ``system.responses.TYPE`` (the response
    pattern the bridge reads), group ``TYPE-group``, 8 threads, health on 8080, an
    action timeout of CHASSIS_STEP_TIMEOUT."""
    def pick(option: str, default: Any = None) -> Any:
        if given.get(option) not in (None, ""):
            return given[option]
        variable = OPTIONS[option][0]
        if (env.get(variable) or "").strip():
            return env[variable].strip()
        found = (file or {}).get(option)
        return default if found is None else found

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
        raise ConfigError(f"response topic {responses!r} does not match "
                          f"CHASSIS_KAFKA_RESPONSE_PATTERN ({settings.kafka_response_pattern}):"
                          " the bridge would never read the answers (use a topic it reads, "
                          "or give the agent the bridge's pattern)")
    modules = pick("modules", ())
    if isinstance(modules, str):
        modules = tuple(m.strip() for m in modules.split(",") if m.strip())
    if not isinstance(modules, list | tuple) or not all(isinstance(m, str) for m in modules):
        raise ConfigError("actions must be a list of module names (or, in the variable, "
                          "names separated by commas)")
    group = str(pick("group") or f"{kind}-group")
    if not re.match(r"^[A-Za-z0-9._-]{1,249}$", group):
        raise ConfigError(f"consumer group {group[:60]!r}: use letters, digits, '.', '_' "
                          "and '-'")
    return AgentConfig(
        agent_type=kind, topic=topic, responses=responses, group=group,
        concurrency=_whole(pick("concurrency", 8), "concurrency", 1, 1024),
        health_port=_whole(pick("health_port", 8080), "health port", 0, 65535),
        dlq=settings.kafka_dlq_topic, modules=tuple(modules),
        action_timeout=_seconds(pick("action_timeout",
                                     min(settings.step_timeout, MAX_ACTION_TIMEOUT)),
                                "action timeout"))


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
        self.timed_out = Counter("agent_actions_timed_out",
                                 "Requests answered as timed out: their action ran past "
                                 "the action timeout", ["agent_type"],
                                 registry=r).labels(agent_type)
        self.overdue = Gauge("agent_actions_overdue", "Actions still running past their "
                             "timeout (their requests answered already)", ["agent_type"],
                             registry=r).labels(agent_type)
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


#: The request's headers its answer carries on (text in UTF-8).
ANSWERED_HEADERS = ("correlation_id", "request_id", "client_id", "project_id", "traceparent")


def parse_request(value: bytes | None, headers: Mapping[str, str]) -> Request:
    """A TaskRequest and the headers its answer needs; :class:`Unusable` otherwise."""
    for name in ("correlation_id", "request_id"):
        if not headers.get(name):
            raise Unusable("missing_header", f"the request has no {name} header: no "
                                             "answer could be matched to it")
    for name in ANSWERED_HEADERS:
        try:
            (headers.get(name) or "").encode("utf-8")
        except UnicodeEncodeError:
            raise Unusable("bad_header", f"the {name} header is not UTF-8 text") from None
    try:
        doc = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unusable("bad_json", f"the request is not JSON: {exc}") from None
    except RecursionError:
        raise Unusable("bad_json", "the request is nested too deeply") from None
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
    """The TaskResponse of a request: the action's output, or its failure (whatever the
    action raised, SystemExit included: a request is answered, the agent goes on)."""
    try:
        fn = actions.get(request.action)
    except Exception as exc:  # noqa: BLE001  (an action this agent does not have)
        return {"success": False, "data": None, "error": str(exc),
                "error_type": type(exc).__name__}
    try:
        output = check_json(fn(request.data, request.params), "the action's output")
    except BaseException as exc:  # noqa: BLE001  (a failed attempt, answered as such)
        log.warning("action %s failed: %s", request.action, exc,
                    extra={"correlation_id": request.headers.get("correlation_id")})
        return {"success": False, "data": None, "error": str(exc) or type(exc).__name__,
                "error_type": error_types(exc)[0]}
    return {"success": True, "data": output, "error": None}


def _request_timeout(request: Request) -> float | None:
    """The request's ``timeout`` header (its step's timeout: how long the workflow waits
    for the answer), when it is a usable number of seconds."""
    try:
        seconds = float(request.headers.get("timeout") or "nan")
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and 0 < seconds <= MAX_ACTION_TIMEOUT else None


def answer_headers(request: Request, traceparent: str | None) -> dict[str, str | None]:
    h = request.headers
    return {"correlation_id": h.get("correlation_id"), "causation_id": h.get("request_id"),
            "client_id": h.get("client_id"), "project_id": h.get("project_id") or None,
            "traceparent": traceparent or h.get("traceparent") or None}


# -------------------------------------------------------------------------- runtime

#: What became of a request: answered (or dead-lettered) and delivered; handed back (a
#: stopping agent ran out of time: not committed, the group answers it again); or to be
#: read again from its offset (nothing could be delivered, not even a dead letter).
DONE, HANDED_BACK, REWIND = "done", "handed_back", "rewind"
#: Errors no retry cures: the message is too large for the topic, or not allowed there.
PERMANENT = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE,
                       KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_RECORD,
                       KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.POLICY_VIOLATION,
                       KafkaError._INVALID_ARG})
#: The part of a request kept on the dead-letter topic when the whole is too large.
DLQ_KEEP_BYTES = 64 * 1024


class Permanent(Exception):
    """A message the broker will never take (see :data:`PERMANENT`)."""


@dataclass
class _Lane:
    """One partition's requests, answered in order by one runner at a time."""

    waiting: deque[Message] = field(default_factory=deque)
    running: bool = False
    """A runner of this generation is scheduled or at work."""
    busy: bool = False
    """A runner (of any generation) is handling a request now."""
    blocked: bool = False
    """A request failed beyond dead-lettering: nothing is taken until the main thread
    has sought the partition back to it."""
    generation: int = 0


class _Pool:
    """``size`` daemon threads running what is submitted (a running action never keeps
    the process from exiting once the grace of a stop is over)."""

    def __init__(self, size: int, name: str) -> None:
        self._work: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.Queue()
        for i in range(size):
            threading.Thread(target=self._serve, daemon=True, name=f"{name}-{i}").start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._work.put((fn, args))

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001  (a runner's own guard failed: log it)
                log.exception("agent runner failed")

    def close(self, size: int) -> None:
        for _ in range(size):
            self._work.put(None)


class AgentRuntime:
    """Consume, run on the pool, answer, commit (see the module docstring)."""

    def __init__(self, settings: Settings, config: AgentConfig,
                 own_actions: frozenset[str] | None = None) -> None:
        self.settings, self.config = settings, config
        self.bootstrap = clients.require_bootstrap(settings)
        self.metrics = AgentMetrics(config.agent_type, config.concurrency)
        self.own_actions = own_actions
        """The actions the agent's modules registered (None: none were given)."""
        self._cond = threading.Condition()
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._done: queue.Queue[tuple[tuple[str, int], int, int]] = queue.Queue()
        self._rewinds: queue.Queue[tuple[tuple[str, int], int, int]] = queue.Queue()
        self._buffered = 0
        self._paused = False
        self._stop = threading.Event()  # asked to stop: consume no more
        self._stopping = threading.Event()  # no new request starts
        self._closed = threading.Event()  # the producer is done: nothing more is sent
        self._give_up_at = float("inf")
        self._beat = time.monotonic()
        self._kafka_ok_at = 0.0
        self._assigned: set[tuple[str, int]] = set()
        self._overdue: list[threading.Thread] = []
        self.metrics.overdue.set_function(self.overdue)
        self.producer = Producer(clients.producer_config(self.bootstrap))

    # ------------------------------------------------------------------ health

    def healthy(self) -> bool:
        """The loop turns, and fewer actions than threads hang past their timeout."""
        return time.monotonic() - self._beat < STUCK_AFTER and not self._stop.is_set() \
            and self.overdue() < self.config.concurrency

    def overdue(self) -> int:
        """Actions still running past their timeout (their requests were answered)."""
        with self._cond:
            self._overdue = [t for t in self._overdue if t.is_alive()]
            return len(self._overdue)

    def _run_bounded(self, request: Request) -> dict[str, Any]:
        """:func:`run`, on a thread of its own, waited for ``action_timeout`` seconds:
        past it the request is answered as timed out (``StepTimeout``, which the plan's
        retry policy treats as any timeout) and its partition goes on; the action is
        left to finish on its own (a thread cannot be stopped) and its result dropped."""
        asked = _request_timeout(request)
        limit = asked or self.config.action_timeout
        result: list[dict[str, Any]] = []
        context = contextvars.copy_context()  # the span: an action's own spans nest in it
        thread = threading.Thread(target=lambda: result.append(context.run(run, request)),
                                  daemon=True, name=f"agent-action-{request.action}")
        thread.start()
        thread.join(limit)
        if result:
            return result[0]
        with self._cond:
            self._overdue.append(thread)
        self.metrics.timed_out.inc()
        whose = "its step's timeout" if asked else "the agent's action timeout"
        error = (f"the action {request.action} ran past {whose} ({limit:g} s); left to "
                 f"finish, its result dropped")
        log.warning("request %s: %s", request.headers.get("request_id"), error,
                    extra={"correlation_id": request.headers.get("correlation_id")})
        return _failure(TIMEOUT_ERROR, error)

    def ready(self) -> tuple[bool, str]:
        if self.overdue() >= self.config.concurrency:
            return False, (f"{self.overdue()} actions still run past their timeout "
                           f"({self.config.action_timeout:g} s): restart the agent")
        if not self.healthy():
            return False, "the consumer loop is not running"
        if time.monotonic() - self._kafka_ok_at > KAFKA_FRESH:
            return False, f"Kafka at {self.bootstrap} did not answer lately"
        if self.own_actions is not None and not self.own_actions:
            return False, (f"the modules {', '.join(self.config.modules)} registered no "
                           "action")
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
        pool = _Pool(self.config.concurrency, f"agent-{self.config.agent_type}")
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
                for m in consumer.consume(64, timeout=0.2):
                    error = m.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", error)
                        continue
                    self._kafka_ok_at = time.monotonic()
                    self.metrics.consumed.labels(m.topic()).inc()
                    self.metrics.received.inc()
                    self._take(m, pool)
                self._rewind(consumer)
                self._commit(consumer)
                self._flow(consumer)
                if time.monotonic() - last_look > 10:
                    last_look = time.monotonic()
                    self._look(consumer)
        finally:
            self._stop.set()
            self._finish(consumer)
            pool.close(self.config.concurrency)
            self._closed.set()
            poller.join(15)
            log.info("agent %s stopped", self.config.agent_type)

    def _finish(self, consumer: Consumer) -> None:
        """Stop: no new request starts; the running ones have SHUTDOWN_GRACE seconds to
        be answered (the consumer polled meanwhile, so the group keeps it); what is left
        is handed back uncommitted."""
        self._give_up_at = time.monotonic() + SHUTDOWN_GRACE
        self._stopping.set()
        with self._cond:
            waiting = self._buffered
            self._cond.notify_all()
        log.info("agent %s stopping: the running requests finish (at most %.0f s), %d "
                 "waiting ones are handed back", self.config.agent_type, SHUTDOWN_GRACE,
                 waiting)
        try:
            consumer.pause([TopicPartition(t, p) for t, p in self._assigned])
            while time.monotonic() < self._give_up_at:
                with self._cond:
                    if not any(lane.busy for lane in self._lanes.values()):
                        break
                consumer.consume(64, timeout=0.2)  # (paused: keeps the membership alive)
                self._commit(consumer)
            self._commit(consumer)
        finally:
            consumer.close()

    def _look(self, consumer: Consumer) -> None:
        """A light look at the cluster, for /ready."""
        try:
            consumer.list_topics(self.config.topic, timeout=5)
            self._kafka_ok_at = time.monotonic()
        except KafkaException as exc:
            log.warning("Kafka does not answer: %s", exc)

    def _take(self, m: Message, pool: _Pool) -> None:
        tp, _ = _position(m)
        with self._cond:
            lane = self._lanes.setdefault(tp, _Lane())
            if lane.blocked:  # read again from the failed request once sought back
                return
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
            with self._cond:
                lane = self._lanes.get(tp)
                if lane is None or lane.generation != generation:
                    return
                while lane.busy:  # an older generation's runner finishing its request
                    self._cond.wait(0.5)
                    if lane.generation != generation:
                        return
                if not lane.waiting or self._stopping.is_set():
                    lane.running = False
                    return
                m = lane.waiting.popleft()
                self._buffered -= 1
                lane.busy = True
            outcome = REWIND
            try:
                outcome = self._handle(m)
            except Exception as exc:  # noqa: BLE001  (set it aside rather than stop)
                log.exception("request %s[%d]@%d could not be handled", *_position(m))
                outcome = self._dead_letter(m, "internal_error",
                                            f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    lane.busy = False
                    self._cond.notify_all()
            offset = _position(m)[1]
            if outcome == DONE:
                self._done.put((tp, offset, generation))
                continue
            with self._cond:  # handed back, or to be read again: the lane stops here
                if lane.generation == generation:
                    self._buffered -= len(lane.waiting)
                    lane.waiting.clear()
                    lane.running = False
                    lane.blocked = outcome == REWIND
            if outcome == REWIND and not self._stopping.is_set():
                time.sleep(REDELIVER_WAIT)
                self._rewinds.put((tp, offset, generation))
            return

    def _handle(self, m: Message) -> str:
        """Answer one request (or dead-letter it); :data:`DONE` once the broker has it."""
        started = time.monotonic()
        headers = clients.header_dict(m.headers())
        try:
            request = parse_request(m.value(), headers)
        except Unusable as exc:
            log.warning("dead letter %s[%d]@%d: %s", *_position(m), exc,
                        extra={"correlation_id": headers.get("correlation_id")})
            return self._dead_letter(m, exc.reason, exc.detail)
        self.metrics.in_flight.inc()
        try:
            with tracing.span(f"agent {request.action}", under=headers.get("traceparent"),
                              attributes={tracing.CID: headers.get("correlation_id"),
                                          tracing.ACTION: request.action,
                                          "chassis.agent_type": self.config.agent_type}
                              ) as span:
                response = self._run_bounded(request)
                if not response["success"]:
                    tracing.failed(span, str(response["error"]), response.get("error_type"))
                traceparent = tracing.traceparent_of(span) if span.is_recording() else None
            value = json.dumps(response).encode()
            if len(value) > MESSAGE_MAX:
                response = _failure("AnswerTooLarge", f"the action's answer is {len(value)} "
                                    f"bytes of JSON, more than a message may carry "
                                    f"({MESSAGE_MAX})")
            key = m.key() or headers["correlation_id"].encode()
            out = clients.encode_headers(answer_headers(request, traceparent))
            try:
                delivered = self._deliver(self.config.responses,
                                          json.dumps(response).encode(), key, out)
            except Permanent as exc:  # the topic refuses it: the workflow is told so
                response = _failure("AnswerUndeliverable",
                                    f"the agent's answer could not be delivered: {exc}")
                try:
                    delivered = self._deliver(self.config.responses,
                                              json.dumps(response).encode(), key, out)
                except Permanent as again:
                    return self._dead_letter(m, "undeliverable", str(again))
        finally:
            self.metrics.in_flight.dec()
        if not delivered:
            return HANDED_BACK
        self.metrics.outcome("success" if response["success"] else "failure")
        self.metrics.duration.observe(time.monotonic() - started)
        log.info("answered request %s of workflow %s: %s", headers["request_id"],
                 headers["correlation_id"], "success" if response["success"] else
                 f"failure ({response['error']})",
                 extra={"correlation_id": headers["correlation_id"]})
        return DONE

    def _dead_letter(self, m: Message, reason: str, detail: str) -> str:
        """Put the request on the dead-letter topic with the reason (cut to its first
        64 KiB when the whole is too large): :data:`DONE` once delivered."""
        tp, offset = _position(m)
        why = clients.encode_headers({"dlq_reason": reason, "dlq_detail": detail[:1000],
                                      "source_topic": tp[0], "source_partition": tp[1],
                                      "source_offset": offset})
        own = clients.message_headers(m.headers())
        value, key = m.value(), m.key()
        size = len(value or b"") + len(key or b"")
        cut = [(k, v) for k, v in own if len(k) + len(v or b"") < DLQ_KEEP_BYTES // 16]
        for attempt in ((value, key, own + why),
                        ((value or b"")[:DLQ_KEEP_BYTES], (key or b"")[:DLQ_KEEP_BYTES],
                         cut + why + clients.encode_headers({"dlq_truncated": size}))):
            try:
                if not self._deliver(self.config.dlq, *attempt):
                    return HANDED_BACK
            except Permanent as exc:
                log.warning("dead letter of %s[%d]@%d refused (%s)", *tp, offset, exc)
                continue
            self.metrics.outcome("dead_letter")
            return DONE
        log.error("request %s[%d]@%d can be neither answered nor dead-lettered: its "
                  "partition waits and tries again", *tp, offset)
        return REWIND

    def _deliver(self, topic: str, value: bytes | None, key: bytes | None,
                 headers: clients.Headers) -> bool:
        """Produce and wait for the broker's acknowledgement, trying again until it
        comes; False when a stopping agent's grace runs out first (the request is
        handed back); :class:`Permanent` when the broker will never take it."""
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
            except KafkaException as exc:
                if exc.args and exc.args[0].code() in PERMANENT:
                    raise Permanent(exc.args[0].str()) from None
                log.warning("cannot produce to %s: %s; trying again", topic, exc)
                time.sleep(REDELIVER_WAIT)
                continue
            except (ValueError, TypeError) as exc:
                raise Permanent(str(exc)) from None
            while not got.wait(0.5):
                if time.monotonic() >= self._give_up_at:
                    return False
            if not errors:
                return True
            if errors[0].code() in PERMANENT:
                raise Permanent(errors[0].str())
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
            with self._cond:
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

    def _rewind(self, consumer: Consumer) -> None:
        """Read a blocked lane's partition again from the request that failed."""
        while True:
            try:
                tp, offset, generation = self._rewinds.get_nowait()
            except queue.Empty:
                return
            with self._cond:
                lane = self._lanes.get(tp)
                if lane is None or lane.generation != generation or tp not in self._assigned:
                    continue  # revoked meanwhile: its next owner reads it again
                try:
                    consumer.seek(TopicPartition(tp[0], tp[1], offset))
                except KafkaException as exc:
                    log.warning("cannot seek %s[%d] back to %d: %s", *tp, offset, exc)
                    self._rewinds.put((tp, offset, generation))
                    return
                lane.blocked = False

    def _flow(self, consumer: Consumer) -> None:
        """Pause consuming while too many requests wait; resume once half of them ran."""
        most = self.config.concurrency * BUFFER_PER_THREAD
        with self._cond:
            buffered = self._buffered
        if not self._paused and buffered >= most:
            consumer.pause([TopicPartition(t, p) for t, p in self._assigned])
            self._paused = True
        elif self._paused and buffered <= most // 2:
            consumer.resume([TopicPartition(t, p) for t, p in self._assigned])
            self._paused = False

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take the partitions, paused or not as the agent is now (a partition keeps a
        pause of ours across a rebalance otherwise)."""
        with self._cond:
            self._assigned |= {(p.topic, p.partition) for p in partitions}
            for p in partitions:
                lane = self._lanes.get((p.topic, p.partition))
                if lane is not None:
                    lane.blocked = False
        consumer.assign(partitions)
        if self._paused:
            consumer.pause(partitions)
        else:
            consumer.resume(partitions)
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is answered; what waits is dropped (its next owner answers it)."""
        self._commit(consumer)
        with self._cond:
            for p in partitions:
                tp = (p.topic, p.partition)
                self._assigned.discard(tp)
                lane = self._lanes.get(tp)
                if lane is not None:
                    self._buffered -= len(lane.waiting)
                    lane.waiting.clear()
                    lane.generation += 1
                    lane.running = False
                    lane.blocked = False
            self._cond.notify_all()
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))


def _failure(error_type: str, error: str) -> dict[str, Any]:
    return {"success": False, "data": None, "error": error, "error_type": error_type}


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
                                                "agent_type": runtime.config.agent_type,
                                                "overdue_actions": runtime.overdue()})
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
