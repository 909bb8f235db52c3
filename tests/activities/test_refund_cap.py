# The `stack` fixture is imported from the charge tests, and so is redefined by every use.
# ruff: noqa: F811
"""The refund cap on its own, to the cent: refunds of a payment never exceed what was captured
minus what was refunded (ours and Stripe's dashboard's). Credit notes that refund what credits
allow but one cent more than the payment still holds are refused naming the field, write
nothing and send Stripe nothing; the exact rest is refunded, once. (When every refund is a
credit note's, the invoice's credit cap is reached first; a dashboard refund makes the refund
cap the tighter one.)"""

from __future__ import annotations

import pytest

from billing.credit_notes import RefundStatus
from billing.errors import InvalidInput
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import payments as payments_repo
from tests.activities.test_billing_activities import AMOUNT_MINOR, NOW, Stack, stack  # noqa: F401
from tests.activities.test_refunds import (
    REFUNDS_PATH,
    activities,
    counts,
    execute,
    issue,
    paid_invoice,
    provider_refunds,
    refunds_succeed_at_once,  # noqa: F401  (an autouse fixture)
)
from tests.conftest import BOTH_BACKENDS


@BOTH_BACKENDS
def test_one_cent_over_the_refund_cap_is_refused_writing_and_sending_nothing(
    stack: Stack,
) -> None:
    paid = paid_invoice(stack)
    acts = activities(stack)
    first = issue(stack, paid.invoice_id, refund_amount_minor=1000)
    execute(acts, first.refunds[0].id)
    # A refund made in Stripe's dashboard, learnt from Stripe (its webhook or a read).
    dashboard = stack.stripe.v1.refunds.create(params={"charge": paid.charge_id, "amount": 600})
    with unit_of_work(stack.session_factory) as session:
        payment = payments_repo.get_payment_for_invoice(session, paid.invoice_id)
        assert payment is not None
        credit_notes_repo.record_provider_refund(
            session, payment, stack.gateway.retrieve_refund(refund_id=dashboard.id), at=NOW
        )
    left = AMOUNT_MINOR - 1000 - 600
    before = counts(stack, paid)
    stack.http.clear()

    with pytest.raises(InvalidInput) as refused:
        issue(stack, paid.invoice_id, refund_amount_minor=left + 1)
    assert refused.value.field == "refund_amount_minor"
    assert f"at most {left}" in refused.value.message
    assert counts(stack, paid) == before
    assert [r for r in stack.http.requests_to(REFUNDS_PATH) if r.method == "POST"] == []

    last = issue(stack, paid.invoice_id, refund_amount_minor=left)
    assert execute(acts, last.refunds[0].id).status == RefundStatus.SUCCEEDED
    assert sorted(r.amount for r in provider_refunds(stack, paid.charge_id)) == sorted(
        [1000, 600, left]
    )
    assert sum(r.amount for r in provider_refunds(stack, paid.charge_id)) == AMOUNT_MINOR
    with pytest.raises(InvalidInput):
        issue(stack, paid.invoice_id, refund_amount_minor=1)
