"""The reports as the API, the CLI and the dashboard ask for them: read the rows
(``db.repositories.reports``), apply the rules (``billing.reports``), in one short read-only
transaction each. Inputs are checked here, once, with errors that name the field."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from billing.finance import parse_instant
from billing.money import normalize_currency
from billing.reports import (
    AgingRow,
    CollectionMonth,
    DunningReport,
    Month,
    MrrMonth,
    ar_aging,
    collections_report,
    dunning_recovery,
    month_range,
    mrr_from_boundaries,
    mrr_report,
    with_mrr,
)
from db.engine import unit_of_work
from db.repositories import reports as reports_repo

#: Months a monthly report covers when no range is given: the last twelve, this one included.
DEFAULT_MONTHS = 12


@dataclass(frozen=True, slots=True)
class MonthRange:
    first: Month
    last: Month
    currency: str | None = None

    @property
    def months(self) -> list[Month]:
        return month_range(self.first, self.last)


def month_range_from(
    first: str | None, last: str | None, currency: str | None, *, now: datetime
) -> MonthRange:
    """The months asked for (``YYYY-MM``, both included); by default the twelve months up to
    ``now``'s, or twelve from ``first``."""
    end = Month.parse(last, field="to") if last else None
    start = Month.parse(first, field="from") if first else None
    if end is None:
        end = Month.of(now) if start is None else _add(start, DEFAULT_MONTHS - 1)
    if start is None:
        start = _add(end, -(DEFAULT_MONTHS - 1))
    result = MonthRange(start, end, normalize_currency(currency) if currency else None)
    result.months  # noqa: B018 (checks the order and length)
    return result


def _add(month: Month, count: int) -> Month:
    index = month.year * 12 + month.month - 1 + count
    return Month(max(1, index // 12), index % 12 + 1)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a report builds its many short-lived objects
    (tens of thousands of tuples and rows, no cycles among them): its passes cost about a
    quarter of the MRR report at 1M invoices. Reference counting still frees them; the
    collector is back on (if it was on) however the report ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def mrr(
    session_factory: sessionmaker[Session], months: MonthRange, *, from_rows: bool = False
) -> list[MrrMonth]:
    """MRR and its movements, from the sums the database keeps per currency and month
    (``report_mrr_monthly``, migration 0023): a few rows a month, whatever the range and
    however much of the book moved in it. ``from_rows`` computes them from every subscription
    and its status changes instead (for checking; a scan of the book)."""
    with _collector_paused():
        return _mrr(session_factory, months, from_rows=from_rows)


def _mrr(
    session_factory: sessionmaker[Session], months: MonthRange, *, from_rows: bool
) -> list[MrrMonth]:
    with unit_of_work(session_factory) as session:
        reports_repo.tune_for_reports(session)
        if not from_rows:
            opening, moves = reports_repo.mrr_boundaries(
                session, months.first, months.last, currency=months.currency
            )
            return mrr_from_boundaries(opening, moves, months.months)
        histories = reports_repo.mrr_histories_from_rows(
            session, until=months.last.next().start, currency=months.currency
        )
    return with_mrr(mrr_report(histories, months.months))


def aging(
    session_factory: sessionmaker[Session],
    *,
    as_of: str | datetime | None,
    currency: str | None,
    now: datetime,
) -> tuple[datetime, list[AgingRow]]:
    instant = parse_instant(as_of, field="as_of") if as_of else now
    assert instant is not None
    code = normalize_currency(currency) if currency else None
    with unit_of_work(session_factory) as session:
        reports_repo.tune_for_reports(session)
        receivables = reports_repo.receivables(session, as_of=instant, currency=code)
    return instant, ar_aging(receivables)


def dunning(
    session_factory: sessionmaker[Session], months: MonthRange, *, from_rows: bool = False
) -> DunningReport:
    """Invoices issued in the months, by how their dunning went: from the monthly sums the
    database keeps (``report_dunning_monthly``, migration 0021); ``from_rows`` joins the
    invoices with their attempts instead (for checking)."""
    with unit_of_work(session_factory) as session:
        reports_repo.tune_for_reports(session)
        if from_rows:
            failed = reports_repo.failed_invoices_from_rows(
                session,
                issued_from=months.first.start,
                issued_to=months.last.next().start,
                currency=months.currency,
            )
        else:
            failed = reports_repo.failed_invoices(
                session, months.first, months.last, currency=months.currency
            )
    return dunning_recovery(failed)


def collections(
    session_factory: sessionmaker[Session], months: MonthRange, *, from_rows: bool = False
) -> list[CollectionMonth]:
    """Collected vs invoiced, refunds and fees per month, from the monthly totals the
    database keeps (``report_monthly_totals``); ``from_rows`` computes them from the invoices,
    payments and refunds instead (a scan: for checking the totals)."""
    read = reports_repo.monthly_figures_from_rows if from_rows else reports_repo.monthly_figures
    with unit_of_work(session_factory) as session:
        reports_repo.tune_for_reports(session)
        figures = read(session, months.first, months.last, currency=months.currency)
    return collections_report(
        months.months, figures.invoiced, figures.collected, figures.fees, figures.refunded
    )
