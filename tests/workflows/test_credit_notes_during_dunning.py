"""Credit notes on an open invoice during dunning, on the time-skipping server with the real
workflow and activities, localstripe and a real database: the next retry charges the lowered
amount (the intent's amount is set first); a credit note that pays the invoice stops dunning at
once (its intent canceled), and when its signal is lost the next retry finds it paid and ends
the collection without charging and without parking."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from activities.settlement import signal_invoice_credited
from billing.contracts import NoticeKind
from billing.credit_notes import CreditNoteRequest
from billing.invoices import InvoiceStatus
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINES_AFTER_ATTACH
from billing.testing.harness import BillingHarness
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)
PRICE = 900  # basic-monthly


async def first_anchor(harness: BillingHarness) -> datetime:
    now = await harness.now()
    return now.replace(minute=0, second=0, microsecond=0) + DAY


def credit(
    harness: BillingHarness, invoice_id: str, amount: int
) -> credit_notes_repo.IssuedCreditNote:
    """What the API's write does (the note, the lower amount due, paid at 0)."""
    with unit_of_work(harness.session_factory) as session:
        return credit_notes_repo.issue_credit_note(
            session,
            invoice_id,
            CreditNoteRequest(amount_minor=amount, reason="order_change"),
            at=harness.clock.now(),
            allow_open_invoices=True,
        )


async def tell(harness: BillingHarness, issued: credit_notes_repo.IssuedCreditNote) -> None:
    """What the API does once the note committed."""
    assert issued.invoice is not None
    await signal_invoice_credited(harness.client, issued.invoice, issued.credit_note.id)


def intent_charges(harness: BillingHarness, subscription_id: str, intent: str) -> list[Any]:
    charges = [
        c for c in harness.provider_charges(subscription_id) if c["payment_intent"] == intent
    ]
    return [(c["amount"], c["status"]) for c in sorted(charges, key=lambda c: c["created"])]


async def in_dunning(harness: BillingHarness) -> tuple[str, str, str, datetime]:
    """A subscription whose first invoice was declined at its billing date: (subscription,
    invoice, its payment intent, the first failure)."""
    anchor = await first_anchor(harness)
    sub = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + timedelta(hours=1))
    state = await harness.state(sub.subscription_id)
    assert state.status == SubscriptionStatus.PAST_DUE
    inv = state.open_invoice
    assert inv is not None and inv.attempts == 1 and inv.first_failure_at is not None
    [attempt] = harness.snapshot(sub.subscription_id).attempts[inv.invoice_id]
    assert attempt.stripe_payment_intent_id is not None
    intent = attempt.stripe_payment_intent_id
    return sub.subscription_id, inv.invoice_id, intent, inv.first_failure_at


@BOTH_BACKENDS
async def test_a_credit_note_lowers_the_next_retry_and_one_that_pays_stops_dunning_at_once(
    harness: BillingHarness,
) -> None:
    sub_id, invoice_id, intent, first_failure = await in_dunning(harness)

    await tell(harness, credit(harness, invoice_id, 300))
    state = await harness.wait_for(
        sub_id, lambda v: v.open_invoice is not None and v.open_invoice.amount_minor == 600
    )
    assert state.status == SubscriptionStatus.PAST_DUE

    # Day 1: the retry confirms the same intent for 600, set before the confirm.
    await harness.advance_to(first_failure + DAY + timedelta(hours=1))
    assert intent_charges(harness, sub_id, intent) == [(PRICE, "failed"), (600, "failed")]
    update = harness.http_client.requests_to(f"/v1/payment_intents/{intent}")
    assert [r.idempotency_key for r in update] == [f"{invoice_id}-attempt-2-amount"]
    assert harness.stripe.v1.payment_intents.retrieve(intent).amount == 600

    # The rest is credited: the invoice is paid by the credit, and dunning stops now.
    issued = credit(harness, invoice_id, 600)
    await tell(harness, issued)
    state = await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    assert state.status == SubscriptionStatus.ACTIVE
    assert harness.stripe.v1.payment_intents.retrieve(intent).status == "canceled"

    # Nothing more is tried, and billing goes on at the next anchor.
    await harness.advance_to(first_failure + 15 * DAY)
    snap = harness.snapshot(sub_id)
    [invoice] = [i for i in snap.invoices if i.id == invoice_id]
    assert (invoice.status, invoice.amount_due_minor, invoice.amount_paid_minor) == (
        InvoiceStatus.PAID,
        0,
        0,
    )
    assert len(snap.attempts[invoice_id]) == 2
    assert snap.payments[invoice_id] == []
    assert intent_charges(harness, sub_id, intent) == [(PRICE, "failed"), (600, "failed")]
    kinds = [n.kind for n in snap.notifications if n.invoice_id == invoice_id]
    assert kinds.count(NoticeKind.PAYMENT_FAILED) == 2
    assert NoticeKind.PAYMENT_SUCCEEDED_AFTER_FAILURE not in kinds
    assert snap.subscription.status == SubscriptionStatus.ACTIVE


@BOTH_BACKENDS
async def test_a_lost_signal_leaves_the_next_retry_to_find_the_invoice_paid(
    harness: BillingHarness,
) -> None:
    sub_id, invoice_id, intent, first_failure = await in_dunning(harness)

    # Paid by a credit note whose signal never arrives.
    credit(harness, invoice_id, PRICE)
    harness.http_client.clear()
    await harness.advance_to(first_failure + DAY + timedelta(hours=1))

    state = await harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    assert state.status == SubscriptionStatus.ACTIVE and state.attention_reason is None
    # No charge, no update: only the intent's cancel reached Stripe.
    assert [(r.method, r.path) for r in harness.http_client.recorded] == [
        ("POST", f"/v1/payment_intents/{intent}/cancel")
    ]
    assert harness.stripe.v1.payment_intents.retrieve(intent).status == "canceled"
    snap = harness.snapshot(sub_id)
    assert len(snap.attempts[invoice_id]) == 1
    assert intent_charges(harness, sub_id, intent) == [(PRICE, "failed")]
    kinds = [n.kind for n in snap.notifications if n.invoice_id == invoice_id]
    assert NoticeKind.PAYMENT_SUCCEEDED_AFTER_FAILURE not in kinds


async def test_a_repeated_or_late_signal_changes_nothing(harness: BillingHarness) -> None:
    sub_id, invoice_id, intent, _ = await in_dunning(harness)
    first = credit(harness, invoice_id, 200)
    second = credit(harness, invoice_id, 100)
    # Out of order and twice: the amount due only goes down.
    await tell(harness, second)
    await tell(harness, first)
    await tell(harness, second)
    state = await harness.wait_for(
        sub_id, lambda v: v.open_invoice is not None and v.open_invoice.amount_minor == 600
    )
    assert state.status == SubscriptionStatus.PAST_DUE
    assert harness.stripe.v1.payment_intents.retrieve(intent).status != "canceled"
