"""POST /v1/subscriptions/{id}/change-plan and its preview, through the real app: the preview's
lines are the change's lines; a repeated or parallel request with one Idempotency-Key makes
one change; bad input and refused changes write nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from billing.testing.cards import SUCCEEDS
from tests.api.support import Api, row_counts
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)


async def active_subscription(api: Api) -> dict[str, Any]:
    sub = await api.signed_up("basic-monthly", card=SUCCEEDS)
    await api.harness.wait_for(sub["id"], lambda v: v.invoices_issued == 1 and not v.open_invoice)
    await api.harness.advance(12 * DAY)
    return sub


@BOTH_BACKENDS
async def test_preview_then_change_gives_the_same_lines_and_one_change_per_key(api: Api) -> None:
    sub = await active_subscription(api)
    path = f"/v1/subscriptions/{sub['id']}/change-plan"
    body = {"plan": "pro-monthly", "quantity": 2}

    before = row_counts(api.harness)
    shown = await api.request("POST", f"{path}/preview", scope="admin", json=body)
    assert shown.status_code == 200, shown.text
    assert row_counts(api.harness) == before  # a preview writes nothing
    preview = shown.json()
    assert preview["effective"] == "now" and preview["invoice_now"] is True
    assert [line["amount_minor"] < 0 for line in preview["lines"]] == [True, False]

    headers = {"Idempotency-Key": "seats-2"}
    answers = await asyncio.gather(
        *(api.request("POST", path, scope="admin", json=body, headers=headers) for _ in range(20))
    )
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
    assert len({a.json()["change_id"] for a in answers}) == 1
    changed = answers[0].json()
    assert [(x["amount_minor"], x["period_end"]) for x in changed["lines"]] == [
        (x["amount_minor"], x["period_end"]) for x in preview["lines"]
    ]
    assert changed["amount_due_minor"] == preview["subtotal_minor"]
    await api.harness.wait_for(sub["id"], lambda v: v.open_invoice is None)
    assert row_counts(api.harness)["invoices"] == before["invoices"] + 1

    live = await api.request("GET", f"/v1/subscriptions/{sub['id']}", scope="finance")
    assert (live.json()["plan"], live.json()["quantity"]) == ("pro-monthly", 2)

    # Finance reads show the lines and the totals.
    invoice = await api.request("GET", f"/v1/invoices/{changed['invoice_id']}", scope="finance")
    body_out = invoice.json()
    assert body_out["change_id"] == changed["change_id"]
    assert [(x["kind"], x["amount_minor"]) for x in body_out["lines"]] == [
        ("proration", x["amount_minor"]) for x in changed["lines"]
    ]
    assert body_out["subtotal_minor"] == preview["subtotal_minor"] == body_out["amount_due_minor"]
    listed = await api.request("GET", f"/v1/invoices?subscription_id={sub['id']}", scope="finance")
    assert [len(i["lines"]) for i in listed.json()["data"]] == [1, 2]


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"plan": "no-such-plan"}, 422, "unknown_plan"),
        ({"plan": "team-weekly"}, 409, "change_refused"),  # EUR
        ({"plan": "basic-monthly"}, 409, "change_refused"),  # nothing to change
        ({"quantity": 0}, 422, "invalid_input"),
        ({"quantity": "2"}, 422, "invalid_input"),
        ({"effective": "tomorrow", "quantity": 2}, 422, "invalid_input"),
        ({"proration": "some", "quantity": 2}, 422, "invalid_input"),
        ({"plan": "pro\x00monthly"}, 422, "invalid_input"),
        ({}, 422, "invalid_input"),
        ({"quantity": 2, "card": "4242424242424242"}, 422, "invalid_input"),
    ],
)
async def test_bad_or_refused_changes_write_nothing(
    api: Api, body: dict[str, Any], status: int, error_type: str
) -> None:
    sub = await active_subscription(api)
    before = row_counts(api.harness)
    for path in ("change-plan", "change-plan/preview"):
        answer = await api.request(
            "POST", f"/v1/subscriptions/{sub['id']}/{path}", scope="admin", json=body
        )
        assert (answer.status_code, answer.json()["error"]["type"]) == (status, error_type), (
            path,
            answer.text,
        )
        assert "4242424242424242" not in answer.text
    assert row_counts(api.harness) == before
    state = await api.harness.state(sub["id"])
    assert (state.plan_code, state.quantity, state.pending_change) == ("basic-monthly", 1, None)


async def test_archived_plans_and_canceled_subscriptions_are_refused(api: Api) -> None:
    sub = await active_subscription(api)
    path = f"/v1/subscriptions/{sub['id']}/change-plan"
    await api.request("POST", "/v1/plans/pro-monthly/archive", scope="admin")
    archived = await api.request("POST", path, scope="admin", json={"plan": "pro-monthly"})
    assert archived.status_code == 422 and archived.json()["error"]["type"] == "plan_archived"

    scheduled = await api.request(
        "POST", path, scope="admin", json={"quantity": 3, "effective": "period_end"}
    )
    assert scheduled.status_code == 200 and scheduled.json()["pending"] is True
    live = await api.request("GET", f"/v1/subscriptions/{sub['id']}", scope="finance")
    assert live.json()["pending_change"]["quantity"] == 3
    second = await api.request("POST", path, scope="admin", json={"quantity": 4})
    assert second.status_code == 409 and "pending" in second.json()["error"]["message"]
    undo = await api.request(
        "POST", f"/v1/subscriptions/{sub['id']}/pending-change/cancel", scope="admin"
    )
    assert undo.status_code == 200 and undo.json()["quantity"] == 3
    again = await api.request(
        "POST", f"/v1/subscriptions/{sub['id']}/pending-change/cancel", scope="admin"
    )
    assert again.status_code == 409

    await api.request(
        "POST",
        f"/v1/subscriptions/{sub['id']}/cancel",
        scope="admin",
        json={"at_period_end": False},
    )
    canceled = await api.request("POST", path, scope="admin", json={"quantity": 2})
    assert canceled.status_code == 409 and "canceled" in canceled.json()["error"]["message"]
    assert (
        await api.request("POST", path, scope="finance", json={"quantity": 2})
    ).status_code == 403
