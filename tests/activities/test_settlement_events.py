# The `stack` fixture is imported from the charge tests, and so is redefined by every use.
# ruff: noqa: F811
"""Events for the business about credit notes, refunds, disputes and payouts, written by the
real activities and webhook recorder on a real database (SQLite and PostgreSQL), the real
Stripe SDK on localstripe with the settlement double, and a frozen clock.

Each event is checked for its type, its object (as the API shows it), its stream and its
sequence, and for being written once: retried activities, repeated, stale and concurrent
reports of the same state write nothing more. Dispute moves localstripe cannot make
(``under_review``, a dispute of a charge that is not ours) are played by a reader that answers
as Stripe's ``GET /v1/disputes/{id}`` would."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from activities import event_log
from activities.ledger import LedgerActivities
from activities.settlement import SettlementActivities
from billing.api.settlement_webhooks import record_settlement_event
from billing.business_events import ACCOUNT_STREAM
from billing.credit_notes import CreditNoteRequest, RefundStatus
from billing.disputes import DisputeStatus, ProviderDispute
from billing.ledger import PayoutStatus, ProviderPayout
from billing.records import EventRecord
from billing.settlement import ExecuteRefundInput, ImportPayoutInput, SyncLedgerInput
from billing.testing.settlement_double import move_refund, set_new_refund_status
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import events as events_repo
from tests.activities.test_billing_activities import (  # noqa: F401  (the stack fixture)
    NOW,
    Stack,
    charge,
    open_invoice,
    seed_subscription,
    stack,
)
from tests.conftest import BOTH_BACKENDS


@dataclass(frozen=True)
class Paid:
    invoice_id: str
    subscription_id: str
    charge_id: str
    payment_id: str


def paid_invoice(stack: Stack) -> Paid:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    result = charge(stack, invoice.invoice_id, 1)
    assert result.payment_id is not None and result.charge_id is not None
    return Paid(invoice.invoice_id, seeded.subscription_id, result.charge_id, result.payment_id)


def events(stack: Stack, stream: str) -> list[EventRecord]:
    with unit_of_work(stack.session_factory) as session:
        found = events_repo.list_events(session, limit=1000, subscription_id=stream)
    return sorted(found, key=lambda e: e.sequence)


def types(stack: Stack, stream: str) -> list[str]:
    return [e.type for e in events(stack, stream)]


def issue(stack: Stack, invoice_id: str, **request: Any) -> credit_notes_repo.IssuedCreditNote:
    """As ``billing credit-notes issue`` does: the note and its events in one transaction."""
    with unit_of_work(stack.session_factory) as session:
        issued = credit_notes_repo.issue_credit_note(
            session, invoice_id, CreditNoteRequest(**request), at=NOW
        )
        event_log.credit_note_issued(
            session, issued.credit_note, issued.lines, issued.refunds, issued.invoice, NOW
        )
    return issued


@pytest.fixture(autouse=True)
def refunds_succeed_at_once(stack: Stack) -> Any:
    yield
    set_new_refund_status(stack.localstripe.url, "succeeded")


@BOTH_BACKENDS
def test_a_refund_followed_to_its_end_reports_each_state_once_after_the_invoice_paid(
    stack: Stack,
) -> None:
    paid = paid_invoice(stack)
    before = types(stack, paid.subscription_id)
    assert before[-1] == "invoice.paid", before
    set_new_refund_status(stack.localstripe.url, "pending")
    issued = issue(stack, paid.invoice_id, refund_amount_minor=400)
    [refund] = issued.refunds
    acts = SettlementActivities(stack.session_factory, stack.gateway, stack.clock)

    acts.execute_refund(ExecuteRefundInput(refund_id=refund.id))  # Stripe keeps it pending
    acts.execute_refund(ExecuteRefundInput(refund_id=refund.id))  # read again: still pending
    move_refund(
        stack.localstripe.url,
        credit_notes_repo_refund(stack, refund.id).stripe_refund_id,
        "succeeded",
    )
    for _ in range(3):  # the workflow's next read, and retries of it
        acts.execute_refund(ExecuteRefundInput(refund_id=refund.id))

    stream = events(stack, paid.subscription_id)
    new = stream[len(before) :]
    assert [e.type for e in new] == ["credit_note.created", "refund.created", "refund.succeeded"]
    assert [e.sequence for e in stream] == list(range(1, len(stream) + 1))
    note_event, created, succeeded = new
    assert note_event.object["id"] == issued.credit_note.id
    assert note_event.object["refund_amount_minor"] == 400
    assert [r["status"] for r in note_event.object["refunds"]] == ["pending"]
    assert (created.object_id, created.object["status"]) == (refund.id, "pending")
    assert created.object["invoice_id"] == paid.invoice_id
    assert created.object["credit_note_id"] == issued.credit_note.id
    assert (succeeded.object["status"], succeeded.object["amount_minor"]) == ("succeeded", 400)
    assert succeeded.object["stripe_refund_id"] is not None


def credit_notes_repo_refund(stack: Stack, refund_id: str) -> Any:
    with unit_of_work(stack.session_factory) as session:
        return credit_notes_repo.get_refund(session, refund_id)


@BOTH_BACKENDS
def test_a_refund_stripe_refuses_reports_refund_failed_once(stack: Stack) -> None:
    paid = paid_invoice(stack)
    issued = issue(stack, paid.invoice_id, refund_amount_minor=300)
    [refund] = issued.refunds
    # The charge is disputed meanwhile: Stripe refuses the refund (charge_disputed).
    httpx.post(
        f"{stack.localstripe.url}/_config/settlement/charges/{paid.charge_id}/dispute",
        data={"reason": "fraudulent"},
        timeout=10,
    ).raise_for_status()
    acts = SettlementActivities(stack.session_factory, stack.gateway, stack.clock)
    acts.execute_refund(ExecuteRefundInput(refund_id=refund.id))
    acts.execute_refund(ExecuteRefundInput(refund_id=refund.id))
    tail = events(stack, paid.subscription_id)[-3:]
    assert [e.type for e in tail] == ["credit_note.created", "refund.created", "refund.failed"]
    assert tail[-1].object["status"] == "failed" and tail[-1].object["failure_reason"]


@BOTH_BACKENDS
def test_an_event_that_cannot_be_written_takes_its_state_change_with_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker dies between the refund's new status and its event: they are one
    transaction, so neither is there; the retry writes both, once."""
    paid = paid_invoice(stack)
    [refund] = issue(stack, paid.invoice_id, refund_amount_minor=200).refunds
    real = events_repo.record_event
    calls = {"n": 0}

    def dies_at_the_event(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("type") == "refund.succeeded" and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("worker killed between the state change and its event")
        return real(*args, **kwargs)

    monkeypatch.setattr(events_repo, "record_event", dies_at_the_event)
    acts = SettlementActivities(stack.session_factory, stack.gateway, stack.clock)
    with pytest.raises(RuntimeError):
        acts.execute_refund(ExecuteRefundInput(refund_id=refund.id))
    stored = credit_notes_repo_refund(stack, refund.id)
    assert (stored.status, stored.stripe_refund_id) == (RefundStatus.PENDING, None)
    assert types(stack, paid.subscription_id)[-1] == "refund.created"

    acts.execute_refund(ExecuteRefundInput(refund_id=refund.id))  # Temporal's retry
    assert credit_notes_repo_refund(stack, refund.id).status == RefundStatus.SUCCEEDED
    assert types(stack, paid.subscription_id)[-2:] == ["refund.created", "refund.succeeded"]
    assert len(stack.gateway.list_charge_refunds(charge_id=paid.charge_id)) == 1


class DisputeReader:
    """Stripe's ``GET /v1/disputes/{id}``, answering what the test set last."""

    def __init__(self, dispute: ProviderDispute) -> None:
        self.dispute = dispute

    def retrieve_dispute(self, *, dispute_id: str) -> ProviderDispute:
        return self.dispute

    def list_charge_refunds(self, *, charge_id: str) -> Any:
        raise AssertionError("not a refund")

    def retrieve_refund(self, *, refund_id: str) -> Any:
        raise AssertionError("not a refund")

    def retrieve_balance_transaction(self, *, transaction_id: str) -> Any:
        raise AssertionError("no balance transactions here")


def deliver(stack: Stack, reader: DisputeReader, event_type: str) -> None:
    record_settlement_event(
        stack.session_factory,
        reader,
        event_type,
        {"id": reader.dispute.dispute_id},
        stack.clock.now(),
    )


@BOTH_BACKENDS
def test_dispute_webhooks_repeated_stale_and_concurrent_report_each_state_once(
    stack: Stack,
) -> None:
    paid = paid_invoice(stack)
    before = len(events(stack, paid.subscription_id))
    reader = DisputeReader(
        ProviderDispute(
            dispute_id="dp_events_1",
            charge_id=paid.charge_id,
            payment_intent_id=None,
            amount_minor=900,
            currency="USD",
            status=DisputeStatus.NEEDS_RESPONSE,
            reason="fraudulent",
        )
    )
    # Created, delivered 20 times at once (Stripe's retries racing each other).
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda _: deliver(stack, reader, "charge.dispute.created"), range(20)))
    deliver(stack, reader, "charge.dispute.funds_withdrawn")  # the same state: nothing new
    reader.dispute = replace(reader.dispute, status=DisputeStatus.UNDER_REVIEW)
    for _ in range(3):
        deliver(stack, reader, "charge.dispute.updated")
    reader.dispute = replace(reader.dispute, status=DisputeStatus.WON)
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda _: deliver(stack, reader, "charge.dispute.closed"), range(20)))
    # Late and stale: the creation's snapshot, then an update read before it closed.
    reader.dispute = replace(reader.dispute, status=DisputeStatus.NEEDS_RESPONSE)
    deliver(stack, reader, "charge.dispute.created")
    reader.dispute = replace(reader.dispute, status=DisputeStatus.UNDER_REVIEW)
    deliver(stack, reader, "charge.dispute.updated")

    stream = events(stack, paid.subscription_id)
    new = stream[before:]
    assert [e.type for e in new] == ["dispute.created", "dispute.updated", "dispute.closed"]
    assert [e.sequence for e in stream] == list(range(1, len(stream) + 1))
    assert [e.object["status"] for e in new] == ["needs_response", "under_review", "won"]
    assert {e.object["stripe_dispute_id"] for e in new} == {"dp_events_1"}
    assert {e.object["invoice_id"] for e in new} == {paid.invoice_id}
    assert new[-1].object["closed_at"] is not None


