"""Credit notes and refunds (``billing.credit_notes``).

A credit note is issued in one transaction under the customer's row lock
(``balances.lock_customer``): the caps are read, the note numbered in the customer's sequence,
its lines, its credit to the balance, its refund (``pending``, before the provider hears of
it) and, on an open invoice, the lower amount due are written together. So twenty concurrent
credit notes on one invoice can never credit or refund more than the caps allow, and the
customer's numbers have no gaps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from billing.balance import BalanceEntryKind
from billing.credit_notes import (
    CreditNotePlan,
    CreditNoteRequest,
    InvoiceFacts,
    InvoiceLineFacts,
    RefundReason,
    RefundSource,
    RefundStatus,
    format_credit_note_number,
    plan_credit_note,
    refund_idempotency_key,
    refund_reason_for,
    refund_status_after,
)
from billing.errors import ChangeRefused, IdempotencyConflict, NotFound
from billing.ids import new_id
from billing.invoices import InvoiceStatus
from billing.minimum_charge import is_too_small_to_charge
from billing.records import (
    CreditNoteLineRecord,
    CreditNoteRecord,
    InvoiceRecord,
    PaymentRecord,
    RefundRecord,
)
from billing.refunds import ProviderRefund
from db.models import (
    CREDIT_NOTE_LINES,
    CREDIT_NOTES,
    CUSTOMERS,
    INVOICES,
    PAYMENT_ATTEMPTS,
    PAYMENTS,
    REFUNDS,
)
from db.repositories import balances, disputes, notifications
from db.repositories._rows import column_values, fetch_all, fetch_one, insert_or_get, select_rows
from db.repositories.invoices import (
    carry_too_small,
    get_invoice,
    list_invoice_lines,
    too_small_reason,
    transition_invoice,
)
from db.repositories.payments import get_payment_for_invoice

#: Refund statuses that still hold money against a payment's refundable amount.
_HOLDING = [s.value for s in RefundStatus if s.holds_money]


# ---- reads --------------------------------------------------------------------------------


def get_credit_note(session: Session, credit_note_id: str) -> CreditNoteRecord | None:
    return fetch_one(
        session,
        CreditNoteRecord,
        select_rows(CREDIT_NOTES).where(CREDIT_NOTES.c.id == credit_note_id),
    )


def get_credit_note_by_key(
    session: Session, key_scope: str, idempotency_key: str
) -> CreditNoteRecord | None:
    return fetch_one(
        session,
        CreditNoteRecord,
        select_rows(CREDIT_NOTES).where(
            CREDIT_NOTES.c.key_scope == key_scope,
            CREDIT_NOTES.c.idempotency_key == idempotency_key,
        ),
    )


def list_credit_note_lines(session: Session, credit_note_id: str) -> list[CreditNoteLineRecord]:
    return fetch_all(
        session,
        CreditNoteLineRecord,
        select_rows(CREDIT_NOTE_LINES)
        .where(CREDIT_NOTE_LINES.c.credit_note_id == credit_note_id)
        .order_by(CREDIT_NOTE_LINES.c.position),
    )


def list_credit_notes(
    session: Session,
    *,
    invoice_id: str | None = None,
    customer_id: str | None = None,
    limit: int = 50,
    after: tuple[datetime, str] | None = None,
) -> list[CreditNoteRecord]:
    """Credit notes oldest first (created_at, id), keyset-paginated after ``after``."""
    statement = select_rows(CREDIT_NOTES)
    if invoice_id is not None:
        statement = statement.where(CREDIT_NOTES.c.invoice_id == invoice_id)
    if customer_id is not None:
        statement = statement.where(CREDIT_NOTES.c.customer_id == customer_id)
    if after is not None:
        at, last_id = after
        statement = statement.where(
            or_(
                CREDIT_NOTES.c.created_at > at,
                and_(CREDIT_NOTES.c.created_at == at, CREDIT_NOTES.c.id > last_id),
            )
        )
    return fetch_all(
        session,
        CreditNoteRecord,
        statement.order_by(CREDIT_NOTES.c.created_at, CREDIT_NOTES.c.id).limit(limit),
    )


def list_credit_notes_for_invoice(session: Session, invoice_id: str) -> list[CreditNoteRecord]:
    return list_credit_notes(session, invoice_id=invoice_id, limit=10_000)


def get_refund(session: Session, refund_id: str) -> RefundRecord | None:
    return fetch_one(session, RefundRecord, select_rows(REFUNDS).where(REFUNDS.c.id == refund_id))


def get_refund_by_provider_id(session: Session, stripe_refund_id: str) -> RefundRecord | None:
    return fetch_one(
        session,
        RefundRecord,
        select_rows(REFUNDS).where(REFUNDS.c.stripe_refund_id == stripe_refund_id),
    )


def get_refund_by_key(session: Session, idempotency_key: str) -> RefundRecord | None:
    return fetch_one(
        session,
        RefundRecord,
        select_rows(REFUNDS).where(REFUNDS.c.idempotency_key == idempotency_key),
    )


def list_refunds(
    session: Session,
    *,
    credit_note_ids: Sequence[str] | None = None,
    payment_id: str | None = None,
) -> list[RefundRecord]:
    statement = select_rows(REFUNDS)
    if credit_note_ids is not None:
        if not credit_note_ids:
            return []
        statement = statement.where(REFUNDS.c.credit_note_id.in_(list(credit_note_ids)))
    if payment_id is not None:
        statement = statement.where(REFUNDS.c.payment_id == payment_id)
    return fetch_all(session, RefundRecord, statement.order_by(REFUNDS.c.created_at, REFUNDS.c.id))


def list_unfinished_refunds(session: Session, *, created_before: datetime) -> list[RefundRecord]:
    """Refunds not yet at a final status, recorded before ``created_before`` (UTC): the ones a
    sweep follows up (a workflow that was never started, a refund Stripe keeps pending)."""
    return fetch_all(
        session,
        RefundRecord,
        select_rows(REFUNDS)
        .where(
            REFUNDS.c.status.in_([s.value for s in RefundStatus if not s.final]),
            REFUNDS.c.created_at < created_before,
        )
        .order_by(REFUNDS.c.created_at, REFUNDS.c.id),
    )


def refunded_minor(session: Session, payment_id: str) -> int:
    """Refunds of the payment that hold money (pending ones included), minor units."""
    total = session.execute(
        select(func.coalesce(func.sum(REFUNDS.c.amount_minor), 0)).where(
            REFUNDS.c.payment_id == payment_id, REFUNDS.c.status.in_(_HOLDING)
        )
    ).scalar_one()
    return int(total)


def disputed_minor(session: Session, payment_id: str) -> int:
    """What disputes hold of the payment (minor units): the disputed amount of every dispute
    Stripe has taken the money for and not given back (``billing.disputes``)."""
    return disputes.held_minor(session, payment_id)


def invoice_facts(session: Session, invoice: InvoiceRecord) -> InvoiceFacts:
    """What the caps of a credit note on ``invoice`` depend on (``billing.credit_notes``)."""
    notes = list_credit_notes_for_invoice(session, invoice.id)
    credited_by_line: dict[str, int] = {}
    for note in notes:
        for line in list_credit_note_lines(session, note.id):
            if line.invoice_line_id is not None:
                credited_by_line[line.invoice_line_id] = (
                    credited_by_line.get(line.invoice_line_id, 0) + line.amount_minor
                )
    lines = tuple(
        InvoiceLineFacts(
            line_id=line.id,
            position=line.position,
            description=line.description,
            amount_minor=line.amount_minor,
            credited_minor=credited_by_line.get(line.id, 0),
        )
        for line in list_invoice_lines(session, invoice.id)
    )
    # A credit on the invoice as a whole does not name a line; per-line caps still hold for
    # what is named, and the invoice's total caps everything together.
    payment = get_payment_for_invoice(session, invoice.id)
    return InvoiceFacts(
        invoice_id=invoice.id,
        number=invoice.number,
        status=invoice.status,
        currency=invoice.currency,
        total_minor=invoice.subtotal_minor,
        credited_minor=sum(note.amount_minor for note in notes),
        lines=lines,
        captured_minor=payment.amount_minor if payment is not None else 0,
        refunded_minor=refunded_minor(session, payment.id) if payment is not None else 0,
        disputed_minor=disputed_minor(session, payment.id) if payment is not None else 0,
        has_payment=payment is not None and payment.stripe_charge_id is not None,
    )


# ---- issuing ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IssuedCreditNote:
    credit_note: CreditNoteRecord
    lines: list[CreditNoteLineRecord]
    refunds: list[RefundRecord]
    #: False: the same Idempotency-Key (and request) found the note issued before.
    created: bool
    #: The invoice as it is after the note (a pre-payment note: its lower amount due, and
    #: ``paid`` when that reached 0).
    invoice: InvoiceRecord | None = None


def preview_credit_note(
    session: Session, invoice_id: str, request: CreditNoteRequest
) -> tuple[InvoiceRecord, CreditNotePlan]:
    """What ``issue_credit_note`` would issue now; writes nothing."""
    invoice = get_invoice(session, invoice_id)
    if invoice is None:
        raise NotFound(f"invoice {invoice_id!r} not found", field="id")
    return invoice, plan_credit_note(invoice_facts(session, invoice), request)


def _issued(session: Session, note: CreditNoteRecord, created: bool) -> IssuedCreditNote:
    return IssuedCreditNote(
        credit_note=note,
        lines=list_credit_note_lines(session, note.id),
        refunds=list_refunds(session, credit_note_ids=[note.id]),
        created=created,
        invoice=get_invoice(session, note.invoice_id),
    )


def _replay(
    session: Session, key_scope: str, idempotency_key: str | None, request_hash: str | None
) -> IssuedCreditNote | None:
    if idempotency_key is None:
        return None
    existing = get_credit_note_by_key(session, key_scope, idempotency_key)
    if existing is None:
        return None
    if existing.request_hash != request_hash:
        raise IdempotencyConflict(
            f"Idempotency-Key {idempotency_key!r} was used for credit note {existing.number} "
            "with another request; use a new key for a new credit note",
            field="Idempotency-Key",
        )
    return _issued(session, existing, created=False)


def issue_credit_note(
    session: Session,
    invoice_id: str,
    request: CreditNoteRequest,
    *,
    at: datetime,
    idempotency_key: str | None = None,
    key_scope: str = "",
    request_hash: str | None = None,
    created_by: str | None = None,
    allow_open_invoices: bool = False,
) -> IssuedCreditNote:
    """Issue a credit note on the invoice (see the module docstring). A repeat with the same
    ``(key_scope, idempotency_key)`` and ``request_hash`` returns the note issued first;
    another request under that key is IdempotencyConflict. Caps refused: InvalidInput.

    ``allow_open_invoices``: a credit note on an open invoice lowers its amount due (Stripe's
    pre-payment credit note); one that brings it to 0 pays the invoice (``amount_paid`` 0). It
    is refused while a charge attempt is in flight; the charge takes the same lock before it
    records its pending attempt (``activities.billing.charge_invoice``), so it charges either
    the old amount before the note or the new one after it, never the old one after it. The
    caller tells the subscription workflow (``invoice_credited``) once this commits."""
    replay = _replay(session, key_scope, idempotency_key, request_hash)
    if replay is not None:
        return replay
    invoice = get_invoice(session, invoice_id)
    if invoice is None:
        raise NotFound(f"invoice {invoice_id!r} not found", field="id")
    balances.lock_customer(session, invoice.customer_id)
    # Under the lock: a racing request with the same key has committed by now.
    replay = _replay(session, key_scope, idempotency_key, request_hash)
    if replay is not None:
        return replay
    invoice = get_invoice(session, invoice_id)
    assert invoice is not None
    if invoice.status == InvoiceStatus.OPEN:
        if not allow_open_invoices:
            raise ChangeRefused(
                f"invoice {invoice.number} is open: a credit note would lower its amount due, "
                "and this caller does not issue pre-payment credit notes; use the API or the "
                "CLI, or credit it once it is paid"
            )
        _refuse_while_charging(session, invoice)
    plan = plan_credit_note(invoice_facts(session, invoice), request)
    sequence = (
        int(
            session.execute(
                select(func.coalesce(func.max(CREDIT_NOTES.c.sequence), 0)).where(
                    CREDIT_NOTES.c.customer_id == invoice.customer_id
                )
            ).scalar_one()
        )
        + 1
    )
    prefix = session.execute(
        select(CUSTOMERS.c.invoice_prefix).where(CUSTOMERS.c.id == invoice.customer_id)
    ).scalar_one()
    note = CreditNoteRecord(
        id=new_id("cn"),
        number=format_credit_note_number(prefix, sequence),
        customer_id=invoice.customer_id,
        sequence=sequence,
        invoice_id=invoice.id,
        type="pre_payment" if invoice.status == InvoiceStatus.OPEN else "post_payment",
        currency=invoice.currency,
        amount_minor=plan.amount_minor,
        refund_amount_minor=plan.refund_amount_minor,
        credit_amount_minor=plan.credit_amount_minor,
        out_of_band_amount_minor=plan.out_of_band_amount_minor,
        amount_due_reduction_minor=plan.amount_due_reduction_minor,
        created_at=at,
        reason=request.reason,
        memo=request.memo,
        idempotency_key=idempotency_key,
        key_scope=key_scope if idempotency_key is not None else None,
        request_hash=request_hash if idempotency_key is not None else None,
        created_by=created_by,
    )
    session.execute(CREDIT_NOTES.insert(), column_values(note))
    for position, line in enumerate(plan.lines, start=1):
        session.execute(
            CREDIT_NOTE_LINES.insert(),
            column_values(
                CreditNoteLineRecord(
                    id=f"{note.id}_{position}",
                    credit_note_id=note.id,
                    position=position,
                    description=line.description,
                    amount_minor=line.amount_minor,
                    invoice_line_id=line.invoice_line_id,
                )
            ),
        )
    if plan.credit_amount_minor:
        balances.record_entry(
            session,
            customer_id=invoice.customer_id,
            currency=invoice.currency,
            amount_minor=plan.credit_amount_minor,
            kind=BalanceEntryKind.CREDIT_NOTE,
            source_key=f"credit-note:{note.id}",
            description=f"credit note {note.number} on invoice {invoice.number}",
            at=at,
            invoice_id=invoice.id,
            credit_note_id=note.id,
        )
    if plan.refund_amount_minor:
        payment = get_payment_for_invoice(session, invoice.id)
        assert payment is not None and payment.stripe_charge_id is not None  # the cap says so
        _insert_pending_refund(session, note, payment, plan.refund_amount_minor, at)
    if plan.amount_due_reduction_minor:
        lowered = reduce_amount_due(session, invoice, plan.amount_due_reduction_minor)
        if lowered.amount_due_minor == 0:
            # Stripe's behaviour: an invoice a credit note leaves owing nothing is paid (by the
            # credit, amount_paid 0). Its PaymentIntent is canceled by its workflow.
            paid = transition_invoice(
                session,
                invoice.id,
                to=InvoiceStatus.PAID,
                at=at,
                reason=f"paid by credit note {note.number}",
                amount_paid_minor=0,
            )
            # Paid entirely by credit: the customer's receipt, like any paid invoice, in the
            # transaction that pays it (once: its dedupe key is the invoice's).
            notifications.enqueue_receipt(session, paid, at)
        elif is_too_small_to_charge(lowered.amount_due_minor, lowered.currency):
            # Stripe Billing's rule (billing.minimum_charge): an amount due below the minimum
            # charge is not charged; it is carried to the customer's balance as a debit for
            # the next invoice, and this invoice is paid. Its PaymentIntent is canceled by its
            # workflow, as for an invoice the credit paid in full.
            paid = transition_invoice(
                session,
                invoice.id,
                to=InvoiceStatus.PAID,
                at=at,
                reason=(
                    f"credit note {note.number}: "
                    + too_small_reason(lowered.amount_due_minor, lowered.currency)
                )[:500],
                amount_paid_minor=0,
            )
            carry_too_small(session, paid, at)
            notifications.enqueue_receipt(session, paid, at)
    return _issued(session, note, created=True)


def _refuse_while_charging(session: Session, invoice: InvoiceRecord) -> None:
    """An open invoice whose charge is in flight (an attempt of unknown outcome, or waiting
    for the customer's authentication) cannot have its amount lowered: the provider would
    take the old amount. Nor can one whose charge succeeded and is being recorded.

    An attempt that waited for authentication no longer counts once a later attempt
    confirmed the same PaymentIntent (a new card replaces the pending authentication)."""
    rows = session.execute(
        select(
            PAYMENT_ATTEMPTS.c.attempt_number,
            PAYMENT_ATTEMPTS.c.status,
            PAYMENT_ATTEMPTS.c.stripe_payment_intent_id,
        )
        .where(PAYMENT_ATTEMPTS.c.invoice_id == invoice.id)
        .order_by(PAYMENT_ATTEMPTS.c.attempt_number)
    ).all()
    for position, (number, status, intent) in enumerate(rows):
        if status == "succeeded":
            raise ChangeRefused(
                f"invoice {invoice.number} was charged (attempt {number}) and its payment is "
                "being recorded; credit it once it is paid"
            )
        superseded = status == "requires_action" and any(
            later[2] is not None and later[2] == intent for later in rows[position + 1 :]
        )
        if status in ("pending", "requires_action") and not superseded:
            raise ChangeRefused(
                f"invoice {invoice.number} has charge attempt {number} in flight (outcome "
                "unknown or waiting for authentication); issue the credit note once it is "
                "answered"
            )


def reduce_amount_due(session: Session, invoice: InvoiceRecord, amount_minor: int) -> InvoiceRecord:
    """Lower an open invoice's amount due by ``amount_minor`` (a pre-payment credit note), by
    compare-and-set on (open, the amount read): a charge that settled meanwhile, or another
    writer, makes it refuse rather than lower a paid invoice. An invoice left owing nothing
    stays open here: ``issue_credit_note`` marks it paid."""
    if amount_minor > invoice.amount_due_minor:
        raise ChangeRefused(
            f"invoice {invoice.number} is due {invoice.amount_due_minor} minor units; it "
            f"cannot be lowered by {amount_minor}"
        )
    moved = (
        session.execute(
            update(INVOICES)
            .where(
                INVOICES.c.id == invoice.id,
                INVOICES.c.status == InvoiceStatus.OPEN.value,
                INVOICES.c.amount_due_minor == invoice.amount_due_minor,
            )
            .values(amount_due_minor=invoice.amount_due_minor - amount_minor)
            .returning(*INVOICES.c)
        )
        .mappings()
        .first()
    )
    if moved is None:
        raise ChangeRefused(
            f"invoice {invoice.number} changed while the credit note was issued; try again"
        )
    return InvoiceRecord(**moved)


def _insert_pending_refund(
    session: Session,
    note: CreditNoteRecord,
    payment: PaymentRecord,
    amount_minor: int,
    at: datetime,
) -> RefundRecord:
    number = 1 + int(
        session.execute(
            select(func.count()).select_from(REFUNDS).where(REFUNDS.c.credit_note_id == note.id)
        ).scalar_one()
    )
    record = RefundRecord(
        id=new_id("rf"),
        invoice_id=note.invoice_id,
        payment_id=payment.id,
        source=RefundSource.CREDIT_NOTE,
        amount_minor=amount_minor,
        currency=payment.currency,
        status=RefundStatus.PENDING,
        created_at=at,
        updated_at=at,
        credit_note_id=note.id,
        refund_number=number,
        idempotency_key=refund_idempotency_key(note.id, number),
        reason=refund_reason_for(note.reason),
        stripe_charge_id=payment.stripe_charge_id,
    )
    session.execute(REFUNDS.insert(), column_values(record))
    return record


# ---- the provider's word ------------------------------------------------------------------


def record_refund_outcome(
    session: Session, refund_id: str, reported: ProviderRefund, *, at: datetime
) -> RefundRecord:
    """What the provider says of our refund: its id, status and balance transaction. A final
    status is never taken back (``refund_status_after``); the provider id is set once."""
    current = get_refund(session, refund_id)
    if current is None:
        raise NotFound(f"refund {refund_id} not found")
    if current.stripe_refund_id not in (None, reported.refund_id):
        raise ChangeRefused(
            f"refund {refund_id} is provider refund {current.stripe_refund_id}; the provider "
            f"reported {reported.refund_id} for it: two refunds for one key, refund one back"
        )
    status = refund_status_after(current.status, reported.status)
    values = {
        "stripe_refund_id": reported.refund_id,
        "status": status,
        "updated_at": at,
        "balance_transaction_id": reported.balance_transaction_id or current.balance_transaction_id,
        "failure_reason": reported.failure_reason if status == RefundStatus.FAILED else None,
        "completed_at": (current.completed_at or at) if status.final else None,
    }
    row = (
        session.execute(
            update(REFUNDS).where(REFUNDS.c.id == refund_id).values(values).returning(*REFUNDS.c)
        )
        .mappings()
        .one()
    )
    return RefundRecord(**row)


def record_refund_refusal(
    session: Session, refund_id: str, reason: str, *, at: datetime
) -> RefundRecord:
    """Our refund that the provider refused to make (nothing was refunded): failed, with the
    provider's reason; its amount no longer counts against the payment. Only from pending
    without a provider id (a refused create made no refund)."""
    row = (
        session.execute(
            update(REFUNDS)
            .where(
                REFUNDS.c.id == refund_id,
                REFUNDS.c.status == RefundStatus.PENDING.value,
                REFUNDS.c.stripe_refund_id.is_(None),
            )
            .values(
                status=RefundStatus.FAILED,
                failure_reason=reason[:500],
                updated_at=at,
                completed_at=at,
            )
            .returning(*REFUNDS.c)
        )
        .mappings()
        .first()
    )
    if row is None:
        current = get_refund(session, refund_id)
        if current is None:
            raise NotFound(f"refund {refund_id} not found")
        return current
    return RefundRecord(**row)


def record_provider_refund(
    session: Session, payment: PaymentRecord, reported: ProviderRefund, *, at: datetime
) -> tuple[RefundRecord, bool]:
    """Record a refund the provider holds for ``payment``: ours (found by provider id, else by
    the idempotency key in its metadata) is updated; one made elsewhere is inserted once (its
    provider id is unique) and updated after. ``(record, inserted)``."""
    ours = get_refund_by_provider_id(session, reported.refund_id)
    if ours is None and reported.idempotency_key is not None:
        ours = get_refund_by_key(session, reported.idempotency_key)
    if ours is not None:
        return record_refund_outcome(session, ours.id, reported, at=at), False
    status = reported.status
    record = RefundRecord(
        id=new_id("rf"),
        invoice_id=payment.invoice_id,
        payment_id=payment.id,
        source=RefundSource.PROVIDER,
        amount_minor=reported.amount_minor,
        currency=reported.currency,
        status=status,
        created_at=at,
        updated_at=at,
        stripe_refund_id=reported.refund_id,
        stripe_charge_id=reported.charge_id,
        balance_transaction_id=reported.balance_transaction_id,
        failure_reason=reported.failure_reason if status == RefundStatus.FAILED else None,
        completed_at=at if status.final else None,
        reason=_known_reason(reported.reason),
    )
    stored, inserted = insert_or_get(
        session, REFUNDS, record, lambda: get_refund_by_provider_id(session, reported.refund_id)
    )
    if not inserted:
        return record_refund_outcome(session, stored.id, reported, at=at), False
    return stored, True


def _known_reason(reason: str | None) -> RefundReason | None:
    try:
        return RefundReason(reason) if reason else None
    except ValueError:
        return None


def payment_by_charge(session: Session, stripe_charge_id: str) -> PaymentRecord | None:
    return fetch_one(
        session,
        PaymentRecord,
        select_rows(PAYMENTS).where(PAYMENTS.c.stripe_charge_id == stripe_charge_id),
    )
