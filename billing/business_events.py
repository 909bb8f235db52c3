"""Events for the business (webhooks we send): their types, the endpoint URL rules, the
signature (``Billing-Signature: t=…,v1=…``, as Stripe signs) and the delivery schedule.
Pure rules: no database, no HTTP, no Temporal.

Verifying a delivery, in the receiver (Python)::

    from billing.business_events import verify_signature, SignatureError
    try:
        verify_signature(request_body_bytes, request.headers["Billing-Signature"], secret)
    except SignatureError:
        return 400

Elsewhere: take ``t`` and every ``v1`` from the header, compute
``HMAC-SHA256(secret, f"{t}." + raw body)`` in hex, compare it in constant time with each
``v1``, and refuse a ``t`` more than 5 minutes from your clock (a replayed delivery).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from datetime import timedelta
from enum import StrEnum
from urllib.parse import urlsplit

from billing.credit_notes import RefundStatus
from billing.disputes import DisputeStatus
from billing.errors import InvalidInput
from billing.invoices import InvoiceStatus
from billing.ledger import PayoutStatus
from billing.subscription import SubscriptionStatus
from billing.text import EMAIL


class EventType(StrEnum):
    SUBSCRIPTION_CREATED = "subscription.created"
    SUBSCRIPTION_UPDATED = "subscription.updated"
    SUBSCRIPTION_PAUSED = "subscription.paused"
    SUBSCRIPTION_RESUMED = "subscription.resumed"
    SUBSCRIPTION_CANCELED = "subscription.canceled"
    SUBSCRIPTION_TRIAL_WILL_END = "subscription.trial_will_end"
    INVOICE_CREATED = "invoice.created"
    INVOICE_FINALIZED = "invoice.finalized"
    INVOICE_PAID = "invoice.paid"
    INVOICE_PAYMENT_FAILED = "invoice.payment_failed"
    INVOICE_PAYMENT_ACTION_REQUIRED = "invoice.payment_action_required"
    INVOICE_VOIDED = "invoice.voided"
    INVOICE_MARKED_UNCOLLECTIBLE = "invoice.marked_uncollectible"
    #: A credit note issued (API or CLI). Ours cannot be voided, so there is no
    #: ``credit_note.voided``.
    CREDIT_NOTE_CREATED = "credit_note.created"
    #: Refunds (a credit note's, or one made elsewhere, e.g. Stripe's dashboard): created, then
    #: one event per status reached. Stripe sends ``refund.updated`` for every move and
    #: ``refund.failed`` too; the outcome a business acts on gets its own type here
    #: (``succeeded``, ``failed``), every other move (``requires_action``, ``canceled``) is
    #: ``refund.updated``. Stripe's ``charge.refunded`` has no twin: we show no charge object.
    REFUND_CREATED = "refund.created"
    REFUND_UPDATED = "refund.updated"
    REFUND_SUCCEEDED = "refund.succeeded"
    REFUND_FAILED = "refund.failed"
    #: Disputes (chargebacks). Stripe names them ``charge.dispute.*``; ours are named after our
    #: object (``dp_…``), like every other type here.
    DISPUTE_CREATED = "dispute.created"
    DISPUTE_UPDATED = "dispute.updated"
    DISPUTE_CLOSED = "dispute.closed"
    #: Payouts: account-level, on the ``account`` stream (``ACCOUNT_STREAM``).
    PAYOUT_PAID = "payout.paid"
    PAYOUT_FAILED = "payout.failed"
    PAYOUT_CANCELED = "payout.canceled"
    #: Our reconciliation of a paid payout's transactions finished (its findings counted).
    PAYOUT_RECONCILIATION_COMPLETED = "payout.reconciliation_completed"


EVENT_TYPES: tuple[str, ...] = tuple(t.value for t in EventType)

#: The stream (``events.subscription_id``) of account-level events (payouts, and disputes of
#: charges that are none of our payments): its own sequence from 1, delivered in order like a
#: subscription's. Subscription ids are ``sub_…``, so it can never be one. The API and the
#: delivered JSON show ``subscription_id: null`` and ``stream: "account"`` for it.
ACCOUNT_STREAM = "account"


def stream_subscription_id(stream: str) -> str | None:
    """The subscription an event stream belongs to (None: the account's stream)."""
    return None if stream == ACCOUNT_STREAM else stream


#: Signature header and scheme, as Stripe's ``Stripe-Signature: t=…,v1=…``.
SIGNATURE_HEADER = "Billing-Signature"
#: How far a signature's timestamp may be from the receiver's clock (Stripe's default).
DEFAULT_TOLERANCE_S = 300
#: Deliveries of one event are retried for this long; an endpoint whose oldest undelivered
#: event has failed this long is disabled (Stripe's 3 days).
DELIVERY_GIVE_UP = timedelta(days=3)
#: Exponential backoff between delivery attempts: 30 s, 1 min, 2 min, ... capped at 2 hours
#: (about 40 attempts in 3 days).
DELIVERY_FIRST_RETRY = timedelta(seconds=30)
DELIVERY_MAX_RETRY_INTERVAL = timedelta(hours=2)
MAX_URL_LENGTH = 2000
MAX_ENDPOINTS = 100


def subscription_event_for(
    previous: SubscriptionStatus | None, current: SubscriptionStatus
) -> EventType | None:
    """The event a subscription's status move reports (None: no status change to report;
    field changes without a status change are ``subscription.updated``, decided by the
    caller)."""
    if previous == current:
        return None
    if current == SubscriptionStatus.CANCELED:
        return EventType.SUBSCRIPTION_CANCELED
    if current == SubscriptionStatus.PAUSED:
        return EventType.SUBSCRIPTION_PAUSED
    if previous == SubscriptionStatus.PAUSED:
        return EventType.SUBSCRIPTION_RESUMED
    if previous in (None, SubscriptionStatus.PENDING):
        return EventType.SUBSCRIPTION_CREATED
    return EventType.SUBSCRIPTION_UPDATED


def invoice_event_for(status: InvoiceStatus) -> EventType | None:
    """The event an invoice's move to ``status`` reports."""
    return {
        InvoiceStatus.PAID: EventType.INVOICE_PAID,
        InvoiceStatus.VOID: EventType.INVOICE_VOIDED,
        InvoiceStatus.UNCOLLECTIBLE: EventType.INVOICE_MARKED_UNCOLLECTIBLE,
    }.get(status)


def refund_event_for(status: RefundStatus) -> EventType | None:
    """The event a refund reaching ``status`` reports (None: ``pending``, which its
    ``refund.created`` shows)."""
    if status == RefundStatus.PENDING:
        return None
    return {
        RefundStatus.SUCCEEDED: EventType.REFUND_SUCCEEDED,
        RefundStatus.FAILED: EventType.REFUND_FAILED,
    }.get(status, EventType.REFUND_UPDATED)


def dispute_event_for(
    previous: tuple[DisputeStatus, int] | None, current: tuple[DisputeStatus, int]
) -> EventType | None:
    """The event a dispute's record moving from ``previous`` to ``current`` (status, amount in
    minor units) reports, besides ``dispute.created`` for a new one: ``closed`` once it is
    closed (won, lost, inquiry closed), ``updated`` for any other change, None for none (a
    repeated or stale report)."""
    if current[0].closed and (previous is None or not previous[0].closed):
        return EventType.DISPUTE_CLOSED
    if previous is None or previous == current or current[0].closed:
        return None
    return EventType.DISPUTE_UPDATED


def payout_event_for(status: PayoutStatus) -> EventType | None:
    """The event a payout reaching ``status`` reports (None: still on its way)."""
    return {
        PayoutStatus.PAID: EventType.PAYOUT_PAID,
        PayoutStatus.FAILED: EventType.PAYOUT_FAILED,
        PayoutStatus.CANCELED: EventType.PAYOUT_CANCELED,
    }.get(status)


def check_event_types(values: list[str]) -> list[str]:
    """The endpoint's event types, deduplicated in the given order; ``*`` means all."""
    if not values:
        raise InvalidInput(
            "enabled_events must name at least one event type (or '*' for all)",
            field="enabled_events",
        )
    unknown = [v for v in values if v != "*" and v not in EVENT_TYPES]
    if unknown:
        raise InvalidInput(
            f"unknown event type {unknown[0]!r}; known types: {', '.join(EVENT_TYPES)} "
            "(or '*' for all)",
            field="enabled_events",
        )
    return list(dict.fromkeys(values))


def endpoint_wants(event_types: list[str], event_type: str) -> bool:
    return "*" in event_types or event_type in event_types


def address_is_public(address: str) -> bool:
    """Whether an IP address is on the public internet (not loopback, private, link-local —
    which includes cloud metadata services at 169.254.169.254 — multicast or reserved)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_endpoint_url(url: str, *, allow_insecure: bool) -> str:
    """The endpoint URL as given, if acceptable: https (http only when ``allow_insecure``,
    i.e. in dev), a host, no credentials, and — unless ``allow_insecure`` — not an IP literal
    outside the public internet. Host names are checked against their addresses by the
    caller (``address_is_public``), at registration and again before each delivery."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("url is required", field="url")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"url is longer than {MAX_URL_LENGTH} characters", field="url")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InvalidInput(
            "url must not contain spaces or control characters (NUL, newlines)", field="url"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise InvalidInput(f"url must start with https:// (got {url[:40]!r})", field="url")
    if parts.scheme == "http" and not allow_insecure:
        raise InvalidInput(
            "url must use https:// outside dev: events carry customer data; plain http is "
            "accepted only with BILLING_ENVIRONMENT=dev",
            field="url",
        )
    if parts.username or parts.password:
        raise InvalidInput(
            "url must not contain credentials (user:password@); the signature authenticates "
            "us to you",
            field="url",
        )
    try:
        host = parts.hostname
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as error:
        raise InvalidInput(f"url is not a valid URL: {error}", field="url") from error
    if not host:
        raise InvalidInput("url has no host", field="url")
    if not allow_insecure:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and not address_is_public(host):
            raise InvalidInput(
                f"url points at {host}, a private, loopback or link-local address; endpoints "
                "must be reachable on the public internet",
                field="url",
            )
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            raise InvalidInput("url points at localhost; use a public host", field="url")
    return url


def new_signing_secret() -> str:
    """A fresh endpoint signing secret (shown once, at creation)."""
    return "bwhsec_" + secrets.token_urlsafe(32)


class SignatureError(Exception):
    """A delivery's signature is missing, malformed, wrong or too old."""


def sign_payload(payload: bytes, secret: str, *, timestamp: int) -> str:
    """The ``Billing-Signature`` header value for ``payload`` (the exact request body) at
    ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    payload: bytes,
    header: str | None,
    secret: str,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Check a delivery (the raw body as received and its ``Billing-Signature`` header) and
    return its timestamp; raise ``SignatureError`` saying what is wrong. A header may carry
    several ``v1`` (during a secret roll); one match is enough."""
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("the signature's timestamp is not a number") from None
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError("the signature header needs t=… and v1=…")
    expected = sign_payload(payload, secret, timestamp=timestamp).rpartition("v1=")[2]
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise SignatureError("no signature matches the payload (wrong secret, or altered body)")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise SignatureError(
            f"the signature's timestamp is {abs(current - timestamp):.0f} s from now, beyond "
            f"the tolerance of {tolerance_s} s (a replayed delivery?)"
        )
    return timestamp


_EMAIL_SHAPE = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\".]+")


def check_contact_email(value: str, *, field: str) -> str:
    """The business's contact address for endpoint mails, if it is one bare address (no
    display name, no list, no control characters, at most 320 characters)."""
    EMAIL.check(value, field=field)
    if not _EMAIL_SHAPE.fullmatch(value):
        raise InvalidInput(
            f"{field} must be one e-mail address such as 'ops@example.com' (got {value[:40]!r})",
            field=field,
        )
    return value
