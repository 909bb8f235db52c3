"""Fuzzing the HTTP API from its own OpenAPI document with schemathesis.

The real app (``create_app`` with the Stripe webhook router, as ``billing api`` serves it) runs
under uvicorn on a free port, on a BillingHarness: the real worker on the time-skipping
server, localstripe and a real database. schemathesis generates requests for every operation
in ``/openapi.json`` (valid ones, and invalid ones that must be refused with a 4xx), sends
them with a key of the scope the route needs, and checks each answer:

* no 5xx (``not_a_server_error``);
* the status code, content type, headers and body are the ones the document declares;
* invalid input is refused, valid input is not refused as invalid;
* the route refuses the request without its API key (``ignored_auth``).

The CI budget is fixed and derandomized, so a run is repeatable: ``FUZZ_EXAMPLES`` examples
per operation and generation mode. ``BILLING_FUZZ_EXAMPLES=500`` runs a longer search (the
figures in the report come from such a run); ``BILLING_FUZZ_SEED`` picks another seed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, seed, settings
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from billing.api import create_app
from billing.api.webhooks import WEBHOOK_PATH, webhook_router
from billing.testing.cards import DECLINES_AFTER_ATTACH, SUCCEEDS
from billing.testing.harness import BillingHarness
from tests.api.support import API_KEYS, api_settings
from tests.api.webhook_fixtures import WEBHOOK_SECRET, WebhookServer
from tests.security.routes import operation_scopes

#: Examples per operation and generation mode in the CI run (about a minute in all).
FUZZ_EXAMPLES = int(os.environ.get("BILLING_FUZZ_EXAMPLES", "25"))
FUZZ_SEED = int(os.environ.get("BILLING_FUZZ_SEED", "20250131"))

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    ignored_auth,
]


@dataclass
class Served:
    app: FastAPI
    server: WebhookServer
    harness: BillingHarness


@pytest.fixture
def served(harness: BillingHarness) -> Iterator[Served]:
    settings_ = api_settings(harness).model_copy(
        update={"stripe_webhook_secret": SecretStr(WEBHOOK_SECRET)}
    )
    app = create_app(
        settings_,
        deps=harness.deps,
        temporal=harness.client,
        include_routers=[webhook_router()],
    )
    with WebhookServer(app) as server:
        yield Served(app, server, harness)


class StripeSigner(requests.auth.AuthBase):
    """Signs each request's exact bytes as Stripe does (the webhook's credential), including
    bodies that are not UTF-8, which the endpoint must then refuse."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        payload = body if isinstance(body, bytes) else body.encode()
        timestamp = int(time.time())
        mac = hmac.new(WEBHOOK_SECRET.encode(), b"%d." % timestamp + payload, hashlib.sha256)
        request.headers["Stripe-Signature"] = f"t={timestamp},v1={mac.hexdigest()}"
        return request


def key_for(
    scopes: dict[tuple[str, str], tuple[str, ...]], method: str, path: str
) -> dict[str, str]:
    """The Authorization header of a key with the scope the operation documents."""
    allowed = scopes.get((method.upper(), path), ())
    return {"Authorization": f"Bearer {API_KEYS[allowed[0]]}"} if allowed else {}


#: Statuses a schema-valid request may still get, per operation, beyond schemathesis's
#: defaults (2xx, 401, 403, 404, 409, 429, 5xx) for ``positive_data_acceptance``. Each is a
#: rule no JSON Schema can state, so the check stays on for everything else:
ACCEPTABLE_REFUSALS: dict[tuple[str, str], tuple[int, ...]] = {
    # The plan catalog, the IANA zones and CLDR's locales live in the database, tzdata and
    # babel, and the card is judged by the provider (402); the message names the field.
    ("POST", "/v1/subscriptions"): (402, 422),
    # A card the provider refuses.
    ("POST", "/v1/subscriptions/{id}/payment-method"): (402,),
    # A locale with a BCP 47 tag's shape that CLDR has no data for (billing.locales).
    ("PUT", "/v1/customers/{id}/mail-preferences"): (422,),
    # ``*_from`` after ``*_to``, and 3-letter codes that are not ISO 4217 currencies.
    ("GET", "/v1/invoices"): (422,),
    ("GET", "/v1/invoices.csv"): (422,),
    # Reports: ``from`` after ``to``, more than 120 months, codes that are not currencies.
    **{
        ("GET", f"/v1/reports/{name}"): (422,)
        for name in (
            "mrr",
            "mrr.csv",
            "dunning",
            "dunning.csv",
            "collections",
            "collections.csv",
            "ar-aging",
            "ar-aging.csv",
        )
    },
    # An event endpoint's URL must be https (outside dev) on a host that resolves to public
    # addresses only: a DNS answer, which no schema can state. (Its event types are an enum.)
    ("POST", "/v1/event-endpoints"): (422,),
    ("PATCH", "/v1/event-endpoints/{id}"): (422,),
    # Readiness answers 503 while a dependency is down (documented; not a server error).
    ("GET", "/readyz"): (503,),
}


#: Statuses that refuse invalid data, for ``negative_data_rejection``: schemathesis's
#: defaults plus 413, since a generated body over the size limit is refused before it is
#: read (a correct refusal, not acceptance).
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


