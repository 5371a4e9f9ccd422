"""``chassis web``: the HTTP API (``/api/v1``, OpenAPI at ``/openapi.json``) and the web
console (``/``), one ASGI app served by uvicorn.

:func:`create_app` builds it around one :class:`~chassis.api.Client` (its store,
broker and plan registry); each request acts through a view of it for the request's
API key (:mod:`chassis.web.auth`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from chassis import config, infra
from chassis.api import Client
from chassis.cli.errors import describe
from chassis.errors import (
    ChassisError,
    InputError,
    InvalidTransition,
    PlanError,
    PlanNotFound,
    ServiceUnavailable,
    WorkflowConflict,
    WorkflowNotFound,
)
from chassis.web.auth import AuthError

log = logging.getLogger(__name__)

API_PREFIX = "/api/"


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body = {"error": code, "message": message, **{k: v for k, v in extra.items() if v}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 429 and extra.get("retry_after"):
        headers = {"Retry-After": str(extra["retry_after"])}
    return JSONResponse(body, status_code=status, headers=headers)


def error_of(exc: BaseException) -> tuple[int, str, str, dict[str, Any]]:
    """(HTTP status, code, message, extra fields) of an error a request ran into."""
    cid = getattr(exc, "correlation_id", None)
    extra: dict[str, Any] = {"correlation_id": cid}
    if isinstance(exc, AuthError):
        kind = {401: "unauthorized", 429: "rate_limited"}.get(exc.status, "forbidden")
        return exc.status, kind, str(exc), {"retry_after": exc.retry_after}
    if isinstance(exc, WorkflowNotFound | PlanNotFound):
        return 404, "not_found", str(exc), extra
    if isinstance(exc, PlanError):
        return 422, "invalid_plan", str(exc), {**extra, "problems": exc.problems}
    if isinstance(exc, WorkflowConflict):
        return 409, "conflict", str(exc), extra
    if isinstance(exc, InputError):
        return 422, "invalid_input", str(exc), extra
    if isinstance(exc, InvalidTransition):
        return 409, "refused", str(exc), extra
    if isinstance(exc, ServiceUnavailable):
        return 503, "unavailable", str(exc), extra
    if isinstance(exc, ChassisError):
        return 409, "refused", str(exc), extra
    if infra.is_infrastructure_error(exc):
        return 503, "unavailable", describe(exc)[1][0], extra
    code, lines = describe(exc)
    if code == 3:  # not migrated, and the like
        return 503, "unavailable", lines[0], extra
    log.exception("unexpected error serving a request")
    return 500, "internal", f"unexpected error: {type(exc).__name__}", extra


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            return 400, "malformed_json", "the request body is not valid JSON: " \
                f"{e.get('ctx', {}).get('error', 'cannot parse it')}"
    said: dict[str, list[str]] = {}
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        source = loc[0] if loc else "body"
        names = [p for p in loc[1:] if not _TYPE_LOC.match(p)]
        where = ".".join(names) or source
        if source == "body" and where == "plan" and e.get("type") != "missing":
            text = ("a registered plan's name ('name' or 'name@VERSION': letters, digits, "
                    "'_', '-', '.') or a plan document (a JSON object)")
        elif source == "body" and not names and e.get("type") == "model_attributes_type":
            text = "the body must be a JSON object"
        elif source == "path" and where == "correlation_id":
            got = str(e.get("input"))[:60]
            text = f"correlation id must be a UUID, got {got!r}"
        elif e.get("type") == "extra_forbidden":
            text = "unknown field"
        elif e.get("type") == "missing":
            text = "required" if source != "body" or names else "a JSON body is required"
        else:
            text = str(e.get("msg", "invalid"))
        if text not in said.setdefault(where, []):
            said[where].append(text)
    parts = [text if text.startswith("correlation id") else f"{where}: {' or '.join(texts)}"
             for where, texts in said.items() for text in texts[:1]]
    more = f" (and {len(parts) - 5} more)" if len(parts) > 5 else ""
    return 422, "invalid_input", "; ".join(parts[:5]) + more


#: The parts of a validation error's location that name a type of a union, not a field.
_TYPE_LOC = re.compile(r"^(str|int|bool|dict\[.*\]|list\[.*\]|function-.*|"
                       r"constrained-str|json-or-python\[.*\])$")


def _allowed(request: Request) -> list[str]:
    """The methods of every operation of the request's path (from the OpenAPI paths:
    the console's pages have GET and POST)."""
    path = request.url.path
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)), path):
            return sorted(m.upper() for m in operations)
    return ["GET", "POST"] if not path.startswith(API_PREFIX) else ["GET"]


