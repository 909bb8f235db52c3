# The `stack` fixture is imported from the charge tests, and so is redefined by every use.
# ruff: noqa: F811
"""Credit note refunds, carried out by the ``execute_refund`` activity: a real database (SQLite,
and PostgreSQL where marked), the real Stripe SDK on localstripe (with the settlement double:
refund reasons, caps and events as Stripe documents them) and a frozen clock.

localstripe ignores ``Idempotency-Key``; at-most-once here does not depend on it: before any
send the activity reads the charge's refunds for the one carrying its key (metadata), so the
tests count the provider's own refunds, and check the key on the wire where Stripe would use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import stripe
from temporalio.exceptions import ApplicationError

from activities.settlement import SettlementActivities
from activities.stripe_gateway import IDEMPOTENCY_KEY_METADATA
from billing.credit_notes import (
    CreditNoteReason,
    CreditNoteRequest,
    RefundSource,
    RefundStatus,
    refund_idempotency_key,
)
from billing.errors import ChangeRefused, InvalidInput
from billing.payments import TransientPaymentError
from billing.records import RefundRecord
from billing.refunds import ProviderRefund
from billing.settlement import ExecuteRefundInput, ExecuteRefundResult
from billing.testing.settlement_double import move_refund, set_new_refund_status
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import credit_notes as credit_notes_repo
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

REFUNDS_PATH = "/v1/refunds"


@dataclass(frozen=True)
class Paid:
    invoice_id: str
    customer_id: str
    charge_id: str
    payment_id: str


def paid_invoice(stack: Stack) -> Paid:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    result = charge(stack, invoice.invoice_id, 1)
    assert result.payment_id is not None and result.charge_id is not None
    return Paid(invoice.invoice_id, seeded.customer_id, result.charge_id, result.payment_id)


@pytest.fixture(autouse=True)
def refunds_succeed_at_once(stack: Stack) -> Iterator[None]:
    yield
    set_new_refund_status(stack.localstripe.url, "succeeded")


def issue(stack: Stack, invoice_id: str, **request: Any) -> credit_notes_repo.IssuedCreditNote:
    with unit_of_work(stack.session_factory) as session:
        return credit_notes_repo.issue_credit_note(
            session, invoice_id, CreditNoteRequest(**request), at=NOW
        )


def activities(stack: Stack, **options: Any) -> SettlementActivities:
    return SettlementActivities(stack.session_factory, stack.gateway, stack.clock, **options)


def execute(acts: SettlementActivities, refund_id: str) -> ExecuteRefundResult:
    return acts.execute_refund(ExecuteRefundInput(refund_id=refund_id))


def provider_refunds(stack: Stack, charge_id: str) -> list[Any]:
    return list(stack.stripe.v1.refunds.list(params={"charge": charge_id, "limit": 100}).data)


def stored_refund(stack: Stack, refund_id: str) -> RefundRecord:
    with unit_of_work(stack.session_factory) as session:
        refund = credit_notes_repo.get_refund(session, refund_id)
    assert refund is not None
    return refund


def refund_posts(stack: Stack) -> list[str | None]:
    return [r.idempotency_key for r in stack.http.requests_to(REFUNDS_PATH) if r.method == "POST"]


def counts(stack: Stack, paid: Paid) -> tuple[int, int, int]:
    """(credit notes, refunds, balance entries) of the invoice's customer."""
    with unit_of_work(stack.session_factory) as session:
        notes = credit_notes_repo.list_credit_notes(session, customer_id=paid.customer_id)
        refunds = credit_notes_repo.list_refunds(session, payment_id=paid.payment_id)
        entries = balances_repo.list_entries(session, paid.customer_id)
    return len(notes), len(refunds), len(entries)


class Killed(BaseException):
    """Stands in for a SIGKILL of the worker: nothing after it runs."""


# -- the refund, once ------------------------------------------------------------------------


