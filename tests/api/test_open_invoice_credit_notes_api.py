"""Pre-payment credit notes through the API (the real app on the harness: worker on the
time-skipping server, localstripe, a real database): a credit note on an open invoice in
dunning lowers what the next retry takes at Stripe; one that credits the rest pays the invoice
and its retries stop at once; bad input is refused and writes nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from billing.invoices import InvoiceStatus
from billing.subscription import SubscriptionStatus
from billing.testing import cards
from db.engine import unit_of_work
from db.repositories import attempts as attempts_repo
from db.repositories import invoices as invoices_repo
from tests.api.support import Api, eventually
from tests.api.test_credit_notes_api import PRICE, issue, settlement_counts
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)


async def declined_invoice(api: Api) -> dict[str, Any]:
    """A signup whose first invoice was declined at once: that invoice, open, in dunning."""
    sub = await api.signed_up(card=cards.DECLINES_AFTER_ATTACH)

    def declined() -> list[Any]:
        with unit_of_work(api.harness.session_factory) as session:
            found = invoices_repo.list_invoices_for_subscription(session, sub["id"])
            return [
                (i, a)
                for i in found
                for a in attempts_repo.list_attempts_for_invoice(session, i.id)
                if a.status == "failed"
            ]

    await eventually(declined, timeout=30)
    invoice, attempt = declined()[0]
    await api.harness.wait_for(
        sub["id"], lambda v: v.open_invoice is not None and v.open_invoice.attempts == 1
    )
    return {
        "id": invoice.id,
        "subscription_id": sub["id"],
        "intent": attempt.stripe_payment_intent_id,
        "failed_at": attempt.created_at,
    }


def intent_charges(api: Api, invoice: dict[str, Any]) -> list[tuple[int, str]]:
    charges = [
        c
        for c in api.harness.provider_charges(invoice["subscription_id"])
        if c["payment_intent"] == invoice["intent"]
    ]
    return [(c["amount"], c["status"]) for c in sorted(charges, key=lambda c: c["created"])]


def stored(api: Api, invoice_id: str) -> Any:
    with unit_of_work(api.harness.session_factory) as session:
        return invoices_repo.get_invoice(session, invoice_id)


@BOTH_BACKENDS
async def test_a_credit_note_in_dunning_lowers_the_next_retry_and_the_rest_pays_it(
    api: Api,
) -> None:
    invoice = await declined_invoice(api)
    h = api.harness

    created = await issue(api, invoice["id"], {"amount_minor": 250, "reason": "order_change"})
    assert created.status_code == 201, created.text
    note = created.json()
    assert (note["type"], note["amount_due_reduction_minor"], note["refunds"]) == (
        "pre_payment",
        250,
        [],
    )
    assert stored(api, invoice["id"]).amount_due_minor == PRICE - 250
    await h.wait_for(
        invoice["subscription_id"],
        lambda v: v.open_invoice is not None and v.open_invoice.amount_minor == PRICE - 250,
    )

    # The day-1 retry: localstripe receives the lower amount on the same intent.
    await h.advance_to(invoice["failed_at"] + DAY + timedelta(hours=1))
    assert intent_charges(api, invoice) == [(PRICE, "failed"), (PRICE - 250, "failed")]

    # The rest of the invoice (an empty body): paid by the credit, the retries stop now.
    rest = await issue(api, invoice["id"], {}, key="rest-1")
    assert rest.status_code == 201, rest.text
    assert rest.json()["amount_due_reduction_minor"] == PRICE - 250
    again = await issue(api, invoice["id"], {}, key="rest-1")
    assert again.status_code == 200 and again.json()["id"] == rest.json()["id"]
    paid = stored(api, invoice["id"])
    assert (paid.status, paid.amount_due_minor, paid.amount_paid_minor) == (
        InvoiceStatus.PAID,
        0,
        0,
    )
    state = await h.wait_for(invoice["subscription_id"], lambda v: v.open_invoice is None)
    assert state.status == SubscriptionStatus.ACTIVE
    assert h.stripe.v1.payment_intents.retrieve(invoice["intent"]).status == "canceled"

    await h.advance_to(invoice["failed_at"] + 15 * DAY)
    assert intent_charges(api, invoice) == [(PRICE, "failed"), (PRICE - 250, "failed")]
    assert len(h.snapshot(invoice["subscription_id"]).attempts[invoice["id"]]) == 2
    listed = await api.request(
        "GET", "/v1/credit-notes", scope="finance", params={"invoice_id": invoice["id"]}
    )
    assert [n["amount_due_reduction_minor"] for n in listed.json()["data"]] == [250, PRICE - 250]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"refund_amount_minor": 100}, "refund_amount_minor"),
        ({"credit_amount_minor": 100}, "credit_amount_minor"),
        ({"amount_minor": PRICE + 1}, "amount_minor"),
        ({"amount_minor": 0}, "amount_minor"),
        ({"memo": "a\x00b"}, "memo"),
        ({"memo": "card 4242 4242 4242 4242"}, "memo"),
        ({"amount_minor": 100, "memo": "🙏" * 501}, "memo"),
    ],
)
async def test_bad_input_on_an_open_invoice_is_refused_and_writes_nothing(
    api: Api, body: dict[str, Any], field: str
) -> None:
    invoice = await declined_invoice(api)
    before = settlement_counts(api)

    response = await issue(api, invoice["id"], body)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert field in (error.get("field") or "") or field in error["message"], error
    assert "4242" not in response.text
    assert settlement_counts(api) == before
    current = stored(api, invoice["id"])
    assert (current.status, current.amount_due_minor) == (InvoiceStatus.OPEN, PRICE)
    state = await api.harness.state(invoice["subscription_id"])
    assert state.open_invoice is not None and state.open_invoice.amount_minor == PRICE


@BOTH_BACKENDS
async def test_twenty_parallel_credit_notes_on_an_open_invoice_pay_it_exactly_once(
    api: Api,
) -> None:
    invoice = await declined_invoice(api)
    h = api.harness

    responses = await asyncio.gather(
        *(issue(api, invoice["id"], {"amount_minor": 100}, key=f"p{n}") for n in range(20))
    )

    statuses = sorted(r.status_code for r in responses)
    # 900 due: nine notes of 100 fit, the last of them pays it; the rest are refused.
    assert statuses.count(201) == 9, [r.text for r in responses if r.status_code != 201][:2]
    assert {r.status_code for r in responses if r.status_code != 201} <= {409, 422}
    paid = stored(api, invoice["id"])
    assert (paid.status, paid.amount_due_minor, paid.amount_paid_minor) == (
        InvoiceStatus.PAID,
        0,
        0,
    )
    state = await h.wait_for(invoice["subscription_id"], lambda v: v.open_invoice is None)
    assert state.status == SubscriptionStatus.ACTIVE
    assert h.stripe.v1.payment_intents.retrieve(invoice["intent"]).status == "canceled"
    assert intent_charges(api, invoice) == [(PRICE, "failed")]
