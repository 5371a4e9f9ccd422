"""The bridge's routing table: which topics become which Celery tasks.

The table is declared here, in code; a message never names the task it becomes. Each
route parses and checks its message and returns a :class:`TaskCall`, or raises
:class:`Rejected` with a reason code: the bridge then puts the message on the
dead-letter topic with that reason in its ``dlq_reason`` header.

=================================  ===================  ===============================
topic                              task                 value / headers
=================================  ===================  ===============================
system.commands.workflow.resume    chassis.resume       {approved, feedback};
                                                        correlation_id, client_id
system.commands.workflow.cancel    chassis.cancel       {reason} or empty;
                                                        correlation_id, client_id
system.agent.<plan>.process        chassis.start        initial request data; correlation_id
                                                        (or request_id), client_id,
                                                        [project_id, fuel_budget, plan]
response pattern (default          chassis.respond      TaskResponse {success, data, error,
system.responses.*)                                     [error_type]}; correlation_id,
                                                        causation_id, [client_id]
=================================  ===================  ===============================
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from chassis.celery_conf import CANCEL_TASK, RESPOND_TASK, RESUME_TASK, START_TASK
from chassis.config import Settings
from chassis.coordinator import CANCEL_TOPIC, RESUME_TOPIC
from chassis.errors import InputError
from chassis.fuel import FUEL_HEADER
from chassis.policy import ERROR_NAME, ERROR_NAME_MAX
from chassis.registry import parse_ref

START_PATTERN = r"^system\.agent\.(?P<type>.+)\.process$"
#: Namespace of the correlation_id derived from a start request's request_id.
_START_NS = uuid.UUID("3b0d6a52-6f4e-4f55-8f0e-2f1b9c1d7a41")

# dlq_reason codes
BAD_JSON = "bad_json"
BAD_PAYLOAD = "bad_payload"
MISSING_HEADER = "missing_header"
BAD_HEADER = "bad_header"
UNKNOWN_PLAN = "unknown_plan"
UNKNOWN_WORKFLOW = "unknown_workflow"
CLIENT_MISMATCH = "client_mismatch"
UNKNOWN_REQUEST = "unknown_request"
NO_ROUTE = "no_route"


class Rejected(Exception):
    """The message cannot be used: ``reason`` is a code above, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TaskCall:
    """A Celery task to publish for one message."""

    task: str
    args: list[Any]
    task_id: str | None = None
    correlation_id: str | None = None

    @property
    def summary(self) -> str:
        """What monitoring (Flower) shows as the task's arguments."""
        return f"(correlation_id={self.correlation_id})"


@dataclass(frozen=True)
class Incoming:
    """What a route sees of a Kafka message."""

    topic: str
    value: bytes | None
    headers: Mapping[str, str]
    match: re.Match[str]


class Directory(Protocol):
    """What the routes look up (the database, behind a cache where that is safe)."""

    def plan_version(self, name: str, version: int | None) -> int | None:
        """The version to start (latest when None); None when there is no such plan."""

    def owner(self, correlation_id: str) -> str | None:
        """The client_id owning the workflow; None when there is no such workflow."""

    def has_request(self, correlation_id: str, request_id: str) -> bool:
        """True when the workflow sent a request with this id."""


@dataclass(frozen=True)
class Route:
    """Messages on topics matching ``pattern`` become ``task`` through ``parse``."""

    name: str
    pattern: str
    task: str
    parse: Callable[[Incoming, Directory], TaskCall] = field(repr=False)

    @property
    def subscription(self) -> str:
        """The pattern for librdkafka (a regex subscription starts with ``^``; its
        regex dialect has no named groups)."""
        return re.sub(r"\(\?P<\w+>", "(", self.pattern)


# ------------------------------------------------------------------------- helpers


def _json(value: bytes | None, what: str) -> Any:
    if value is None or not value.strip():
        return None
    try:
        return json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected(BAD_JSON, f"{what} is not valid JSON: {exc}") from None


def _object(value: bytes | None, what: str) -> dict[str, Any]:
    doc = _json(value, what)
    if not isinstance(doc, dict):
        raise Rejected(BAD_PAYLOAD, f"{what} must be a JSON object, got "
                                    f"{type(doc).__name__}")
    return doc


def _header(msg: Incoming, name: str) -> str:
    value = (msg.headers.get(name) or "").strip()
    if not value:
        raise Rejected(MISSING_HEADER, f"header {name} is required on {msg.topic}")
    return value


def _uuid_header(msg: Incoming, name: str) -> str:
    value = _header(msg, name)
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise Rejected(BAD_HEADER, f"header {name} must be a UUID, got {value!r}") from None


def _owned(msg: Incoming, d: Directory, cid: str, client_id: str | None) -> None:
    owner = d.owner(cid)
    if owner is None:
        raise Rejected(UNKNOWN_WORKFLOW, f"no workflow with correlation_id {cid}")
    if client_id is not None and client_id != owner:
        raise Rejected(CLIENT_MISMATCH, f"client {client_id!r} does not own workflow {cid}")


# -------------------------------------------------------------------------- routes


