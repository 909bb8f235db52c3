"""One HTTP POST to a host resolved once and checked: the SSRF guard of event deliveries.

The endpoint's host is resolved exactly once per attempt. Every address it gives must be
public (outside dev), and the connection goes to one of exactly those addresses: nothing
resolves the name a second time, so a DNS answer that changes between the check and the
connect (DNS rebinding: public for the check, 169.254.169.254 for the connect) cannot steer
the request. TLS is still verified against the URL's host name (SNI and certificate), as if
the name had been resolved by the connection itself.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore

from billing.event_endpoints import Resolver, non_public_address


class AddressRefused(ValueError):
    """The endpoint's host resolved to an address deliveries may not reach."""


def checked_addresses(host: str, resolve: Resolver, *, allow_private: bool) -> list[str]:
    """``host`` resolved once; every address public unless ``allow_private`` (dev)."""
    try:
        addresses = resolve(host)
    except OSError as error:
        raise AddressRefused(f"{host} does not resolve: {error}") from None
    if not addresses:
        raise AddressRefused(f"{host} resolves to no address")
    refused = None if allow_private else non_public_address(addresses)
    if refused is not None:
        raise AddressRefused(
            f"{host} resolves to {refused}, which is not public (private, loopback, "
            "link-local or metadata); refused"
        )
    return addresses


#: Opens a TCP connection to (address, port) within a timeout (seconds); tests record it.
Dialer = Callable[[str, int, float | None], httpcore.NetworkStream]


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects every request to the checked addresses, never to what the host name might
    resolve to now; TLS on top uses the URL's host name (httpcore passes it as SNI and
    checks the certificate against it)."""

    def __init__(self, addresses: Iterable[str], dial: Dialer | None) -> None:
        self._addresses = list(addresses)
        self._inner = httpcore.SyncBackend()
        self._dial = dial
        self.connected_to: str | None = None

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in self._addresses:
            try:
                if self._dial is not None:
                    stream = self._dial(address, port, timeout)
                else:
                    # An IP literal: getaddrinfo does no lookup for it.
                    stream = self._inner.connect_tcp(
                        address, port, timeout=timeout, socket_options=socket_options
                    )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
                continue
            self.connected_to = address
            return stream
        assert last is not None
        raise last

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not event endpoints")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


@dataclass(frozen=True)
class PostResult:
    status_code: int
    #: The address the request went to (one of the checked ones).
    address: str


#: What a failed POST raises besides AddressRefused (a network, TLS or protocol failure).
POST_ERRORS: tuple[type[Exception], ...] = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    ssl.SSLError,
    OSError,
)


def pinned_post(
    url: str,
    *,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    resolve: Resolver,
    allow_private: bool,
    ssl_context: ssl.SSLContext | None = None,
    dial: Dialer | None = None,
) -> PostResult:
    """POST ``body`` to ``url`` with the host resolved once (``resolve``) and checked; no
    redirect is followed. Raises AddressRefused or one of POST_ERRORS."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    addresses = checked_addresses(host, resolve, allow_private=allow_private)
    backend = _PinnedBackend(addresses, dial)
    timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
    with httpcore.ConnectionPool(
        ssl_context=ssl_context or ssl.create_default_context(),
        network_backend=backend,
        retries=0,
        max_connections=1,
    ) as pool:
        response = pool.request(
            "POST",
            url,
            headers=[
                (b"Host", parts.netloc.rpartition("@")[2].encode("idna")),
                (b"Content-Length", str(len(body)).encode()),
                *((k.encode(), v.encode()) for k, v in headers.items()),
            ],
            content=body,
            extensions={"timeout": timeouts},
        )
    assert backend.connected_to is not None
    return PostResult(status_code=response.status, address=backend.connected_to)
