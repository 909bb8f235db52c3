"""Card numbers are recognised where they stand on their own, and opaque ids are not taken for
them."""

from __future__ import annotations

import pytest

from billing.card_data import contains_card_number, find_card_numbers, redact_card_numbers


@pytest.mark.parametrize(
    "text",
    [
        "4242424242424242",
        "card: 4242 4242 4242 4242.",
        "4000-0000-0000-0341",
        '{"number": "5555555555554444"}',
        "pay with 378282246310005 please",  # 15-digit Amex
    ],
)
def test_a_card_number_on_its_own_is_found_and_redacted(text: str) -> None:
    assert contains_card_number(text)
    assert not contains_card_number(redact_card_numbers(text))


@pytest.mark.parametrize(
    "text",
    [
        "4242424242424241",  # fails the Luhn check
        "424242424242",  # 12 digits
        "42424242424242424242",  # 20 digits
        # Hex ids whose digit runs pass the Luhn check but are glued to letters.
        "bench-4242424242424242ab7f",
        "cus_4242424242424242",
        "pi4242424242424242",
    ],
)
def test_other_digits_and_opaque_ids_are_not_card_numbers(text: str) -> None:
    assert find_card_numbers(text) == []
