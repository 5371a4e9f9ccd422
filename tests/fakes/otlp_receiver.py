"""A small OTLP/HTTP trace receiver on loopback, for testing what a process exports.

It implements ``POST /v1/traces`` as the OTLP/HTTP exporters call it: an
``ExportTraceServiceRequest`` as protobuf (``application/x-protobuf``) or in the OTLP
JSON encoding (``application/json``, hex trace and span ids), optionally compressed
(``Content-Encoding: gzip`` or ``deflate``). It answers 200 with an empty
``ExportTraceServiceResponse`` in the request's encoding and keeps every span as a
plain :class:`Span`. Another path: 404; a body that does not parse: 400; another
content type: 415 (errors carry a ``google.rpc.Status`` as OTLP says).

    with OTLPReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.url + "/v1/traces")
        ... (or OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url) ...
        spans = receiver.wait_for(lambda spans: any(s.name == "step" for s in spans))
        (root,) = receiver.named("workflow")
        assert [c.name for c in receiver.children(root)] == ["step"]
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"

#: how long :meth:`OTLPReceiver.wait_for` waits unless told
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Span:
    """One received span, in plain Python values.

    ``trace_id`` is 32 lower-case hex digits, ``span_id`` and ``parent_span_id`` 16
    (``parent_span_id`` None for a root); ``kind`` the SpanKind name ("INTERNAL",
    "SERVER", "CLIENT", "PRODUCER", "CONSUMER", "UNSPECIFIED"); ``start``/``end`` Unix
    nanoseconds; ``status`` "UNSET", "OK" or "ERROR"; ``events`` the events' names in
    order (``event_attributes`` their attributes); ``links`` (trace_id, span_id) pairs;
    ``resource`` the resource's attributes (``service.name`` ...); ``scope`` the
    instrumentation scope's name. Attribute values are str, int, float, bool, bytes,
    lists of them or dicts (kvlist). Hashable by (trace_id, span_id).
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start: int
    end: int
    attributes: dict[str, Any]
    status: str
    status_message: str
    events: list[str]
    event_attributes: list[dict[str, Any]]
    links: list[tuple[str, str]]
    resource: dict[str, Any]
    scope: str

    def __hash__(self) -> int:
        return hash((self.trace_id, self.span_id))

    @property
    def duration_ns(self) -> int:
        return self.end - self.start

    @property
    def service_name(self) -> str | None:
        value = self.resource.get("service.name")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Received:
    """A request the receiver answered: its path, headers (lower-case names), the
    status it got and how many spans it carried (0 when refused)."""

    method: str
    path: str
    headers: dict[str, str]
    status: int
    span_count: int


class BadRequest(ValueError):
    """The body could not be read as an ExportTraceServiceRequest."""


# ------------------------------------------------------------------ decoding

def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs:
        assert isinstance(pair, KeyValue)
        result[pair.key] = _value(pair.value)
    return result


def _id(raw: bytes, size: int, what: str, *, optional: bool = False) -> str | None:
    if optional and not raw:
        return None
    if len(raw) != size:
        raise BadRequest(f"{what} has {len(raw)} bytes, not {size}")
    return raw.hex()


def _enum_name(enum: Any, number: int, prefix: str) -> str:
    try:
        name: str = enum.Name(number)
    except ValueError:
        return str(number)
    return name.removeprefix(prefix)


def spans_of(request: ExportTraceServiceRequest) -> list[Span]:
    """The spans of a request, as :class:`Span` values (BadRequest for bad ids)."""
    spans: list[Span] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                trace_id = _id(span.trace_id, 16, "trace_id")
                span_id = _id(span.span_id, 8, "span_id")
                assert trace_id is not None and span_id is not None
                spans.append(Span(
                    trace_id=trace_id,
                    span_id=span_id,
                    parent_span_id=_id(span.parent_span_id, 8, "parent_span_id",
                                       optional=True),
                    name=span.name,
                    kind=_enum_name(trace_pb2.Span.SpanKind, span.kind, "SPAN_KIND_"),
                    start=span.start_time_unix_nano,
                    end=span.end_time_unix_nano,
                    attributes=_attributes(span.attributes),
                    status=_enum_name(trace_pb2.Status.StatusCode, span.status.code,
                                      "STATUS_CODE_"),
                    status_message=span.status.message,
                    events=[event.name for event in span.events],
                    event_attributes=[_attributes(event.attributes)
                                      for event in span.events],
                    links=[(str(_id(link.trace_id, 16, "link trace_id")),
                            str(_id(link.span_id, 8, "link span_id")))
                           for link in span.links],
                    resource=dict(resource),
                    scope=scope_spans.scope.name,
                ))
    return spans


_HEX_IDS = {"traceId": 32, "trace_id": 32, "spanId": 16, "span_id": 16,
            "parentSpanId": 16, "parent_span_id": 16}