@BOTH_BACKENDS
def test_a_credit_note_refund_is_recorded_pending_then_made_once_with_its_key(
    stack: Stack,
) -> None:
    paid = paid_invoice(stack)
    issued = issue(
        stack,
        paid.invoice_id,
        reason=CreditNoteReason.PRODUCT_UNSATISFACTORY,
        refund_amount_minor=AMOUNT_MINOR,
    )
    [refund] = issued.refunds
    key = refund_idempotency_key(issued.credit_note.id, 1)
    assert (refund.status, refund.idempotency_key, refund.stripe_refund_id) == (
        RefundStatus.PENDING,
        key,
        None,
    )
    assert provider_refunds(stack, paid.charge_id) == []  # recorded before the provider hears

    result = execute(activities(stack), refund.id)

    [made] = provider_refunds(stack, paid.charge_id)
    assert (made.amount, made.currency, made.reason) == (
        AMOUNT_MINOR,
        "usd",
        "requested_by_customer",
    )
    assert made.metadata[IDEMPOTENCY_KEY_METADATA] == key
    assert (result.status, result.stripe_refund_id) == (RefundStatus.SUCCEEDED, made.id)
    stored = stored_refund(stack, refund.id)
    assert (stored.status, stored.stripe_refund_id, stored.completed_at) == (
        RefundStatus.SUCCEEDED,
        made.id,
        NOW,
    )
    assert stored.balance_transaction_id is not None
    assert refund_posts(stack) == [key]

    # Run again (Temporal's at-least-once): nothing is sent.
    assert execute(activities(stack), refund.id).status == RefundStatus.SUCCEEDED
    assert refund_posts(stack) == [key]
    assert len(provider_refunds(stack, paid.charge_id)) == 1


@BOTH_BACKENDS
def test_a_worker_killed_after_stripe_refunded_and_before_our_write_refunds_once(
    stack: Stack,
) -> None:
    paid = paid_invoice(stack)
    [refund] = issue(stack, paid.invoice_id, refund_amount_minor=1000).refunds

    def killed(key: str) -> None:
        raise Killed(key)

    with pytest.raises(Killed):
        execute(activities(stack, after_refund_hook=killed), refund.id)
    assert stored_refund(stack, refund.id).status == RefundStatus.PENDING
    assert len(provider_refunds(stack, paid.charge_id)) == 1

    result = execute(activities(stack), refund.id)

    [made] = provider_refunds(stack, paid.charge_id)
    assert (result.status, result.stripe_refund_id, made.amount) == (
        RefundStatus.SUCCEEDED,
        made.id,
        1000,
    )
    # The retry read the charge's refunds and found its own; it sent nothing.
    assert refund_posts(stack) == [refund.idempotency_key]


class LosesTheAnswer:
    """The real gateway, but the create's answer never arrives (a worker killed while Stripe
    was answering, or a connection reset): Stripe made the refund, we did not hear it."""

    def __init__(self, inner: Any, *, reach_stripe: bool) -> None:
        self._inner = inner
        self._reach_stripe = reach_stripe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_refund(self, **kwargs: Any) -> ProviderRefund:
        if self._reach_stripe:
            self._inner.create_refund(**kwargs)
        raise TransientPaymentError("connection reset while reading Stripe's answer")


@BOTH_BACKENDS
@pytest.mark.parametrize("reach_stripe", [True, False], ids=["stripe-refunded", "never-sent"])
def test_a_worker_killed_before_stripe_answers_refunds_once(
    stack: Stack, reach_stripe: bool
) -> None:
    paid = paid_invoice(stack)
    [refund] = issue(stack, paid.invoice_id, refund_amount_minor=700).refunds
    lossy = SettlementActivities(
        stack.session_factory, LosesTheAnswer(stack.gateway, reach_stripe=reach_stripe), stack.clock
    )
    with pytest.raises(TransientPaymentError):
        execute(lossy, refund.id)
    assert stored_refund(stack, refund.id).status == RefundStatus.PENDING

    result = execute(activities(stack), refund.id)

    [made] = provider_refunds(stack, paid.charge_id)
    assert (result.status, made.amount, made.metadata[IDEMPOTENCY_KEY_METADATA]) == (
        RefundStatus.SUCCEEDED,
        700,
        refund.idempotency_key,
    )
    # Stripe saw the key once or twice, never another key: its idempotency layer would answer
    # the second with the first refund; our read before the send found it anyway.
    assert set(refund_posts(stack)) == {refund.idempotency_key}
    assert len(refund_posts(stack)) == 1


# -- caps ---------------------------------------------------------------------------------------


