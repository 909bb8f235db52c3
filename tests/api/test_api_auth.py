"""API keys and scopes on every endpoint, and the error shape for what no route handles."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import SecretStr

from billing.api.auth import KeyRing
from billing.settings import ApiKey
from tests.api.support import API_KEYS, Api

SCOPES = ("signup", "finance", "admin")
READ = frozenset({"finance", "admin"})

# (method, path, JSON body or None, scopes that may call it)
ENDPOINTS: list[Any] = [
    pytest.param("POST", "/v1/subscriptions", {"plan": "no-such-plan"}, {"signup"}, id="signup"),
    pytest.param("POST", "/v1/subscriptions/sub_unknown/cancel", {}, {"admin"}, id="cancel"),
    pytest.param("POST", "/v1/subscriptions/sub_unknown/pause", None, {"admin"}, id="pause"),
    pytest.param("POST", "/v1/subscriptions/sub_unknown/resume", None, {"admin"}, id="resume"),
    pytest.param(
        "POST",
        "/v1/subscriptions/sub_unknown/payment-method",
        {"payment_method_id": "pm_unknown"},
        {"admin"},
        id="payment-method",
    ),
    pytest.param("GET", "/v1/subscriptions/sub_unknown", None, READ, id="subscription"),
    pytest.param("GET", "/v1/invoices", None, READ, id="invoices"),
    pytest.param("GET", "/v1/invoices.csv", None, READ, id="invoices-csv"),
    pytest.param("GET", "/v1/invoices/in_unknown", None, READ, id="invoice"),
]


@pytest.mark.parametrize(("method", "path", "body", "allowed"), ENDPOINTS)
async def test_every_endpoint_needs_a_key_with_its_scope(
    api: Api, method: str, path: str, body: dict[str, Any] | None, allowed: set[str]
) -> None:
    kwargs: dict[str, Any] = {} if body is None else {"json": body}

    missing = await api.request(method, path, **kwargs)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "unauthenticated"
    assert "missing API key" in missing.json()["error"]["message"]

    for scope in SCOPES:
        response = await api.request(method, path, scope=scope, **kwargs)
        if scope in allowed:
            assert response.status_code not in (401, 403), (scope, response.text)
        else:
            assert response.status_code == 403, (scope, response.text)
            needed = " or ".join(f"'{s}'" for s in sorted(allowed, key=SCOPES.index))
            assert response.json()["error"] == {
                "type": "forbidden",
                "message": f"API key '{scope}-key' has scope '{scope}'; this endpoint needs "
                f"scope {needed}",
                "field": None,
            }

    # The same key in X-API-Key works too.
    scope = sorted(allowed)[0]
    by_header = await api.request(method, path, headers={"X-API-Key": API_KEYS[scope]}, **kwargs)
    assert by_header.status_code not in (401, 403)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Authorization": "Bearer not-a-configured-key"}, "API key not recognized"),
        ({"X-API-Key": "not-a-configured-key"}, "API key not recognized"),
        ({"Authorization": f"Basic {API_KEYS['finance']}"}, "must be 'Bearer <key>'"),
        ({"Authorization": "Bearer "}, "must be 'Bearer <key>'"),
        # One character short of a real key.
        ({"Authorization": f"Bearer {API_KEYS['finance'][:-1]}"}, "API key not recognized"),
    ],
)
async def test_unknown_or_malformed_keys_are_401(
    api: Api, headers: dict[str, str], message: str
) -> None:
    response = await api.request("GET", "/v1/invoices", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert message in response.json()["error"]["message"]


async def test_the_key_is_checked_before_the_body_is_judged(api: Api) -> None:
    garbage: dict[str, Any] = {
        "content": b"{not json",
        "headers": {"Content-Type": "application/json"},
    }
    assert (await api.request("POST", "/v1/subscriptions", **garbage)).status_code == 401
    wrong = await api.request("POST", "/v1/subscriptions", scope="finance", **garbage)
    assert wrong.status_code == 403
    right = await api.request("POST", "/v1/subscriptions", scope="signup", **garbage)
    assert right.status_code == 400
    assert right.json()["error"]["message"].startswith("malformed JSON: ")


def test_the_key_ring_finds_each_key_and_only_exact_matches() -> None:
    ring = KeyRing(
        [
            ApiKey(name="a", scope="finance", key=SecretStr("k" * 24)),
            ApiKey(name="b", scope="admin", key=SecretStr("k" * 25)),
        ]
    )
    first, second = ring.find("k" * 24), ring.find("k" * 25)
    assert first is not None and first.name == "a"
    assert second is not None and second.name == "b"
    assert ring.find("k" * 23) is None
    assert ring.find("") is None


async def test_unknown_routes_and_methods_answer_in_the_error_shape(api: Api) -> None:
    response = await api.request("GET", "/v1/nothing-here", scope="finance")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "type": "not_found",
            "message": "no such endpoint: GET /v1/nothing-here; see /docs for the API",
            "field": None,
        }
    }
    response = await api.request("DELETE", "/v1/invoices", scope="finance")
    assert response.status_code == 405
    assert response.json()["error"]["message"] == "DELETE is not allowed on /v1/invoices; use GET"


async def test_an_unexpected_error_is_a_500_without_details_and_is_logged(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A real part cannot be made to have a bug on demand: this one is made to raise.
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals: password=hunter2")

    monkeypatch.setattr("db.repositories.finance.list_invoices", broken)
    with caplog.at_level(logging.ERROR, logger="billing.api"):
        response = await api.request("GET", "/v1/invoices", scope="finance")

    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_error"
    assert error["message"].startswith("internal error (reference ")
    assert "hunter2" not in response.text and "Traceback" not in response.text
    reference = error["message"].split("reference ")[1].split(")")[0]
    logged = [r for r in caplog.records if reference in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert "hunter2" in str(logged[0].exc_info[1])


async def test_openapi_docs_are_served(api: Api) -> None:
    docs = await api.request("GET", "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = (await api.request("GET", "/openapi.json")).json()
    assert {"/v1/subscriptions", "/v1/invoices", "/v1/invoices.csv"} <= set(schema["paths"])
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
