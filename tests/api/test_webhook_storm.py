"""Issue 11, finding 5: the webhook storm. A change of default card that Stripe reports must
never cause another write to Stripe, or Stripe reports that write too, and so on: several
subscriptions of one customer signed up within a second once set off 3,580 webhook events in
9 minutes (customer.updated -> payment_method_changed -> attach -> customer.updated ...).

Everything here is real: the API app (signup endpoint and webhook endpoint) served by uvicorn
on a real port, localstripe signing and delivering its own events to it over HTTP, the worker
running the subscription workflows on the time-skipping server, a real database. Writes to
Stripe are counted on the wire (the Stripe SDK's recording HTTP client, shared by the API's
signups and the worker's activities).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from activities.stripe_gateway import StripeGateway, make_stripe_client
from billing.api import create_app
from billing.api.webhooks import WEBHOOK_PATH, webhook_router
from billing.contracts import (
    SubscriptionMessage,
    UpdatePaymentMethodInput,
    UpdatePaymentMethodResult,
)
from billing.invoices import InvoiceStatus
from billing.records import WebhookEventRecord, WebhookOutcome
from billing.settings import ApiKey, Settings
from billing.subscription import SubscriptionStatus
from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LOCALSTRIPE_API_KEY, LocalStripe
from db.engine import unit_of_work
from db.repositories import customers, subscriptions
from tests.api.support import API_KEYS, auth
from tests.api.test_webhooks import settled, signals_received
from tests.api.webhook_fixtures import (
    CAPTURE_PATH,
    TOLERANCE_SECONDS,
    WEBHOOK_SECRET,
    Delivery,
    WebhookServer,
    WebhookStack,
    localstripe_fixture,  # noqa: F401  (a fixture, registered under its short name)
    register_localstripe_webhook,
    sign,
    wait_until,
    webhook_harness_fixture,  # noqa: F401  (a fixture, registered under its short name)
    webhook_stack_fixture,  # noqa: F401  (a fixture, registered under its short name)
)
from tests.conftest import BOTH_BACKENDS

DAY = timedelta(days=1)
#: Subscriptions signed up at once for a customer who already has one.
CONCURRENT_SIGNUPS = 5
#: "The count stops growing": no new event for this long after the last one. localstripe
#: delivers an event about 1 s after it happens; a storm makes one every few hundred ms.
QUIET_SECONDS = 10.0
#: How long a test may watch for the events to stop before it calls it a storm.
STORM_TIMEOUT_SECONDS = 60.0


# ---- the whole API on a real port ------------------------------------------------------------


@pytest.fixture(name="api_stack")
def api_stack_fixture(webhook_harness: BillingHarness, localstripe: LocalStripe) -> Iterator[Any]:
    """The API app as production builds it (``create_app`` with the webhook router), served by
    uvicorn; localstripe delivers its events to the app's webhook endpoint."""
    harness = webhook_harness
    settings = Settings(
        _env_file=None,
        environment="test",
        database_url=harness.database_url,
        task_queue=harness.task_queue,
        api_keys=[
            ApiKey(name=f"{scope}-key", scope=scope, key=SecretStr(key))
            for scope, key in API_KEYS.items()
        ],
        stripe_webhook_secret=SecretStr(WEBHOOK_SECRET),
        stripe_webhook_tolerance_seconds=TOLERANCE_SECONDS,
    )
    app = create_app(
        settings, deps=harness.deps, temporal=harness.client, include_routers=[webhook_router()]
    )
    with WebhookServer(app) as server:
        stack = WebhookStack(harness, localstripe, server, app)
        stack.listen(WEBHOOK_PATH)
        try:
            yield stack
        finally:
            register_localstripe_webhook(
                localstripe, server.url + CAPTURE_PATH, events=["billing.tests.none"]
            )


async def signup_over_http(
    stack: WebhookStack, external_id: str, payment_method_id: str
) -> httpx.Response:
    """``POST /v1/subscriptions`` on the served app, for the customer ``external_id``. A trial,
    so no charge happens while the test watches: the only provider events are the customer's
    (its creation, and the default card each signup sets)."""
    await stack.harness.now()  # the API's clock reads the server's time
    async with httpx.AsyncClient(base_url=stack.server.url, timeout=60) as client:
        response = await client.post(
            "/v1/subscriptions",
            headers=auth("signup"),
            json={
                "plan": "basic-monthly",
                "customer": {
                    "external_id": external_id,
                    "email": "storm@example.com",
                    "timezone": "UTC",
                },
                "payment_method_id": payment_method_id,
                "trial_days": 14,
            },
        )
    if response.status_code == 201:
        await stack.harness.track(response.json()["id"])
    return response


