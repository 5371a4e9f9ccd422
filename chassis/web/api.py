"""The JSON API under ``/api/v1`` (OpenAPI at ``/openapi.json``): the Python API's
operations over HTTP, for apps in any language.

Every route needs an API key (``Authorization: Bearer KEY``); a key sees and acts on
its client's workflows only (another client's is 404, as an unknown id), an admin key
on all. Errors are ``{"error": CODE, "message": TEXT}`` (``problems``: one line per
problem of an invalid plan) with the status that fits: 400 malformed JSON, 401 no
valid key, 403 not allowed for this key, 404 unknown, 409 refused for the workflow's
state or a conflicting start, 413 too large, 422 invalid input (nothing written), 503
a service unreachable.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from chassis.api import Client, parse_since
from chassis.errors import InputError, PlanError
from chassis.fuel import DEFAULT_FUEL
from chassis.limits import INT32_MAX, check_count, check_json, check_name
from chassis.plan import Plan, parse_plan, plan_to_dict
from chassis.registry import RegisteredPlan, parse_ref
from chassis.registry import check_name as check_plan_name
from chassis.state import Status
from chassis.validation import validate
from chassis.web.auth import AuthError, Principal, authenticate

log = logging.getLogger(__name__)

#: How the OpenAPI document tells of the key (the check itself is :func:`principal`).
_scheme = HTTPBearer(auto_error=False, description="An API key: `chassis keys create CLIENT`")


#: A registered plan's name (the registry's rule).
PLAN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$"
PLAN_REF = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}(@[1-9][0-9]{0,9})?$"


class Error(BaseModel):
    """An error: what went wrong, in words; nothing was written."""

    error: str = Field(description="not_found, invalid_input, invalid_plan, "
                                   "malformed_json, unauthorized, forbidden, conflict, "
                                   "refused, too_large, rate_limited, method_not_allowed, "
                                   "unavailable, internal")
    message: str
    problems: list[str] | None = None
    correlation_id: str | None = None
    retry_after: int | None = Field(None, description="rate_limited: seconds until this "
                                                       "key may ask again (as Retry-After)")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text} for code, text in (
        (400, "Malformed JSON"), (401, "No valid API key"), (403, "Not allowed for this key"),
        (404, "Unknown (or another client's) workflow or plan"),
        (413, "Request body too large"), (422, "Invalid input; nothing written"),
        (503, "The database or broker is unreachable"))}
ERRORS[429] = {"model": Error, "description": "This key is over its rate limit "
                                              "(CHASSIS_WEB_RATE_LIMIT)",
               "headers": {"Retry-After": {"description": "Seconds until the key may ask "
                                                          "again",
                                           "schema": {"type": "integer"}}}}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": Error, "description": "Refused for the workflow's state, or a "
                                         "conflicting start"}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StartRequest(_Body):
    plan: Annotated[str, Field(pattern=PLAN_REF, max_length=266)] | dict[str, Any] = Field(
        description="A registered plan's name (`name` for the latest version, `name@N` "
                    "for version N), or a plan document (the plan format, inline)")
    input: Any = Field(None, description="The workflow's input (any JSON)")
    fuel_budget: StrictInt = Field(DEFAULT_FUEL, ge=1, le=INT32_MAX)
    correlation_id: str | None = Field(
        None, description="A UUID: starting the same id with the same request again "
                          "returns it and changes nothing")
    project_id: str | None = None
    request_id: str | None = None
    client_id: str | None = Field(
        None, description="Admin keys only: the client the workflow is for (default: "
                          "the key's)")


class ResumeRequest(_Body):
    approved: StrictBool
    feedback: Any = Field(None, description="Kept as the workflow's human_feedback")
    add_fuel: StrictInt = Field(0, ge=0, le=INT32_MAX,
                                description="Fuel added to the budget first")
    step: str | None = Field(None, min_length=1, max_length=255,
                             description="The step whose approval this answers: refused "
                                         "(409) when the workflow waits at another (that "
                                         "approval expired, or was answered)")


class CancelRequest(_Body):
    reason: str | None = Field(None, max_length=1000)
    compensate: StrictBool = Field(False, description="Undo the completed steps first")


class RetryRequest(_Body):
    pass


class RegisterRequest(_Body):
    name: str = Field(pattern=PLAN_NAME, max_length=255)
    plan: dict[str, Any]


class Fuel(BaseModel):
    budget: int
    spent: int
    reserved: int
    remaining: int


class Attempt(BaseModel):
    attempt: int
    status: str
    error: str | None
    error_type: str | None
    deliveries: int | None
    dispatched_at: str | None
    due_at: str | None
    started_at: str | None
    finished_at: str | None
    deadline: str | None = None
    """When a running attempt times out, an agent's request or an approval expires."""


