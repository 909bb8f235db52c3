"""The ledger mirrored from Stripe's balance transactions, payouts and what they paid out, and
the findings of the daily charge reconciliation (``billing.ledger``).

Ledger entries are only inserted, once per balance transaction id (``record_transaction``):
there is no update or delete here, so importing the same transaction twice (a webhook, a
payout import and the periodic sync all meet) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from billing.charge_reconciliation import (
    ChargeFinding,
    ChargeFindingKind,
    FindingStatus,
    OurSide,
    ProviderCharge,
)
from billing.credit_notes import RefundStatus
from billing.disputes import DisputeStatus
from billing.errors import ChangeRefused, NotFound
from billing.ids import new_id
from billing.invoices import InvoiceStatus
from billing.ledger import (
    Expected,
    Finding,
    FindingKind,
    PayoutReconciliation,
    PayoutStatus,
    PeriodReconciliation,
    ProviderBalanceTransaction,
    ProviderPayout,
    reconcile_payout,
)
from billing.records import (
    DisputeRecord,
    LedgerEntryRecord,
    PaymentRecord,
    PayoutRecord,
    ReconciliationFindingRecord,
    RefundRecord,
)
from db.models import (
    CUSTOMERS,
    DISPUTES,
    INVOICES,
    LEDGER_ENTRIES,
    PAYMENT_ATTEMPTS,
    PAYMENTS,
    PAYOUT_ITEMS,
    PAYOUTS,
    RECONCILIATION_FINDINGS,
    REFUNDS,
)
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows


def get_entry(session: Session, balance_transaction_id: str) -> LedgerEntryRecord | None:
    return fetch_one(
        session,
        LedgerEntryRecord,
        select_rows(LEDGER_ENTRIES).where(
            LEDGER_ENTRIES.c.balance_transaction_id == balance_transaction_id
        ),
    )


def list_entries(
    session: Session, *, source_ids: Iterable[str] | None = None
) -> list[LedgerEntryRecord]:
    statement = select_rows(LEDGER_ENTRIES)
    if source_ids is not None:
        statement = statement.where(LEDGER_ENTRIES.c.source_id.in_(list(source_ids)))
    return fetch_all(
        session,
        LedgerEntryRecord,
        statement.order_by(LEDGER_ENTRIES.c.provider_created_at, LEDGER_ENTRIES.c.id),
    )


def record_transaction(
    session: Session, txn: ProviderBalanceTransaction, *, at: datetime
) -> tuple[LedgerEntryRecord, bool]:
    """The ledger entry of ``txn``, inserted once; ``(entry, inserted)``. Linked to our
    payment, refund or dispute by its source id, with the source's own amount and currency."""
    existing = get_entry(session, txn.transaction_id)
    if existing is not None:
        return existing, False
    payment_id = refund_id = dispute_id = None
    source_amount = source_currency = None
    if txn.source_id is not None:
        payment = session.execute(
            select(PAYMENTS.c.id, PAYMENTS.c.amount_minor, PAYMENTS.c.currency).where(
                PAYMENTS.c.stripe_charge_id == txn.source_id
            )
        ).first()
        refund = session.execute(
            select(REFUNDS.c.id, REFUNDS.c.amount_minor, REFUNDS.c.currency).where(
                REFUNDS.c.stripe_refund_id == txn.source_id
            )
        ).first()
        dispute = session.execute(
            select(DISPUTES.c.id, DISPUTES.c.amount_minor, DISPUTES.c.currency).where(
                DISPUTES.c.stripe_dispute_id == txn.source_id
            )
        ).first()
        if payment is not None:
            payment_id, source_amount, source_currency = payment
        elif refund is not None:
            refund_id, source_amount, source_currency = refund
            source_amount = -source_amount
        elif dispute is not None:
            dispute_id, source_amount, source_currency = dispute
            source_amount = (
                source_amount if txn.reporting_category == "dispute_reversal" else -source_amount
            )
    record = LedgerEntryRecord(
        id=new_id("le"),
        balance_transaction_id=txn.transaction_id,
        type=txn.type[:40],
        amount_minor=txn.amount_minor,
        fee_minor=txn.fee_minor,
        net_minor=txn.net_minor,
        currency=txn.currency.upper(),
        recorded_at=at,
        reporting_category=txn.reporting_category[:40] if txn.reporting_category else None,
        source_id=txn.source_id,
        source_amount_minor=source_amount,
        source_currency=source_currency,
        exchange_rate=txn.exchange_rate,
        payment_id=payment_id,
        refund_id=refund_id,
        dispute_id=dispute_id,
        description=txn.description[:500] if txn.description else None,
        provider_created_at=txn.created,
        available_on=txn.available_on,
    )
    return insert_or_get(
        session, LEDGER_ENTRIES, record, lambda: get_entry(session, txn.transaction_id)
    )


