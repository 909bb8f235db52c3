"""The action-required mail links to the page the payment provider gave for that payment
(Stripe's ``next_action.redirect_to_url.url``, asked for with a ``return_url``), not to a URL
built from a setting; without one it falls back to the setting, and without that it tells the
customer to sign in. Real subscription workflow, localstripe, real SMTP server."""

from __future__ import annotations

from email.message import EmailMessage

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.delivery import authentication_link
from billing.mail.render import NoticeContext, render_notice
from billing.notices import NoticeKind
from billing.testing.cards import REQUIRES_AUTHENTICATION
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from billing.testing.mail_sink import RecordingHandler, smtp_server
from db.engine import unit_of_work
from db.repositories import notifications as notifications_repo
from tests.delivery.support import delivery_activities, delivery_stack, wait_until

RETURN_URL = "https://shop.example/billing/authenticated"


def body(message: EmailMessage, kind: str) -> str:
    part = message.get_body(preferencelist=(kind,))
    assert part is not None
    return str(part.get_content())


@pytest.mark.parametrize("return_url", [RETURN_URL, None])
async def test_the_action_required_mail_links_to_the_providers_page(
    temporal_env: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
    return_url: str | None,
) -> None:
    handler = RecordingHandler()

    def kinds() -> list[str]:
        return [str(m.message()["X-Billing-Notice"]).split()[0] for m in handler.received]

    async with BillingHarness(
        temporal_env,
        database_url=database_url,
        stripe_api_base=localstripe.url,
        stripe_return_url=return_url,
    ) as harness:
        with smtp_server(handler) as port:
            activities = delivery_activities(harness.session_factory, port)
            async with delivery_stack(harness.client, activities):
                sub = await harness.signup("basic-monthly", card=REQUIRES_AUTHENTICATION)
                await harness.wait_for(sub.subscription_id, lambda v: v.status == "past_due")
                await wait_until(lambda: "action_required" in kinds(), what="the mail")
        with unit_of_work(harness.session_factory) as session:
            (notice,) = notifications_repo.list_notifications(
                session, subscription_id=sub.subscription_id, kind="action_required"
            )
        intent = harness.stripe.v1.payment_intents.retrieve(
            str(notice.payload["payment_intent_id"])
        )
    assert intent.status == "requires_action"
    message = next(
        m.message()
        for m in handler.received
        if str(m.message()["X-Billing-Notice"]).startswith("action_required")
    )
    text, html = body(message, "plain"), body(message, "html")
    assert intent.next_action is not None
    if return_url is not None:
        # What the provider answered, carried from the charge to the notice to the mail.
        assert intent.next_action.type == "redirect_to_url"
        page = intent.next_action.redirect_to_url.url
        assert intent.next_action.redirect_to_url.return_url == RETURN_URL
        assert notice.payload["authentication_url"] == page
        assert page in text and page.replace("&", "&amp;") in html
        assert "shop.example/pay/" not in text, "not the setting's URL"
    else:
        # No page from the provider (use_stripe_sdk): the setting's page for this payment.
        assert intent.next_action.type == "use_stripe_sdk"
        assert notice.payload["authentication_url"] is None
        assert f"https://shop.example/pay/{intent.id}" in text


def test_the_link_falls_back_and_without_any_the_mail_says_to_sign_in() -> None:
    given = "https://hooks.stripe.com/3d_secure_2/hosted?payment_intent=pi_1"
    setting = "https://shop.example/pay/{payment_intent_id}"
    assert authentication_link({"authentication_url": given}, setting) == given
    assert authentication_link({"payment_intent_id": "pi_1"}, setting) == (
        "https://shop.example/pay/pi_1"
    )
    # Only an https page the provider gave is linked.
    assert authentication_link({"authentication_url": "javascript:alert(1)"}, None) is None
    assert authentication_link({"payment_intent_id": "pi_1"}, None) is None
    mail = render_notice(
        NoticeContext(
            kind=NoticeKind.ACTION_REQUIRED,
            customer_name="Ada",
            locale="en",
            timezone="UTC",
            invoice_number="INV-1",
            amount_minor=900,
            currency="USD",
        )
    )
    assert "sign in to your account" in mail.text and "sign in to your account" in mail.html
