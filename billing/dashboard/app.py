"""The dashboard's routes (``install`` adds them to the API app, outside the OpenAPI document):

- ``/dashboard/login`` (GET form, POST sign-in), ``/dashboard/logout`` (POST, CSRF token)
- ``/dashboard``: overview per currency (MRR chart and movements, AR aging, recovery)
- ``/dashboard/invoices`` (filters, keyset pages), ``/dashboard/invoices.csv``
- ``/dashboard/invoices/{id}`` (and ``.pdf``), ``/dashboard/subscriptions/{id}``
- ``/dashboard/payouts``, ``/dashboard/payouts/{id}``, ``/dashboard/reconciliation/findings``
  (``billing.dashboard.settlement``)
- ``/dashboard/static/...``: its stylesheet

A page without a valid session redirects to the sign-in form (303).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.staticfiles import StaticFiles

from billing import reporting
from billing.api.documents import load_document, pdf_response
from billing.credit_notes import RefundSource, RefundStatus
from billing.dashboard.charts import Bar, bar_chart
from billing.dashboard.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    DashboardSession,
    SessionSigner,
)
from billing.documents import document_lines, render_invoice_pdf
from billing.errors import BillingError
from billing.finance import (
    EXPORT_PAGE_SIZE,
    INVOICE_CSV_COLUMNS,
    InvoiceCursor,
    InvoiceFilter,
    format_instant,
    invoice_csv_row,
)
from billing.invoices import InvoiceStatus
from billing.money import Money
from billing.settings import Settings
from billing.text import text_problem
from billing.worker import Dependencies
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import finance as finance_repo
from db.repositories import notifications as notifications_repo
from db.repositories import subscriptions as subscriptions_repo

PREFIX = "/dashboard"
_FILTER_FIELDS = (
    "status",
    "currency",
    "customer_id",
    "subscription_id",
    "issued_from",
    "issued_to",
    "period_from",
    "period_to",
)
_PAGE_SIZE = 25
_MAX_FORM_BYTES = 4096


@cache
def _templates() -> Environment:
    env = Environment(
        loader=PackageLoader("billing.dashboard", "templates"),
        autoescape=select_autoescape(default=True),
    )
    env.filters["instant"] = format_instant
    env.filters["money"] = _money
    return env


def _money(amount: int | None, currency: str) -> str:
    """Minor units as ``USD 12.34``; a credit or a refund as ``-USD 3.00`` (Money itself holds
    no negative amounts)."""
    if amount is None:
        return ""
    amount = int(amount)
    text = Money(abs(amount), currency).format()
    return f"-{text}" if amount < 0 else text


def _signer(request: Request) -> SessionSigner:
    signer = request.app.state.dashboard_signer
    assert isinstance(signer, SessionSigner)
    return signer


def _settings(request: Request) -> Settings:
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


def _deps(request: Request) -> Dependencies:
    deps = request.app.state.deps
    assert isinstance(deps, Dependencies)
    return deps


def _secure(request: Request) -> bool:
    return _settings(request).environment == "production"


def _page(
    request: Request,
    template: str,
    session: DashboardSession | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    csrf = _signer(request).csrf_token(session) if session else ""
    html = (
        _templates()
        .get_template(template)
        .render(session=session, csrf=csrf, prefix=PREFIX, **context)
    )
    response = HTMLResponse(html, status_code=status_code)
    # Pages show finance data: never cached, never framed.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    )
    return response


def _session(request: Request) -> DashboardSession | None:
    return _signer(request).check(request.cookies.get(SESSION_COOKIE), now=time.time())


def _to_login() -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/login", status_code=303)


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        return {}
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items() if v}


def _same_origin(request: Request) -> bool:
    """A browser's POST names its Origin; a form posted from another site is refused."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return urlparse(origin).netloc == host


async def login_form(request: Request) -> HTMLResponse:
    nonce = secrets.token_hex(16)
    response = _page(
        request,
        "login.html",
        None,
        login_token=_signer(request).login_token(nonce),
        error=None,
    )
    _set_login_cookie(request, response, nonce)
    return response


