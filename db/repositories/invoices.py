"""Invoices: one live renewal per (subscription, period start), numbered gap-free per
customer, moved through their lifecycle by compare-and-set so concurrent workers cannot undo
each other."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from billing.balance import BalanceEntryKind
from billing.errors import InvalidInput, NotFound
from billing.ids import invoice_line_id_for
from billing.invoices import (
    InvoiceLine,
    InvoiceLineKind,
    InvoiceStatus,
    check_transition,
    invoice_totals_with_debit,
)
from billing.minimum_charge import minimum_charge_minor
from billing.records import InvoiceLineRecord, InvoiceRecord
from db.models import INVOICE_LINES, INVOICES, PAYMENT_ATTEMPTS
from db.repositories import balances
from db.repositories._rows import column_values, fetch_all, fetch_one, insert_or_get, select_rows
from db.repositories.customers import allocate_invoice_number

#: Which timestamp column records the moment an invoice entered each status.
_STAMPED_AT: dict[InvoiceStatus, str] = {
    InvoiceStatus.OPEN: "finalized_at",
    InvoiceStatus.PAID: "paid_at",
    InvoiceStatus.VOID: "voided_at",
    InvoiceStatus.UNCOLLECTIBLE: "marked_uncollectible_at",
}


_GET_INVOICE = select_rows(INVOICES).where(INVOICES.c.id == bindparam("invoice_id"))


def get_invoice(session: Session, invoice_id: str) -> InvoiceRecord | None:
    return fetch_one(session, InvoiceRecord, _GET_INVOICE, {"invoice_id": invoice_id})


def get_invoice_for_period(
    session: Session, subscription_id: str, period_start: datetime
) -> InvoiceRecord | None:
    """The subscription's live renewal invoice for the period starting at ``period_start``
    (any zone): the one the period's unique index holds, so not one voided as superseded
    (migration 0022). Invoices issued for a plan change are found by
    ``get_invoice_for_change``."""
    return fetch_one(
        session,
        InvoiceRecord,
        select_rows(INVOICES).where(
            INVOICES.c.subscription_id == subscription_id,
            INVOICES.c.period_start == period_start,
            INVOICES.c.change_id.is_(None),
            INVOICES.c.status != InvoiceStatus.VOID,
        ),
    )


def count_renewals_for_period(
    session: Session, subscription_id: str, period_start: datetime
) -> int:
    """How many renewal invoices (live or voided) the period has had: the next one's
    ``revision`` (``billing.ids.invoice_id_for``)."""
    return int(
        session.execute(
            select(func.count())
            .select_from(INVOICES)
            .where(
                INVOICES.c.subscription_id == subscription_id,
                INVOICES.c.period_start == period_start,
                INVOICES.c.change_id.is_(None),
            )
        ).scalar_one()
    )


def get_invoice_for_change(session: Session, change_id: str) -> InvoiceRecord | None:
    """The invoice issued for the plan change ``change_id`` (unique), if any."""
    return fetch_one(
        session, InvoiceRecord, select_rows(INVOICES).where(INVOICES.c.change_id == change_id)
    )


def _existing(session: Session, record: InvoiceRecord) -> InvoiceRecord | None:
    """The invoice that already holds ``record``'s key: its change, or its renewal period."""
    if record.change_id is not None:
        return get_invoice_for_change(session, record.change_id)
    return get_invoice_for_period(session, record.subscription_id, record.period_start)


def list_invoices_for_subscription(session: Session, subscription_id: str) -> list[InvoiceRecord]:
    """The subscription's invoices in billing order (by period start)."""
    return fetch_all(
        session,
        InvoiceRecord,
        select_rows(INVOICES)
        .where(INVOICES.c.subscription_id == subscription_id)
        .order_by(INVOICES.c.period_start),
    )


def list_open_never_charged(
    session: Session, subscription_id: str, *, except_id: str | None = None
) -> list[InvoiceRecord]:
    """The subscription's open invoices that no charge attempt was ever made for, but
    ``except_id``."""
    query = select_rows(INVOICES).where(
        INVOICES.c.subscription_id == subscription_id,
        INVOICES.c.status == InvoiceStatus.OPEN,
        ~select(PAYMENT_ATTEMPTS.c.id)
        .where(PAYMENT_ATTEMPTS.c.invoice_id == INVOICES.c.id)
        .exists(),
    )
    if except_id is not None:
        query = query.where(INVOICES.c.id != except_id)
    return fetch_all(session, InvoiceRecord, query.order_by(INVOICES.c.period_start))


