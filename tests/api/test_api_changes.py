"""Changes through the API run the workflow's Updates: cancel (at period end, then refused
with the workflow's reason), pause and resume, and card changes (a card refused at attach is
402 and changes nothing)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from dateutil.relativedelta import relativedelta
from temporalio.testing import WorkflowEnvironment

from billing.api import create_app
from billing.invoices import InvoiceStatus
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINED_AT_ATTACH, DECLINES_AFTER_ATTACH, SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from db.engine import unit_of_work
from db.repositories import customers as customers_repo
from tests.api.support import Api, SlowToAttach, api_settings, eventually

DAY = timedelta(days=1)


def instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


async def anchored_signup(api: Api, *, card: str = SUCCEEDS) -> tuple[str, datetime]:
    """A basic-monthly subscription whose first billing date is tomorrow, on the hour."""
    now = await api.harness.now()
    anchor = now.replace(minute=0, second=0, microsecond=0) + DAY
    body = await api.signed_up(
        "basic-monthly", card=card, billing_anchor_at=anchor.isoformat().replace("+00:00", "Z")
    )
    assert instant(body["next_billing_at"]) == anchor
    return body["id"], anchor


async def change(
    api: Api, sub_id: str, action: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    response = await api.request(
        "POST", f"/v1/subscriptions/{sub_id}/{action}", scope="admin", **kwargs
    )
    return response.status_code, response.json()


def default_card(api: Api, sub_id: str) -> str | None:
    """The card the customer's invoices are charged to, as the database has it."""
    customer_id = api.harness.snapshot(sub_id).subscription.customer_id
    with unit_of_work(api.harness.session_factory) as session:
        customer = customers_repo.get_customer(session, customer_id)
    assert customer is not None
    return customer.default_payment_method_id


async def read(api: Api, sub_id: str) -> dict[str, Any]:
    response = await api.request("GET", f"/v1/subscriptions/{sub_id}", scope="finance")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_cancel_at_period_end_then_a_second_cancel_is_refused_with_the_reason(
    api: Api,
) -> None:
    sub_id, anchor = await anchored_signup(api)
    await api.harness.advance_to(anchor + 3 * DAY)

    status, body = await change(
        api, sub_id, "cancel", {"at_period_end": True, "reason": "too expensive"}
    )
    assert status == 200, body
    period_end = anchor + relativedelta(months=1)
    assert body == {
        "subscription_id": sub_id,
        "status": "active",
        "cancel_at_period_end": True,
        "ends_at": period_end.isoformat().replace("+00:00", "Z"),
        "voided_invoice_id": None,
    }
    view = await read(api, sub_id)
    assert view["live"] is True
    assert view["cancel_at_period_end"] is True
    assert view["next_billing_at"] is None
    assert view["cancel_reason"] == "too expensive"

    status, refused = await change(api, sub_id, "cancel", {})  # at_period_end defaults to true
    assert status == 409
    assert refused["error"]["type"] == "change_refused"
    assert (
        f"subscription {sub_id} is already set to cancel at period end"
        in (refused["error"]["message"])
    )

    # Ending now is still allowed; once the workflow has finished, every change is refused.
    status, body = await change(api, sub_id, "cancel", {"at_period_end": False})
    assert status == 200 and body["status"] == "canceled"
    await api.harness.handle(sub_id).result()
    for action, payload in (("pause", None), ("cancel", {"at_period_end": False})):
        status, refused = await change(api, sub_id, action, payload)
        assert status == 409, refused
        assert f"subscription {sub_id} is canceled" in refused["error"]["message"]
    snap = api.harness.snapshot(sub_id)
    assert snap.subscription.status == SubscriptionStatus.CANCELED
    assert [i.status for i in snap.invoices] == [InvoiceStatus.PAID]


async def test_pause_and_resume_keep_the_anchor(api: Api) -> None:
    sub_id, anchor = await anchored_signup(api)
    await api.harness.advance_to(anchor + 5 * DAY)

    status, paused = await change(api, sub_id, "pause")  # no body at all
    assert status == 200, paused
    assert paused["status"] == "paused" and paused["paused_at"] is not None
    view = await read(api, sub_id)
    assert (view["status"], view["next_billing_at"]) == ("paused", None)

    status, refused = await change(api, sub_id, "pause", {"reason": "again"})
    assert status == 409
    assert refused["error"]["message"] == f"subscription {sub_id} is already paused"

    await api.harness.advance_to(anchor + relativedelta(months=2, days=10))
    status, resumed = await change(api, sub_id, "resume", {})
    assert status == 200, resumed
    assert resumed["status"] == "active"
    # Billing restarts on the anchor's next date; the periods spent paused are not billed.
    assert instant(resumed["next_billing_at"]) == anchor + relativedelta(months=3)
    view = await read(api, sub_id)
    assert (view["status"], view["paused_at"]) == ("active", None)
    assert instant(view["next_billing_at"]) == anchor + relativedelta(months=3)
    assert view["invoices_issued"] == 1
    # The status log: each change once, at the instant the workflow decided it.
    await api.harness.wait_until_at_rest([sub_id])
    view = await read(api, sub_id)
    history = [(c["from_status"], c["to_status"]) for c in view["status_history"]]
    assert history == [("pending", "active"), ("active", "paused"), ("paused", "active")]
    assert instant(view["status_history"][1]["changed_at"]) == instant(paused["paused_at"])

    status, refused = await change(api, sub_id, "resume")
    assert status == 409
    assert "is active, not paused" in refused["error"]["message"]


