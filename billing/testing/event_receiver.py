"""A real HTTP server that receives our events, for tests: it records every request (body and
headers), answers with a status the test chooses (e.g. 503 while "down"), and can be slow."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ReceivedRequest:
    body: bytes
    headers: dict[str, str]
    #: What we answered.
    status: int

    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class EventReceiver:
    port: int = 0
    #: The status answered to every request (200: up; 503: down).
    status: int = 200
    #: Seconds to wait before answering.
    delay_s: float = 0.0
    requests: list[ReceivedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Serve HTTPS with this context (its certificate names the host the test dials).
    tls: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def url_for(self, host: str) -> str:
        """The URL under another host name (the test's DNS sends it here)."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}/hooks"

    def accepted(self) -> list[dict[str, Any]]:
        """The events answered 2xx, in the order they arrived."""
        with self.lock:
            return [r.event() for r in self.requests if 200 <= r.status < 300]

    def all_events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.event() for r in self.requests]


@contextmanager
def event_receiver(**options: Any) -> Iterator[EventReceiver]:
    receiver = EventReceiver(**options)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if receiver.delay_s:
                time.sleep(receiver.delay_s)
            status = receiver.status
            with receiver.lock:
                receiver.requests.append(
                    ReceivedRequest(body=body, headers=dict(self.headers.items()), status=status)
                )
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", receiver.port), Handler)
    receiver.port = int(server.server_address[1])
    if receiver.tls is not None:
        server.socket = receiver.tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
