"""``POST /v1/webhooks/stripe``: Stripe's news, turned into signals to subscription workflows.

Order of work, each step before the next can change anything:

1. verify ``Stripe-Signature`` over the raw body with the endpoint's signing secret (the
   Stripe SDK's own check; no hand-written HMAC), and refuse with 400 otherwise;
2. parse the JSON;
3. claim the event id in ``webhook_events`` (insert first): a redelivery finds the row and is
   answered ``{"received": true, "duplicate": true}`` with nothing else done;
4. route it: look up which subscriptions it concerns in our database and signal their
   workflows (fire-and-forget; the workflow applies the news at a safe point);
5. record the outcome on the row.

Routing (``route_event``; the workflow id is ``workflow_id_for(subscription_id)``):

* ``customer.updated`` whose ``invoice_settings.default_payment_method`` changed (by
  ``data.previous_attributes`` when Stripe sends it) to a card other than the one on record
  for our customer: signal ``payment_method_changed`` to each of the customer's subscriptions
  that is not canceled ("retry the open invoice now"). Stripe does not deliver events in
  order: an event ``created`` before the newest one already acted on for that customer is
  stale news and is recorded as ignored, so an older card never overwrites a newer one.
  Within one second (``created`` counts seconds), and for news older than our own writes
  (a signup's or a card update's attach, which carry no event time), the order is unknown:
  so news naming a card other than the one on record is checked against the customer's
  default at Stripe now (a read), and only that card is acted on; if it is the one on
  record, the news was stale.
  Once the signals are sent, the new card is recorded as the customer's default in our
  database (with the outcome), so the same news delivered again, under another event id or
  as the echo of our own write, is recognised and signals nothing. Nothing here, and nothing
  the workflow does with this news, writes to Stripe: the default already changed there, and
  a write would make Stripe send the news again (the webhook storm of issue 11).
* ``payment_intent.succeeded`` for one of our invoices (found by the invoice's one
  PaymentIntent, ``invoices.stripe_payment_intent_id``, else by an attempt that used it, else
  by ``metadata.invoice_id``) with no payment recorded: for an open invoice, signal
  ``payment_authenticated`` to the invoice's subscription (the workflow verifies the intent
  with Stripe and settles). Money taken is never ignored: for an invoice closed unpaid (void,
  uncollectible), or an open one whose subscription workflow has ended, start
  ``InvoicePaymentWorkflow`` (id ``invoice-payment-{invoice_id}``; a second start joins the
  first), which checks the intent with Stripe and records the payment; the invoice becomes
  paid and says why.
* Anything else, ``payment_method.attached`` included (see ``_ROUTES``): recorded as ignored.

Failure answers: Temporal unreachable gives 503 *and the claim is deleted*, so Stripe's retry
of the same event is processed rather than taken for a duplicate. A workflow that has already
finished is not an error: the event is recorded (``workflow_closed``) and answered 200, or
Stripe would retry it for three days. An event another delivery is still processing gets 409,
so Stripe retries it later instead of being told it is done.

The dependencies come from ``request.app.state``: ``settings`` (billing.settings.Settings),
``deps`` (billing.worker.Dependencies: ``session_factory`` and ``clock``) and ``temporal``
(a connected ``temporalio.client.Client``). This module itself does not import
``billing.worker``, which imports the workflow code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client, WorkflowUpdateFailedError, WorkflowUpdateStage
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from activities.ledger import start_payout_import
from activities.stripe_gateway import webhook_signature_valid
from billing.api.errors import error_body
from billing.api.schemas import ErrorOut
from billing.api.settlement_webhooks import (
    PAYOUT_EVENT_TYPES,
    SETTLEMENT_EVENT_TYPES,
    SettlementProviderUnavailable,
    record_settlement_event,
)
from billing.clock import Clock
from billing.contracts import (
    CancelInput,
    CancelResult,
    InvoicePaymentWorkflowInput,
    PaymentAuthenticatedInput,
    PaymentMethodChangedInput,
    SubscriptionMessage,
    WorkflowName,
    invoice_payment_workflow_id_for,
    workflow_id_for,
)
from billing.invoices import InvoiceStatus
from billing.records import AttemptStatus, WebhookOutcome
from billing.settings import Settings
from billing.text import text_problem
from db.engine import unit_of_work
from db.repositories import attempts as attempts_repo
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo
from db.repositories import payments as payments_repo
from db.repositories import subscriptions as subscriptions_repo
from db.repositories import webhook_events as webhook_events_repo

__all__ = [
    "WEBHOOK_PATH",
    "CardNews",
    "InvalidSignature",
    "RoutedSignal",
    "Routing",
    "receive_stripe_webhook",
    "route_event",
    "router",
    "verify_signature",
    "webhook_router",
]

logger = logging.getLogger(__name__)

WEBHOOK_PATH = "/v1/webhooks/stripe"
#: Stripe's events (e.g. an invoice with many lines) can outgrow the API's body limit.
WEBHOOK_MAX_BODY_BYTES = 1024 * 1024

NOT_CONFIGURED_MESSAGE = (
    "webhooks are not configured (BILLING_STRIPE_WEBHOOK_SECRET); set it to this endpoint's "
    "signing secret (whsec_...) from the Stripe dashboard"
)

#: Longest wait for one signal RPC. Stripe gives up on a delivery after about 10 s; a slower
#: Temporal is treated as unavailable (503), and Stripe retries the event later.
SIGNAL_RPC_TIMEOUT = timedelta(seconds=5)

#: A claim older than this without an outcome belongs to a request that died (its process was
#: killed mid-request); a redelivery of the event may then take it over. Far above the
#: slowest honest request (a few signals at SIGNAL_RPC_TIMEOUT each).
CLAIM_STALE_AFTER = timedelta(minutes=2)

#: Longest event id we store (the column's length); Stripe's are about 30 characters.
_MAX_EVENT_ID_LENGTH = 255
#: Longest event type we store (the column's length); Stripe's are under 50 characters.
_MAX_EVENT_TYPE_LENGTH = 100
#: Longest provider object id we look up; Stripe's are well under this.
_MAX_OBJECT_ID_LENGTH = 255
#: What Stripe's event ids (``evt_1Nx...``) and types (``customer.updated``) are made of.
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
#: The latest ``created`` a datetime can hold (9999-12-31T23:59:59Z), in Unix seconds.
_MAX_CREATED = 253_402_300_799


class ProviderCustomers(Protocol):
    """The one provider call routing makes: a read (billing.payments.PaymentGateway has it)."""

    def default_payment_method(self, *, provider_customer_id: str) -> str | None: ...


#: The customer's default card at the provider now, by provider customer id (a read).
CurrentDefault = Callable[[str], str | None]


class WebhookDependencies(Protocol):
    """What the endpoint needs from ``request.app.state.deps`` (a billing.worker.Dependencies)."""

    @property
    def session_factory(self) -> sessionmaker[Session]: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def gateway(self) -> ProviderCustomers: ...


# ---- answers ------------------------------------------------------------------------------


def _error(status_code: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status_code, content=error_body(error_type, message))


# ---- 1. signature ---------------------------------------------------------------------------


class InvalidSignature(Exception):
    """A delivery whose Stripe-Signature does not prove it is Stripe's; the message says why."""


