"""Registering the business's event endpoints, shared by the API and the CLI: the URL and
event-type checks (https outside dev, no private addresses, known types), one endpoint per
URL, and a generated signing secret."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from billing.business_events import (
    MAX_ENDPOINTS,
    address_is_public,
    check_contact_email,
    check_endpoint_url,
    check_event_types,
    new_signing_secret,
)
from billing.clock import Clock
from billing.errors import ChangeRefused, InvalidInput, NotFound
from billing.ids import new_id
from billing.records import EventEndpointRecord
from billing.text import REASON
from db.engine import unit_of_work
from db.repositories import events as events_repo

Resolver = Callable[[str], list[str]]


def resolve_host(host: str) -> list[str]:
    """``host``'s addresses from the system resolver, in its order (the order a connection
    tries them in), without repeats. OSError when it does not resolve. The one resolver of
    endpoint hosts: registration checks them, and every delivery attempt resolves once more
    and connects only to what it checked (``activities.pinned_http``)."""
    found: list[str] = []
    for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
        address = str(info[4][0])
        if address not in found:
            found.append(address)
    return found


def non_public_address(addresses: Iterable[str]) -> str | None:
    """The first of ``addresses`` a delivery may not reach (private, loopback, link-local or
    metadata), or None when all are public."""
    return next((a for a in addresses if not address_is_public(a)), None)


def checked_url(url: str, *, allow_insecure: bool, resolve: Resolver = resolve_host) -> str:
    """The URL if acceptable (``billing.business_events.check_endpoint_url``), and, outside
    dev, only if every address its host resolves to is public."""
    check_endpoint_url(url, allow_insecure=allow_insecure)
    if not allow_insecure:
        host = urlsplit(url).hostname or ""
        try:
            addresses = resolve(host)
        except OSError:
            raise InvalidInput(
                f"url's host {host!r} does not resolve; register a reachable public host",
                field="url",
            ) from None
        refused = non_public_address(addresses)
        if refused is not None:
            raise InvalidInput(
                f"url's host {host!r} resolves to {refused}, a private, loopback or "
                "link-local address; endpoints must be on the public internet",
                field="url",
            )
    return url


def register_endpoint(
    session_factory: sessionmaker[Session],
    clock: Clock,
    *,
    url: str,
    event_types: list[str],
    description: str | None,
    allow_insecure: bool,
    resolve: Resolver = resolve_host,
    contact_email: str | None = None,
) -> EventEndpointRecord:
    """A new enabled endpoint with a fresh secret; ChangeRefused when one for the URL exists
    (naming it), so a repeated registration never makes a second endpoint."""
    types = check_event_types(event_types)
    url = checked_url(url, allow_insecure=allow_insecure, resolve=resolve)
    description = REASON.check_optional(description, field="description")
    if contact_email:
        contact_email = check_contact_email(contact_email, field="contact_email")
    now = clock.now()
    with unit_of_work(session_factory) as session:
        if events_repo.count_endpoints(session) >= MAX_ENDPOINTS:
            raise ChangeRefused(
                f"at most {MAX_ENDPOINTS} endpoints; change or disable one", field="url"
            )
        stored, created = events_repo.insert_endpoint(
            session,
            EventEndpointRecord(
                id=new_id("we"),
                url=url,
                url_digest=hashlib.sha256(url.encode()).hexdigest(),
                event_types=types,
                secret=new_signing_secret(),
                description=description,
                contact_email=contact_email or None,
                created_at=now,
                updated_at=now,
            ),
        )
    if not created:
        raise ChangeRefused(
            f"an endpoint for this url exists already: {stored.id}; change it with "
            f"PATCH /v1/event-endpoints/{stored.id} (billing event-endpoints ...)",
            field="url",
        )
    return stored


def set_endpoint_enabled(
    session_factory: sessionmaker[Session], clock: Clock, endpoint_id: str, *, enabled: bool
) -> EventEndpointRecord:
    with unit_of_work(session_factory) as session:
        if events_repo.get_endpoint(session, endpoint_id) is None:
            raise NotFound(f"event endpoint {endpoint_id!r} not found", field="id")
        updated = events_repo.update_endpoint(
            session,
            endpoint_id,
            now=clock.now(),
            enabled=enabled,
            disabled_reason="disabled by an operator",
        )
    assert updated is not None
    return updated