@BOTH_BACKENDS
def test_a_dispute_of_a_charge_that_is_not_ours_goes_on_the_account_stream(
    stack: Stack,
) -> None:
    start = len(events(stack, ACCOUNT_STREAM))
    reader = DisputeReader(
        ProviderDispute(
            dispute_id="dp_not_ours",
            charge_id="ch_made_elsewhere",
            payment_intent_id=None,
            amount_minor=500,
            currency="EUR",
            status=DisputeStatus.WARNING_NEEDS_RESPONSE,
        )
    )
    deliver(stack, reader, "charge.dispute.created")
    deliver(stack, reader, "charge.dispute.created")
    account = events(stack, ACCOUNT_STREAM)[start:]
    assert [(e.type, e.object["payment_id"]) for e in account] == [("dispute.created", None)]


class FailingPayouts:
    """The gateway, except that the payout read says Stripe could not pay it out."""

    def __init__(self, stack: Stack) -> None:
        self._gateway = stack.gateway

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gateway, name)

    def retrieve_payout(self, *, payout_id: str) -> ProviderPayout:
        real = self._gateway.retrieve_payout(payout_id=payout_id)
        return replace(real, status=PayoutStatus.FAILED, failure_code="account_closed")


@BOTH_BACKENDS
def test_payouts_report_paid_and_reconciled_once_on_the_account_stream(stack: Stack) -> None:
    stack.localstripe.flush()
    paid_invoice(stack)
    paid_invoice(stack)
    start = len(events(stack, ACCOUNT_STREAM))
    response = httpx.post(f"{stack.localstripe.url}/_config/settlement/payouts/run", timeout=10)
    [payout_id] = [p["id"] for p in response.json()["data"]]
    ledger = LedgerActivities(stack.session_factory, stack.gateway, stack.clock)
    for _ in range(3):  # payout.created, payout.paid, and a retry: one import's events
        ledger.import_payout(ImportPayoutInput(stripe_payout_id=payout_id))
    stack.clock.at = datetime.now(UTC)  # localstripe stamps its objects with the real time
    assert ledger.sync_ledger(SyncLedgerInput(days=1)).payouts == 1  # the daily sync, again

    account = events(stack, ACCOUNT_STREAM)[start:]
    assert [e.type for e in account] == ["payout.paid", "payout.reconciliation_completed"]
    assert [e.sequence for e in account] == [start + 1, start + 2]
    paid_event, reconciled = account
    assert paid_event.object["stripe_payout_id"] == payout_id
    assert paid_event.object["status"] == "paid" and paid_event.object["imported_at"]
    assert reconciled.object_id == paid_event.object_id == paid_event.object["id"]
    assert (reconciled.object["stripe_payout_id"], reconciled.object["differences"]) == (
        payout_id,
        0,
    )
    assert reconciled.object["matched"] == 2

    # Another payout that Stripe reports failed: payout.failed, nothing reconciled.
    paid_invoice(stack)
    [second] = [
        p["id"]
        for p in httpx.post(
            f"{stack.localstripe.url}/_config/settlement/payouts/run", timeout=10
        ).json()["data"]
    ]
    failing = LedgerActivities(stack.session_factory, FailingPayouts(stack), stack.clock)  # type: ignore[arg-type]
    failing.import_payout(ImportPayoutInput(stripe_payout_id=second))
    failing.import_payout(ImportPayoutInput(stripe_payout_id=second))
    last = events(stack, ACCOUNT_STREAM)[start + 2 :]
    assert [(e.type, e.sequence, e.object["status"]) for e in last] == [
        ("payout.failed", start + 3, "failed")
    ]


