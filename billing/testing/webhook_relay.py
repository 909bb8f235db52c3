"""Stripe's webhook retries, which localstripe lacks, for fault-injection runs
(``scripts/chaos.py``).

localstripe 1.15 delivers each event once (``localstripe/webhooks.py``): an endpoint that
answers 5xx or cannot be reached, as our API does while its database or Temporal is down, loses
the event for good. Stripe retries a failed delivery with exponential backoff for up to three
days (https://docs.stripe.com/webhooks#retries), and the product relies on that: a
``payment_intent.succeeded`` after the customer authenticated is how the subscription learns of
the payment. Without retries a chaos run would report money taken and not recorded where real
Stripe would have delivered the news a little later.

localstripe delivers to this relay instead of the API. The relay answers 200 at once and
delivers the event to the API, retrying until a 2xx with backoff (``first_retry_s`` doubling
up to ``max_backoff_s``, for ``give_up_after_s``). Each attempt is signed afresh with the
endpoint's secret and the attempt's timestamp, as Stripe does (``Stripe-Signature: t=…,v1=…``
over ``t.payload``), so the API's signature and tolerance checks see what Stripe would send.
The payload is localstripe's, byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

import httpx

__all__ = ["WebhookRelay"]


def stripe_signature(secret: str, payload: bytes, timestamp: int) -> str:
    """The ``Stripe-Signature`` header Stripe sends for ``payload`` at ``timestamp``."""
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class WebhookRelay:
    """A loopback endpoint for localstripe's deliveries that forwards each to ``target_url``
    until it is accepted::

        with WebhookRelay(api_url + "/v1/webhooks/stripe", secret) as relay:
            register localstripe's endpoint with url=relay.url, secret=secret
    """

    def __init__(
        self,
        target_url: str,
        secret: str,
        *,
        first_retry_s: float = 1.0,
        max_backoff_s: float = 30.0,
        give_up_after_s: float = 1800.0,
    ) -> None:
        self.target_url = target_url
        self.secret = secret
        self.first_retry_s = first_retry_s
        self.max_backoff_s = max_backoff_s
        self.give_up_after_s = give_up_after_s
        #: received, delivered, retries (failed attempts that were retried), gave_up, pending.
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-relay")
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the relay is not running; use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats)

    def _count(self, name: str, delta: int = 1) -> None:
        with self._lock:
            self.stats[name] += delta

    def start(self) -> WebhookRelay:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                relay._accept(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass  # one line per delivery would drown the run's own output

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-relay", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> WebhookRelay:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept(self, payload: bytes) -> None:
        self._count("received")
        self._count("pending")
        self._pool.submit(self._deliver, payload)

    def _deliver(self, payload: bytes) -> None:
        started = time.monotonic()
        backoff = self.first_retry_s
        try:
            with httpx.Client(timeout=30, trust_env=False) as http:
                while not self._stopping.is_set():
                    headers = {
                        "Content-Type": "application/json; charset=utf-8",
                        "Stripe-Signature": stripe_signature(
                            self.secret, payload, int(time.time())
                        ),
                    }
                    try:
                        response = http.post(self.target_url, content=payload, headers=headers)
                        if 200 <= response.status_code < 300:
                            self._count("delivered")
                            return
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() - started > self.give_up_after_s:
                        self._count("gave_up")
                        return
                    self._count("retries")
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
        finally:
            self._count("pending", -1)
