"""The finance dashboard and /docs in a real browser: Playwright driving Debian's chromium
(/usr/bin/chromium) against the real app served by uvicorn on a loopback port, over a real
harness and the hand-worked book (tests/finance_book.py).

Every request the page makes to anything but our server is refused and recorded (the network
is off for outside hosts), so a page that needs a CDN fails here. Screenshots of each page go
to ``screenshots/dashboard/`` (git-ignored; BILLING_SCREENSHOTS_DIR moves it)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.async_api import Browser, Page, Route, async_playwright

from billing.api import create_app
from billing.clock import FixedClock
from billing.testing.harness import BillingHarness
from tests import finance_book as book
from tests.api.support import API_KEYS, api_settings

CHROMIUM = os.environ.get("BILLING_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = (
    Path(os.environ.get("BILLING_SCREENSHOTS_DIR", Path(__file__).parents[2] / "screenshots"))
    / "dashboard"
)
# The flags the machine notes give: no sandbox as root, no background calls to Google.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def server(harness: BillingHarness) -> AsyncIterator[str]:
    book.write_book(harness.session_factory)
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


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it); the "
            "browser tests never skip"
        )
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def _offline_page(browser: Browser, base: str, refused: list[str]) -> Page:
    context = await browser.new_context(
        accept_downloads=True, viewport={"width": 1280, "height": 900}
    )
    page = await context.new_page()

    async def only_ours(route: Route) -> None:
        if route.request.url.startswith(base):
            await route.continue_()
        else:
            refused.append(route.request.url)
            await route.abort()

    await page.route("**/*", only_ours)
    return page


async def _shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def _sign_in(page: Page, base: str, key: str) -> None:
    await page.goto(f"{base}/dashboard")
    assert page.url.endswith("/dashboard/login")  # no session: sent to sign in
    await page.fill("#api_key", key)
    await page.click("#sign-in")


async def test_docs_work_offline(server: str, browser: Browser) -> None:
    refused: list[str] = []
    page = await _offline_page(browser, server, refused)
    await page.goto(f"{server}/docs")
    await page.wait_for_selector(".swagger-ui .info .title", timeout=15_000)
    assert "billing API" in (await page.inner_text(".swagger-ui .info .title")) or "billing" in (
        await page.inner_text(".swagger-ui .info .title")
    )
    await page.wait_for_selector(".opblock-summary-path[data-path='/v1/reports/mrr']")
    await _shot(page, "docs")
    assert refused == []


async def test_the_dashboard_end_to_end(server: str, browser: Browser, tmp_path: Path) -> None:
    refused: list[str] = []
    page = await _offline_page(browser, server, refused)

    # A signup key is refused, with a message and no session.
    await _sign_in(page, server, API_KEYS["signup"])
    assert "not a finance or admin API key" in await page.inner_text("#login-error")
    await _shot(page, "sign-in-refused")

    await _sign_in(page, server, API_KEYS["finance"])
    await page.wait_for_selector("#currency-USD")
    assert "finance-key (finance)" in await page.inner_text("#signed-in-as")
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["billing_dashboard_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert API_KEYS["finance"] not in session["value"]  # the key never sits in the cookie

    # The chart draws the closing MRR of each month (the book's figures).
    for currency in ("USD", "EUR"):
        bars = await page.eval_on_selector_all(
            f"#mrr-chart-{currency} rect.bar",
            "bars => bars.map(b => [b.dataset.month, Number(b.dataset.value), b.getBBox().height])",
        )
        drawn = {month: value for month, value, _ in bars}
        for (month, cur), figures in book.MRR.items():
            if cur == currency:
                assert drawn[month] == figures[-1], (currency, month)
        heights = {month: height for month, _, height in bars}
        if currency == "USD":
            # Feb (4000) is drawn four times as tall as Jan (1000).
            assert heights["2026-02"] == pytest.approx(4 * heights["2026-01"], rel=0.01)
    assert "US$40.00" not in await page.inner_text("#mrr-USD")
    assert await page.inner_text("#mrr-USD") == "USD 25.00"
    movements = await page.inner_text("#movements-USD")
    assert "2026-03" in movements and "USD 30.00" in movements  # March's churn
    # April's row: opening, new, expansion, contraction (sub_d's cheaper plan), churned, ...
    april = await page.eval_on_selector(
        "#movements-USD tr:has-text('2026-04')",
        "r => [...r.querySelectorAll('td')].map(c => c.innerText)",
    )
    assert april[:5] == ["2026-04", "USD 10.00", "USD 0.00", "USD 0.00", "USD 5.00"], april
    eur_march = await page.eval_on_selector(
        "#movements-EUR tr:has-text('2026-03')",
        "r => [...r.querySelectorAll('td')].map(c => c.innerText)",
    )
    assert eur_march[3] != "€0.00" and "43.29" in eur_march[3], eur_march  # a second seat
    aging = await page.inner_text("#aging-USD tr[data-bucket='61-90']")
    assert "USD 120.00" in aging
    assert "0.3333" in await page.inner_text("#recovery-USD")
    await _shot(page, "overview")

    # Invoices: filter, page by keyset, download the CSV.
    await page.click("text=Invoices")
    await page.select_option("#filter-status", "open")
    await page.click("#apply-filters")
    rows = await page.eval_on_selector_all(".invoice-row", "r => r.map(x => x.dataset.invoiceId)")
    assert sorted(rows) == ["in_4", "in_5", "in_6", "in_8"]
    await _shot(page, "invoices-open")
    await page.goto(f"{server}/dashboard/invoices?limit=3")
    seen: list[str] = []
    while True:
        seen += await page.eval_on_selector_all(
            ".invoice-row", "r => r.map(x => x.dataset.invoiceId)"
        )
        if await page.query_selector("#next-page") is None:
            break
        await page.click("#next-page")
    assert sorted(seen) == [f"in_{n}" for n in range(1, 9)] and len(seen) == 8
    await page.goto(f"{server}/dashboard/invoices?currency=EUR")
    async with page.expect_download() as download_info:
        await page.click("#download-csv")
    download = await download_info.value
    target = tmp_path / "invoices.csv"
    await download.save_as(target)
    exported = list(csv.DictReader(io.StringIO(target.read_text())))
    assert [(r["invoice_id"], r["amount_due_minor"]) for r in exported] == [("in_6", "123456")]

    # A bad filter is said, not a crash.
    await page.goto(f"{server}/dashboard/invoices?issued_from=yesterday")
    assert "issued_from" in await page.inner_text("#filter-error")

    # An invoice, its PDF link and its subscription.
    await page.goto(f"{server}/dashboard/invoices?status=paid")
    await page.click("text=AAAAAAAA-0002")
    assert await page.inner_text("#invoice-number") == "AAAAAAAA-0002"
    attempts = await page.inner_text("#attempts")
    assert "insufficient_funds" in attempts and "in_2-attempt-2" in attempts
    assert "payment py_in_2 settled" in await page.inner_text("#timeline")
    await _shot(page, "invoice")
    pdf = await page.context.request.get(f"{server}/dashboard/invoices/in_2.pdf")
    assert pdf.status == 200 and (await pdf.body()).startswith(b"%PDF")
    await page.click("#subscription-link")
    assert await page.inner_text("#subscription-id") == "sub_a"
    history = await page.inner_text("#status-history")
    assert "canceled" in history and "2026-03-15" in history
    assert "No plan or seat changes" in await page.inner_text("#plan-history")
    await _shot(page, "subscription")
    # A subscription with a plan history: sub_c's second seat.
    await page.goto(f"{server}/dashboard/subscriptions/sub_c")
    plans = await page.eval_on_selector(
        "#plan-history tbody tr",
        "r => [...r.querySelectorAll('td')].map(c => c.innerText)",
    )
    times = "\u00d7"  # the multiplication sign the page shows
    assert plans[0].startswith("2026-03-20")
    assert plans[1:3] == [f"book-plan {times} 1", f"book-plan {times} 2"], plans
    assert "43.29" in plans[3] and "86.58" in plans[4], plans
    await _shot(page, "subscription-plan-history")

    # Sign-out needs the page's CSRF token: the same POST without it is refused.
    forged = await page.context.request.post(
        f"{server}/dashboard/logout", form={"csrf": "forged"}, max_redirects=0
    )
    assert forged.status == 403
    await page.click("#sign-out")
    assert page.url.endswith("/dashboard/login")
    await page.goto(f"{server}/dashboard/invoices")
    assert page.url.endswith("/dashboard/login")
    assert refused == []
    assert any(SCREENSHOTS.glob("*.png"))


async def test_a_cookie_from_elsewhere_is_refused(server: str) -> None:
    async with httpx.AsyncClient(base_url=server) as client:
        forged = await client.get(
            "/dashboard", cookies={"billing_dashboard_session": "v1.x.9999999999.n.sig"}
        )
        assert forged.status_code == 303 and forged.headers["location"] == "/dashboard/login"
        # Sign-in without the form's token (another site's form) is refused.
        posted = await client.post("/dashboard/login", data={"api_key": API_KEYS["admin"]})
        assert posted.status_code == 403 and "billing_dashboard_session" not in posted.cookies
