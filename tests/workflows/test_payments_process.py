"""The payments worker in processes of its own (``BillingHarness(payments_processes=N)``, used
by simulations of several subscriptions): charges happen there, and a process that dies stops
the wait with its reason instead of letting the run hang."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from billing.invoices import InvoiceStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from billing.testing.payments_process import PaymentsProcess
from tests.conftest import BOTH_BACKENDS

PAYMENT_INTENTS = "/v1/payment_intents"


def with_one_process(
    temporal_env: Any, localstripe: LocalStripe, database_url: str
) -> BillingHarness:
    return BillingHarness(
        temporal_env,
        database_url=database_url,
        stripe_api_base=localstripe.url,
        payments_processes=1,
    )


@BOTH_BACKENDS
async def test_charges_run_in_the_payments_worker_process(
    temporal_env: Any, localstripe: LocalStripe, database_url: str
) -> None:
    async with with_one_process(temporal_env, localstripe, database_url) as h:
        [pid] = h.payments_process_ids
        assert pid != os.getpid()
        signup = await h.signup("basic-monthly", card=SUCCEEDS)
        await h.wait_for(
            signup.subscription_id, lambda v: v.invoices_issued == 1 and not v.open_invoice
        )
        snapshot = h.snapshot(signup.subscription_id)
        [invoice] = snapshot.invoices
        assert invoice.status == InvoiceStatus.PAID
        [payment] = snapshot.payments[invoice.id]
        assert (payment.amount_minor, payment.currency) == (900, "USD")
        # The provider took the money once, and not from this process's Stripe client.
        [charge] = h.provider_charges(signup.subscription_id)
        assert (charge["amount"], charge["status"]) == (900, "succeeded")
        assert h.http_client.requests_to(PAYMENT_INTENTS) == []
    assert h.payments_process_ids == []  # stopped with the harness


async def test_a_payments_process_that_dies_stops_the_wait_with_its_reason(
    temporal_env: Any, localstripe: LocalStripe, database_url: str
) -> None:
    async with with_one_process(temporal_env, localstripe, database_url) as h:
        [pid] = h.payments_process_ids
        os.kill(pid, signal.SIGKILL)
        signup = await h.signup("basic-monthly", card=SUCCEEDS)
        with pytest.raises(RuntimeError, match="payments worker process exited with code -9"):
            await h.wait_until_at_rest([signup.subscription_id], timeout=30)
        assert h.snapshot(signup.subscription_id).payments == {
            i.id: [] for i in h.snapshot(signup.subscription_id).invoices
        }


def test_a_wrapped_gateway_needs_the_in_process_payments_worker(
    temporal_env: Any, localstripe: LocalStripe, database_url: str
) -> None:
    with pytest.raises(ValueError, match="wrap_gateway and charge_rate_per_s"):
        BillingHarness(
            temporal_env,
            database_url=database_url,
            stripe_api_base=localstripe.url,
            payments_processes=1,
            charge_rate_per_s=10,
        )


async def test_a_payments_process_that_cannot_start_says_why(database_url: str) -> None:
    process = PaymentsProcess(
        target="127.0.0.1:1",  # nothing listens there
        namespace="default",
        task_queue="unused",
        database_url=database_url,
        stripe_api_base="http://127.0.0.1:1",
    )
    with pytest.raises(RuntimeError, match=r"did not start: (?s:.*)127\.0\.0\.1:1"):
        await process.start()
    assert process.pid is None