def stripe_customer_of(stack: WebhookStack, subscription_id: str) -> tuple[str, str]:
    """(our customer id, its Stripe customer id)."""
    with unit_of_work(stack.harness.session_factory) as session:
        subscription = subscriptions.get_subscription(session, subscription_id)
        assert subscription is not None
        customer = customers.get_customer(session, subscription.customer_id)
    assert customer is not None and customer.stripe_customer_id is not None
    return customer.id, customer.stripe_customer_id


def about(event: dict[str, Any], stripe_customer: str) -> bool:
    obj = event["data"]["object"]
    return bool(obj.get("id") == stripe_customer or obj.get("customer") == stripe_customer)


def localstripe_events(stack: WebhookStack, stripe_customer: str) -> list[dict[str, Any]]:
    """localstripe's own record of the events about the customer (what it will deliver)."""
    events: list[dict[str, Any]] = []
    starting_after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if starting_after:
            params["starting_after"] = starting_after
        page = httpx.get(
            f"{stack.localstripe.url}/v1/events",
            params=params,
            headers={"Authorization": f"Bearer {LOCALSTRIPE_API_KEY}"},
            timeout=10,
        ).json()
        events.extend(e for e in page["data"] if about(e, stripe_customer))
        if not page.get("has_more") or not page["data"]:
            return events
        starting_after = page["data"][-1]["id"]


def writes(harness: BillingHarness, start: int = 0) -> list[str]:
    """The paths of the POSTs (every write) sent to Stripe, from the ``start``-th request."""
    return [r.path for r in harness.http_client.recorded[start:] if r.method == "POST"]


def recorded_about(stack: WebhookStack, stripe_customer: str) -> list[WebhookEventRecord]:
    """The recorded webhook events about the customer. (A delivery of an earlier test's event
    can still arrive here: localstripe picks the endpoint when it sends, a second late.)"""
    ours = {d.event["id"] for d in stack.deliveries() if about(d.event, stripe_customer)}
    return [e for e in stack.events() if e.id in ours]


async def until_quiet(stack: WebhookStack, stripe_customer: str, bound: int) -> int:
    """Watch the recorded webhook events about the customer until all ``bound`` expected ones
    are in and none has arrived for ``QUIET_SECONDS``; fail at once if they exceed ``bound``
    (a storm), or if that does not happen within ``STORM_TIMEOUT_SECONDS``. Returns the
    count."""
    started = time.monotonic()
    count, changed_at = len(recorded_about(stack, stripe_customer)), started
    while count < bound or time.monotonic() - changed_at < QUIET_SECONDS:
        now_count = len(recorded_about(stack, stripe_customer))
        if now_count != count:
            count, changed_at = now_count, time.monotonic()
        if count > bound or time.monotonic() - started > STORM_TIMEOUT_SECONDS:
            kinds = Counter(
                f"{e.type}: {e.outcome}" for e in recorded_about(stack, stripe_customer)
            )
            raise AssertionError(
                f"{count} webhook events (bound {bound}) after "
                f"{time.monotonic() - started:.0f} s: {dict(kinds)}; "
                f"writes to Stripe: {Counter(writes(stack.harness)).most_common(4)}"
            )
        await asyncio.sleep(0.25)
    return count


