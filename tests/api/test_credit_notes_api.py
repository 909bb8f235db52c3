"""Credit notes through the API: the real app on the harness (real worker on the time-skipping
server running RefundWorkflow, localstripe with the settlement double, a real database).

The refund is never made in the request: the answer shows it ``pending`` (or further), and the
refund's workflow carries it to Stripe; the tests then count Stripe's own refunds."""

from __future__ import annotations

import asyncio
import csv
import io
from typing import Any

import pytest
from sqlalchemy import func, select

from activities.stripe_gateway import IDEMPOTENCY_KEY_METADATA
from billing.invoices import InvoiceStatus
from billing.testing import cards
from db import models
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import invoices as invoices_repo
from db.repositories import payments as payments_repo
from tests.api.support import Api, eventually
from tests.conftest import BOTH_BACKENDS

PRICE = 900  # basic-monthly, USD


async def paid_invoice(api: Api) -> dict[str, Any]:
    """A signup whose first invoice is charged at once; returns that invoice, paid."""
    sub = await api.signed_up(card=cards.SUCCEEDS)

    def paid() -> list[Any]:
        with unit_of_work(api.harness.session_factory) as session:
            found = invoices_repo.list_invoices_for_subscription(session, sub["id"])
            return [
                i
                for i in found
                if i.status == InvoiceStatus.PAID
                and payments_repo.get_payment_for_invoice(session, i.id) is not None
            ]

    await eventually(paid, timeout=30)
    invoice = paid()[0]
    return {"id": invoice.id, "customer_id": invoice.customer_id, "subscription_id": sub["id"]}


def settlement_counts(api: Api) -> dict[str, int]:
    with api.harness.session_factory() as session:
        return {
            table.__tablename__: session.scalar(select(func.count()).select_from(table)) or 0
            for table in (
                models.CreditNoteRow,
                models.CreditNoteLineRow,
                models.RefundRow,
                models.BalanceEntryRow,
            )
        }


def charge_of(api: Api, invoice_id: str) -> str:
    with unit_of_work(api.harness.session_factory) as session:
        payment = payments_repo.get_payment_for_invoice(session, invoice_id)
    assert payment is not None and payment.stripe_charge_id is not None
    return payment.stripe_charge_id


def stripe_refunds(api: Api, charge_id: str) -> list[Any]:
    return list(api.harness.stripe.v1.refunds.list(params={"charge": charge_id, "limit": 100}).data)


async def issue(api: Api, invoice_id: str, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return await api.request(
        "POST", f"/v1/invoices/{invoice_id}/credit-notes", scope="admin", json=body, headers=headers
    )


async def refund_finished(api: Api, credit_note_id: str, timeout: float = 30) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        response = await api.request("GET", f"/v1/credit-notes/{credit_note_id}", scope="finance")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        note = await read()
        if all(r["status"] in ("succeeded", "failed", "canceled") for r in note["refunds"]):
            return note
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"refund not finished in {timeout}s: {note['refunds']}")
        await asyncio.sleep(0.1)


@BOTH_BACKENDS
async def test_a_credit_note_refund_runs_in_its_workflow_and_reaches_stripe_once(api: Api) -> None:
    invoice = await paid_invoice(api)
    charge_id = charge_of(api, invoice["id"])
    body = {
        "reason": "product_unsatisfactory",
        "refund_amount_minor": 600,
        "credit_amount_minor": 300,
        "memo": "Outage on the 3rd 🙏",
    }

    preview = await api.request(
        "POST", f"/v1/invoices/{invoice['id']}/credit-notes/preview", scope="finance", json=body
    )
    assert preview.status_code == 200, preview.text
    assert (preview.json()["amount_minor"], preview.json()["refund_amount_minor"]) == (900, 600)
    assert settlement_counts(api)["credit_notes"] == 0  # a preview writes nothing

    created = await issue(api, invoice["id"], body, key="cn-ada-1")
    assert created.status_code == 201, created.text
    note = created.json()
    assert note["number"].endswith("-CN-0001") and note["type"] == "post_payment"
    assert (note["amount_minor"], note["refund_amount_minor"], note["credit_amount_minor"]) == (
        900,
        600,
        300,
    )
    assert note["memo"] == "Outage on the 3rd 🙏" and note["created_by"] == "admin-key"
    [refund] = note["refunds"]
    assert refund["idempotency_key"] == f"{note['id']}-refund-1"

    done = await refund_finished(api, note["id"])
    [finished] = done["refunds"]
    [made] = stripe_refunds(api, charge_id)
    assert (finished["status"], finished["stripe_refund_id"]) == ("succeeded", made.id)
    assert (made.amount, made.reason, made.metadata[IDEMPOTENCY_KEY_METADATA]) == (
        600,
        "requested_by_customer",
        refund["idempotency_key"],
    )
    with unit_of_work(api.harness.session_factory) as session:
        assert balances_repo.credit_balance(session, invoice["customer_id"], "USD") == 300

    # The same key and body: the same credit note, nothing new anywhere.
    again = await issue(api, invoice["id"], body, key="cn-ada-1")
    assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (200, "true")
    assert again.json()["id"] == note["id"]
    conflict = await issue(api, invoice["id"], {**body, "refund_amount_minor": 1}, key="cn-ada-1")
    assert (
        conflict.status_code == 409 and conflict.json()["error"]["type"] == "idempotency_conflict"
    )
    assert len(stripe_refunds(api, charge_id)) == 1

    listed = await api.request(
        "GET", "/v1/credit-notes", scope="finance", params={"invoice_id": invoice["id"]}
    )
    assert [n["id"] for n in listed.json()["data"]] == [note["id"]]
    exported = await api.request("GET", "/v1/credit-notes.csv", scope="finance")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    [row] = [r for r in rows if r["credit_note_id"] == note["id"]]
    assert (row["refund_status"], row["refunded_minor"], row["stripe_refund_ids"]) == (
        "succeeded",
        "600",
        made.id,
    )
    assert row["memo"] == "Outage on the 3rd 🙏"