class Step(BaseModel):
    name: str
    compensates: str | None
    action: str
    status: str
    attempts: int
    max_attempts: int | None
    parent_step: str | None
    error: str | None
    dispatched_at: str | None
    due_at: str | None
    started_at: str | None
    finished_at: str | None
    deadline: str | None = None
    """The latest attempt's: when it times out (a pause's: when its approval expires)."""
    history: list[Attempt]


class WorkflowStatus(BaseModel):
    """A workflow's status document (as `chassis status --json`)."""

    model_config = ConfigDict(extra="allow")

    correlation_id: str
    client_id: str
    project_id: str | None
    status: str
    current_step: str | None
    waiting_for: str | None
    input: Any
    final_result: Any
    error: str | None
    fuel: Fuel
    collected_data: dict[str, Any]
    steps: list[Step]
    plan_name: str | None = None
    plan_version: int | None = None
    created_at: str | None
    updated_at: str | None
    version: int


class WorkflowSummary(BaseModel):
    correlation_id: str
    client_id: str
    project_id: str | None
    status: str
    current_step: str | None
    error: str | None
    plan: str | None = Field(description="The registered plan's name, else the plan's")
    plan_version: int | None
    fuel: dict[str, int]
    created_at: str | None
    updated_at: str | None
    version: int


class WorkflowPage(BaseModel):
    items: list[WorkflowSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; "
                                                "null on the last")


class LedgerEntry(BaseModel):
    kind: str
    step: str
    action: str
    amount: int
    held: int
    total: int = Field(description="Fuel spent up to and including this row")
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    usage: Any
    created_at: str | None


class Ledger(BaseModel):
    correlation_id: str
    fuel: Fuel
    entries: list[LedgerEntry]


class Event(BaseModel):
    at: str | None
    kind: str
    step: str | None
    attempt: int | None
    actor: str | None
    version: int | None
    data: Any


class Events(BaseModel):
    correlation_id: str
    events: list[Event]


class PlanSummary(BaseModel):
    name: str
    latest: int
    versions: int
    last_registered: str | None


class RegisteredPlanDoc(BaseModel):
    name: str
    version: int
    content_hash: str
    created_at: str
    created: bool | None = Field(None, description="On registration: false when the same "
                                                   "content was there already")
    plan: dict[str, Any]


class Me(BaseModel):
    key_id: str
    client_id: str
    admin: bool


class Health(BaseModel):
    status: str
    checks: dict[str, str] | None = None


def principal(request: Request,
              _: Annotated[HTTPAuthorizationCredentials | None, Depends(_scheme)]
              ) -> Principal:
    """The key the request came with (the header, or the console's cookie)."""
    return authenticate(request, request.app.state.client)


Who = Annotated[Principal, Depends(principal)]
#: A workflow's id in a path: a UUID (anything else: 422 with a clear message).
Cid = Annotated[uuid.UUID, Path(description="The workflow's correlation_id (a UUID)")]
router = APIRouter(prefix="/api/v1", responses=ERRORS)


def _status(client: Client, cid: str) -> dict[str, Any]:
    return _with_plan(client, client.status(cid))