@BOTH_BACKENDS
def test_partial_refunds_up_to_the_cap_and_one_cent_over_is_refused_writing_nothing(
    stack: Stack,
) -> None:
    paid = paid_invoice(stack)
    acts = activities(stack)
    first = issue(stack, paid.invoice_id, amount_minor=1000, refund_amount_minor=1000)
    execute(acts, first.refunds[0].id)
    second = issue(stack, paid.invoice_id, amount_minor=1500, refund_amount_minor=1500)
    execute(acts, second.refunds[0].id)
    assert [r.amount for r in provider_refunds(stack, paid.charge_id)] in (
        [1500, 1000],
        [1000, 1500],
    )
    before = counts(stack, paid)

    with pytest.raises(ChangeRefused) as refused:
        issue(stack, paid.invoice_id, amount_minor=1, refund_amount_minor=1)

    assert "fully credited already (2500 of 2500 USD" in refused.value.message
    assert counts(stack, paid) == before == (2, 2, 0)
    assert sum(r.amount for r in provider_refunds(stack, paid.charge_id)) == AMOUNT_MINOR


@BOTH_BACKENDS
def test_a_refund_made_elsewhere_lowers_what_a_credit_note_may_refund(stack: Stack) -> None:
    paid = paid_invoice(stack)
    dashboard = stack.stripe.v1.refunds.create(params={"charge": paid.charge_id, "amount": 500})
    with unit_of_work(stack.session_factory) as session:
        payment = payments_repo.get_payment_for_invoice(session, paid.invoice_id)
        assert payment is not None
        recorded, inserted = credit_notes_repo.record_provider_refund(
            session,
            payment,
            stack.gateway.retrieve_refund(refund_id=dashboard.id),
            at=NOW,
        )
    assert inserted and recorded.source == RefundSource.PROVIDER

    with pytest.raises(InvalidInput) as refused:
        issue(stack, paid.invoice_id, refund_amount_minor=AMOUNT_MINOR)
    assert refused.value.field == "refund_amount_minor"
    assert "at most 2000" in refused.value.message

    issued = issue(stack, paid.invoice_id, refund_amount_minor=2000, credit_amount_minor=500)
    assert execute(activities(stack), issued.refunds[0].id).status == RefundStatus.SUCCEEDED
    with unit_of_work(stack.session_factory) as session:
        assert balances_repo.credit_balance(session, paid.customer_id, "USD") == 500


def test_a_refund_stripe_refuses_is_recorded_failed_with_its_reason_never_retried(
    stack: Stack,
) -> None:
    paid = paid_invoice(stack)
    [refund] = issue(stack, paid.invoice_id, refund_amount_minor=1000).refunds
    # Meanwhile someone refunds the whole charge in the dashboard; we have not heard yet.
    stack.stripe.v1.refunds.create(params={"charge": paid.charge_id})

    result = execute(activities(stack), refund.id)

    assert result.status == RefundStatus.FAILED
    assert result.failure_reason is not None and "charge_already_refunded" in result.failure_reason
    assert len(provider_refunds(stack, paid.charge_id)) == 1
    assert execute(activities(stack), refund.id).status == RefundStatus.FAILED
    assert refund_posts(stack).count(refund.idempotency_key) == 1


def test_a_refund_stripe_keeps_pending_is_read_until_it_ends(stack: Stack) -> None:
    paid = paid_invoice(stack)
    [refund] = issue(stack, paid.invoice_id, refund_amount_minor=900).refunds
    set_new_refund_status(stack.localstripe.url, "pending")

    first = execute(activities(stack), refund.id)
    assert (first.status, first.final) == (RefundStatus.PENDING, False)
    assert first.stripe_refund_id is not None
    assert execute(activities(stack), refund.id).status == RefundStatus.PENDING

    move_refund(stack.localstripe.url, first.stripe_refund_id, "failed", "lost_or_stolen_card")
    last = execute(activities(stack), refund.id)

    assert (last.status, last.failure_reason) == (RefundStatus.FAILED, "lost_or_stolen_card")
    assert refund_posts(stack) == [refund.idempotency_key]  # read, never re-sent


def test_a_missing_refund_is_a_final_error(stack: Stack) -> None:
    with pytest.raises(ApplicationError) as failed:
        execute(activities(stack), "rf_missing")
    assert (failed.value.type, failed.value.non_retryable) == ("NotFound", True)


def test_the_stripe_double_refuses_more_than_the_charge_holds(stack: Stack) -> None:
    paid = paid_invoice(stack)
    with pytest.raises(stripe.InvalidRequestError) as refused:
        stack.stripe.v1.refunds.create(
            params={"charge": paid.charge_id, "amount": AMOUNT_MINOR + 1}
        )
    assert refused.value.code == "amount_too_large"