def insert_invoice(session: Session, record: InvoiceRecord) -> tuple[InvoiceRecord, bool]:
    """Insert ``record`` unless its (subscription, period start) already has an invoice; then
    return that one and False. Safe against a concurrent insert (savepoint + constraint).

    ``record.number`` must already be allocated. If the invoice turns out to exist, that
    allocation is a gap unless the caller rolls back; ``issue_invoice`` avoids this.
    """
    return insert_or_get(session, INVOICES, record, lambda: _existing(session, record))


_LIST_INVOICE_LINES = (
    select_rows(INVOICE_LINES)
    .where(INVOICE_LINES.c.invoice_id == bindparam("invoice_id"))
    .order_by(INVOICE_LINES.c.position)
)


def list_invoice_lines(session: Session, invoice_id: str) -> list[InvoiceLineRecord]:
    """The invoice's lines in order (position 1 first)."""
    return fetch_all(session, InvoiceLineRecord, _LIST_INVOICE_LINES, {"invoice_id": invoice_id})


def lines_by_invoice(
    session: Session, invoice_ids: list[str]
) -> dict[str, list[InvoiceLineRecord]]:
    """``{invoice id: its lines in order}`` for a page of invoices, in one query."""
    found: dict[str, list[InvoiceLineRecord]] = {i: [] for i in invoice_ids}
    if not invoice_ids:
        return found
    for line in fetch_all(
        session,
        InvoiceLineRecord,
        select_rows(INVOICE_LINES)
        .where(INVOICE_LINES.c.invoice_id.in_(invoice_ids))
        .order_by(INVOICE_LINES.c.invoice_id, INVOICE_LINES.c.position),
    ):
        found[line.invoice_id].append(line)
    return found


def _subscription_line(record: InvoiceRecord) -> InvoiceLine:
    return InvoiceLine(
        kind=InvoiceLineKind.SUBSCRIPTION,
        description=record.description,
        amount_minor=record.amount_due_minor,
        period_start=record.period_start,
        period_end=record.period_end,
        unit_amount_minor=record.amount_due_minor,
    )


def _finalize(session: Session, record: InvoiceRecord, lines: list[InvoiceLine]) -> InvoiceRecord:
    """The invoice's totals from its lines, paid first from the customer's credit balance
    (the caller holds the customer's row lock); a debit on the balance is added. An invoice
    that owes nothing is paid as it is finalized, as Stripe does; so is one owing less than
    Stripe's minimum charge, whose amount is carried to the balance as a debit
    (``billing.minimum_charge``; the entries are written by ``_write_lines_and_credit``)."""
    balance = balances.credit_balance(session, record.customer_id, record.currency)
    totals = invoice_totals_with_debit(
        [line.amount_minor for line in lines], balance, record.currency
    )
    due = totals.amount_due_minor
    paid = due == 0 or totals.too_small_to_charge
    at = record.finalized_at or record.created_at
    return dataclasses.replace(
        record,
        subtotal_minor=totals.subtotal_minor,
        credit_applied_minor=totals.credit_applied_minor,
        amount_due_minor=due,
        status=InvoiceStatus.PAID if paid else record.status,
        paid_at=(record.paid_at or at) if paid else None,
        status_reason=too_small_reason(due, record.currency)
        if totals.too_small_to_charge
        else record.status_reason,
    )


def too_small_reason(amount_due_minor: int, currency: str) -> str:
    minimum = minimum_charge_minor(currency)
    return (
        f"amount due {amount_due_minor} {currency} minor units is below Stripe's minimum charge "
        f"({minimum}); not charged, carried to the customer's balance for the next invoice"
    )


def carry_too_small(session: Session, invoice: InvoiceRecord, at: datetime) -> None:
    """Carry the amount due of ``invoice`` (paid because it was below the minimum charge) to
    the customer's balance as a debit, once per invoice (its source key)."""
    balances.record_entry(
        session,
        customer_id=invoice.customer_id,
        currency=invoice.currency,
        amount_minor=-invoice.amount_due_minor,
        kind=BalanceEntryKind.INVOICE_TOO_SMALL,
        source_key=f"too-small:{invoice.id}",
        description=(
            f"invoice {invoice.number}: {invoice.amount_due_minor} below the minimum charge, "
            "carried to the next invoice"
        ),
        at=at,
        invoice_id=invoice.id,
        allow_debit=True,
    )


