"""The Stripe adapter against a real localstripe process, plus the real-Stripe answers that
localstripe cannot produce (issuer decline codes, SCA errors, 5xx/429/409), fed to the real SDK
through a scripted HTTP transport."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import stripe
from temporalio.testing import ActivityEnvironment

from activities.stripe_gateway import STRIPE_API_VERSION, StripeGateway, make_stripe_client
from billing.contracts import PROVIDER_ACTIVITY_TIMEOUT
from billing.errors import PaymentMethodRejected
from billing.payments import (
    ChargeOutcome,
    ChargeOutcomeKind,
    PaymentProviderError,
    TransientPaymentError,
)
from billing.settings import (
    DEFAULT_STRIPE_CONNECT_TIMEOUT_S,
    DEFAULT_STRIPE_MAX_NETWORK_RETRIES,
    DEFAULT_STRIPE_READ_TIMEOUT_S,
    PROVIDER_ACTIVITY_MARGIN_S,
    STRIPE_SDK_RETRY_INITIAL_DELAY_S,
    STRIPE_SDK_RETRY_MAX_DELAY_S,
    Settings,
    stripe_request_worst_case_s,
)
from billing.testing import cards
from billing.testing.localstripe import LocalStripe
from billing.testing.stripe_recording import RecordingHTTPClient
from billing.worker import build_dependencies

PAYMENT_INTENTS = "/v1/payment_intents"


def _customer(gateway: StripeGateway) -> str:
    return gateway.ensure_customer(
        customer_id=f"cust-{uuid.uuid4().hex[:12]}", email="ada@example.com", name="Ada"
    )


def _customer_with_card(
    gateway: StripeGateway, client: stripe.StripeClient, number: str
) -> tuple[str, str]:
    customer = _customer(gateway)
    attached = gateway.attach_payment_method(
        provider_customer_id=customer,
        payment_method_id=cards.create_card_payment_method(client, number),
    )
    return customer, attached.payment_method_id


def _charge(
    gateway: StripeGateway,
    customer: str,
    payment_method: str,
    *,
    key: str | None = None,
    amount_minor: int = 1999,
    invoice_id: str = "inv_1",
) -> ChargeOutcome:
    return gateway.charge(
        provider_customer_id=customer,
        payment_method_id=payment_method,
        amount_minor=amount_minor,
        currency="USD",
        idempotency_key=f"invoice-{uuid.uuid4().hex}-attempt-1" if key is None else key,
        description=f"Invoice {invoice_id}",
        metadata={"invoice_id": invoice_id},
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- against localstripe --------------------------------------------------------------------


def test_ensure_customer_records_our_id_and_sends_a_per_customer_key(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
) -> None:
    customer_id = f"cust-{uuid.uuid4().hex[:12]}"

    provider_id = gateway.ensure_customer(
        customer_id=customer_id, email="ada@example.com", name="Ada"
    )

    stored = stripe_client.v1.customers.retrieve(provider_id)
    assert stored.metadata["billing_customer_id"] == customer_id
    assert stored.email == "ada@example.com"
    assert stored.name == "Ada"
    [request] = recording_http_client.requests_to("/v1/customers")
    assert request.idempotency_key == f"customer-{customer_id}"


def test_successful_charge_is_paid_and_settlement_matches_the_balance_transaction(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
) -> None:
    customer, payment_method = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    assert gateway.default_payment_method(provider_customer_id=customer) == payment_method
    recording_http_client.clear()

    outcome = _charge(gateway, customer, payment_method, amount_minor=1999, invoice_id="inv_42")

    # One request: create-and-confirm, answered with the charge and its balance transaction.
    [request] = recording_http_client.recorded
    assert (request.method, request.path) == ("POST", "/v1/payment_intents")

    assert outcome.kind is ChargeOutcomeKind.PAID
    assert outcome.payment_intent_id is not None and outcome.payment_intent_id.startswith("pi_")
    assert outcome.charge_id is not None and outcome.charge_id.startswith("ch_")
    assert (outcome.amount_minor, outcome.currency) == (1999, "USD")
    # What the Stripe-protocol server recorded for the charge.
    intent = stripe_client.v1.payment_intents.retrieve(outcome.payment_intent_id)
    assert (intent.amount, intent.currency, intent.customer) == (1999, "usd", customer)
    assert intent.payment_method == payment_method
    assert intent.metadata["invoice_id"] == "inv_42"
    assert intent.metadata["description"] == "Invoice inv_42"

    settlement = gateway.settlement_details(
        payment_intent_id=outcome.payment_intent_id, charge_id=outcome.charge_id
    )
    # The settlement the charge's own answer carried is the one a read finds.
    assert outcome.settlement == settlement

    assert settlement.charge_id == outcome.charge_id
    assert (settlement.amount_minor, settlement.currency) == (1999, "USD")
    assert settlement.balance_transaction_id is not None
    txn = stripe_client.v1.balance_transactions.retrieve(settlement.balance_transaction_id)
    assert txn.source == outcome.charge_id
    assert (settlement.fee_minor, settlement.net_minor) == (txn.fee, txn.net)
    assert settlement.fee_minor is not None and settlement.net_minor is not None
    assert settlement.fee_minor + settlement.net_minor == settlement.amount_minor
    # Without a charge id the adapter finds the PaymentIntent's latest charge itself.
    assert (
        gateway.settlement_details(payment_intent_id=outcome.payment_intent_id, charge_id=None)
        == settlement
    )


def test_payment_intent_outcome_of_a_succeeded_intent_is_paid(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    customer, payment_method = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    charged = _charge(gateway, customer, payment_method, amount_minor=500)
    assert charged.payment_intent_id is not None

    outcome = gateway.payment_intent_outcome(payment_intent_id=charged.payment_intent_id)

    assert outcome == ChargeOutcome(
        kind=ChargeOutcomeKind.PAID,
        payment_intent_id=charged.payment_intent_id,
        charge_id=charged.charge_id,
        amount_minor=500,
        currency="USD",
        settlement=charged.settlement,
    )
    assert outcome.settlement is not None and outcome.settlement.amount_minor == 500


def test_card_declined_after_attach_is_a_soft_decline_with_its_code(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    customer, payment_method = _customer_with_card(
        gateway, stripe_client, cards.DECLINES_AFTER_ATTACH
    )

    outcome = _charge(gateway, customer, payment_method)

    assert outcome.kind is ChargeOutcomeKind.SOFT_DECLINE
    assert outcome.decline_code == "card_declined"
    assert outcome.failure_message == "Your card was declined."
    assert outcome.charge_id is not None and outcome.charge_id.startswith("ch_")
    # The card error carries the PaymentIntent (tests/chaos covers one that names only the charge).
    assert outcome.payment_intent_id is not None
    intent = stripe_client.v1.payment_intents.retrieve(outcome.payment_intent_id)
    assert intent.status == "requires_payment_method"
    again = gateway.payment_intent_outcome(payment_intent_id=outcome.payment_intent_id)
    assert (again.kind, again.decline_code) == (ChargeOutcomeKind.SOFT_DECLINE, "card_declined")


def test_card_declined_at_attach_raises_payment_method_rejected(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    customer = _customer(gateway)
    payment_method = cards.create_card_payment_method(stripe_client, cards.DECLINED_AT_ATTACH)

    with pytest.raises(PaymentMethodRejected) as raised:
        gateway.attach_payment_method(
            provider_customer_id=customer, payment_method_id=payment_method
        )

    assert payment_method in raised.value.message
    assert "Your card was declined." in raised.value.message
    assert "card_declined" in raised.value.message
    assert raised.value.field == "payment_method_id"
    assert gateway.default_payment_method(provider_customer_id=customer) is None


def test_unknown_payment_method_raises_payment_method_rejected(gateway: StripeGateway) -> None:
    customer = _customer(gateway)

    with pytest.raises(PaymentMethodRejected, match="pm_doesNotExist"):
        gateway.attach_payment_method(
            provider_customer_id=customer, payment_method_id="pm_doesNotExist"
        )


def test_attaching_an_already_attached_card_again_is_a_no_op(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
) -> None:
    customer, payment_method = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    attach_path = f"/v1/payment_methods/{payment_method}/attach"
    [first] = recording_http_client.requests_to(attach_path)
    recording_http_client.clear()

    again = gateway.attach_payment_method(
        provider_customer_id=customer, payment_method_id=payment_method
    )

    assert (again.payment_method_id, again.card_last4, again.card_brand) == (
        payment_method,
        "4242",
        "visa",
    )
    # Two requests, no read first: the attach again under the same key (Stripe answers a
    # retry within its key's 24 hours with the first result), then the default.
    assert [(r.method, r.path) for r in recording_http_client.recorded] == [
        ("POST", attach_path),
        ("POST", f"/v1/customers/{customer}"),
    ]
    [repeated] = recording_http_client.requests_to(attach_path)
    assert (
        repeated.idempotency_key == first.idempotency_key == (f"attach-{customer}-{payment_method}")
    )
    assert gateway.default_payment_method(provider_customer_id=customer) == payment_method


def test_card_attached_to_another_customer_is_rejected(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    owner, payment_method = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    other = _customer(gateway)

    with pytest.raises(PaymentMethodRejected, match="belongs to another Stripe customer"):
        gateway.attach_payment_method(provider_customer_id=other, payment_method_id=payment_method)
    assert stripe_client.v1.payment_methods.retrieve(payment_method).customer == owner
    assert gateway.default_payment_method(provider_customer_id=other) is None


def test_a_new_customer_with_its_card_is_one_request(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
) -> None:
    customer_id = f"cust-{uuid.uuid4().hex[:12]}"
    payment_method = cards.create_card_payment_method(stripe_client, cards.SUCCEEDS)
    recording_http_client.clear()

    made = gateway.create_customer(
        customer_id=customer_id,
        email="ada@example.com",
        name="Ada",
        payment_method_id=payment_method,
    )

    [request] = recording_http_client.recorded
    assert (request.method, request.path) == ("POST", "/v1/customers")
    assert request.idempotency_key == f"customer-{customer_id}-{payment_method}"
    assert made.payment_method is not None
    assert (made.payment_method.payment_method_id, made.payment_method.card_last4) == (
        payment_method,
        "4242",
    )
    # What localstripe holds: the card attached to the new customer and its invoice default.
    stored = stripe_client.v1.customers.retrieve(made.provider_customer_id)
    assert stored.metadata["billing_customer_id"] == customer_id
    assert gateway.default_payment_method(provider_customer_id=made.provider_customer_id) == (
        payment_method
    )
    assert stripe_client.v1.payment_methods.retrieve(payment_method).customer == (
        made.provider_customer_id
    )


def test_a_new_customer_with_a_refused_card_is_not_created(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    localstripe: LocalStripe,
) -> None:
    payment_method = cards.create_card_payment_method(stripe_client, cards.DECLINED_AT_ATTACH)
    customers_before = len(stripe_client.v1.customers.list(params={"limit": 100}).data)

    with pytest.raises(PaymentMethodRejected, match="card_declined"):
        gateway.create_customer(
            customer_id=f"cust-{uuid.uuid4().hex[:12]}",
            email=None,
            name=None,
            payment_method_id=payment_method,
        )

    assert len(stripe_client.v1.customers.list(params={"limit": 100}).data) == customers_before
    assert stripe_client.v1.payment_methods.retrieve(payment_method).customer is None


def _provider_customers_of(client: stripe.StripeClient, customer_id: str) -> list[str]:
    """The provider customers made for our ``customer_id`` (every page)."""
    listed = client.v1.customers.list(params={"limit": 100}).auto_paging_iter()
    return [
        c.id
        for c in listed
        if c.metadata is not None and c.metadata.to_dict().get("billing_customer_id") == customer_id
    ]


#: Payment method ids no provider issued, as the API's edge lets them through (text within
#: its length bound): Latin-1 cannot carry the first three in an HTTP header.
ODD_PAYMENT_METHOD_IDS = ["مرحبا بالعالم", "💳 card", "卡片", "0", "abc", "pm_does_not_exist", "é"]


@pytest.mark.parametrize("payment_method", ODD_PAYMENT_METHOD_IDS)
def test_a_new_customer_with_a_card_that_does_not_exist_is_refused_and_not_created(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
    payment_method: str,
) -> None:
    customer_id = f"cust-{uuid.uuid4().hex[:12]}"
    keys = []
    for _ in range(2):
        recording_http_client.clear()
        with pytest.raises(PaymentMethodRejected, match="ask the customer for another card") as e:
            gateway.create_customer(
                customer_id=customer_id, email=None, name=None, payment_method_id=payment_method
            )
        assert e.value.field == "payment_method_id"
        # The create went out (a header-safe, deterministic key), and only its refusal was
        # looked into, with at most one read of the card.
        [create] = recording_http_client.requests_to("/v1/customers")
        assert create.idempotency_key is not None
        create.idempotency_key.encode("ascii")
        assert len(create.idempotency_key) <= 255
        keys.append(create.idempotency_key)
        assert len(recording_http_client.recorded) <= 2
    assert keys[0] == keys[1]
    assert _provider_customers_of(stripe_client, customer_id) == []


def test_a_new_customer_with_another_customers_card_is_refused_and_not_created(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    owner, payment_method = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    customer_id = f"cust-{uuid.uuid4().hex[:12]}"

    with pytest.raises(PaymentMethodRejected, match="belongs to another Stripe customer"):
        gateway.create_customer(
            customer_id=customer_id, email=None, name=None, payment_method_id=payment_method
        )

    assert _provider_customers_of(stripe_client, customer_id) == []
    assert stripe_client.v1.payment_methods.retrieve(payment_method).customer == owner


@pytest.mark.parametrize("payment_method", ODD_PAYMENT_METHOD_IDS[:3])
def test_attaching_a_card_named_in_odd_text_is_refused(
    gateway: StripeGateway, recording_http_client: RecordingHTTPClient, payment_method: str
) -> None:
    customer = _customer(gateway)

    with pytest.raises(PaymentMethodRejected, match="ask the customer for another card"):
        gateway.attach_payment_method(
            provider_customer_id=customer, payment_method_id=payment_method
        )

    [attach] = [r for r in recording_http_client.recorded if r.path.endswith("/attach")]
    assert attach.idempotency_key is not None
    attach.idempotency_key.encode("ascii")
    assert gateway.default_payment_method(provider_customer_id=customer) is None


def test_a_new_customer_with_a_test_token_gets_the_card_stripe_made_from_it(
    gateway: StripeGateway, recording_http_client: RecordingHTTPClient
) -> None:
    made = gateway.create_customer(
        customer_id=f"cust-{uuid.uuid4().hex[:12]}",
        email=None,
        name=None,
        payment_method_id="pm_card_visa",
    )

    assert made.payment_method is not None
    real = made.payment_method.payment_method_id
    assert real.startswith("pm_") and real != "pm_card_visa"
    assert gateway.default_payment_method(provider_customer_id=made.provider_customer_id) == real
    # A token becomes a new card on each use: the create, then the attach and the default.
    assert [r.path for r in recording_http_client.recorded[:3]] == [
        "/v1/customers",
        "/v1/payment_methods/pm_card_visa/attach",
        f"/v1/customers/{made.provider_customer_id}",
    ]


def test_card_requiring_authentication_keeps_the_intent_until_the_customer_authenticates(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    customer, payment_method = _customer_with_card(
        gateway, stripe_client, cards.REQUIRES_AUTHENTICATION
    )

    outcome = _charge(gateway, customer, payment_method, amount_minor=2500)

    assert outcome.kind is ChargeOutcomeKind.AUTHENTICATION_REQUIRED
    assert outcome.payment_intent_id is not None
    assert outcome.charge_id is None
    pending = gateway.payment_intent_outcome(payment_intent_id=outcome.payment_intent_id)
    assert pending.kind is ChargeOutcomeKind.AUTHENTICATION_REQUIRED

    # The customer completes 3-D Secure (localstripe's stand-in for Stripe.js).
    intent = stripe_client.v1.payment_intents.retrieve(outcome.payment_intent_id)
    stripe_client.raw_request(
        "post",
        f"{PAYMENT_INTENTS}/{intent.id}/_authenticate",
        client_secret=intent.client_secret,
        success="true",
    )

    paid = gateway.payment_intent_outcome(payment_intent_id=outcome.payment_intent_id)
    assert paid.kind is ChargeOutcomeKind.PAID
    assert paid.charge_id is not None
    assert (paid.amount_minor, paid.currency) == (2500, "USD")


def test_charging_a_nonexistent_customer_is_a_provider_error(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    payment_method = cards.create_card_payment_method(stripe_client, cards.SUCCEEDS)

    with pytest.raises(PaymentProviderError, match=r"rejected .* as invalid"):
        _charge(gateway, "cus_doesNotExist", payment_method)


def test_a_malformed_api_key_is_a_provider_error(localstripe: LocalStripe) -> None:
    # localstripe, like Stripe, answers 401 to a key that is not `sk_...`.
    gateway = StripeGateway(
        make_stripe_client(api_key="not-a-secret-key", api_base=localstripe.url),
        send_description=False,
    )

    with pytest.raises(PaymentProviderError, match="rejected the API key"):
        gateway.ensure_customer(customer_id="cust-1", email=None, name=None)


def test_an_empty_api_key_is_refused_before_any_request() -> None:
    with pytest.raises(PaymentProviderError, match="API key is empty"):
        make_stripe_client(api_key="", api_base=None)


_EVERY_OPERATION: dict[str, Any] = {
    "ensure_customer": lambda g: g.ensure_customer(customer_id="c", email=None, name=None),
    "attach_payment_method": lambda g: g.attach_payment_method(
        provider_customer_id="cus_1", payment_method_id="pm_1"
    ),
    "default_payment_method": lambda g: g.default_payment_method(provider_customer_id="cus_1"),
    "charge": lambda g: _charge(g, "cus_1", "pm_1", key="invoice-1-attempt-1"),
    "settlement_details": lambda g: g.settlement_details(payment_intent_id="pi_1", charge_id=None),
    "payment_intent_outcome": lambda g: g.payment_intent_outcome(payment_intent_id="pi_1"),
    "find_charge_attempt": lambda g: g.find_charge_attempt(
        provider_customer_id="cus_1",
        idempotency_key="invoice-1-attempt-1",
        created_after=datetime(2025, 3, 1, tzinfo=UTC),
    ),
}


@pytest.mark.parametrize("operation", sorted(_EVERY_OPERATION))
def test_unreachable_api_is_transient_for_every_operation(operation: str) -> None:
    gateway = StripeGateway(
        make_stripe_client(
            api_key="sk_test_x",
            api_base=f"http://127.0.0.1:{_closed_port()}",
            max_network_retries=0,
        )
    )

    with pytest.raises(TransientPaymentError, match="safe to retry"):
        _EVERY_OPERATION[operation](gateway)


def test_the_charge_idempotency_key_is_the_one_on_the_wire(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
) -> None:
    customer, payment_method = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    recording_http_client.clear()

    _charge(gateway, customer, payment_method, key="invoice-inv_7-attempt-3")

    [request] = recording_http_client.requests_to(PAYMENT_INTENTS)
    assert request.idempotency_key == "invoice-inv_7-attempt-3"


def test_a_charge_retried_after_a_dropped_connection_sends_the_same_key(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
) -> None:
    customer, payment_method = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    invoice_id = f"inv_{uuid.uuid4().hex[:10]}"
    key = f"invoice-{invoice_id}-attempt-1"
    recording_http_client.drop_responses(PAYMENT_INTENTS)

    # The server charges, the worker never hears back: the activity fails transiently...
    with pytest.raises(TransientPaymentError):
        _charge(gateway, customer, payment_method, key=key, invoice_id=invoice_id)
    # ...and Temporal runs it again with the key derived from the same workflow state.
    outcome = _charge(gateway, customer, payment_method, key=key, invoice_id=invoice_id)

    assert outcome.kind is ChargeOutcomeKind.PAID
    first, second = recording_http_client.requests_to(PAYMENT_INTENTS)
    assert first.response_dropped and first.status is None
    assert second.status == 200
    assert first.idempotency_key == second.idempotency_key == key
    # Proof that the lost request did reach the server: localstripe holds two intents for this
    # invoice. It ignores Idempotency-Key; Stripe would have answered the retry with the first.
    created = [
        intent
        for intent in stripe_client.v1.payment_intents.list(params={"limit": 100}).data
        if intent.metadata["invoice_id"] == invoice_id
    ]
    assert len(created) == 2


def test_the_sdk_retry_after_a_dropped_connection_reuses_the_key(
    localstripe: LocalStripe, recording_http_client: RecordingHTTPClient
) -> None:
    client = make_stripe_client(
        api_key="sk_test_x",
        api_base=localstripe.url,
        max_network_retries=1,
        http_client=recording_http_client,
    )
    gateway = StripeGateway(client, send_description=False)
    customer, payment_method = _customer_with_card(gateway, client, cards.SUCCEEDS)
    recording_http_client.drop_responses(PAYMENT_INTENTS, retryable=True)

    outcome = _charge(gateway, customer, payment_method, key="invoice-inv_9-attempt-1")

    assert outcome.kind is ChargeOutcomeKind.PAID
    keys = [r.idempotency_key for r in recording_http_client.requests_to(PAYMENT_INTENTS)]
    assert keys == ["invoice-inv_9-attempt-1", "invoice-inv_9-attempt-1"]


def test_localstripe_flush_empties_its_store() -> None:
    # A private server: flushing the session one would pull data from under other tests.
    with LocalStripe() as private:
        client = make_stripe_client(api_key="sk_test_x", api_base=private.url)
        customer = client.v1.customers.create(params={})
        private.flush()
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.customers.retrieve(customer.id)


def _customer_ids(server: LocalStripe) -> set[str]:
    client = make_stripe_client(api_key="sk_test_x", api_base=server.url)
    return {c.id for c in client.v1.customers.list(params={"limit": 100}).data}


def _new_customer(server: LocalStripe, email: str) -> str:
    client = make_stripe_client(api_key="sk_test_x", api_base=server.url)
    return client.v1.customers.create(params={"email": email}).id


def test_localstripe_in_memory_starts_empty_every_time() -> None:
    # Tests and simulations: nothing is read from, or left in, a store another run can see
    # (localstripe's own /tmp file is shared by every localstripe on the machine).
    with LocalStripe() as first:
        customer = _new_customer(first, "memory@example.com")
    with LocalStripe() as second:
        assert customer not in _customer_ids(second)


def test_localstripe_store_survives_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "state" / "localstripe.pickle"
    with LocalStripe(store=store) as first:
        customer = _new_customer(first, "kept@example.com")
    with LocalStripe(store=store) as second:
        client = make_stripe_client(api_key="sk_test_x", api_base=second.url)
        assert client.v1.customers.retrieve(customer).email == "kept@example.com"
        _new_customer(second, "second-run@example.com")
    # Written atomically: no temporary file is left beside it.
    assert sorted(p.name for p in store.parent.iterdir()) == ["localstripe.pickle"]


def test_two_localstripes_with_their_own_stores_do_not_clobber_each_other(
    tmp_path: Path,
) -> None:
    store_a, store_b = tmp_path / "a.pickle", tmp_path / "b.pickle"
    with LocalStripe(store=store_a) as a, LocalStripe(store=store_b) as b:
        # Interleaved writes: each server rewrites only its own file.
        mine_a = {_new_customer(a, "a1@example.com")}
        mine_b = {_new_customer(b, "b1@example.com")}
        mine_a.add(_new_customer(a, "a2@example.com"))
        mine_b.add(_new_customer(b, "b2@example.com"))
    with LocalStripe(store=store_a) as a, LocalStripe(store=store_b) as b:
        assert _customer_ids(a) == mine_a
        assert _customer_ids(b) == mine_b


def test_an_unreadable_localstripe_store_is_named_not_replaced(tmp_path: Path) -> None:
    store = tmp_path / "localstripe.pickle"
    store.write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match=r"cannot be read .* move it aside"):
        LocalStripe(store=store, startup_timeout_seconds=10).start()
    assert store.read_bytes() == b"not a pickle"


# -- real-Stripe answers localstripe cannot produce ------------------------------------------


class ScriptedHTTPClient(stripe.HTTPClient):
    """Answers each request with the next scripted (status, JSON body) pair, so the real SDK
    parses real-Stripe-shaped responses into its own errors and objects."""

    name = "scripted"

    def __init__(self, *responses: tuple[int, dict[str, Any]]) -> None:
        super().__init__()
        self._responses = list(responses)
        self.sent: list[tuple[str, str, Mapping[str, str] | None, Any]] = []

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        self.sent.append((method, url, headers, post_data))
        status, body = self._responses.pop(0)
        return json.dumps(body).encode(), status, {"request-id": "req_scripted"}

    def close(self) -> None:
        pass


def _scripted_gateway(*responses: tuple[int, dict[str, Any]]) -> StripeGateway:
    client = make_stripe_client(
        api_key="sk_test_x",
        api_base="https://api.stripe.invalid",
        max_network_retries=0,
        http_client=ScriptedHTTPClient(*responses),
    )
    return StripeGateway(client)


def _intent(status: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": "pi_real",
        "object": "payment_intent",
        "amount": 1999,
        "currency": "usd",
        "status": status,
        "latest_charge": None,
        "last_payment_error": None,
        **fields,
    }


def _card_error(code: str, decline_code: str | None, **fields: Any) -> tuple[int, dict[str, Any]]:
    error: dict[str, Any] = {
        "type": "card_error",
        "code": code,
        "message": f"Your card was declined ({decline_code or code}).",
        "charge": "ch_real",
        "payment_intent": _intent(
            "requires_payment_method",
            latest_charge="ch_real",
            last_payment_error={"code": code, "decline_code": decline_code},
        ),
        **fields,
    }
    if decline_code is not None:
        error["decline_code"] = decline_code
    return 402, {"error": error}


@pytest.mark.parametrize("decline_code", ["lost_card", "stolen_card"])
def test_lost_or_stolen_card_is_a_hard_decline(decline_code: str) -> None:
    gateway = _scripted_gateway(_card_error("card_declined", decline_code))

    outcome = _charge(gateway, "cus_1", "pm_1")

    assert outcome.kind is ChargeOutcomeKind.HARD_DECLINE
    assert outcome.decline_code == decline_code
    assert (outcome.payment_intent_id, outcome.charge_id) == ("pi_real", "ch_real")
    assert outcome.failure_message == f"Your card was declined ({decline_code})."


def test_insufficient_funds_is_a_soft_decline_keeping_the_decline_code() -> None:
    gateway = _scripted_gateway(_card_error("card_declined", "insufficient_funds"))

    outcome = _charge(gateway, "cus_1", "pm_1", amount_minor=4200)

    assert outcome.kind is ChargeOutcomeKind.SOFT_DECLINE
    assert outcome.decline_code == "insufficient_funds"
    assert (outcome.amount_minor, outcome.currency) == (4200, "USD")
    assert outcome.payment_intent_id == "pi_real"


def test_off_session_authentication_error_is_authentication_required_with_the_intent() -> None:
    # Real Stripe answers an off-session charge of an SCA card with this CardError; the
    # PaymentIntent (requires_payment_method) is only in the error.
    gateway = _scripted_gateway(
        _card_error("authentication_required", "authentication_required", charge=None)
    )

    outcome = _charge(gateway, "cus_1", "pm_1")

    assert outcome.kind is ChargeOutcomeKind.AUTHENTICATION_REQUIRED
    assert outcome.payment_intent_id == "pi_real"
    assert outcome.decline_code == "authentication_required"


def test_succeeded_intent_with_an_unexpanded_latest_charge_is_paid() -> None:
    gateway = _scripted_gateway((200, _intent("succeeded", latest_charge="ch_real")))

    outcome = _charge(gateway, "cus_1", "pm_1")

    assert (outcome.kind, outcome.payment_intent_id, outcome.charge_id) == (
        ChargeOutcomeKind.PAID,
        "pi_real",
        "ch_real",
    )


@pytest.mark.parametrize(
    ("decline_code", "kind"),
    [
        ("expired_card", ChargeOutcomeKind.HARD_DECLINE),
        ("authentication_required", ChargeOutcomeKind.AUTHENTICATION_REQUIRED),
        ("do_not_honor", ChargeOutcomeKind.SOFT_DECLINE),
    ],
)
def test_outcome_of_a_declined_intent_is_classified(
    decline_code: str, kind: ChargeOutcomeKind
) -> None:
    error = {"type": "card_error", "code": "card_declined", "decline_code": decline_code}
    error["message"] = "Declined."
    gateway = _scripted_gateway((200, _intent("requires_payment_method", last_payment_error=error)))

    outcome = gateway.payment_intent_outcome(payment_intent_id="pi_real")

    assert (outcome.kind, outcome.decline_code) == (kind, decline_code)
    assert outcome.failure_message == "Declined."


def test_processing_intent_is_transient() -> None:
    gateway = _scripted_gateway((200, _intent("processing")))

    with pytest.raises(TransientPaymentError, match="still processing"):
        _charge(gateway, "cus_1", "pm_1")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, {"type": "invalid_request_error", "code": "lock_timeout", "message": "locked"}),
        (429, {"type": "invalid_request_error", "code": "rate_limit", "message": "slow down"}),
        (500, {"type": "api_error", "message": "internal"}),
        (503, {"type": "api_error", "message": "unavailable"}),
        (409, {"type": "idempotency_error", "message": "request with this key in progress"}),
    ],
)
def test_retryable_provider_faults_are_transient(status: int, error: dict[str, Any]) -> None:
    gateway = _scripted_gateway((status, {"error": error}))

    with pytest.raises(TransientPaymentError, match=error["message"]):
        _charge(gateway, "cus_1", "pm_1")


@pytest.mark.parametrize(
    ("status", "error", "advice"),
    [
        (401, {"type": "invalid_request_error", "message": "Invalid API Key"}, "secret key"),
        (403, {"type": "invalid_request_error", "message": "restricted"}, "write access"),
        (
            400,
            {"type": "idempotency_error", "message": "Keys for idempotent requests ..."},
            "new key",
        ),
        (
            400,
            {"type": "invalid_request_error", "code": "parameter_invalid_integer", "message": "x"},
            "fix the request",
        ),
    ],
)
def test_faults_a_retry_cannot_fix_are_provider_errors(
    status: int, error: dict[str, Any], advice: str
) -> None:
    # Twice: an idempotency refusal is re-sent once without ``expand`` (below).
    gateway = _scripted_gateway((status, {"error": error}), (status, {"error": error}))

    with pytest.raises(PaymentProviderError, match=advice):
        _charge(gateway, "cus_1", "pm_1")


def test_a_charge_first_sent_without_expand_is_re_sent_as_it_was() -> None:
    """A charge in flight across the upgrade to the expanded charge: Stripe refuses its key with
    other parameters, so it is sent again exactly as first sent and answered with the first
    result; the settlement is then read separately (None here)."""
    refused = (
        400,
        {"error": {"type": "idempotency_error", "message": "Keys for idempotent requests ..."}},
    )
    paid = (200, _intent("succeeded", latest_charge="ch_1"))
    http = ScriptedHTTPClient(refused, paid)
    gateway = StripeGateway(
        make_stripe_client(
            api_key="sk_test_x",
            api_base="https://api.stripe.invalid",
            max_network_retries=0,
            http_client=http,
        )
    )

    outcome = _charge(gateway, "cus_1", "pm_1", key="invoice-inv_1-attempt-1")

    assert (outcome.kind, outcome.charge_id, outcome.settlement) == (
        ChargeOutcomeKind.PAID,
        "ch_1",
        None,
    )
    [(_, _, first_headers, first_body), (_, _, again_headers, again_body)] = http.sent
    assert "expand[0]=latest_charge.balance_transaction" in str(first_body)
    assert "expand" not in str(again_body)
    assert first_headers is not None and again_headers is not None
    assert first_headers["Idempotency-Key"] == again_headers["Idempotency-Key"]


def test_an_empty_idempotency_key_is_refused_without_charging() -> None:
    client = ScriptedHTTPClient()
    gateway = StripeGateway(
        make_stripe_client(api_key="sk_test_x", api_base=None, http_client=client)
    )

    with pytest.raises(PaymentProviderError, match="idempotency_key"):
        _charge(gateway, "cus_1", "pm_1", key="")
    assert client.sent == []


def test_real_stripe_charge_sends_description_as_a_field() -> None:
    client = ScriptedHTTPClient((200, _intent("succeeded", latest_charge="ch_real")))
    gateway = StripeGateway(
        make_stripe_client(api_key="sk_test_x", api_base=None, http_client=client)
    )

    _charge(gateway, "cus_1", "pm_1", key="invoice-inv_1-attempt-1", invoice_id="inv_1")

    [(method, url, headers, body)] = client.sent
    assert (method, url) == ("post", "https://api.stripe.com/v1/payment_intents")
    assert headers is not None and headers["Idempotency-Key"] == "invoice-inv_1-attempt-1"
    form = parse_qs(body)
    assert form["description"] == ["Invoice inv_1"]
    assert form["metadata[invoice_id]"] == ["inv_1"]
    # The key outlives Stripe's 24-hour memory of it in the intent's metadata.
    assert form["metadata[idempotency_key]"] == ["invoice-inv_1-attempt-1"]
    assert "metadata[description]" not in form
    assert (form["amount"], form["currency"]) == (["1999"], ["usd"])
    assert (form["off_session"], form["confirm"]) == (["true"], ["true"])


def test_attach_declined_by_the_issuer_names_the_card_and_decline_code() -> None:
    # The attach is the first request (no read of the card before it).
    gateway = _scripted_gateway(
        (
            402,
            {
                "error": {
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": "stolen_card",
                    "message": "Your card was declined.",
                }
            },
        ),
    )

    with pytest.raises(PaymentMethodRejected, match=r"pm_real.*decline_code=stolen_card"):
        gateway.attach_payment_method(provider_customer_id="cus_1", payment_method_id="pm_real")


def test_settlement_reports_stripe_fees() -> None:
    gateway = _scripted_gateway(
        (
            200,
            {
                "id": "ch_real",
                "object": "charge",
                "amount": 1999,
                "currency": "usd",
                "balance_transaction": {
                    "id": "txn_real",
                    "object": "balance_transaction",
                    "amount": 1999,
                    "currency": "usd",
                    "fee": 88,
                    "net": 1911,
                },
            },
        )
    )

    settlement = gateway.settlement_details(payment_intent_id="pi_real", charge_id="ch_real")

    assert (settlement.amount_minor, settlement.fee_minor, settlement.net_minor) == (
        1999,
        88,
        1911,
    )
    assert (settlement.currency, settlement.balance_transaction_id) == ("USD", "txn_real")


def test_settlement_without_a_balance_transaction_reports_no_fee() -> None:
    gateway = _scripted_gateway(
        (
            200,
            {
                "id": "ch_real",
                "object": "charge",
                "amount": 1999,
                "currency": "eur",
                "balance_transaction": None,
            },
        )
    )

    settlement = gateway.settlement_details(payment_intent_id="pi_real", charge_id="ch_real")

    assert (settlement.amount_minor, settlement.currency) == (1999, "EUR")
    assert (settlement.fee_minor, settlement.net_minor, settlement.balance_transaction_id) == (
        None,
        None,
        None,
    )


# -- find_charge_attempt: what a key created, after the provider forgot the key ---------------


def _key() -> str:
    return f"invoice-inv_{uuid.uuid4().hex[:10]}-attempt-1"


def _lookup(
    gateway: StripeGateway, customer: str, key: str, created_after: datetime
) -> ChargeOutcome | None:
    return gateway.find_charge_attempt(
        provider_customer_id=customer, idempotency_key=key, created_after=created_after
    )


def _reads(recording_http_client: RecordingHTTPClient) -> list[tuple[str, int | None]]:
    return [(r.path, r.status) for r in recording_http_client.recorded if r.method == "GET"]


@pytest.mark.parametrize(
    ("card", "kind"),
    [
        (cards.SUCCEEDS, ChargeOutcomeKind.PAID),
        (cards.DECLINES_AFTER_ATTACH, ChargeOutcomeKind.SOFT_DECLINE),
        (cards.REQUIRES_AUTHENTICATION, ChargeOutcomeKind.AUTHENTICATION_REQUIRED),
    ],
    ids=["paid", "soft-decline", "requires-action"],
)
def test_find_charge_attempt_on_localstripe_falls_back_and_finds_the_intent_by_key(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
    card: str,
    kind: ChargeOutcomeKind,
) -> None:
    # localstripe stamps `created` with the wall clock.
    since = datetime.now(UTC) - timedelta(hours=1)
    customer, payment_method = _customer_with_card(gateway, stripe_client, card)
    key = _key()
    _charge(gateway, customer, payment_method, key=_key())  # another attempt of this customer
    charged = _charge(gateway, customer, payment_method, key=key)
    assert charged.kind is kind and charged.payment_intent_id is not None
    stored = stripe_client.v1.payment_intents.retrieve(charged.payment_intent_id)
    assert stored.metadata["idempotency_key"] == key
    recording_http_client.clear()

    found = _lookup(gateway, customer, key, since)

    # The same normalized outcome the charge itself returned: same intent, charge, decline and
    # (the intent's read expands it too) settlement.
    assert found == charged
    reads = _reads(recording_http_client)
    # localstripe refuses the filtered PaymentIntent list (HTTP 400 "Unexpected customer,
    # created"); the customer's charges lead to the intent instead.
    assert reads[0] == (PAYMENT_INTENTS, 400)
    assert reads[1] == ("/v1/charges", 200)
    if kind is ChargeOutcomeKind.AUTHENTICATION_REQUIRED:
        # localstripe leaves an off-session intent that needs authentication without a charge:
        # only the account's whole PaymentIntent list shows it.
        assert reads[-1] == (PAYMENT_INTENTS, 200)
    assert [r for r in recording_http_client.recorded if r.method != "GET"] == []


def test_find_charge_attempt_on_localstripe_finds_nothing_for_a_key_never_sent(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    since = datetime.now(UTC) - timedelta(hours=1)
    customer, payment_method = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    other_customer, other_payment_method = _customer_with_card(
        gateway, stripe_client, cards.SUCCEEDS
    )
    sent = _key()
    _charge(gateway, customer, payment_method, key=sent)
    elsewhere = _key()
    _charge(gateway, other_customer, other_payment_method, key=elsewhere)

    assert _lookup(gateway, customer, _key(), since) is None
    # Another customer's intent is not this customer's charge, whatever its key.
    assert _lookup(gateway, customer, elsewhere, since) is None
    # Nor is an intent created before the window looked at.
    assert _lookup(gateway, customer, sent, datetime.now(UTC) + timedelta(hours=1)) is None
    assert _lookup(gateway, customer, sent, since) is not None


def _list(*intents: dict[str, Any], has_more: bool = False) -> tuple[int, dict[str, Any]]:
    return 200, {"object": "list", "url": PAYMENT_INTENTS, "has_more": has_more, "data": intents}


_SINCE = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)
_SINCE_TS = int(_SINCE.timestamp())


def _ours(status: str, key: str, pi: str = "pi_ours", **fields: Any) -> dict[str, Any]:
    """A PaymentIntent as Stripe lists it: ours carry the key in metadata."""
    attempt_number = key.rsplit("-", 1)[-1]
    return _intent(
        status,
        **{
            "id": pi,
            "customer": "cus_1",
            "created": _SINCE_TS + 3600,
            "metadata": {
                "invoice_id": "inv_1",
                "attempt_number": attempt_number,
                "idempotency_key": key,
            },
            **fields,
        },
    )


def _query(sent: tuple[str, str, Any, Any]) -> tuple[str, str, dict[str, list[str]]]:
    method, url, _headers, _body = sent
    parts = urlsplit(url)
    return method, parts.path, parse_qs(parts.query)


@pytest.mark.parametrize(
    ("intent", "expected"),
    [
        (
            _ours("succeeded", "inv_1-attempt-1", latest_charge="ch_ours"),
            ChargeOutcome(
                kind=ChargeOutcomeKind.PAID,
                payment_intent_id="pi_ours",
                charge_id="ch_ours",
                amount_minor=1999,
                currency="USD",
            ),
        ),
        (
            _ours(
                "requires_payment_method",
                "inv_1-attempt-1",
                latest_charge="ch_declined",
                last_payment_error={
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": "insufficient_funds",
                    "message": "Your card has insufficient funds.",
                },
            ),
            ChargeOutcome(
                kind=ChargeOutcomeKind.SOFT_DECLINE,
                payment_intent_id="pi_ours",
                charge_id="ch_declined",
                decline_code="insufficient_funds",
                failure_message="Your card has insufficient funds.",
                amount_minor=1999,
                currency="USD",
            ),
        ),
        (
            _ours("requires_action", "inv_1-attempt-1"),
            ChargeOutcome(
                kind=ChargeOutcomeKind.AUTHENTICATION_REQUIRED,
                payment_intent_id="pi_ours",
                failure_message="payment intent pi_ours is requires_action: the customer must "
                "authenticate the payment on-session",
                amount_minor=1999,
                currency="USD",
            ),
        ),
    ],
    ids=["paid", "soft-decline", "requires-action"],
)
def test_find_charge_attempt_pages_the_customers_intents_since_the_attempt(
    intent: dict[str, Any], expected: ChargeOutcome
) -> None:
    transport = ScriptedHTTPClient(
        _list(
            _ours("succeeded", "inv_9-attempt-1", pi="pi_other_invoice"),
            _intent("succeeded", id="pi_not_ours", customer="cus_1", created=_SINCE_TS),
            has_more=True,
        ),
        _list(intent),
    )
    gateway = StripeGateway(
        make_stripe_client(
            api_key="sk_test_x", api_base=None, max_network_retries=0, http_client=transport
        )
    )

    found = _lookup(gateway, "cus_1", "inv_1-attempt-1", _SINCE)

    assert found == expected
    first, second = (_query(sent) for sent in transport.sent)
    assert first == (
        "get",
        PAYMENT_INTENTS,
        {"customer": ["cus_1"], "created[gte]": [str(_SINCE_TS)], "limit": ["100"]},
    )
    assert second[2]["starting_after"] == ["pi_not_ours"]
    assert (second[2]["customer"], second[2]["created[gte]"]) == (["cus_1"], [str(_SINCE_TS)])


def test_find_charge_attempt_is_none_when_no_intent_carries_the_key() -> None:
    transport = ScriptedHTTPClient(_list(_ours("succeeded", "inv_1-attempt-2")))
    gateway = StripeGateway(
        make_stripe_client(api_key="sk_test_x", api_base=None, http_client=transport)
    )

    assert _lookup(gateway, "cus_1", "inv_1-attempt-1", _SINCE) is None
    assert len(transport.sent) == 1


def test_find_charge_attempt_matches_an_intent_created_before_the_key_was_in_metadata() -> None:
    legacy = _intent(
        "succeeded",
        id="pi_legacy",
        customer="cus_1",
        created=_SINCE_TS,
        latest_charge="ch_legacy",
        metadata={"invoice_id": "inv_1", "attempt_number": "1"},
    )
    other_attempt = {**legacy, "id": "pi_attempt_2", "metadata": {**legacy["metadata"]}}
    other_attempt["metadata"]["attempt_number"] = "2"
    gateway = _scripted_gateway(_list(other_attempt, legacy))

    found = _lookup(gateway, "cus_1", "inv_1-attempt-1", _SINCE)

    assert found is not None
    assert (found.kind, found.payment_intent_id) == (ChargeOutcomeKind.PAID, "pi_legacy")


def test_of_several_intents_with_one_key_a_succeeded_one_answers() -> None:
    key = "inv_1-attempt-1"
    gateway = _scripted_gateway(
        _list(
            _ours("requires_payment_method", key, pi="pi_newer_declined", created=_SINCE_TS + 7200),
            _ours("succeeded", key, pi="pi_paid", latest_charge="ch_paid"),
        )
    )

    found = _lookup(gateway, "cus_1", key, _SINCE)

    assert found is not None
    assert (found.kind, found.payment_intent_id) == (ChargeOutcomeKind.PAID, "pi_paid")


def test_stripes_unknown_parameter_answer_also_selects_the_charge_fallback() -> None:
    # Stripe's own shape for a list filter an endpoint does not support.
    unsupported = {
        "error": {
            "type": "invalid_request_error",
            "code": "parameter_unknown",
            "param": "customer",
            "message": "Received unknown parameter: customer",
        }
    }
    charges = {
        "object": "list",
        "url": "/v1/charges",
        "has_more": False,
        "data": [{"id": "ch_ours", "object": "charge", "payment_intent": "pi_ours"}],
    }
    transport = ScriptedHTTPClient(
        (400, unsupported),
        (200, charges),
        (200, _ours("succeeded", "inv_1-attempt-1", latest_charge="ch_ours")),
    )
    gateway = StripeGateway(
        make_stripe_client(api_key="sk_test_x", api_base=None, http_client=transport)
    )

    found = _lookup(gateway, "cus_1", "inv_1-attempt-1", _SINCE)

    assert found is not None
    assert (found.kind, found.payment_intent_id, found.charge_id) == (
        ChargeOutcomeKind.PAID,
        "pi_ours",
        "ch_ours",
    )
    listed, charge_list, retrieved = (_query(sent) for sent in transport.sent)
    assert listed[1] == PAYMENT_INTENTS
    assert charge_list == (
        "get",
        "/v1/charges",
        {"customer": ["cus_1"], "created[gt]": [str(_SINCE_TS - 1)], "limit": ["100"]},
    )
    assert retrieved[:2] == ("get", f"{PAYMENT_INTENTS}/pi_ours")


@pytest.mark.parametrize(
    ("status", "error", "raised"),
    [
        # Invalid values, an unknown customer, another unknown parameter: not "unsupported".
        (
            400,
            {"type": "invalid_request_error", "code": "parameter_invalid_integer", "message": "x"},
            PaymentProviderError,
        ),
        (
            400,
            {
                "type": "invalid_request_error",
                "code": "parameter_unknown",
                "param": "expand",
                "message": "Received unknown parameter: expand",
            },
            PaymentProviderError,
        ),
        (
            400,
            {"type": "invalid_request_error", "message": "Unexpected expand"},
            PaymentProviderError,
        ),
        (
            404,
            {"type": "invalid_request_error", "code": "resource_missing", "message": "No such"},
            PaymentProviderError,
        ),
        (
            401,
            {"type": "invalid_request_error", "message": "Invalid API Key"},
            PaymentProviderError,
        ),
        (500, {"type": "api_error", "message": "internal"}, TransientPaymentError),
        (
            429,
            {"type": "invalid_request_error", "code": "rate_limit", "message": "slow"},
            TransientPaymentError,
        ),
    ],
    ids=["bad-value", "other-unknown-param", "localstripe-other", "404", "401", "500", "429"],
)
def test_find_charge_attempt_falls_back_on_nothing_but_an_unsupported_filter(
    status: int, error: dict[str, Any], raised: type[Exception]
) -> None:
    transport = ScriptedHTTPClient((status, {"error": error}))
    gateway = StripeGateway(
        make_stripe_client(
            api_key="sk_test_x", api_base=None, max_network_retries=0, http_client=transport
        )
    )

    with pytest.raises(raised):
        _lookup(gateway, "cus_1", "inv_1-attempt-1", _SINCE)
    assert len(transport.sent) == 1  # no fallback request


def test_find_charge_attempt_refuses_a_naive_datetime_before_any_request() -> None:
    transport = ScriptedHTTPClient()
    gateway = StripeGateway(
        make_stripe_client(api_key="sk_test_x", api_base=None, http_client=transport)
    )

    with pytest.raises(PaymentProviderError, match="timezone-aware"):
        _lookup(gateway, "cus_1", "inv_1-attempt-1", datetime(2025, 3, 1))
    assert transport.sent == []


# -- one PaymentIntent per invoice: confirm again, cancel ----------------------------------------


def _confirm(
    gateway: StripeGateway, payment_intent_id: str, payment_method: str, key: str = "inv-attempt-2"
) -> ChargeOutcome:
    return gateway.confirm_payment_intent(
        payment_intent_id=payment_intent_id,
        payment_method_id=payment_method,
        amount_minor=1999,
        currency="USD",
        idempotency_key=key,
    )


def test_confirming_a_declined_intent_with_a_new_card_charges_the_same_intent(
    gateway: StripeGateway,
    stripe_client: stripe.StripeClient,
    recording_http_client: RecordingHTTPClient,
) -> None:
    customer, declining = _customer_with_card(gateway, stripe_client, cards.DECLINES_AFTER_ATTACH)
    first = _charge(gateway, customer, declining)
    assert first.kind == ChargeOutcomeKind.SOFT_DECLINE and first.payment_intent_id
    new_card = gateway.attach_payment_method(
        provider_customer_id=customer,
        payment_method_id=cards.create_card_payment_method(stripe_client, cards.SUCCEEDS),
    ).payment_method_id

    again = _confirm(gateway, first.payment_intent_id, new_card)

    assert again.kind == ChargeOutcomeKind.PAID
    assert again.payment_intent_id == first.payment_intent_id
    assert again.charge_id is not None and again.charge_id != first.charge_id
    [sent] = recording_http_client.requests_to(
        f"{PAYMENT_INTENTS}/{first.payment_intent_id}/confirm"
    )
    assert (sent.idempotency_key, sent.status) == ("inv-attempt-2", 200)
    # Paid once: confirming it yet again answers PAID without a new charge.
    assert _confirm(gateway, first.payment_intent_id, new_card, "inv-attempt-3") == again


def test_a_confirm_without_a_key_is_refused_before_anything_is_sent(
    gateway: StripeGateway, recording_http_client: RecordingHTTPClient
) -> None:
    with pytest.raises(PaymentProviderError, match="idempotency_key must be 1 to 255"):
        _confirm(gateway, "pi_123", "pm_123", key="")
    assert recording_http_client.recorded == []


def test_cancel_is_idempotent_and_a_canceled_intent_takes_no_payment(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    customer, sca = _customer_with_card(gateway, stripe_client, cards.REQUIRES_AUTHENTICATION)
    first = _charge(gateway, customer, sca)
    assert first.kind == ChargeOutcomeKind.AUTHENTICATION_REQUIRED and first.payment_intent_id

    results = [
        gateway.cancel_payment_intent(payment_intent_id=first.payment_intent_id) for _ in range(2)
    ]

    assert [(r.canceled, r.paid) for r in results] == [(True, None), (True, None)]
    _, good = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    after = _confirm(gateway, first.payment_intent_id, good)
    assert after.kind == ChargeOutcomeKind.SOFT_DECLINE
    assert after.failure_message is not None and "was canceled (abandoned)" in after.failure_message


def test_canceling_an_intent_that_succeeded_reports_the_payment(
    gateway: StripeGateway, stripe_client: stripe.StripeClient
) -> None:
    customer, card = _customer_with_card(gateway, stripe_client, cards.SUCCEEDS)
    paid = _charge(gateway, customer, card)
    assert paid.kind == ChargeOutcomeKind.PAID and paid.payment_intent_id

    result = gateway.cancel_payment_intent(payment_intent_id=paid.payment_intent_id)

    assert not result.canceled
    assert result.paid == paid
    intent = stripe_client.v1.payment_intents.retrieve(paid.payment_intent_id)
    assert intent.status == "succeeded"


# -- timeouts and the API version -------------------------------------------------------------


class SilentServer:
    """A TCP server that accepts every connection and never answers: a hung Stripe, or a
    network path that drops the answer. Counts the connections it accepted."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._sock.accept()
            except OSError:
                return  # closed
            self.accepted.append(connection)  # held open, never read from or written to

    def close(self) -> None:
        self._sock.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def test_a_hung_stripe_ends_in_a_transient_error_within_the_configured_bound(
    silent_server: SilentServer,
) -> None:
    # The SDK's default (80 s per try, 2 retries) let a request outlive the 60 s activity
    # that made it, so the activity's retry ran beside a thread still waiting on Stripe.
    connect_s, read_s, retries = 1.0, 0.4, 2
    bound = stripe_request_worst_case_s(
        connect_timeout_s=connect_s, read_timeout_s=read_s, max_network_retries=retries
    )
    client = make_stripe_client(
        api_key="sk_test_x",
        api_base=silent_server.url,
        max_network_retries=retries,
        connect_timeout_s=connect_s,
        read_timeout_s=read_s,
    )
    started = time.monotonic()
    with pytest.raises(TransientPaymentError, match="safe to retry"):
        _charge(StripeGateway(client), "cus_1", "pm_1", key="invoice-inv_hung-attempt-1")
    elapsed = time.monotonic() - started
    assert len(silent_server.accepted) == 1 + retries  # every try waited out its read timeout
    assert (1 + retries) * read_s <= elapsed <= bound


