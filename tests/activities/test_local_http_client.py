"""The test harness's Stripe HTTP client (``billing.testing.stripe_recording.LocalHTTPClient``):
plain ``http.client`` with a kept-alive connection per thread instead of ``requests``, whose
per-request machinery cost about three times the exchange itself in every simulated charge.
It must answer exactly as the SDK's own client does."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest
import requests
import stripe

from activities.stripe_gateway import make_stripe_client
from billing.testing.localstripe import LOCALSTRIPE_API_KEY, LocalStripe
from billing.testing.stripe_recording import RecordingHTTPClient


def test_requests_are_sent_without_the_requests_library(
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the harness's Stripe calls went through requests")

    monkeypatch.setattr(requests.Session, "request", refused)
    created = stripe_client.v1.customers.create(params={"email": "lean@example.com"})
    again = stripe_client.v1.customers.retrieve(created.id)
    assert (again.id, again.email) == (created.id, "lean@example.com")
    # One connection served both (kept alive), and both were recorded.
    assert [(r.method, r.status) for r in recording_http_client.recorded] == [
        ("POST", 200),
        ("GET", 200),
    ]


def test_errors_answer_as_with_the_sdk_client(stripe_client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as refused:
        stripe_client.v1.customers.retrieve("cus_missing")
    assert refused.value.http_status == 404


def test_an_unreachable_server_is_a_retryable_connection_error(localstripe: LocalStripe) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    client = make_stripe_client(
        api_key=LOCALSTRIPE_API_KEY,
        api_base=f"http://127.0.0.1:{port}",
        max_network_retries=0,
        http_client=RecordingHTTPClient(timeout_s=2.0),
    )
    with pytest.raises(stripe.APIConnectionError) as failed:
        client.v1.customers.retrieve("cus_any")
    assert failed.value.should_retry


class _OneRequestPerConnection(http.server.BaseHTTPRequestHandler):
    """Answers each request as HTTP/1.1 without ``Connection: close``, then closes the
    connection anyway: what a server's keep-alive timeout does to an idle client."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({"id": "cus_1", "object": "customer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_connection_the_server_closed_is_replaced_not_failed() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneRequestPerConnection)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        client = make_stripe_client(
            api_key=LOCALSTRIPE_API_KEY,
            api_base=f"http://127.0.0.1:{server.server_address[1]}",
            max_network_retries=0,
            http_client=RecordingHTTPClient(timeout_s=5.0),
        )
        for _ in range(3):
            time.sleep(0.05)  # the server has closed the previous connection by now
            assert client.v1.customers.retrieve("cus_1").id == "cus_1"
    finally:
        server.shutdown()
        server.server_close()