# ---- payouts ------------------------------------------------------------------------------


def get_payout(session: Session, payout_id: str) -> PayoutRecord | None:
    """By our id or Stripe's (``po_...``)."""
    return fetch_one(
        session,
        PayoutRecord,
        select_rows(PAYOUTS).where(
            (PAYOUTS.c.id == payout_id) | (PAYOUTS.c.stripe_payout_id == payout_id)
        ),
    )


def list_payouts(
    session: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[PayoutRecord]:
    """Payouts by Stripe's creation time, oldest first, in ``[since, until)``."""
    statement = select_rows(PAYOUTS)
    if since is not None:
        statement = statement.where(PAYOUTS.c.provider_created_at >= since)
    if until is not None:
        statement = statement.where(PAYOUTS.c.provider_created_at < until)
    return fetch_all(
        session,
        PayoutRecord,
        statement.order_by(PAYOUTS.c.provider_created_at, PAYOUTS.c.id).limit(limit),
    )


def _payout_created() -> ColumnElement[datetime]:
    # A payout is always created at Stripe with a time; a row without one (never seen) sorts
    # by when we recorded it, so the order has no NULLs (SQLite and PostgreSQL sort those
    # differently, which would break a keyset).
    return func.coalesce(PAYOUTS.c.provider_created_at, PAYOUTS.c.recorded_at)


def payout_created_at(payout: PayoutRecord) -> datetime:
    """The instant ``page_payouts`` orders ``payout`` by (UTC)."""
    return payout.provider_created_at or payout.recorded_at


def page_payouts(
    session: Session, *, limit: int, before: tuple[datetime, str] | None = None
) -> list[PayoutRecord]:
    """Payouts newest first by (Stripe's creation time, id), the page after ``before`` (the
    last payout of the previous page): a keyset, so a payout imported meanwhile neither
    repeats nor hides a row."""
    created = _payout_created()
    statement = select_rows(PAYOUTS)
    if before is not None:
        at, last_id = before
        statement = statement.where(or_(created < at, and_(created == at, PAYOUTS.c.id < last_id)))
    return fetch_all(
        session,
        PayoutRecord,
        statement.order_by(created.desc(), PAYOUTS.c.id.desc()).limit(limit),
    )


def record_payout(session: Session, payout: ProviderPayout, *, at: datetime) -> PayoutRecord:
    """Insert the payout once, then keep its status as Stripe last reported it."""
    record = PayoutRecord(
        id=new_id("pout"),
        stripe_payout_id=payout.payout_id,
        amount_minor=payout.amount_minor,
        currency=payout.currency.upper(),
        status=payout.status.value,
        automatic=payout.automatic,
        recorded_at=at,
        updated_at=at,
        balance_transaction_id=payout.balance_transaction_id,
        arrival_date=payout.arrival_date,
        provider_created_at=payout.created,
        failure_code=payout.failure_code,
    )
    stored, inserted = insert_or_get(
        session, PAYOUTS, record, lambda: get_payout(session, payout.payout_id)
    )
    if inserted or stored.status == payout.status.value:
        return stored
    final = {PayoutStatus.PAID.value, PayoutStatus.FAILED.value, PayoutStatus.CANCELED.value}
    if stored.status in final and payout.status.value not in final:
        return stored  # a stale read never takes a payout back
    row = (
        session.execute(
            update(PAYOUTS)
            .where(PAYOUTS.c.id == stored.id)
            .values(status=payout.status.value, failure_code=payout.failure_code, updated_at=at)
            .returning(*PAYOUTS.c)
        )
        .mappings()
        .one()
    )
    return PayoutRecord(**row)


def record_payout_items(
    session: Session, payout: PayoutRecord, balance_transaction_ids: Iterable[str], *, at: datetime
) -> int:
    """What the payout paid out (each once); marks it imported. Returns how many were new."""
    known = set(
        session.execute(
            select(PAYOUT_ITEMS.c.balance_transaction_id).where(
                PAYOUT_ITEMS.c.payout_id == payout.id
            )
        ).scalars()
    )
    new = [txn_id for txn_id in dict.fromkeys(balance_transaction_ids) if txn_id not in known]
    for txn_id in new:
        session.execute(
            PAYOUT_ITEMS.insert().values(payout_id=payout.id, balance_transaction_id=txn_id)
        )
    session.execute(update(PAYOUTS).where(PAYOUTS.c.id == payout.id).values(imported_at=at))
    return len(new)


def payout_entries(session: Session, payout: PayoutRecord) -> list[LedgerEntryRecord]:
    return fetch_all(
        session,
        LedgerEntryRecord,
        select_rows(LEDGER_ENTRIES)
        .join(
            PAYOUT_ITEMS,
            PAYOUT_ITEMS.c.balance_transaction_id == LEDGER_ENTRIES.c.balance_transaction_id,
        )
        .where(PAYOUT_ITEMS.c.payout_id == payout.id)
        .order_by(LEDGER_ENTRIES.c.provider_created_at, LEDGER_ENTRIES.c.id),
    )


def expected_for(session: Session, source_ids: Iterable[str]) -> dict[str, Expected]:
    """What our records expect of the transactions with these sources (see
    ``billing.ledger.reconcile_payout``)."""
    ids = list(dict.fromkeys(source_ids))
    found: dict[str, Expected] = {}
    if not ids:
        return found
    for row in session.execute(
        select_rows(PAYMENTS).where(PAYMENTS.c.stripe_charge_id.in_(ids))
    ).mappings():
        payment = PaymentRecord(**row)
        assert payment.stripe_charge_id is not None
        found[payment.stripe_charge_id] = Expected(
            ours=payment.id,
            amount_minor=payment.settlement_amount_minor
            if payment.settlement_amount_minor is not None
            else payment.amount_minor,
            currency=payment.settlement_currency or payment.currency,
            fee_minor=payment.fee_minor,
        )
    for row in session.execute(
        select_rows(REFUNDS).where(REFUNDS.c.stripe_refund_id.in_(ids))
    ).mappings():
        refund = RefundRecord(**row)
        assert refund.stripe_refund_id is not None
        found[refund.stripe_refund_id] = Expected(
            ours=refund.id, amount_minor=-refund.amount_minor, currency=refund.currency, fee_minor=0
        )
    for row in session.execute(
        select_rows(DISPUTES).where(DISPUTES.c.stripe_dispute_id.in_(ids))
    ).mappings():
        dispute = DisputeRecord(**row)
        found[dispute.stripe_dispute_id] = Expected(
            ours=dispute.id, amount_minor=-dispute.amount_minor, currency=dispute.currency
        )
        if dispute.status == DisputeStatus.WON:
            found[f"{dispute.stripe_dispute_id}#reversal"] = Expected(
                ours=dispute.id, amount_minor=dispute.amount_minor, currency=dispute.currency
            )
    return found


def unpaid_out(
    session: Session, *, settled_from: datetime | None, settled_before: datetime
) -> list[tuple[str, str, str | None, int, str]]:
    """Our money movements in ``[settled_from, settled_before)`` that no payout paid out:
    ``(kind, our id, balance transaction id, amount, currency)``, payments then refunds."""
    in_payout = select(PAYOUT_ITEMS.c.balance_transaction_id)
    payments = select(
        PAYMENTS.c.id,
        PAYMENTS.c.balance_transaction_id,
        PAYMENTS.c.amount_minor,
        PAYMENTS.c.currency,
    ).where(
        PAYMENTS.c.settled_at < settled_before,
        (PAYMENTS.c.balance_transaction_id.is_(None))
        | PAYMENTS.c.balance_transaction_id.not_in(in_payout),
    )
    if settled_from is not None:
        payments = payments.where(PAYMENTS.c.settled_at >= settled_from)
    refunds = select(
        REFUNDS.c.id, REFUNDS.c.balance_transaction_id, REFUNDS.c.amount_minor, REFUNDS.c.currency
    ).where(
        REFUNDS.c.status == RefundStatus.SUCCEEDED.value,
        REFUNDS.c.completed_at < settled_before,
        and_(
            REFUNDS.c.balance_transaction_id.is_not(None),
            REFUNDS.c.balance_transaction_id.not_in(in_payout),
        ),
    )
    if settled_from is not None:
        refunds = refunds.where(REFUNDS.c.completed_at >= settled_from)
    found: list[tuple[str, str, str | None, int, str]] = [
        ("payment", *row) for row in session.execute(payments.order_by(PAYMENTS.c.settled_at))
    ]
    found.extend(
        ("refund", ref_id, txn, -amount, currency)
        for ref_id, txn, amount, currency in session.execute(
            refunds.order_by(REFUNDS.c.completed_at)
        )
    )
    return found


# ---- charge reconciliation findings ------------------------------------------------------------


def record_finding(
    session: Session, finding: ReconciliationFindingRecord
) -> tuple[ReconciliationFindingRecord, bool]:
    """Once per (kind, subject): a later run that finds it again records nothing."""

    def existing() -> ReconciliationFindingRecord | None:
        return fetch_one(
            session,
            ReconciliationFindingRecord,
            select_rows(RECONCILIATION_FINDINGS).where(
                RECONCILIATION_FINDINGS.c.kind == finding.kind,
                RECONCILIATION_FINDINGS.c.subject_key == finding.subject_key,
            ),
        )

    found = existing()
    if found is not None:
        return found, False
    return insert_or_get(session, RECONCILIATION_FINDINGS, finding, existing)


def list_findings(
    session: Session,
    *,
    since: datetime | None = None,
    severity: str | None = None,
    status: FindingStatus | None = None,
    limit: int = 200,
) -> list[ReconciliationFindingRecord]:
    """Findings oldest first; ``status``: only open (not resolved) or only resolved ones."""
    statement = select_rows(RECONCILIATION_FINDINGS)
    if since is not None:
        statement = statement.where(RECONCILIATION_FINDINGS.c.found_at >= since)
    if severity is not None:
        statement = statement.where(RECONCILIATION_FINDINGS.c.severity == severity)
    if status == FindingStatus.OPEN:
        statement = statement.where(RECONCILIATION_FINDINGS.c.resolved_at.is_(None))
    elif status == FindingStatus.RESOLVED:
        statement = statement.where(RECONCILIATION_FINDINGS.c.resolved_at.is_not(None))
    return fetch_all(
        session,
        ReconciliationFindingRecord,
        statement.order_by(RECONCILIATION_FINDINGS.c.found_at, RECONCILIATION_FINDINGS.c.id).limit(
            limit
        ),
    )


def count_findings_by_severity(session: Session) -> dict[str, int]:
    """Open (unresolved) findings per severity: what still needs finance (the gauge)."""
    rows = session.execute(
        select(RECONCILIATION_FINDINGS.c.severity, func.count())
        .where(RECONCILIATION_FINDINGS.c.resolved_at.is_(None))
        .group_by(RECONCILIATION_FINDINGS.c.severity)
    ).all()
    return {severity: int(count) for severity, count in rows}


def get_finding(session: Session, finding_id: str) -> ReconciliationFindingRecord | None:
    return fetch_one(
        session,
        ReconciliationFindingRecord,
        select_rows(RECONCILIATION_FINDINGS).where(RECONCILIATION_FINDINGS.c.id == finding_id),
    )


def resolve_finding(
    session: Session, finding_id: str, *, by: str, note: str, at: datetime
) -> tuple[ReconciliationFindingRecord, bool]:
    """Mark the finding resolved by ``by`` at ``at`` (UTC) with ``note``: ``(finding, True)``.
    Set once, by compare-and-set on "not resolved", so of racing resolutions one wins. The
    same resolution again (same person and note) answers the finding and False; another one
    of a resolved finding is ChangeRefused naming who resolved it and when. ``note`` and
    ``by`` are checked at the edge (``billing.text``)."""
    moved = (
        session.execute(
            update(RECONCILIATION_FINDINGS)
            .where(
                RECONCILIATION_FINDINGS.c.id == finding_id,
                RECONCILIATION_FINDINGS.c.resolved_at.is_(None),
            )
            .values(resolved_at=at, resolved_by=by, resolution_note=note)
            .returning(*RECONCILIATION_FINDINGS.c)
        )
        .mappings()
        .first()
    )
    if moved is not None:
        return ReconciliationFindingRecord(**moved), True
    current = get_finding(session, finding_id)
    if current is None:
        raise NotFound(f"reconciliation finding {finding_id!r} not found", field="id")
    if (current.resolved_by, current.resolution_note) == (by, note):
        return current, False
    assert current.resolved_at is not None
    raise ChangeRefused(
        f"finding {finding_id} was resolved by {current.resolved_by} at "
        f"{current.resolved_at.isoformat()}; a resolution is recorded once"
    )


def our_side(session: Session, charge: ProviderCharge) -> OurSide:
    """What our records hold for a provider charge (by its PaymentIntent: the invoice's, or an
    attempt's), and whether its customer is ours."""
    customer_is_ours = (
        charge.customer_id is not None
        and session.execute(
            select(CUSTOMERS.c.id).where(CUSTOMERS.c.stripe_customer_id == charge.customer_id)
        ).first()
        is not None
    )
    invoice = None
    if charge.payment_intent_id is not None:
        invoice = session.execute(
            select(INVOICES.c.id, INVOICES.c.amount_due_minor, INVOICES.c.currency).where(
                INVOICES.c.stripe_payment_intent_id == charge.payment_intent_id
            )
        ).first()
        if invoice is None:
            invoice = session.execute(
                select(INVOICES.c.id, INVOICES.c.amount_due_minor, INVOICES.c.currency)
                .join(PAYMENT_ATTEMPTS, PAYMENT_ATTEMPTS.c.invoice_id == INVOICES.c.id)
                .where(PAYMENT_ATTEMPTS.c.stripe_payment_intent_id == charge.payment_intent_id)
            ).first()
    if invoice is None and charge.invoice_id is not None and customer_is_ours:
        # An intent our records never learnt (its create's answer was lost), naming one of our
        # invoices, for one of our customers.
        invoice = session.execute(
            select(INVOICES.c.id, INVOICES.c.amount_due_minor, INVOICES.c.currency).where(
                INVOICES.c.id == charge.invoice_id
            )
        ).first()
    if invoice is None:
        return OurSide(invoice_id=None, customer_is_ours=customer_is_ours)
    invoice_id, amount, currency = invoice
    payment = session.execute(
        select(PAYMENTS.c.stripe_payment_intent_id, PAYMENTS.c.stripe_charge_id).where(
            PAYMENTS.c.invoice_id == invoice_id
        )
    ).first()
    succeeded = (
        session.execute(
            select(PAYMENT_ATTEMPTS.c.id).where(
                PAYMENT_ATTEMPTS.c.invoice_id == invoice_id,
                PAYMENT_ATTEMPTS.c.stripe_payment_intent_id == charge.payment_intent_id,
                PAYMENT_ATTEMPTS.c.status == "succeeded",
            )
        ).first()
        is not None
    )
    # A paid invoice's amount due is what was charged (credit notes lower a paid invoice's
    # total, never its amount paid).
    return OurSide(
        invoice_id=invoice_id,
        invoice_amount_minor=amount,
        invoice_currency=currency,
        paid_by_intent=payment[0] if payment is not None else None,
        paid_by_charge=(payment[1] or payment[0]) if payment is not None else None,
        attempt_succeeded=succeeded,
        customer_is_ours=customer_is_ours,
    )


def unknown_outcomes(session: Session, *, older_than: datetime) -> list[ChargeFinding]:
    """Our charge attempts still without an outcome, recorded before ``older_than``."""
    rows = session.execute(
        select(
            PAYMENT_ATTEMPTS.c.idempotency_key,
            PAYMENT_ATTEMPTS.c.invoice_id,
            PAYMENT_ATTEMPTS.c.stripe_payment_intent_id,
            PAYMENT_ATTEMPTS.c.amount_minor,
            PAYMENT_ATTEMPTS.c.currency,
            PAYMENT_ATTEMPTS.c.created_at,
        ).where(PAYMENT_ATTEMPTS.c.status == "pending", PAYMENT_ATTEMPTS.c.created_at < older_than)
    ).all()
    return [
        ChargeFinding(
            ChargeFindingKind.UNKNOWN_OUTCOME,
            key,
            f"attempt {key} of invoice {invoice_id}, recorded {created_at.isoformat()}, still "
            "has no outcome",
            invoice_id,
            intent,
            None,
            amount,
            currency,
        )
        for key, invoice_id, intent, amount, currency, created_at in rows
    ]


@dataclass(frozen=True, slots=True)
class ClosedInvoiceIntent:
    """The PaymentIntent of an invoice no charge of ours may confirm any more."""

    invoice_id: str
    number: str
    status: str
    payment_intent_id: str
    amount_due_minor: int
    currency: str


def closed_invoice_intents(
    session: Session, *, closed_since: datetime, closed_before: datetime
) -> list[ClosedInvoiceIntent]:
    """Intents of invoices closed in ``[closed_since, closed_before)`` (UTC) that no payment
    of ours used:
    void, written off, or paid without a charge (a credit note, an amount too small to
    charge). Each should be canceled at the provider; the daily reconciliation checks it."""
    closed_at = func.coalesce(INVOICES.c.voided_at, INVOICES.c.marked_uncollectible_at)
    rows = session.execute(
        select(
            INVOICES.c.id,
            INVOICES.c.number,
            INVOICES.c.status,
            INVOICES.c.stripe_payment_intent_id,
            INVOICES.c.amount_due_minor,
            INVOICES.c.currency,
        )
        .outerjoin(PAYMENTS, PAYMENTS.c.invoice_id == INVOICES.c.id)
        .where(
            INVOICES.c.stripe_payment_intent_id.is_not(None),
            PAYMENTS.c.id.is_(None),
            or_(
                and_(
                    INVOICES.c.status.in_(
                        [InvoiceStatus.VOID.value, InvoiceStatus.UNCOLLECTIBLE.value]
                    ),
                    closed_at >= closed_since,
                    closed_at < closed_before,
                ),
                and_(
                    INVOICES.c.status == InvoiceStatus.PAID.value,
                    INVOICES.c.paid_at >= closed_since,
                    INVOICES.c.paid_at < closed_before,
                ),
            ),
        )
        .order_by(INVOICES.c.id)
    ).all()
    return [
        ClosedInvoiceIntent(invoice_id, number, str(status), intent, amount, currency)
        for invoice_id, number, status, intent, amount, currency in rows
    ]


def _as_transaction(entry: LedgerEntryRecord) -> ProviderBalanceTransaction:
    return ProviderBalanceTransaction(
        transaction_id=entry.balance_transaction_id,
        type=entry.type,
        reporting_category=entry.reporting_category,
        amount_minor=entry.amount_minor,
        fee_minor=entry.fee_minor,
        net_minor=entry.net_minor,
        currency=entry.currency,
        source_id=entry.source_id,
        exchange_rate=entry.exchange_rate,
        created=entry.provider_created_at,
        available_on=entry.available_on,
        description=entry.description,
    )


def payout_reconciliation(session: Session, payout: PayoutRecord) -> PayoutReconciliation:
    """The payout's transactions (as imported) matched to our records."""
    entries = payout_entries(session, payout)
    expected = expected_for(session, [e.source_id for e in entries if e.source_id])
    return reconcile_payout(
        ProviderPayout(
            payout_id=payout.stripe_payout_id,
            amount_minor=payout.amount_minor,
            currency=payout.currency,
            status=PayoutStatus(payout.status),
            automatic=payout.automatic,
            balance_transaction_id=payout.balance_transaction_id,
            arrival_date=payout.arrival_date,
            created=payout.provider_created_at,
        ),
        [_as_transaction(e) for e in entries],
        expected,
    )


def period_reconciliation(
    session: Session,
    *,
    since: datetime | None,
    until: datetime,
    now: datetime,
    expected_delay: timedelta,
) -> PeriodReconciliation:
    """Payouts created in ``[since, until)``, and what of ours settled in the period is in no
    payout although ``expected_delay`` has passed (as of ``now``)."""
    payouts = list_payouts(session, since=since, until=until, limit=100_000)
    reports = [payout_reconciliation(session, payout) for payout in payouts]
    cutoff = min(until, now - expected_delay)
    missing = [
        Finding(
            FindingKind.MISSING_FROM_PAYOUTS,
            f"{kind} {ours} ({amount} {currency}"
            + (f", balance transaction {txn}" if txn else ", no balance transaction recorded")
            + f") settled before {cutoff.isoformat()} and is in no payout",
            txn,
            None,
            ours,
        )
        for kind, ours, txn, amount, currency in unpaid_out(
            session, settled_from=since, settled_before=cutoff
        )
    ]
    return PeriodReconciliation(since=since, until=until, payouts=reports, missing=missing)
