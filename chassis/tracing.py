"""OpenTelemetry traces: one trace per workflow, configured by the standard ``OTEL_*``
variables, off unless ``OTEL_TRACES_EXPORTER`` names an exporter.

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP over HTTP/protobuf, to
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``,
  default ``http://localhost:4318``), ``console``, or both (comma-separated); unset or
  ``none``: no tracing (the API's no-op tracer: nothing is created or sent).
  ``OTEL_SDK_DISABLED=true`` turns it off too.
- ``OTEL_SERVICE_NAME`` (default ``agentchassis``), ``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*`` and the other standard variables are
  read by the SDK itself.

A process that already set a tracer provider of its own (an application using
agentchassis as a library, a test) keeps it: agentchassis only uses the global API.

The workflow's trace: :func:`start_workflow` opens the root span when a workflow is
created and returns its ``traceparent``, which the workflow keeps (and every outgoing
Kafka message carries). Every later span of the workflow, in any process, has it as its
parent, or the context a message brought (Celery headers, Kafka headers), so that one
trace holds the whole run however long it waits for people: no span stays open during a
pause.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

#: The header (Celery and Kafka) that carries the trace context (W3C Trace Context).
TRACEPARENT = "traceparent"
#: Attributes of the spans: the workflow's ids and the step's.
CID, STEP, ACTION, ATTEMPT = ("chassis.correlation_id", "chassis.step", "chassis.action",
                              "chassis.attempt")

_propagator = TraceContextTextMapPropagator()
log = logging.getLogger(__name__)
_lock = threading.Lock()
_configured_pid: list[int] = []


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """True when the environment asks for traces (an exporter, and the SDK not disabled)."""
    env = os.environ if env is None else env
    if (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        return False
    names = [n.strip().lower() for n in (env.get("OTEL_TRACES_EXPORTER") or "").split(",")]
    return any(n and n != "none" for n in names)


def setup() -> None:
    """Install the SDK's tracer provider with the exporters ``OTEL_TRACES_EXPORTER`` names,
    once per process (a forked pool process sets up its own: the export thread of its
    parent's did not survive the fork); nothing when tracing is off, or when the process
    has a provider of its own."""
    pid = os.getpid()
    if _configured_pid and _configured_pid[0] == pid:
        return
    with _lock:  # (others wait here until the provider is in place)
        if _configured_pid and _configured_pid[0] == pid:
            return
        try:
            _install()
        except Exception:  # noqa: BLE001  (tracing must never fail the work it traces)
            log.exception("tracing could not be set up: this process goes on untraced")
        finally:
            _configured_pid[:] = [pid]


def _install() -> None:
    if not enabled():
        return
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider) and current is not _ours[0]:
        return  # the process's own (an application's, a test's)
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME")
                                or "agentchassis"}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    for name in (os.environ.get("OTEL_TRACES_EXPORTER") or "").split(","):
        exporter = _exporter(name.strip().lower())
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    if current is _ours[0] and current is not None:
        # inherited through a fork: the API takes a provider once, so replace it
        # where the API keeps it
        from opentelemetry.util._once import Once

        trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace.set_tracer_provider(provider)
    _ours[0] = provider


#: The provider :func:`setup` installed, if any.
_ours: list[Any] = [None]


def check(env: Mapping[str, str]) -> None:
    """ConfigError (one line) for OTEL_* settings agentchassis cannot honour: an unknown
    exporter, or OTLP over anything but HTTP/protobuf. (Read with the settings, so a
    misconfigured process stops at once instead of failing its steps.)"""
    from chassis.errors import ConfigError

    if not enabled(env):
        return
    for name in (env.get("OTEL_TRACES_EXPORTER") or "").split(","):
        if name.strip().lower() not in ("", "none", "otlp", "console"):
            raise ConfigError(f"OTEL_TRACES_EXPORTER {name.strip()[:40]!r} is not supported: "
                              "otlp, console or none")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol != "http/protobuf":
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol[:40]!r} is not supported: "
                          "agentchassis exports OTLP over HTTP (http/protobuf)")
    numbers = {}
    for name, default in (("OTEL_BSP_SCHEDULE_DELAY", 5000), ("OTEL_BSP_EXPORT_TIMEOUT", 30000),
                          ("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
                          ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)):
        raw = (env.get(name) or "").strip()
        try:
            numbers[name] = int(raw) if raw else default
        except ValueError:
            numbers[name] = -1
        if numbers[name] <= 0:
            raise ConfigError(f"{name} must be a positive whole number, got {raw[:40]!r}")
    if numbers["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] > numbers["OTEL_BSP_MAX_QUEUE_SIZE"]:
        raise ConfigError("OTEL_BSP_MAX_EXPORT_BATCH_SIZE must not be more than "
                          "OTEL_BSP_MAX_QUEUE_SIZE")


def _exporter(name: str) -> Any:
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    return None  # (none, or refused by check() when the settings were read)


def active() -> bool:
    """True when spans are recorded: this process has a tracer provider (set up from
    the environment, or its own)."""
    setup()
    return not isinstance(trace.get_tracer_provider(),
                          trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def tracer() -> trace.Tracer:
    setup()
    return trace.get_tracer("agentchassis")


def flush(timeout_ms: int = 5000) -> None:
    """Send what is buffered (a short-lived process, e.g. the CLI, before it exits)."""
    provider = trace.get_tracer_provider()
    force = getattr(provider, "force_flush", None)
    if force is not None:
        force(timeout_ms)


# --------------------------------------------------------------------------- context


def parent(traceparent: str | None) -> otel_context.Context | None:
    """The context a ``traceparent`` header names (None when absent or not valid)."""
    if not traceparent:
        return None
    ctx = _propagator.extract({TRACEPARENT: traceparent})
    span = trace.get_current_span(ctx)
    return ctx if span.get_span_context().is_valid else None


def traceparent_of(span: Span | None = None) -> str | None:
    """The ``traceparent`` header of ``span`` (default: the current one), if valid."""
    ctx = trace.set_span_in_context(span) if span is not None else otel_context.get_current()
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=ctx)
    return carrier.get(TRACEPARENT)


_incoming: ContextVar[str | None] = ContextVar("chassis_incoming_trace", default=None)


@contextmanager
def incoming(traceparent: str | None) -> Iterator[None]:
    """Inside the block, :func:`caller` is the trace context a message brought (a Celery
    task's ``traceparent`` header)."""
    token = _incoming.set(traceparent if isinstance(traceparent, str) else None)
    try:
        yield
    finally:
        _incoming.reset(token)


def caller() -> str | None:
    """The trace context of the message being handled, if it brought one, and no span
    of this process is current (an action starting a workflow: its step's span is)."""
    if trace.get_current_span().get_span_context().is_valid:
        return None
    return _incoming.get()


def link(traceparent: str | None) -> list[Link]:
    ctx = parent(traceparent)
    return [] if ctx is None else [Link(trace.get_current_span(ctx).get_span_context())]


@contextmanager
def span(name: str, *, under: str | None = None, kind: SpanKind = SpanKind.INTERNAL,
         links: list[Link] | None = None,
         attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A span named ``name``, child of the context ``under`` (a traceparent) if given,
    else of the current span; its exceptions are recorded. With tracing off: the API's
    non-recording span (costs nothing worth counting)."""
    ctx = parent(under)
    with tracer().start_as_current_span(
            name, context=ctx, kind=kind, links=links,
            attributes={k: v for k, v in (attributes or {}).items() if v is not None},
            record_exception=True, set_status_on_exception=True) as s:
        yield s


def start_workflow(cid: str, plan: str | None, client_id: str,
                   traceparent: str | None = None) -> tuple[Span, str | None]:
    """Open the workflow's root span (child of ``traceparent`` when the start came with
    one: a Kafka start request from a traced app); its traceparent is the workflow's.
    The caller ends it (:func:`end`) once the start is recorded."""
    s = tracer().start_span(f"workflow {plan or cid}", context=parent(traceparent),
                            kind=SpanKind.INTERNAL,
                            attributes={CID: cid, "chassis.plan": plan or "",
                                        "chassis.client_id": client_id})
    # (not recorded, e.g. tracing off: the API's span carries its parent's context,
    # which is not the workflow's to keep)
    return s, traceparent_of(s) if s.is_recording() else None


def end(s: Span, error: BaseException | None = None) -> None:
    if error is not None:
        s.record_exception(error)
        s.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    s.end()


def failed(s: Span, message: str, error_type: str | None = None) -> None:
    """Mark ``s`` as failed (an attempt whose action failed: no exception escaped)."""
    s.set_status(Status(StatusCode.ERROR, message[:200]))
    if error_type:
        s.set_attribute("error.type", error_type)


__all__ = ["ACTION", "ATTEMPT", "CID", "STEP", "TRACEPARENT", "enabled", "end", "failed",
           "flush", "link", "parent", "setup", "span", "start_workflow", "traceparent_of",
           "tracer"]
