"""``billing credit-notes ...``: the settlement commands (issue 13), as the API's
``/v1/credit-notes`` and ``/v1/invoices/{id}/credit-notes``, on the configured database and
Temporal. Kept apart from ``billing.cli`` to ease merges; ``billing.cli`` adds these groups."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import sys
from datetime import datetime
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from billing.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

credit_notes_app = typer.Typer(help="Credit notes and their refunds.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def _checked_id(value: str, argument: str) -> str:
    from billing.errors import InvalidInput
    from billing.text import OUR_ID

    try:
        return OUR_ID.check(value, field=argument)
    except InvalidInput as invalid:
        _fail(invalid.message)


def _factory(settings: Settings) -> sessionmaker[Session]:
    from db.engine import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.database_url))


@credit_notes_app.command("list")
def credit_notes_list(
    invoice_id: str | None = typer.Option(None, "--invoice-id"),
    customer_id: str | None = typer.Option(None, "--customer-id"),
    limit: int = typer.Option(50, "--limit", min=1, max=200),
    csv_output: bool = typer.Option(False, "--csv", help="every matching credit note as CSV"),
) -> None:
    """Credit notes with their refunds' state, as GET /v1/credit-notes (CSV: the finance
    export's columns)."""
    from billing.api.credit_notes import CREDIT_NOTE_CSV_COLUMNS, credit_note_csv_row
    from billing.api.schemas import CreditNoteOut
    from db.engine import unit_of_work
    from db.repositories import credit_notes as repo

    for value, name in ((invoice_id, "--invoice-id"), (customer_id, "--customer-id")):
        if value is not None:
            _checked_id(value, name)
    factory = _factory(Settings())
    notes: list[CreditNoteOut] = []
    after = None
    with unit_of_work(factory) as session:
        while True:
            page = repo.list_credit_notes(
                session,
                invoice_id=invoice_id,
                customer_id=customer_id,
                limit=200 if csv_output else limit,
                after=after,
            )
            refunds = repo.list_refunds(session, credit_note_ids=[n.id for n in page])
            for record in page:
                notes.append(
                    CreditNoteOut.of(
                        record,
                        repo.list_credit_note_lines(session, record.id),
                        [r for r in refunds if r.credit_note_id == record.id],
                    )
                )
            if not csv_output or len(page) < 200:
                break
            after = (page[-1].created_at, page[-1].id)
    if csv_output:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CREDIT_NOTE_CSV_COLUMNS)
        writer.writerows(credit_note_csv_row(note) for note in notes)
        return
    table = Table(title="credit notes")
    for column in (
        "number",
        "invoice",
        "reason",
        "amount",
        "refund",
        "credit",
        "outside",
        "refund status",
        "id",
    ):
        table.add_column(column)
    for note in notes:
        table.add_row(
            note.number,
            note.invoice_id,
            note.reason.value if note.reason else "",
            f"{note.amount_minor} {note.currency}",
            str(note.refund_amount_minor),
            str(note.credit_amount_minor),
            str(note.out_of_band_amount_minor),
            "/".join(sorted({r.status.value for r in note.refunds})),
            note.id,
        )
    console.print(table)


@credit_notes_app.command("show")
def credit_notes_show(credit_note_id: str) -> None:
    """One credit note with its lines and refunds."""
    from billing.api.schemas import CreditNoteOut
    from db.engine import unit_of_work
    from db.repositories import credit_notes as repo

    _checked_id(credit_note_id, "CREDIT_NOTE_ID")
    with unit_of_work(_factory(Settings())) as session:
        note = repo.get_credit_note(session, credit_note_id)
        if note is None:
            _fail(f"credit note {credit_note_id!r} not found", code=1)
        out = CreditNoteOut.of(
            note,
            repo.list_credit_note_lines(session, note.id),
            repo.list_refunds(session, credit_note_ids=[note.id]),
        )
    console.print_json(out.model_dump_json())


