"""The billing calendar.

Every billing date is computed fresh from the subscription's anchor as
``anchor + k * interval`` in the customer's IANA time zone, never by stepping from the
previous date: stepping drifts (Jan 31 -> Feb 28 -> Mar 28), recomputing does not
(Jan 31 -> Feb 29 -> Mar 31 -> Apr 30). ``relativedelta`` clamps to the month's end, so an
annual Feb 29 anchor bills Feb 28 in common years.

Wall-clock arithmetic happens in the customer's zone, so a DST change never shifts the
local billing time; results are returned in UTC.

Zone rules come only from the ``tzdata`` package, pinned exactly in pyproject.toml, never from
the host (``/usr/share/zoneinfo``, ``PYTHONTZPATH``): billing dates are computed inside
workflow code, so two workers with different system tzdata would compute different dates for
one subscription, and an OS update would move a running subscription's dates between two
invoices. A new tzdata is a release of this package (README, "Replay safety").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cache
from importlib import import_module, resources
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta

from billing.errors import InvalidInput, InvalidTimezone


class IntervalUnit(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


#: Longest billing interval accepted, per unit (three years, as Stripe allows).
MAX_INTERVAL_COUNT: dict[IntervalUnit, int] = {
    IntervalUnit.DAY: 3 * 365,
    IntervalUnit.WEEK: 3 * 52,
    IntervalUnit.MONTH: 36,
    IntervalUnit.YEAR: 3,
}

# Rough period lengths, only used to guess an index before the exact search corrects it.
_APPROX_DAYS = {
    IntervalUnit.DAY: 1.0,
    IntervalUnit.WEEK: 7.0,
    IntervalUnit.MONTH: 30.436875,
    IntervalUnit.YEAR: 365.2425,
}


def parse_interval_unit(value: object) -> IntervalUnit:
    try:
        return IntervalUnit(str(value).lower())
    except ValueError:
        allowed = ", ".join(u.value for u in IntervalUnit)
        raise InvalidInput(
            f"unknown interval {value!r}; use one of: {allowed}", field="interval"
        ) from None


def validate_interval_count(unit: IntervalUnit, count: object) -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidInput(
            f"interval_count must be a whole number; got {count!r}", field="interval_count"
        )
    limit = MAX_INTERVAL_COUNT[unit]
    if count < 1 or count > limit:
        raise InvalidInput(
            f"interval_count must be between 1 and {limit} for a {unit.value} interval; "
            f"got {count}",
            field="interval_count",
        )
    return count


# Names the tz database resolves per machine rather than per customer: "localtime" is the
# host's own zone, so two workers (or a replay) could compute different billing dates.
_MACHINE_LOCAL_ZONES = frozenset({"localtime", "posixrules"})

#: The IANA release of the zone rules every billing date is computed with (e.g. "2026f").
TZDATA_VERSION: str = str(import_module("tzdata").IANA_VERSION)


@cache
def available_timezones() -> frozenset[str]:
    """Every zone name the calendar accepts: the ``tzdata`` package's list, whatever the host
    has installed."""
    names = resources.files("tzdata").joinpath("zones").read_text(encoding="utf-8").split()
    return frozenset(names) - _MACHINE_LOCAL_ZONES


def resolve_timezone(name: str) -> ZoneInfo:
    """The IANA zone for ``name`` from the pinned ``tzdata`` package, or InvalidTimezone naming
    the bad value."""
    if not isinstance(name, str) or name not in available_timezones():
        raise _invalid_timezone(name)
    return _zone(name)


def _invalid_timezone(name: object) -> InvalidTimezone:
    return InvalidTimezone(
        f"unknown time zone {name!r}; use an IANA name such as 'Europe/Paris'",
        field="timezone",
    )


@cache
def _zone(name: str) -> ZoneInfo:
    # ZoneInfo(name) would search the host's TZPATH first and fall back to tzdata only when the
    # host has no such file; reading tzdata's own file makes the package the only source. The
    # cache keeps one object per zone for the process (workflows pass this module through the
    # sandbox, so it is shared by every workflow run in the worker).
    # ``name`` is in tzdata's list (checked above), so it is a relative path of plain parts.
    source = resources.files("tzdata").joinpath("zoneinfo", *name.split("/"))
    with source.open("rb") as tzif:
        return ZoneInfo.from_file(tzif, key=name)


def ensure_utc(instant: datetime) -> datetime:
    """Reject naive datetimes: an instant without a zone is ambiguous in billing."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise InvalidInput(
            f"instant {instant.isoformat()} has no time zone; pass an aware datetime"
        )
    return instant.astimezone(UTC)


