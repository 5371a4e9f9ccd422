"""Tracing is configured by the standard OTEL_* variables: off unless an exporter is
named; settings agentchassis cannot honour are refused when the settings are read."""

from __future__ import annotations

from pathlib import Path

import pytest

from chassis import config, tracing
from chassis.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("env", "on"), [
    ({}, False), ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True), ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_on_only_when_an_exporter_is_named(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled(env) is on


@pytest.mark.parametrize(("env", "says"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER 'zipkin' is not supported"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "OTEL_EXPORTER_OTLP_PROTOCOL 'grpc' is not supported"),
])
def test_what_it_cannot_honour_is_refused_with_the_settings(
        env: dict[str, str], says: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=says):
        config.load({**env, "CHASSIS_HOME": str(tmp_path)})
    config.load({**env, "OTEL_SDK_DISABLED": "true", "CHASSIS_HOME": str(tmp_path)})


def test_trace_context_round_trips_and_junk_is_no_parent() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert tracing.parent(tp) is not None
    assert tracing.link(tp)[0].context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    for junk in (None, "", "garbage", "00-0-0-01"):
        assert tracing.parent(junk) is None and tracing.link(junk) == []


def test_threads_starting_at_once_all_see_the_provider(tmp_path: Path) -> None:
    """The first spans of a 512-thread worker start together: none may find tracing
    half set up (and go unrecorded). In a process of its own (a provider is set once)."""
    import subprocess
    import sys

    script = (
        "import threading\n"
        "from chassis import tracing\n"
        "seen = []\n"
        "go = threading.Barrier(16)\n"
        "def one():\n"
        "    go.wait()\n"
        "    seen.append(tracing.active())\n"
        "ts = [threading.Thread(target=one) for _ in range(16)]\n"
        "[t.start() for t in ts]\n"
        "[t.join() for t in ts]\n"
        "print(sorted(seen))\n")
    env = {"OTEL_TRACES_EXPORTER": "console", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([True] * 16)


def test_bad_batch_settings_are_refused_with_the_settings(tmp_path: Path) -> None:
    base = {"OTEL_TRACES_EXPORTER": "console", "CHASSIS_HOME": str(tmp_path)}
    with pytest.raises(ConfigError, match="OTEL_BSP_MAX_QUEUE_SIZE must be a positive"):
        config.load({**base, "OTEL_BSP_MAX_QUEUE_SIZE": "-1"})
    with pytest.raises(ConfigError, match="OTEL_BSP_SCHEDULE_DELAY must be a positive"):
        config.load({**base, "OTEL_BSP_SCHEDULE_DELAY": "soon"})
    with pytest.raises(ConfigError, match="must not be more than OTEL_BSP_MAX_QUEUE_SIZE"):
        config.load({**base, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096"})


def test_tracing_off_keeps_no_trace_context_and_a_current_span_beats_the_callers() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    span, kept = tracing.start_workflow("c", "p", "acme", tp)  # the API's no-op tracer
    assert kept is None  # tracing off: the caller's context is not the workflow's
    with tracing.incoming(tp):
        assert tracing.caller() == tp
        local = TracerProvider().get_tracer("t")
        with local.start_as_current_span("step s"):
            assert trace.get_current_span().get_span_context().is_valid
            assert tracing.caller() is None  # (a span of this process is current)
