"""Every route is protected: walked from the app itself, so a route added tomorrow without an
API-key scope fails here. Each route documented in OpenAPI must declare its scopes, refuse a
request without a key (401) and one with a key of another scope (403), and take a key of its
scope. The allow-list: the Stripe webhook (it proves a signature instead, and refuses an
unsigned call) and the docs (the OpenAPI document and its viewer)."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import APIRouter, FastAPI

from billing.api.auth import KNOWN_SCOPES
from billing.api.webhooks import WEBHOOK_PATH
from tests.api.support import API_KEYS, Api, auth
from tests.security.routes import every_route, operation_scopes

#: Served without an API key, on purpose.
PUBLIC_ROUTES = frozenset(
    {
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/oauth2-redirect"),
        # Operations: up or down, and Prometheus figures (scraped from a private network).
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    }
)
#: The dashboard's pages take its session cookie instead of an API key: without one, every
#: page redirects to the sign-in form (its own tests check the cookie and CSRF token).
DASHBOARD_SIGN_IN = frozenset({("GET", "/dashboard/login"), ("POST", "/dashboard/login")})
#: Authenticated by the Stripe signature instead of an API key.
SIGNATURE_ROUTES = frozenset({("POST", WEBHOOK_PATH)})


def _concrete(path: str) -> str:
    return path.replace("{id}", "sub_unknown" if "subscriptions" in path else "in_unknown")


async def protection_problems(app: FastAPI, client: httpx.AsyncClient) -> list[str]:
    """What is wrong with the protection of ``app``'s routes (empty when all is well)."""
    problems: list[str] = []
    scopes = operation_scopes(app.openapi())
    served = {
        (method, route.path)
        for route in every_route(app)
        for method in route.methods
        if method != "HEAD"  # answered by the GET route
    }
    dashboard = {(m, p) for m, p in served if p.startswith("/dashboard")} - DASHBOARD_SIGN_IN
    for method, path in sorted(dashboard):
        url = path.replace("{id}", "in_unknown")
        response = await client.request(method, url)
        if response.status_code != 303 or response.headers.get("location") != "/dashboard/login":
            problems.append(f"dashboard {method} {path} without a session: {response.status_code}")
    for method, path in sorted(
        served - set(scopes) - PUBLIC_ROUTES - dashboard - DASHBOARD_SIGN_IN
    ):
        problems.append(f"{method} {path} is served but not in the OpenAPI document")
    for method, path in sorted(served & PUBLIC_ROUTES):
        response = await client.request(method, path)
        if response.status_code != 200:
            problems.append(f"public {method} {path} answered {response.status_code}")

    for (method, path), allowed in sorted(scopes.items()):
        if (method, path) in PUBLIC_ROUTES:
            continue
        url = _concrete(path)
        body: dict[str, Any] = {"json": {}} if method == "POST" else {}
        if (method, path) in SIGNATURE_ROUTES:
            unsigned = await client.request(method, url, **body)
            if unsigned.status_code != 400 or "signature" not in unsigned.text.lower():
                problems.append(f"{method} {path} took an unsigned call: {unsigned.status_code}")
            for scope in KNOWN_SCOPES:  # an API key is no substitute for the signature
                keyed = await client.request(method, url, headers=auth(scope), **body)
                if keyed.status_code != 400:
                    problems.append(f"{method} {path} took a '{scope}' key without signature")
            continue
        if not allowed:
            problems.append(f"{method} {path} declares no API-key scope")
            continue
        missing = await client.request(method, url, **body)
        if missing.status_code != 401:
            problems.append(f"{method} {path} without a key answered {missing.status_code}")
        unknown = await client.request(
            method, url, headers={"Authorization": "Bearer not-a-key-0123456789abcd"}, **body
        )
        if unknown.status_code != 401:
            problems.append(f"{method} {path} with an unknown key answered {unknown.status_code}")
        for scope in KNOWN_SCOPES:
            response = await client.request(method, url, headers=auth(scope), **body)
            if scope in allowed and response.status_code in (401, 403):
                problems.append(f"{method} {path} refused its own scope '{scope}'")
            if scope not in allowed and response.status_code != 403:
                problems.append(
                    f"{method} {path} answered {response.status_code} to scope '{scope}'"
                )
        if set(allowed) == set(KNOWN_SCOPES):
            problems.append(f"{method} {path} takes every scope: no wrong scope to refuse")
    return problems


async def test_every_route_refuses_no_key_and_the_wrong_scope(api: Api) -> None:
    await api.harness.now()
    app = api.http._transport.app  # type: ignore[attr-defined]
    assert await protection_problems(app, api.http) == []
    # The walk saw the routes that matter (it is not vacuous).
    scopes = operation_scopes(app.openapi())
    assert {("POST", "/v1/subscriptions"), ("GET", "/v1/invoices.csv")} <= set(scopes)
    assert all(len(API_KEYS[s]) >= 24 for s in KNOWN_SCOPES)


async def test_the_walk_reports_a_route_left_unprotected(api: Api) -> None:
    """The check above can fail: a route without a scope, and one hidden from the document,
    are both reported."""
    app = api.http._transport.app  # type: ignore[attr-defined]
    careless = APIRouter()

    @careless.get("/v1/forgotten")
    async def forgotten() -> dict[str, str]:
        return {"secret": "data"}

    @careless.get("/v1/hidden", include_in_schema=False)
    async def hidden() -> dict[str, str]:
        return {"secret": "data"}

    app.include_router(careless)
    app.openapi_schema = None  # rebuilt with the new routes
    problems = await protection_problems(app, api.http)
    assert "GET /v1/forgotten declares no API-key scope" in problems
    assert "GET /v1/hidden is served but not in the OpenAPI document" in problems
