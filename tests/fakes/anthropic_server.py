"""A small Messages API server on loopback, for testing the real ``anthropic`` SDK.

It implements ``POST /v1/messages`` as the SDK calls it (JSON in, a Message or an
error object out), records every request (headers and body), and answers from a
script: queue replies with :meth:`FakeAnthropic.script` (e.g. a 529, then a message);
when the script is empty it answers with :attr:`FakeAnthropic.default`.

    with FakeAnthropic() as server:
        server.script(error(529, "overloaded_error", "Overloaded"), message("Hi"))
        ... ANTHROPIC_BASE_URL=server.url ...
        assert len(server.requests) == 2
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: the longest a "hang" reply holds a connection (the server's stop releases it sooner)
HANG_SECONDS = 30.0


@dataclass(frozen=True)
class Reply:
    """One scripted answer: an HTTP status, a JSON body and headers, or a hang (no
    answer at all until the client gives up)."""

    status: int = 200
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass(frozen=True)
class Recorded:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def api_key(self) -> str | None:
        """The key the client sent: ``x-api-key``, or ``Authorization: Bearer`` (which
        the current SDK uses for ``api_key=``)."""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        auth = self.headers.get("authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None


def message(text: str | None = "Hello from the fake Messages API.", *,
            input_tokens: int = 12, output_tokens: int = 7, model: str | None = None,
            stop_reason: str = "end_turn", content: list[dict[str, Any]] | None = None) -> Reply:
    """A 200 with a Message; ``model`` None echoes the request's model."""
    blocks = content if content is not None else (
        [] if text is None else [{"type": "text", "text": text}])
    return Reply(200, {
        "id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
        "model": model, "content": blocks, "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    })


def error(status: int, error_type: str, text: str, **headers: str) -> Reply:
    """An error answer shaped as the API's: {"type": "error", "error": {type, message}}."""
    body = {"type": "error", "error": {"type": error_type, "message": text},
            "request_id": f"req_{uuid.uuid4().hex[:24]}"}
    return Reply(status, body, {k.replace("_", "-"): v for k, v in headers.items()})


def hang() -> Reply:
    """No answer: the client's timeout has to fire."""
    return Reply(hang=True)


class FakeAnthropic:
    """The server; thread-safe; ``url`` is its base URL (for ANTHROPIC_BASE_URL)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.default: Reply = message()
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._requests: list[Recorded] = []
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fake-anthropic", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order (then with ``default``)."""
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        """Forget the recorded requests and the remaining script; default reply again."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self.default = message()

    def start(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving

    def _next(self, recorded: Recorded) -> Reply:
        with self._lock:
            self._requests.append(recorded)
            return self._script.popleft() if self._script else self.default

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                path = self.path.split("?", 1)[0]
                if path != "/v1/messages":
                    self._send(error(404, "not_found_error", f"no route {path}"))
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = fake._next(Recorded("POST", path, headers, body))
                if reply.hang:
                    fake._stopping.wait(HANG_SECONDS)
                    self.close_connection = True
                    return
                if reply.status == 200 and isinstance(body, dict) and reply.body:
                    model = reply.body.get("model") or body.get("model")
                    reply = Reply(200, {**reply.body, "model": model}, reply.headers)
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                data = json.dumps(reply.body or {}).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", (reply.body or {}).get("request_id")
                                 or f"req_{uuid.uuid4().hex[:24]}")
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
