"""``billing reports ...``: the revenue reports on the command line, as tables or CSV
(``--csv``), from the configured database. The same figures as ``GET /v1/reports/...``."""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from billing import reporting
from billing.errors import BillingError
from billing.finance import format_instant
from billing.reports import (
    AGING_CSV_COLUMNS,
    COLLECTIONS_CSV_COLUMNS,
    DUNNING_CSV_COLUMNS,
    MRR_CSV_COLUMNS,
    aging_row,
    collection_row,
    csv_cell,
    mrr_row,
    recovery_row,
)
from billing.settings import Settings
from billing.text import text_problem

reports_app = typer.Typer(
    help="Revenue reports per currency (no conversion): mrr, ar-aging, dunning, collections.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

FROM = typer.Option(None, "--from", help="first month, YYYY-MM (default: 11 months before --to)")
TO = typer.Option(None, "--to", help="last month, YYYY-MM, included (default: this month)")
CURRENCY = typer.Option(None, "--currency", help="only this ISO 4217 currency")
CSV = typer.Option(False, "--csv", help="CSV on stdout (amounts in minor units)")


def _fail(message: str) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _factory() -> sessionmaker[Session]:
    from db.engine import make_engine, make_session_factory

    return make_session_factory(make_engine(Settings().database_url))


def _check_text(**values: str | None) -> None:
    for name, value in values.items():
        if value is not None:
            problem = text_problem(value, max_length=64)
            if problem:
                _fail(f"--{name.replace('_', '-')} {problem}")


def _months(first: str | None, last: str | None, currency: str | None) -> reporting.MonthRange:
    _check_text(**{"from": first, "to": last, "currency": currency})
    return reporting.month_range_from(first, last, currency, now=datetime.now(UTC))


def _emit(
    columns: Sequence[str],
    rows: list[dict[str, object]],
    *,
    as_csv: bool,
    title: str,
    money: Callable[[str], bool] = lambda column: column.endswith("_minor"),
) -> None:
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([csv_cell(row[c]) for c in columns])
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if money(column) else "left")
    for row in rows:
        table.add_row(*(csv_cell(row[c]) for c in columns))
    console.print(table)
    if not rows:
        console.print("no figures for these months")


@reports_app.command("mrr")
def mrr(
    first: str | None = FROM,
    last: str | None = TO,
    currency: str | None = CURRENCY,
    as_csv: bool = CSV,
) -> None:
    """MRR, ARR and movements (new, expansion, contraction, churned, reactivated) per month."""
    try:
        months = _months(first, last, currency)
        rows = reporting.mrr(_factory(), months)
    except BillingError as error:
        _fail(error.message)
    _emit(MRR_CSV_COLUMNS, [mrr_row(m) for m in rows], as_csv=as_csv, title="MRR (minor units)")


@reports_app.command("ar-aging")
def ar_aging(
    as_of: str | None = typer.Option(None, "--as-of", help="ISO 8601 instant (default now)"),
    currency: str | None = CURRENCY,
    as_csv: bool = CSV,
) -> None:
    """Invoices unpaid at an instant by days past due."""
    _check_text(as_of=as_of, currency=currency)
    try:
        instant, rows = reporting.aging(
            _factory(), as_of=as_of, currency=currency, now=datetime.now(UTC)
        )
    except BillingError as error:
        _fail(error.message)
    _emit(
        AGING_CSV_COLUMNS,
        [aging_row(r) for r in rows],
        as_csv=as_csv,
        title=f"AR aging as of {format_instant(instant)}",
    )


@reports_app.command("dunning")
def dunning(
    first: str | None = FROM,
    last: str | None = TO,
    currency: str | None = CURRENCY,
    as_csv: bool = CSV,
) -> None:
    """Recovery of failed invoices by attempt number and decline class; written off."""
    try:
        months = _months(first, last, currency)
        report = reporting.dunning(_factory(), months)
    except BillingError as error:
        _fail(error.message)
    _emit(
        DUNNING_CSV_COLUMNS,
        [recovery_row(r) for r in report.rows],
        as_csv=as_csv,
        title="Dunning recovery",
    )
    if not as_csv:
        for w in report.written_off:
            console.print(f"written off {w.currency}: {w.invoices} invoices, {w.amount_minor}")


@reports_app.command("collections")
def collections(
    first: str | None = FROM,
    last: str | None = TO,
    currency: str | None = CURRENCY,
    as_csv: bool = CSV,
) -> None:
    """Invoiced vs collected, refunded, net collected and fees per month."""
    try:
        months = _months(first, last, currency)
        rows = reporting.collections(_factory(), months)
    except BillingError as error:
        _fail(error.message)
    _emit(
        COLLECTIONS_CSV_COLUMNS,
        [collection_row(r) for r in rows],
        as_csv=as_csv,
        title="Collected vs invoiced (minor units)",
    )
