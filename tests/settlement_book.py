"""Settlement on top of the finance book (tests/finance_book.py), written through the real
repositories: a credit note with its refund and a refund made at Stripe on in_2, the ledger's
balance transactions, five payouts (one imported, with a fee mismatch and a charge that is
none of ours), and three charge reconciliation findings. The figures the pages must show are
worked out by hand below. Used by the dashboard's browser tests.

All in 2026, UTC. The dashboard's "now" is the finance book's NOW (2026-04-30T12:00Z).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import insert, update
from sqlalchemy.orm import Session, sessionmaker

from billing.credit_notes import CreditNoteReason, CreditNoteRequest, RefundStatus
from billing.ledger import PayoutStatus, ProviderBalanceTransaction, ProviderPayout
from billing.records import ReconciliationFindingRecord
from billing.refunds import ProviderRefund
from db.engine import unit_of_work
from db.models import INVOICE_LINES, INVOICES, PAYMENTS
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import ledger as ledger_repo
from db.repositories import payments as payments_repo
from tests import finance_book as book
from tests.finance_book import at

#: Payout po_book_5 (created Mar 20, nothing imported yet): its reconciliation says its
#: transactions net 0, not USD 10.00; and re_dash_1 (completed Mar 2, before Mar 20 less the
#: 7 days' delay) is in no payout.
#: in_2 (USD 10.00, paid by py_in_2 / ch_in_2): a credit note of USD 4.00 for a duplicate,
#: USD 3.00 back to the card, USD 1.00 to the balance; its refund succeeded (re_cn_1).
CREDIT_NOTE = {"amount": 400, "refund": 300, "credit": 100}
#: And USD 1.50 refunded at Stripe's dashboard (re_dash_1), never paid out: "missing here".
PROVIDER_REFUND = 150

#: Payout po_book_1 (created Feb 20), what it paid out, by hand:
#:   ch_in_1   charge   1000 fee 59  net  941  (py_in_1 recorded fee 59: matched)
#:   ch_in_2   charge   1000 fee 60  net  940  (py_in_2 recorded fee 59: fee mismatch)
#:   re_cn_1   refund   -300 fee  0  net -300  (our credit note's refund: matched)
#:   ch_alien  charge    500 fee 30  net  470  (none of ours: unknown at Stripe)
#:   gross 2200, fees 149, net 2051 = the payout's amount (no total mismatch).
PAYOUT = {"id": "po_book_1", "amount": 2051, "gross": 2200, "fee": 149, "net": 2051}
MATCHED = 2
#: Four more payouts with nothing imported, for keyset pages (newest first: po_book_5 ..).
OTHER_PAYOUTS = [("po_book_2", 700), ("po_book_3", 800), ("po_book_4", 900), ("po_book_5", 1000)]

#: Findings of the daily charge reconciliation: (kind, severity, invoice, amount).
FINDINGS = [
    ("double_charge", "error", "in_2", 1000),
    ("unknown_outcome", "warning", "in_4", 12000),
    ("foreign_charge", "info", None, 500),
]


def _txn(
    txn_id: str, kind: str, amount: int, fee: int, source: str | None, day: int
) -> ProviderBalanceTransaction:
    return ProviderBalanceTransaction(
        transaction_id=txn_id,
        type=kind,
        reporting_category=kind,
        amount_minor=amount,
        fee_minor=fee,
        net_minor=amount - fee,
        currency="usd",
        source_id=source,
        created=at(2, day),
        available_on=at(2, day) + timedelta(days=2),
    )


#: in_2's own line, as invoice_lines holds it (its description is not the invoice's).
IN_2_LINE = "Book plan, 10 Feb to 10 Mar"


def write_settlement(session_factory: sessionmaker[Session]) -> None:
    """The finance book, then the settlement rows above."""
    book.write_book(session_factory)
    with unit_of_work(session_factory) as session:
        # What the payment activity records once Stripe reports the charge's transaction.
        for invoice_id in ("in_1", "in_2"):
            session.execute(
                update(PAYMENTS)
                .where(PAYMENTS.c.invoice_id == invoice_id)
                .values(balance_transaction_id=f"txn_ch_{invoice_id}")
            )
        # As migration 0010 did for invoices written before subtotals: subtotal = amount due.
        session.execute(update(INVOICES).where(INVOICES.c.id == "in_2").values(subtotal_minor=1000))
        session.execute(
            insert(INVOICE_LINES).values(
                id="il_in_2_1",
                invoice_id="in_2",
                position=1,
                kind="subscription",
                description=IN_2_LINE,
                amount_minor=1000,
                currency="USD",
                period_start=at(2, 10),
                period_end=at(3, 10),
                plan_code="book-plan",
                quantity=1,
                unit_amount_minor=1000,
                created_at=at(2, 10),
            )
        )
        _credit_note_and_refunds(session)
        _ledger_and_payouts(session)
        for n, (kind, severity, invoice_id, amount) in enumerate(FINDINGS, start=1):
            ledger_repo.record_finding(
                session,
                ReconciliationFindingRecord(
                    id=f"rf_book_{n}",
                    kind=kind,
                    severity=severity,
                    subject_key=f"book-{n}",
                    detail=f"{kind.replace('_', ' ')} found by hand ({n})",
                    found_at=at(3, n),
                    run_id="run_book",
                    invoice_id=invoice_id,
                    charge_id=f"ch_finding_{n}",
                    amount_minor=amount,
                    currency="USD",
                ),
            )


def _credit_note_and_refunds(session: Session) -> None:
    issued = credit_notes_repo.issue_credit_note(
        session,
        "in_2",
        CreditNoteRequest(
            refund_amount_minor=CREDIT_NOTE["refund"],
            credit_amount_minor=CREDIT_NOTE["credit"],
            reason=CreditNoteReason.DUPLICATE,
            memo="Charged twice in February",
        ),
        at=at(2, 16),
    )
    [refund] = issued.refunds
    credit_notes_repo.record_refund_outcome(
        session,
        refund.id,
        ProviderRefund(
            refund_id="re_cn_1",
            charge_id="ch_in_2",
            payment_intent_id="pi_in_2",
            amount_minor=CREDIT_NOTE["refund"],
            currency="USD",
            status=RefundStatus.SUCCEEDED,
            balance_transaction_id="txn_re_cn_1",
        ),
        at=at(2, 16, 0, 1),
    )
    payment = payments_repo.get_payment_for_invoice(session, "in_2")
    assert payment is not None
    credit_notes_repo.record_provider_refund(
        session,
        payment,
        ProviderRefund(
            refund_id="re_dash_1",
            charge_id="ch_in_2",
            payment_intent_id="pi_in_2",
            amount_minor=PROVIDER_REFUND,
            currency="USD",
            status=RefundStatus.SUCCEEDED,
            reason="requested_by_customer",
            balance_transaction_id="txn_re_dash_1",
        ),
        at=at(3, 2),
    )


def _ledger_and_payouts(session: Session) -> None:
    paid_out = [
        _txn("txn_ch_in_1", "charge", 1000, 59, "ch_in_1", 10),
        _txn("txn_ch_in_2", "charge", 1000, 60, "ch_in_2", 14),
        _txn("txn_re_cn_1", "refund", -300, 0, "re_cn_1", 16),
        _txn("txn_ch_alien", "charge", 500, 30, "ch_alien", 17),
    ]
    later = [_txn("txn_re_dash_1", "refund", -PROVIDER_REFUND, 0, "re_dash_1", 27)]
    for txn in paid_out + later:
        ledger_repo.record_transaction(session, txn, at=book.NOW)
    payout = ledger_repo.record_payout(
        session,
        ProviderPayout(
            payout_id=PAYOUT["id"],
            amount_minor=PAYOUT["amount"],
            currency="usd",
            status=PayoutStatus.PAID,
            automatic=True,
            balance_transaction_id="txn_po_book_1",
            arrival_date=at(2, 22),
            created=at(2, 20),
        ),
        at=book.NOW,
    )
    payout_txn = _txn("txn_po_book_1", "payout", -PAYOUT["amount"], 0, PAYOUT["id"], 20)
    ledger_repo.record_transaction(session, payout_txn, at=book.NOW)
    ledger_repo.record_payout_items(
        session,
        payout,
        [t.transaction_id for t in paid_out] + [payout_txn.transaction_id],
        at=book.NOW,
    )
    for n, (payout_id, amount) in enumerate(OTHER_PAYOUTS, start=1):
        ledger_repo.record_payout(
            session,
            ProviderPayout(
                payout_id=payout_id,
                amount_minor=amount,
                currency="usd",
                status=PayoutStatus.IN_TRANSIT if n == len(OTHER_PAYOUTS) else PayoutStatus.PAID,
                automatic=True,
                balance_transaction_id=f"txn_{payout_id}",
                arrival_date=at(3, n * 5) + timedelta(days=2),
                created=at(3, n * 5),
            ),
            at=book.NOW,
        )