def fuzz_config() -> schemathesis.Config:
    default = ["2xx", "401", "403", "404", "409", "429", "5xx"]
    return schemathesis.Config.from_dict(
        {
            "checks": {"negative_data_rejection": {"expected-statuses": [*REJECTIONS, "5xx"]}},
            "operations": [
                {
                    "include-path": path,
                    "include-method": method,
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": default + [str(code) for code in extra]
                        }
                    },
                }
                for (method, path), extra in ACCEPTABLE_REFUSALS.items()
            ],
        }
    )


@dataclass
class FuzzRun:
    base_url: str
    tally: Counter[str]
    failures: list[str]

    def operation(self, operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
        """Up to FUZZ_EXAMPLES generated cases for one operation in one mode."""
        session = requests.Session()
        if operation.path == WEBHOOK_PATH:
            session.auth = StripeSigner()

        @seed(FUZZ_SEED)
        @settings(
            max_examples=FUZZ_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            response = case.call(base_url=self.base_url, session=session, headers=headers)
            self.tally[f"{operation.label} [{mode.value}]"] += 1
            self.tally[f"status {response.status_code}"] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)

        try:
            run()
        except (Exception, BaseExceptionGroup) as error:
            self.failures.append(f"{operation.label} ({mode.value}): {error}")


async def check_real_records(
    schema: Any,
    scopes: dict[tuple[str, str], tuple[str, ...]],
    served: Served,
    active_id: str,
    past_due: Any,
) -> None:
    """Generated ids rarely exist, so the answers about real records (200, 201, 409) are
    checked here, against the same document and checks."""
    harness = served.harness
    invoice_id = harness.snapshot(active_id).invoices[0].id
    new_card = await harness.to_thread_card(SUCCEEDS)
    signup_card = await harness.to_thread_card(SUCCEEDS)
    conformance = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    signup = {
        "plan": "basic-monthly",
        "payment_method_id": signup_card,
        "customer": {"email": "fuzz@example.com", "timezone": "Europe/Paris"},
    }
    calls: list[tuple[str, str, dict[str, Any], Any, dict[str, str], int]] = [
        ("GET", "/v1/subscriptions/{id}", {"id": active_id}, None, {}, 200),
        ("GET", "/v1/invoices", {}, None, {}, 200),
        ("GET", "/v1/invoices.csv", {}, None, {}, 200),
        ("GET", "/v1/invoices/{id}", {"id": invoice_id}, None, {}, 200),
        ("POST", "/v1/subscriptions", {}, signup, {"Idempotency-Key": "fuzz-1"}, 201),
        ("POST", "/v1/subscriptions", {}, signup, {"Idempotency-Key": "fuzz-1"}, 200),
        (
            "POST",
            "/v1/subscriptions/{id}/payment-method",
            {"id": past_due.subscription_id},
            {"payment_method_id": new_card},
            {},
            200,
        ),
        ("POST", "/v1/subscriptions/{id}/pause", {"id": active_id}, {}, {}, 200),
        ("POST", "/v1/subscriptions/{id}/pause", {"id": active_id}, {}, {}, 409),
        ("POST", "/v1/subscriptions/{id}/resume", {"id": active_id}, {}, {}, 200),
        ("POST", "/v1/subscriptions/{id}/cancel", {"id": active_id}, {}, {}, 200),
        ("POST", "/v1/subscriptions/{id}/cancel", {"id": active_id}, {}, {}, 409),
    ]
    for method, path, path_parameters, body, extra_headers, expected in calls:
        operation = schema[path][method]
        case = operation.Case(
            path_parameters=path_parameters or None,
            body=body if body is not None else schemathesis.core.NOT_SET,
            headers=extra_headers or None,
        )
        headers = key_for(scopes, method, path)
        await harness.now()
        response = await asyncio.to_thread(case.call, base_url=served.server.url, headers=headers)
        assert response.status_code == expected, (method, path, response.text)
        case.validate_response(response, checks=conformance, headers=headers)
        if method == "POST" and path == "/v1/subscriptions" and expected == 201:
            await harness.track(response.json()["id"])


async def test_fuzzing_the_openapi_document_finds_no_server_error_or_schema_violation(
    served: Served,
) -> None:
    app, harness = served.app, served.harness
    # Some real records, so reads and changes also answer 200s the document must describe.
    active = await harness.signup("basic-monthly", card=SUCCEEDS)
    past_due = await harness.signup("basic-monthly", card=DECLINES_AFTER_ATTACH)
    await harness.wait_for(active.subscription_id, lambda v: v.invoices_issued == 1)
    await harness.wait_for(past_due.subscription_id, lambda v: v.open_invoice is not None)

    document = app.openapi()
    schema = schemathesis.openapi.from_dict(document, config=fuzz_config())
    scopes = operation_scopes(document)
    fuzz = FuzzRun(served.server.url, Counter(), [])

    def run_all() -> None:
        for result in schema.get_all_operations():
            operation = result.ok()
            headers = key_for(scopes, operation.method, operation.path)
            # An operation without parameters or body (/healthz) has no invalid request.
            takes_input = (
                bool(document["paths"][operation.path][operation.method.lower()].get("parameters"))
                or "requestBody" in document["paths"][operation.path][operation.method.lower()]
            )
            modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if takes_input else [])
            for mode in modes:
                fuzz.operation(operation, mode, headers)

    await asyncio.to_thread(run_all)
    await check_real_records(schema, scopes, served, active.subscription_id, past_due)
    cases = sum(n for key, n in fuzz.tally.items() if not key.startswith("status"))
    print(f"\nschemathesis: {cases} cases; {dict(sorted(fuzz.tally.items()))}")
    assert not fuzz.failures, "\n\n".join(fuzz.failures)