@BOTH_BACKENDS
def test_twenty_concurrent_account_events_number_the_stream_without_gaps(stack: Stack) -> None:
    """No row to lock for the account stream: on PostgreSQL an advisory lock numbers it (20
    writers at once would otherwise collide on the unique (stream, sequence))."""
    start = len(events(stack, ACCOUNT_STREAM))

    def write(n: int) -> None:
        with unit_of_work(stack.session_factory) as session:
            events_repo.record_event(
                session,
                type="payout.paid",
                subscription_id=ACCOUNT_STREAM,
                object_id=f"pout_concurrent_{n}",
                object={"n": n},
                dedupe_key=f"concurrent-account-{n}-{NOW.isoformat()}",
                created_at=NOW,
            )

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(write, range(20)))
    account = events(stack, ACCOUNT_STREAM)
    assert [e.sequence for e in account] == list(range(1, start + 21))


_KILLED_AT_THE_EVENT = """
import os, signal, sys
from db.repositories import events as events_repo

def killed(*args, **kwargs):
    print("state written, killing myself before the event", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

events_repo.record_event = killed
from billing.cli import app
app(["credit-notes", "create", sys.argv[1], "--refund", "100"])
"""


@BOTH_BACKENDS
def test_a_process_killed_after_the_credit_note_and_before_its_event_leaves_neither(
    stack: Stack, database_url: str, tmp_path: Any
) -> None:
    """``billing credit-notes create`` SIGKILLed between the credit note's rows and its event:
    the database rolls the transaction back (PostgreSQL on the dropped connection, SQLite from
    its journal), so no credit note, refund or event is left, and no lock: issuing it again
    writes both once."""
    import os
    import signal
    import subprocess
    import sys

    paid = paid_invoice(stack)
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_AT_THE_EVENT)
    run = subprocess.run(
        [sys.executable, str(script), paid.invoice_id],
        env={**os.environ, "PYTHONPATH": os.getcwd(), "BILLING_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert "state written" in run.stdout
    with unit_of_work(stack.session_factory) as session:
        assert credit_notes_repo.list_credit_notes(session, invoice_id=paid.invoice_id) == []
        assert credit_notes_repo.list_refunds(session, payment_id=paid.payment_id) == []
    assert types(stack, paid.subscription_id)[-1] == "invoice.paid"

    issued = issue(stack, paid.invoice_id, refund_amount_minor=100)  # done again, not killed
    assert issued.credit_note.number.endswith("-CN-0001")  # no number was used up
    assert types(stack, paid.subscription_id)[-2:] == ["credit_note.created", "refund.created"]