def _set_login_cookie(request: Request, response: Response, nonce: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=600,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


async def login(request: Request) -> Response:
    form = await _form(request)
    signer = _signer(request)
    if not _same_origin(request) or not signer.check_login(
        request.cookies.get(LOGIN_COOKIE), form.get("login_token")
    ):
        return _login_refused(request, "The sign-in form expired; please try again.", 403)
    key = signer.find_key(form.get("api_key", "").strip())
    if key is None:
        return _login_refused(
            request, "That key is not a finance or admin API key. Check it and try again.", 401
        )
    response = RedirectResponse(PREFIX, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        signer.issue(key, now=time.time()),
        max_age=_settings(request).dashboard_session_ttl_s,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
    return response


def _login_refused(request: Request, message: str, status_code: int) -> HTMLResponse:
    nonce = secrets.token_hex(16)
    response = _page(
        request,
        "login.html",
        None,
        status_code=status_code,
        login_token=_signer(request).login_token(nonce),
        error=message,
    )
    _set_login_cookie(request, response, nonce)
    return response


async def logout(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    form = await _form(request)
    if not _same_origin(request) or not _signer(request).check_csrf(session, form.get("csrf")):
        return _page(
            request,
            "error.html",
            session,
            status_code=403,
            message="Sign-out refused: the form did not come from this dashboard.",
        )
    response = _to_login()
    response.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return response


def _currency_format(currency: str) -> Any:
    return lambda amount: Money(int(amount), currency).format()


async def overview(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    deps = _deps(request)
    now = request.app.state.clock.now()

    def read() -> dict[str, Any]:
        months = reporting.month_range_from(None, None, None, now=now)
        mrr = reporting.mrr(deps.session_factory, months)
        as_of, aging = reporting.aging(deps.session_factory, as_of=None, currency=None, now=now)
        dunning = reporting.dunning(deps.session_factory, months)
        collections = reporting.collections(deps.session_factory, months)
        return {
            "months": months,
            "mrr": mrr,
            "aging": aging,
            "as_of": as_of,
            "dunning": dunning,
            "collections": collections,
        }

    data = await asyncio.to_thread(read)
    currencies = sorted(
        {m.currency for m in data["mrr"]}
        | {a.currency for a in data["aging"]}
        | {r.currency for r in data["dunning"].rows}
        | {c.currency for c in data["collections"]}
    )
    sections = []
    for currency in currencies:
        mrr = [m for m in data["mrr"] if m.currency == currency]
        sections.append(
            {
                "currency": currency,
                "mrr": mrr,
                "latest": mrr[-1] if mrr else None,
                "chart": bar_chart(
                    [Bar(str(m.month), m.closing_mrr_minor) for m in mrr],
                    title=f"MRR {currency} by month",
                    fmt=_currency_format(currency),
                    chart_id=f"mrr-chart-{currency}",
                ),
                "aging": [a for a in data["aging"] if a.currency == currency],
                "recovery": [r for r in data["dunning"].rows if r.currency == currency],
                "written_off": next(
                    (w for w in data["dunning"].written_off if w.currency == currency), None
                ),
                "collections": [c for c in data["collections"] if c.currency == currency],
            }
        )
    return _page(
        request,
        "overview.html",
        session,
        sections=sections,
        months=data["months"],
        as_of=data["as_of"],
    )


def _filter_values(request: Request) -> dict[str, str]:
    values = {}
    for name in _FILTER_FIELDS:
        value = request.query_params.get(name, "").strip()
        if value:
            values[name] = value
    return values


def _echoable(values: dict[str, str]) -> dict[str, str]:
    """The values safe to show back in the form: never one the text rule refuses (a NUL, a
    lone surrogate, 10,000 characters)."""
    return {k: v for k, v in values.items() if text_problem(v, max_length=64) is None}


def _invoice_filter(values: dict[str, str]) -> InvoiceFilter:
    values = {k: v for k, v in values.items() if k != "limit"}
    for name, value in values.items():
        problem = text_problem(value, max_length=64)
        if problem:
            raise BillingError(f"{name} {problem}")
    return InvoiceFilter.parse(
        statuses=[values["status"]] if "status" in values else [],
        currency=values.get("currency"),
        customer_id=values.get("customer_id"),
        subscription_id=values.get("subscription_id"),
        issued_from=values.get("issued_from"),
        issued_to=values.get("issued_to"),
        period_from=values.get("period_from"),
        period_to=values.get("period_to"),
    )


async def invoices(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    deps = _deps(request)
    values = _filter_values(request)
    cursor_text = request.query_params.get("cursor") or None
    limit_text = request.query_params.get("limit", "")
    limit = int(limit_text) if limit_text.isdigit() and 1 <= int(limit_text) <= 200 else _PAGE_SIZE
    if limit != _PAGE_SIZE:
        values["limit"] = str(limit)
    try:
        invoice_filter = _invoice_filter(values)
        after = InvoiceCursor.decode(cursor_text) if cursor_text else None
    except BillingError as error:
        return _page(
            request,
            "invoices.html",
            session,
            status_code=422,
            error=error.message,
            page=None,
            filters=_echoable(values),
            statuses=[s.value for s in InvoiceStatus],
            query=urlencode(_echoable(values)),
            next_query=None,
        )

    def read() -> Any:
        with unit_of_work(deps.session_factory) as db:
            return finance_repo.list_invoices(db, invoice_filter, limit=limit, after=after)

    page = await asyncio.to_thread(read)
    next_query = urlencode({**values, "cursor": page.next_cursor}) if page.has_more else None
    return _page(
        request,
        "invoices.html",
        session,
        error=None,
        page=page,
        filters=values,
        statuses=[s.value for s in InvoiceStatus],
        query=urlencode(values),
        next_query=next_query,
        first_page=cursor_text is None,
    )


async def invoices_csv(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    deps = _deps(request)
    try:
        invoice_filter = _invoice_filter(_filter_values(request))
    except BillingError as error:
        return _page(request, "error.html", session, status_code=422, message=error.message)
    pages = finance_repo.iter_invoice_pages(
        deps.session_factory, invoice_filter, page_size=EXPORT_PAGE_SIZE
    )

    async def lines() -> AsyncIterator[str]:
        import csv
        import io

        def text(rows: list[list[str]]) -> str:
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\r\n").writerows(rows)
            return buffer.getvalue()

        yield text([list(INVOICE_CSV_COLUMNS)])
        while True:
            page = await asyncio.to_thread(_next, pages)
            if page is None:
                return
            yield text([invoice_csv_row(item) for item in page])

    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": 'attachment; filename="invoices.csv"',
            "Cache-Control": "no-store",
        },
    )


def _next(pages: Iterator[Any]) -> Any:
    return next(pages, None)


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= 40 and all(c.isascii() and (c.isalnum() or c in "_-") for c in value)


async def invoice_page(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    invoice_id = request.path_params["id"]
    deps = _deps(request)

    def read() -> Any:
        if not _valid_id(invoice_id):
            return None
        with unit_of_work(deps.session_factory) as db:
            detail = finance_repo.get_invoice_detail(db, invoice_id)
            if detail is None:
                return None
            notes = credit_notes_repo.list_credit_notes_for_invoice(db, invoice_id)
            # Every refund of its payments: a credit note's, and one made at Stripe directly.
            refunds = [
                refund
                for payment in detail.payments
                for refund in credit_notes_repo.list_refunds(db, payment_id=payment.id)
            ]
            return detail, notes, refunds

    found = await asyncio.to_thread(read)
    if found is None:
        return _page(request, "error.html", session, status_code=404, message="No such invoice.")
    detail, notes, refunds = found
    invoice = detail.invoice
    numbers = {note.id: note.number for note in notes}
    timeline = sorted(
        [
            (at, what)
            for at, what in (
                (invoice.created_at, "created"),
                (invoice.finalized_at, "finalized"),
                (invoice.paid_at, "paid"),
                (invoice.voided_at, "voided"),
                (invoice.marked_uncollectible_at, "marked uncollectible"),
            )
            if at is not None
        ]
        + [
            (
                a.created_at,
                f"attempt {a.attempt_number} ({a.reason}): {a.status.value}"
                + (f", {a.outcome.value}" if a.outcome else "")
                + (f", {a.decline_code}" if a.decline_code else ""),
            )
            for a in detail.attempts
        ]
        + [(p.settled_at, f"payment {p.id} settled") for p in detail.payments]
        + [
            (
                n.created_at,
                f"credit note {n.number} issued: "
                + Money(n.amount_minor, n.currency).format()
                + (f" ({n.reason})" if n.reason else ""),
            )
            for n in notes
        ]
        + [
            (
                r.completed_at or r.created_at,
                f"refund {r.id} of {Money(r.amount_minor, r.currency).format()}: "
                + f"{RefundStatus(r.status).value}"
                + (
                    f" (credit note {numbers[r.credit_note_id]})"
                    if r.credit_note_id in numbers
                    else ""
                )
                + (" (made at the provider)" if r.source == RefundSource.PROVIDER else ""),
            )
            for r in refunds
        ],
        key=lambda item: item[0],
    )
    lines = document_lines(invoice, detail.lines, notes)
    return _page(
        request,
        "invoice.html",
        session,
        detail=detail,
        invoice=invoice,
        lines=lines,
        subtotal=sum(line.amount_minor for line in lines),
        prepayment_credit=sum(n.amount_due_reduction_minor for n in notes),
        credit_notes=notes,
        refunds=refunds,
        note_numbers=numbers,
        timeline=timeline,
    )


async def invoice_pdf(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    invoice_id = request.path_params["id"]
    if not _valid_id(invoice_id):
        return _page(request, "error.html", session, status_code=404, message="No such invoice.")
    deps, settings = _deps(request), _settings(request)

    def build() -> Response:
        document = load_document(deps.session_factory, settings, invoice_id)
        return pdf_response(document, render_invoice_pdf(document))

    try:
        return await asyncio.to_thread(build)
    except BillingError:
        return _page(request, "error.html", session, status_code=404, message="No such invoice.")


async def subscription_page(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login()
    subscription_id = request.path_params["id"]
    deps = _deps(request)

    def read() -> Any:
        if not _valid_id(subscription_id):
            return None
        with unit_of_work(deps.session_factory) as db:
            subscription = subscriptions_repo.get_subscription(db, subscription_id)
            if subscription is None:
                return None
            return {
                "subscription": subscription,
                "changes": subscriptions_repo.list_status_changes(db, subscription_id),
                "plan_changes": subscriptions_repo.list_terms_changes(db, subscription_id),
                "notices": notifications_repo.list_notifications(
                    db, subscription_id=subscription_id
                ),
                "invoices": finance_repo.list_invoices(
                    db, InvoiceFilter(subscription_id=subscription_id), limit=50
                ),
            }

    data = await asyncio.to_thread(read)
    if data is None:
        return _page(
            request, "error.html", session, status_code=404, message="No such subscription."
        )
    return _page(request, "subscription.html", session, **data)


def static_dir() -> Path:
    return Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Add the dashboard to ``app`` (whose ``state.settings`` is set)."""
    settings = app.state.settings
    assert isinstance(settings, Settings)
    secret = (
        settings.dashboard_session_secret.get_secret_value().encode()
        if settings.dashboard_session_secret is not None
        else secrets.token_bytes(32)
    )
    app.state.dashboard_signer = SessionSigner(
        secret, settings.api_keys, ttl_s=settings.dashboard_session_ttl_s
    )
    app.mount(f"{PREFIX}/static", StaticFiles(directory=static_dir()), name="dashboard-static")
    for path, endpoint, methods in (
        (f"{PREFIX}/login", login_form, ["GET"]),
        (f"{PREFIX}/login", login, ["POST"]),
        (f"{PREFIX}/logout", logout, ["POST"]),
        (PREFIX, overview, ["GET"]),
        (f"{PREFIX}/invoices", invoices, ["GET"]),
        (f"{PREFIX}/invoices.csv", invoices_csv, ["GET"]),
        (f"{PREFIX}/invoices/{{id}}.pdf", invoice_pdf, ["GET"]),
        (f"{PREFIX}/invoices/{{id}}", invoice_page, ["GET"]),
        (f"{PREFIX}/subscriptions/{{id}}", subscription_page, ["GET"]),
    ):
        app.add_api_route(path, endpoint, methods=methods, include_in_schema=False)
    # Imported here: the settlement pages use this module's helpers.
    from billing.dashboard import settlement

    for path, endpoint in settlement.ROUTES:
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
