"""The web console: sign in with an API key, watch runs, open a workflow, answer the
approvals inbox. Server-rendered pages (Jinja2) with a little JavaScript of our own
for self-updating lists; every asset is served from the package (nothing from the
internet). Forms carry the session's CSRF token (:mod:`chassis.web.auth`).

Pages that change (the runs, a workflow that has not finished, the inbox) are polled
by console.js: the same URL with ``?partial=1`` answers the page's live part only, and
``X-Poll: stop`` once nothing more will change.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from chassis.errors import ChassisError, WorkflowNotFound
from chassis.plan import FAN_OUT, PAUSE, Plan
from chassis.state import Status, compensated_step
from chassis.store import keys
from chassis.web import graph
from chassis.web.api import ledger_with_totals
from chassis.web.auth import COOKIE, AuthError, Principal, authenticate, same_origin
from chassis.web.render import FILTERS, ai_output

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(FILTERS)
router = APIRouter(include_in_schema=False)
static = StaticFiles(directory=str(HERE / "static"))

#: The status filters of the runs page, in the order shown.
STATUS_FILTERS = ("RUNNING", "AWAITING_RESPONSES", "PAUSED_FOR_HUMAN_INPUT", "COMPLETED",
                  "FAILED", "CANCELLED", "COMPENSATING", "COMPENSATED")
#: Status -> colour class of its badge.
STATUS_TONES = {"COMPLETED": "done", "FAILED": "failed", "RUNNING": "active",
                "AWAITING_RESPONSES": "active", "PAUSED_FOR_HUMAN_INPUT": "waiting",
                "CANCELLED": "undone", "COMPENSATING": "undone", "COMPENSATED": "undone",
                **graph.TONES}
#: What the pages say after a form did its work (``?done=``).
DONE = {"approved": "Approved: the workflow goes on.",
        "rejected": "Rejected: the workflow failed at the review (Retry asks again).",
        "cancelled": "Cancelled.", "compensating": "Cancelling: its completed steps are "
        "being undone.", "retried": "Retried from its failed step."}
RUNS_PAGE = 50
INBOX_MOST = 100
#: Most events shown on a workflow's page (the latest; the API has them all).
EVENTS_MOST = 1000


def status_words(status: object) -> str:
    text = str(status or "")
    return {"PAUSED_FOR_HUMAN_INPUT": "Paused for approval",
            "AWAITING_RESPONSES": "Awaiting responses", "NOT_RUN": "Not run"}.get(
        text, text.replace("_", " ").capitalize())


templates.env.globals.update(status_tone=lambda s: STATUS_TONES.get(str(s), "idle"),
                             status_words=status_words)


def render(request: Request, name: str, who: Principal | None = None,
           status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {
        "who": who, "csrf": who.csrf_token if who else "", **context},
        status_code=status_code)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    """An error shown as a page (the API answers JSON instead)."""
    return render(request, "error.html", None, status_code=status, status=status,
                  message=message)


async def _form(request: Request) -> dict[str, Any]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def signed_in(request: Request, form: dict[str, Any] | None = None) -> Principal:
    """The console's user (AuthError: sent to the sign-in page); for a POST, ``form``
    is the form it sent (its CSRF token checked). Reads the database: call it from a
    plain ``def`` route or a thread (:func:`_threaded`), never in the event loop."""
    return authenticate(request, request.app.state.client, form, cookie_only=True)


async def _threaded(request: Request, fn: Any, *args: Any) -> Any:
    """A POST route's work: the form read here, then ``fn(request, form, *args)`` in a
    thread (the database is never waited on in the event loop)."""
    form = await _form(request)
    return await run_in_threadpool(fn, request, form, *args)


def _partial(request: Request) -> bool:
    return request.query_params.get("partial") == "1"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return render(request, "login.html", error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    return await _threaded(request, _login)  # type: ignore[no-any-return]


def _login(request: Request, form: dict[str, Any]) -> Response:
    if not same_origin(request):
        raise AuthError(403, "cross-site sign-in refused")
    key = (form.get("key") or "").strip()
    found = keys.verify(request.app.state.client.store.engine, key) if key else None
    if found is None:
        return render(request, "login.html", status_code=401,
                      error="This key is not valid (unknown, mistyped, revoked or "
                                "expired).")
    response = RedirectResponse("/runs", status_code=303)
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Sign out: the cookie is dropped (a revoked key's too); only this site's pages may
    ask (a cross-site logout is refused)."""
    if not same_origin(request):
        raise AuthError(403, "cross-site request refused")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/")
def home() -> Response:
    return RedirectResponse("/runs", status_code=303)


# ------------------------------------------------------------------------------ runs

