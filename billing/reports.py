"""Revenue reports from our own records, per currency, with no FX conversion (as Lago does):
MRR and its movements, accounts-receivable aging, dunning recovery, collected vs invoiced.

Pure rules only: the repositories (``db.repositories.reports``) read the rows, these functions
turn them into figures, and the API, the CLI and the dashboard show them. Amounts are integer
minor units of the row's currency; instants are aware UTC datetimes; months are calendar
months in UTC.

Rounding happens once, at one named place: ``monthly_recurring_minor`` rounds a subscription's
normalised monthly amount half-to-even to a whole minor unit. Every figure after that is a sum
of integers, so the movements add up exactly: opening + new + reactivated + expansion -
contraction - churned = closing.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from enum import StrEnum
from fractions import Fraction
from functools import lru_cache

from billing.calendar import IntervalUnit
from billing.errors import InvalidInput
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.subscription import SubscriptionStatus

# ---- MRR -----------------------------------------------------------------------------------

#: A subscription in one of these statuses counts toward MRR: it is billed (past_due and
#: needs_attention are still owed and collected; churn is when it ends, pauses or gives up).
#: Trials, pauses, unpaid (dunning gave up, no new invoices) and canceled count nothing.
MRR_STATUSES: frozenset[SubscriptionStatus] = frozenset(
    {SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE, SubscriptionStatus.NEEDS_ATTENTION}
)

#: Months per billing interval unit: a year is 12 months, a week 12/52 of a month (so weekly x
#: 52 / 12), a day 12/365.
_MONTHS_PER_UNIT: dict[IntervalUnit, Fraction] = {
    IntervalUnit.MONTH: Fraction(1),
    IntervalUnit.YEAR: Fraction(12),
    IntervalUnit.WEEK: Fraction(12, 52),
    IntervalUnit.DAY: Fraction(12, 365),
}

#: The rounding of a subscription's monthly amount (the one rounding in these reports).
MRR_ROUNDING = "half-even"


@lru_cache(maxsize=4096)  # pure; a book has few price points
def monthly_recurring_minor(
    amount_minor: int, interval: IntervalUnit, interval_count: int, quantity: int = 1
) -> int:
    """A subscription's MRR, minor units: ``amount_minor`` (the price of one unit for one
    billing interval) times ``quantity``, spread over the interval's months (annual / 12,
    weekly x 52 / 12, every 3 months / 3), rounded half-to-even once, here."""
    if amount_minor < 0 or quantity < 0 or interval_count < 1:
        raise InvalidInput(
            f"cannot normalise amount {amount_minor} x {quantity} every {interval_count} "
            f"{interval.value}(s): amounts and quantities must not be negative, the count >= 1"
        )
    months = _MONTHS_PER_UNIT[IntervalUnit(interval)] * interval_count
    exact = Fraction(amount_minor * quantity) / months
    return round(exact)  # Fraction.__round__: half to even


@dataclass(frozen=True, slots=True, order=True)
class Month:
    """A calendar month in UTC."""

    year: int
    month: int

    def __post_init__(self) -> None:
        if not (1 <= self.month <= 12 and 1 <= self.year <= 9998):
            raise InvalidInput(f"no such month: {self.year}-{self.month:02d}")

    @classmethod
    def parse(cls, text: str, *, field: str = "month") -> Month:
        """``2026-03`` (``YYYY-MM``); InvalidInput naming ``field`` otherwise."""
        match = re.fullmatch(r"(\d{4})-(\d{2})", text.strip()) if isinstance(text, str) else None
        if match is None or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1:
            raise InvalidInput(
                f"{field} must be a month as YYYY-MM, such as '2026-03'; got {text!r}",
                field=field,
            )
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def of(cls, instant: datetime) -> Month:
        utc = instant.astimezone(UTC)
        return cls(utc.year, utc.month)

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    def next(self) -> Month:
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


#: Longest range a monthly report covers (ten years).
MAX_REPORT_MONTHS = 120


def month_range(first: Month, last: Month) -> list[Month]:
    """Every month from ``first`` to ``last``, both included; InvalidInput if reversed or longer
    than MAX_REPORT_MONTHS."""
    if last < first:
        raise InvalidInput(f"from ({first}) is after to ({last}); swap them", field="from")
    months = [first]
    while months[-1] < last:
        months.append(months[-1].next())
        if len(months) > MAX_REPORT_MONTHS:
            raise InvalidInput(
                f"a report covers at most {MAX_REPORT_MONTHS} months; {first} to {last} is more",
                field="to",
            )
    return months


@dataclass(frozen=True, slots=True)
class SubscriptionHistory:
    """What MRR needs of one subscription: its monthly amount and its status over time.

    ``changes`` are (changed_at, new status) in time order; before the first one the status
    was ``initial_status``. ``price_changes`` are (changed_at, new monthly amount) in time
    order (a plan or seat change); before the first one the monthly amount was
    ``monthly_minor``. The subscription exists from ``created_at`` on: its state at an
    instant after it is what every change before that instant left (a change logged before
    ``created_at`` is in force from ``created_at``).
    """

    subscription_id: str
    customer_id: str
    currency: str
    monthly_minor: int
    created_at: datetime
    initial_status: SubscriptionStatus
    changes: tuple[tuple[datetime, SubscriptionStatus], ...] = ()
    price_changes: tuple[tuple[datetime, int], ...] = ()

    def status_at(self, instant: datetime) -> SubscriptionStatus | None:
        """The status just before ``instant`` (changes at ``instant`` itself count from then
        on); None if the subscription did not exist yet."""
        if self.created_at >= instant:
            return None
        status = self.initial_status
        for at, to in self.changes:
            if at >= instant:
                break
            status = to
        return status

    def monthly_at(self, instant: datetime) -> int:
        """The monthly amount just before ``instant`` (whatever the status)."""
        monthly = self.monthly_minor
        for at, to in self.price_changes:
            if at >= instant:
                break
            monthly = to
        return monthly

    def mrr_at(self, instant: datetime) -> int:
        return self.monthly_at(instant) if self.status_at(instant) in MRR_STATUSES else 0

    def _events(self) -> list[tuple[datetime, SubscriptionStatus | None, int | None]]:
        """Status and price changes in one time order: (at, new status or None, new monthly
        amount or None); each list keeps its own order among equal instants."""
        merged: list[tuple[datetime, SubscriptionStatus | None, int | None]] = [
            (at, to, None) for at, to in self.changes
        ]
        if self.price_changes:
            merged.extend((at, None, to) for at, to in self.price_changes)
            merged.sort(key=lambda event: event[0])  # stable
        return merged

    def mrr_at_each(self, instants: Sequence[datetime]) -> list[int]:
        """``mrr_at`` for each of ``instants`` (ascending): one bisection per change, the
        boundaries between two changes filled at once (a report asks this of thousands)."""
        count = len(instants)
        values = [0] * count
        # The first instant the subscription existed just before.
        filled = bisect_right(instants, self.created_at)
        if filled >= count:
            return values
        status, monthly = self.initial_status, self.monthly_minor
        for at, to_status, to_monthly in self._events():
            # A change at ``at`` is seen from the first instant after it on.
            seen_from = bisect_right(instants, at, lo=filled)
            if seen_from > filled:
                if monthly and status in MRR_STATUSES:
                    values[filled:seen_from] = [monthly] * (seen_from - filled)
                filled = seen_from
            if to_status is not None:
                status = to_status
            if to_monthly is not None:
                monthly = to_monthly
        if monthly and status in MRR_STATUSES:
            values[filled:] = [monthly] * (count - filled)
        return values

    def first_counted_boundary(self) -> datetime | None:
        """The first month start at which it counted toward MRR (its MRR there above 0; None:
        never). A subscription that counted only between two month starts never counted: MRR
        is read at month starts, so a return after such a spell is new business, and a
        return after a month start it counted at is a reactivation."""
        boundaries = sorted(
            {Month.of(self.created_at).next().start}
            | {Month.of(at).next().start for at, _ in self.changes}
            | {Month.of(at).next().start for at, _ in self.price_changes}
        )
        return next((b for b in boundaries if b > self.created_at and self.mrr_at(b) > 0), None)


class Movement(StrEnum):
    NEW = "new"
    EXPANSION = "expansion"
    CONTRACTION = "contraction"
    CHURNED = "churned"
    REACTIVATED = "reactivated"


def classify_movement(before: int, after: int, *, counted_before: bool) -> Movement | None:
    """How one subscription's MRR moved between two month ends. ``counted_before``: it had
    counted toward MRR at some month start before the earlier one (a return is a
    reactivation, not new business)."""
    if before == after:
        return None
    if before == 0:
        return Movement.REACTIVATED if counted_before else Movement.NEW
    if after == 0:
        return Movement.CHURNED
    return Movement.EXPANSION if after > before else Movement.CONTRACTION


def rate(numerator: int, denominator: int) -> str | None:
    """``numerator / denominator`` as a decimal string with 4 places, half-to-even (``0.0500``);
    None when the denominator is 0 (no base to churn from)."""
    if denominator == 0:
        return None
    exact = Decimal(numerator) / Decimal(denominator)
    return str(exact.quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN))


@dataclass(frozen=True, slots=True, kw_only=True)
class MrrMonth:
    """One currency's MRR over one month: the opening figure (at the month's start), the
    movements (each a positive amount), the closing figure (at the next month's start) and
    the customers and subscriptions behind it. Minor units."""

    month: Month
    currency: str
    opening_mrr_minor: int
    new_minor: int
    expansion_minor: int
    contraction_minor: int
    churned_minor: int
    reactivated_minor: int
    closing_mrr_minor: int
    active_subscriptions: int
    active_customers: int
    opening_customers: int
    churned_customers: int

    @property
    def arr_minor(self) -> int:
        return self.closing_mrr_minor * 12

    @property
    def net_movement_minor(self) -> int:
        return (
            self.new_minor
            + self.reactivated_minor
            + self.expansion_minor
            - self.contraction_minor
            - self.churned_minor
        )

    @property
    def logo_churn_rate(self) -> str | None:
        """Customers who counted at the opening and no longer do, over the opening's."""
        return rate(self.churned_customers, self.opening_customers)

    @property
    def revenue_churn_rate(self) -> str | None:
        """(churned + contraction) over the opening MRR."""
        return rate(self.churned_minor + self.contraction_minor, self.opening_mrr_minor)


@dataclass(frozen=True, slots=True)
class SteadyGroup:
    """Subscriptions that count toward MRR at every boundary of a report and never change
    within it (created before it, no status change from its start on): ``subscriptions`` of
    them at ``monthly_minor`` each. The database counts them instead of listing them, since
    they move nothing; most of a book is steady in any given year."""

    currency: str
    monthly_minor: int
    subscriptions: int


def mrr_report(
    histories: Iterable[SubscriptionHistory],
    months: Sequence[Month],
    *,
    steady: Iterable[SteadyGroup] = (),
    steady_customers: dict[str, int] | None = None,
    steady_customer_ids: frozenset[tuple[str, str]] = frozenset(),
) -> list[MrrMonth]:
    """MRR per currency and month, in (currency, month) order. Subscriptions are compared at
    month boundaries: one that starts and ends inside a month moves nothing.

    ``steady`` adds counted subscriptions that are the same at every boundary (constant MRR,
    no movement); ``steady_customers`` says how many distinct customers own one with MRR above
    0 per currency, and ``steady_customer_ids`` which (currency, customer) of ``histories``
    also own one (such a customer counts at every boundary and never churns). The result
    equals passing every subscription in ``histories``. Active subscriptions and customers are
    those with MRR above 0.

    One walk per subscription (its MRR at each boundary, its movements only where it moved);
    customers are counted from the set of boundaries at which each one counts, grouped, since
    few distinct such sets occur. The report at 1M invoices lists thousands of subscriptions."""
    by_currency: dict[str, list[SubscriptionHistory]] = defaultdict(list)
    for history in histories:
        by_currency[history.currency].append(history)
    constant_mrr: dict[str, int] = defaultdict(int)
    constant_subs: dict[str, int] = defaultdict(int)
    for group in steady:
        # A subscription counts as active while its MRR is above 0 (a free plan, or a price
        # that rounds to nothing a month, is not revenue), as for the listed ones below.
        if group.monthly_minor > 0:
            constant_mrr[group.currency] += group.monthly_minor * group.subscriptions
            constant_subs[group.currency] += group.subscriptions
    constant_customers = steady_customers or {}
    boundaries = [m.start for m in months] + [months[-1].next().start] if months else []
    count = len(months)
    result: list[MrrMonth] = []
    for currency in sorted(set(by_currency) | set(constant_subs)):
        # Per boundary j (month j's start; the last is the end of the last month).
        mrr_at = [constant_mrr[currency]] * (count + 1)
        active_at = [constant_subs[currency]] * (count + 1)
        moved: list[dict[Movement, int]] = [dict.fromkeys(Movement, 0) for _ in months]
        # Per customer only the listed subscriptions make count (the steady ones are counted
        # at every boundary, in ``always``): the boundaries at which it counts, as bits.
        counted_at: dict[str, int] = {}
        # Subscriptions alike at every boundary, and alike in when they first counted (as
        # far as the boundaries tell), move alike: each such shape is added up once, times
        # how many share it (thousands of subscriptions at 1M invoices, a few shapes).
        shapes: dict[tuple[tuple[int, ...], int], int] = defaultdict(int)
        bits_of: dict[tuple[int, ...], int] = {}
        for sub in by_currency.get(currency, []):
            values = tuple(sub.mrr_at_each(boundaries))
            bits = bits_of.get(values)
            if bits is None:
                bits = bits_of[values] = sum(1 << j for j, value in enumerate(values) if value)
            if not bits:
                continue  # never counted at a boundary: no MRR, no movement, no customer
            first = sub.first_counted_boundary()
            # It had counted before boundary k exactly when k >= this.
            counted_from = count + 1 if first is None else bisect_right(boundaries, first)
            shapes[(values, counted_from)] += 1
            if (currency, sub.customer_id) not in steady_customer_ids:
                counted_at[sub.customer_id] = counted_at.get(sub.customer_id, 0) | bits
        for (values, counted_from), alike in shapes.items():
            for j, value in enumerate(values):
                if value:
                    mrr_at[j] += value * alike
                    active_at[j] += alike
            for k in range(count):
                before, after = values[k], values[k + 1]
                movement = classify_movement(before, after, counted_before=k >= counted_from)
                if movement is not None:
                    moved[k][movement] += abs(after - before) * alike
        patterns: dict[int, int] = defaultdict(int)
        for bits in counted_at.values():
            patterns[bits] += 1
        always = constant_customers.get(currency, 0)
        for k, month in enumerate(months):
            opening_customers = closing_customers = churned_customers = 0
            for bits, customers in patterns.items():
                was, is_ = bits >> k & 1, bits >> (k + 1) & 1
                opening_customers += customers * was
                closing_customers += customers * is_
                churned_customers += customers * (was & (1 - is_))
            totals = moved[k]
            result.append(
                MrrMonth(
                    month=month,
                    currency=currency,
                    opening_mrr_minor=mrr_at[k],
                    new_minor=totals[Movement.NEW],
                    expansion_minor=totals[Movement.EXPANSION],
                    contraction_minor=totals[Movement.CONTRACTION],
                    churned_minor=totals[Movement.CHURNED],
                    reactivated_minor=totals[Movement.REACTIVATED],
                    closing_mrr_minor=mrr_at[k + 1],
                    active_subscriptions=active_at[k + 1],
                    active_customers=always + closing_customers,
                    opening_customers=always + opening_customers,
                    churned_customers=churned_customers,
                )
            )
    return result


def with_mrr(rows: Sequence[MrrMonth]) -> list[MrrMonth]:
    """``rows`` less the currencies with no MRR at any boundary of the report (subscriptions
    that never counted, or counted only between two boundaries, move nothing): the currencies a
    report shows."""
    shown = {r.currency for r in rows if r.opening_mrr_minor or r.closing_mrr_minor}
    return [r for r in rows if r.currency in shown]


@dataclass(frozen=True, slots=True, kw_only=True)
class MrrBoundary:
    """What one currency's MRR does around one month start, summed over its customers (the
    database keeps these per month, migration 0023): how the levels move at ``month``'s first
    instant (MRR, subscriptions with MRR above 0, customers owning one), and the movements of
    the month before it. Minor units."""

    currency: str
    month: Month
    mrr_minor: int = 0
    subscriptions: int = 0
    customers: int = 0
    new_minor: int = 0
    reactivated_minor: int = 0
    churned_minor: int = 0
    churned_customers: int = 0
    expansion_minor: int = 0
    contraction_minor: int = 0


def mrr_from_boundaries(
    opening: Iterable[MrrBoundary], moves: Iterable[MrrBoundary], months: Sequence[Month]
) -> list[MrrMonth]:
    """The report ``mrr_report`` gives, from the levels at the first month's start
    (``opening``: every level move up to it, summed per currency; its movements are ignored)
    and the moves at each later boundary (``moves``: month starts after the first, up to the
    end of the last month). Currencies with no MRR at any boundary are left out
    (``with_mrr``)."""
    if not months:
        return []
    first = months[0]
    at_start: dict[str, MrrBoundary] = {}
    for row in opening:
        at_start[row.currency] = row
    moved: dict[tuple[str, Month], MrrBoundary] = {}
    for row in moves:
        if first < row.month <= months[-1].next():
            moved[(row.currency, row.month)] = row
    result: list[MrrMonth] = []
    for currency in sorted(set(at_start) | {c for c, _ in moved}):
        start = at_start.get(currency, MrrBoundary(currency=currency, month=first))
        mrr, subscriptions, customers = start.mrr_minor, start.subscriptions, start.customers
        for month in months:
            row = moved.get((currency, month.next()), MrrBoundary(currency=currency, month=month))
            opening_mrr, opening_customers = mrr, customers
            mrr += row.mrr_minor
            subscriptions += row.subscriptions
            customers += row.customers
            result.append(
                MrrMonth(
                    month=month,
                    currency=currency,
                    opening_mrr_minor=opening_mrr,
                    new_minor=row.new_minor,
                    expansion_minor=row.expansion_minor,
                    contraction_minor=row.contraction_minor,
                    churned_minor=row.churned_minor,
                    reactivated_minor=row.reactivated_minor,
                    closing_mrr_minor=mrr,
                    active_subscriptions=subscriptions,
                    active_customers=customers,
                    opening_customers=opening_customers,
                    churned_customers=row.churned_customers,
                )
            )
    return with_mrr(result)


def is_steady(history: SubscriptionHistory, start: datetime) -> bool:
    """Whether the subscription is the same at every boundary from ``start`` on: created
    before it and no status or price change at or after it."""
    return (
        history.created_at < start
        and all(at < start for at, _ in history.changes)
        and all(at < start for at, _ in history.price_changes)
    )


MRR_CSV_COLUMNS = (
    "month",
    "currency",
    "opening_mrr_minor",
    "new_minor",
    "expansion_minor",
    "contraction_minor",
    "churned_minor",
    "reactivated_minor",
    "closing_mrr_minor",
    "arr_minor",
    "active_subscriptions",
    "active_customers",
    "churned_customers",
    "logo_churn_rate",
    "revenue_churn_rate",
)


def mrr_row(m: MrrMonth) -> dict[str, object]:
    """One month as the API's JSON object and the CSV's cells (``MRR_CSV_COLUMNS``)."""
    return {
        "month": str(m.month),
        "currency": m.currency,
        "opening_mrr_minor": m.opening_mrr_minor,
        "new_minor": m.new_minor,
        "expansion_minor": m.expansion_minor,
        "contraction_minor": m.contraction_minor,
        "churned_minor": m.churned_minor,
        "reactivated_minor": m.reactivated_minor,
        "closing_mrr_minor": m.closing_mrr_minor,
        "arr_minor": m.arr_minor,
        "active_subscriptions": m.active_subscriptions,
        "active_customers": m.active_customers,
        "churned_customers": m.churned_customers,
        "logo_churn_rate": m.logo_churn_rate,
        "revenue_churn_rate": m.revenue_churn_rate,
    }


# ---- Accounts receivable aging ---------------------------------------------------------------


class AgingBucket(StrEnum):
    CURRENT = "current"
    DAYS_1_30 = "1-30"
    DAYS_31_60 = "31-60"
    DAYS_61_90 = "61-90"
    OVER_90 = "over-90"


def days_past_due(due_at: datetime, as_of: datetime) -> int:
    """Whole days from ``due_at`` to ``as_of`` (0 until a full day has passed; never negative)."""
    return max(0, (as_of - due_at) // timedelta(days=1))


def aging_bucket(days: int) -> AgingBucket:
    if days <= 0:
        return AgingBucket.CURRENT
    if days <= 30:
        return AgingBucket.DAYS_1_30
    if days <= 60:
        return AgingBucket.DAYS_31_60
    if days <= 90:
        return AgingBucket.DAYS_61_90
    return AgingBucket.OVER_90


def bucket_first_days() -> list[int]:
    """The first whole day of each aging bucket, ascending (0, 1, 31, 61, 91): an invoice is
    in the bucket of the largest of them its ``days_past_due`` reaches, so the database can
    bucket by comparing instants instead of computing each invoice's age."""
    return [d for d in range(0, 366) if d == 0 or aging_bucket(d) != aging_bucket(d - 1)]


@dataclass(frozen=True, slots=True)
class Receivable:
    """Invoices unpaid at the report's instant, ``days_past_due`` whole days after they fell
    due (at finalization: invoices are charged automatically; see ``days_past_due``), and what
    they still owe. The database groups them: ``invoices`` is how many."""

    currency: str
    days_past_due: int
    outstanding_minor: int
    invoices: int = 1


@dataclass(frozen=True, slots=True)
class AgingRow:
    currency: str
    bucket: AgingBucket
    invoices: int
    outstanding_minor: int


def ar_aging(receivables: Iterable[Receivable]) -> list[AgingRow]:
    """Every bucket of every currency that has receivables (empty buckets as 0), in (currency,
    bucket) order."""
    counts: dict[tuple[str, AgingBucket], list[int]] = {}
    for r in receivables:
        key = (r.currency, aging_bucket(r.days_past_due))
        entry = counts.setdefault(key, [0, 0])
        entry[0] += r.invoices
        entry[1] += r.outstanding_minor
    currencies = sorted({currency for currency, _ in counts})
    return [
        AgingRow(currency, bucket, *counts.get((currency, bucket), [0, 0]))
        for currency in currencies
        for bucket in AgingBucket
    ]


AGING_CSV_COLUMNS = ("currency", "bucket", "invoices", "outstanding_minor")


def aging_row(row: AgingRow) -> dict[str, object]:
    return {
        "currency": row.currency,
        "bucket": row.bucket.value,
        "invoices": row.invoices,
        "outstanding_minor": row.outstanding_minor,
    }


# ---- Dunning recovery ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailedInvoice:
    """Invoices whose first charge attempt did not pay them: the class of that first failure,
    where they stand now, and the attempt that paid them, if one did."""

    currency: str
    amount_due_minor: int
    first_failure: ChargeOutcomeKind
    status: InvoiceStatus
    paid_by_attempt: int | None = None
    #: How many invoices alike the database grouped here (``amount_due_minor`` is their sum).
    invoices: int = 1

    @property
    def recovered(self) -> bool:
        return self.status == InvoiceStatus.PAID and self.paid_by_attempt is not None


@dataclass(frozen=True, slots=True)
class RecoveryRow:
    """One currency's failed invoices along one dimension: ``by`` is ``attempt`` (``key`` the
    attempt number that paid them), ``decline_class`` (``key`` the first failure's class) or
    ``total``. ``recovery_rate`` is recovered / failed of that key (for ``attempt``: of all the
    currency's failed invoices, and ``cumulative_rate`` adds the earlier attempts)."""

    currency: str
    by: str
    key: str
    failed_invoices: int
    recovered_invoices: int
    recovered_minor: int
    recovery_rate: str | None
    cumulative_rate: str | None = None


@dataclass(frozen=True, slots=True)
class WriteOff:
    currency: str
    invoices: int
    amount_minor: int


@dataclass(frozen=True, slots=True)
class DunningReport:
    rows: list[RecoveryRow] = field(default_factory=list)
    written_off: list[WriteOff] = field(default_factory=list)


def _count(items: Iterable[FailedInvoice]) -> int:
    return sum(i.invoices for i in items)


def _amount(items: Iterable[FailedInvoice]) -> int:
    return sum(i.amount_due_minor for i in items)


def dunning_recovery(failed: Iterable[FailedInvoice]) -> DunningReport:
    """Recovery of failed invoices per currency, by attempt number and by decline class, and
    what was written off (failed invoices now uncollectible)."""
    by_currency: dict[str, list[FailedInvoice]] = defaultdict(list)
    for invoice in failed:
        by_currency[invoice.currency].append(invoice)
    rows: list[RecoveryRow] = []
    written_off: list[WriteOff] = []
    for currency in sorted(by_currency):
        items = by_currency[currency]
        total = _count(items)
        recovered = [i for i in items if i.recovered]
        rows.append(
            RecoveryRow(
                currency,
                "total",
                "all",
                total,
                _count(recovered),
                _amount(recovered),
                rate(_count(recovered), total),
            )
        )
        attempts = sorted({i.paid_by_attempt for i in recovered if i.paid_by_attempt})
        cumulative = 0
        for n in attempts:
            at_n = [i for i in recovered if i.paid_by_attempt == n]
            cumulative += _count(at_n)
            rows.append(
                RecoveryRow(
                    currency,
                    "attempt",
                    str(n),
                    total,
                    _count(at_n),
                    _amount(at_n),
                    rate(_count(at_n), total),
                    rate(cumulative, total),
                )
            )
        for kind in ChargeOutcomeKind:
            of_kind = [i for i in items if i.first_failure == kind]
            if not of_kind:
                continue
            won = [i for i in of_kind if i.recovered]
            rows.append(
                RecoveryRow(
                    currency,
                    "decline_class",
                    kind.value,
                    _count(of_kind),
                    _count(won),
                    _amount(won),
                    rate(_count(won), _count(of_kind)),
                )
            )
        lost = [i for i in items if i.status == InvoiceStatus.UNCOLLECTIBLE]
        written_off.append(WriteOff(currency, _count(lost), _amount(lost)))
    return DunningReport(rows, written_off)


DUNNING_CSV_COLUMNS = (
    "currency",
    "by",
    "key",
    "failed_invoices",
    "recovered_invoices",
    "recovered_minor",
    "recovery_rate",
    "cumulative_rate",
)


def recovery_row(row: RecoveryRow) -> dict[str, object]:
    return {name: getattr(row, name) for name in DUNNING_CSV_COLUMNS}


# ---- Collected vs invoiced -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectionMonth:
    """One currency's month: invoiced (invoices issued that month, void ones excluded),
    collected (payments settled that month, in the charge currency), refunded (refunds that
    succeeded that month, in the charge currency, whatever month the payment was), and the
    provider fees of payments settled that month in this settlement currency. Minor units."""

    month: Month
    currency: str
    invoiced_minor: int = 0
    invoices: int = 0
    collected_minor: int = 0
    payments: int = 0
    fees_minor: int = 0
    refunded_minor: int = 0
    refunds: int = 0

    @property
    def net_collected_minor(self) -> int:
        """Collected less refunded, both in this currency (fees are not taken off: they are
        in the settlement currency, which may be another)."""
        return self.collected_minor - self.refunded_minor

    @property
    def collection_rate(self) -> str | None:
        return rate(self.collected_minor, self.invoiced_minor)


@dataclass(frozen=True, slots=True)
class MonthlySum:
    """A sum the database grouped by (month ``YYYY-MM``, currency)."""

    month: str
    currency: str
    amount_minor: int
    count: int = 0


def collections_report(
    months: Sequence[Month],
    invoiced: Iterable[MonthlySum],
    collected: Iterable[MonthlySum],
    fees: Iterable[MonthlySum],
    refunded: Iterable[MonthlySum] = (),
) -> list[CollectionMonth]:
    """Every month of ``months`` for every currency that has any figure, in (currency, month)
    order; months without a figure are 0."""
    table: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in invoiced:
        table[(s.currency, s.month)]["invoiced_minor"] += s.amount_minor
        table[(s.currency, s.month)]["invoices"] += s.count
    for s in collected:
        table[(s.currency, s.month)]["collected_minor"] += s.amount_minor
        table[(s.currency, s.month)]["payments"] += s.count
    for s in fees:
        table[(s.currency, s.month)]["fees_minor"] += s.amount_minor
    for s in refunded:
        table[(s.currency, s.month)]["refunded_minor"] += s.amount_minor
        table[(s.currency, s.month)]["refunds"] += s.count
    wanted = {str(m): m for m in months}
    currencies = sorted({currency for currency, month in table if month in wanted})
    return [
        CollectionMonth(month=m, currency=c, **table.get((c, str(m)), {}))
        for c in currencies
        for m in months
    ]


COLLECTIONS_CSV_COLUMNS = (
    "month",
    "currency",
    "invoiced_minor",
    "invoices",
    "collected_minor",
    "payments",
    "refunded_minor",
    "refunds",
    "net_collected_minor",
    "fees_minor",
    "collection_rate",
)


def collection_row(row: CollectionMonth) -> dict[str, object]:
    return {
        "month": str(row.month),
        "currency": row.currency,
        "invoiced_minor": row.invoiced_minor,
        "invoices": row.invoices,
        "collected_minor": row.collected_minor,
        "payments": row.payments,
        "refunded_minor": row.refunded_minor,
        "refunds": row.refunds,
        "net_collected_minor": row.net_collected_minor,
        "fees_minor": row.fees_minor,
        "collection_rate": row.collection_rate,
    }


def csv_cell(value: object) -> str:
    """A report cell: numbers as they are, None as empty."""
    return "" if value is None else str(value)
