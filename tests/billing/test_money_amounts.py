"""Money: integer minor units, currency exponents from CLDR, validation a caller can act on."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.errors import InvalidCurrency, InvalidInput
from billing.money import (
    MAX_AMOUNT_MINOR,
    Money,
    currency_exponent,
    normalize_currency,
    validate_amount_minor,
)


@pytest.mark.parametrize(
    ("currency", "exponent"),
    [("JPY", 0), ("USD", 2), ("EUR", 2), ("KWD", 3), ("BHD", 3), ("jpy", 0), ("kwd", 3)],
)
def test_currency_exponent_comes_from_cldr(currency: str, exponent: int) -> None:
    assert currency_exponent(currency) == exponent


@pytest.mark.parametrize(
    ("amount_minor", "currency", "shown"),
    [
        (500, "JPY", "JPY 500"),
        (100000, "JPY", "JPY 100000"),
        (1999, "USD", "USD 19.99"),
        (5, "USD", "USD 0.05"),
        (0, "USD", "USD 0.00"),
        (1005, "KWD", "KWD 1.005"),
        (7, "BHD", "BHD 0.007"),
        (2900, "eur", "EUR 29.00"),
    ],
)
def test_format_uses_the_currency_exponent(amount_minor: int, currency: str, shown: str) -> None:
    assert Money(amount_minor, currency).format() == shown


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, MAX_AMOUNT_MINOR),
    st.sampled_from(["JPY", "USD", "EUR", "KWD", "BHD", "CLP", "GBP", "TND"]),
)
def test_formatted_amount_reads_back_as_the_same_minor_units(amount: int, currency: str) -> None:
    code, number = Money(amount, currency).format().split(" ")
    whole, _, fraction = number.partition(".")

    assert code == currency
    assert len(fraction) == currency_exponent(currency)
    assert int(whole + fraction) == amount


@pytest.mark.parametrize("bad", ["ABC", "US", "USDD", 123, "", "XXX", "XTS", "DEM", "HRK", None])
def test_unknown_currency_is_refused_naming_the_value(bad: object) -> None:
    for call in (
        lambda: normalize_currency(bad),
        lambda: Money(100, bad),  # type: ignore[arg-type]
        lambda: currency_exponent(bad),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidCurrency) as caught:
            call()
        assert repr(bad) in caught.value.message
        assert caught.value.field == "currency"
        assert caught.value.code == "invalid_currency"


@pytest.mark.parametrize(("given_code", "code"), [("usd", "USD"), (" eur ", "EUR"), ("Jpy", "JPY")])
def test_currency_is_normalized_to_upper_case(given_code: str, code: str) -> None:
    assert normalize_currency(given_code) == code
    assert Money(100, given_code).currency == code
    assert Money(100, given_code) == Money(100, code)


@pytest.mark.parametrize(
    "bad", [-1, -(10**9), 19.99, 1.0, True, False, "100", None, MAX_AMOUNT_MINOR + 1]
)
def test_bad_amount_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        Money(bad, "USD")  # type: ignore[arg-type]

    assert caught.value.field == "amount_minor"
    assert "amount_minor" in caught.value.message
    assert repr(bad) in caught.value.message


def test_amount_validation_names_the_callers_field() -> None:
    with pytest.raises(InvalidInput, match="fee_minor must not be negative; got -5") as caught:
        validate_amount_minor(-5, field="fee_minor")
    assert caught.value.field == "fee_minor"


def test_zero_and_the_maximum_are_valid_amounts() -> None:
    assert Money(0, "USD").amount_minor == 0
    assert Money(MAX_AMOUNT_MINOR, "USD").amount_minor == MAX_AMOUNT_MINOR


def test_adding_money_of_one_currency() -> None:
    assert Money(1999, "USD") + Money(1, "usd") == Money(2000, "USD")


def test_adding_different_currencies_is_refused() -> None:
    with pytest.raises(InvalidInput, match="cannot add JPY to USD"):
        Money(1999, "USD") + Money(500, "JPY")


def test_a_sum_above_the_maximum_is_refused() -> None:
    with pytest.raises(InvalidInput, match="exceeds the maximum"):
        Money(MAX_AMOUNT_MINOR, "USD") + Money(1, "USD")


def test_money_is_immutable() -> None:
    price = Money(1999, "USD")

    with pytest.raises(dataclasses.FrozenInstanceError):
        price.amount_minor = 1  # type: ignore[misc]
