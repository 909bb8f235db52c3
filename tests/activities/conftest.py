"""Fixtures for activity tests: the real Stripe SDK on the session's localstripe process
(the session-scoped ``localstripe`` fixture lives in tests/conftest.py and uses
``billing.testing.localstripe.LocalStripe``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import stripe

from activities.stripe_gateway import StripeGateway, make_stripe_client
from billing.testing.localstripe import LocalStripe
from billing.testing.stripe_recording import RecordingHTTPClient

#: localstripe accepts any secret key of the form ``sk_...`` (it checks the prefix only).
LOCALSTRIPE_API_KEY = "sk_test_localstripe"


@pytest.fixture
def recording_http_client() -> Iterator[RecordingHTTPClient]:
    http_client = RecordingHTTPClient()
    yield http_client
    http_client.close()


@pytest.fixture
def stripe_client(
    localstripe: LocalStripe, recording_http_client: RecordingHTTPClient
) -> stripe.StripeClient:
    """A client on localstripe whose requests are recorded. No SDK-level retries, so a test
    sees each failure exactly as the activity would."""
    return make_stripe_client(
        api_key=LOCALSTRIPE_API_KEY,
        api_base=localstripe.url,
        max_network_retries=0,
        http_client=recording_http_client,
    )


@pytest.fixture
def gateway(stripe_client: stripe.StripeClient) -> StripeGateway:
    # localstripe 1.15 rejects `description` on PaymentIntents ("Unexpected description").
    return StripeGateway(stripe_client, send_description=False)
