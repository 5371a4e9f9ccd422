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
system.commands.workflow.cancel    chassis.cancel       {reason, compensate} or empty;
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

import dataclasses
import json
import re
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from chassis import infra
from chassis.celery_conf import CANCEL_TASK, RESPOND_TASK, RESUME_TASK, START_TASK
from chassis.config import Settings
from chassis.coordinator import CANCEL_TOPIC, RESUME_TOPIC
from chassis.errors import InputError
from chassis.fuel import DEFAULT_FUEL, FUEL_HEADER
from chassis.limits import DEFAULT as DEFAULT_LIMITS
from chassis.limits import (
    INT32_MAX,
    TEXT_MAX,
    Limits,
    check_count,
    check_name,
    check_text,
    loads_json,
)
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
UNKNOWN_REQUEST = "unknown_request"
CONFLICT = "conflict"
BAD_MESSAGE = "bad_message"
NO_ROUTE = "no_route"

#: Headers that say who sends and what for: each at most once.
IDENTITY_HEADERS = frozenset({"correlation_id", "causation_id", "client_id", "project_id",
                              "request_id", "plan", FUEL_HEADER})


class Rejected(Exception):
    """The message cannot be used: ``reason`` is a code above, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


#: A W3C traceparent header (version 00): the only form carried on.
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


@dataclass(frozen=True)
class TaskCall:
    """A Celery task to publish for one message."""

    task: str
    args: list[Any]
    task_id: str | None = None
    correlation_id: str | None = None
    traceparent: str | None = None
    """The trace context the Kafka message brought (its W3C ``traceparent`` header),
    carried on in the Celery message's headers."""

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
    limits: Limits = DEFAULT_LIMITS


#: (client_id, plan name, plan version, input, fuel budget) a workflow was started with.
StartRecord = tuple[str, str | None, int | None, Any, int]


class Directory(Protocol):
    """What the routes look up (the database, behind a cache where that is safe)."""

    def plan_version(self, name: str, version: int | None) -> int | None:
        """The version to start (latest when None); None when there is no such plan."""

    def owner(self, correlation_id: str) -> str | None:
        """The client_id owning the workflow; None when there is no such workflow."""

    def start_of(self, correlation_id: str) -> StartRecord | None:
        """(client_id, plan name, plan version, input, fuel budget) the workflow was
        started with; None when there is no such workflow."""

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


def _json(msg: Incoming, what: str) -> Any:
    """The value as JSON within the limits (strict: no NaN, no NUL, bounded size and
    depth); an empty value is null."""
    if msg.value is None or not msg.value.strip():
        return None
    try:
        return loads_json(msg.value, what, msg.limits)
    except InputError as exc:
        bad = "is not valid JSON" in str(exc) or "not UTF-8" in str(exc)
        raise Rejected(BAD_JSON if bad else BAD_PAYLOAD, str(exc)) from None


def _object(msg: Incoming, what: str) -> dict[str, Any]:
    doc = _json(msg, what)
    if not isinstance(doc, dict):
        raise Rejected(BAD_PAYLOAD, f"{what} must be a JSON object, got "
                                    f"{type(doc).__name__}")
    return doc


def _header(msg: Incoming, name: str) -> str:
    value = (msg.headers.get(name) or "").strip()
    if not value:
        raise Rejected(MISSING_HEADER, f"header {name} is required on {msg.topic}")
    return _name(name, value)


def _name(header: str, value: str) -> str:
    try:
        return check_name(value, f"header {header}")
    except InputError as exc:
        raise Rejected(BAD_HEADER, str(exc)) from None


def _optional(msg: Incoming, name: str) -> str | None:
    value = (msg.headers.get(name) or "").strip()
    return _name(name, value) if value else None


def _uuid_header(msg: Incoming, name: str) -> str:
    value = _header(msg, name)
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise Rejected(BAD_HEADER, f"header {name} must be a UUID, got {value[:60]!r}") from None


def _owned(d: Directory, cid: str, client_id: str) -> None:
    """Only the owning client reaches a workflow: another client's is as unknown as a
    workflow that does not exist (the dead letter tells no more)."""
    if d.owner(cid) != client_id:
        raise Rejected(UNKNOWN_WORKFLOW,
                       f"no workflow with correlation_id {cid} for client {client_id!r}")


