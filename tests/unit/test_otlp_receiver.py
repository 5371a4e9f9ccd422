"""The OTLP/HTTP trace receiver fake (tests/fakes/otlp_receiver.py), fed by the real
opentelemetry-sdk exporter and by hand-made posts."""

from __future__ import annotations

import gzip
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from tests.fakes.otlp_receiver import OTLPReceiver, Span

pytestmark = pytest.mark.timeout(30)

TRACE_ID = "5b8efff798038103d269b633813fc60c"
SPAN_ID = "eee19b7ec3c1b174"
PARENT_ID = "eee19b7ec3c1b173"


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as server:
        yield server


def provider_for(receiver: OTLPReceiver, compression: Compression | None = None,
                 *, batch: bool = False) -> TracerProvider:
    """A local TracerProvider (never the global one) exporting to the receiver."""
    provider = TracerProvider(resource=Resource.create({"service.name": "otlp-fake-test",
                                                        "deployment.environment": "ci"}))
    exporter = OTLPSpanExporter(endpoint=receiver.url + "/v1/traces", compression=compression,
                                timeout=5)
    processor = (BatchSpanProcessor(exporter, schedule_delay_millis=50) if batch
                 else SimpleSpanProcessor(exporter))
    provider.add_span_processor(processor)
    return provider


def post(url: str, body: bytes, content_type: str,
         **headers: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": content_type, **{k.replace("_", "-"): v for k, v in headers.items()}})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["content-type"], exc.read()


def otlp_json(**span_fields: Any) -> dict[str, Any]:
    """An ExportTraceServiceRequest in the OTLP JSON encoding (hex ids, int64 as strings,
    enums as numbers), with one span."""
    span = {
        "traceId": TRACE_ID, "spanId": SPAN_ID, "parentSpanId": PARENT_ID,
        "name": "GET /items", "kind": 3,
        "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": "1544712661000000000",
        "attributes": [
            {"key": "http.method", "value": {"stringValue": "GET"}},
            {"key": "http.status_code", "value": {"intValue": "200"}},
            {"key": "ratio", "value": {"doubleValue": 0.5}},
            {"key": "cached", "value": {"boolValue": False}},
            {"key": "tags", "value": {"arrayValue": {"values": [
                {"stringValue": "a"}, {"stringValue": "b"}]}}},
            {"key": "nested", "value": {"kvlistValue": {"values": [
                {"key": "k", "value": {"intValue": "1"}}]}}},
        ],
        "events": [{"timeUnixNano": "1544712660500000000", "name": "cache miss",
                    "attributes": [{"key": "key", "value": {"stringValue": "items"}}]}],
        "links": [{"traceId": "0af7651916cd43dd8448eb211c80319c",
                   "spanId": "b7ad6b7169203331"}],
        "status": {"code": 2, "message": "upstream failed"},
        **span_fields,
    }
    return {"resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "json-client"}}]},
        "scopeSpans": [{"scope": {"name": "hand.made"}, "spans": [span]}],
    }]}


# ------------------------------------------------------------------ the real exporter

@pytest.mark.parametrize("compression", [None, Compression.Gzip],
                         ids=["uncompressed", "gzip"])
