"""A gateway loads the SDK's classes of the objects Stripe sends back when it is made, so the
first charge of a worker does not import them inside its response on billing day."""

from __future__ import annotations

import subprocess
import sys

import stripe

from activities.stripe_gateway import RESPONSE_CLASSES

CHECK = """
import sys
import stripe
from activities.stripe_gateway import StripeGateway, make_stripe_client
before = {m for m in sys.modules if m.startswith('stripe._')}
StripeGateway(make_stripe_client(api_key='sk_test_x', api_base='http://127.0.0.1:9'))
after = {m for m in sys.modules if m.startswith('stripe._')}
print(' '.join(sorted(after - before)))
"""


def test_every_response_class_is_a_class_of_the_sdk() -> None:
    for name in RESPONSE_CLASSES:
        assert isinstance(getattr(stripe, name), type), name


def test_making_a_gateway_imports_the_response_classes() -> None:
    """In a fresh interpreter (this one may have imported them already)."""
    loaded = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in ("PaymentIntent", "Charge", "BalanceTransaction", "Customer", "Refund"):
        module = getattr(stripe, name).__module__
        assert module in loaded, (name, module, loaded)
