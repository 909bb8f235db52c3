"""A babel whose CLDR data no longer accepts some currencies, as a future babel release could
(a currency withdrawn, or its exponent changed so the lookup is refused). No real babel
produces this today, so the tests patch babel's lookups the way billing.money reads them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from babel import numbers as babel_numbers

import billing.money


@contextmanager
def cldr_without(*currencies: str) -> Iterator[None]:
    """While active, CLDR lists ``currencies`` as no longer in use anywhere and refuses their
    exponent (minor-unit precision)."""
    withdrawn = frozenset(currencies)
    real_get_global = billing.money.get_global
    real_precision = babel_numbers.get_currency_precision

    def get_global(key: str) -> Any:
        data = real_get_global(key)
        if key != "territory_currencies":
            return data
        # Every territory's entry for a withdrawn currency gets an end date.
        return {
            territory: [
                (code, start, end if code not in withdrawn else (2026, 1, 1), tender)
                for code, start, end, tender in entries
            ]
            for territory, entries in data.items()
        }

    def get_currency_precision(currency: str) -> int:
        if currency in withdrawn:
            raise ValueError(f"no precision for {currency} in this CLDR")
        return int(real_precision(currency))

    def clear_caches() -> None:
        billing.money._known_currencies.cache_clear()
        billing.money.currency_exponent.cache_clear()

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(billing.money, "get_global", get_global)
            patch.setattr(babel_numbers, "get_currency_precision", get_currency_precision)
            clear_caches()
            yield
    finally:
        # What was cached under the patched data must not outlive it.
        clear_caches()