def test_spans_from_the_sdk_exporter(receiver: OTLPReceiver,
                                     compression: Compression | None) -> None:
    provider = provider_for(receiver, compression)
    tracer = provider.get_tracer("otlp.fake.test")
    try:
        with tracer.start_as_current_span("elsewhere") as elsewhere:
            pass
        with tracer.start_as_current_span("workflow", kind=SpanKind.SERVER) as parent:
            with tracer.start_as_current_span(
                    "step", kind=SpanKind.CLIENT,
                    links=[Link(elsewhere.get_span_context(), {"why": "caused by"})],
                    attributes={"step.name": "fetch", "attempt": 2, "fuel": 0.25,
                                "ai": True, "tags": ["a", "b"], "sizes": [1, 2]},
            ) as child:
                child.add_event("retry", {"delay": 1.5})
                child.set_status(Status(StatusCode.ERROR, "boom"))
            parent.set_status(Status(StatusCode.OK))
    finally:
        provider.shutdown()

    spans = receiver.wait_for(lambda spans: {"workflow", "step"} <= {s.name for s in spans})
    assert len(spans) == 3
    (workflow,) = receiver.named("workflow")
    (step,) = receiver.named("step")
    (other,) = receiver.named("elsewhere")

    context = parent.get_span_context()
    assert workflow.trace_id == format(context.trace_id, "032x")
    assert workflow.span_id == format(context.span_id, "016x")
    assert workflow.parent_span_id is None
    assert (workflow.kind, workflow.status) == ("SERVER", "OK")
    assert receiver.children(workflow) == [step]
    assert receiver.children(step) == []

    assert step.trace_id == workflow.trace_id
    assert step.parent_span_id == workflow.span_id
    assert (step.kind, step.status, step.status_message) == ("CLIENT", "ERROR", "boom")
    assert step.attributes == {"step.name": "fetch", "attempt": 2, "fuel": 0.25,
                               "ai": True, "tags": ["a", "b"], "sizes": [1, 2]}
    assert step.events == ["retry"]
    assert step.event_attributes == [{"delay": 1.5}]
    assert step.links == [(other.trace_id, other.span_id)]
    assert other.trace_id != step.trace_id and other.kind == "INTERNAL"
    assert workflow.start <= step.start <= step.end <= workflow.end
    assert step.duration_ns >= 0

    for span in spans:
        assert span.service_name == "otlp-fake-test"
        assert span.resource["deployment.environment"] == "ci"
        assert span.scope == "otlp.fake.test"
        assert len(span.trace_id) == 32 and span.trace_id == span.trace_id.lower()
        assert len(span.span_id) == 16

    assert receiver.by_trace() == {other.trace_id: [other],
                                   workflow.trace_id: [step, workflow]}
    assert {r.status for r in receiver.requests} == {200}
    encodings = {r.headers.get("content-encoding") for r in receiver.requests}
    assert encodings == ({"gzip"} if compression else {None})
    assert {r.headers["content-type"] for r in receiver.requests} == {
        "application/x-protobuf"}


def test_wait_for_is_woken_by_a_batch_export(receiver: OTLPReceiver) -> None:
    provider = provider_for(receiver, batch=True)
    try:
        tracer = provider.get_tracer("batch")
        for index in range(5):
            with tracer.start_as_current_span(f"span-{index}"):
                pass
        spans = receiver.wait_for_count(5)
        assert sorted(s.name for s in spans) == [f"span-{i}" for i in range(5)]
        assert len(receiver.by_trace()) == 5
    finally:
        provider.shutdown()


def test_wait_for_times_out_with_what_arrived(receiver: OTLPReceiver) -> None:
    status, _, _ = post(receiver.traces_url, json.dumps(otlp_json()).encode(),
                        "application/json")
    assert status == 200
    with pytest.raises(AssertionError, match=r"1 span\(s\) received.*GET /items"):
        receiver.wait_for(lambda spans: len(spans) > 1, timeout=0.2)


def test_wait_for_sees_spans_posted_from_another_thread(receiver: OTLPReceiver) -> None:
    body = json.dumps(otlp_json()).encode()
    poster = threading.Thread(target=post, args=(receiver.traces_url, body, "application/json"))
    poster.start()
    try:
        spans = receiver.wait_for(lambda spans: bool(spans))
    finally:
        poster.join(timeout=10)
    assert [s.name for s in spans] == ["GET /items"]


def test_reset_forgets_everything(receiver: OTLPReceiver) -> None:
    post(receiver.traces_url, json.dumps(otlp_json()).encode(), "application/json")
    assert receiver.spans and receiver.requests
    receiver.reset()
    assert receiver.spans == [] and receiver.requests == [] and receiver.by_trace() == {}


# ------------------------------------------------------------------ OTLP JSON

def test_a_json_post(receiver: OTLPReceiver) -> None:
    status, content_type, body = post(receiver.traces_url, json.dumps(otlp_json()).encode(),
                                      "application/json; charset=utf-8")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {}

    (span,) = receiver.spans
    assert span == Span(
        trace_id=TRACE_ID, span_id=SPAN_ID, parent_span_id=PARENT_ID, name="GET /items",
        kind="CLIENT", start=1544712660000000000, end=1544712661000000000,
        attributes={"http.method": "GET", "http.status_code": 200, "ratio": 0.5,
                    "cached": False, "tags": ["a", "b"], "nested": {"k": 1}},
        status="ERROR", status_message="upstream failed", events=["cache miss"],
        event_attributes=[{"key": "items"}],
        links=[("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")],
        resource={"service.name": "json-client"}, scope="hand.made")
    assert span in {span}  # hashable, by its ids