@BOTH_BACKENDS
async def test_concurrent_signups_for_one_customer_make_a_bounded_number_of_events_that_stops(
    api_stack: WebhookStack,
) -> None:
    """A customer with a subscription signs up for ``CONCURRENT_SIGNUPS`` more at once, each
    with a new card. The first signup creates the Stripe customer with its card as the
    default in one request: customer.created only. Each later signup makes its card the
    customer's default at Stripe: one customer.updated each. Their news reaches every
    subscription (the deliveries overtake each other, so most of them name a card other than
    the one on record), and none of that writes to Stripe. So the events are exactly:
    customer.created once, customer.updated once per later signup (``CONCURRENT_SIGNUPS + 1``
    in all), every one delivered and recorded, and then no more: the count is unchanged
    ``QUIET_SECONDS`` after the last delivery."""
    stack, harness = api_stack, api_stack.harness
    external_id = "storm-customer"
    first_card = await harness.to_thread_card(SUCCEEDS)
    first = await signup_over_http(stack, external_id, first_card)
    assert first.status_code == 201, first.text
    customer_id, stripe_customer = stripe_customer_of(stack, first.json()["id"])

    cards = [await harness.to_thread_card(SUCCEEDS) for _ in range(CONCURRENT_SIGNUPS)]
    answers = await asyncio.gather(*(signup_over_http(stack, external_id, c) for c in cards))
    assert [a.status_code for a in answers] == [201] * CONCURRENT_SIGNUPS, [a.text for a in answers]
    assert {a.json()["customer_id"] for a in answers} == {customer_id}
    after_signups = len(harness.http_client.recorded)
    signups = CONCURRENT_SIGNUPS + 1

    # The bound: the customer's creation with its first card (one request, issue 16), and one
    # change of default per later signup.
    bound = 1 + CONCURRENT_SIGNUPS
    count = await until_quiet(stack, stripe_customer, bound)
    assert count == bound

    events = localstripe_events(stack, stripe_customer)
    assert Counter(e["type"] for e in events) == {
        "customer.created": 1,
        "customer.updated": CONCURRENT_SIGNUPS,
    }
    recorded = recorded_about(stack, stripe_customer)
    assert sorted(r.id for r in recorded) == sorted(e["id"] for e in events)
    assert all(r.processed_at is not None for r in recorded)
    # Each signup's own write to Stripe, and nothing after the last signup answered: the news
    # of those writes (routed to the workflows, or recognised as known) wrote nothing.
    assert writes(harness, after_signups) == []
    assert Counter(writes(harness))["/v1/customers"] == 1
    assert Counter(writes(harness))[f"/v1/customers/{stripe_customer}"] == CONCURRENT_SIGNUPS
    # The signups' writes reached Stripe and our database in different orders; the news,
    # checked against Stripe, leaves our record on the card Stripe charges.
    at_stripe = harness.stripe.v1.customers.retrieve(stripe_customer)
    assert at_stripe.invoice_settings is not None
    with unit_of_work(harness.session_factory) as session:
        record = customers.get_customer(session, customer_id)
    assert record is not None
    assert record.default_payment_method_id == at_stripe.invoice_settings.default_payment_method
    # The same on localstripe's side of the wire (its record of its deliveries).
    delivered = [d for d in stack.deliveries() if about(d.event, stripe_customer)]
    assert len(delivered) == bound and {d.status for d in delivered} == {200}

    # Each subscription heard of each change at most twice (from the signup that made it, and
    # from Stripe's news of it when that was routed), and ended up trialing, with no charge
    # attempted and nothing parked.
    subscription_ids = [first.json()["id"], *(a.json()["id"] for a in answers)]
    await harness.wait_until_at_rest(subscription_ids)
    changed = SubscriptionMessage.PAYMENT_METHOD_CHANGED
    routed = [r for r in recorded if r.outcome == WebhookOutcome.ROUTED]
    for subscription_id in subscription_ids:
        assert await signals_received(harness, subscription_id, changed) <= signups + len(routed)
        state = await harness.state(subscription_id)
        assert state.status == SubscriptionStatus.TRIALING, state
        assert state.open_invoice is None and state.invoices_issued == 0


# ---- one change, delivered twice and out of order ---------------------------------------------


def set_default_card_at_stripe(stack: WebhookStack, stripe_customer: str, number: str) -> str:
    """The customer changes the default card in Stripe's own pages; only the webhook tells us."""
    client = stack.harness.stripe
    pm = stack.harness.card(number)
    client.v1.payment_methods.attach(pm, params={"customer": stripe_customer})
    client.v1.customers.update(
        stripe_customer, params={"invoice_settings": {"default_payment_method": pm}}
    )
    return pm


async def captured_change(stack: WebhookStack, stripe_customer: str, pm: str) -> Delivery:
    """localstripe's signed customer.updated naming ``pm`` as the default, as captured."""

    def found() -> list[Delivery]:
        return [
            d
            for d in stack.deliveries("customer.updated", path=CAPTURE_PATH)
            if d.event["data"]["object"]["id"] == stripe_customer
            and d.event["data"]["object"]["invoice_settings"]["default_payment_method"] == pm
        ]

    [delivery] = await wait_until(found, what=f"localstripe's news of {pm}")
    return delivery