def _step(unit: IntervalUnit, n: int) -> relativedelta:
    match unit:
        case IntervalUnit.DAY:
            return relativedelta(days=n)
        case IntervalUnit.WEEK:
            return relativedelta(weeks=n)
        case IntervalUnit.MONTH:
            return relativedelta(months=n)
        case IntervalUnit.YEAR:
            return relativedelta(years=n)


def _local_to_utc(naive_local: datetime, zone: ZoneInfo) -> datetime:
    # fold=0: an ambiguous wall time (DST fall-back) means its first occurrence; a wall time
    # inside a spring-forward gap is read with the pre-transition offset, i.e. moved forward by
    # the gap. Both rules are deterministic, so every replay computes the same instant.
    return naive_local.replace(tzinfo=zone, fold=0).astimezone(UTC)


def billing_date(
    anchor_at: datetime, timezone: str, unit: IntervalUnit, count: int, index: int
) -> datetime:
    """Start of period ``index`` (0-based) in UTC: ``anchor + index * (count unit)``, local time."""
    if index < 0:
        raise InvalidInput(f"period index must be >= 0; got {index}")
    anchor_utc = ensure_utc(anchor_at)
    # Validate everything even for index 0, so a bad zone or interval fails on the first call
    # rather than on the first renewal.
    zone = resolve_timezone(timezone)
    unit = parse_interval_unit(unit)
    validate_interval_count(unit, count)
    if index == 0:
        return anchor_utc
    anchor_local = anchor_utc.astimezone(zone).replace(tzinfo=None)
    return _local_to_utc(anchor_local + _step(unit, index * count), zone)


@dataclass(frozen=True, slots=True)
class BillingPeriod:
    """Half-open period [start, end) in UTC; ``index`` counts periods from the anchor."""

    index: int
    start: datetime
    end: datetime


def period(
    anchor_at: datetime, timezone: str, unit: IntervalUnit, count: int, index: int
) -> BillingPeriod:
    return BillingPeriod(
        index=index,
        start=billing_date(anchor_at, timezone, unit, count, index),
        end=billing_date(anchor_at, timezone, unit, count, index + 1),
    )


def period_index_at(
    anchor_at: datetime, timezone: str, unit: IntervalUnit, count: int, instant: datetime
) -> int:
    """Index of the period containing ``instant`` (-1 if it is before the anchor)."""
    anchor_utc = ensure_utc(anchor_at)
    instant_utc = ensure_utc(instant)
    # A zero or negative count would divide by zero or walk forever below.
    resolve_timezone(timezone)
    unit = parse_interval_unit(unit)
    validate_interval_count(unit, count)
    if instant_utc < anchor_utc:
        return -1
    elapsed_days = (instant_utc - anchor_utc) / timedelta(days=1)
    k = max(0, int(elapsed_days / (_APPROX_DAYS[unit] * count)))
    # The estimate is within a period or two; walk to the exact index.
    while k > 0 and billing_date(anchor_utc, timezone, unit, count, k) > instant_utc:
        k -= 1
    while billing_date(anchor_utc, timezone, unit, count, k + 1) <= instant_utc:
        k += 1
    return k


def first_index_at_or_after(
    anchor_at: datetime, timezone: str, unit: IntervalUnit, count: int, instant: datetime
) -> int:
    """Smallest index whose billing date is at or after ``instant`` (the anchor is kept)."""
    k = period_index_at(anchor_at, timezone, unit, count, instant)
    if k < 0:
        return 0
    if billing_date(anchor_at, timezone, unit, count, k) == ensure_utc(instant):
        return k
    return k + 1


def add_local_days(start_at: datetime, timezone: str, days: int) -> datetime:
    """``start + days`` on the customer's wall clock (trial ends keep the signup's local time)."""
    zone = resolve_timezone(timezone)
    local = ensure_utc(start_at).astimezone(zone).replace(tzinfo=None)
    return _local_to_utc(local + timedelta(days=days), zone)
