"""Requests that arrive as Celery tasks, from the Kafka bridge or from other apps in any
language: resume, cancel, retry, an agent's answer. Each is checked at the edge (the
values, and that it names the client it acts for), then applied by the engine, where the
coordinator refuses it for another client's workflow.

A refused request raises (the task ends in FAILURE with the reason, and nothing is
written); a duplicate of a request already applied (a resume of a workflow no longer
paused, a cancel of a finished one) is logged and changes nothing. Each returns what
the task returns to its caller (through the result backend, see
:mod:`chassis.contract`): the workflow's id and status afterwards, with ``"ignored"``
saying why when nothing changed.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from chassis import coordinator as co
from chassis.engine import Engine
from chassis.errors import InputError, InvalidTransition, WorkflowNotFound
from chassis.limits import check_count, check_json, check_name, check_text
from chassis.policy import ERROR_NAME, ERROR_NAME_MAX
from chassis.state import json_copy
from chassis.status import status_dict

log = logging.getLogger(__name__)


def _cid(value: Any) -> str:
    try:
        return str(uuid.UUID(str(value)[:100]))
    except ValueError:
        raise InputError(f"correlation_id must be a UUID, got {str(value)[:60]!r}") from None


def _client(value: Any) -> str:
    if value is None:
        raise InputError("client_id is required: the client the request acts for")
    return check_name(value, "client_id").strip()  # as on Kafka and in the API


def _ignored(engine: Engine, what: str, cid: str, exc: InvalidTransition) -> dict[str, Any]:
    log.info("%s ignored: %s", what, exc, extra={"correlation_id": cid})
    return {"correlation_id": cid, "status": engine.store.get(cid).status.value,
            "ignored": str(exc)}


def _done(decision: co.Decision) -> dict[str, Any]:
    return {"correlation_id": decision.state.correlation_id,
            "status": decision.state.status.value}


def status(engine: Engine, correlation_id: Any, client_id: Any = None) -> dict[str, Any]:
    """The workflow's status document, for its own client only (another's, or an
    unknown id: WorkflowNotFound, the same words)."""
    cid, actor = _cid(correlation_id), _client(client_id)
    if engine.store.owner(cid) != actor:
        raise WorkflowNotFound(co.not_found(cid), correlation_id=cid)
    return json_copy(status_dict(*engine.store.snapshot(cid)))


def resume(engine: Engine, correlation_id: Any, approved: Any, feedback: Any = None,
           client_id: Any = None, add_fuel: Any = 0, step: Any = None) -> dict[str, Any]:
    cid, actor = _cid(correlation_id), _client(client_id)
    if not isinstance(approved, bool):
        raise InputError("approved must be true or false")
    feedback = check_json(feedback, "feedback", engine.settings.limits)
    added = 0 if add_fuel is None or (type(add_fuel) is int and add_fuel == 0) \
        else check_count(add_fuel, "add_fuel")
    step = None if step is None else check_name(step, "step")
    try:
        return _done(engine.resume(cid, approved, feedback, actor, added, step=step))
    except InvalidTransition as exc:
        return _ignored(engine, "resume", cid, exc)


def cancel(engine: Engine, correlation_id: Any, reason: Any = None,
           client_id: Any = None, compensate: Any = False) -> dict[str, Any]:
    cid, actor = _cid(correlation_id), _client(client_id)
    text = None if reason is None else check_text(reason, "reason") or None
    if not isinstance(compensate, bool):
        raise InputError("compensate must be true or false")
    try:
        return _done(engine.cancel(cid, text, actor, compensate))
    except InvalidTransition as exc:
        return _ignored(engine, "cancel", cid, exc)


def retry(engine: Engine, correlation_id: Any, client_id: Any = None) -> dict[str, Any]:
    cid, actor = _cid(correlation_id), _client(client_id)
    try:
        return _done(engine.retry(cid, actor))
    except InvalidTransition as exc:
        return _ignored(engine, "retry", cid, exc)


def respond(engine: Engine, correlation_id: Any, request_id: Any, success: Any,
            data: Any = None, error: Any = None, error_type: Any = None,
            client_id: Any = None) -> None:
    """An agent's TaskResponse to ``request_id`` (its causation_id)."""
    cid, actor = _cid(correlation_id), _client(client_id)
    rid = check_name(request_id, "request_id")
    if not isinstance(success, bool):
        raise InputError("success must be true or false")
    data = check_json(data, "data", engine.settings.limits)
    if error is not None:
        error = check_text(error, "error", max_length=10_000)
    if error_type is not None and not (isinstance(error_type, str)
                                       and len(error_type) <= ERROR_NAME_MAX
                                       and ERROR_NAME.match(error_type)):
        raise InputError("error_type must be an error type name such as RateLimited")
    engine.respond(cid, co.ResponseReceived(rid, success, data, error, error_type, actor))


__all__ = ["cancel", "respond", "resume", "retry", "status"]