@BOTH_BACKENDS
async def test_one_change_delivered_twice_at_once_and_behind_an_older_one_acts_once(
    webhook_stack: WebhookStack,
) -> None:
    """Stripe delivers at least once and in any order. A past-due subscription's customer
    sets a declining card and then, a second later, a good one, at Stripe. localstripe's two
    genuine signed events reach us in the worst order: the newer change twice at the same
    moment, again later, and then the older change. The newer card is tried once and pays;
    the older news is stale; nothing is written to Stripe; the workflow hears the news once."""
    stack, harness = webhook_stack, webhook_stack.harness
    now = await harness.now()
    anchor = now.replace(minute=0, second=0, microsecond=0) + DAY
    sub = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + timedelta(hours=1))
    state = await harness.state(sub.subscription_id)
    assert state.status == SubscriptionStatus.PAST_DUE
    _, stripe_customer = stripe_customer_of(stack, sub.subscription_id)

    # Hold localstripe's deliveries, to hand them to the endpoint in an order of our choosing.
    stack.listen(CAPTURE_PATH)
    older_card = await asyncio.to_thread(
        set_default_card_at_stripe, stack, stripe_customer, DECLINES_AFTER_ATTACH
    )
    await asyncio.sleep(1.1)  # Stripe's ``created`` counts seconds: the newer one is later
    newer_card = await asyncio.to_thread(
        set_default_card_at_stripe, stack, stripe_customer, SUCCEEDS
    )
    older = await captured_change(stack, stripe_customer, older_card)
    newer = await captured_change(stack, stripe_customer, newer_card)
    assert older.event["created"] < newer.event["created"]
    stack.listen(WEBHOOK_PATH)
    writes_before = len(harness.http_client.recorded)

    # The same event twice at once: one delivery acts on it, the other is told it is a
    # duplicate, or that it is in progress (409: Stripe retries it later).
    answers = await asyncio.gather(
        stack.post(newer.body, sign(newer.body)), stack.post(newer.body, sign(newer.body))
    )
    bodies = sorted(json.dumps(a.json(), sort_keys=True) for a in answers)
    assert sorted(a.status_code for a in answers) in ([200, 200], [200, 409]), bodies
    assert sum(a.json().get("outcome") == WebhookOutcome.ROUTED for a in answers) == 1, bodies
    snap = await wait_until(settled(harness, sub.subscription_id), timeout=20, what="paid")

    again = await stack.post(newer.body, sign(newer.body))
    assert again.json() == {"received": True, "duplicate": True}
    late = await stack.post(older.body, sign(older.body))
    assert late.status_code == 200 and late.json()["outcome"] == WebhookOutcome.IGNORED
    stale = stack.event(older.event["id"])
    assert stale is not None and "stale" in (stale.detail or "")

    await harness.wait_until_at_rest([sub.subscription_id])
    snap = harness.snapshot(sub.subscription_id)
    [invoice] = snap.invoices
    assert invoice.status == InvoiceStatus.PAID
    attempts = snap.attempts[invoice.id]
    assert [(a.status, a.reason) for a in attempts] == [
        ("failed", "scheduled"),
        ("succeeded", "payment_method_updated"),
    ]
    assert attempts[1].payment_method_id == newer_card
    assert len(snap.payments[invoice.id]) == 1
    changed = SubscriptionMessage.PAYMENT_METHOD_CHANGED
    assert await signals_received(harness, sub.subscription_id, changed) == 1
    # The charge is the only thing sent to Stripe after the news; its default stays the card
    # the customer chose last, in our record too.
    assert [p for p in writes(harness, writes_before) if p.startswith("/v1/customers")] == []
    assert not any("/attach" in p for p in writes(harness, writes_before))
    at_stripe = harness.stripe.v1.customers.retrieve(stripe_customer)
    assert at_stripe.invoice_settings is not None
    assert at_stripe.invoice_settings.default_payment_method == newer_card
    with unit_of_work(harness.session_factory) as session:
        record = customers.get_customer_by_stripe_id(session, stripe_customer)
    assert record is not None and record.default_payment_method_id == newer_card


# ---- a card update through the API, with Stripe's news of it live -----------------------------