@router.get("/runs", response_class=HTMLResponse)
def runs(request: Request) -> Response:
    from chassis.web.api import list_runs

    who = signed_in(request)
    status = request.query_params.get("status") or None
    if status is not None and status not in Status.__members__:
        status = None
    cursor = request.query_params.get("cursor") or None
    page = list_runs(who, status, limit=RUNS_PAGE, cursor=cursor)
    base = {"status": status} if status else {}
    context: dict[str, Any] = {
        "page": page, "status": status, "filters": STATUS_FILTERS, "cursor": cursor,
        "live_url": "/runs?" + urlencode({**base, **({"cursor": cursor} if cursor else {})}),
        "older_url": "/runs?" + urlencode({**base, "cursor": page["next_cursor"]})
        if page["next_cursor"] else None,
        "newest_url": "/runs?" + urlencode(base) if cursor else None,
    }
    if _partial(request):
        return render(request, "_runs_table.html", who, **context)
    return render(request, "runs.html", who, **context)


# -------------------------------------------------------------------------- workflow

def _outputs(plan: Plan | None, doc: dict[str, Any]) -> dict[str, Any]:
    """Each step's output worth showing with it (a fan_out's is its sub-tasks',
    shown with them)."""
    data = doc.get("collected_data") or {}
    out: dict[str, Any] = {}
    for name, value in data.items():
        step = plan.steps.get(name) if plan else None
        if step is not None and step.action == FAN_OUT:
            continue
        out[name] = value
    return out


