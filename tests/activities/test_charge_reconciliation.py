# The `stack` fixture is imported from the charge tests, and so is redefined by every use.
# ruff: noqa: F811
"""The daily charge reconciliation (``reconcile_charges``): the provider's charges on
localstripe against our attempts and payments in a real database. Each kind of difference is
produced the way production would produce it, and a second run records nothing new."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from activities.billing import BillingActivities
from activities.ledger import LedgerActivities
from billing.charge_reconciliation import ChargeFindingKind
from billing.settlement import ReconcileChargesInput
from billing.testing import cards
from db.engine import unit_of_work
from db.repositories import ledger as ledger_repo
from tests.activities.test_billing_activities import (  # noqa: F401  (the stack fixture)
    AMOUNT_MINOR,
    Stack,
    charge,
    open_invoice,
    seed_subscription,
    stack,
)
from tests.conftest import BOTH_BACKENDS


class Killed(BaseException):
    pass


@pytest.fixture(autouse=True)
def fresh_account(stack: Stack) -> None:
    """These tests read the whole account (every charge, every available transaction): start
    from an empty localstripe, whatever earlier tests of the session left there."""
    stack.localstripe.flush()


def findings(stack: Stack) -> dict[str, set[str]]:
    with unit_of_work(stack.session_factory) as session:
        found = ledger_repo.list_findings(session)
    kinds: dict[str, set[str]] = {}
    for f in found:
        kinds.setdefault(f.kind, set()).add(f.subject_key)
    return kinds


@BOTH_BACKENDS
def test_late_success_double_charge_amount_mismatch_foreign_and_unknown_outcome_are_found_once(
    stack: Stack,
) -> None:
    # Stripe stamps its objects with the real time; the reconciliation looks back from now.
    stack.clock.at = datetime.now(UTC)
    # 1. A clean payment: nothing to report.
    seeded = seed_subscription(stack)
    clean = open_invoice(stack, seeded)
    assert charge(stack, clean.invoice_id, 1).payment_id is not None

    # 2. The worker died after Stripe charged and before our write: a late success, and an
    #    attempt of unknown outcome.
    def killed(key: str, redriven: bool) -> None:
        raise Killed(key)

    lost = open_invoice(stack, seeded, period_index=1)
    dying = BillingActivities(
        stack.session_factory, stack.gateway, stack.clock, after_charge_hook=killed
    )
    stack.activities, saved = dying, stack.activities
    with pytest.raises(Killed):
        charge(stack, lost.invoice_id, 1)
    stack.activities = saved

    # 3. Someone charged the paid invoice again by hand, for another amount.
    assert seeded.stripe_customer_id is not None and seeded.payment_method_id is not None
    again = stack.stripe.v1.payment_intents.create(
        params={
            "amount": AMOUNT_MINOR + 100,
            "currency": "usd",
            "customer": seeded.stripe_customer_id,
            "payment_method": seeded.payment_method_id,
            "confirm": True,
            "off_session": True,
            "metadata": {"invoice_id": clean.invoice_id},
        }
    )
    # 4. A charge of another integration, on a customer that is not ours.
    other = stack.gateway.ensure_customer(customer_id="someone-else", email=None, name=None)
    other_card = stack.gateway.attach_payment_method(
        provider_customer_id=other,
        payment_method_id=cards.create_card_payment_method(stack.stripe, cards.SUCCEEDS),
    ).payment_method_id
    foreign = stack.gateway.charge(
        provider_customer_id=other,
        payment_method_id=other_card,
        amount_minor=777,
        currency="USD",
        idempotency_key="not-ours-1",
        description="elsewhere",
        metadata={},
    )
    acts = LedgerActivities(stack.session_factory, stack.gateway, stack.clock)
    stack.clock.at = datetime.now(UTC) + timedelta(hours=2)  # the lost attempt is now overdue

    first = acts.reconcile_charges(ReconcileChargesInput(days=1, run_id="day-1"))

    found = findings(stack)
    assert set(found) == {
        ChargeFindingKind.LATE_SUCCESS.value,
        ChargeFindingKind.DOUBLE_CHARGE.value,
        ChargeFindingKind.AMOUNT_MISMATCH.value,
        ChargeFindingKind.FOREIGN_CHARGE.value,
        ChargeFindingKind.UNKNOWN_OUTCOME.value,
    }
    double_charge = (
        again.latest_charge if isinstance(again.latest_charge, str) else again.latest_charge.id
    )
    assert found[ChargeFindingKind.DOUBLE_CHARGE.value] == {double_charge}
    assert found[ChargeFindingKind.AMOUNT_MISMATCH.value] == {double_charge}
    assert found[ChargeFindingKind.FOREIGN_CHARGE.value] == {foreign.charge_id}
    assert found[ChargeFindingKind.UNKNOWN_OUTCOME.value] == {f"{lost.invoice_id}-attempt-1"}
    assert first.charges_checked == 4
    with unit_of_work(stack.session_factory) as session:
        by_severity = ledger_repo.count_findings_by_severity(session)
    assert by_severity == {"error": 3, "info": 1, "warning": 1}

    second = acts.reconcile_charges(ReconcileChargesInput(days=1, run_id="day-2"))
    assert second.new_findings == {} and findings(stack) == found