def _with_plan(client: Client, doc: dict[str, Any]) -> dict[str, Any]:
    """A status document with the registered plan it runs (``plan_name``, ``plan_version``)."""
    doc["plan_name"], doc["plan_version"] = client.store.plan_ref(doc["correlation_id"])
    return doc


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    return {"correlation_id": r["correlation_id"], "client_id": r["client_id"],
            "project_id": r["project_id"], "status": r["status"],
            "current_step": r["current_step"] or None, "error": r["error"],
            "plan": r["plan_name"] or r["plan_title"], "plan_version": r["plan_version"],
            "fuel": {"budget": r["fuel_budget"], "spent": r["fuel_spent"]},
            "created_at": _iso(r["created_at"]), "updated_at": _iso(r["updated_at"]),
            "version": r["version"]}


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def _cursor(r: dict[str, Any]) -> str:
    raw = f"{r['created_at'].isoformat()}|{r['correlation_id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, cid = text.split("|", 1)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("no time zone")
        return when.astimezone(UTC), str(uuid.UUID(cid))
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise InputError("cursor is not one this API gave (pass next_cursor as it is)") \
            from None


def list_runs(who: Principal, status: str | None = None, plan: str | None = None,
              since: str | None = None, limit: int = 50,
              cursor: str | None = None) -> dict[str, Any]:
    """A page of the workflows ``who`` sees (shared with the console)."""
    if status is not None and status not in Status.__members__:
        raise InputError(f"unknown status {status[:40]!r}; one of: {', '.join(Status)}")
    if plan is not None:
        plan = check_name(plan, "plan")
    limit = check_count(limit, "limit", most=500)
    rows = who.client.store.runs(
        client_id=None if who.admin else who.client.client_id, status=status, plan=plan,
        since=parse_since(since), after=_after(cursor), limit=limit + 1)
    page = rows[:limit]
    return {"items": [_summary(r) for r in page],
            "next_cursor": _cursor(page[-1]) if len(rows) > limit else None}


def resolve_plan(client: Client, plan: str | dict[str, Any]
                 ) -> tuple[Plan, RegisteredPlan | None]:
    """A registered plan by ``name``/``name@N``, or an inline document (validated)."""
    if isinstance(plan, str):
        name, version = parse_ref(plan)
        found = client.registry.get(name, version)
        return found.plan, found
    parsed = parse_plan(plan, client.limits)
    return parsed, None


@router.get("/me", response_model=Me, summary="The key this request came with")
def me(who: Who) -> dict[str, Any]:
    return {"key_id": who.key.key_id, "client_id": who.key.client_id, "admin": who.admin}


@router.post("/workflows", status_code=201, response_model=WorkflowStatus,
             responses=CONFLICT, summary="Start a workflow")
def start(body: StartRequest, who: Who, response: Response) -> dict[str, Any]:
    client = who.client
    if body.client_id is not None and not who.admin and body.client_id != who.key.client_id:
        raise AuthError(403, "client_id: only an admin key starts workflows for another "
                             "client (leave it out: the key's client is used)")
    check_json(body.input, "input", client.limits)  # (before the plan is looked up)
    p, found = resolve_plan(client, body.plan)
    cid = client.start(
        p, body.input, client_id=body.client_id, fuel_budget=body.fuel_budget,
        correlation_id=body.correlation_id, project_id=body.project_id,
        request_id=body.request_id, check_actions=found is None,
        plan_name=found.name if found else None,
        plan_version=found.version if found else None)
    response.headers["Location"] = f"/api/v1/workflows/{cid}"
    return _status(client, cid)


@router.get("/workflows", response_model=WorkflowPage, summary="List workflows")
def list_workflows(
        who: Who,
        status: Annotated[Status | None, Query(description="Only in this status")] = None,
        plan: Annotated[str | None, Query(max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$",
                                          description="Only of this plan (name)")] = None,
        since: Annotated[str | None, Query(
            max_length=64, description="Started then or later (YYYY-MM-DD or ISO 8601)")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(
            max_length=200, pattern=r"^[A-Za-z0-9_-]+$",
            description="next_cursor of the page before")] = None) -> dict[str, Any]:
    return list_runs(who, status.value if status else None, plan, since, limit, cursor)


@router.get("/workflows/{correlation_id}", response_model=WorkflowStatus,
            summary="A workflow's status, steps and attempts")
def get_workflow(correlation_id: Cid, who: Who) -> dict[str, Any]:
    return _status(who.client, str(correlation_id))


@router.get("/workflows/{correlation_id}/plan", response_model=dict[str, Any],
            summary="The plan the workflow runs (its snapshot)")