def test_json_with_enum_names_no_parent_and_gzip(receiver: OTLPReceiver) -> None:
    document = otlp_json(kind="SPAN_KIND_PRODUCER", parentSpanId="",
                         status={"code": "STATUS_CODE_OK"})
    status, _, _ = post(receiver.traces_url, gzip.compress(json.dumps(document).encode()),
                        "application/json", Content_Encoding="gzip")
    assert status == 200
    (span,) = receiver.spans
    assert (span.kind, span.status, span.parent_span_id) == ("PRODUCER", "OK", None)


def test_a_protobuf_post_answers_an_empty_protobuf_response(receiver: OTLPReceiver) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.trace.v1 import trace_pb2

    span_message = trace_pb2.Span(
        trace_id=bytes.fromhex(TRACE_ID), span_id=bytes.fromhex(SPAN_ID),
        parent_span_id=bytes.fromhex(PARENT_ID), name="consume",
        kind=trace_pb2.Span.SPAN_KIND_CONSUMER,
        links=[trace_pb2.Span.Link(trace_id=bytes.fromhex("0af7651916cd43dd8448eb211c80319c"),
                                   span_id=bytes.fromhex("b7ad6b7169203331"))])
    request = ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        scope_spans=[trace_pb2.ScopeSpans(spans=[span_message])])])
    status, content_type, body = post(receiver.traces_url, request.SerializeToString(),
                                      "application/x-protobuf")
    assert (status, content_type, body) == (200, "application/x-protobuf", b"")
    (span,) = receiver.spans
    assert (span.trace_id, span.span_id, span.parent_span_id) == (TRACE_ID, SPAN_ID, PARENT_ID)
    assert (span.name, span.kind, span.status) == ("consume", "CONSUMER", "UNSET")
    assert span.links == [("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")]
    assert span.resource == {} and span.service_name is None


# ------------------------------------------------------------------ refusals

def test_other_paths_are_404(receiver: OTLPReceiver) -> None:
    body = json.dumps(otlp_json()).encode()
    assert post(receiver.url + "/v1/metrics", body, "application/json")[0] == 404
    assert post(receiver.url + "/v1/traces/extra", body, "application/json")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(receiver.url + "/v1/traces", timeout=5).close()
    caught.value.close()
    assert caught.value.code == 404
    assert receiver.spans == []
    assert [r.status for r in receiver.requests] == [404, 404, 404]


@pytest.mark.parametrize(("body", "content_type", "encoding"), [
    (b"\xff\xff\xff\xff", "application/x-protobuf", None),
    (b"{not json", "application/json", None),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"nameX": "x"}]}]}]}',
     "application/json", None),
    (b"not gzip at all", "application/x-protobuf", "gzip"),
    (json.dumps(otlp_json(traceId="abcd")).encode(), "application/json", None),
    (json.dumps(otlp_json()).encode(), "application/json", "br"),
], ids=["protobuf", "json-syntax", "json-unknown-field", "gzip", "short-trace-id",
        "unknown-encoding"])
def test_bodies_that_do_not_parse_are_400(receiver: OTLPReceiver, body: bytes,
                                           content_type: str, encoding: str | None) -> None:
    headers = {"Content_Encoding": encoding} if encoding else {}
    status, answered_type, answer = post(receiver.traces_url, body, content_type, **headers)
    assert status == 400
    assert answered_type == content_type
    error = status_pb2.Status()
    if content_type == "application/json":
        json_format.Parse(answer, error)
    else:
        error.ParseFromString(answer)
    assert error.code == 3 and error.message
    assert receiver.spans == []
    assert [r.status for r in receiver.requests] == [400]


def test_another_content_type_is_415(receiver: OTLPReceiver) -> None:
    status, content_type, body = post(receiver.traces_url, b"hello", "text/plain")
    assert status == 415 and content_type.startswith("text/plain")
    assert b"unsupported content-type" in body


def test_the_global_tracer_provider_is_untouched(receiver: OTLPReceiver) -> None:
    before = trace.get_tracer_provider()
    provider_for(receiver).shutdown()
    assert trace.get_tracer_provider() is before