def test_the_settings_mirror_the_sdks_retry_back_off() -> None:
    # stripe_request_worst_case_s copies these (the domain may not import stripe).
    assert stripe.HTTPClient.INITIAL_DELAY == STRIPE_SDK_RETRY_INITIAL_DELAY_S
    assert stripe.HTTPClient.MAX_DELAY == STRIPE_SDK_RETRY_MAX_DELAY_S


def test_the_default_client_fits_inside_the_provider_activity() -> None:
    worst = stripe_request_worst_case_s(
        connect_timeout_s=DEFAULT_STRIPE_CONNECT_TIMEOUT_S,
        read_timeout_s=DEFAULT_STRIPE_READ_TIMEOUT_S,
        max_network_retries=DEFAULT_STRIPE_MAX_NETWORK_RETRIES,
    )
    assert worst + PROVIDER_ACTIVITY_MARGIN_S <= PROVIDER_ACTIVITY_TIMEOUT.total_seconds()


def test_every_request_names_the_pinned_api_version(
    localstripe: LocalStripe, recording_http_client: RecordingHTTPClient, monkeypatch: Any
) -> None:
    # An SDK upgrade changes the SDK's default version; what we speak must not move with it.
    from stripe._api_version import _ApiVersion

    monkeypatch.setattr(_ApiVersion, "CURRENT", "2099-01-01.upgraded")
    client = make_stripe_client(
        api_key="sk_test_x", api_base=localstripe.url, http_client=recording_http_client
    )
    gateway = StripeGateway(client, send_description=False)
    customer, payment_method = _customer_with_card(gateway, client, cards.SUCCEEDS)
    assert _charge(gateway, customer, payment_method).kind is ChargeOutcomeKind.PAID

    recorded = recording_http_client.recorded
    assert len(recorded) >= 4  # customer, card, attach, default, charge
    assert {r.stripe_version for r in recorded} == {STRIPE_API_VERSION}
    assert STRIPE_API_VERSION == "2026-10-28.endive"