def _write_lines_and_credit(
    session: Session, invoice: InvoiceRecord, lines: list[InvoiceLine]
) -> None:
    for position, line in enumerate(lines, start=1):
        session.execute(
            INVOICE_LINES.insert(),
            column_values(
                InvoiceLineRecord(
                    id=invoice_line_id_for(invoice.id, position),
                    invoice_id=invoice.id,
                    position=position,
                    kind=InvoiceLineKind(line.kind),
                    description=line.description,
                    amount_minor=line.amount_minor,
                    currency=invoice.currency,
                    period_start=line.period_start,
                    period_end=line.period_end,
                    created_at=invoice.created_at,
                    plan_code=line.plan_code,
                    quantity=line.quantity,
                    unit_amount_minor=line.unit_amount_minor,
                    change_id=line.change_id,
                )
            ),
        )
    if invoice.credit_applied_minor:
        balances.record_entry(
            session,
            customer_id=invoice.customer_id,
            currency=invoice.currency,
            amount_minor=-invoice.credit_applied_minor,
            kind=BalanceEntryKind.APPLIED_TO_INVOICE,
            source_key=f"applied:{invoice.id}",
            description=f"applied to invoice {invoice.number}",
            at=invoice.created_at,
            invoice_id=invoice.id,
        )
    debit = invoice.amount_due_minor - max(invoice.subtotal_minor - invoice.credit_applied_minor, 0)
    if debit > 0:
        # The balance's debit (an earlier amount too small to charge) is billed here: the
        # balance goes back up by it (Stripe's applied_to_invoice of a debit).
        balances.record_entry(
            session,
            customer_id=invoice.customer_id,
            currency=invoice.currency,
            amount_minor=debit,
            kind=BalanceEntryKind.APPLIED_TO_INVOICE,
            source_key=f"applied:{invoice.id}",
            description=f"debit carried to invoice {invoice.number}",
            at=invoice.created_at,
            invoice_id=invoice.id,
        )
    if invoice.status == InvoiceStatus.PAID and invoice.amount_due_minor > 0:
        carry_too_small(session, invoice, invoice.created_at)
    if invoice.subtotal_minor < 0:
        balances.record_entry(
            session,
            customer_id=invoice.customer_id,
            currency=invoice.currency,
            amount_minor=-invoice.subtotal_minor,
            kind=BalanceEntryKind.INVOICE_CREDIT,
            source_key=f"invoice-credit:{invoice.id}",
            description=f"credit from invoice {invoice.number}",
            at=invoice.created_at,
            invoice_id=invoice.id,
        )


def issue_invoice(
    session: Session, record: InvoiceRecord, lines: list[InvoiceLine] | None = None
) -> tuple[InvoiceRecord, bool]:
    """Number and insert the invoice for (subscription, period start), or, when
    ``record.change_id`` is set, for that plan change; or return the existing one and False.
    ``record.number`` is ignored: the customer's next number is allocated.

    ``lines`` are its lines (default: one subscription line of ``record.amount_due_minor``
    for the period). Totals come from them: the subtotal is their sum, the customer's credit
    balance pays what it can (an ``applied_to_invoice`` entry), a negative subtotal is carried
    to the balance, and an invoice left owing nothing is paid at once. Lines, totals and
    balance entries are written with the invoice, in its savepoint, under the customer's row
    lock (taken by the number allocation), so racing issues cannot spend one credit twice.

    Gap-free even when two workers race for the same period: the allocation takes the
    customer's row lock, the period is checked again under that lock, and allocation and
    insert share one savepoint, so the loser's number is rolled back with its insert.
    """
    existing = _existing(session, record)
    if existing is not None:
        return existing, False
    with session.begin_nested() as savepoint:
        number = allocate_invoice_number(session, record.customer_id)
        # Under the customer's row lock: a racing worker that got here first has committed.
        existing = _existing(session, record)
        if existing is not None:
            savepoint.rollback()
            return existing, False
        drafts = list(lines) if lines else [_subscription_line(record)]
        finalized = _finalize(session, dataclasses.replace(record, number=number), drafts)
        created, inserted = insert_invoice(session, finalized)
        if not inserted:
            savepoint.rollback()
            return created, inserted
        _write_lines_and_credit(session, created, drafts)
        return created, inserted