def get_workflow_plan(correlation_id: Cid, who: Who) -> dict[str, Any]:
    cid = who.client._own(str(correlation_id))
    return plan_to_dict(who.client.store.get_plan(cid))


@router.get("/workflows/{correlation_id}/ledger", response_model=Ledger,
            summary="The workflow's fuel ledger, with a running total")
def get_ledger(correlation_id: Cid, who: Who) -> dict[str, Any]:
    doc = who.client.status(str(correlation_id))
    return {"correlation_id": doc["correlation_id"], "fuel": doc["fuel"],
            "entries": ledger_with_totals(who.client, doc["correlation_id"])}


def ledger_with_totals(client: Client, cid: str) -> list[dict[str, Any]]:
    """The workflow's ledger rows, each with ``total``: the fuel spent up to it."""
    total, entries = 0, []
    for e in client.ledger(cid):
        total += e["amount"]
        entries.append({**e, "total": total})
    return entries


@router.get("/workflows/{correlation_id}/events", response_model=Events,
            summary="The workflow's event history, oldest first")
def get_events(correlation_id: Cid, who: Who) -> dict[str, Any]:
    cid = str(correlation_id)
    return {"correlation_id": cid, "events": who.client.events(cid)}


@router.post("/workflows/{correlation_id}/resume", response_model=WorkflowStatus,
             responses=CONFLICT, summary="Approve or reject a paused workflow")
def resume(correlation_id: Cid, body: ResumeRequest, who: Who) -> dict[str, Any]:
    cid = who.client._own(str(correlation_id))
    return _with_plan(who.client, who.client.resume(
        cid, body.approved, body.feedback, add_fuel=body.add_fuel, step=body.step))


@router.post("/workflows/{correlation_id}/cancel", response_model=WorkflowStatus,
             responses=CONFLICT, summary="Cancel a workflow (optionally compensating)")
def cancel(correlation_id: Cid, body: CancelRequest, who: Who) -> dict[str, Any]:
    cid = who.client._own(str(correlation_id))
    return _with_plan(who.client, who.client.cancel(cid, body.reason, body.compensate))


@router.post("/workflows/{correlation_id}/retry", response_model=WorkflowStatus,
             responses=CONFLICT, summary="Retry a FAILED workflow from its failed step")
def retry(correlation_id: Cid, who: Who,
          body: RetryRequest | None = None) -> dict[str, Any]:
    cid = who.client._own(str(correlation_id))
    return _with_plan(who.client, who.client.retry(cid))


@router.get("/plans", response_model=list[PlanSummary], summary="Registered plans")
def list_plans(who: Who) -> list[dict[str, Any]]:
    return [{**r, "last_registered": _iso(r["last_registered"])}
            for r in who.client.registry.list_plans()]


def _plan_doc(p: RegisteredPlan, created: bool | None = None) -> dict[str, Any]:
    return {"name": p.name, "version": p.version, "content_hash": p.content_hash,
            "created_at": p.created_at.isoformat(), "created": created, "plan": p.content}


@router.get("/plans/{name}", response_model=RegisteredPlanDoc,
            summary="A registered plan (the latest version, or `version`)")
def get_plan(name: Annotated[str, Path(pattern=PLAN_NAME, max_length=255)], who: Who,
             version: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None
             ) -> dict[str, Any]:
    return _plan_doc(who.client.registry.get(check_name(name, "plan name"), version))


@router.post("/plans", response_model=RegisteredPlanDoc, status_code=201,
             summary="Register a plan (admin keys): a new version, or the same one")
def register_plan(body: RegisterRequest, who: Who, response: Response) -> dict[str, Any]:
    who.require_admin("registering a plan")
    name = check_plan_name(body.name)
    p = parse_plan(body.plan, who.client.limits)
    from chassis import actions

    problems = validate(p, set(actions.registered()))
    if problems:
        raise PlanError(f"plan {name!r} is not valid", problems)
    done = who.client.registry.register(name, p)
    log.info("plan %s version %s %s by %s", name, done.plan.version,
             "registered" if done.created else "unchanged", who.client.by)
    if not done.created:
        response.status_code = 200
    return _plan_doc(done.plan, done.created)