@credit_notes_app.command("create")
def credit_notes_create(
    invoice_id: str,
    amount: int | None = typer.Option(None, "--amount", help="minor units, the invoice as a whole"),
    line: list[str] = typer.Option(  # noqa: B008 (typer copies defaults per call)
        [], "--line", help="INVOICE_LINE_ID[:AMOUNT]; repeatable"
    ),
    refund: int | None = typer.Option(None, "--refund", help="minor units back to the card"),
    credit: int | None = typer.Option(None, "--credit", help="minor units to the balance"),
    out_of_band: int | None = typer.Option(None, "--out-of-band", help="settled outside"),
    reason: str | None = typer.Option(
        None, "--reason", help="duplicate, fraudulent, order_change, product_unsatisfactory"
    ),
    memo: str | None = typer.Option(None, "--memo"),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="the same key again shows the same credit note"
    ),
) -> None:
    """Issue a credit note on INVOICE_ID (as POST /v1/invoices/{id}/credit-notes): written
    with its refund pending, then the refund's workflow is started (the refund sweep starts it
    if Temporal does not answer)."""
    from activities import event_log
    from activities.settlement import signal_invoice_credited, start_refund_workflow
    from billing.credit_notes import CreditNoteReason, CreditNoteRequest, LineRequest
    from billing.errors import BillingError, InvalidInput
    from billing.text import IDEMPOTENCY_KEY, REASON
    from billing.worker import connect_temporal
    from db.engine import unit_of_work
    from db.repositories import credit_notes as repo

    _checked_id(invoice_id, "INVOICE_ID")
    settings = Settings()
    try:
        REASON.check_optional(memo, field="--memo")
        IDEMPOTENCY_KEY.check_optional(idempotency_key, field="--idempotency-key")
        lines = []
        for spec in line:
            line_id, _, amount_text = spec.partition(":")
            _checked_id(line_id, "--line")
            if amount_text and not amount_text.isdigit():
                _fail(f"--line {spec!r}: the amount after ':' must be whole minor units")
            lines.append(LineRequest(line_id, int(amount_text) if amount_text else None))
        try:
            parsed_reason = CreditNoteReason(reason) if reason is not None else None
        except ValueError:
            _fail(
                f"--reason {reason!r} is not one of " + ", ".join(r.value for r in CreditNoteReason)
            )
        request = CreditNoteRequest(
            reason=parsed_reason,
            amount_minor=amount,
            lines=tuple(lines),
            refund_amount_minor=refund,
            credit_amount_minor=credit,
            out_of_band_amount_minor=out_of_band,
            memo=memo,
        )
        from billing.clock import SystemClock

        with unit_of_work(_factory(settings)) as session:
            at = SystemClock().now()
            issued = repo.issue_credit_note(
                session,
                invoice_id,
                request,
                at=at,
                idempotency_key=idempotency_key,
                key_scope="cli",
                request_hash=hashlib.sha256(repr((invoice_id, request)).encode()).hexdigest(),
                created_by="cli",
                allow_open_invoices=True,
            )
            if issued.created:
                event_log.credit_note_issued(
                    session, issued.credit_note, issued.lines, issued.refunds, issued.invoice, at
                )
    except InvalidInput as invalid:
        _fail(invalid.message)
    except BillingError as error:
        _fail(error.message, code=1)
    note = issued.credit_note

    credited = note.type == "pre_payment" and issued.invoice is not None

    async def start() -> None:
        client = await connect_temporal(settings)
        if credited:
            assert issued.invoice is not None
            # The subscription learns the lower amount due (0: paid, dunning stops now).
            await signal_invoice_credited(client, issued.invoice, note.id)
        for pending in issued.refunds:
            if not pending.status.final:
                await start_refund_workflow(
                    client,
                    pending.id,
                    task_queue=settings.task_queue,
                    payments_task_queue=settings.payments_queue(),
                )

    try:
        if credited or any(not r.status.final for r in issued.refunds):
            asyncio.run(start())
    except Exception as error:
        err_console.print(
            f"Temporal could not be told now ({error}); the refund sweep starts a refund's "
            "workflow, and the subscription's next charge attempt reads the invoice's amount due",
            markup=False,
        )
    what = "issued" if issued.created else "already issued"
    console.print(
        f"credit note {note.number} ({note.id}) {what}: "
        f"{note.amount_minor} {note.currency} (refund {note.refund_amount_minor}, credit "
        f"{note.credit_amount_minor}, outside {note.out_of_band_amount_minor})",
        markup=False,
        highlight=False,
    )
    if credited:
        assert issued.invoice is not None
        console.print(
            f"invoice {issued.invoice.number} is now due {issued.invoice.amount_due_minor} "
            f"{issued.invoice.currency} ({issued.invoice.status.value})",
            markup=False,
            highlight=False,
        )


