"""The provider's side of a simulation, beyond what localstripe does by itself.

- ``BankReports`` and ``ReportingGateway``: a card the bank reports stolen or lost. localstripe
  (1.15) knows Stripe's stolen and lost test cards (…9979, …9987) only as cards it refuses at
  *attach*, and never answers a charge with a ``decline_code``. A card that was fine when it
  was saved and is reported stolen later (the case that blocks an invoice) is therefore made
  of the closest real parts: the card on file becomes one that localstripe declines on every
  charge (…0341), and this wrapper reports those declines with the bank's decline code, as
  real Stripe does (``card_declined`` / ``stolen_card``). Everything else is the real gateway.
- ``WebhookEndpoint``: the product's own webhook endpoint (``billing.api.webhooks``: signature
  check, claim of the event id, routing, signals), mounted in-process, to which the
  simulation delivers the provider's real events (read back from localstripe's event list)
  at the simulated instant it chooses: on time, late, twice, or out of order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import stripe
from fastapi import FastAPI
from pydantic import SecretStr
from temporalio.client import Client

from billing.api.webhooks import WEBHOOK_PATH, webhook_router
from billing.payments import ChargeOutcome, ChargeOutcomeKind, PaymentGateway, classify_decline
from billing.settings import Settings
from billing.worker import Dependencies

__all__ = ["BankReports", "ReportingGateway", "WebhookEndpoint", "find_event"]

#: The signing secret of the simulation's in-process webhook endpoint (never leaves it).
SIMULATION_WEBHOOK_SECRET = "whsec_simulation_only"


@dataclass
class BankReports:
    """Payment methods the bank has reported, with the decline code it now answers."""

    codes: dict[str, str] = field(default_factory=dict)
    #: A code for every card's declines (tests where the bank reports whatever is on file).
    every_card: str | None = None


@dataclass
class ReportingGateway:
    """The real gateway, except that a soft decline of a reported card comes back as the
    bank's hard decline (see the module's docstring for why localstripe cannot say it)."""

    inner: PaymentGateway
    reports: BankReports

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def charge(self, **kwargs: Any) -> ChargeOutcome:
        return self._reported(self.inner.charge(**kwargs), kwargs)

    def confirm_payment_intent(self, **kwargs: Any) -> ChargeOutcome:
        # Every attempt after an invoice's first confirms its PaymentIntent again.
        return self._reported(self.inner.confirm_payment_intent(**kwargs), kwargs)

    def _reported(self, outcome: ChargeOutcome, kwargs: dict[str, Any]) -> ChargeOutcome:
        code = self.reports.codes.get(str(kwargs.get("payment_method_id")))
        if self.reports.every_card is not None:
            code = self.reports.every_card
        if code is None or outcome.kind != ChargeOutcomeKind.SOFT_DECLINE:
            return outcome
        return dataclasses.replace(
            outcome,
            kind=classify_decline("card_declined", code),
            decline_code=code,
            failure_message=f"Your card was declined ({code}).",
        )


def find_event(
    client: stripe.StripeClient,
    event_type: str,
    object_id: str,
    *,
    skip: set[str],
    match: Callable[[dict[str, Any]], bool] = lambda obj: True,
) -> dict[str, Any] | None:
    """The newest event of ``event_type`` about ``object_id`` (whose object also passes
    ``match``) that is not in ``skip``, as the provider would send it (a plain dict), from
    localstripe's event list."""
    found: dict[str, Any] | None = None
    params: dict[str, Any] = {"type": event_type, "limit": 100}
    while True:
        page = client.v1.events.list(params=params)  # type: ignore[arg-type]
        for event in page.data:
            data = event.to_dict()
            obj = data.get("data", {}).get("object", {})
            wanted = obj.get("id") == object_id and data["id"] not in skip and match(obj)
            if wanted and (found is None or int(data["created"]) >= int(found["created"])):
                found = data
        if not page.has_more or not page.data:
            return found
        params["starting_after"] = page.data[-1].id


class WebhookEndpoint:
    """``POST /v1/webhooks/stripe`` of the product, in-process, on the harness's database and
    Temporal client. ``deliver`` signs an event as Stripe does and posts it."""

    def __init__(self, deps: Dependencies, temporal: Client) -> None:
        app = FastAPI()
        app.state.settings = Settings(
            _env_file=None,
            environment="test",
            stripe_webhook_secret=SecretStr(SIMULATION_WEBHOOK_SECRET),
        )
        app.state.deps = deps
        app.state.temporal = temporal
        app.include_router(webhook_router())
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://simulation"
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def deliver(self, event: dict[str, Any], created: datetime) -> str:
        """Deliver ``event`` stamped ``created`` (the simulated instant the provider created
        it: the endpoint orders card news by it). Returns the endpoint's verdict: its
        ``outcome`` (routed, ignored, ...), ``duplicate``, or the error it answered."""
        body = json.dumps({**event, "created": int(created.timestamp())}).encode()
        # The signature's timestamp is checked against the real clock, as Stripe's is.
        timestamp = int(time.time())
        mac = hmac.new(
            SIMULATION_WEBHOOK_SECRET.encode(), b"%d." % timestamp + body, hashlib.sha256
        )
        response = await self._client.post(
            WEBHOOK_PATH,
            content=body,
            headers={
                "Content-Type": "application/json",
                "Stripe-Signature": f"t={timestamp},v1={mac.hexdigest()}",
            },
        )
        answer = response.json()
        if response.status_code != 200:
            error = answer.get("error", {})
            return f"answered {response.status_code} ({error.get('type', 'error')})"
        if answer.get("duplicate"):
            return "duplicate"
        return str(answer.get("outcome"))
