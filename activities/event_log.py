"""Events for the business and receipts, written by the billing activities in the same
transaction as the change they report (the outbox pattern): a change is never committed
without its event, nor an event without its change.

Each event carries the object as the API shows it (``billing.api.schemas``), so a receiver
that reads our API and one that reads our events see the same thing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from billing.business_events import EventType, invoice_event_for, subscription_event_for
from billing.ids import new_id
from billing.invoices import InvoiceStatus
from billing.notices import NoticeKind
from billing.records import InvoiceRecord, NotificationRecord, SubscriptionRecord
from billing.subscription import SubscriptionStatus
from db.repositories import events as events_repo
from db.repositories import invoices as invoices_repo
from db.repositories import notifications as notifications_repo
from db.repositories import payments as payments_repo
from db.repositories import subscriptions as subscriptions_repo


def subscription_object(session: Session, subscription: SubscriptionRecord) -> dict[str, Any]:
    # Imported here: billing.api imports the worker, which imports these activities.
    from billing.api.schemas import SubscriptionSummaryOut

    parked = subscriptions_repo.parked_at(session, [subscription.id]).get(subscription.id)
    return SubscriptionSummaryOut.of(subscription, parked).model_dump(mode="json")


def invoice_object(session: Session, invoice: InvoiceRecord) -> dict[str, Any]:
    from billing.api.schemas import InvoiceOut

    payment = payments_repo.get_payment_for_invoice(session, invoice.id)
    # With its lines, as GET /v1/invoices/{id} shows it (written before any of its events).
    lines = invoices_repo.list_invoice_lines(session, invoice.id)
    return InvoiceOut.of(invoice, payment, lines).model_dump(mode="json")


def _changed(before: SubscriptionRecord, after: SubscriptionRecord) -> bool:
    return any(
        getattr(before, name) != getattr(after, name)
        for name in (
            "current_period_start",
            "next_billing_at",
            "cancel_at_period_end",
            "paused_at",
            "canceled_at",
        )
    )


def subscription_synced(session: Session, before: SubscriptionRecord | None, at: datetime) -> None:
    """After a sync of ``before``'s subscription: its status event, or ``updated`` when only
    its period or cancel-at-period-end changed."""
    if before is None:
        return
    after = subscriptions_repo.get_subscription(session, before.id)
    if after is None:
        return
    previous = SubscriptionStatus(before.status)
    current = SubscriptionStatus(after.status)
    event_type = subscription_event_for(previous, current)
    if event_type is None and _changed(before, after):
        event_type = EventType.SUBSCRIPTION_UPDATED
    if event_type is None:
        return
    events_repo.record_event(
        session,
        type=event_type,
        subscription_id=after.id,
        object_id=after.id,
        object=subscription_object(session, after),
        # What the change was: a retried sync changes nothing and writes no event; the key
        # guards the rest.
        dedupe_key=(
            f"{after.id}:{event_type.value}:{current.value}:{at.isoformat()}:"
            f"{after.current_period_start.isoformat() if after.current_period_start else '-'}"
        )[:200],
        created_at=at,
    )


def invoice_event(
    session: Session, invoice_id: str, event_type: EventType, at: datetime, *, key: str = ""
) -> None:
    """Record ``event_type`` about the invoice (once per invoice, type and ``key``)."""
    invoice_events(session, invoice_id, [event_type], at, key=key)


def invoice_events(
    session: Session,
    invoice_id: str,
    event_types: list[EventType],
    at: datetime,
    *,
    key: str = "",
) -> None:
    """Record each of ``event_types`` about the invoice, in order, each carrying the invoice
    as it is now: read and shown once for all of them (they are written in one transaction,
    so it cannot change between them)."""
    invoice = invoices_repo.get_invoice(session, invoice_id)
    if invoice is None:
        return
    shown = invoice_object(session, invoice)
    for event_type in event_types:
        events_repo.record_event(
            session,
            type=event_type,
            subscription_id=invoice.subscription_id,
            object_id=invoice.id,
            object=shown,
            dedupe_key=f"{invoice.id}:{event_type.value}{':' + key if key else ''}",
            created_at=at,
        )


def invoice_issued(session: Session, invoice: InvoiceRecord, at: datetime) -> None:
    """A new invoice: created and finalized in one step (the engine issues them final), and
    paid at once when free."""
    issued = [EventType.INVOICE_CREATED, EventType.INVOICE_FINALIZED]
    if invoice.status == InvoiceStatus.PAID:
        issued.append(EventType.INVOICE_PAID)
    invoice_events(session, invoice.id, issued, at)


def invoice_closed(session: Session, invoice: InvoiceRecord, at: datetime) -> None:
    event_type = invoice_event_for(InvoiceStatus(invoice.status))
    if event_type is not None:
        invoice_event(session, invoice.id, event_type, at)


def invoice_paid(session: Session, invoice: InvoiceRecord, at: datetime) -> None:
    """The invoice's payment was recorded: ``invoice.paid`` and the customer's receipt."""
    invoice_event(session, invoice.id, EventType.INVOICE_PAID, at)
    notifications_repo.enqueue_notification(
        session,
        NotificationRecord(
            id=new_id("ntf"),
            kind=NoticeKind.RECEIPT.value,
            customer_id=invoice.customer_id,
            subscription_id=invoice.subscription_id,
            invoice_id=invoice.id,
            dedupe_key=f"{invoice.id}:{NoticeKind.RECEIPT.value}",
            payload={"invoice_number": invoice.number},
            created_at=at,
        ),
    )


def charge_failed(
    session: Session, invoice_id: str, *, attempt_number: int, action_required: bool, at: datetime
) -> None:
    event_type = (
        EventType.INVOICE_PAYMENT_ACTION_REQUIRED
        if action_required
        else EventType.INVOICE_PAYMENT_FAILED
    )
    invoice_event(session, invoice_id, event_type, at, key=str(attempt_number))