def _text(doc: dict[str, Any], key: str, what: str, max_length: int = TEXT_MAX) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    try:
        return check_text(value, what, max_length=max_length)
    except InputError as exc:
        raise Rejected(BAD_PAYLOAD, str(exc)) from None


def derived_id(client_id: str, request_id: str) -> str:
    """The correlation_id of a start request that names only its request_id."""
    return str(uuid.uuid5(_START_NS, f"{client_id}/{request_id}"))


def start_record(call: TaskCall) -> StartRecord | None:
    """What a start task would start (compared like :meth:`Directory.start_of`); None
    for other tasks."""
    if call.task != START_TASK:
        return None
    p = call.args[0]
    return (p["client_id"], p["plan"], p["version"], p["input"],
            p["fuel_budget"] or DEFAULT_FUEL)


# -------------------------------------------------------------------------- routes


def parse_start(msg: Incoming, d: Directory) -> TaskCall:
    """A start request: the value is the workflow's input; the plan is the topic's
    ``<type>`` unless a ``plan`` header (``name`` or ``name@version``) names one. Without
    a correlation_id, one is derived from the request_id (the same request, the same
    workflow); with neither, the message is refused. An id in use by another client, or
    by a workflow started with another plan, input or budget, is a conflict."""
    data = _json(msg, "the start request")
    request_id = _optional(msg, "request_id")
    client_id = _header(msg, "client_id")
    if not (msg.headers.get("correlation_id") or "").strip() and request_id:
        # no workflow id given: derive it from the client's request, so a re-sent one
        # is the same workflow (and two clients' request ids never meet)
        cid = derived_id(client_id, request_id)
    else:
        cid = _uuid_header(msg, "correlation_id")
    project_id = _optional(msg, "project_id")
    budget: int | None = None
    if (msg.headers.get(FUEL_HEADER) or "").strip():
        try:
            budget = check_count(msg.headers[FUEL_HEADER], f"header {FUEL_HEADER}")
        except InputError as exc:
            raise Rejected(BAD_HEADER, str(exc)) from None
    ref = (msg.headers.get("plan") or "").strip() or msg.match.group("type")
    try:
        name, wanted = parse_ref(ref[:300])
    except InputError as exc:
        raise Rejected(UNKNOWN_PLAN, str(exc)) from None
    version = d.plan_version(name, wanted)
    if version is None:
        what = f"version {wanted} of plan {name!r}" if wanted else f"plan {name!r}"
        raise Rejected(UNKNOWN_PLAN, f"no registered {what}")
    existing = d.start_of(cid)
    if existing is not None and existing != (client_id, name, version, data,
                                             budget or DEFAULT_FUEL):
        # (it tells the sender the id is taken, not by whom: ids are the sender's to
        # choose, and a random UUID is never guessed)
        raise Rejected(CONFLICT, f"correlation id {cid} is in use by another workflow, or "
                                 "by this one started with another plan, input or budget")
    payload = {"plan": name, "version": version, "input": data, "correlation_id": cid,
               "client_id": client_id, "project_id": project_id,
               "request_id": request_id, "fuel_budget": budget}
    return TaskCall(START_TASK, [payload], task_id=f"start-{cid}", correlation_id=cid)


def parse_resume(msg: Incoming, d: Directory) -> TaskCall:
    """A human's decision: {approved, feedback, add_fuel, step}; only the owning client
    may resume."""
    doc = _object(msg, "the resume command")
    if not isinstance(doc.get("approved"), bool):
        raise Rejected(BAD_PAYLOAD, "the resume command needs approved: true or false")
    cid = _uuid_header(msg, "correlation_id")
    client_id = _header(msg, "client_id")
    _owned(d, cid, client_id)
    add = doc.get("add_fuel")
    add = 0 if add is None else add  # (null or absent: none added)
    if type(add) is not int or not (add == 0 or 1 <= add <= INT32_MAX):
        raise Rejected(BAD_PAYLOAD, f"add_fuel must be a whole number from 1 to {INT32_MAX}, "
                                    f"got {add!r}"[:200])
    step = doc.get("step")
    if step is not None:
        try:
            check_name(step, "step (the pause answered)")
        except InputError as exc:
            raise Rejected(BAD_PAYLOAD, str(exc)) from None
    return TaskCall(RESUME_TASK, [cid, doc["approved"], doc.get("feedback"), client_id]
                    + ([add] if add or step is not None else [])
                    + ([step] if step is not None else []), correlation_id=cid)


