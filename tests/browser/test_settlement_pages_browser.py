"""The dashboard's settlement pages in a real browser (Playwright driving Debian's chromium):
an invoice with its lines, attempts, payments, refunds, credit notes and timeline; payouts by
keyset pages; a payout reconciled; the charge reconciliation's findings. Over the finance
book plus the settlement book (tests/settlement_book.py), whose figures are worked out by
hand there. Screenshots go to ``screenshots/dashboard/`` like the other dashboard pages."""

# The browser fixture is imported from the dashboard tests (pytest registers it by name).
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import uvicorn
from playwright.async_api import Browser

from billing.api import create_app
from billing.clock import FixedClock
from billing.testing.harness import BillingHarness
from tests import finance_book as book
from tests import settlement_book as settled
from tests.api.support import API_KEYS, api_settings
from tests.browser.test_dashboard_browser import (  # noqa: F401  (the browser fixture)
    _free_port,
    _offline_page,
    _shot,
    _sign_in,
    browser,
)
from tests.conftest import BOTH_BACKENDS


@pytest.fixture
async def server(harness: BillingHarness) -> AsyncIterator[str]:
    settled.write_settlement(harness.session_factory)
    app = create_app(
        api_settings(harness),
        deps=harness.deps,
        temporal=harness.client,
        clock=FixedClock(book.NOW),
    )
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    await task


async def _texts(page: object, selector: str) -> list[str]:
    return await page.eval_on_selector_all(selector, "r => r.map(x => x.innerText)")  # type: ignore[attr-defined, no-any-return]


@BOTH_BACKENDS
async def test_settlement_pages_show_the_books_figures(server: str, browser: Browser) -> None:
    refused: list[str] = []
    page = await _offline_page(browser, server, refused)
    await _sign_in(page, server, API_KEYS["finance"])
    await page.wait_for_selector("#currency-USD")

    # ---- the invoice: its own line, attempts, payment, both refunds, the credit note -------
    await page.goto(f"{server}/dashboard/invoices/in_2")
    assert await page.inner_text("#invoice-number") == "AAAAAAAA-0002"
    lines = await _texts(page, "#lines tr.line")
    assert len(lines) == 1 and settled.IN_2_LINE in lines[0] and "USD 10.00" in lines[0]
    assert await page.inner_text("#subtotal") == "USD 10.00"
    assert await page.inner_text("#amount-due") == "USD 10.00"
    assert await page.inner_text("#amount-paid") == "USD 10.00"
    attempts = await page.inner_text("#attempts")
    assert "insufficient_funds" in attempts and "in_2-attempt-2" in attempts
    assert "py_in_2" in await page.inner_text("#payments")
    refunds = await page.eval_on_selector_all(
        "#refunds tr.refund-row", "r => r.map(x => [Number(x.dataset.amount), x.innerText])"
    )
    by_amount = {amount: text for amount, text in refunds}
    # The finance book's own refunds of in_2 show too: one the provider refused (10.00), one
    # still pending (2.00); neither is money refunded.
    assert sorted(by_amount) == sorted(
        [settled.PROVIDER_REFUND, settled.CREDIT_NOTE["refund"], 1000, 200]
    )
    assert "failed" in by_amount[1000] and "pending" in by_amount[200]
    assert "credit_note" in by_amount[300] and "re_cn_1" in by_amount[300]
    assert "AAAAAAAA-CN-0001" in by_amount[300]
    assert "succeeded" in by_amount[300] and "USD 3.00" in by_amount[300]
    assert "provider" in by_amount[150] and "re_dash_1" in by_amount[150]
    [note] = await _texts(page, "#credit-notes tr.credit-note-row")
    assert "AAAAAAAA-CN-0001" in note and "duplicate" in note
    # Total 4.00: 3.00 refunded, 1.00 to the balance, nothing outside or off the amount due.
    assert "USD 4.00\tUSD 3.00\tUSD 1.00\tUSD 0.00\tUSD 0.00" in note, note
    timeline = await page.inner_text("#timeline")
    assert "credit note AAAAAAAA-CN-0001 issued: USD 4.00 (duplicate)" in timeline
    assert "of USD 3.00: succeeded (credit note AAAAAAAA-CN-0001)" in timeline
    assert "of USD 1.50: succeeded (made at the provider)" in timeline
    # In time order: the charge settled, then the credit note, then the refunds.
    assert timeline.index("payment py_in_2 settled") < timeline.index("credit note")
    await _shot(page, "invoice-settlement")

    # ---- payouts, newest first, two a page ------------------------------------------------
    await page.click("#nav-payouts")
    assert page.url.endswith("/dashboard/payouts")
    seen: list[str] = []
    await page.goto(f"{server}/dashboard/payouts?limit=2")
    pages = 0
    while True:
        pages += 1
        seen += await page.eval_on_selector_all(
            ".payout-row", "r => r.map(x => x.dataset.stripeId)"
        )
        if pages == 1:
            await _shot(page, "payouts")
        if await page.query_selector("#next-page") is None:
            break
        await page.click("#next-page")
    assert seen == ["po_book_5", "po_book_4", "po_book_3", "po_book_2", "po_book_1"]
    assert pages == 3
    await page.click("#first-page")
    first = await page.eval_on_selector_all(".payout-row", "r => r.map(x => x.dataset.stripeId)")
    assert first == ["po_book_5", "po_book_4"]
    await page.goto(f"{server}/dashboard/payouts")
    row = await page.inner_text(".payout-row[data-stripe-id='po_book_1']")
    assert "USD 20.51" in row and "paid" in row

    # ---- one payout reconciled -------------------------------------------------------------
    await page.click(".payout-row[data-stripe-id='po_book_1'] a")
    assert await page.inner_text("#payout-id") == "po_book_1"
    assert await page.inner_text("#paid-out") == "USD 20.51"
    assert await page.inner_text("#gross") == "USD 22.00"
    assert await page.inner_text("#fees") == "USD 1.49"
    assert await page.inner_text("#net") == "USD 20.51"
    assert await page.inner_text("#matched-count") == str(settled.MATCHED)
    assert await page.inner_text("#difference-count") == "2"
    assert await page.inner_text("#counts-by-type") == "charge: 3, payout: 1, refund: 1"
    unknown = await _texts(page, "#unknown-at-stripe li.finding")
    assert len(unknown) == 1 and "ch_alien" in unknown[0] and "500" in unknown[0]
    [mismatch] = await _texts(page, "#mismatches li.finding")
    assert "fee_mismatch" in mismatch and "txn_ch_in_2" in mismatch
    assert "fee of 60" in mismatch and "recorded 59" in mismatch
    matched_rows = await _texts(page, "#transactions tr.txn-row")
    assert sum("matched" in r for r in matched_rows) == settled.MATCHED
    assert await _texts(page, "#missing-from-payouts tr.missing-row") == []
    assert await page.query_selector("#not-imported") is None
    await _shot(page, "payout-reconciliation")

    # The newest payout: nothing imported yet, and Stripe's own refund is in no payout.
    await page.goto(f"{server}/dashboard/payouts/po_book_5")
    assert "not imported yet" in await page.inner_text("#not-imported")
    [total] = await _texts(page, "#mismatches li.finding")
    assert "payout_total_mismatch" in total and "1000" in total
    [missing] = await _texts(page, "#missing-from-payouts tr.missing-row")
    assert "refund" in missing and "txn_re_dash_1" in missing and "-USD 1.50" in missing
    await _shot(page, "payout-missing")
    await page.goto(f"{server}/dashboard/payouts/po_nope")
    assert "No such payout" in await page.inner_text("main")

    # ---- the charge reconciliation's findings ---------------------------------------------
    await page.click("#nav-findings")
    for severity in ("error", "warning", "info"):
        assert await page.inner_text(f"#count-{severity}") == "1"
    rows = await page.eval_on_selector_all(
        ".finding-row", "r => r.map(x => [x.dataset.kind, x.dataset.severity])"
    )
    assert rows == [[k, s] for k, s, _, _ in settled.FINDINGS]
    assert "USD 120.00" in await page.inner_text(".finding-row[data-kind='unknown_outcome']")
    await _shot(page, "findings")
    await page.select_option("#filter-severity", "error")
    await page.click("#apply-filters")
    kinds = await page.eval_on_selector_all(".finding-row", "r => r.map(x => x.dataset.kind)")
    assert kinds == ["double_charge"]
    await page.click(".finding-row a")  # its invoice
    assert await page.inner_text("#invoice-number") == "AAAAAAAA-0002"
    await page.goto(f"{server}/dashboard/reconciliation/findings?since=yesterday")
    assert "since" in await page.inner_text("#filter-error")
    assert refused == []


