"""Stripe test card numbers (same meaning in Stripe test mode and on localstripe) and a helper
that turns one into a PaymentMethod id."""

from __future__ import annotations

from typing import Final

import stripe

__all__ = [
    "DECLINED_AT_ATTACH",
    "DECLINES_AFTER_ATTACH",
    "LOST",
    "REQUIRES_AUTHENTICATION",
    "STOLEN",
    "SUCCEEDS",
    "create_card_payment_method",
]

#: Every charge succeeds.
SUCCEEDS: Final = "4242424242424242"
#: Attaches to a customer, then every charge is declined (``card_declined``).
DECLINES_AFTER_ATTACH: Final = "4000000000000341"
#: Declined when attached to a customer.
DECLINED_AT_ATTACH: Final = "4000000000000002"
#: Needs 3-D Secure authentication (SCA); off-session charges need the customer.
REQUIRES_AUTHENTICATION: Final = "4000002500003155"
#: Stripe's stolen_card test card. localstripe (1.15) refuses it at attach (card_declined,
#: no decline code); it never gets to be charged there.
STOLEN: Final = "4000000000009979"
#: Stripe's lost_card test card; localstripe refuses it at attach, like STOLEN.
LOST: Final = "4000000000009987"


def create_card_payment_method(client: stripe.StripeClient, number: str) -> str:
    """Create a card PaymentMethod from a raw test card number and return its id (``pm_...``).

    This works on localstripe. Real Stripe test mode refuses raw card numbers from a server
    unless the account is enabled for it; there use the test tokens instead, such as
    ``pm_card_visa``, ``pm_card_chargeCustomerFail``, ``pm_card_visa_chargeDeclined`` and
    ``pm_card_authenticationRequired``.
    """
    payment_method = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"},
        }
    )
    return payment_method.id
