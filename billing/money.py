"""Money as integer minor units plus an ISO 4217 currency.

Currency exponents come from CLDR through babel, so JPY has 0 decimals and KWD has 3.
There are no floats and no Decimals here: amounts cross workflow payloads as ``int``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from babel import numbers as babel_numbers
from babel.core import get_global

from billing.errors import InvalidCurrency, InvalidInput

#: Upper bound for a single amount: 10^15 minor units (10 trillion USD). Far above any real
#: subscription price and far below BigInteger/int64 overflow, so sums of many invoices stay safe.
MAX_AMOUNT_MINOR = 10**15

# CLDR lists historic currencies too (e.g. "DEM"); only tender in use today is billable.
_NON_BILLABLE = frozenset({"XXX", "XTS", "XAU", "XAG", "XPT", "XPD", "XDR", "XSU", "XUA"})


@cache
def _known_currencies() -> frozenset[str]:
    # A currency is billable when CLDR says some territory uses it as legal tender with no end
    # date. ``list_currencies()`` alone also returns withdrawn money (DEM, FRF, HRK) and fund
    # codes (USN, CLF). Only the babel data decides, not today's date, so every worker and
    # every replay accepts the same set.
    territory_currencies = get_global("territory_currencies")
    in_use = {
        code
        for entries in territory_currencies.values()
        for code, _start, end, tender in entries
        if tender and end is None
    }
    return frozenset(in_use & set(babel_numbers.list_currencies()))


def normalize_currency(code: object) -> str:
    """Return the upper-case ISO 4217 code, or raise InvalidCurrency saying what was wrong."""
    if not isinstance(code, str) or len(code.strip()) != 3 or not code.strip().isalpha():
        raise InvalidCurrency(
            f"currency must be a 3-letter ISO 4217 code such as 'USD'; got {code!r}",
            field="currency",
        )
    upper = code.strip().upper()
    if upper not in _known_currencies() or upper in _NON_BILLABLE:
        raise InvalidCurrency(
            f"unknown currency {code!r}; use an ISO 4217 code such as 'USD', 'EUR' or 'JPY'",
            field="currency",
        )
    return upper


@cache
def currency_exponent(currency: str) -> int:
    """Number of decimal places of the currency's minor unit (JPY 0, USD 2, KWD 3), from CLDR."""
    return int(babel_numbers.get_currency_precision(normalize_currency(currency)))


def validate_amount_minor(amount: object, *, field: str = "amount_minor") -> int:
    """An amount in minor units must be a non-negative int (bool is not an amount)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidInput(
            f"{field} must be an integer number of minor units (e.g. 1999 for 19.99); "
            f"got {amount!r}",
            field=field,
        )
    if amount < 0:
        raise InvalidInput(f"{field} must not be negative; got {amount}", field=field)
    if amount > MAX_AMOUNT_MINOR:
        raise InvalidInput(
            f"{field} {amount} exceeds the maximum of {MAX_AMOUNT_MINOR} minor units", field=field
        )
    return amount


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in minor units (cents for USD, yen for JPY) of one currency."""

    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        validate_amount_minor(self.amount_minor)
        object.__setattr__(self, "currency", normalize_currency(self.currency))

    def format(self) -> str:
        """Human form such as 'USD 19.99' or 'JPY 500'. For display only."""
        exp = currency_exponent(self.currency)
        if exp == 0:
            return f"{self.currency} {self.amount_minor}"
        whole, frac = divmod(self.amount_minor, 10**exp)
        return f"{self.currency} {whole}.{frac:0{exp}d}"

    def __add__(self, other: Money) -> Money:
        if other.currency != self.currency:
            raise InvalidInput(f"cannot add {other.currency} to {self.currency}")
        return Money(self.amount_minor + other.amount_minor, self.currency)