payouts_app = typer.Typer(help="Payouts and their reconciliation.", no_args_is_help=True)
reconciliation_app = typer.Typer(help="The daily charge reconciliation.", no_args_is_help=True)


def _instant(value: str | None, option: str) -> datetime | None:
    from billing.errors import InvalidInput
    from billing.finance import parse_instant

    try:
        return parse_instant(value, field=option)
    except InvalidInput as invalid:
        _fail(invalid.message)


@payouts_app.command("list")
def payouts_list(
    since: str | None = typer.Option(None, "--since", help="ISO 8601 with a zone"),
    until: str | None = typer.Option(None, "--until", help="ISO 8601 with a zone"),
) -> None:
    """Payouts Stripe made, as imported (GET /v1/payouts)."""
    from billing.finance import format_instant
    from db.engine import unit_of_work
    from db.repositories import ledger as ledger_repo

    start, end = _instant(since, "--since"), _instant(until, "--until")
    with unit_of_work(_factory(Settings())) as session:
        found = ledger_repo.list_payouts(session, since=start, until=end, limit=100_000)
    table = Table(title="payouts")
    for column in ("stripe payout", "amount", "status", "created", "arrival", "id"):
        table.add_column(column)
    for p in found:
        table.add_row(
            p.stripe_payout_id,
            f"{p.amount_minor} {p.currency}",
            p.status,
            format_instant(p.provider_created_at),
            format_instant(p.arrival_date),
            p.id,
        )
    console.print(table)


@payouts_app.command("reconcile")
def payouts_reconcile(
    payout_id: str | None = typer.Argument(None, help="one payout (po_... or pout_...)"),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 with a zone"),
    until: str | None = typer.Option(None, "--until", help="ISO 8601 with a zone; default now"),
    expected_delay_days: int = typer.Option(7, "--expected-delay-days", min=0, max=90),
    csv_output: bool = typer.Option(False, "--csv", help="one line per difference, as CSV"),
) -> None:
    """Reconcile one payout, or every payout of a period with what is in no payout after the
    expected delay (GET /v1/reconciliation). Exit 1 when there is any difference."""
    from datetime import timedelta

    from billing.api.payouts import csv_rows, csv_text
    from billing.clock import SystemClock
    from db.engine import unit_of_work
    from db.repositories import ledger as ledger_repo

    with unit_of_work(_factory(Settings())) as session:
        if payout_id is not None:
            _checked_id(payout_id, "PAYOUT_ID")
            payout = ledger_repo.get_payout(session, payout_id)
            if payout is None:
                _fail(f"payout {payout_id!r} not found (not imported yet?)", code=1)
            reports = [ledger_repo.payout_reconciliation(session, payout)]
            missing = []
        else:
            now = SystemClock().now()
            start, end = _instant(since, "--since"), _instant(until, "--until") or now
            period = ledger_repo.period_reconciliation(
                session,
                since=start,
                until=end,
                now=now,
                expected_delay=timedelta(days=expected_delay_days),
            )
            reports, missing = period.payouts, period.missing
    differences = sum(len(r.findings) for r in reports) + len(missing)
    if csv_output:
        sys.stdout.write(csv_text(csv_rows(reports, missing)))
    else:
        table = Table(title="reconciliation")
        for column in ("payout", "amount", "gross", "fee", "net", "matched", "differences"):
            table.add_column(column)
        for r in reports:
            table.add_row(
                r.payout_id,
                f"{r.amount_minor} {r.currency}",
                str(r.gross_minor),
                str(r.fee_minor),
                str(r.net_minor),
                str(len(r.matched)),
                str(len(r.findings)),
            )
        console.print(table)
        for finding in [f for r in reports for f in r.findings] + missing:
            console.print(
                f"{finding.severity.value:7} {finding.kind.value}: {finding.detail}",
                markup=False,
                highlight=False,
            )
        console.print(f"{differences} differences", markup=False)
    if differences:
        raise typer.Exit(1)


