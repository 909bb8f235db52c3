"""The dashboard's settlement pages (``billing.dashboard.app`` installs them):

- ``/dashboard/payouts``: the payouts Stripe made, newest first, keyset pages
- ``/dashboard/payouts/{id}``: one payout reconciled against our payments, refunds and
  disputes (matched, unknown at Stripe, mismatches, gross/fee/net), and what of ours is in
  no payout although it should be by then
- ``/dashboard/reconciliation/findings``: the daily charge reconciliation's findings

Reads only, through the same repository functions as ``/v1/payouts`` and
``/v1/reconciliation/findings``. No form here changes anything (filters are GET).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from billing.dashboard import app as pages
from billing.errors import BillingError, InvalidInput
from billing.finance import InvoiceCursor, parse_instant
from billing.ledger import FindingKind, Severity
from billing.records import PayoutRecord
from billing.text import text_problem
from db.engine import unit_of_work
from db.repositories import ledger as ledger_repo

PAYOUT_PAGE_SIZE = 25
#: Days after which a settled payment or refund must be in a payout (as ``billing payouts
#: reconcile --expected-delay-days`` defaults).
EXPECTED_DELAY = timedelta(days=7)
FINDINGS_LIMIT = 200
#: The sections of a payout's reconciliation, in the order the page shows them.
MISMATCH_KINDS = (
    FindingKind.AMOUNT_MISMATCH,
    FindingKind.CURRENCY_MISMATCH,
    FindingKind.FEE_MISMATCH,
    FindingKind.PAYOUT_TOTAL_MISMATCH,
)


def _cursor(payout: PayoutRecord) -> str:
    # The invoices' keyset cursor: (instant, id), opaque on the wire.
    return InvoiceCursor(ledger_repo.payout_created_at(payout), payout.id).encode()


def _limit(request: Request) -> int:
    text = request.query_params.get("limit", "")
    return int(text) if text.isdigit() and 1 <= int(text) <= 200 else PAYOUT_PAGE_SIZE


async def payouts(request: Request) -> Response:
    session = pages._session(request)
    if session is None:
        return pages._to_login()
    deps = pages._deps(request)
    limit = _limit(request)
    cursor_text = request.query_params.get("cursor") or None
    try:
        before = InvoiceCursor.decode(cursor_text) if cursor_text else None
    except BillingError as error:
        return pages._page(request, "error.html", session, status_code=422, message=error.message)

    def read() -> list[PayoutRecord]:
        with unit_of_work(deps.session_factory) as db:
            return ledger_repo.page_payouts(
                db,
                limit=limit + 1,
                before=(before.created_at, before.invoice_id) if before else None,
            )

    found = await asyncio.to_thread(read)
    shown, more = found[:limit], len(found) > limit
    keep = {"limit": str(limit)} if limit != PAYOUT_PAGE_SIZE else {}
    next_query = urlencode({**keep, "cursor": _cursor(shown[-1])}) if more and shown else None
    return pages._page(
        request,
        "payouts.html",
        session,
        payouts=shown,
        next_query=next_query,
        first_query=urlencode(keep),
        first_page=cursor_text is None,
    )


def _missing(db: Session, payout: PayoutRecord, now: datetime) -> list[dict[str, Any]]:
    """Ours, settled before this payout was created less the expected delay (and before now
    less it), in no payout: what this payout (or an earlier one) should have paid out."""
    cutoff = min(ledger_repo.payout_created_at(payout), now) - EXPECTED_DELAY
    return [
        {"kind": kind, "ours": ours, "transaction": txn, "amount": amount, "currency": currency}
        for kind, ours, txn, amount, currency in ledger_repo.unpaid_out(
            db, settled_from=None, settled_before=cutoff
        )
    ]


async def payout_page(request: Request) -> Response:
    session = pages._session(request)
    if session is None:
        return pages._to_login()
    payout_id = request.path_params["id"]
    deps = pages._deps(request)
    now = request.app.state.clock.now()

    def read() -> dict[str, Any] | None:
        if not pages._valid_id(payout_id):
            return None
        with unit_of_work(deps.session_factory) as db:
            payout = ledger_repo.get_payout(db, payout_id)
            if payout is None:
                return None
            report = ledger_repo.payout_reconciliation(db, payout)
            return {
                "payout": payout,
                "report": report,
                "entries": ledger_repo.payout_entries(db, payout),
                "missing": _missing(db, payout, now),
                "cutoff": min(ledger_repo.payout_created_at(payout), now) - EXPECTED_DELAY,
            }

    data = await asyncio.to_thread(read)
    if data is None:
        return pages._page(
            request,
            "error.html",
            session,
            status_code=404,
            message="No such payout (not imported yet?).",
        )
    report = data["report"]
    by_kind: dict[FindingKind, list[Any]] = {}
    for finding in report.findings:
        by_kind.setdefault(finding.kind, []).append(finding)
    return pages._page(
        request,
        "payout.html",
        session,
        **data,
        unknown=by_kind.get(FindingKind.UNKNOWN_AT_STRIPE, []),
        mismatches=[f for kind in MISMATCH_KINDS for f in by_kind.get(kind, [])],
        paid_out_net=report.net_minor,
    )


async def findings(request: Request) -> Response:
    session = pages._session(request)
    if session is None:
        return pages._to_login()
    deps = pages._deps(request)
    severity = request.query_params.get("severity", "").strip() or None
    since_text = request.query_params.get("since", "").strip() or None
    known = [s.value for s in Severity]
    echo = {
        k: v
        for k, v in (("severity", severity), ("since", since_text))
        if v is not None and text_problem(v, max_length=64) is None
    }
    try:
        for name, value in (("severity", severity), ("since", since_text)):
            problem = None if value is None else text_problem(value, max_length=64)
            if problem:
                raise InvalidInput(f"{name} {problem}", field=name)
        if severity is not None and severity not in known:
            raise InvalidInput(f"severity must be one of {', '.join(known)}", field="severity")
        since = parse_instant(since_text, field="since")
    except BillingError as error:
        return pages._page(
            request,
            "findings.html",
            session,
            status_code=422,
            error=error.message,
            found=None,
            counts={},
            severities=known,
            filters=echo,
        )

    def read() -> tuple[list[Any], dict[str, int]]:
        with unit_of_work(deps.session_factory) as db:
            found = ledger_repo.list_findings(
                db, since=since, severity=severity, limit=FINDINGS_LIMIT
            )
            return found, ledger_repo.count_findings_by_severity(db)

    found, counts = await asyncio.to_thread(read)
    return pages._page(
        request,
        "findings.html",
        session,
        error=None,
        found=found,
        counts=counts,
        severities=known,
        filters=echo,
        limit=FINDINGS_LIMIT,
    )


ROUTES = (
    (f"{pages.PREFIX}/payouts", payouts),
    (f"{pages.PREFIX}/payouts/{{id}}", payout_page),
    (f"{pages.PREFIX}/reconciliation/findings", findings),
)