class JsonByDefault:
    """A body sent to the API without a JSON content type (``curl -d`` sends
    application/x-www-form-urlencoded) is read as JSON: the API takes nothing else."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            headers = [(k, v) for k, v in scope.get("headers") or []
                       if k != b"content-type" or b"json" in v]
            if len(headers) != len(scope.get("headers") or []) or not any(
                    k == b"content-type" for k, _ in headers):
                headers.append((b"content-type", b"application/json"))
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a request body past ``max_bytes`` (413) before the app reads it: by its
    Content-Length, or (a chunked body) by reading it up to the limit first."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:  # (the server never hands on more than it says)
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(413, "too_large", f"the request body is larger than "
                          f"{self.max_bytes} bytes (twice CHASSIS_MAX_DOCUMENT_BYTES, "
                          "and 64 KiB)")
        await response(scope, receive, send)


def _replay(messages: list[Any], receive: Receive) -> Receive:
    """``messages`` first, then the connection's own."""
    queue = list(messages)

    async def replayed() -> Any:
        return queue.pop(0) if queue else await receive()

    return replayed


class SecurityHeaders:
    """Headers every answer carries: no sniffing, no framing, no referrer to other
    sites; pages may load only this site's scripts and styles (inline styles: the fuel
    bars), and post forms only here."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
        (b"content-security-policy",
         b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
         b"img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; "
         b"base-uri 'none'; object-src 'none'")]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: config.Settings | None = None, client: Client | None = None
               ) -> FastAPI:
    """The web app: API, console, health; one :class:`Client` for every request."""
    from chassis import __version__
    from chassis.web import api, console

    client = client or Client(settings)
    app = FastAPI(title="agentchassis", version=__version__,
                  description="Start, watch, approve, cancel and retry durable, budgeted "
                              "workflows. Authenticate with `Authorization: Bearer KEY` "
                              "(an API key: `chassis keys create CLIENT`).",
                  docs_url=None, redoc_url=None)  # (their pages load a CDN's scripts)
    app.state.client = client

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message = _validation_message(exc)
        return _error(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            code, message = "malformed_json", ("the request body cannot be read as JSON "
                                               "(not JSON, or nested too deeply)")
        response = _error(exc.status_code, code, message)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method of the path (Starlette names one route's)
            response.headers["Allow"] = ", ".join(_allowed(request))
        return response

    async def _refused(request: Request, exc: Exception) -> Any:
        status, code, message, extra = error_of(exc)
        if not request.url.path.startswith(API_PREFIX) and status == 401 \
                and request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        if not request.url.path.startswith(API_PREFIX):
            return console.error_page(request, status, message)
        return _error(status, code, message, **extra)

    # (each class its own handler: a handler of Exception itself would run in
    # Starlette's outermost middleware, which logs the error as unhandled)
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    for kind in (AuthError, ChassisError, SQLAlchemyError, BrokerError, RedisError,
                 ConnectionError):
        app.add_exception_handler(kind, _refused)
    app.add_exception_handler(Exception, _refused)  # anything else: a JSON 500, logged

    app.include_router(api.router)
    app.include_router(console.router)
    app.mount("/static", console.static, name="static")
    _health_routes(app, client)
    app.add_middleware(JsonByDefault)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, max_bytes=2 * client.limits.max_bytes + 65536)
    return app


def _health_routes(app: FastAPI, client: Client) -> None:
    from chassis.health import check_broker, check_database
    from chassis.web.api import Health

    @app.get("/healthz", response_model=Health, tags=["health"],
             summary="The process answers (liveness)")
    def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, tags=["health"],
             responses={503: {"model": Health, "description": "A part is not usable"}},
             summary="The database (migrated) and the broker are usable (readiness)")
    def readyz() -> Any:
        parts = [check_database(client.settings, 2.0), check_broker(client.settings, 2.0)]
        body = {"status": "ok" if all(p.ok for p in parts) else "unavailable",
                "checks": {p.part: str(p) for p in parts}}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


__all__ = ["create_app", "error_of"]