@payouts_app.command("sync")
def payouts_sync() -> None:
    """Run the daily settlement Schedule now (ledger and payouts of the last days, then the
    charge reconciliation), in the worker."""
    from billing.settlement import settlement_schedule_id
    from billing.worker import connect_temporal, ensure_settlement_schedule

    settings = Settings()

    async def trigger() -> str:
        client = await connect_temporal(settings)
        schedule_id = await ensure_settlement_schedule(
            client, task_queue=settings.task_queue, payments_task_queue=settings.payments_queue()
        )
        await client.get_schedule_handle(settlement_schedule_id(settings.task_queue)).trigger()
        return schedule_id

    try:
        schedule_id = asyncio.run(trigger())
    except Exception as error:
        _fail(f"could not reach Temporal to run the settlement sync: {error}", code=1)
    console.print(f"triggered schedule {schedule_id}", markup=False)


@reconciliation_app.command("findings")
def reconciliation_findings(
    severity: str | None = typer.Option(None, "--severity", help="info, warning or error"),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 with a zone"),
    status: str | None = typer.Option(
        None, "--status", help="open (not resolved yet) or resolved; default: both"
    ),
    csv_output: bool = typer.Option(False, "--csv", help="every matching finding as CSV"),
) -> None:
    """What the daily charge reconciliation found (GET /v1/reconciliation/findings)."""
    from billing.api.payouts import findings_csv_rows
    from billing.charge_reconciliation import FindingStatus
    from billing.finance import format_instant
    from db.engine import unit_of_work
    from db.repositories import ledger as ledger_repo

    if severity is not None and severity not in ("info", "warning", "error"):
        _fail(f"--severity {severity!r} is not one of info, warning, error")
    wanted: FindingStatus | None = None
    if status is not None:
        try:
            wanted = FindingStatus(status)
        except ValueError:
            _fail(f"--status {status!r} is not one of open, resolved")
    start = _instant(since, "--since")
    with unit_of_work(_factory(Settings())) as session:
        found = ledger_repo.list_findings(
            session, since=start, severity=severity, status=wanted, limit=100_000
        )
    if csv_output:
        csv.writer(sys.stdout, lineterminator="\n").writerows(findings_csv_rows(found))
        return
    table = Table(title="charge reconciliation findings")
    for column in ("id", "found", "severity", "kind", "status", "invoice", "charge", "detail"):
        table.add_column(column)
    for f in found:
        table.add_row(
            f.id,
            format_instant(f.found_at),
            f.severity,
            f.kind,
            "open" if f.resolved_at is None else f"resolved by {f.resolved_by}",
            f.invoice_id or "",
            f.charge_id or "",
            f.detail,
        )
    console.print(table, markup=False)


@reconciliation_app.command("resolve")
def reconciliation_resolve(
    finding_id: str = typer.Argument(..., help="the finding's id (rcf_...)"),
    note: str = typer.Option(..., "--note", help="why it needs nothing more"),
    by: str = typer.Option(..., "--by", help="who resolves it (recorded with the note)"),
) -> None:
    """Resolve a finding with a note (POST /v1/reconciliation/findings/{id}/resolve). Exit 1
    when another resolution is recorded already; 2 on bad input."""
    from billing.clock import SystemClock
    from billing.errors import BillingError, InvalidInput
    from billing.finance import format_instant
    from billing.text import RESOLUTION_NOTE, RESOLVED_BY
    from db.engine import unit_of_work
    from db.repositories import ledger as ledger_repo

    checked_id = _checked_id(finding_id, "FINDING_ID")
    try:
        checked_note = RESOLUTION_NOTE.check(note, field="--note")
        checked_by = RESOLVED_BY.check(by, field="--by")
        if not checked_note.strip() or not checked_by.strip():
            raise InvalidInput("--note and --by must not be empty", field="--note")
    except InvalidInput as invalid:
        _fail(invalid.message)
    try:
        with unit_of_work(_factory(Settings())) as session:
            finding, resolved = ledger_repo.resolve_finding(
                session, checked_id, by=checked_by, note=checked_note, at=SystemClock().now()
            )
    except BillingError as error:
        _fail(error.message, code=1)
    assert finding.resolved_at is not None
    verb = "resolved" if resolved else "already resolved"
    console.print(
        f"{finding.id} {verb} by {finding.resolved_by} at {format_instant(finding.resolved_at)}",
        markup=False,
    )
