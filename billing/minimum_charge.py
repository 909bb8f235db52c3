"""Stripe's minimum charge amount per currency, and what an invoice owing less does.

Stripe refuses a charge below a per-currency minimum (``amount_too_small``). Its table, from
https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts, is held here as data
(major units as Stripe writes them; converted to minor units with the currency's exponent from
CLDR, ``billing.money``). A currency Stripe does not list there has a minimum that depends on
the account's settlement currency and the day's exchange rate; it is not known here, and its
charges go to Stripe as before.

What Stripe Billing does with an invoice owing less than the minimum, which we follow (Stripe's
Invoices API reference, the invoice object: "If the amount due for the invoice is less than
Stripe's minimum allowed charge per currency, the invoice is automatically marked paid, and we
add the amount due to the customer's credit balance which is applied to the next invoice";
https://docs.stripe.com/billing/customer/balance: "When the amount due on an invoice is less than
the minimum chargeable amount the invoice is marked as paid and the amount owed moved to the
invoice balance as a debit"): the small amount is not charged; it is carried to the customer's
balance as a debit (Stripe's ``invoice_too_small`` customer balance transaction), the invoice is
paid, and the next invoice adds the debit to what it owes. Nothing is lost: the debit is money
the customer still owes, and is collected with the next invoice. Pure: no I/O.
"""

from __future__ import annotations

from decimal import Decimal

from billing.money import currency_exponent

#: Stripe's documented minimum charge amounts, in major units (as Stripe's table writes them).
STRIPE_MINIMUM_CHARGE_MAJOR: dict[str, str] = {
    "USD": "0.50",
    "AED": "2.00",
    "AUD": "0.50",
    "BGN": "1.00",
    "BRL": "0.50",
    "CAD": "0.50",
    "CHF": "0.50",
    "CZK": "15.00",
    "DKK": "2.50",
    "EUR": "0.50",
    "GBP": "0.30",
    "HKD": "4.00",
    "HUF": "175.00",
    "INR": "0.50",
    "JPY": "50",
    "MXN": "10",
    "MYR": "2",
    "NOK": "3.00",
    "NZD": "0.50",
    "PLN": "2.00",
    "RON": "2.00",
    "SEK": "3.00",
    "SGD": "0.50",
    "THB": "10",
}


def minimum_charge_minor(currency: str) -> int | None:
    """Stripe's minimum charge in ``currency``'s minor units (USD 50, JPY 50, GBP 30), or None
    where Stripe's table does not list the currency."""
    major = STRIPE_MINIMUM_CHARGE_MAJOR.get(currency.upper())
    if major is None:
        return None
    # Exact: every listed amount has at most the currency's decimals.
    minor = Decimal(major).scaleb(currency_exponent(currency.upper()))
    if minor != minor.to_integral_value():
        raise ValueError(f"minimum {major} {currency} is not a whole number of minor units")
    return int(minor)


def is_too_small_to_charge(amount_due_minor: int, currency: str) -> bool:
    """Whether an invoice owing ``amount_due_minor`` (more than 0) is below Stripe's minimum
    charge: then it is not charged, the amount is carried to the customer's balance as a debit,
    and the invoice is paid (see the module docstring). 0 is not "too small": it is paid."""
    minimum = minimum_charge_minor(currency)
    return minimum is not None and 0 < amount_due_minor < minimum