def transition_invoice(
    session: Session,
    invoice_id: str,
    *,
    to: InvoiceStatus,
    at: datetime,
    reason: str | None = None,
    amount_paid_minor: int | None = None,
    current: InvoiceRecord | None = None,
) -> InvoiceRecord:
    """Move the invoice to ``to`` at ``at`` (UTC), if its lifecycle allows it from the status
    it has *in the database*; raises ChangeRefused otherwise (e.g. voiding a paid invoice)
    and leaves the row unchanged.

    Asking for the status it already has returns it unchanged, so retries are harmless.
    Stamps ``finalized_at``/``paid_at``/``voided_at``/``marked_uncollectible_at``. Paying
    sets ``amount_paid_minor`` (default: the full amount due, in minor units).

    ``current``: the invoice as this transaction already holds it, row-locked by an earlier
    write in it (``record_payment_intent``'s answer), which saves reading it again. Anything
    else must be read here: the status is compared-and-set, but the amount due is not.
    """
    to = InvoiceStatus(to)
    if amount_paid_minor is not None and (
        isinstance(amount_paid_minor, bool) or amount_paid_minor < 0
    ):
        raise InvalidInput(
            f"amount_paid_minor must be a non-negative whole number of minor units; "
            f"got {amount_paid_minor!r}",
            field="amount_paid_minor",
        )
    # Each lost race moves the invoice one step further along an acyclic lifecycle, so a
    # handful of rounds always settles: either our write lands or the move is refused.
    for _ in range(len(InvoiceStatus) + 1):
        if current is None or current.id != invoice_id:
            current = get_invoice(session, invoice_id)
        if current is None:
            raise NotFound(f"invoice {invoice_id} not found")
        if current.status == to:
            return current
        check_transition(f"{invoice_id} ({current.number})", current.status, to)
        values: dict[str, Any] = {"status": to, _STAMPED_AT[to]: at}
        if reason is not None:
            values["status_reason"] = reason
        paid = amount_paid_minor
        if to == InvoiceStatus.PAID and paid is None:
            paid = current.amount_due_minor
        if paid is not None:
            if paid > current.amount_due_minor:
                raise InvalidInput(
                    f"invoice {current.number} is due {current.amount_due_minor} minor units; "
                    f"{paid} cannot be recorded as paid on it",
                    field="amount_paid_minor",
                )
            values["amount_paid_minor"] = paid
        # Compare-and-set on the status we checked: if another transaction moved the invoice
        # in between, no row matches and the loop re-checks against the new status.
        moved = (
            session.execute(
                update(INVOICES)
                .where(INVOICES.c.id == invoice_id, INVOICES.c.status == current.status)
                .values(values)
                .returning(*INVOICES.c)
            )
            .mappings()
            .first()
        )
        if moved is not None:
            voided = InvoiceRecord(**moved)
            applied = (
                balances.get_entry_by_source(session, f"applied:{voided.id}")
                if to == InvoiceStatus.VOID
                else None
            )
            if applied is not None:
                # A voided invoice owes nothing: the credit it used goes back, as Stripe does,
                # and a debit it billed (an earlier amount too small to charge) is owed again.
                balances.record_entry(
                    session,
                    customer_id=voided.customer_id,
                    currency=voided.currency,
                    amount_minor=-applied.amount_minor,
                    kind=BalanceEntryKind.RESTORED_FROM_INVOICE,
                    source_key=f"restored:{voided.id}",
                    description=f"invoice {voided.number} voided",
                    at=at,
                    invoice_id=voided.id,
                    allow_debit=True,
                )
            return voided
        current = None  # moved meanwhile: read it again
    raise RuntimeError(f"invoice {invoice_id} kept changing status; try again")


def get_invoice_by_payment_intent(session: Session, payment_intent_id: str) -> InvoiceRecord | None:
    """The invoice whose one PaymentIntent is ``payment_intent_id`` (unique), or None."""
    return fetch_one(
        session,
        InvoiceRecord,
        select_rows(INVOICES).where(INVOICES.c.stripe_payment_intent_id == payment_intent_id),
    )


def record_payment_intent(
    session: Session, invoice_id: str, payment_intent_id: str
) -> InvoiceRecord:
    """Record ``payment_intent_id`` as the invoice's PaymentIntent, unless it already has one.

    Set-once (compare-and-set on NULL), so a retried or racing writer cannot replace the intent
    the invoice's attempts confirm. Returns the invoice as stored: a caller whose intent is not
    the one returned has found a second PaymentIntent for the invoice and must say so.
    """
    # One statement: set if unset (COALESCE keeps an intent already there), and the row as
    # stored. The row stays locked by this write until the transaction ends, so the record
    # returned is the invoice for the rest of it (``transition_invoice``'s ``current``).
    row = (
        session.execute(
            _RECORD_PAYMENT_INTENT,
            {"invoice_id": invoice_id, "payment_intent_id": payment_intent_id},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"invoice {invoice_id} not found")
    return InvoiceRecord(**row)


_RECORD_PAYMENT_INTENT = (
    update(INVOICES)
    .where(INVOICES.c.id == bindparam("invoice_id"))
    .values(
        stripe_payment_intent_id=func.coalesce(
            INVOICES.c.stripe_payment_intent_id,
            bindparam("payment_intent_id", type_=INVOICES.c.stripe_payment_intent_id.type),
        )
    )
    .returning(*INVOICES.c)
)