def test_the_worker_gives_its_gateway_the_configured_timeouts(
    silent_server: SilentServer, tmp_path: Path
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite:///{tmp_path}/billing.db",
        stripe_api_base=silent_server.url,
        stripe_connect_timeout_s=1,
        stripe_read_timeout_s=0.3,
        stripe_max_network_retries=0,
    )
    gateway = build_dependencies(settings).gateway
    started = time.monotonic()
    with pytest.raises(TransientPaymentError):
        gateway.default_payment_method(provider_customer_id="cus_1")
    assert time.monotonic() - started < 1.3
    assert len(silent_server.accepted) == 1


def _with_time_left(
    seconds_left: float, timeout: timedelta = timedelta(seconds=60)
) -> ActivityEnvironment:
    """An activity context whose attempt has ``seconds_left`` before its start-to-close."""
    env = ActivityEnvironment()
    started = datetime.now(UTC) - timeout + timedelta(seconds=seconds_left)
    env.info = dataclasses.replace(env.info, started_time=started, start_to_close_timeout=timeout)
    return env


def test_no_stripe_try_starts_that_could_outlive_its_activity_attempt(
    silent_server: SilentServer,
) -> None:
    """An activity makes several requests in a row, each retried by the SDK; one hung Stripe
    could keep the thread talking past the attempt's deadline while Temporal's retry runs
    beside it. A try that might not end before the deadline is not started: the activity fails
    at once and its retry sends the same request under the same key (issue 11, finding 12)."""
    client = make_stripe_client(
        api_key="sk_test_x",
        api_base=silent_server.url,
        max_network_retries=2,
        connect_timeout_s=1.0,
        read_timeout_s=0.4,
    )
    gateway = StripeGateway(client)
    started = time.monotonic()
    with pytest.raises(TransientPaymentError, match="not sent"):
        # 3 s left; a try may take 1.4 s + the 2 s margin.
        _with_time_left(3.0).run(gateway.default_payment_method, provider_customer_id="cus_1")
    assert silent_server.accepted == []  # nothing reached the wire
    assert time.monotonic() - started < 1.0

    # With time in hand, the same call does reach Stripe (and ends in its own bound).
    with pytest.raises(TransientPaymentError, match="safe to retry"):
        _with_time_left(50.0).run(gateway.default_payment_method, provider_customer_id="cus_1")
    assert len(silent_server.accepted) == 3


