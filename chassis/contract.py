"""The task contract for other apps, in any language: the Celery tasks they may send,
their JSON arguments (a JSON Schema each), the queue, and what each returns.

Versioned: ``VERSION`` changes when a task, an argument or a result changes in a way an
existing caller would notice (a new optional argument does not). ``chassis contract``
prints this document; the README's "Task contract" section explains it.

Every task takes positional ``args`` (and no kwargs) in JSON; results are JSON, stored
in the result backend (``CHASSIS_RESULT_BACKEND``) for a caller's ``AsyncResult.get()``.
A refused request (bad arguments, another client's or an unknown workflow, a plan that
is not registered) ends the task in FAILURE, and ``get()`` raises with the reason;
nothing was written. Every request names the client it acts for (``client_id``); a
workflow is visible to its own client only.
"""

from __future__ import annotations

from typing import Any

from chassis.celery_conf import (
    CANCEL_TASK,
    COORDINATION_QUEUE,
    DEFAULT_QUEUE,
    RESUME_TASK,
    RETRY_TASK,
    START_TASK,
    STATUS_TASK,
)
from chassis.limits import INT32_MAX, NAME_MAX

VERSION = 1

_UUID = {"type": "string", "format": "uuid",
         "description": "The workflow's correlation_id (a UUID)."}
_CLIENT = {"type": "string", "minLength": 1, "maxLength": NAME_MAX,
           "description": "The client the request acts for (the workflow's owner)."}
_STATUS = {"type": "string", "enum": [
    "RUNNING", "AWAITING_RESPONSES", "PAUSED_FOR_HUMAN_INPUT", "COMPLETED", "FAILED",
    "CANCELLED", "COMPENSATING", "COMPENSATED"]}
_OUTCOME = {
    "type": "object", "required": ["correlation_id", "status"],
    "properties": {"correlation_id": _UUID, "status": _STATUS,
                   "ignored": {"type": "string", "description":
                               "Present when the request changed nothing (a repeated "
                               "resume, a cancel of a finished workflow): why."}}}


def _args(*items: dict[str, Any], required: int) -> dict[str, Any]:
    return {"type": "array", "prefixItems": list(items), "minItems": required,
            "maxItems": len(items), "items": False}


TASKS: dict[str, dict[str, Any]] = {
    START_TASK: {
        "summary": "Start a registered plan (`chassis plan register NAME FILE`). "
                   "Idempotent by correlation_id: the same request again returns the same "
                   "workflow.",
        "args": _args({"type": "object", "required": ["plan", "correlation_id", "client_id"],
                       "properties": {
                           "plan": {"type": "string", "description": "registered plan name"},
                           "version": {"type": "integer", "minimum": 1,
                                       "description": "plan version (default: the latest)"},
                           "correlation_id": _UUID, "client_id": _CLIENT,
                           "input": {"description": "initial request data (any JSON)"},
                           "fuel_budget": {"type": "integer", "minimum": 1},
                           "project_id": {"type": "string", "maxLength": NAME_MAX},
                           "request_id": {"type": "string", "maxLength": NAME_MAX}},
                       "additionalProperties": True}, required=1),
        "returns": _OUTCOME,
    },
    STATUS_TASK: {
        "summary": "The workflow's status document (as `chassis status ID --json`).",
        "args": _args(_UUID, _CLIENT, required=2),
        "returns": {"type": "object", "required": ["correlation_id", "status", "steps"],
                    "properties": {"correlation_id": _UUID, "status": _STATUS}},
    },
    RESUME_TASK: {
        "summary": "Approve or reject a workflow PAUSED_FOR_HUMAN_INPUT; feedback is "
                   "kept as human_feedback.",
        "args": _args(_UUID, {"type": "boolean", "description": "approved"},
                      {"description": "feedback (any JSON, or null)"}, _CLIENT,
                      {"type": "integer", "minimum": 0, "maximum": INT32_MAX,
                       "description": "add_fuel: fuel added to the budget first"},
                      {"type": ["string", "null"], "minLength": 1, "maxLength": NAME_MAX,
                       "description": "step: the pause this answers; ignored (the "
                                      "result's `ignored` says why) when the workflow "
                                      "waits at another (its approval expired, or was "
                                      "answered)"},
                      required=4),
        "returns": _OUTCOME,
    },
    CANCEL_TASK: {
        "summary": "Cancel a workflow that has not finished (with compensate: undo its "
                   "completed steps first).",
        "args": _args(_UUID, {"type": ["string", "null"], "description": "reason"},
                      _CLIENT, {"type": "boolean", "description": "compensate"},
                      required=3),
        "returns": _OUTCOME,
    },
    RETRY_TASK: {
        "summary": "Retry a FAILED workflow from its failed step.",
        "args": _args(_UUID, _CLIENT, required=2),
        "returns": _OUTCOME,
    },
}


def document() -> dict[str, Any]:
    """The contract as one JSON document (``chassis contract``)."""
    return {
        "version": VERSION,
        "queue": COORDINATION_QUEUE,
        "default_queue": DEFAULT_QUEUE,
        "serializer": "json",
        "protocol": "Celery task message protocol 2 (protocol 1 is accepted too)",
        "results": "stored in the result backend (CHASSIS_RESULT_BACKEND); a refusal "
                   "is a FAILURE whose message says why",
        "tasks": {name: {**spec, "args": {"$schema": "https://json-schema.org/draft/"
                                                     "2020-12/schema", **spec["args"]}}
                  for name, spec in TASKS.items()},
    }


__all__ = ["TASKS", "VERSION", "document"]