@BOTH_BACKENDS
async def test_twenty_parallel_credit_notes_never_exceed_the_caps_and_number_without_gaps(
    api: Api,
) -> None:
    invoice = await paid_invoice(api)
    charge_id = charge_of(api, invoice["id"])

    same_key = await asyncio.gather(
        *(issue(api, invoice["id"], {"refund_amount_minor": 100}, key="same") for _ in range(20))
    )
    assert sorted(r.status_code for r in same_key) == [200] * 19 + [201]
    assert len({r.json()["id"] for r in same_key}) == 1

    distinct = await asyncio.gather(
        *(issue(api, invoice["id"], {"refund_amount_minor": 100}, key=f"k{n}") for n in range(20))
    )
    statuses = sorted(r.status_code for r in distinct)
    # 900 captured, 100 refunded by the first: 8 more fit, the rest are over the cap.
    assert statuses.count(201) == 8, [r.text for r in distinct if r.status_code != 201][:2]
    assert {r.status_code for r in distinct if r.status_code != 201} <= {409, 422}
    with unit_of_work(api.harness.session_factory) as session:
        notes = credit_notes_repo.list_credit_notes(session, invoice_id=invoice["id"])
    assert sorted(n.sequence for n in notes) == list(range(1, 10))
    for note in notes:
        await refund_finished(api, note.id)
    assert sum(r.amount for r in stripe_refunds(api, charge_id)) == PRICE
    assert len(stripe_refunds(api, charge_id)) == 9


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"memo": "a\x00b"}, "memo"),
        ({"memo": "x" * 501}, "memo"),
        ({"amount_minor": 0}, "amount_minor"),
        ({"amount_minor": -5}, "amount_minor"),
        ({"amount_minor": "100"}, "amount_minor"),
        ({"amount_minor": 10**30}, "amount_minor"),
        ({"amount_minor": 901}, "amount_minor"),
        ({"refund_amount_minor": 901}, "refund_amount_minor"),
        ({"amount_minor": 500, "refund_amount_minor": 400}, "refund_amount_minor"),
        ({"reason": "because"}, "reason"),
        ({"unknown": 1}, "unknown"),
        ({"lines": [{"invoice_line_id": "il_nope"}]}, "lines[0].invoice_line_id"),
        ({"lines": []}, "lines"),
        ({"amount_minor": 1, "lines": [{"invoice_line_id": "il_x"}]}, "lines"),
        ({"memo": "card 4242 4242 4242 4242"}, "memo"),
    ],
)
async def test_bad_input_gets_a_clear_error_and_writes_nothing(
    api: Api, body: dict[str, Any], field: str
) -> None:
    invoice = await paid_invoice(api)
    before = settlement_counts(api)

    response = await issue(api, invoice["id"], body)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert field in (error.get("field") or "") or field in error["message"], error
    assert "4242" not in response.text
    assert settlement_counts(api) == before


async def test_scopes_missing_invoices_and_closed_invoices_are_refused(api: Api) -> None:
    invoice = await paid_invoice(api)
    path = f"/v1/invoices/{invoice['id']}/credit-notes"
    assert (await api.request("POST", path, json={})).status_code == 401
    assert (await api.request("POST", path, scope="finance", json={})).status_code == 403
    missing = await issue(api, "in_missing", {})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "id"
    assert (await issue(api, "in_bad\u00e9", {})).status_code == 422
    assert (
        await api.request("GET", "/v1/credit-notes/cn_missing", scope="finance")
    ).status_code == 404
    assert (
        await api.request("GET", "/v1/credit-notes", scope="finance", params={"colour": "red"})
    ).status_code == 422
    # The whole rest of the invoice to the balance, then nothing is left to credit.
    full = await issue(api, invoice["id"], {})
    assert full.status_code == 201 and full.json()["credit_amount_minor"] == PRICE
    again = await issue(api, invoice["id"], {"amount_minor": 1})
    assert again.status_code == 409 and "fully credited" in again.json()["error"]["message"]
