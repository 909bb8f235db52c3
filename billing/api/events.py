"""Events for the business and the mail outbox, over HTTP.

- ``/v1/event-endpoints`` (scope ``admin``): register, list and change the URLs that receive
  our events; the signing secret is shown once, in the answer to the registration.
- ``/v1/events`` (``finance`` or ``admin``): every event, keyset-paginated, for consumers that
  poll; one event with its deliveries and their attempts; a manual redelivery (``admin``).
- ``/v1/notifications`` (``finance`` or ``admin``): the customer mails, with their delivery
  status and why one failed.
- ``/v1/customers/{id}/mail-preferences`` (``admin``): a customer's mail locale and opt-out.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field, StrictBool

from billing.api.auth import require_scope
from billing.api.dependencies import get_clock, get_deps, get_settings, require_json_body
from billing.api.schemas import (
    ID_PATTERN,
    Instant,
    LocaleIn,
    OurIdIn,
    ReasonIn,
    RequestIn,
    error_responses,
)
from billing.business_events import (
    EVENT_TYPES,
    check_contact_email,
    check_event_types,
    stream_subscription_id,
)
from billing.clock import Clock
from billing.errors import ChangeRefused, InvalidInput, NotFound
from billing.event_endpoints import Resolver, checked_url, register_endpoint, resolve_host
from billing.finance import InvoiceCursor
from billing.notices import NoticeKind, NoticeStatus
from billing.records import (
    EventDeliveryAttemptRecord,
    EventDeliveryRecord,
    EventEndpointRecord,
    EventRecord,
    NotificationRecord,
)
from billing.settings import Settings
from billing.worker import Dependencies
from db.engine import unit_of_work
from db.repositories import customers as customers_repo
from db.repositories import events as events_repo
from db.repositories import notifications as notifications_repo

router = APIRouter(prefix="/v1", responses=error_responses(401, 403, 422, 503))
_ID = Path(min_length=1, max_length=40, pattern=ID_PATTERN)
#: What a route that reads a JSON body may also answer, as the other write routes document:
#: JSON that does not parse (400), a body over the limit (413), one that is not JSON (415).
_BODY_ERRORS = (400, 413, 415)

# ---- schemas -------------------------------------------------------------------------------

#: An event type, or ``*`` for all. The document lists them (an enum), so a client, or a
#: fuzzer, sees what is accepted; the check itself stays ``check_event_types``, shared with
#: the CLI, whose refusal names the known types.
EventTypeIn = Annotated[
    str,
    Field(min_length=1, max_length=64, json_schema_extra={"enum": [*EVENT_TYPES, "*"]}),
]
UrlIn = Annotated[str, Field(min_length=1, max_length=2000)]
#: Checked by billing.business_events.check_contact_email (422 naming the field).
ContactEmailIn = Annotated[str, Field(max_length=320)]


class EndpointIn(RequestIn):
    url: UrlIn = Field(description="Where events are POSTed: https:// (http only in dev).")
    enabled_events: list[EventTypeIn] = Field(
        min_length=1,
        max_length=len(EVENT_TYPES) + 1,
        description=f"Event types to receive, or ['*'] for all: {', '.join(EVENT_TYPES)}.",
    )
    description: ReasonIn | None = None
    contact_email: ContactEmailIn | None = Field(
        None,
        description="Told by e-mail if the endpoint is disabled after failing for 3 days "
        "(default: BILLING_EVENTS_CONTACT_EMAIL).",
    )


class EndpointPatchIn(RequestIn):
    enabled: StrictBool | None = None
    url: UrlIn | None = None
    enabled_events: list[EventTypeIn] | None = Field(None, min_length=1)
    description: ReasonIn | None = None
    contact_email: ContactEmailIn | None = Field(None, description="'' removes it.")


class EndpointOut(BaseModel):
    id: str
    url: str
    enabled_events: list[str]
    description: str | None
    enabled: bool
    disabled_reason: str | None
    contact_email: str | None = None
    created_at: Instant
    updated_at: Instant

    @classmethod
    def of(cls, e: EventEndpointRecord) -> EndpointOut:
        return cls(
            id=e.id,
            url=e.url,
            enabled_events=e.event_types,
            description=e.description,
            enabled=e.enabled,
            disabled_reason=e.disabled_reason,
            contact_email=e.contact_email,
            created_at=e.created_at,
            updated_at=e.updated_at,
        )


class EndpointCreatedOut(EndpointOut):
    secret: str = Field(
        description="Signs every delivery (Billing-Signature). Shown only now: store it."
    )


class EndpointListOut(BaseModel):
    data: list[EndpointOut]


class EventOut(BaseModel):
    id: str
    type: str
    created: Instant
    subscription_id: str | None = Field(
        description="The subscription it is about; null for an account-level event (payouts)."
    )
    stream: str = Field(
        description="What ``sequence`` counts: the subscription's id, or 'account' for the "
        "account-level events (payouts, disputes of charges that are none of our payments)."
    )
    sequence: int = Field(description="The stream's events count from 1, in order.")
    data: dict[str, Any] = Field(description="{'object': the object as the API shows it}")

    @classmethod
    def of(cls, e: EventRecord) -> EventOut:
        return cls(
            id=e.id,
            type=e.type,
            created=e.created_at,
            subscription_id=stream_subscription_id(e.subscription_id),
            stream=e.subscription_id,
            sequence=e.sequence,
            data={"object": e.object},
        )


class EventListOut(BaseModel):
    data: list[EventOut]
    has_more: bool
    next_cursor: str | None


class DeliveryAttemptOut(BaseModel):
    attempted_at: Instant
    status_code: int | None
    error: str | None
    duration_ms: int

    @classmethod
    def of(cls, a: EventDeliveryAttemptRecord) -> DeliveryAttemptOut:
        return cls(
            attempted_at=a.attempted_at,
            status_code=a.status_code,
            error=a.error,
            duration_ms=a.duration_ms,
        )


class DeliveryOut(BaseModel):
    id: str
    endpoint_id: str
    status: str
    attempts: list[DeliveryAttemptOut]
    delivered_at: Instant | None
    last_error: str | None

    @classmethod
    def of(cls, d: EventDeliveryRecord, attempts: list[EventDeliveryAttemptRecord]) -> DeliveryOut:
        return cls(
            id=d.id,
            endpoint_id=d.endpoint_id,
            status=str(d.status),
            attempts=[DeliveryAttemptOut.of(a) for a in attempts if a.delivery_id == d.id],
            delivered_at=d.delivered_at,
            last_error=d.last_error,
        )


class EventDetailOut(EventOut):
    deliveries: list[DeliveryOut]


class RedeliverIn(RequestIn):
    endpoint_id: OurIdIn | None = Field(
        None, description="Only to this endpoint; default: every endpoint it was owed to."
    )


class NotificationOut(BaseModel):
    id: str
    kind: str
    customer_id: str | None = Field(description="None for a mail to the business.")
    recipient: str | None = Field(
        None, description="A mail to the business (kind endpoint_disabled): its address."
    )
    subscription_id: str | None
    invoice_id: str | None
    status: str
    attempts: int
    last_error: str | None = Field(description="Why the last attempt failed, or why skipped.")
    message_id: str | None
    created_at: Instant
    sent_at: Instant | None
    failed_at: Instant | None

    @classmethod
    def of(cls, n: NotificationRecord) -> NotificationOut:
        return cls(
            id=n.id,
            kind=n.kind,
            customer_id=n.customer_id,
            recipient=n.recipient,
            subscription_id=n.subscription_id,
            invoice_id=n.invoice_id,
            status=str(n.status),
            attempts=n.attempts,
            last_error=n.last_error,
            message_id=n.message_id,
            created_at=n.created_at,
            sent_at=n.sent_at,
            failed_at=n.failed_at,
        )


class NotificationListOut(BaseModel):
    data: list[NotificationOut]


class MailPreferencesIn(RequestIn):
    locale: LocaleIn | None = Field(
        None,
        description="BCP 47 locale CLDR knows, for amounts and dates in mails, e.g. 'de-CH'.",
    )
    opt_out_non_essential: StrictBool | None = Field(
        None,
        description="True: no receipts or trial reminders. Dunning notices and the annual "
        "renewal reminder are always sent.",
    )


class MailPreferencesOut(BaseModel):
    customer_id: str
    locale: str | None
    opt_out_non_essential: bool


# ---- endpoints -----------------------------------------------------------------------------


def _resolver(request: Request) -> Resolver:
    """How host names are resolved: tests may put their own on ``app.state.resolve_host``."""
    resolver: Resolver | None = getattr(request.app.state, "resolve_host", None)
    return resolver or resolve_host


@router.post(
    "/event-endpoints",
    status_code=201,
    tags=["events"],
    summary="Register an endpoint for events",
    dependencies=[require_scope("admin"), Depends(require_json_body)],
    responses=error_responses(*_BODY_ERRORS, 409),
)
async def create_endpoint(
    body: EndpointIn,
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    settings: Annotated[Settings, Depends(get_settings)],
    clock: Annotated[Clock, Depends(get_clock)],
) -> EndpointCreatedOut:
    """A new endpoint, enabled, with a generated signing secret shown only in this answer.
    One endpoint per URL: registering the same URL again is refused (409) with the first's
    id."""
    stored = await asyncio.to_thread(
        register_endpoint,
        deps.session_factory,
        clock,
        url=body.url,
        event_types=body.enabled_events,
        description=body.description,
        allow_insecure=settings.endpoints_allow_insecure(),
        resolve=_resolver(request),
        contact_email=body.contact_email,
    )
    return EndpointCreatedOut(**EndpointOut.of(stored).model_dump(), secret=stored.secret)


@router.get(
    "/event-endpoints",
    tags=["events"],
    summary="List event endpoints",
    dependencies=[require_scope("admin")],
)
async def list_endpoints(deps: Annotated[Dependencies, Depends(get_deps)]) -> EndpointListOut:
    """Every endpoint, oldest first, without secrets."""

    def read() -> EndpointListOut:
        with unit_of_work(deps.session_factory) as session:
            return EndpointListOut(
                data=[EndpointOut.of(e) for e in events_repo.list_endpoints(session)]
            )

    return await asyncio.to_thread(read)


@router.patch(
    "/event-endpoints/{id}",
    tags=["events"],
    summary="Enable, disable or change an endpoint",
    dependencies=[require_scope("admin"), Depends(require_json_body)],
    responses=error_responses(*_BODY_ERRORS, 404),
)
async def update_endpoint(
    id: Annotated[str, _ID],
    body: EndpointPatchIn,
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    settings: Annotated[Settings, Depends(get_settings)],
    clock: Annotated[Clock, Depends(get_clock)],
) -> EndpointOut:
    """Re-enabling an endpoint resumes its pending deliveries, in order."""
    event_types = (
        check_event_types(body.enabled_events) if body.enabled_events is not None else None
    )
    contact_email = body.contact_email
    if contact_email:
        contact_email = check_contact_email(contact_email, field="contact_email")
    url = None
    if body.url is not None:
        url = await asyncio.to_thread(
            checked_url,
            body.url,
            allow_insecure=settings.endpoints_allow_insecure(),
            resolve=_resolver(request),
        )

    def write() -> EndpointOut:
        with unit_of_work(deps.session_factory) as session:
            if events_repo.get_endpoint(session, id) is None:
                raise NotFound(f"event endpoint {id!r} not found", field="id")
            updated = events_repo.update_endpoint(
                session,
                id,
                now=clock.now(),
                enabled=body.enabled,
                disabled_reason="disabled through the API",
                url=url,
                event_types=event_types,
                description=body.description,
                contact_email=contact_email,
            )
        assert updated is not None
        return EndpointOut.of(updated)

    return await asyncio.to_thread(write)


# ---- events --------------------------------------------------------------------------------


@router.get(
    "/events",
    tags=["events"],
    summary="List events",
    dependencies=[require_scope("finance", "admin")],
)
async def list_events(
    deps: Annotated[Dependencies, Depends(get_deps)],
    limit: Annotated[int, Query(ge=1, le=100)] = 25,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    type: Annotated[Literal[EVENT_TYPES] | None, Query()] = None,  # type: ignore[valid-type]
    subscription_id: Annotated[
        str | None, Query(min_length=1, max_length=40, pattern=ID_PATTERN)
    ] = None,
    stream: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=40,
            pattern=ID_PATTERN,
            description="A subscription's id, or 'account' for the account-level events.",
        ),
    ] = None,
) -> EventListOut:
    """Events oldest first (by created, then id); pass ``next_cursor`` as ``cursor`` for the
    next page. A poller keeps its last cursor and asks again later."""
    if stream is not None and subscription_id is not None and stream != subscription_id:
        raise InvalidInput("give subscription_id or stream, not two different ones", field="stream")
    subscription_id = subscription_id or stream
    after = InvoiceCursor.decode(cursor) if cursor is not None else None

    def read() -> EventListOut:
        with unit_of_work(deps.session_factory) as session:
            rows = events_repo.list_events(
                session,
                limit=limit + 1,
                after=(after.created_at, after.invoice_id) if after is not None else None,
                type=type,
                subscription_id=subscription_id,
            )
        page, more = rows[:limit], len(rows) > limit
        last = page[-1] if page else None
        next_cursor = InvoiceCursor(last.created_at, last.id).encode() if last else cursor
        return EventListOut(
            data=[EventOut.of(e) for e in page], has_more=more, next_cursor=next_cursor
        )

    return await asyncio.to_thread(read)


def _event_detail(deps: Dependencies, event_id: str) -> EventDetailOut:
    with unit_of_work(deps.session_factory) as session:
        event = events_repo.get_event(session, event_id)
        if event is None:
            raise NotFound(f"event {event_id!r} not found", field="id")
        deliveries = events_repo.list_deliveries(session, event.id)
        attempts = events_repo.list_delivery_attempts(session, [d.id for d in deliveries])
    return EventDetailOut(
        **EventOut.of(event).model_dump(),
        deliveries=[DeliveryOut.of(d, attempts) for d in deliveries],
    )


@router.get(
    "/events/{id}",
    tags=["events"],
    summary="One event with its deliveries and their attempts",
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(404),
)
async def get_event(
    id: Annotated[str, _ID], deps: Annotated[Dependencies, Depends(get_deps)]
) -> EventDetailOut:
    return await asyncio.to_thread(_event_detail, deps, id)


@router.post(
    "/events/{id}/redeliver",
    tags=["events"],
    summary="Send an event again",
    dependencies=[require_scope("admin"), Depends(require_json_body)],
    responses=error_responses(*_BODY_ERRORS, 404, 409),
)
async def redeliver_event(
    id: Annotated[str, _ID],
    deps: Annotated[Dependencies, Depends(get_deps)],
    clock: Annotated[Clock, Depends(get_clock)],
    body: RedeliverIn | None = None,
) -> EventDetailOut:
    """Queue the event again for its endpoints (or one endpoint, which may be one registered
    after the event). Idempotent: a delivery already queued stays queued once."""
    endpoint_id = body.endpoint_id if body is not None else None

    def write() -> None:
        with unit_of_work(deps.session_factory) as session:
            event = events_repo.get_event(session, id)
            if event is None:
                raise NotFound(f"event {id!r} not found", field="id")
            if endpoint_id is not None:
                endpoint = events_repo.get_endpoint(session, endpoint_id)
                if endpoint is None:
                    raise NotFound(f"event endpoint {endpoint_id!r} not found", field="endpoint_id")
                targets = [endpoint]
            else:
                owed = {d.endpoint_id for d in events_repo.list_deliveries(session, event.id)}
                targets = [e for e in events_repo.list_endpoints(session) if e.id in owed]
            if not targets:
                raise ChangeRefused(
                    f"event {id} was owed to no endpoint; name one with endpoint_id",
                    field="endpoint_id",
                )
            for endpoint in targets:
                if not endpoint.enabled:
                    raise ChangeRefused(
                        f"endpoint {endpoint.id} is disabled; enable it first",
                        field="endpoint_id",
                    )
                events_repo.redeliver(session, event, endpoint, clock.now())

    await asyncio.to_thread(write)
    return await asyncio.to_thread(_event_detail, deps, id)


# ---- mails ---------------------------------------------------------------------------------


@router.get(
    "/notifications",
    tags=["mails"],
    summary="Customer mails and their delivery status",
    dependencies=[require_scope("finance", "admin")],
)
async def list_notifications(
    deps: Annotated[Dependencies, Depends(get_deps)],
    customer_id: Annotated[
        str | None, Query(min_length=1, max_length=40, pattern=ID_PATTERN)
    ] = None,
    subscription_id: Annotated[
        str | None, Query(min_length=1, max_length=40, pattern=ID_PATTERN)
    ] = None,
    invoice_id: Annotated[
        str | None, Query(min_length=1, max_length=40, pattern=ID_PATTERN)
    ] = None,
    status: Annotated[NoticeStatus | None, Query()] = None,
    kind: Annotated[NoticeKind | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> NotificationListOut:
    """Mails oldest first: ``status`` pending, sent, failed (``last_error`` says why: the mail
    server's refusal, or retries exhausted) or skipped (opted out, no address). The mails to
    the business (an endpoint disabled) are ``kind=endpoint_disabled``."""
    if customer_id is None and subscription_id is None and invoice_id is None and kind is None:
        raise InvalidInput(
            "name customer_id, subscription_id, invoice_id or kind", field="customer_id"
        )

    def read() -> NotificationListOut:
        with unit_of_work(deps.session_factory) as session:
            found = notifications_repo.list_notifications(
                session,
                customer_id=customer_id,
                subscription_id=subscription_id,
                invoice_id=invoice_id,
                kind=kind.value if kind is not None else None,
            )
        if status is not None:
            found = [n for n in found if n.status == status]
        return NotificationListOut(data=[NotificationOut.of(n) for n in found[:limit]])

    return await asyncio.to_thread(read)


@router.put(
    "/customers/{id}/mail-preferences",
    tags=["mails"],
    summary="A customer's mail locale and opt-out",
    dependencies=[require_scope("admin"), Depends(require_json_body)],
    responses=error_responses(*_BODY_ERRORS, 404),
)
async def set_mail_preferences(
    id: Annotated[str, _ID],
    body: MailPreferencesIn,
    deps: Annotated[Dependencies, Depends(get_deps)],
    clock: Annotated[Clock, Depends(get_clock)],
) -> MailPreferencesOut:
    """Fields left out are unchanged. Safe to repeat."""

    def write() -> MailPreferencesOut:
        with unit_of_work(deps.session_factory) as session:
            if customers_repo.get_customer(session, id) is None:
                raise NotFound(f"customer {id!r} not found", field="id")
            customer = customers_repo.set_mail_preferences(
                session,
                id,
                locale=body.locale,
                mail_opt_out=body.opt_out_non_essential,
                now=clock.now(),
            )
        return MailPreferencesOut(
            customer_id=customer.id,
            locale=customer.locale,
            opt_out_non_essential=customer.mail_opt_out,
        )

    return await asyncio.to_thread(write)


__all__ = ["router"]
