"""Credit note and refund events through the API (the real app on the harness: worker on the
time-skipping server running RefundWorkflow, localstripe with the settlement double, a real
database, both backends): what ``GET /v1/events`` shows after a credit note, its refund carried
to Stripe by its workflow, twenty requests under one Idempotency-Key, a credit note that pays
an open invoice, and memos of every kind of text."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import select

from activities.delivery import event_body
from db import models
from db.repositories import events as events_repo
from tests.api.support import Api
from tests.api.test_credit_notes_api import issue, paid_invoice, refund_finished
from tests.api.test_open_invoice_credit_notes_api import declined_invoice
from tests.conftest import BOTH_BACKENDS

pytestmark = BOTH_BACKENDS


async def stream_events(api: Api, subscription_id: str) -> list[dict[str, Any]]:
    answer = await api.request(
        "GET",
        "/v1/events",
        scope="finance",
        params={"subscription_id": subscription_id, "limit": 100},
    )
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["data"]
    return sorted(found, key=lambda e: e["sequence"])


async def test_a_credit_note_and_its_refund_are_reported_once_each_after_the_invoice_paid(
    api: Api,
) -> None:
    invoice = await paid_invoice(api)
    sub = invoice["subscription_id"]
    body = {"refund_amount_minor": 600, "credit_amount_minor": 300, "reason": "duplicate"}
    created = await issue(api, invoice["id"], body, key="cn-events-1")
    assert created.status_code == 201, created.text
    note = created.json()
    done = await refund_finished(api, note["id"])
    again = await issue(api, invoice["id"], body, key="cn-events-1")  # a replay: no event
    assert again.status_code == 200

    events = await stream_events(api, sub)
    new = [e for e in events if e["type"].startswith(("credit_note.", "refund."))]
    assert [e["type"] for e in new] == [
        "credit_note.created",
        "refund.created",
        "refund.succeeded",
    ]
    paid = next(e for e in events if e["type"] == "invoice.paid")
    assert paid["sequence"] < new[0]["sequence"] < new[1]["sequence"] < new[2]["sequence"]
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert {(e["subscription_id"], e["stream"]) for e in events} == {(sub, sub)}
    # The objects as the API shows them: the credit note as its answer did (refund pending),
    # the refund as it was at each step.
    assert new[0]["data"]["object"] == note
    [refund] = done["refunds"]
    assert new[1]["data"]["object"] == note["refunds"][0]
    assert new[2]["data"]["object"] == refund
    assert refund["status"] == "succeeded" and refund["invoice_id"] == invoice["id"]


async def test_twenty_credit_note_requests_under_one_key_are_one_event(api: Api) -> None:
    invoice = await paid_invoice(api)
    body = {"refund_amount_minor": 100, "memo": "once"}
    answers = await asyncio.gather(
        *(issue(api, invoice["id"], body, key="cn-twenty-one-key") for _ in range(20))
    )
    assert sorted(a.status_code for a in answers) == [200] * 19 + [201]
    assert len({a.json()["id"] for a in answers}) == 1
    await refund_finished(api, answers[0].json()["id"])
    events = await stream_events(api, invoice["subscription_id"])
    counted = [e["type"] for e in events if e["type"].startswith(("credit_note.", "refund."))]
    assert counted == ["credit_note.created", "refund.created", "refund.succeeded"]


async def test_a_credit_note_that_pays_an_open_invoice_reports_the_payment_after_itself(
    api: Api,
) -> None:
    invoice = await declined_invoice(api)
    sub = invoice["subscription_id"]
    created = await issue(api, invoice["id"], {"reason": "order_change"})  # all that is due
    assert created.status_code == 201, created.text

    def paid_event_count() -> int:
        with api.harness.session_factory() as session:
            return len(
                session.scalars(
                    select(models.EventRow.id).where(
                        models.EventRow.subscription_id == sub,
                        models.EventRow.type == "invoice.paid",
                    )
                ).all()
            )

    # The subscription workflow hears of it and cancels the intent; its own invoice.paid for
    # it finds the credit note's written.
    await api.harness.wait_for(sub, lambda v: v.open_invoice is None)
    events = await stream_events(api, sub)
    tail = [e["type"] for e in events if e["type"] in ("credit_note.created", "invoice.paid")]
    assert tail == ["credit_note.created", "invoice.paid"]
    assert paid_event_count() == 1
    paid = next(e for e in events if e["type"] == "invoice.paid")
    assert (paid["data"]["object"]["status"], paid["data"]["object"]["amount_paid_minor"]) == (
        "paid",
        0,
    )
    # Written by the credit note's own transaction (at its instant), not later by the workflow.
    assert paid["created"] == created.json()["created_at"]


@pytest.mark.parametrize(
    "memo",
    ["🧾" * 500, "שלום عليكم — refund", 'quote " back\\slash </script> \u2028 tab\tnl\n'],
    ids=["500-emoji", "rtl", "json-breakers"],
)
async def test_any_memo_reaches_the_event_exactly_and_nul_never_does(api: Api, memo: str) -> None:
    invoice = await paid_invoice(api)
    sub = invoice["subscription_id"]
    refused = await issue(api, invoice["id"], {"amount_minor": 100, "memo": memo + "\x00"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "memo"
    assert [e for e in await stream_events(api, sub) if e["type"] == "credit_note.created"] == []

    created = await issue(api, invoice["id"], {"amount_minor": 100, "memo": memo})
    assert created.status_code == 201, created.text
    # One: the refused request wrote nothing.
    [shown] = [e for e in await stream_events(api, sub) if e["type"] == "credit_note.created"]
    assert shown["data"]["object"]["memo"] == memo
    # As stored, and as an endpoint receives it (the delivered body is this JSON, UTF-8).
    with api.harness.session_factory() as session:
        stored = session.scalars(
            select(models.EventRow.object).where(models.EventRow.id == shown["id"])
        ).one()
    assert stored["memo"] == memo
    with api.harness.session_factory() as session:
        record = events_repo.get_event(session, shown["id"])
    assert record is not None
    assert json.loads(event_body(record).decode("utf-8"))["data"]["object"]["memo"] == memo