def _step_rows(plan: Plan | None, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps table: the steps that ran (in their order), then the plan's others."""
    rows: list[dict[str, Any]] = []
    seen = set()
    for d in doc.get("steps") or []:
        seen.add(d["name"])
        rows.append({**d, "kind": "compensation" if d["compensates"] else (
            "sub_task" if d["parent_step"] else "step"), "ran": True})
    for name in graph.plan_order(plan) if plan else []:
        if name in seen:
            continue
        owned = plan.subtask(name) if plan else None
        if owned is not None:
            action = owned[1].resolved_action
        else:
            action = plan.steps[name].action if plan else ""
        rows.append({"name": name, "action": action, "status": "NOT_RUN", "history": [],
                     "kind": "sub_task" if owned else "step", "parent_step":
                     owned[0] if owned else None, "compensates": None, "ran": False,
                     "attempts": 0, "max_attempts": None, "error": None})
    for r in rows:
        r["shown_status"] = graph.node_status(r["name"], r["action"], doc,
                                              {d["name"]: d for d in doc.get("steps") or []})
        step = plan.steps.get(r["name"]) if plan else None
        r["description"] = step.description if step else ""
        r["undoes"] = compensated_step(r["name"])
    return rows


def _workflow(who: Principal, cid: str) -> dict[str, Any]:
    doc = who.client.status(cid)
    cid = doc["correlation_id"]
    plan_name, plan_version = who.client.store.plan_ref(cid)
    plan = who.client.store.get_plan(cid)
    status = doc["status"]
    finished = Status(status).finished
    events = who.client.events(cid)
    return {
        "doc": doc, "cid": cid, "plan": plan, "plan_name": plan_name or plan.name,
        "plan_version": plan_version, "finished": finished,
        "graph": graph.plan_svg(plan, doc), "legend": graph.LEGEND,
        "edge_legend": graph.EDGE_LEGEND, "steps": _step_rows(plan, doc),
        "outputs": _outputs(plan, doc), "ledger": ledger_with_totals(who.client, cid),
        "events": events[-EVENTS_MOST:], "events_total": len(events),
        "other_data": {k: v for k, v in (doc.get("collected_data") or {}).items()
                       if k not in plan.steps and plan.subtask(k) is None},
        "can_resume": status == Status.PAUSED_FOR_HUMAN_INPUT,
        "can_cancel": not finished and status != Status.COMPENSATING,
        "can_retry": status == Status.FAILED,
        "pause_description": _pause_description(plan, doc),
    }


def _pause_description(plan: Plan, doc: dict[str, Any]) -> str:
    step = plan.steps.get(doc.get("current_step") or "")
    return step.description if step is not None else ""


def _show_workflow(request: Request, who: Principal, cid: str, status_code: int = 200,
                   **extra: Any) -> Response:
    context = _workflow(who, cid)
    done = request.query_params.get("done")
    context.update({"flash": DONE.get(done or ""), "error": None, **extra})
    context["live_url"] = f"/workflows/{context['cid']}"
    if _partial(request):
        response = render(request, "_workflow_body.html", who, **context)
    else:
        response = render(request, "workflow.html", who, status_code, **context)
    if context["finished"]:
        response.headers["X-Poll"] = "stop"
    return response


@router.get("/workflows/{cid}", response_class=HTMLResponse)
def workflow_page(request: Request, cid: str) -> Response:
    who = signed_in(request)
    return _show_workflow(request, who, cid)


def _back(form: dict[str, Any], cid: str, done: str) -> str:
    if form.get("back") == "inbox":
        return f"/inbox?{urlencode({'done': done, 'cid': cid})}"
    return f"/workflows/{cid}?{urlencode({'done': done})}"


def _uuid(text: str | None) -> str | None:
    try:
        return str(uuid.UUID(text)) if text else None
    except ValueError:
        return None


def _act(request: Request, form: dict[str, Any], cid: str, doing: str) -> Response:
    """Carry out a form's decision; its page again with the error when refused."""
    who = signed_in(request, form)
    cid = who.client._own(cid)
    try:
        if doing == "resume":
            decision = form.get("decision")
            if decision not in ("approve", "reject"):
                raise _Refused("choose Approve or Reject")
            comment = (form.get("comment") or "").strip()
            fuel_text = (form.get("add_fuel") or "").strip()
            if fuel_text and not (fuel_text.isascii() and fuel_text.isdigit()):
                raise _Refused("fuel to add must be a whole number")
            who.client.resume(cid, decision == "approve",
                              {"comment": comment} if comment else None,
                              add_fuel=int(fuel_text or 0), step=form.get("step") or None)
            done = "approved" if decision == "approve" else "rejected"
        elif doing == "cancel":
            compensate = form.get("compensate") in ("1", "on", "true")
            who.client.cancel(cid, (form.get("reason") or "").strip() or None, compensate)
            done = "compensating" if compensate else "cancelled"
        else:
            who.client.retry(cid)
            done = "retried"
    except WorkflowNotFound:
        raise
    except (ChassisError, _Refused) as exc:
        from chassis.web import error_of

        status = 422 if isinstance(exc, _Refused) else error_of(exc)[0]
        message = f"Not done: {exc}"
        if form.get("back") == "inbox":
            return _show_inbox(request, who, status, error=message)
        return _show_workflow(request, who, cid, status, error=message)
    return RedirectResponse(_back(form, cid, done), status_code=303)


class _Refused(Exception):
    """A form that cannot be carried out as sent."""


@router.post("/workflows/{cid}/resume")
async def resume(request: Request, cid: str) -> Response:
    return await _threaded(request, _act, cid, "resume")  # type: ignore[no-any-return]


@router.post("/workflows/{cid}/cancel")
async def cancel(request: Request, cid: str) -> Response:
    return await _threaded(request, _act, cid, "cancel")  # type: ignore[no-any-return]


@router.post("/workflows/{cid}/retry")
async def retry(request: Request, cid: str) -> Response:
    return await _threaded(request, _act, cid, "retry")  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- inbox

def _review_items(plan: Plan, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """What a person reviews: the outputs so far, latest step first, each with its
    step's description (a fan_out's sub-tasks under it)."""
    data = doc.get("collected_data") or {}
    done = {d["name"]: d for d in doc.get("steps") or []}
    items = []
    for name in graph.plan_order(plan):
        if name not in data or name == doc.get("current_step"):
            continue
        step = plan.steps.get(name)
        if step is not None and step.action in (FAN_OUT, PAUSE):
            continue
        owned = plan.subtask(name)
        items.append({"name": name, "value": data[name], "ai": ai_output(data[name]),
                      "description": step.description if step else "",
                      "parent": owned[0] if owned else None,
                      "finished_at": (done.get(name) or {}).get("finished_at")})
    return items


def _show_inbox(request: Request, who: Principal, status_code: int = 200,
                **extra: Any) -> Response:
    from chassis.web.api import list_runs

    page = list_runs(who, Status.PAUSED_FOR_HUMAN_INPUT.value, limit=INBOX_MOST)
    entries = []
    for summary in page["items"]:
        try:
            doc = who.client.status(summary["correlation_id"])
            plan = who.client.store.get_plan(doc["correlation_id"])
        except WorkflowNotFound:  # gone meanwhile
            continue
        if doc["status"] != Status.PAUSED_FOR_HUMAN_INPUT:
            continue
        entries.append({"summary": summary, "doc": doc, "plan": plan,
                        "pause_description": _pause_description(plan, doc),
                        "review": _review_items(plan, doc)})
    done = request.query_params.get("done")
    context = {"entries": entries, "more": page["next_cursor"] is not None,
               "flash": DONE.get(done or ""), "error": None, "live_url": "/inbox",
               "flash_cid": _uuid(request.query_params.get("cid")), **extra}
    if _partial(request):
        return render(request, "_inbox_items.html", who, **context)
    return render(request, "inbox.html", who, status_code, **context)


@router.get("/inbox", response_class=HTMLResponse)
def inbox(request: Request) -> Response:
    who = signed_in(request)
    return _show_inbox(request, who)