async def test_an_api_card_update_reaches_the_sibling_once_and_its_echo_acts_on_nothing(
    webhook_stack: WebhookStack,
) -> None:
    """Two past-due subscriptions of one customer; the customer gives a new card for the first
    through the API. The attach is the one write to Stripe's customer; the workflow passes the
    card to the sibling itself, and Stripe's news of that write (customer.updated) is
    recognised as ours: each invoice is tried once more, with the new card, and paid."""
    stack, harness = webhook_stack, webhook_stack.harness
    now = await harness.now()
    anchor = now.replace(minute=0, second=0, microsecond=0) + DAY
    external_id = "api-update-customer"
    first = await harness.signup(
        "basic-monthly",
        card=DECLINES_AFTER_ATTACH,
        billing_anchor_at=anchor,
        external_id=external_id,
    )
    sibling = await harness.signup(
        "basic-monthly", billing_anchor_at=anchor, external_id=external_id
    )
    await harness.advance_to(anchor + timedelta(hours=1))
    for sub in (first, sibling):
        state = await harness.state(sub.subscription_id)
        assert state.status == SubscriptionStatus.PAST_DUE and state.open_invoice is not None
        assert state.open_invoice.first_failure_at is not None
        # A soft decline: its next retry is a day away, not now.
        assert state.open_invoice.next_retry_at == state.open_invoice.first_failure_at + DAY
    _, stripe_customer = stripe_customer_of(stack, first.subscription_id)

    good_card = await harness.to_thread_card(SUCCEEDS)
    before = len(harness.http_client.recorded)
    await harness.update(
        first.subscription_id,
        SubscriptionMessage.UPDATE_PAYMENT_METHOD,
        UpdatePaymentMethodInput(payment_method_id=good_card),
        UpdatePaymentMethodResult,
    )
    for sub in (first, sibling):
        await wait_until(settled(harness, sub.subscription_id), timeout=20, what="paid")

    def echo() -> list[Delivery]:
        return [
            d
            for d in stack.deliveries("customer.updated")
            if d.event["data"]["object"]["id"] == stripe_customer
            and d.event["data"]["object"]["invoice_settings"]["default_payment_method"] == good_card
        ]

    [news] = await wait_until(echo, what="Stripe's news of the attach")
    await asyncio.sleep(3)  # time for any further news to come
    assert echo() == [news]
    row = await wait_until(
        lambda: (r := stack.event(news.event["id"])) is not None and r.processed_at and r,
        what="the news processed",
    )
    assert row.outcome == WebhookOutcome.IGNORED, row
    assert "already the payment method on record" in (row.detail or "")

    posts = writes(harness, before)
    assert posts.count(f"/v1/customers/{stripe_customer}") == 1  # the attach's, nothing else
    assert posts.count(f"/v1/payment_methods/{good_card}/attach") == 1
    await harness.wait_until_at_rest([first.subscription_id, sibling.subscription_id])
    changed = SubscriptionMessage.PAYMENT_METHOD_CHANGED
    assert await signals_received(harness, first.subscription_id, changed) == 0
    assert await signals_received(harness, sibling.subscription_id, changed) == 1
    for sub in (first, sibling):
        snap = harness.snapshot(sub.subscription_id)
        [invoice] = snap.invoices
        assert [(a.status, a.reason) for a in snap.attempts[invoice.id]] == [
            ("failed", "scheduled"),
            ("succeeded", "payment_method_updated"),
        ], sub.subscription_id
        assert len(snap.payments[invoice.id]) == 1


async def test_stripe_unreachable_for_the_card_check_answers_503_and_the_retry_counts(
    webhook_stack: WebhookStack,
) -> None:
    """Card news is checked against Stripe (a read). If Stripe cannot be reached, the event is
    answered 503 and forgotten (not taken for done), so Stripe's retry acts on it."""
    stack, harness = webhook_stack, webhook_stack.harness
    now = await harness.now()
    anchor = now.replace(minute=0, second=0, microsecond=0) + DAY
    sub = await harness.signup(
        "basic-monthly", card=DECLINES_AFTER_ATTACH, billing_anchor_at=anchor
    )
    await harness.advance_to(anchor + timedelta(hours=1))
    _, stripe_customer = stripe_customer_of(stack, sub.subscription_id)
    stack.listen(CAPTURE_PATH)
    good_card = await asyncio.to_thread(
        set_default_card_at_stripe, stack, stripe_customer, SUCCEEDS
    )
    news = await captured_change(stack, stripe_customer, good_card)
    event_id = news.event["id"]

    # Nothing listens on port 1: the read of the customer's default card cannot connect.
    unreachable = StripeGateway(
        make_stripe_client(
            api_key=LOCALSTRIPE_API_KEY, api_base="http://127.0.0.1:1", max_network_retries=0
        )
    )
    stack.app.state.deps = dataclasses.replace(harness.deps, gateway=unreachable)
    response = await stack.post(news.body, sign(news.body))
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "provider_unavailable"
    assert "retry later" in response.json()["error"]["message"]
    assert stack.event(event_id) is None  # not taken for done
    changed = SubscriptionMessage.PAYMENT_METHOD_CHANGED
    assert await signals_received(harness, sub.subscription_id, changed) == 0

    stack.app.state.deps = harness.deps
    retried = await stack.post(news.body, sign(news.body))
    assert retried.json() == {"received": True, "event_id": event_id, "outcome": "routed"}
    await wait_until(settled(harness, sub.subscription_id), timeout=20, what="paid")
    assert await signals_received(harness, sub.subscription_id, changed) == 1
