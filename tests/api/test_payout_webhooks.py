"""Payouts learnt from Stripe's webhooks: localstripe (with the settlement double) makes an
automatic payout and delivers ``payout.*`` over HTTP to the webhook router on a real server,
which starts ``PayoutImportWorkflow``; finance then reads the payout reconciled through the
API. Its own module, so its localstripe holds no other test's balance to pay out."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from billing.api import create_app
from billing.settlement import payout_import_workflow_id
from billing.testing.localstripe_settlement import stripe_fee
from db.engine import unit_of_work
from db.repositories import ledger as ledger_repo
from tests.api.support import api_settings, auth
from tests.api.test_settlement_webhooks import paid_payment, refunds_of
from tests.api.webhook_fixtures import (
    WebhookStack,
    localstripe_fixture,  # noqa: F401  (a fixture, registered under its short name)
    wait_until,
    webhook_harness_fixture,  # noqa: F401  (a fixture, registered under its short name)
    webhook_stack_fixture,  # noqa: F401  (a fixture, registered under its short name)
)
from tests.conftest import BOTH_BACKENDS, record_workflow_history


@BOTH_BACKENDS
async def test_a_payout_webhook_imports_it_in_its_workflow_and_finance_reads_it_reconciled(
    request: pytest.FixtureRequest, webhook_stack: WebhookStack
) -> None:
    stack = webhook_stack
    harness = stack.harness
    invoice_id, charge_id = await paid_payment(harness)
    harness.stripe.v1.refunds.create(params={"charge": charge_id, "amount": 200})
    await wait_until(lambda: refunds_of(harness, invoice_id), timeout=15, what="refund recorded")

    [payout] = stack.stripe_post("/_config/settlement/payouts/run", {})["data"]

    def imported() -> Any:
        with unit_of_work(harness.session_factory) as session:
            found = ledger_repo.get_payout(session, payout["id"])
            return found if found is not None and found.imported_at is not None else None

    stored = await wait_until(imported, timeout=20, what="the payout imported")
    assert (stored.amount_minor, stored.currency, stored.status) == (
        payout["amount"],
        "USD",
        "paid",
    )

    settings = api_settings(harness)
    app = create_app(settings, deps=harness.deps, temporal=harness.client)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as client:
        finance = auth("finance")
        listed = await client.get("/v1/payouts", headers=finance)
        assert [p["stripe_payout_id"] for p in listed.json()["data"]] == [payout["id"]]
        report = await client.get(f"/v1/payouts/{payout['id']}/reconciliation", headers=finance)
        body = report.json()
        assert (body["differences"], body["matched"]) == (0, 2), body
        assert body["fee_minor"] == stripe_fee(900)
        assert body["net_minor"] == body["amount_minor"] == 900 - 200 - stripe_fee(900)
        # Until far ahead: localstripe stamps the payout with the real time, the harness's
        # clock is the time-skipping server's.
        until = {"until": "2100-01-01T00:00:00Z"}
        exported = await client.get("/v1/reconciliation.csv", headers=finance, params=until)
        assert exported.status_code == 200
        assert f"{payout['id']},USD" in exported.text and "reconciled" in exported.text
        period = await client.get(
            "/v1/reconciliation", headers=finance, params={"expected_delay_days": 0, **until}
        )
        assert period.json()["differences"] == 0
        # The business heard of it on the account's stream: paid, then reconciled, once
        # (payout.created and payout.paid both started the import).
        account = await client.get("/v1/events", headers=finance, params={"stream": "account"})
        shown = [
            (e["type"], e["subscription_id"], e["stream"], e["data"]["object"]["stripe_payout_id"])
            for e in account.json()["data"]
        ]
        assert shown == [
            ("payout.paid", None, "account", payout["id"]),
            ("payout.reconciliation_completed", None, "account", payout["id"]),
        ]
        assert [e["sequence"] for e in account.json()["data"]] == [1, 2]
        assert account.json()["data"][1]["data"]["object"]["differences"] == 0
        for path, params in (
            ("/v1/reconciliation", {"since": "yesterday"}),
            ("/v1/reconciliation", {"colour": "red"}),
            ("/v1/payouts", {"limit": 0}),
            ("/v1/reconciliation/findings", {"severity": "fatal"}),
        ):
            refused = await client.get(path, headers=finance, params=params)
            assert refused.status_code == 422, (path, refused.text)
        missing = await client.get("/v1/payouts/po_missing/reconciliation", headers=finance)
        assert missing.status_code == 404
        assert (await client.get("/v1/payouts", headers=auth("signup"))).status_code == 403
    await record_workflow_history(
        harness.client, payout_import_workflow_id(payout["id"]), request.node.name
    )