_HEX = re.compile(r"[0-9a-fA-F]*")


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP JSON writes trace and span ids in hex where protobuf's JSON mapping wants
    base64: convert them (a base64 id, 24 or 12 characters, cannot be mistaken for one)."""
    if isinstance(node, list):
        return [_hex_ids_to_base64(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted: dict[str, Any] = {}
    for key, value in node.items():
        size = _HEX_IDS.get(key)
        if (size is not None and isinstance(value, str) and len(value) == size
                and _HEX.fullmatch(value)):
            converted[key] = base64.b64encode(bytes.fromhex(value)).decode()
        else:
            converted[key] = _hex_ids_to_base64(value)
    return converted


def _decompress(raw: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    try:
        if encoding in ("", "identity"):
            return raw
        if encoding == "gzip":
            return gzip.decompress(raw)
        if encoding == "deflate":
            return zlib.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise BadRequest(f"cannot decompress the {encoding} body: {exc}") from exc
    raise BadRequest(f"unsupported content-encoding {encoding!r}")


def parse_request(raw: bytes, content_type: str,
                  content_encoding: str = "") -> ExportTraceServiceRequest:
    """An ExportTraceServiceRequest from a body as posted (BadRequest if it is not one)."""
    data = _decompress(raw, content_encoding)
    request = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            request.ParseFromString(data)
        except DecodeError as exc:
            raise BadRequest(f"not an ExportTraceServiceRequest: {exc}") from exc
    else:
        try:
            document = json.loads(data)
            json_format.ParseDict(_hex_ids_to_base64(document), request)
        except (ValueError, json_format.ParseError) as exc:
            raise BadRequest(f"not an OTLP JSON ExportTraceServiceRequest: {exc}") from exc
    return request


def _encode(message: Message, content_type: str) -> bytes:
    if content_type == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


# ------------------------------------------------------------------ the receiver

class OTLPReceiver:
    """The receiver; thread-safe; ``url`` is its base URL (the exporter's endpoint is
    ``url + "/v1/traces"``; OTEL_EXPORTER_OTLP_ENDPOINT=url appends it itself)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._changed = threading.Condition()
        self._spans: list[Span] = []
        self._requests: list[Received] = []
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        # a short poll: stop() (shutdown) waits for the serving loop to notice
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="otlp-receiver", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        return f"http://{host}:{port}"

    @property
    def traces_url(self) -> str:
        return self.url + TRACES_PATH

    @property
    def spans(self) -> list[Span]:
        """Every span received so far, in the order received (a copy)."""
        with self._changed:
            return list(self._spans)

    @property
    def requests(self) -> list[Received]:
        with self._changed:
            return list(self._requests)

    def reset(self) -> None:
        """Forget the spans and requests received."""
        with self._changed:
            self._spans.clear()
            self._requests.clear()
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[Span]], object],
                 timeout: float = DEFAULT_TIMEOUT) -> list[Span]:
        """Wait until ``predicate(spans)`` is true (checked now and whenever spans
        arrive); return the spans then. AssertionError, naming what did arrive, if it
        is still false after ``timeout`` seconds."""
        snapshot: list[Span] = []

        def ready() -> bool:
            nonlocal snapshot
            snapshot = list(self._spans)
            return bool(predicate(snapshot))

        with self._changed:
            if self._changed.wait_for(ready, timeout=timeout):
                return snapshot
        names = [f"{s.name} ({s.span_id})" for s in snapshot]
        raise AssertionError(
            f"no span set satisfied the predicate within {timeout}s; "
            f"{len(snapshot)} span(s) received: {names}")

    def wait_for_count(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> list[Span]:
        """Wait until at least ``count`` spans have arrived."""
        return self.wait_for(lambda spans: len(spans) >= count, timeout)

    def by_trace(self) -> dict[str, list[Span]]:
        """The spans received, grouped by trace_id (each list in the order received)."""
        traces: dict[str, list[Span]] = {}
        for span in self.spans:
            traces.setdefault(span.trace_id, []).append(span)
        return traces

    def children(self, span: Span) -> list[Span]:
        """The spans received whose parent is ``span`` (by start time)."""
        found = [s for s in self.spans
                 if s.trace_id == span.trace_id and s.parent_span_id == span.span_id]
        return sorted(found, key=lambda s: s.start)

    def named(self, name: str) -> list[Span]:
        """The spans received with this name, in the order received."""
        return [s for s in self.spans if s.name == name]

    def start(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving

    def _record(self, received: Received, spans: list[Span]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._requests.append(received)
            self._changed.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                content_type = (self.headers.get("content-type") or "").split(";")[0]
                content_type = content_type.strip().lower()
                spans: list[Span] = []
                if path != TRACES_PATH:
                    status, reply = 404, self._status(5, f"no route {path}", content_type)
                elif content_type not in (PROTOBUF, JSON):
                    status, reply = 415, self._status(
                        3, f"unsupported content-type {content_type!r}", content_type)
                else:
                    try:
                        request = parse_request(
                            raw, content_type, self.headers.get("content-encoding") or "")
                        spans = spans_of(request)
                    except BadRequest as exc:
                        status, reply = 400, self._status(3, str(exc), content_type)
                    else:
                        status = 200
                        reply = (_encode(ExportTraceServiceResponse(), content_type),
                                 content_type)
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver._record(Received("POST", path, headers, status, len(spans)), spans)
                self._send(status, *reply)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver._record(Received("GET", path, headers, 404, 0), [])
                self._send(404, *self._status(5, f"no route GET {path}", ""))

            def _status(self, code: int, text: str, content_type: str) -> tuple[bytes, str]:
                """A google.rpc.Status (code: 3 INVALID_ARGUMENT, 5 NOT_FOUND)."""
                status = status_pb2.Status(code=code, message=text)
                if content_type in (PROTOBUF, JSON):
                    return _encode(status, content_type), content_type
                return text.encode(), "text/plain; charset=utf-8"

            def _send(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