def parse_cancel(msg: Incoming, d: Directory) -> TaskCall:
    """Cancel a workflow: an empty value or {reason, compensate}; only the owning client
    may. With compensate true, its completed steps are undone first."""
    doc = _json(msg, "the cancel command")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise Rejected(BAD_PAYLOAD, "the cancel command must be empty or a JSON object "
                                    "{\"reason\": \"...\"}")
    reason = _text(doc, "reason", "reason")
    compensate = doc.get("compensate", False)
    if not isinstance(compensate, bool):
        raise Rejected(BAD_PAYLOAD, "compensate must be true or false")
    cid = _uuid_header(msg, "correlation_id")
    client_id = _header(msg, "client_id")
    _owned(d, cid, client_id)
    return TaskCall(CANCEL_TASK, [cid, reason or None, client_id, compensate],
                    correlation_id=cid)


def parse_response(msg: Incoming, d: Directory) -> TaskCall:
    """An external agent's TaskResponse; causation_id is the request it answers, and
    client_id the workflow's client (both required)."""
    doc = _object(msg, "the task response")
    if not isinstance(doc.get("success"), bool):
        raise Rejected(BAD_PAYLOAD, "the task response needs success: true or false")
    error = doc.get("error")
    if error is not None and not isinstance(error, str):
        error = json.dumps(error)[:10_000]
    else:
        error = _text(doc, "error", "error", max_length=10_000)
    error_type = doc.get("error_type")
    if error_type is not None and not (isinstance(error_type, str)
                                       and len(error_type) <= ERROR_NAME_MAX
                                       and ERROR_NAME.match(error_type)):
        raise Rejected(BAD_PAYLOAD, "error_type must be an error type name such as "
                                    "RateLimited (matched against retry.non_retryable)")
    cid = _uuid_header(msg, "correlation_id")
    causation = _header(msg, "causation_id")
    client_id = _header(msg, "client_id")
    _owned(d, cid, client_id)
    if not d.has_request(cid, causation):
        raise Rejected(UNKNOWN_REQUEST, f"workflow {cid} sent no request {causation}")
    return TaskCall(RESPOND_TASK, [cid, causation, doc["success"], doc.get("data"), error,
                                   error_type, client_id], correlation_id=cid)


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

    def __init__(self, table: tuple[Route, ...], directory: Directory,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.table = table
        self.directory = directory
        self.limits = limits
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

    def call(self, topic: str, value: bytes | None, headers: Mapping[str, str],
             repeated: Collection[str] = ()) -> TaskCall:
        """The task for this message; Rejected when it cannot be used, for whatever
        reason but an unreachable database (which is raised: the message is tried
        again), so one bad message never blocks the ones behind it. ``repeated``: the
        headers the message carries more than once with different values (an identity
        header among them is refused: which one would be meant?)."""
        found = self.route(topic)
        if found is None:
            raise Rejected(NO_ROUTE, f"no route for topic {topic[:300]}")
        twice = sorted(set(repeated) & IDENTITY_HEADERS)
        if twice:
            raise Rejected(BAD_HEADER, f"header {twice[0][:60]} is given twice with "
                                       "different values")
        route, m = found
        try:
            call = route.parse(Incoming(topic, value, headers, m, self.limits),
                               self.directory)
            tp = headers.get("traceparent")
            if isinstance(tp, str) and TRACEPARENT.match(tp):  # (anything else: ignored)
                call = dataclasses.replace(call, traceparent=tp)
            return call
        except (Rejected, MemoryError):
            raise
        except Exception as exc:
            if infra.is_infrastructure_error(exc):
                raise
            raise Rejected(BAD_MESSAGE, f"{type(exc).__name__}: "
                                        f"{' '.join(str(exc).split())[:300]}") from None
