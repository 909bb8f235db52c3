"""Helpers for the API tests: keys, settings, an HTTP client bound to the harness, and
database/Temporal checks."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr
from sqlalchemy import func, select
from temporalio.service import RPCError, RPCStatusCode

from billing.contracts import workflow_id_for
from billing.payments import AttachedPaymentMethod, PaymentGateway
from billing.settings import ApiKey, Settings
from billing.testing.harness import BillingHarness
from db import models

#: One key per scope (24+ characters, as production requires).
API_KEYS: dict[str, str] = {
    "signup": "test-signup-key-0123456789abcdef",
    "finance": "test-finance-key-0123456789abcdef",
    "admin": "test-admin-key-0123456789abcdef",
}
MAX_BODY_BYTES = 4096


def auth(scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[scope]}"}


def api_settings(harness: BillingHarness) -> Settings:
    return Settings(
        _env_file=None,
        environment="test",
        database_url=harness.database_url,
        task_queue=harness.task_queue,
        api_keys=[
            ApiKey(name=f"{scope}-key", scope=scope, key=SecretStr(key))
            for scope, key in API_KEYS.items()
        ],
        api_max_body_bytes=MAX_BODY_BYTES,
    )


@dataclass
class Api:
    """An HTTP client on the app plus the harness behind it."""

    http: httpx.AsyncClient
    harness: BillingHarness

    async def request(
        self, method: str, path: str, *, scope: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if scope is not None:
            headers.update(auth(scope))
        # Signup and changes read "now" from the harness clock: move it to the server's time.
        await self.harness.now()
        return await self.http.request(method, path, headers=headers, **kwargs)

    async def signup(
        self,
        plan: str = "basic-monthly",
        *,
        card: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> httpx.Response:
        body: dict[str, Any] = {"plan": plan, **fields}
        if card is not None:
            body["payment_method_id"] = await self.harness.to_thread_card(card)
        body.setdefault("customer", {"email": "pat@example.com", "timezone": "UTC"})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = await self.request(
            "POST", "/v1/subscriptions", scope="signup", json=body, headers=headers
        )
        if response.status_code in (200, 201):
            sub_id = response.json()["id"]
            if sub_id not in self.harness.started_subscription_ids:
                # So the harness terminates its workflow when the test ends.
                self.harness.started_subscription_ids.append(sub_id)
        return response

    async def signed_up(self, plan: str = "basic-monthly", **kwargs: Any) -> dict[str, Any]:
        response = await self.signup(plan, **kwargs)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


def row_counts(harness: BillingHarness) -> dict[str, int]:
    with harness.session_factory() as session:
        return {
            table.__tablename__: session.scalar(select(func.count()).select_from(table)) or 0
            for table in (
                models.CustomerRow,
                models.SubscriptionRow,
                models.InvoiceRow,
                models.PaymentAttemptRow,
                models.PaymentRow,
            )
        }


async def workflow_exists(harness: BillingHarness, subscription_id: str) -> bool:
    try:
        await harness.client.get_workflow_handle(workflow_id_for(subscription_id)).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def eventually(check: Callable[[], object], *, timeout: float = 20.0) -> None:
    """Poll ``check()`` (sync, truthy when done) in real time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s")
        await asyncio.sleep(0.05)


@dataclasses.dataclass
class SlowToAttach:
    """The real gateway, except that attaching a card waits (once ``slow`` is set) until
    ``release`` is: a provider that answers slowly, which localstripe cannot be made to be."""

    inner: PaymentGateway
    slow: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def wrap(self, inner: PaymentGateway) -> PaymentGateway:
        """The harness's ``wrap_gateway``: this, around the real gateway."""
        self.inner = inner
        return self  # type: ignore[return-value]

    #: The cards asked to be attached, in order (whether or not slowed).
    attached: list[str] = dataclasses.field(default_factory=list)

    def attach_payment_method(
        self, *, provider_customer_id: str, payment_method_id: str
    ) -> AttachedPaymentMethod:
        self.attached.append(payment_method_id)
        if self.slow.is_set():
            self.release.wait(timeout=30)
        return self.inner.attach_payment_method(
            provider_customer_id=provider_customer_id, payment_method_id=payment_method_id
        )
