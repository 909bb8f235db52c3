"""A full run through the API for the security tests: signups that are charged (one card
works, one is declined and then replaced), Stripe webhooks (signed, unsigned, forged), the
finance reads, and the refusals (401, 403, 404, 422). Every answer is kept, and every log
record of every logger at DEBUG is captured while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from db.engine import unit_of_work
from db.repositories import customers, subscriptions
from tests.api.support import Api, auth
from tests.api.webhook_fixtures import sign, wait_until

#: Loggers that are quiet by default and would say the most at DEBUG.
NOISY_LOGGERS = (
    "",
    "billing",
    "billing.api",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "httpx",
    "httpcore",
    "stripe",
    "temporalio",
    "sqlalchemy.engine",
    "alembic",
)


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        # format() renders the message, its arguments and any traceback.
        self.lines.append(self.format(record))


@contextlib.contextmanager
def every_log_record() -> Iterator[list[str]]:
    """All log records of every logger, at DEBUG, formatted with tracebacks."""
    keep = _Keep()
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    root.addHandler(keep)
    try:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)
        yield keep.lines
    finally:
        root.removeHandler(keep)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class Cards:
    """Payment methods made from test card numbers before anything is captured (the test
    helper sends raw numbers to localstripe; the service never sees them)."""

    good: str
    declining: str
    replacement: str
    via_webhook: str


async def make_cards(api: Api) -> Cards:
    h = api.harness
    return Cards(
        good=await h.to_thread_card(SUCCEEDS),
        declining=await h.to_thread_card(DECLINES_AFTER_ATTACH),
        replacement=await h.to_thread_card(SUCCEEDS),
        via_webhook=await h.to_thread_card(SUCCEEDS),
    )


@dataclass
class Run:
    responses: list[httpx.Response] = field(default_factory=list)

    def text(self) -> str:
        """Every answer: status, headers and body."""
        return "\n".join(f"{r.status_code} {dict(r.headers)} {r.text}" for r in self.responses)


async def full_run(api: Api, cards: Cards) -> Run:
    run = Run()
    harness = api.harness

    async def call(method: str, path: str, **kwargs: object) -> httpx.Response:
        response = await api.request(method, path, **kwargs)  # type: ignore[arg-type]
        run.responses.append(response)
        return response

    def signup_body(card: str, who: str) -> dict[str, object]:
        return {
            "plan": "basic-monthly",
            "payment_method_id": card,
            "customer": {"email": f"{who}@example.com", "name": who.title(), "timezone": "UTC"},
        }

    paid = await call(
        "POST", "/v1/subscriptions", scope="signup", json=signup_body(cards.good, "ada")
    )
    assert paid.status_code == 201, paid.text
    failing = await call(
        "POST", "/v1/subscriptions", scope="signup", json=signup_body(cards.declining, "bob")
    )
    assert failing.status_code == 201, failing.text
    paid_id, failing_id = paid.json()["id"], failing.json()["id"]
    for sub_id in (paid_id, failing_id):
        await harness.track(sub_id)
    await harness.wait_for(paid_id, lambda v: v.invoices_issued == 1 and v.open_invoice is None)
    await harness.wait_for(failing_id, lambda v: v.open_invoice is not None)

    # The declined invoice is paid with a new card (a charge retried at once).
    changed = await call(
        "POST",
        f"/v1/subscriptions/{failing_id}/payment-method",
        scope="admin",
        json={"payment_method_id": cards.replacement},
    )
    assert changed.status_code == 200, changed.text
    await harness.wait_for(failing_id, lambda v: v.open_invoice is None)

    # Stripe's news: a signed card change for the first customer, then forgeries.
    with unit_of_work(harness.session_factory) as session:
        record = subscriptions.get_subscription(session, paid_id)
        assert record is not None
        customer = customers.get_customer(session, record.customer_id)
    assert customer is not None and customer.stripe_customer_id
    stripe_customer_id = customer.stripe_customer_id

    def change_the_default_at_stripe() -> None:
        # The change must be real: the endpoint checks card news against Stripe's own record
        # of the customer's default (a read), and acts on nothing else.
        harness.stripe.v1.payment_methods.attach(
            cards.via_webhook, params={"customer": stripe_customer_id}
        )
        harness.stripe.v1.customers.update(
            stripe_customer_id,
            params={"invoice_settings": {"default_payment_method": cards.via_webhook}},
        )

    await asyncio.to_thread(change_the_default_at_stripe)
    event = json.dumps(
        {
            "id": "evt_security_run",
            "type": "customer.updated",
            "created": int(time.time()) + 1,
            "data": {
                "object": {
                    "id": customer.stripe_customer_id,
                    "object": "customer",
                    "invoice_settings": {"default_payment_method": cards.via_webhook},
                }
            },
        }
    ).encode()
    signed = await call(
        "POST",
        "/v1/webhooks/stripe",
        content=event,
        headers={"Content-Type": "application/json", "Stripe-Signature": sign(event)},
    )
    assert signed.status_code == 200 and signed.json()["outcome"] == "routed", signed.text

    def on_record() -> bool:
        with unit_of_work(harness.session_factory) as session:
            current = customers.get_customer(session, customer.id)
        return current is not None and current.default_payment_method_id == cards.via_webhook

    await wait_until(on_record, timeout=20, what="the webhook's card on record")
    await call("POST", "/v1/webhooks/stripe", content=event)  # unsigned
    await call(
        "POST",
        "/v1/webhooks/stripe",
        content=event,
        headers={"Stripe-Signature": sign(event, secret="whsec_someone_else_0000")},
    )

    # Finance reads, and refusals of every kind.
    listing = await call("GET", "/v1/invoices", scope="finance")
    invoice_id = listing.json()["data"][0]["id"]
    await call("GET", f"/v1/invoices/{invoice_id}", scope="finance")
    await call("GET", "/v1/invoices.csv", scope="admin")
    await call("GET", f"/v1/subscriptions/{paid_id}", scope="finance")
    await call("GET", "/v1/invoices", headers={"Authorization": "Bearer wrong-key-000000000000"})
    await call("GET", "/v1/invoices", headers=auth("signup"))
    await call("GET", "/v1/invoices/in_missing", scope="finance")
    await call("POST", "/v1/subscriptions", scope="signup", json={"plan": "nope"})
    await call("POST", "/v1/subscriptions", scope="signup", content=b"{not json")
    return run