def _header_timestamp(header: str) -> int | None:
    """The ``t=`` value of a Stripe-Signature header, for messages only (the SDK verifies)."""
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            return int(value)
    return None


def verify_signature(payload: bytes, header: str | None, secret: str, tolerance_s: int) -> None:
    """Raise ``InvalidSignature`` saying what is wrong unless ``header`` is Stripe's valid,
    recent signature of exactly ``payload`` under ``secret``.

    The check itself is the Stripe SDK's ``WebhookSignature.verify_header`` (HMAC-SHA256 of
    ``"{t}.{body}"``, constant-time comparison, any of several ``v1`` signatures, timestamp
    not older than the tolerance). The code here only chooses the message.
    """
    if not header:
        raise InvalidSignature(
            "the Stripe-Signature header is missing; Stripe signs every webhook delivery, so "
            "this request was not sent by Stripe (or a proxy removed the header)"
        )
    try:
        body = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidSignature(
            "the body is not UTF-8 text, so it is not an event Stripe signed"
        ) from None
    timestamp = _header_timestamp(header)
    if timestamp is None or "v1=" not in header:
        raise InvalidSignature(
            "the Stripe-Signature header is malformed; expected 't=<unix time>,v1=<signature>'"
        )
    # Stripe's check only bounds the age; a timestamp far ahead of our clock is refused too
    # (nobody but the secret's holder can make one, and it would outlive every tolerance).
    ahead_s = timestamp - int(time.time())
    if webhook_signature_valid(body, header, secret, tolerance_s) and ahead_s <= tolerance_s:
        return
    # If the signature holds without the time limit, the timestamp was what failed.
    if not webhook_signature_valid(body, header, secret, None):
        raise InvalidSignature(
            "the Stripe-Signature does not match the body: the body was altered after signing, "
            "or it was signed with another secret (check that BILLING_STRIPE_WEBHOOK_SECRET is "
            "this endpoint's signing secret)"
        ) from None
    if ahead_s > tolerance_s:
        raise InvalidSignature(
            f"the Stripe-Signature timestamp is {ahead_s} s in the future, beyond the "
            f"{tolerance_s} s tolerance; check this server's clock"
        )
    age_s = int(time.time()) - timestamp
    raise InvalidSignature(
        f"the Stripe-Signature timestamp is {age_s} s old, beyond the {tolerance_s} s tolerance "
        "(a delayed or replayed delivery); if every webhook is refused this way, check this "
        "server's clock"
    )


