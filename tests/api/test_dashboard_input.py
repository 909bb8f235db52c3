"""The dashboard as an attacker or a careless user meets it, over HTTP (the browser tests
cover the pages themselves): odd filter values, forged or expired sessions, a revoked key,
cross-site form posts, twenty sign-ins at once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from pydantic import SecretStr

from billing.api import create_app
from billing.dashboard.session import SessionSigner
from billing.settings import ApiKey
from tests import finance_book as book
from tests.api.support import API_KEYS, Api, api_settings


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    form = await client.get("/dashboard/login")
    token = form.text.split('name="login_token" value="', 1)[1].split('"', 1)[0]
    return await client.post(
        "/dashboard/login",
        data={"api_key": key, "login_token": token},
        cookies=dict(form.cookies),
    )


@pytest.fixture
async def signed_in(api: Api) -> httpx.AsyncClient:
    book.write_book(api.harness.session_factory)
    response = await sign_in(api.http, API_KEYS["admin"])
    assert response.status_code == 303 and response.headers["location"] == "/dashboard"
    cookie = response.cookies["billing_dashboard_session"]
    api.http.cookies.set("billing_dashboard_session", cookie)
    return api.http


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"customer_id": "cus_\x00a"}, 422, "NUL"),
        ({"customer_id": "c" * 10_000}, 422, "at most 64"),
        ({"currency": "💶"}, 422, "currency"),
        ({"status": "paied"}, 422, "unknown invoice status"),
        ({"cursor": "not-a-cursor"}, 422, "cursor"),
        (
            {"issued_from": "2026-02-01T00:00:00Z", "issued_to": "2026-01-01T00:00:00Z"},
            422,
            "must not be later",
        ),
        ({"customer_id": "cus_🙂"}, 200, "No invoices match"),
        # March's billing periods: in_6 (EUR) and in_7 (void) only.
        (
            {"period_from": "2026-03-01T00:00:00Z", "period_to": "2026-04-01T00:00:00Z"},
            200,
            "CCCCCCCC-0001",
        ),
        ({"limit": "999999999999999999999"}, 200, "AAAAAAAA-0001"),
    ],
)
async def test_odd_filters_are_said_not_crashed_on(
    signed_in: httpx.AsyncClient, params: dict[str, str], status: int, words: str
) -> None:
    response = await signed_in.get("/dashboard/invoices", params=params)
    assert response.status_code == status, response.text[:500]
    assert words in response.text
    assert "\x00" not in response.text


ODD_PATHS = [
    "/dashboard/invoices/in_%00",
    "/dashboard/invoices/" + "x" * 500,
    "/dashboard/subscriptions/sub_🙂",
    "/dashboard/invoices/nope.pdf",
]


@pytest.mark.parametrize("path", ODD_PATHS)
async def test_unknown_or_odd_ids_are_404(signed_in: httpx.AsyncClient, path: str) -> None:
    response = await signed_in.get(path)
    assert response.status_code == 404
    assert "No such" in response.text


async def test_text_is_escaped(signed_in: httpx.AsyncClient) -> None:
    response = await signed_in.get(
        "/dashboard/invoices", params={"customer_id": "<script>alert(1)</script>"}
    )
    assert "<script>alert(1)" not in response.text
    assert "&lt;script&gt;" in response.text
    assert "script-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"


async def test_a_revoked_key_ends_its_sessions(api: Api) -> None:
    response = await sign_in(api.http, API_KEYS["finance"])
    cookie = response.cookies["billing_dashboard_session"]
    assert API_KEYS["finance"] not in cookie
    # The same secret, the finance key no longer configured (a new app: config is read once).
    app = api.http._transport.app  # type: ignore[attr-defined]
    signer: SessionSigner = app.state.dashboard_signer
    settings = api_settings(api.harness)
    only_admin = [k for k in settings.api_keys if k.scope == "admin"]
    revoked = SessionSigner(signer._secret, only_admin, ttl_s=3600)
    assert signer.check(cookie, now=time.time()) is not None
    assert revoked.check(cookie, now=time.time()) is None
    # Expired: the same cookie after its lifetime.
    assert signer.check(cookie, now=time.time() + settings.dashboard_session_ttl_s + 1) is None
    # Tampered: another key id under the old signature.
    body, _, signature = cookie.rpartition(".")
    parts = body.split(".")
    parts[1] = "0" * 32
    assert signer.check(".".join(parts) + "." + signature, now=time.time()) is None


async def test_a_sign_in_or_sign_out_posted_from_another_site_is_refused(
    signed_in: httpx.AsyncClient,
) -> None:
    page = await signed_in.get("/dashboard")
    csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    foreign = await signed_in.post(
        "/dashboard/logout", data={"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    assert (await signed_in.get("/dashboard")).status_code == 200  # still signed in
    same = await signed_in.post(
        "/dashboard/logout", data={"csrf": csrf}, headers={"Origin": "http://billing.test"}
    )
    assert same.status_code == 303
    assert 'billing_dashboard_session=""' in same.headers["set-cookie"] or (
        "Max-Age=0" in same.headers["set-cookie"]
    )


async def test_twenty_sign_ins_at_once_each_get_their_own_session(api: Api) -> None:
    responses = await asyncio.gather(*(sign_in(api.http, API_KEYS["admin"]) for _ in range(20)))
    cookies = {r.cookies["billing_dashboard_session"] for r in responses}
    assert all(r.status_code == 303 for r in responses) and len(cookies) == 20


async def test_a_configured_secret_keeps_sessions_across_restarts(api: Api) -> None:
    settings = api_settings(api.harness).model_copy(
        update={"dashboard_session_secret": SecretStr("s" * 32)}
    )
    first = create_app(settings, deps=api.harness.deps, temporal=api.harness.client)
    second = create_app(settings, deps=api.harness.deps, temporal=api.harness.client)
    key = ApiKey(name="admin-key", scope="admin", key=SecretStr(API_KEYS["admin"]))
    cookie = first.state.dashboard_signer.issue(key, now=time.time())
    assert second.state.dashboard_signer.check(cookie, now=time.time()) is not None


async def test_the_period_filter_lists_that_months_invoices_only(
    signed_in: httpx.AsyncClient,
) -> None:
    response = await signed_in.get(
        "/dashboard/invoices",
        params={"period_from": "2026-03-01T00:00:00Z", "period_to": "2026-04-01T00:00:00Z"},
    )
    listed = [chunk.split('"', 1)[0] for chunk in response.text.split('data-invoice-id="')[1:]]
    assert sorted(listed) == ["in_6", "in_7"]
