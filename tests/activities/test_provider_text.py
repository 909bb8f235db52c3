"""Text the payment provider sends is recorded whatever it holds: a decline message with a NUL
or a lone surrogate, a decline code longer than its column. PostgreSQL refuses the first and
the last, so an unclean write failed the charge activity after the provider had answered, again
on every retry. localstripe's messages are always clean, so its real decline is passed through
a wrapper that only rewrites the two texts (the one thing a real part here cannot produce)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from billing.payments import ChargeOutcome
from billing.testing import cards
from tests.activities.test_billing_activities import (  # noqa: F401 (the stack fixture)
    Stack,
    charge,
    open_invoice,
    seed_subscription,
    stack,
    stored_attempts,
)

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"])

HOSTILE_MESSAGE = "Your card was declined.\x00\ud800 4242 4242 4242 4242 " + "x" * 600
HOSTILE_CODE = "card_declined\x00" + "y" * 100


class HostileText:
    """The real gateway, whose decline texts are replaced by hostile ones."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def charge(self, **kwargs: Any) -> ChargeOutcome:
        outcome: ChargeOutcome = self.real.charge(**kwargs)
        return dataclasses.replace(
            outcome, decline_code=HOSTILE_CODE, failure_message=HOSTILE_MESSAGE
        )


def test_a_decline_with_text_the_database_refuses_is_recorded_cleaned(stack: Stack) -> None:  # noqa: F811
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)
    stack.activities.gateway = HostileText(stack.gateway)  # type: ignore[assignment]

    result = charge(stack, invoice.invoice_id, 1)

    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert attempt.failure_message is not None and attempt.decline_code is not None
    assert attempt.failure_message.startswith("Your card was declined.\ufffd\ufffd [card number")
    assert len(attempt.failure_message) == 500 and len(attempt.decline_code) == 64
    assert attempt.decline_code.startswith("card_declined\ufffdyyy")
    # The workflow gets what was stored, never the raw text.
    assert (result.failure_message, result.decline_code) == (
        attempt.failure_message,
        attempt.decline_code,
    )
