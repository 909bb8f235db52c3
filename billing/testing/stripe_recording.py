"""An HTTP client for the Stripe SDK that records what goes on the wire and can lose requests
or their answers.

localstripe ignores ``Idempotency-Key`` (the same key creates a second PaymentIntent), so tests
cannot show at-most-once charging by looking at its state. They show the real-Stripe contract
instead: every attempt of one charge carries the same key, including the attempt after a
connection that dropped once the server had already processed the request.
"""

from __future__ import annotations

import http.client
import select
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import stripe

__all__ = ["LocalHTTPClient", "RecordedRequest", "RecordingHTTPClient"]


class LocalHTTPClient(stripe.HTTPClient):
    """A Stripe SDK HTTP client on ``http.client`` with one kept-alive connection per thread
    and host, for the Stripe-protocol server on this machine (localstripe) in tests and
    simulations; production keeps ``requests`` (``ActivityDeadlineClient``).

    ``requests`` builds a session-merged, hook-dispatched, adapter-routed request per call:
    about four times the CPU of the ``http.client`` exchange underneath, which is all a
    plain-HTTP server on localhost needs (no proxies, no TLS, no redirects). A connection
    that fails is closed and the failure raised as ``stripe.APIConnectionError``, retryable
    as the SDK's own clients report a connection error or timeout."""

    name: ClassVar[str] = "http.client"

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        super().__init__()
        self._timeout_s = timeout_s
        self._connections = threading.local()

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"LocalHTTPClient speaks plain HTTP to a local server; got {url}")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        pool: dict[str, http.client.HTTPConnection] = self._connections.__dict__.setdefault(
            "by_host", {}
        )
        connection = pool.get(parts.netloc)
        if connection is not None and _dropped(connection):
            # The server closed the idle connection (its keep-alive timeout): a new one, as
            # urllib3 does, rather than a request sent into a closed socket.
            connection.close()
            connection = None
        if connection is None:
            connection = pool[parts.netloc] = http.client.HTTPConnection(
                parts.netloc, timeout=self._timeout_s
            )
        try:
            body = post_data.encode("utf-8") if isinstance(post_data, str) else post_data
            connection.request(method.upper(), target, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            pool.pop(parts.netloc, None)
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"Unexpected error communicating with Stripe: {type(error).__name__}: {error}",
                should_retry=True,
            ) from error
        if response.will_close:
            connection.close()
            pool.pop(parts.netloc, None)
        # The message type reads headers case-insensitively, as the SDK expects.
        return answer, response.status, response.headers  # type: ignore[return-value]

    def request_stream(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        raise NotImplementedError("LocalHTTPClient does not stream")

    def close(self) -> None:
        """Close this thread's connections (others close with their threads' sockets)."""
        pool: dict[str, http.client.HTTPConnection] = self._connections.__dict__.get("by_host", {})
        for connection in pool.values():
            connection.close()
        pool.clear()


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the SDK tried to send. ``status`` is None when there was no answer:
    ``response_dropped`` (the server did the work, the answer was lost) or ``request_dropped``
    (the request never reached the server)."""

    method: str
    path: str
    idempotency_key: str | None
    status: int | None
    response_dropped: bool = False
    request_dropped: bool = False
    #: The ``Stripe-Version`` header sent (None: none, the account's default version).
    stripe_version: str | None = None


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection was closed by the server: its socket is readable
    (at end of file) while no request is in flight."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class RecordingHTTPClient(LocalHTTPClient):
    """``LocalHTTPClient`` that records each request's
    method, URL path and Idempotency-Key, thread-safely, and can drop requests or their
    answers on purpose.

    Pass it as ``http_client`` to ``make_stripe_client``; build that client with
    ``max_network_retries=0`` when a test should see the dropped answer itself rather than the
    SDK's own retry.
    """

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        super().__init__(timeout_s=timeout_s)
        self._lock = threading.Lock()
        self._recorded: list[RecordedRequest] = []
        # (method, path) -> (how many still to drop, whether the SDK may retry): answers the
        # server produced, and requests it never gets.
        self._drops: dict[tuple[str, str], tuple[int, bool]] = {}
        self._request_drops: dict[tuple[str, str], tuple[int, bool]] = {}

    def drop_responses(
        self, path: str, *, times: int = 1, method: str = "POST", retryable: bool = True
    ) -> None:
        """Lose the answers of the next ``times`` requests to ``path`` (e.g.
        ``/v1/payment_intents``) *after* the server processed them, like a connection that
        dropped or a worker killed mid-request: the server has done the work, the client gets
        ``stripe.APIConnectionError``. ``retryable`` is what the SDK's own retry loop sees
        (a real reset/timeout is retryable)."""
        _arm(self._lock, self._drops, path, times=times, method=method, retryable=retryable)

    def drop_requests(
        self, path: str, *, times: int = 1, method: str = "POST", retryable: bool = True
    ) -> None:
        """Lose the next ``times`` requests to ``path`` *before* they reach the server, like a
        connection that failed while sending or a worker killed before the request left: the
        server never sees them, the client gets ``stripe.APIConnectionError``. ``retryable``
        is what the SDK's own retry loop sees."""
        _arm(self._lock, self._request_drops, path, times=times, method=method, retryable=retryable)

    def _take_drop(self, method: str, path: str) -> bool | None:
        """Whether to drop this answer: None for no, else the ``should_retry`` to report."""
        return _take(self._lock, self._drops, method, path)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        # Same signature as ``stripe.HTTPClient.request``; the body is ``bytes`` at runtime.
        method_upper = method.upper()
        path = urlsplit(url).path
        key = _header(headers, "Idempotency-Key")
        version = _header(headers, "Stripe-Version")
        drop_request = _take(self._lock, self._request_drops, method_upper, path)
        if drop_request is not None:
            self._record(
                RecordedRequest(
                    method_upper, path, key, None, request_dropped=True, stripe_version=version
                )
            )
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"simulated network failure: {method_upper} {path} never reached the server",
                should_retry=drop_request,
            )
        try:
            body, status, response_headers = super().request(method, url, headers, post_data)
        except stripe.APIConnectionError:
            self._record(
                RecordedRequest(method_upper, path, key, status=None, stripe_version=version)
            )
            raise
        drop = self._take_drop(method_upper, path)
        if drop is not None:
            self._record(
                RecordedRequest(
                    method_upper, path, key, None, response_dropped=True, stripe_version=version
                )
            )
            # The SDK leaves APIConnectionError's constructor unannotated.
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"simulated network failure: the server answered {method_upper} {path} with "
                f"HTTP {status}, but the connection dropped before the client read it",
                should_retry=drop,
            )
        self._record(RecordedRequest(method_upper, path, key, status, stripe_version=version))
        return body, status, response_headers

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._recorded.append(request)

    @property
    def recorded(self) -> list[RecordedRequest]:
        """A snapshot of every request so far, oldest first."""
        with self._lock:
            return list(self._recorded)

    def requests_to(self, path: str, *, method: str | None = "POST") -> list[RecordedRequest]:
        """Recorded requests to exactly ``path`` (and ``method``, unless None)."""
        return [
            r
            for r in self.recorded
            if r.path == path and (method is None or r.method == method.upper())
        ]

    def clear(self) -> None:
        """Forget the recorded requests (pending drops stay armed)."""
        with self._lock:
            self._recorded.clear()


def _arm(
    lock: threading.Lock,
    drops: dict[tuple[str, str], tuple[int, bool]],
    path: str,
    *,
    times: int,
    method: str,
    retryable: bool,
) -> None:
    if times < 1:
        raise ValueError(f"times must be at least 1; got {times}")
    with lock:
        drops[(method.upper(), path)] = (times, retryable)


def _take(
    lock: threading.Lock, drops: dict[tuple[str, str], tuple[int, bool]], method: str, path: str
) -> bool | None:
    """Use up one armed drop of (method, path): None if none is armed, else its retryable."""
    with lock:
        pending = drops.get((method, path))
        if pending is None:
            return None
        remaining, retryable = pending
        if remaining <= 1:
            del drops[(method, path)]
        else:
            drops[(method, path)] = (remaining - 1, retryable)
        return retryable


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None
