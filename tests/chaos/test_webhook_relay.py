"""The webhook relay of chaos runs plays Stripe's delivery retries, which localstripe lacks: an
event the endpoint answers 5xx (or cannot take at all) is delivered again until it is accepted,
each time signed afresh so that the API's own signature check accepts it."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from billing.api.webhooks import verify_signature
from billing.testing.webhook_relay import WebhookRelay

SECRET = "whsec_relay_test"


def test_a_refused_delivery_is_retried_until_accepted_and_signed_each_time() -> None:
    answers = [503, 500, 200]
    seen: list[tuple[bytes, str]] = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((body, self.headers["Stripe-Signature"]))
            self.send_response(answers.pop(0))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    payload = b'{"id": "evt_1", "type": "payment_intent.succeeded"}'
    try:
        with WebhookRelay(
            f"http://127.0.0.1:{endpoint.server_address[1]}/", SECRET, first_retry_s=0.05
        ) as relay:
            # localstripe's delivery: the relay takes it at once.
            assert httpx.post(relay.url, content=payload, timeout=5).status_code == 200
            deadline = time.monotonic() + 10
            while relay.counts().get("delivered") != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            counts = relay.counts()
    finally:
        endpoint.shutdown()

    assert counts == {"received": 1, "pending": 0, "retries": 2, "delivered": 1}
    assert [body for body, _ in seen] == [payload] * 3
    for body, signature in seen:
        verify_signature(body, signature, SECRET, tolerance_s=300)  # raises if not Stripe's