# ---- 2. payload -------------------------------------------------------------------------------


class _InvalidPayload(Exception):
    pass


@dataclass(frozen=True)
class _Event:
    id: str
    type: str
    data: dict[str, Any]
    #: When Stripe created the event (UTC): the order of the news, whatever the delivery order.
    created: datetime | None = None

    @property
    def object(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.data["object"]
        return obj


def _parse_event(payload: bytes) -> _Event:
    try:
        parsed = json.loads(payload)
    except ValueError as error:
        raise _InvalidPayload(f"the body is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise _InvalidPayload("the body is not a JSON object; expected a Stripe event")
    event_id, event_type, data = parsed.get("id"), parsed.get("type"), parsed.get("data")
    if not _event_name(event_id, _MAX_EVENT_ID_LENGTH):
        raise _InvalidPayload(
            f"the event has no usable 'id' (1 to {_MAX_EVENT_ID_LENGTH} letters, digits and "
            "_.:- such as 'evt_1NxYz')"
        )
    assert isinstance(event_id, str)
    if not _event_name(event_type, _MAX_EVENT_TYPE_LENGTH):
        raise _InvalidPayload(
            f"event {event_id} has no usable 'type' (1 to {_MAX_EVENT_TYPE_LENGTH} letters, "
            "digits and _.:- such as 'customer.updated')"
        )
    assert isinstance(event_type, str)
    created = parsed.get("created")
    # JSON has one number type: 1735689600.0 is the same integer. bool is an int in Python,
    # but JSON true is no time.
    if isinstance(created, float) and created.is_integer():
        created = int(created)
    if (
        not isinstance(created, int)
        or isinstance(created, bool)
        or not 0 <= created <= _MAX_CREATED
    ):
        raise _InvalidPayload(
            f"event {event_id} has no usable 'created' (Unix seconds, e.g. 1735689600)"
        )
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise _InvalidPayload(
            f"event {event_id} has no 'data.object'; only snapshot events are accepted"
        )
    if not isinstance(data.get("previous_attributes", {}), dict):
        raise _InvalidPayload(
            f"event {event_id} has a 'data.previous_attributes' that is not an object"
        )
    return _Event(event_id, event_type, data, datetime.fromtimestamp(created, UTC))


def _event_name(value: object, max_length: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= max_length
        and _EVENT_NAME.fullmatch(value) is not None
    )


def _usable_text(value: object, max_length: int) -> bool:
    """A non-empty string of at most ``max_length`` printable characters: what Stripe's ids and
    type names are, and what the database can store (PostgreSQL text cannot hold NUL)."""
    # billing.text's rule (which also keeps lone surrogates out: no UTF-8 for them), plus
    # printable: Stripe's ids and type names hold no spaces or formatting characters.
    return (
        isinstance(value, str)
        and len(value) > 0
        and text_problem(value, max_length=max_length) is None
        and value.isprintable()
    )


# ---- 4. routing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutedSignal:
    subscription_id: str
    name: str
    arg: PaymentMethodChangedInput | PaymentAuthenticatedInput


@dataclass(frozen=True)
class Routing:
    """The signals an event calls for. With none, ``outcome`` and ``detail`` say why."""

    signals: list[RoutedSignal] = field(default_factory=list)
    outcome: WebhookOutcome = WebhookOutcome.IGNORED
    detail: str = ""
    #: A provider payment to record through ``InvoicePaymentWorkflow``: at once when there
    #: are no signals, else if every workflow signalled has already ended.
    late_payment: LatePayment | None = None
    #: The customer's new default card, recorded with the outcome once the signals are sent.
    card_news: CardNews | None = None


@dataclass(frozen=True)
class CardNews:
    """The provider made ``payment_method_id`` the default card of our customer
    ``customer_id``, by an event created at ``created`` (UTC; None if it did not say)."""

    customer_id: str
    payment_method_id: str
    created: datetime | None


@dataclass(frozen=True)
class LatePayment:
    """A payment the provider took for an invoice that no live workflow will settle."""

    invoice_id: str
    payment_intent_id: str
    subscription_id: str
    why: str


def _object_id(value: object) -> str | None:
    """The id of an expandable field: an id string, or the expanded object's ``id``."""
    if isinstance(value, dict):
        value = value.get("id")
    # Anything else is no id Stripe issued, and must not reach a query (NUL, megabytes).
    return value if isinstance(value, str) and _usable_text(value, _MAX_OBJECT_ID_LENGTH) else None


def _default_payment_method(customer: dict[str, Any]) -> str | None:
    settings = customer.get("invoice_settings")
    return (
        _object_id(settings.get("default_payment_method")) if isinstance(settings, dict) else None
    )


def _route_customer_updated(
    session: Session, event: _Event, current_default: CurrentDefault | None
) -> Routing:
    """A new default card for invoices means "retry the open invoice now" (README: card
    updated), for every live subscription of the customer."""
    previous = event.data.get("previous_attributes")
    if isinstance(previous, dict):
        # Real Stripe lists exactly the fields this update changed. localstripe sends no
        # previous_attributes; then the comparison with our records below decides alone.
        previous_settings = previous.get("invoice_settings")
        if not (
            isinstance(previous_settings, dict) and "default_payment_method" in previous_settings
        ):
            return Routing(detail="the update did not change the default payment method")
    stripe_customer_id = _object_id(event.object.get("id"))
    new_default = _default_payment_method(event.object)
    if stripe_customer_id is None:
        return Routing(detail="the customer object has no id")
    if new_default is None:
        return Routing(detail="the customer has no default payment method to retry with")
    customer = customers_repo.get_customer_by_stripe_id(session, stripe_customer_id)
    if customer is None:
        return Routing(
            outcome=WebhookOutcome.NO_SUBSCRIPTION,
            detail=f"no customer of ours is provider customer {stripe_customer_id}",
        )
    said = new_default
    if customer.default_payment_method_id != new_default and current_default is not None:
        # News of a card other than ours may be older than what we know (see the module
        # docstring): act on what the provider holds now. Read before the watermark's update
        # below, so no row lock is held across the call.
        new_default = current_default(stripe_customer_id)
        if new_default is None:
            return Routing(
                detail=f"provider customer {stripe_customer_id} has no default payment "
                "method now; nothing to retry with"
            )
    if event.created is not None:
        newer = customers_repo.advance_payment_method_event(session, customer.id, event.created)
        if newer is not None:
            # Delivered late: a newer change of default (or our own write's echo) has been
            # acted on already; acting on this one would bring back the older card.
            return Routing(
                detail=f"stale: event created {event.created.isoformat()} is older than the "
                f"payment method news of {newer.isoformat()} already acted on for "
                f"{customer.id}; the newer state is kept"
            )
    if customer.default_payment_method_id == new_default != said:
        return Routing(
            detail=f"stale: the event names {said}, but the provider's default is now "
            f"{new_default}, already the payment method on record for {customer.id}"
        )
    if customer.default_payment_method_id == new_default:
        # News we have: the echo of our own write (a signup's or a card update's attach makes
        # the card the default at Stripe and records it here), or this change delivered again
        # under another event id (recorded when it was first acted on). Acting again would
        # only repeat signals; it would never write to Stripe.
        return Routing(
            detail=f"{new_default} is already the payment method on record for {customer.id}"
        )
    subscriptions = subscriptions_repo.list_subscriptions_for_customer(
        session, customer.id, live_only=True
    )
    if not subscriptions:
        return Routing(
            outcome=WebhookOutcome.NO_SUBSCRIPTION,
            detail=f"customer {customer.id} has no subscription that is not canceled",
        )
    return Routing(
        signals=[
            RoutedSignal(
                s.id,
                SubscriptionMessage.PAYMENT_METHOD_CHANGED,
                PaymentMethodChangedInput(payment_method_id=new_default),
            )
            for s in subscriptions
        ],
        card_news=CardNews(customer.id, new_default, event.created),
    )


def _route_payment_intent_succeeded(
    session: Session, event: _Event, current_default: CurrentDefault | None
) -> Routing:
    """A PaymentIntent of ours has succeeded. Usually the charge's own answer settles it, or
    the subscription workflow does after authentication (``payment_authenticated``); a
    payment nobody live will settle goes to ``InvoicePaymentWorkflow``. Never ignored while
    the invoice has no payment."""
    payment_intent_id = _object_id(event.object.get("id"))
    if payment_intent_id is None:
        return Routing(detail="the payment intent has no id")
    invoice = invoices_repo.get_invoice_by_payment_intent(session, payment_intent_id)
    if invoice is None:
        attempt = attempts_repo.get_attempt_by_payment_intent(session, payment_intent_id)
        if attempt is not None:
            invoice_id = attempt.invoice_id
        else:
            # The invoice and attempt get the PaymentIntent id only once the charge call
            # returns; our charges carry the invoice id in their metadata, so an event that
            # overtakes that write still finds its invoice. The activity that acts on it
            # verifies the claim with the provider either way.
            metadata = event.object.get("metadata")
            named = metadata.get("invoice_id") if isinstance(metadata, dict) else None
            if not isinstance(named, str) or not _usable_text(named, _MAX_OBJECT_ID_LENGTH):
                return Routing(
                    outcome=WebhookOutcome.NO_SUBSCRIPTION,
                    detail=f"{payment_intent_id} is not a charge attempt of ours",
                )
            invoice_id = named
        invoice = invoices_repo.get_invoice(session, invoice_id)
        if invoice is None:
            return Routing(
                outcome=WebhookOutcome.NO_SUBSCRIPTION,
                detail=f"{payment_intent_id} names invoice {invoice_id}, which we do not have",
            )
    payment = payments_repo.get_payment_for_invoice(session, invoice.id)
    if payment is not None and payment.stripe_payment_intent_id == payment_intent_id:
        return Routing(detail=f"invoice {invoice.number} is already paid by {payment_intent_id}")
    attempts = attempts_repo.list_attempts_for_invoice(session, invoice.id)
    succeeded = [a for a in attempts if a.status == AttemptStatus.SUCCEEDED]
    if payment is None and any(a.stripe_payment_intent_id == payment_intent_id for a in succeeded):
        # The ordinary off-session success: the workflow got it from the charge call and
        # settles it itself. A signal would be harmless (the workflow ignores news about an
        # invoice it no longer holds open) but is noise in its history.
        return Routing(
            detail=f"attempt {succeeded[0].attempt_number} of invoice {invoice.number} already "
            "succeeded"
        )
    late = LatePayment(
        invoice_id=invoice.id,
        payment_intent_id=payment_intent_id,
        subscription_id=invoice.subscription_id,
        why=f"invoice {invoice.number} is {invoice.status.value}",
    )
    if invoice.status != InvoiceStatus.OPEN or payment is not None or succeeded:
        # Closed unpaid (or paid by another payment: the workflow's activity flags the
        # second one for a refund): no subscription workflow will book this money.
        return Routing(late_payment=late)
    return Routing(
        signals=[
            RoutedSignal(
                invoice.subscription_id,
                SubscriptionMessage.PAYMENT_AUTHENTICATED,
                PaymentAuthenticatedInput(
                    payment_intent_id=payment_intent_id, invoice_id=invoice.id
                ),
            )
        ],
        late_payment=dataclasses.replace(
            late, why=f"the workflow of subscription {invoice.subscription_id} has ended"
        ),
    )


_ROUTES: dict[str, Callable[[Session, _Event, CurrentDefault | None], Routing]] = {
    "customer.updated": _route_customer_updated,
    "payment_intent.succeeded": _route_payment_intent_succeeded,
    # Not "payment_method.attached": attaching a card does not make it the one invoices are
    # charged to (our charges use the customer's invoice_settings.default_payment_method),
    # and signalling it would make the workflow switch the customer's default to a card they
    # may have added for something else. Our own attach activity also attaches before it sets
    # the default. The customer.updated that follows a real change of default is the news.
}


def route_event(
    session: Session,
    event_type: str,
    data: dict[str, Any],
    event_id: str = "",
    created: datetime | None = None,
    current_default: CurrentDefault | None = None,
) -> Routing:
    """Which workflow signals the event calls for, from our database. The only write is the
    customer's payment-method event watermark (``created``, UTC), which keeps late events from
    overwriting newer news. ``current_default``: reads a customer's default card at the
    provider, to check card news against (None: the event is taken at its word)."""
    route = _ROUTES.get(event_type)
    if route is None:
        return Routing(detail=f"event type {event_type} is not one this endpoint acts on")
    return route(session, _Event(event_id, event_type, data, created), current_default)


# ---- the endpoint -----------------------------------------------------------------------------


class _TemporalUnavailable(Exception):
    pass


class _ProviderUnavailable(Exception):
    pass


@dataclass(frozen=True)
class _Delivered:
    outcome: WebhookOutcome
    subscription_id: str | None
    detail: str


async def _start_late_payment(
    temporal: Client | None, late: LatePayment, settings: Settings
) -> _Delivered:
    """Start the invoice's ``InvoicePaymentWorkflow``. A run already going is joined
    (USE_EXISTING) and a finished one may run again (its activity records nothing twice), so a
    repeated or redelivered event is harmless."""
    if temporal is None:
        raise _TemporalUnavailable("no Temporal client is configured on the application")
    workflow_id = invoice_payment_workflow_id_for(late.invoice_id)
    try:
        await temporal.start_workflow(
            WorkflowName.INVOICE_PAYMENT,
            InvoicePaymentWorkflowInput(
                invoice_id=late.invoice_id,
                payment_intent_id=late.payment_intent_id,
                payments_task_queue=settings.payments_queue(),
            ),
            id=workflow_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            rpc_timeout=SIGNAL_RPC_TIMEOUT,
        )
    except RPCError as error:
        raise _TemporalUnavailable(f"{error.status.name}: {error.message}") from error
    except RuntimeError as error:
        raise _TemporalUnavailable(str(error)) from error
    return _Delivered(
        WebhookOutcome.ROUTED,
        late.subscription_id,
        f"{late.why}: {late.payment_intent_id} is recorded by workflow {workflow_id}",
    )


async def _cancel_for_chargeback(temporal: Client | None, subscription_id: str, why: str) -> str:
    """The dispute policy ``cancel``: the subscription is canceled now, the dispute as the
    reason (the workflow's own Update: a repeat is refused as already canceled, which is
    done). Temporal unreachable: 503, and Stripe's retry of the event cancels again."""
    if temporal is None:
        raise _TemporalUnavailable("no Temporal client is configured on the application")
    handle = temporal.get_workflow_handle(workflow_id_for(subscription_id))
    try:
        # Accepted is enough: the workflow applies an accepted cancel at its next safe point.
        await handle.start_update(
            SubscriptionMessage.CANCEL,
            CancelInput(at_period_end=False, reason=why[:500]),
            wait_for_stage=WorkflowUpdateStage.ACCEPTED,
            result_type=CancelResult,
            rpc_timeout=SIGNAL_RPC_TIMEOUT,
        )
    except WorkflowUpdateFailedError as refused:
        return f"subscription {subscription_id} not canceled: {refused.cause or refused}"
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return f"subscription {subscription_id}'s workflow has ended"
        raise _TemporalUnavailable(f"{error.status.name}: {error.message}") from error
    except RuntimeError as error:
        raise _TemporalUnavailable(str(error)) from error
    return f"subscription {subscription_id} is canceled now ({why})"


async def _start_payout_import(
    temporal: Client | None, event: _Event, settings: Settings
) -> _Delivered:
    """A payout's news: its import (the payout and what it paid out) runs in its workflow."""
    payout_id = _object_id(event.object.get("id"))
    if payout_id is None:
        return _Delivered(WebhookOutcome.IGNORED, None, "the payout has no id")
    if temporal is None:
        raise _TemporalUnavailable("no Temporal client is configured on the application")
    try:
        workflow_id = await start_payout_import(
            temporal,
            payout_id,
            task_queue=settings.task_queue,
            payments_task_queue=settings.payments_queue(),
        )
    except RPCError as error:
        raise _TemporalUnavailable(f"{error.status.name}: {error.message}") from error
    except RuntimeError as error:
        raise _TemporalUnavailable(str(error)) from error
    return _Delivered(WebhookOutcome.ROUTED, None, f"payout {payout_id} imported by {workflow_id}")


async def _deliver(temporal: Client | None, routing: Routing, settings: Settings) -> _Delivered:
    if not routing.signals:
        if routing.late_payment is not None:
            return await _start_late_payment(temporal, routing.late_payment, settings)
        return _Delivered(routing.outcome, None, routing.detail)
    delivered = await _signal_all(temporal, routing)
    if delivered.outcome == WebhookOutcome.WORKFLOW_CLOSED and routing.late_payment is not None:
        # Nobody is left to settle it: record the money anyway.
        return await _start_late_payment(temporal, routing.late_payment, settings)
    return delivered


async def _signal_all(temporal: Client | None, routing: Routing) -> _Delivered:
    if temporal is None:
        raise _TemporalUnavailable("no Temporal client is configured on the application")
    signalled: list[str] = []
    closed: list[str] = []
    for signal in routing.signals:
        handle = temporal.get_workflow_handle(workflow_id_for(signal.subscription_id))
        try:
            await handle.signal(signal.name, signal.arg, rpc_timeout=SIGNAL_RPC_TIMEOUT)
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                # Finished (canceled, or never started): nothing left to tell it.
                closed.append(signal.subscription_id)
                continue
            raise _TemporalUnavailable(f"{error.status.name}: {error.message}") from error
        except RuntimeError as error:
            # A lazily connecting client that cannot reach the server raises RuntimeError.
            raise _TemporalUnavailable(str(error)) from error
        signalled.append(signal.subscription_id)
    name = routing.signals[0].name
    parts = []
    if signalled:
        parts.append(f"{name} sent to {', '.join(signalled)}")
    if closed:
        parts.append(f"workflow already closed for {', '.join(closed)}")
    detail = "; ".join(parts)
    if signalled:
        return _Delivered(WebhookOutcome.ROUTED, signalled[0], detail)
    return _Delivered(WebhookOutcome.WORKFLOW_CLOSED, closed[0], detail)


def _claim(
    session_factory: sessionmaker[Session], event: _Event, now: datetime
) -> webhook_events_repo.WebhookClaim:
    with unit_of_work(session_factory) as session:
        return webhook_events_repo.claim_webhook_event(
            session,
            event_id=event.id,
            event_type=event.type,
            now=now,
            stale_after=CLAIM_STALE_AFTER,
        )


def _route(
    session_factory: sessionmaker[Session], event: _Event, provider: ProviderCustomers
) -> Routing:
    def current_default(provider_customer_id: str) -> str | None:
        try:
            return provider.default_payment_method(provider_customer_id=provider_customer_id)
        except Exception as error:  # any failure: the event is retried, never half-applied
            raise _ProviderUnavailable(f"{type(error).__name__}: {error}") from error

    with unit_of_work(session_factory) as session:
        return route_event(
            session, event.type, event.data, event.id, event.created, current_default
        )


def _release(session_factory: sessionmaker[Session], event_id: str, claimed_at: datetime) -> None:
    with unit_of_work(session_factory) as session:
        webhook_events_repo.release_webhook_event(session, event_id, claimed_at=claimed_at)


def _record(
    session_factory: sessionmaker[Session],
    event_id: str,
    delivered: _Delivered,
    now: datetime,
    card_news: CardNews | None = None,
) -> None:
    with unit_of_work(session_factory) as session:
        if card_news is not None:
            # Only now, with the signals sent: recorded before them, a failed send (503) would
            # make Stripe's retry of this event look like news we have, and it would be lost.
            # Not over newer news acted on meanwhile (an older card never comes back).
            customers_repo.record_default_payment_method_news(
                session,
                card_news.customer_id,
                card_news.payment_method_id,
                card_news.created,
                now=now,
            )
        webhook_events_repo.record_webhook_outcome(
            session,
            event_id,
            outcome=delivered.outcome,
            processed_at=now,
            subscription_id=delivered.subscription_id,
            detail=delivered.detail or None,
        )


async def receive_stripe_webhook(request: Request) -> JSONResponse:
    """Verify, dedupe, route and record one Stripe event delivery."""
    # The signature covers the exact bytes Stripe sent: read them before anything parses.
    payload = await request.body()
    settings: Settings = request.app.state.settings
    secret = settings.stripe_webhook_secret
    if secret is None or not secret.get_secret_value().strip():
        return _error(400, "invalid_signature", NOT_CONFIGURED_MESSAGE)
    try:
        verify_signature(
            payload,
            request.headers.get("stripe-signature"),
            secret.get_secret_value(),
            settings.stripe_webhook_tolerance_seconds,
        )
    except InvalidSignature as invalid:
        logger.warning("refused a webhook delivery: %s", invalid)
        return _error(400, "invalid_signature", str(invalid))
    try:
        event = _parse_event(payload)
    except _InvalidPayload as invalid:
        logger.warning("refused a signed webhook delivery: %s", invalid)
        return _error(400, "invalid_payload", str(invalid))

    deps: WebhookDependencies = request.app.state.deps
    temporal: Client | None = getattr(request.app.state, "temporal", None)
    session_factory = deps.session_factory

    claim = await asyncio.to_thread(_claim, session_factory, event, deps.clock.now())
    if not claim.claimed:
        if claim.already_processed:
            return JSONResponse({"received": True, "duplicate": True})
        return _error(
            409,
            "event_in_progress",
            f"event {event.id} is being processed by another delivery; retry later",
        )

    claimed_at = claim.event.claimed_at
    try:
        if event.type in SETTLEMENT_EVENT_TYPES:
            # Refunds and disputes: read back from Stripe and recorded (no workflow signal).
            recorded = await asyncio.to_thread(
                record_settlement_event,
                session_factory,
                getattr(deps, "refund_gateway", None) or deps.gateway,  # type: ignore[arg-type]
                event.type,
                event.object,
                deps.clock.now(),
            )
            routing = Routing(outcome=recorded.outcome, detail=recorded.detail)
            detail = recorded.detail
            if recorded.chargeback is not None and settings.dispute_subscription_action == "cancel":
                detail += "; " + await _cancel_for_chargeback(temporal, *recorded.chargeback)
            delivered = _Delivered(recorded.outcome, recorded.subscription_id, detail)
        elif event.type in PAYOUT_EVENT_TYPES:
            routing = Routing(outcome=WebhookOutcome.ROUTED)
            delivered = await _start_payout_import(temporal, event, settings)
        else:
            routing = await asyncio.to_thread(_route, session_factory, event, deps.gateway)
            delivered = await _deliver(temporal, routing, settings)
    except SettlementProviderUnavailable as unavailable:
        await asyncio.to_thread(_release, session_factory, event.id, claimed_at)
        logger.warning("Stripe unavailable for webhook %s: %s", event.id, unavailable)
        return _error(
            503,
            "provider_unavailable",
            f"could not read the event's object back from Stripe ({unavailable}); event "
            f"{event.id} was not processed, retry later",
        )
    except _TemporalUnavailable as unavailable:
        # Without this delete, Stripe's retry would find the row and be answered "duplicate":
        # the news would be lost. Signals already sent (to a customer's other subscriptions)
        # stay sent and are sent again on the retry: a repeated payment_authenticated is a
        # no-op once the invoice is settled, and a workflow ignores a payment_method_changed
        # naming the card it already has (no attempt, no provider write).
        await asyncio.to_thread(_release, session_factory, event.id, claimed_at)
        logger.warning("Temporal unavailable for webhook %s: %s", event.id, unavailable)
        return _error(
            503,
            "temporal_unavailable",
            f"could not reach the workflow service ({unavailable}); event {event.id} was not "
            "processed, retry later",
        )
    except _ProviderUnavailable as unavailable:
        await asyncio.to_thread(_release, session_factory, event.id, claimed_at)
        logger.warning("Stripe unavailable for webhook %s: %s", event.id, unavailable)
        return _error(
            503,
            "provider_unavailable",
            f"could not read the customer's default card from Stripe ({unavailable}); event "
            f"{event.id} was not processed, retry later",
        )
    except Exception:
        # e.g. the database went away mid-request: let Stripe's retry process the event.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(_release, session_factory, event.id, claimed_at)
        raise

    await asyncio.to_thread(
        _record, session_factory, event.id, delivered, deps.clock.now(), routing.card_news
    )
    logger.info(
        "webhook %s (%s): %s %s", event.id, event.type, delivered.outcome.value, delivered.detail
    )
    return JSONResponse(
        {"received": True, "event_id": event.id, "outcome": delivered.outcome.value}
    )


class WebhookReceivedOut(BaseModel):
    """The answer to an accepted delivery (Stripe only looks at the 2xx)."""

    received: bool
    duplicate: bool | None = Field(
        None, description="True: this event id was processed before; nothing was done again."
    )
    event_id: str | None = None
    outcome: WebhookOutcome | None = Field(None, description="What was done with the event.")


#: The event as documented in the OpenAPI description. The handler parses the raw bytes
#: itself (the signature covers them exactly), with the same rules (``_parse_event``).
STRIPE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A Stripe event (snapshot payload), signed in the Stripe-Signature header "
    "('t=<unix time>,v1=<HMAC-SHA256 of \"t.body\" with the endpoint secret>').",
    "required": ["id", "type", "created", "data"],
    "properties": {
        "id": {
            "type": "string",
            "maxLength": _MAX_EVENT_ID_LENGTH,
            "pattern": f"^{_EVENT_NAME.pattern}$",
        },
        "type": {
            "type": "string",
            "maxLength": _MAX_EVENT_TYPE_LENGTH,
            "pattern": f"^{_EVENT_NAME.pattern}$",
        },
        "created": {"type": "integer", "minimum": 0, "maximum": _MAX_CREATED},
        "data": {
            "type": "object",
            "required": ["object"],
            "properties": {
                "object": {"type": "object"},
                "previous_attributes": {"type": "object"},
            },
        },
    },
}


def webhook_router() -> APIRouter:
    """The router serving ``POST /v1/webhooks/stripe``. It authenticates by the Stripe
    signature, so the API-key dependency must not apply to it."""
    webhook_routes = APIRouter(tags=["webhooks"])
    webhook_routes.add_api_route(
        WEBHOOK_PATH,
        receive_stripe_webhook,
        methods=["POST"],
        summary="Receive a Stripe webhook event",
        description="Authenticated by the Stripe-Signature header over the raw body (no API "
        "key). A repeated event id is acknowledged and dropped; an event older than news "
        "already acted on for the same customer is recorded as stale and changes nothing.",
        response_class=JSONResponse,
        response_model=WebhookReceivedOut,
        responses={
            400: {"model": ErrorOut, "description": "Bad signature, or not a Stripe event."},
            409: {"model": ErrorOut, "description": "Another delivery is processing it."},
            413: {"model": ErrorOut, "description": "Body over the webhook limit."},
            503: {
                "model": ErrorOut,
                "description": "Temporal, or Stripe (read of a customer's card), unreachable; "
                "Stripe retries.",
            },
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": STRIPE_EVENT_SCHEMA}},
            }
        },
    )
    return webhook_routes


router = webhook_router()
