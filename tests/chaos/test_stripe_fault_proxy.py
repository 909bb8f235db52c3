"""The fault proxy of chaos runs, driven through the real gateway: a fault before forwarding
never reaches localstripe; a fault after forwarding loses an answer to work localstripe did,
and a retry under the same idempotency key gets that first answer back, as from real Stripe."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from activities.stripe_gateway import StripeGateway, make_stripe_client
from billing.payments import ChargeOutcomeKind, PaymentProviderError, TransientPaymentError
from billing.testing import cards
from billing.testing.localstripe import LocalStripe
from billing.testing.stripe_fault_proxy import FaultRates, StripeFaultProxy

API_KEY = "sk_test_localstripe"


@pytest.fixture
def proxy(localstripe: LocalStripe) -> Iterator[StripeFaultProxy]:
    with StripeFaultProxy(localstripe.url, FaultRates(), seed=7) as running:
        yield running
    localstripe.flush()


def gateway_through(proxy: StripeFaultProxy) -> StripeGateway:
    # No SDK retries: each gateway call is one request, so the test controls every fault.
    client = make_stripe_client(api_key=API_KEY, api_base=proxy.url, max_network_retries=0)
    return StripeGateway(client, send_description=False)


def customer_with_card(
    gateway: StripeGateway, localstripe: LocalStripe, card: str
) -> tuple[str, str]:
    direct = make_stripe_client(api_key=API_KEY, api_base=localstripe.url)
    customer = gateway.ensure_customer(customer_id=uuid.uuid4().hex, email=None, name=None)
    attached = gateway.attach_payment_method(
        provider_customer_id=customer,
        payment_method_id=cards.create_card_payment_method(direct, card),
    )
    return customer, attached.payment_method_id


def charge(gateway: StripeGateway, customer: str, card: str, key: str, amount: int = 900) -> Any:
    return gateway.charge(
        provider_customer_id=customer,
        payment_method_id=card,
        amount_minor=amount,
        currency="USD",
        idempotency_key=key,
        description="chaos proxy test",
        metadata={"invoice_id": key},
    )


def intents_for(localstripe: LocalStripe, key: str) -> list[Any]:
    direct = make_stripe_client(api_key=API_KEY, api_base=localstripe.url)
    found: list[Any] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = direct.v1.payment_intents.list(params=params)  # type: ignore[arg-type]
        found.extend(i for i in page.data if i.metadata.to_dict().get("invoice_id") == key)
        if not page.has_more or not page.data:
            return found
        params["starting_after"] = page.data[-1].id


def test_an_answer_lost_after_forwarding_is_replayed_under_the_same_key(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    gateway = gateway_through(proxy)
    customer, card = customer_with_card(gateway, localstripe, cards.SUCCEEDS)
    key = f"inv_{uuid.uuid4().hex[:8]}-attempt-1"
    proxy.rates = FaultRates(server_error=1.0, after_forward_share=1.0)

    with pytest.raises(TransientPaymentError):
        charge(gateway, customer, card, key)

    [charged] = intents_for(localstripe, key)  # localstripe did the work
    assert charged.status == "succeeded"
    proxy.rates = FaultRates()

    outcome = charge(gateway, customer, card, key)

    assert (outcome.kind, outcome.payment_intent_id) == (ChargeOutcomeKind.PAID, charged.id)
    assert len(intents_for(localstripe, key)) == 1
    assert proxy.stats.idempotent_replays == 1
    assert proxy.faults_injected() == {"stripe_5xx_after_forward": 1}
    assert proxy.stats.payment_intents_created[key] == [charged.id]


def test_a_declined_answer_is_replayed_too(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    gateway = gateway_through(proxy)
    customer, card = customer_with_card(gateway, localstripe, cards.DECLINES_AFTER_ATTACH)
    key = f"inv_{uuid.uuid4().hex[:8]}-attempt-1"
    proxy.rates = FaultRates(timeout=1.0, after_forward_share=1.0, timeout_hold_s=0.1)

    with pytest.raises(TransientPaymentError):
        charge(gateway, customer, card, key)
    proxy.rates = FaultRates()

    assert charge(gateway, customer, card, key).kind == ChargeOutcomeKind.SOFT_DECLINE
    assert len(intents_for(localstripe, key)) == 1
    assert proxy.faults_injected() == {"stripe_timeout_after_forward": 1}


def test_a_decline_names_its_payment_intent_in_its_one_request(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    """A declined charge's card error carries its PaymentIntent (Stripe's contract, and
    localstripe's through ``billing.testing.localstripe_conformance``): the decline names the
    one intent with no read after the charge, so a failing read cannot lose it."""
    gateway = gateway_through(proxy)
    customer, card = customer_with_card(gateway, localstripe, cards.DECLINES_AFTER_ATTACH)
    key = f"inv_{uuid.uuid4().hex[:8]}-attempt-1"
    # Every read fails: the decline must not need one.
    proxy.rates = FaultRates(server_error=1.0, after_forward_share=0.0, only=("GET /v1/",))
    before = proxy.stats.requests

    outcome = charge(gateway, customer, card, key)

    [intent] = intents_for(localstripe, key)
    assert (outcome.kind, outcome.payment_intent_id) == (ChargeOutcomeKind.SOFT_DECLINE, intent.id)
    assert proxy.stats.requests - before == 1
    assert proxy.faults_injected() == {}


def test_a_decline_is_never_reported_without_its_payment_intent(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    """A card error that names only the charge (localstripe 1.15's, before the conformance
    patch) makes the gateway read the charge to find the PaymentIntent. When that read failed,
    the decline was recorded without its intent: the next attempt of the invoice then created a
    second intent, and closing the invoice left the first one payable (found by
    scripts/chaos.py). Now the read's failure is transient (the activity retries), and the
    retry, under the same key, names the one intent."""
    gateway = gateway_through(proxy)
    customer, card = customer_with_card(gateway, localstripe, cards.DECLINES_AFTER_ATTACH)
    key = f"inv_{uuid.uuid4().hex[:8]}-attempt-1"
    proxy.rates = FaultRates(
        server_error=1.0,
        after_forward_share=0.0,
        only=("GET /v1/charges/",),
        card_errors_name_only_the_charge=True,
    )

    with pytest.raises(TransientPaymentError):
        charge(gateway, customer, card, key)
    proxy.rates = FaultRates(card_errors_name_only_the_charge=True)

    outcome = charge(gateway, customer, card, key)
    [intent] = intents_for(localstripe, key)
    assert (outcome.kind, outcome.payment_intent_id) == (ChargeOutcomeKind.SOFT_DECLINE, intent.id)
    assert proxy.faults_injected() == {"stripe_5xx_before_forward": 1}
    assert proxy.stats.idempotent_replays == 1  # the retry got the first answer back


@pytest.mark.parametrize(
    ("rates", "fault"),
    [
        (FaultRates(rate_limit=1.0), "stripe_429"),
        (FaultRates(server_error=1.0, after_forward_share=0.0), "stripe_5xx_before_forward"),
        (
            FaultRates(timeout=1.0, after_forward_share=0.0, timeout_hold_s=0.1),
            "stripe_timeout_before_forward",
        ),
    ],
)
def test_a_fault_before_forwarding_never_reaches_stripe(
    proxy: StripeFaultProxy, localstripe: LocalStripe, rates: FaultRates, fault: str
) -> None:
    gateway = gateway_through(proxy)
    customer, card = customer_with_card(gateway, localstripe, cards.SUCCEEDS)
    key = f"inv_{uuid.uuid4().hex[:8]}-attempt-1"
    proxy.rates = rates

    with pytest.raises(TransientPaymentError):
        charge(gateway, customer, card, key)

    assert intents_for(localstripe, key) == []
    assert proxy.faults_injected() == {fault: 1}


def test_a_key_reused_with_other_parameters_is_refused_as_stripe_does(
    proxy: StripeFaultProxy, localstripe: LocalStripe
) -> None:
    gateway = gateway_through(proxy)
    customer, card = customer_with_card(gateway, localstripe, cards.SUCCEEDS)
    key = f"inv_{uuid.uuid4().hex[:8]}-attempt-1"
    charge(gateway, customer, card, key, amount=900)

    with pytest.raises(PaymentProviderError, match="idempotency key was already used"):
        charge(gateway, customer, card, key, amount=901)
    assert len(intents_for(localstripe, key)) == 1


def test_fault_rates_are_checked() -> None:
    with pytest.raises(ValueError, match="sum to at most 1"):
        FaultRates(server_error=0.6, timeout=0.6)
    with pytest.raises(ValueError, match="between 0 and 1"):
        FaultRates(rate_limit=-0.1)
