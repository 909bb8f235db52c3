"""Events for the business and receipts, written by the billing activities in the same
transaction as the change they report (the outbox pattern): a change is never committed
without its event, nor an event without its change.

Each event carries the object as the API shows it (``billing.api.schemas``), so a receiver
that reads our API and one that reads our events see the same thing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy.orm import Session

from billing.business_events import (
    ACCOUNT_STREAM,
    EventType,
    dispute_event_for,
    invoice_event_for,
    payout_event_for,
    refund_event_for,
    subscription_event_for,
)
from billing.credit_notes import RefundStatus
from billing.disputes import DisputeStatus
from billing.invoices import InvoiceStatus
from billing.ledger import PayoutReconciliation, PayoutStatus
from billing.records import (
    CreditNoteLineRecord,
    CreditNoteRecord,
    DisputeRecord,
    InvoiceRecord,
    PaymentRecord,
    PayoutRecord,
    RefundRecord,
    SubscriptionRecord,
)
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


class _Unread(Enum):
    UNREAD = "unread"


def invoice_object(
    session: Session,
    invoice: InvoiceRecord,
    payment: PaymentRecord | _Unread | None = _Unread.UNREAD,
) -> dict[str, Any]:
    """``payment``: the invoice's payment when the caller holds it (None: it has none),
    saving the read."""
    from billing.api.schemas import InvoiceOut

    if payment is _Unread.UNREAD:
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


@dataclass(frozen=True)
class ShownInvoice:
    """An invoice as this transaction holds it now, and as ``invoice_object`` shows it."""

    invoice: InvoiceRecord
    object: dict[str, Any]


def invoice_event(
    session: Session,
    invoice_id: str,
    event_type: EventType,
    at: datetime,
    *,
    key: str = "",
    shown: ShownInvoice | None = None,
) -> None:
    """Record ``event_type`` about the invoice (once per invoice, type and ``key``).
    ``shown``: the invoice when the caller holds it as it is now in this transaction (it just
    wrote it), saving the reads."""
    if shown is None:
        invoice = invoices_repo.get_invoice(session, invoice_id)
        if invoice is None:
            return
        shown = ShownInvoice(invoice, invoice_object(session, invoice))
    events_repo.record_event(
        session,
        type=event_type,
        subscription_id=shown.invoice.subscription_id,
        object_id=invoice_id,
        object=shown.object,
        dedupe_key=f"{invoice_id}:{event_type.value}{':' + key if key else ''}",
        created_at=at,
    )


def invoice_issued(session: Session, invoice: InvoiceRecord, at: datetime) -> None:
    """A new invoice (``invoice``: as just inserted, with its lines, in this transaction):
    created and finalized in one step (the engine issues them final), and paid at once when it
    owes nothing. Its events show it once read: a new invoice has no payment. One the
    customer's credit balance paid (or that carried an amount below the provider's minimum
    charge to the balance) gets its receipt like any paid invoice; a free one (nothing
    billed) does not."""
    shown = ShownInvoice(invoice, invoice_object(session, invoice, payment=None))
    invoice_event(session, invoice.id, EventType.INVOICE_CREATED, at, shown=shown)
    invoice_event(session, invoice.id, EventType.INVOICE_FINALIZED, at, shown=shown)
    if invoice.status == InvoiceStatus.PAID:
        invoice_event(session, invoice.id, EventType.INVOICE_PAID, at, shown=shown)
        if invoice.subtotal_minor > 0:
            notifications_repo.enqueue_receipt(session, invoice, at)


def invoice_closed(session: Session, invoice: InvoiceRecord, at: datetime) -> None:
    event_type = invoice_event_for(InvoiceStatus(invoice.status))
    if event_type is not None:
        invoice_event(session, invoice.id, event_type, at)


def invoice_paid(
    session: Session, invoice: InvoiceRecord, at: datetime, payment: PaymentRecord | None
) -> None:
    """The invoice was paid: ``invoice.paid`` and the customer's receipt. ``invoice`` and
    ``payment``: as this transaction just wrote them (``payment`` None: paid by credit,
    without a charge)."""
    shown = ShownInvoice(invoice, invoice_object(session, invoice, payment=payment))
    invoice_event(session, invoice.id, EventType.INVOICE_PAID, at, shown=shown)
    notifications_repo.enqueue_receipt(session, invoice, at)


def charge_failed(
    session: Session, invoice_id: str, *, attempt_number: int, action_required: bool, at: datetime
) -> None:
    event_type = (
        EventType.INVOICE_PAYMENT_ACTION_REQUIRED
        if action_required
        else EventType.INVOICE_PAYMENT_FAILED
    )
    invoice_event(session, invoice_id, event_type, at, key=str(attempt_number))


# ---- credit notes, refunds, disputes, payouts ----------------------------------------------
#
# Each is recorded in the transaction of the change it reports, keyed by the object's id and
# the state it reached: a retried activity, a repeated or stale Stripe webhook, or twenty
# requests with one Idempotency-Key reach no new state, so they write nothing. Credit notes,
# refunds and disputes belong to an invoice, so to its subscription's stream (after the
# invoice's own events); payouts, and disputes of charges that are none of our payments, to
# the account's stream (``ACCOUNT_STREAM``).


def _invoice_stream(session: Session, invoice_id: str | None) -> str:
    if invoice_id is None:
        return ACCOUNT_STREAM
    invoice = invoices_repo.get_invoice(session, invoice_id)
    return invoice.subscription_id if invoice is not None else ACCOUNT_STREAM


def refund_object(refund: RefundRecord) -> dict[str, Any]:
    from billing.api.schemas import RefundOut

    return RefundOut.of(refund).model_dump(mode="json")


def dispute_object(dispute: DisputeRecord) -> dict[str, Any]:
    from billing.api.schemas import DisputeOut

    return DisputeOut.of(dispute).model_dump(mode="json")


def credit_note_issued(
    session: Session,
    note: CreditNoteRecord,
    lines: list[CreditNoteLineRecord],
    refunds: list[RefundRecord],
    invoice: InvoiceRecord | None,
    at: datetime,
) -> None:
    """A credit note just issued (with its lines, its pending refund and the invoice as it
    left it, all in this transaction): ``credit_note.created``, ``refund.created`` for its
    refund, and ``invoice.paid`` when it paid an open invoice (the subscription workflow's
    own ``invoice.paid`` for it later finds it written)."""
    from billing.api.schemas import CreditNoteOut

    stream = (
        invoice.subscription_id
        if invoice is not None
        else _invoice_stream(session, note.invoice_id)
    )
    events_repo.record_event(
        session,
        type=EventType.CREDIT_NOTE_CREATED,
        subscription_id=stream,
        object_id=note.id,
        object=CreditNoteOut.of(note, lines, refunds).model_dump(mode="json"),
        dedupe_key=f"{note.id}:{EventType.CREDIT_NOTE_CREATED.value}",
        created_at=at,
    )
    for refund in refunds:
        refund_recorded(session, refund, at, created=True, stream=stream)
    if (
        invoice is not None
        and note.type == "pre_payment"
        and InvoiceStatus(invoice.status) == InvoiceStatus.PAID
    ):
        invoice_event(session, invoice.id, EventType.INVOICE_PAID, at)


def refund_recorded(
    session: Session,
    refund: RefundRecord,
    at: datetime,
    *,
    created: bool = False,
    stream: str | None = None,
) -> None:
    """The refund as this transaction just wrote it: ``refund.created`` when ``created`` (it
    was inserted now), and the event of the status it is at (once per status)."""
    if stream is None:
        stream = _invoice_stream(session, refund.invoice_id)
    shown = refund_object(refund)
    kinds: list[tuple[EventType, str]] = []
    if created:
        kinds.append((EventType.REFUND_CREATED, ""))
    moved = refund_event_for(RefundStatus(refund.status))
    if moved is not None:
        kinds.append((moved, RefundStatus(refund.status).value))
    for event_type, state in kinds:
        events_repo.record_event(
            session,
            type=event_type,
            subscription_id=stream,
            object_id=refund.id,
            object=shown,
            dedupe_key=f"{refund.id}:{event_type.value}{':' + state if state else ''}",
            created_at=at,
        )


def dispute_recorded(
    session: Session, before: DisputeRecord | None, after: DisputeRecord, at: datetime
) -> None:
    """The dispute as this transaction just wrote it (``before``: as it was, None when it was
    inserted now): ``dispute.created`` for a new one, then ``closed`` or ``updated`` by
    ``dispute_event_for``. ``updated`` is keyed by the (status, amount) reached, ``closed``
    by the dispute alone: a dispute closes once."""
    stream = _invoice_stream(session, after.invoice_id)
    current = (DisputeStatus(after.status), after.amount_minor)
    previous = (DisputeStatus(before.status), before.amount_minor) if before else None
    kinds: list[tuple[EventType, str]] = []
    if before is None:
        kinds.append((EventType.DISPUTE_CREATED, ""))
    moved = dispute_event_for(previous, current)
    if moved == EventType.DISPUTE_CLOSED:
        kinds.append((moved, ""))
    elif moved is not None:
        kinds.append((moved, f"{current[0].value}:{current[1]}"))
    if not kinds:
        return
    shown = dispute_object(after)
    for event_type, state in kinds:
        events_repo.record_event(
            session,
            type=event_type,
            subscription_id=stream,
            object_id=after.id,
            object=shown,
            dedupe_key=f"{after.id}:{event_type.value}{':' + state if state else ''}"[:200],
            created_at=at,
        )


def payout_recorded(session: Session, payout: PayoutRecord, at: datetime) -> None:
    """The payout as this transaction just wrote it: ``payout.paid/failed/canceled`` once it
    reached that status (on the account's stream)."""
    from billing.api.schemas import PayoutOut

    event_type = payout_event_for(PayoutStatus(payout.status))
    if event_type is None:
        return
    events_repo.record_event(
        session,
        type=event_type,
        subscription_id=ACCOUNT_STREAM,
        object_id=payout.id,
        object=PayoutOut.of(payout).model_dump(mode="json"),
        dedupe_key=f"{payout.id}:{event_type.value}",
        created_at=at,
    )


def payout_reconciled(
    session: Session,
    payout: PayoutRecord,
    reconcile: Callable[[], PayoutReconciliation],
    at: datetime,
) -> None:
    """The paid payout's transactions were imported and matched to ours, in this
    transaction: ``payout.reconciliation_completed``, once per payout, showing what
    ``GET /v1/payouts/{id}/reconciliation`` shows (``differences``: how many findings).
    ``reconcile`` is called only the first time (a re-import by the daily sync skips it)."""
    from billing.api.schemas import PayoutReconciliationOut

    dedupe_key = f"{payout.id}:{EventType.PAYOUT_RECONCILIATION_COMPLETED.value}"
    if events_repo.get_event_by_dedupe_key(session, dedupe_key) is not None:
        return
    events_repo.record_event(
        session,
        type=EventType.PAYOUT_RECONCILIATION_COMPLETED,
        subscription_id=ACCOUNT_STREAM,
        object_id=payout.id,
        object=PayoutReconciliationOut.of(reconcile()).model_dump(mode="json"),
        dedupe_key=dedupe_key,
        created_at=at,
    )
