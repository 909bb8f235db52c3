# The `stack` fixture is imported from the charge tests, and so is redefined by every use.
# ruff: noqa: F811
"""The ledger and payout reconciliation: charges and refunds made through the real activities
on localstripe, with the settlement double playing Stripe's fees (2.9% + 30), automatic payouts
batching the available balance, and the ``payout`` filter of balance transactions; payouts
imported by ``import_payout`` and reconciled from the database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from activities.ledger import LedgerActivities
from activities.settlement import SettlementActivities
from billing.credit_notes import CreditNoteRequest
from billing.ledger import FindingKind, Severity
from billing.settlement import ExecuteRefundInput, ImportPayoutInput, SyncLedgerInput
from billing.testing.localstripe_settlement import stripe_fee
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import ledger as ledger_repo
from db.repositories import payments as payments_repo
from tests.activities.test_billing_activities import (  # noqa: F401  (the stack fixture)
    AMOUNT_MINOR,
    NOW,
    Stack,
    charge,
    open_invoice,
    seed_subscription,
    stack,
)
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)


@pytest.fixture(autouse=True)
def fresh_account(stack: Stack) -> None:
    """These tests read the whole account (every charge, every available transaction): start
    from an empty localstripe, whatever earlier tests of the session left there."""
    stack.localstripe.flush()


def double(stack: Stack, path: str, form: dict[str, str] | None = None) -> Any:
    answer = httpx.post(f"{stack.localstripe.url}{path}", data=form or {}, timeout=10)
    answer.raise_for_status()
    return answer.json()


def run_payouts(stack: Stack) -> list[str]:
    return [p["id"] for p in double(stack, "/_config/settlement/payouts/run")["data"]]


def ledger(stack: Stack) -> LedgerActivities:
    return LedgerActivities(stack.session_factory, stack.gateway, stack.clock)


def paid_invoice(stack: Stack, period_index: int = 0) -> tuple[str, str]:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded, period_index=period_index)
    result = charge(stack, invoice.invoice_id, 1)
    assert result.payment_id is not None and result.charge_id is not None
    return invoice.invoice_id, result.charge_id


def report(stack: Stack, *, delay: timedelta = 7 * DAY) -> Any:
    with unit_of_work(stack.session_factory) as session:
        return ledger_repo.period_reconciliation(
            session,
            since=None,
            until=datetime(2100, 1, 1, tzinfo=UTC),
            now=stack.clock.now(),
            expected_delay=delay,
        )


@BOTH_BACKENDS
def test_a_month_of_daily_payouts_reconciles_with_no_difference(stack: Stack) -> None:
    acts = ledger(stack)
    refunds = SettlementActivities(stack.session_factory, stack.gateway, stack.clock)
    payouts = []
    for day in range(30):
        invoice_id, _ = paid_invoice(stack)
        if day % 7 == 3:
            # A partial refund now and then: a refund's transaction is paid out too.
            with unit_of_work(stack.session_factory) as session:
                issued = credit_notes_repo.issue_credit_note(
                    session, invoice_id, CreditNoteRequest(refund_amount_minor=500), at=NOW
                )
            refunds.execute_refund(ExecuteRefundInput(issued.refunds[0].id))
        [payout] = run_payouts(stack)
        imported = acts.import_payout(ImportPayoutInput(payout))
        payouts.append(payout)
        again = acts.import_payout(ImportPayoutInput(payout))  # twice: nothing new
        assert again.new_ledger_entries == 0 and again.transactions == imported.transactions
    stack.clock.at = NOW + 31 * DAY

    period = report(stack)

    assert [r.payout_id for r in period.payouts] == payouts
    assert period.findings == []
    charged = 30 * AMOUNT_MINOR
    refunded = sum(500 for day in range(30) if day % 7 == 3)
    fees = 30 * stripe_fee(AMOUNT_MINOR)
    [(currency, totals)] = period.totals().items()
    assert currency == "USD"
    assert totals == {
        "gross_minor": charged - refunded,
        "fee_minor": fees,
        "net_minor": charged - refunded - fees,
        "paid_out_minor": charged - refunded - fees,
    }
    assert sum(len(r.matched) for r in period.payouts) == 30 + 4


@BOTH_BACKENDS
def test_a_foreign_transaction_a_missing_payment_and_a_fee_mismatch_are_each_found(
    stack: Stack,
) -> None:
    acts = ledger(stack)
    # A fee that is not what we recorded: Stripe changed it after our settlement read.
    _, charge_id = paid_invoice(stack)
    [txn] = [
        t
        for t in stack.stripe.v1.balance_transactions.list(params={"limit": 100}).data
        if t.source == charge_id
    ]
    double(stack, f"/_config/settlement/balance_transactions/{txn.id}", {"fee": "150"})
    # A charge of another integration on the same account.
    foreign = double(
        stack, "/_config/settlement/balance_transactions", {"amount": "5000", "currency": "usd"}
    )
    [payout] = run_payouts(stack)
    acts.import_payout(ImportPayoutInput(payout))
    # A payment of ours made after the payout: in no payout once the expected delay passed.
    late_invoice, _ = paid_invoice(stack, period_index=1)
    stack.clock.at = NOW + 10 * DAY

    period = report(stack)

    kinds = {(f.kind, f.transaction_id or f.ours) for f in period.findings}
    with unit_of_work(stack.session_factory) as session:
        late_payment = payments_repo.get_payment_for_invoice(session, late_invoice)
    assert late_payment is not None
    assert kinds == {
        (FindingKind.FEE_MISMATCH, txn.id),
        (FindingKind.UNKNOWN_AT_STRIPE, foreign["id"]),
        (FindingKind.MISSING_FROM_PAYOUTS, late_payment.balance_transaction_id),
    }
    severities = {f.kind: f.severity for f in period.findings}
    assert severities[FindingKind.UNKNOWN_AT_STRIPE] == Severity.ERROR
    assert severities[FindingKind.FEE_MISMATCH] == Severity.WARNING
    [fee] = [f for f in period.findings if f.kind == FindingKind.FEE_MISMATCH]
    assert "fee of 150 USD" in fee.detail and f"recorded {stripe_fee(AMOUNT_MINOR)}" in fee.detail
    # Before the expected delay, the late payment is not yet missing.
    stack.clock.at = NOW
    assert FindingKind.MISSING_FROM_PAYOUTS not in {f.kind for f in report(stack).findings}


def test_the_periodic_sync_imports_what_no_webhook_brought_once(stack: Stack) -> None:
    paid_invoice(stack)
    [payout] = run_payouts(stack)
    acts = ledger(stack)
    stack.clock.at = datetime.now(UTC)  # localstripe stamps its objects with the real time
    first = acts.sync_ledger(SyncLedgerInput(days=1))
    second = acts.sync_ledger(SyncLedgerInput(days=1))

    assert first.payouts == 1 and first.new_ledger_entries == 2  # the charge and the payout
    assert second.new_ledger_entries == 0
    with unit_of_work(stack.session_factory) as session:
        stored = ledger_repo.get_payout(session, payout)
        assert stored is not None and stored.status == "paid" and stored.automatic
        assert ledger_repo.payout_reconciliation(session, stored).findings == []