async def test_settlement_pages_refuse_bad_input_and_need_a_session(
    server: str, browser: Browser
) -> None:
    page = await _offline_page(browser, server, [])
    for path in (
        "/dashboard/payouts",
        "/dashboard/payouts/po_book_1",
        "/dashboard/reconciliation/findings",
    ):
        await page.goto(f"{server}{path}")
        assert page.url.endswith("/dashboard/login"), path  # no session: sent to sign in
    await _sign_in(page, server, API_KEYS["admin"])
    await page.wait_for_selector("#currency-USD")
    for query, status, says in (
        ("/dashboard/payouts?cursor=not-a-cursor", 422, "cursor"),
        ("/dashboard/payouts?cursor=" + "A" * 10_000, 422, "cursor"),
        ("/dashboard/payouts/" + "x" * 10_000, 404, "No such payout"),
        ("/dashboard/payouts/po%00book", 404, "No such payout"),
        ("/dashboard/reconciliation/findings?severity=fatal", 422, "severity must be one of"),
        ("/dashboard/reconciliation/findings?since=%00", 422, "NUL"),
        ("/dashboard/reconciliation/findings?since=" + "9" * 10_000, 422, "at most 64"),
        ("/dashboard/reconciliation/findings?severity=%F0%9F%98%80", 422, "severity"),
    ):
        response = await page.context.request.get(f"{server}{query}")
        assert response.status == status, (query, response.status)
        body = await response.text()
        assert says in body, (query, body[:300])
        assert len(body) < 20_000  # 10,000 characters are not echoed back
