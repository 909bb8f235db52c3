"""A fault-injecting loopback HTTP proxy in front of localstripe, for fault-injection runs
(``scripts/chaos.py``). The worker's Stripe API base points at it.

Faults, each with its own rate (a share of ``/v1/`` requests):

* ``5xx``: an HTTP 500/502/503 with Stripe's error body;
* ``429``: Stripe's ``rate_limit`` error (always before forwarding: Stripe did no work);
* ``timeout``: the connection is held for ``timeout_hold_s`` seconds, then closed with no answer.

One answer shape can be changed instead: with ``card_errors_name_only_the_charge`` every card
error loses its ``payment_intent`` and keeps only the ``charge`` (as localstripe 1.15 answered
before ``billing.testing.localstripe_conformance``), so a test reaches the gateway's fallback
that reads the charge to find the intent.

A 5xx or a timeout is injected *before* forwarding (the request never reaches Stripe) or
*after* forwarding (Stripe did the work and the answer is lost) with probability
``after_forward_share``. The second kind is the one that can double charge.

localstripe ignores ``Idempotency-Key``, so the proxy also plays Stripe's idempotency layer,
as documented by Stripe: the first answer to a POST with a key is stored and replayed (with
``Idempotent-Replayed: true``) to every later POST with the same key and the same body; the
same key with another body is refused with a 400 ``idempotency_error``; a key whose first
request is still in flight gets 409. Without this, every lost answer would double charge on
localstripe where real Stripe would not, and the run would test localstripe, not us.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

import httpx

__all__ = ["FaultRates", "StripeFaultProxy"]

#: Headers not passed through: hop-by-hop, recomputed, or (Accept-Encoding) asking for a
#: compressed body this proxy would have to decode.
_DROPPED_REQUEST_HEADERS = frozenset(
    {"host", "content-length", "connection", "keep-alive", "accept-encoding", "transfer-encoding"}
)
_KEPT_RESPONSE_HEADERS = ("content-type", "request-id", "stripe-version")
_MAX_HEADER_BYTES = 64 * 1024


@dataclass
class FaultRates:
    """Shares of ``/v1/`` requests that get each fault (0 to 1, summing to at most 1)."""

    server_error: float = 0.0
    rate_limit: float = 0.0
    timeout: float = 0.0
    #: Of the 5xx and timeout faults, the share injected after localstripe did the work.
    after_forward_share: float = 0.5
    #: How long a "timeout" holds the connection before closing it unanswered, in seconds.
    timeout_hold_s: float = 2.0
    #: Only requests that start with one of these ("GET /v1/charges/") get faults; empty:
    #: every ``/v1/`` request. A test aims a fault at one call of a sequence this way.
    only: tuple[str, ...] = ()
    #: Card errors (402 ``card_error``) lose their ``payment_intent``, naming only the
    #: ``charge``, replays included: the answer a client must read the charge after.
    card_errors_name_only_the_charge: bool = False

    def __post_init__(self) -> None:
        shares = (self.server_error, self.rate_limit, self.timeout, self.after_forward_share)
        if any(not 0.0 <= share <= 1.0 for share in shares):
            raise ValueError(f"fault rates must be between 0 and 1; got {self}")
        if self.server_error + self.rate_limit + self.timeout > 1.0:
            raise ValueError(f"fault rates must sum to at most 1; got {self}")


@dataclass
class _Stored:
    fingerprint: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass
class ProxyStats:
    #: Faults injected, by kind (``stripe_5xx_before_forward``, ``stripe_429``, ...).
    faults: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    idempotent_replays: int = 0
    #: Idempotency key -> PaymentIntent id of every PaymentIntent localstripe created through us.
    payment_intents_created: dict[str, list[str]] = field(default_factory=dict)


class StripeFaultProxy:
    """The proxy on a free loopback port, served from a thread of its own::

    with StripeFaultProxy(localstripe.url, FaultRates(server_error=0.05), seed=1) as proxy:
        settings.stripe_api_base = proxy.url
    """

    def __init__(self, upstream_url: str, rates: FaultRates, *, seed: int = 0) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        #: Read for every request: a caller may change it while the proxy runs.
        self.rates = rates
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._stored: dict[str, _Stored] = {}
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._upstream: httpx.AsyncClient | None = None
        self._port: int | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the proxy is not running; use it as a context manager")
        return f"http://127.0.0.1:{self._port}"

    def faults_injected(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats.faults)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> StripeFaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as error:  # reported to start() below
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close())
                loop.close()

        self._thread = threading.Thread(target=serve, name="stripe-fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout=15) or failure:
            raise RuntimeError(f"the Stripe fault proxy did not start: {failure or 'timeout'}")
        return self

    async def _open(self) -> None:
        self._upstream = httpx.AsyncClient(
            base_url=self.upstream_url, timeout=httpx.Timeout(60.0), trust_env=False
        )
        self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", 0)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)
        if self._upstream is not None:
            await self._upstream.aclose()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        self._loop = self._thread = None
        self._port = None

    def __enter__(self) -> StripeFaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- HTTP/1.1, just enough for the Stripe SDK ------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                answer = await self._handle(request)
                if answer is None:
                    return  # a lost answer: close without a response
                status, headers, body = answer
                _write_response(writer, status, headers, body, keep_alive=request.keep_alive)
                await writer.drain()
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _pick_fault(self) -> tuple[str | None, bool]:
        """(kind, after forwarding?) for the next request, from the current rates."""
        rates = self.rates
        with self._lock:
            draw = self._rng.random()
            after = self._rng.random() < rates.after_forward_share
        if draw < rates.server_error:
            return "5xx", after
        if draw < rates.server_error + rates.rate_limit:
            return "429", False
        if draw < rates.server_error + rates.rate_limit + rates.timeout:
            return "timeout", after
        return None, False

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats.faults[name] += 1

    async def _handle(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes] | None:
        with self._lock:
            self.stats.requests += 1
        kind: str | None = None
        after = False
        rates = self.rates
        if request.target.startswith("/v1/") and (
            not rates.only or f"{request.method} {request.target}".startswith(rates.only)
        ):
            kind, after = self._pick_fault()
        if kind == "429":
            self._count("stripe_429")
            return _stripe_error(
                429, "invalid_request_error", "rate_limit", "Too many requests (injected)"
            )
        if kind is not None and not after:
            self._count(f"stripe_{kind}_before_forward")
            return await self._fail(kind)
        answer = await self._forward_idempotently(request)
        if kind is not None:
            self._count(f"stripe_{kind}_after_forward")
            return await self._fail(kind)
        if rates.card_errors_name_only_the_charge:
            return _without_error_intent(answer)
        return answer

    async def _fail(self, kind: str) -> tuple[int, list[tuple[str, str]], bytes] | None:
        if kind == "timeout":
            await asyncio.sleep(self.rates.timeout_hold_s)
            return None
        with self._lock:
            status = self._rng.choice((500, 502, 503))
        return _stripe_error(status, "api_error", None, f"HTTP {status} (injected)")

    async def _forward_idempotently(
        self, request: _Request
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        key = request.header("idempotency-key") if request.method == "POST" else None
        if key is None:
            return await self._forward(request)
        fingerprint = hashlib.sha256(
            f"{request.method} {request.target}\n".encode() + request.body
        ).hexdigest()
        with self._lock:
            stored = self._stored.get(key)
            in_flight = key in self._in_flight
            if stored is None and not in_flight:
                self._in_flight.add(key)
        if stored is not None:
            if stored.fingerprint != fingerprint:
                return _stripe_error(
                    400,
                    "idempotency_error",
                    None,
                    f"Keys for idempotent requests can only be used with the same parameters "
                    f"they were first used with (key {key!r})",
                )
            with self._lock:
                self.stats.idempotent_replays += 1
            return stored.status, [*stored.headers, ("Idempotent-Replayed", "true")], stored.body
        if in_flight:
            return _stripe_error(
                409,
                "idempotency_error",
                "idempotency_key_in_use",
                f"There is currently another in-progress request using this key ({key!r})",
            )
        try:
            status, headers, body = await self._forward(request)
            if status < 500:
                # Stripe stores the result of every request that started executing.
                with self._lock:
                    self._stored[key] = _Stored(fingerprint, status, headers, body)
                    self._note_created_intent(request, key, status, body)
            return status, headers, body
        finally:
            with self._lock:
                self._in_flight.discard(key)

    def _note_created_intent(self, request: _Request, key: str, status: int, body: bytes) -> None:
        if request.target.split("?", 1)[0] != "/v1/payment_intents":
            return
        with contextlib.suppress(ValueError, AttributeError):
            parsed = json.loads(body)
            intent = parsed if status < 400 else parsed["error"].get("payment_intent")
            intent_id = intent.get("id") if isinstance(intent, dict) else None
            if isinstance(intent_id, str):
                self.stats.payment_intents_created.setdefault(key, []).append(intent_id)

    async def _forward(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        assert self._upstream is not None
        headers = [(k, v) for k, v in request.headers if k.lower() not in _DROPPED_REQUEST_HEADERS]
        try:
            response = await self._upstream.request(
                request.method, request.target, headers=headers, content=request.body
            )
        except httpx.HTTPError as error:
            return _stripe_error(502, "api_error", None, f"localstripe unreachable: {error}")
        kept = [
            (name, response.headers[name])
            for name in _KEPT_RESPONSE_HEADERS
            if name in response.headers
        ]
        return response.status_code, kept, response.content


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError as error:
        raise ValueError("request head too large") from error
    if len(head) > _MAX_HEADER_BYTES:
        raise ValueError("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    lookup = {k.lower(): v for k, v in headers}
    if "chunked" in lookup.get("transfer-encoding", "").lower():
        raise ValueError("chunked request bodies are not supported")
    length = int(lookup.get("content-length", "0") or "0")
    body = await reader.readexactly(length) if length else b""
    connection = lookup.get("connection", "").lower()
    keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
    return _Request(method.upper(), target, headers, body, keep_alive)


def _write_response(
    writer: asyncio.StreamWriter,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    keep_alive: bool,
) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append(f"Content-Length: {len(body)}")
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def _without_error_intent(
    answer: tuple[int, list[tuple[str, str]], bytes],
) -> tuple[int, list[tuple[str, str]], bytes]:
    """``answer`` with a card error's ``payment_intent`` removed (its ``charge`` kept)."""
    status, headers, body = answer
    if status != 402:
        return answer
    try:
        parsed = json.loads(body)
        error = parsed["error"]
    except (ValueError, KeyError, TypeError):
        return answer
    if not isinstance(error, dict) or error.get("type") != "card_error":
        return answer
    error.pop("payment_intent", None)
    return status, headers, json.dumps(parsed).encode()


def _stripe_error(
    status: int, error_type: str, code: str | None, message: str
) -> tuple[int, list[tuple[str, str]], bytes]:
    error: dict[str, str] = {"type": error_type, "message": message}
    if code is not None:
        error["code"] = code
    return status, [("Content-Type", "application/json")], json.dumps({"error": error}).encode()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Request Failed",
    404: "Not Found",
    409: "Conflict",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