def parse_start(msg: Incoming, d: Directory) -> TaskCall:
    """A start request: the value is the workflow's input; the plan is the topic's
    ``<type>`` unless a ``plan`` header (``name`` or ``name@version``) names one. Without
    a correlation_id, one is derived from the request_id (the same request, the same
    workflow); with neither, the message is refused."""
    data = _json(msg.value, "the start request")
    request_id = (msg.headers.get("request_id") or "").strip() or None
    if not (msg.headers.get("correlation_id") or "").strip() and request_id:
        # no workflow id given: derive it from the request, so a re-sent one is the same
        cid = str(uuid.uuid5(_START_NS, request_id))
    else:
        cid = _uuid_header(msg, "correlation_id")
    client_id = _header(msg, "client_id")
    budget: int | None = None
    if msg.headers.get(FUEL_HEADER, "").strip():
        raw = msg.headers[FUEL_HEADER].strip()
        if not raw.isdigit() or int(raw) <= 0:
            raise Rejected(BAD_HEADER, f"header {FUEL_HEADER} must be a positive integer, "
                                       f"got {raw!r}")
        budget = int(raw)
    ref = (msg.headers.get("plan") or "").strip() or msg.match.group("type")
    try:
        name, wanted = parse_ref(ref)
    except InputError as exc:
        raise Rejected(UNKNOWN_PLAN, str(exc)) from None
    version = d.plan_version(name, wanted)
    if version is None:
        what = f"version {wanted} of plan {name!r}" if wanted else f"plan {name!r}"
        raise Rejected(UNKNOWN_PLAN, f"no registered {what}")
    payload = {"plan": name, "version": version, "input": data, "correlation_id": cid,
               "client_id": client_id, "project_id": msg.headers.get("project_id") or None,
               "request_id": request_id, "fuel_budget": budget}
    return TaskCall(START_TASK, [payload], task_id=f"start-{cid}", correlation_id=cid)


def parse_resume(msg: Incoming, d: Directory) -> TaskCall:
    """A human's decision: {approved, feedback}; only the owning client may resume."""
    doc = _object(msg.value, "the resume command")
    if not isinstance(doc.get("approved"), bool):
        raise Rejected(BAD_PAYLOAD, "the resume command needs approved: true or false")
    cid = _uuid_header(msg, "correlation_id")
    client_id = _header(msg, "client_id")
    _owned(msg, d, cid, client_id)
    return TaskCall(RESUME_TASK, [cid, doc["approved"], doc.get("feedback")],
                    correlation_id=cid)


def parse_cancel(msg: Incoming, d: Directory) -> TaskCall:
    """Cancel a workflow: an empty value or {reason}; only the owning client may."""
    doc = _json(msg.value, "the cancel command")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise Rejected(BAD_PAYLOAD, "the cancel command must be empty or a JSON object "
                                    "{\"reason\": \"...\"}")
    reason = doc.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
        raise Rejected(BAD_PAYLOAD, "reason must be a text of at most 1000 characters")
    cid = _uuid_header(msg, "correlation_id")
    client_id = _header(msg, "client_id")
    _owned(msg, d, cid, client_id)
    return TaskCall(CANCEL_TASK, [cid, reason or None], correlation_id=cid)


def parse_response(msg: Incoming, d: Directory) -> TaskCall:
    """An external agent's TaskResponse; causation_id is the request it answers. A
    client_id header, when present, must be the workflow's owner."""
    doc = _object(msg.value, "the task response")
    if not isinstance(doc.get("success"), bool):
        raise Rejected(BAD_PAYLOAD, "the task response needs success: true or false")
    error = doc.get("error")
    if error is not None and not isinstance(error, str):
        error = json.dumps(error)
    error_type = doc.get("error_type")
    if error_type is not None and not (isinstance(error_type, str)
                                       and len(error_type) <= ERROR_NAME_MAX
                                       and ERROR_NAME.match(error_type)):
        raise Rejected(BAD_PAYLOAD, "error_type must be an error type name such as "
                                    "RateLimited (matched against retry.non_retryable)")
    cid = _uuid_header(msg, "correlation_id")
    causation = _header(msg, "causation_id")
    _owned(msg, d, cid, (msg.headers.get("client_id") or "").strip() or None)
    if not d.has_request(cid, causation):
        raise Rejected(UNKNOWN_REQUEST, f"workflow {cid} sent no request {causation}")
    args = [cid, causation, doc["success"], doc.get("data"), error]
    if error_type is not None:
        args.append(error_type)
    return TaskCall(RESPOND_TASK, args, correlation_id=cid)


def _anchored(pattern: str) -> str:
    """A pattern without ``^`` is one topic's name (as librdkafka reads it too)."""
    return pattern if pattern.startswith("^") else f"^{re.escape(pattern)}$"


def routes(settings: Settings) -> tuple[Route, ...]:
    """The routing table, first match wins."""
    return (
        Route("resume", f"^{re.escape(RESUME_TOPIC)}$", RESUME_TASK, parse_resume),
        Route("cancel", f"^{re.escape(CANCEL_TOPIC)}$", CANCEL_TASK, parse_cancel),
        Route("start", START_PATTERN, START_TASK, parse_start),
        Route("response", _anchored(settings.kafka_response_pattern), RESPOND_TASK,
              parse_response),
    )


class Router:
    """Finds a topic's route (cached per topic) and turns a message into a TaskCall."""

    def __init__(self, table: tuple[Route, ...], directory: Directory) -> None:
        self.table = table
        self.directory = directory
        self._compiled = [(r, re.compile(r.pattern)) for r in table]
        self._by_topic: dict[str, tuple[Route, re.Match[str]] | None] = {}

    def route(self, topic: str) -> tuple[Route, re.Match[str]] | None:
        if topic not in self._by_topic:
            found = None
            for route, rx in self._compiled:
                m = rx.match(topic)
                if m is not None:
                    found = (route, m)
                    break
            self._by_topic[topic] = found
        return self._by_topic[topic]

    def call(self, topic: str, value: bytes | None, headers: Mapping[str, str]) -> TaskCall:
        """The task for this message; Rejected when it cannot be used."""
        found = self.route(topic)
        if found is None:
            raise Rejected(NO_ROUTE, f"no route for topic {topic}")
        route, m = found
        return route.parse(Incoming(topic, value, headers, m), self.directory)
