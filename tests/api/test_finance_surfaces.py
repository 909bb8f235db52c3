"""Health, readiness, metrics, the reports API (JSON and CSV) and invoice documents (HTML and
PDF, read back with pdftotext), on the real app over a real harness and database."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from billing.api import create_app
from tests import finance_book as book
from tests.api.support import Api, api_settings
from tests.conftest import BOTH_BACKENDS


async def test_healthz_and_readyz_answer_when_everything_is_up(api: Api) -> None:
    assert (await api.request("GET", "/healthz")).json() == {"status": "ok"}
    ready = await api.request("GET", "/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"]["ok"] and body["checks"]["temporal"]["ok"]


async def test_readyz_says_which_dependency_is_down(api: Api) -> None:
    # A client for a Temporal that is not there, and a database file that cannot be opened.
    absent = await Client.connect("127.0.0.1:1", lazy=True)
    settings = api_settings(api.harness)
    from dataclasses import replace

    from billing.worker import build_dependencies

    deps = replace(
        api.harness.deps,
        session_factory=build_dependencies(
            settings.model_copy(update={"database_url": "sqlite:////nonexistent/dir/x.db"})
        ).session_factory,
    )
    app = create_app(settings, deps=deps, temporal=absent)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        alive = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert alive.status_code == 200  # liveness asks no dependency
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"]["ok"] is False and checks["temporal"]["ok"] is False
    assert "error" in checks["database"] and "error" in checks["temporal"]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_time_requests_by_route_template_and_count_the_book(api: Api) -> None:
    book.write_book(api.harness.session_factory)
    for _ in range(3):
        await api.request("GET", "/v1/invoices/in_nope", scope="finance")
    await api.request("GET", "/v1/invoices/in_1", scope="finance")
    await api.request("GET", "/no/such/path")
    response = await api.request("GET", "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    count = "billing_api_request_duration_seconds_count"
    route = (("method", "GET"), ("route", "/v1/invoices/{id}"))
    assert samples[(count, (*route, ("status", "404")))] == 3
    assert samples[(count, (*route, ("status", "200")))] == 1
    assert samples[(count, (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    # No raw ids in any label.
    assert "in_nope" not in response.text
    attempts = "billing_charge_attempts_total"
    assert samples[(attempts, (("outcome", "soft_decline"), ("status", "failed")))] == 2
    assert samples[(attempts, (("outcome", "paid"), ("status", "succeeded")))] == 2
    assert samples[("billing_dunning_recoveries_total", ())] == 1
    assert samples[("billing_invoices", (("status", "open"),))] == 4
    assert samples[("billing_subscriptions", (("status", "canceled"),))] == 1


@BOTH_BACKENDS
async def test_reports_api_json_and_csv(api: Api) -> None:
    book.write_book(api.harness.session_factory)
    months = {"from": "2026-01", "to": "2026-04"}
    mrr = await api.request("GET", "/v1/reports/mrr", scope="finance", params=months)
    assert mrr.status_code == 200, mrr.text
    got = {
        (r["month"], r["currency"]): (
            r["opening_mrr_minor"],
            r["new_minor"],
            r["expansion_minor"],
            r["contraction_minor"],
            r["churned_minor"],
            r["reactivated_minor"],
            r["closing_mrr_minor"],
        )
        for r in mrr.json()["rows"]
    }
    assert got == book.MRR
    exported = await api.request("GET", "/v1/reports/mrr.csv", scope="admin", params=months)
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    march = next(r for r in rows if r["month"] == "2026-03" and r["currency"] == "USD")
    assert (march["churned_minor"], march["logo_churn_rate"]) == ("3000", "0.6667")

    aging = await api.request(
        "GET", "/v1/reports/ar-aging", scope="finance", params={"as_of": "2026-04-30T00:00:00Z"}
    )
    assert {
        (r["currency"], r["bucket"]): (r["invoices"], r["outstanding_minor"])
        for r in aging.json()["rows"]
    } == book.AGING
    dunning = await api.request("GET", "/v1/reports/dunning.csv", scope="finance", params=months)
    lines = list(csv.DictReader(io.StringIO(dunning.text)))
    assert {(r["currency"], r["by"], r["key"]) for r in lines} == set(book.DUNNING)
    collections = await api.request(
        "GET", "/v1/reports/collections", scope="finance", params=months
    )
    assert {
        (r["month"], r["currency"]): (
            r["invoiced_minor"],
            r["invoices"],
            r["collected_minor"],
            r["payments"],
            r["fees_minor"],
        )
        for r in collections.json()["rows"]
    } == book.COLLECTIONS
    assert {
        (r["month"], r["currency"]): (r["refunded_minor"], r["refunds"], r["net_collected_minor"])
        for r in collections.json()["rows"]
    } == book.REFUNDED
    exported = await api.request(
        "GET", "/v1/reports/collections.csv", scope="finance", params=months
    )
    assert {
        (r["month"], r["currency"]): (
            int(r["refunded_minor"]),
            int(r["refunds"]),
            int(r["net_collected_minor"]),
        )
        for r in csv.DictReader(io.StringIO(exported.text))
    } == book.REFUNDED


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"from": "2026-13"}, "from", "YYYY-MM"),
        ({"from": "2026-05", "to": "2026-01"}, "from", "is after to"),
        ({"from": "2000-01", "to": "2026-01"}, "to", "at most 120 months"),
        ({"currency": "XYZ"}, "currency", "unknown currency"),
        ({"month": "2026-01"}, "month", "unknown query parameter"),
        ({"from": "2026-01\x00"}, "from", ""),
    ],
)
async def test_reports_refuse_bad_input_naming_the_field(
    api: Api, params: dict[str, str], field: str, words: str
) -> None:
    response = await api.request("GET", "/v1/reports/mrr", scope="finance", params=params)
    assert response.status_code == 422, response.text
    assert words in response.text
    assert field in response.text


async def test_reports_need_the_finance_or_admin_scope(api: Api) -> None:
    assert (await api.request("GET", "/v1/reports/mrr")).status_code == 401
    assert (await api.request("GET", "/v1/reports/mrr", scope="signup")).status_code == 403


def _pdf_text(pdf: bytes, tmp_path: Path) -> str:
    assert shutil.which("pdftotext"), "pdftotext is missing: apt-get install poppler-utils"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "invoice.pdf"
    path.write_bytes(pdf)
    return subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], check=True, capture_output=True, text=True
    ).stdout


async def test_invoice_pdf_in_the_customers_locale(api: Api, tmp_path: Path) -> None:
    book.write_book(api.harness.session_factory)
    response = await api.request("GET", "/v1/invoices/in_6.pdf", scope="finance")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pdf"
    text = _pdf_text(response.content, tmp_path)
    # cus_c is fr_FR in Europe/Paris: French words, 1 234,56 € (narrow no-break spaces).
    normalised = " ".join(text.replace("\u202f", " ").replace("\xa0", " ").split())
    assert "Facture" in normalised and "CCCCCCCC-0001" in normalised
    assert "1 234,56 €" in normalised
    assert "Société Générale d'Essai" in normalised
    assert "3 mars 2026" in normalised  # issued Mar 3, in Paris
    assert "Billing Demo Ltd" in normalised  # the seller, from settings
    assert "Montant payé 0,00 €" in normalised


async def test_invoice_pdf_of_a_paid_usd_invoice_and_html(api: Api, tmp_path: Path) -> None:
    book.write_book(api.harness.session_factory)
    pdf = await api.request("GET", "/v1/invoices/in_2.pdf", scope="admin")
    text = " ".join(_pdf_text(pdf.content, tmp_path).split())
    assert "Invoice" in text and "AAAAAAAA-0002" in text
    assert "Amount due US$10.00" in text and "Amount paid US$10.00" in text
    assert "Subtotal US$10.00" in text
    assert "Amount remaining US$0.00" in text
    html = await api.request("GET", "/v1/invoices/in_2.html", scope="finance")
    assert html.status_code == 200 and "AAAAAAAA-0002" in html.text
    missing = await api.request("GET", "/v1/invoices/in_missing.pdf", scope="finance")
    assert missing.status_code == 404
    assert (await api.request("GET", "/v1/invoices/in_2.pdf")).status_code == 401


async def test_the_worker_serves_health_on_its_own_port(api: Api) -> None:
    """``serve_worker_health`` (what ``billing worker`` runs on BILLING_WORKER_HEALTH_ADDRESS)
    on a real loopback port, with the harness's database and Temporal."""
    import asyncio
    import socket

    from billing.health import serve_worker_health

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve_worker_health(
            f"127.0.0.1:{port}",
            api.harness.session_factory,
            api.harness.client,
            stop=stop,
            started=started,
        )
    )
    await asyncio.wait_for(started.wait(), 10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_twenty_pdfs_at_once_are_each_whole(api: Api, tmp_path: Path) -> None:
    """WeasyPrint renders in the API's threads: twenty requests at once each get the right,
    complete document."""
    import asyncio

    book.write_book(api.harness.session_factory)
    ids = ["in_2", "in_6"] * 10
    responses = await asyncio.gather(
        *(api.request("GET", f"/v1/invoices/{i}.pdf", scope="finance") for i in ids)
    )
    for n, (invoice_id, response) in enumerate(zip(ids, responses, strict=True)):
        assert response.status_code == 200
        assert response.content.startswith(b"%PDF") and b"%%EOF" in response.content[-64:]
        text = " ".join(_pdf_text(response.content, tmp_path / str(n)).split())
        number = {"in_2": "AAAAAAAA-0002", "in_6": "CCCCCCCC-0001"}[invoice_id]
        assert number in text