async def test_a_card_refused_at_attach_is_402_and_changes_nothing(api: Api) -> None:
    sub_id, anchor = await anchored_signup(api)
    await api.harness.advance_to(anchor + DAY)
    card_before = default_card(api, sub_id)
    declined = await api.harness.to_thread_card(DECLINED_AT_ATTACH)

    status, refused = await change(api, sub_id, "payment-method", {"payment_method_id": declined})

    assert status == 402, refused
    assert refused["error"]["type"] == "payment_method_rejected"
    assert "card_declined" in refused["error"]["message"]
    assert default_card(api, sub_id) == card_before
    view = await read(api, sub_id)
    assert view["status"] == "active"
    assert instant(view["next_billing_at"]) == anchor + relativedelta(months=1)

    good = await api.harness.to_thread_card(SUCCEEDS)
    status, body = await change(api, sub_id, "payment-method", {"payment_method_id": good})
    assert status == 200, body
    assert body["card_last4"] == "4242" and body["retry_scheduled"] is False
    assert default_card(api, sub_id) == body["payment_method_id"] != card_before


async def test_a_new_card_retries_the_past_due_invoice_at_once(api: Api) -> None:
    body = await api.signed_up("basic-monthly", card=DECLINES_AFTER_ATTACH)
    sub_id = body["id"]
    # The workflow records past_due (an activity) before it schedules the retry: wait for both.
    await api.harness.wait_for(
        sub_id,
        lambda v: (
            v.status == SubscriptionStatus.PAST_DUE
            and v.open_invoice is not None
            and v.open_invoice.next_retry_at is not None
        ),
    )

    view = await read(api, sub_id)
    assert view["status"] == "past_due"
    assert view["open_invoice"]["attempts"] == 1
    assert view["open_invoice"]["next_retry_at"] is not None
    status, refused = await change(api, sub_id, "pause")
    assert status == 409 and "has unpaid invoice" in refused["error"]["message"]

    good = await api.harness.to_thread_card(SUCCEEDS)
    status, changed = await change(api, sub_id, "payment-method", {"payment_method_id": good})
    assert status == 200, changed
    assert changed["retry_scheduled"] is True

    await api.harness.wait_for(sub_id, lambda v: v.open_invoice is None)
    snap = api.harness.snapshot(sub_id)
    assert [i.status for i in snap.invoices] == [InvoiceStatus.PAID]
    assert [a.reason for a in snap.attempts[snap.invoices[0].id]] == [
        "scheduled",
        "payment_method_updated",
    ]


@pytest.mark.parametrize("action", ["cancel", "pause", "resume", "payment-method"])
async def test_changes_to_an_unknown_subscription_are_404(api: Api, action: str) -> None:
    body = {"payment_method_id": "pm_x"} if action == "payment-method" else None
    status, refused = await change(api, "sub_doesnotexist", action, body)
    assert status == 404
    assert refused["error"] == {
        "type": "not_found",
        "message": "subscription 'sub_doesnotexist' not found",
        "field": "id",
    }


async def test_change_bodies_are_validated(api: Api) -> None:
    sub_id, _ = await anchored_signup(api)
    status, refused = await change(api, sub_id, "payment-method", {})
    assert status == 422
    assert refused["error"]["message"] == "field 'payment_method_id' is required"
    status, refused = await change(api, sub_id, "cancel", {"at_period_end": "yes"})
    assert status == 422
    assert "field 'at_period_end' input should be a valid boolean" in refused["error"]["message"]


async def test_a_change_that_takes_too_long_answers_504_and_is_still_applied(
    temporal_env: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = SlowToAttach(None)  # type: ignore[arg-type]
    async with BillingHarness(
        temporal_env,
        database_url=database_url,
        stripe_api_base=localstripe.url,
        wrap_gateway=gateway.wrap,
    ) as harness:
        app = create_app(api_settings(harness), deps=harness.deps, temporal=harness.client)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
            api = Api(http, harness)
            sub_id, _ = await anchored_signup(api)
            card_before = default_card(api, sub_id)
            new_card = await harness.to_thread_card(SUCCEEDS)
            monkeypatch.setattr(
                "billing.api.subscriptions.CHANGE_RESULT_TIMEOUT", timedelta(seconds=0.5)
            )
            gateway.slow.set()
            try:
                status, body = await change(
                    api, sub_id, "payment-method", {"payment_method_id": new_card}
                )
                assert status == 504, body
                assert body["error"]["type"] == "change_pending"
                assert "accepted" in body["error"]["message"]
                assert default_card(api, sub_id) == card_before
            finally:
                gateway.release.set()
            await eventually(lambda: default_card(api, sub_id) not in (None, card_before))