def test_list_payouts_reads_every_page_with_the_same_filter() -> None:
    """The SDK's auto-pagination follows ``has_more`` with ``starting_after`` and keeps the
    filter: a reconciliation that stopped at the first page would miss payouts."""

    def payout(payout_id: str) -> dict[str, Any]:
        return {
            "id": payout_id,
            "object": "payout",
            "amount": 1000,
            "currency": "usd",
            "status": "paid",
            "automatic": True,
            "created": _SINCE_TS,
        }

    page = {"object": "list", "url": "/v1/payouts"}
    transport = ScriptedHTTPClient(
        (200, {**page, "has_more": True, "data": [payout("po_1"), payout("po_2")]}),
        (200, {**page, "has_more": False, "data": [payout("po_3")]}),
    )
    gateway = StripeGateway(
        make_stripe_client(
            api_key="sk_test_x", api_base=None, max_network_retries=0, http_client=transport
        )
    )

    found = gateway.list_payouts(created_from=_SINCE)

    assert [p.payout_id for p in found] == ["po_1", "po_2", "po_3"]
    first, second = (_query(sent) for sent in transport.sent)
    assert first[2]["created[gte]"] == [str(_SINCE_TS)]
    assert second[2]["starting_after"] == ["po_2"]
    assert second[2]["created[gte]"] == [str(_SINCE_TS)]
