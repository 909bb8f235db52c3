"""POST /v1/subscriptions/{id}/change-plan and its preview, through the real app: the preview's
lines are the change's lines; a repeated or parallel request with one Idempotency-Key makes
one change; bad input and refused changes write nothing."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from billing.testing.cards import SUCCEEDS
from db import models
from db.engine import unit_of_work
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
    # Twenty requests, one change: logged once, with the monthly amounts MRR moves by.
    assert [
        (p["from_plan"], p["from_quantity"], p["to_plan"], p["to_quantity"], p["from_mrr_minor"],
         p["to_mrr_minor"])
        for p in live.json()["plan_history"]
    ] == [("basic-monthly", 1, "pro-monthly", 2, 900, 5800)]  # fmt: skip

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

    # The lines CSV: one row per line, with its invoice, kind, period, seats and amounts.
    exported = await api.request(
        "GET", f"/v1/invoice-lines.csv?subscription_id={sub['id']}", scope="finance"
    )
    assert exported.status_code == 200, exported.text
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    renewal_id = listed.json()["data"][0]["id"]
    assert [
        (
            r["invoice_id"],
            r["position"],
            r["kind"],
            r["plan_code"],
            r["quantity"],
            int(r["amount_minor"]),
            r["period_end"],
            r["currency"],
        )
        for r in rows
    ] == [
        (renewal_id, "1", "subscription", "basic-monthly", "1", 900, rows[0]["period_end"], "USD"),
    ] + [
        (
            changed["invoice_id"],
            str(n),
            "proration",
            x["plan"],
            str(x["quantity"]),
            x["amount_minor"],
            x["period_end"].replace("+00:00", "Z"),
            "USD",
        )
        for n, x in enumerate(changed["lines"], start=1)
    ]
    assert rows[1]["unit_amount_minor"] == "900" and rows[2]["unit_amount_minor"] == "2900"
    assert rows[1]["change_id"] == changed["change_id"]
    for invoice_id in {r["invoice_id"] for r in rows}:
        mine = [r for r in rows if r["invoice_id"] == invoice_id]
        assert sum(int(r["amount_minor"]) for r in mine) == int(mine[0]["invoice_subtotal_minor"])


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


@BOTH_BACKENDS
async def test_an_idempotency_key_makes_one_change_also_after_continue_as_new(api: Api) -> None:
    """The key is claimed in the database (scoped to the API key) and names one Update: a
    repeat, sequential or twenty at once, answers the first change; after the workflow
    continued as new too, even when the first answer never reached the database (the API died
    after the change): the workflow answers the change it recorded, and changes nothing."""
    sub = await active_subscription(api)
    sub_id = sub["id"]
    path = f"/v1/subscriptions/{sub_id}/change-plan"
    first_body = {"quantity": 2, "effective": "now"}
    first = await api.request(
        "POST", path, scope="admin", json=first_body, headers={"Idempotency-Key": "seats-to-2"}
    )
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    answer = first.json()
    assert answer["invoice_id"] is not None and answer["quantity"] == 2
    await api.harness.wait_for(sub_id, lambda v: v.open_invoice is None)

    again = await api.request(
        "POST", path, scope="admin", json=first_body, headers={"Idempotency-Key": "seats-to-2"}
    )
    assert (again.status_code, again.json()) == (200, answer)
    assert again.headers["Idempotent-Replayed"] == "true"
    # The same key with another body: refused, naming the key; nothing written.
    before = row_counts(api.harness)
    other = await api.request(
        "POST",
        path,
        scope="admin",
        json={"quantity": 5, "effective": "now"},
        headers={"Idempotency-Key": "seats-to-2"},
    )
    assert other.status_code == 409, other.text
    assert other.json()["error"]["type"] == "idempotency_conflict"
    assert "seats-to-2" in other.json()["error"]["message"]
    assert row_counts(api.harness) == before

    # Another change (another key) moves the subscription on: 3 seats.
    moved = await api.request(
        "POST", path, scope="admin", json={"quantity": 3}, headers={"Idempotency-Key": "seats-3"}
    )
    assert moved.status_code == 200 and moved.json()["quantity"] == 3, moved.text
    await api.harness.wait_for(sub_id, lambda v: v.open_invoice is None)

    # The API died after the first change was applied, before it kept the answer.
    with unit_of_work(api.harness.session_factory) as session:
        session.execute(
            update(models.PLAN_CHANGE_REQUESTS)
            .where(models.PLAN_CHANGE_REQUESTS.c.idempotency_key == "seats-to-2")
            .values(status="requested", result=None, completed_at=None)
        )

    # A year of renewals: the workflow continues as new (12 periods per run).
    run = (await api.harness.state(sub_id)).run_number
    await api.harness.advance(330 * DAY)
    state = await api.harness.wait_for(
        sub_id, lambda v: v.run_number > run and v.open_invoice is None
    )
    assert state.quantity == 3
    invoices_before = row_counts(api.harness)["invoices"]
    charges_before = len(api.harness.provider_charges(sub_id))

    repeats = await asyncio.gather(
        *(
            api.request(
                "POST",
                path,
                scope="admin",
                json=first_body,
                headers={"Idempotency-Key": "seats-to-2"},
            )
            for _ in range(20)
        )
    )
    assert {r.status_code for r in repeats} == {200}, [r.text for r in repeats]
    assert all(r.json() == answer for r in repeats), [r.json() for r in repeats][:2]
    state = await api.harness.state(sub_id)
    assert (state.quantity, state.pending_change) == (3, None)  # not back to 2
    assert row_counts(api.harness)["invoices"] == invoices_before
    assert len(api.harness.provider_charges(sub_id)) == charges_before
    with unit_of_work(api.harness.session_factory) as session:
        kept = session.execute(
            select(models.PLAN_CHANGE_REQUESTS.c.result).where(
                models.PLAN_CHANGE_REQUESTS.c.idempotency_key == "seats-to-2"
            )
        ).scalar_one()
    assert kept == answer


@BOTH_BACKENDS
async def test_twenty_parallel_changes_under_twenty_keys_make_one_change(api: Api) -> None:
    """Twenty different keys asking the same change at once: one is applied (one invoice, one
    charge), the others are refused with the reason; the refusals keep nothing half-done."""
    sub = await active_subscription(api)
    path = f"/v1/subscriptions/{sub['id']}/change-plan"
    before = row_counts(api.harness)
    answers = await asyncio.gather(
        *(
            api.request(
                "POST",
                path,
                scope="admin",
                json={"quantity": 2},
                headers={"Idempotency-Key": f"parallel-{n}"},
            )
            for n in range(20)
        )
    )
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] + [409] * 19, [a.text for a in answers if a.status_code != 409]
    refused = [a.json()["error"]["message"] for a in answers if a.status_code == 409]
    assert all("nothing to change" in m or "unpaid" in m for m in refused), refused[:3]
    await api.harness.wait_for(sub["id"], lambda v: v.open_invoice is None)
    assert row_counts(api.harness)["invoices"] == before["invoices"] + 1
    charges = [c for c in api.harness.provider_charges(sub["id"]) if c["status"] == "succeeded"]
    assert len(charges) == 2  # the signup's and the change's
    # A refused key asked again is refused again: nothing was kept as its answer.
    loser = next(n for n, a in enumerate(answers) if a.status_code == 409)
    again = await api.request(
        "POST",
        path,
        scope="admin",
        json={"quantity": 2},
        headers={"Idempotency-Key": f"parallel-{loser}"},
    )
    assert again.status_code == 409


@BOTH_BACKENDS
@pytest.mark.parametrize(
    ("body", "headers", "status", "error_type"),
    [
        ({"plan": "pro-monthly\x00"}, {}, 422, "invalid_input"),
        # Plan codes are lower-case letters, digits, '-' and '_': no such plan.
        ({"plan": "pro-\U0001f4b8-monthly"}, {}, 422, "unknown_plan"),
        ({"plan": "p" * 10_000}, {}, 413, "payload_too_large"),
        ({"quantity": 2}, {"Idempotency-Key": "k" * 10_000}, 422, "invalid_input"),
        ({"quantity": 2}, {"Idempotency-Key": "4242 4242 4242 4242"}, 422, "invalid_input"),
    ],
    ids=["nul", "emoji", "10k-plan", "10k-key", "card-key"],
)
async def test_hostile_plan_codes_and_keys_are_refused_and_write_nothing(
    api: Api, body: dict[str, Any], headers: dict[str, str], status: int, error_type: str
) -> None:
    sub = await active_subscription(api)
    before = row_counts(api.harness)
    # The preview takes no Idempotency-Key (it writes nothing): only the body is checked.
    paths = ["change-plan"] + ([] if headers else ["change-plan/preview"])
    for path in paths:
        answer = await api.request(
            "POST",
            f"/v1/subscriptions/{sub['id']}/{path}",
            scope="admin",
            json=body,
            headers=headers,
        )
        assert (answer.status_code, answer.json()["error"]["type"]) == (status, error_type), (
            path,
            answer.text[:300],
        )
        assert "4242 4242 4242 4242" not in answer.text
    assert row_counts(api.harness) == before
    with unit_of_work(api.harness.session_factory) as session:
        assert session.execute(select(models.PLAN_CHANGE_REQUESTS.c.id)).first() is None
    state = await api.harness.state(sub["id"])
    assert (state.plan_code, state.quantity) == ("basic-monthly", 1)
