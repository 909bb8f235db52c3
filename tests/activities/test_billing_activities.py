"""The billing activities' money-safety guarantees, called directly as methods: a real database
(SQLite, and PostgreSQL where marked), the real Stripe SDK on localstripe through a recording
HTTP client, and a frozen clock.

localstripe ignores ``Idempotency-Key``, so where at-most-once charging depends on the provider
answering a repeated key with the first result, these tests assert the real-Stripe contract on
the wire instead: the same key, with the same parameters, and no request at all where our own
records already know the answer.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import stripe
from dateutil.relativedelta import relativedelta
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import stripe_gateway
from activities.billing import IDEMPOTENCY_KEY_SAFE_WINDOW, BillingActivities
from activities.stripe_gateway import StripeGateway, make_stripe_client
from billing.calendar import IntervalUnit
from billing.clock import FixedClock
from billing.contracts import (
    AttachPaymentMethodInput,
    ChargeInvoiceInput,
    ChargeInvoiceResult,
    CloseInvoiceInput,
    ConfirmAuthenticatedPaymentInput,
    CreateInvoiceInput,
    CreateInvoiceResult,
    EnqueueNotificationInput,
    NoticeKind,
    SettleInvoiceInput,
    SyncSubscriptionInput,
    idempotency_key_for,
)
from billing.ids import new_id
from billing.invoices import InvoiceStatus, format_invoice_number, invoice_prefix_for
from billing.payments import ChargeOutcomeKind, TransientPaymentError
from billing.plans import Plan
from billing.records import (
    AttemptStatus,
    CustomerRecord,
    InvoiceRecord,
    PaymentAttemptRecord,
    PaymentRecord,
    SubscriptionRecord,
)
from billing.subscription import SubscriptionStatus
from billing.testing import cards
from billing.testing.localstripe import LocalStripe
from billing.testing.stripe_recording import RecordingHTTPClient
from db.engine import make_engine, make_session_factory, normalize_url, unit_of_work
from db.repositories import attempts as attempts_repo
from db.repositories import customers as customers_repo
from db.repositories import invoices as invoices_repo
from db.repositories import notifications as notifications_repo
from db.repositories import payments as payments_repo
from db.repositories import plans as plans_repo
from db.repositories import subscriptions as subscriptions_repo
from tests.conftest import BOTH_BACKENDS

LOCALSTRIPE_API_KEY = "sk_test_localstripe"
PAYMENT_INTENTS = "/v1/payment_intents"
#: The frozen "now" of every activity (UTC).
NOW = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
#: Start of the first billed period (UTC).
FIRST_PERIOD_START = datetime(2025, 3, 1, tzinfo=UTC)
AMOUNT_MINOR = 2500


# -- the stack under test ----------------------------------------------------------------------


class WireRecorder(RecordingHTTPClient):
    """RecordingHTTPClient that also keeps each POST's form body, so a test can show that a
    repeated Idempotency-Key carries the same parameters (real Stripe refuses it otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[tuple[str, str | None, dict[str, list[str]]]] = []

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        if method.upper() == "POST":
            raw = post_data.decode() if isinstance(post_data, bytes) else post_data or ""
            key = next(
                (v for k, v in (headers or {}).items() if k.lower() == "idempotency-key"), None
            )
            self.bodies.append((urlsplit(url).path, key, parse_qs(raw)))
        return super().request(method, url, headers, post_data)

    def bodies_with_key(self, path: str, key: str) -> list[dict[str, list[str]]]:
        return [body for p, k, body in self.bodies if p == path and k == key]


@dataclass
class Stack:
    activities: BillingActivities
    gateway: StripeGateway
    stripe: stripe.StripeClient
    http: WireRecorder
    session_factory: sessionmaker[Session]
    engine: Engine
    localstripe: LocalStripe
    #: The activities' "now"; a test moves it with ``clock.at = ...``.
    clock: FixedClock


@pytest.fixture
def stack(localstripe: LocalStripe, database_url: str) -> Iterator[Stack]:
    engine = make_engine(database_url)
    session_factory = make_session_factory(engine)
    http = WireRecorder()
    client = make_stripe_client(
        api_key=LOCALSTRIPE_API_KEY,
        api_base=localstripe.url,
        max_network_retries=0,
        http_client=http,
    )
    # localstripe 1.15 rejects `description` on PaymentIntents; real Stripe takes it.
    gateway = StripeGateway(client, send_description=False)
    clock = FixedClock(NOW)
    activities = BillingActivities(session_factory, gateway, clock)
    yield Stack(activities, gateway, client, http, session_factory, engine, localstripe, clock)
    http.close()  # type: ignore[no-untyped-call]
    engine.dispose()
    # The localstripe process is shared by the whole session and these tests create many
    # objects; leave it empty so later tests that list objects are not affected by ours.
    localstripe.flush()


@dataclass(frozen=True)
class Seeded:
    customer_id: str
    subscription_id: str
    plan_code: str
    stripe_customer_id: str | None
    payment_method_id: str | None


def seed_subscription(
    stack: Stack,
    *,
    card: str | None = cards.SUCCEEDS,
    stripe_customer: bool = True,
    amount_minor: int = AMOUNT_MINOR,
    currency: str = "USD",
) -> Seeded:
    """A plan, a customer with a real Stripe customer and default card (unless told not to),
    and an active subscription, all in the database."""
    customer_id = new_id("cus")
    subscription_id = new_id("sub")
    stripe_customer_id = None
    payment_method_id = None
    if stripe_customer:
        stripe_customer_id = stack.gateway.ensure_customer(
            customer_id=customer_id, email="ada@example.com", name="Ada Lovelace"
        )
        if card is not None:
            payment_method_id = stack.gateway.attach_payment_method(
                provider_customer_id=stripe_customer_id,
                payment_method_id=cards.create_card_payment_method(stack.stripe, card),
            ).payment_method_id
    plan = Plan(
        f"plan-{uuid.uuid4().hex[:10]}", "Test plan", amount_minor, currency, IntervalUnit.MONTH
    )
    with unit_of_work(stack.session_factory) as session:
        plans_repo.upsert_plan(session, plan, now=NOW)
        customers_repo.insert_customer(
            session,
            CustomerRecord(
                id=customer_id,
                invoice_prefix=invoice_prefix_for(customer_id),
                timezone="UTC",
                created_at=NOW,
                updated_at=NOW,
                email="ada@example.com",
                name="Ada Lovelace",
                stripe_customer_id=stripe_customer_id,
                default_payment_method_id=payment_method_id,
            ),
        )
        subscriptions_repo.insert_subscription(
            session,
            SubscriptionRecord(
                id=subscription_id,
                customer_id=customer_id,
                plan_code=plan.code,
                status=SubscriptionStatus.ACTIVE,
                amount_minor=amount_minor,
                currency=currency,
                interval=IntervalUnit.MONTH,
                interval_count=1,
                timezone="UTC",
                anchor_at=FIRST_PERIOD_START,
                workflow_id=f"subscription-{subscription_id}",
                created_at=NOW,
                updated_at=NOW,
            ),
        )
    return Seeded(customer_id, subscription_id, plan.code, stripe_customer_id, payment_method_id)


def invoice_input(
    seeded: Seeded,
    *,
    period_index: int = 0,
    amount_minor: int = AMOUNT_MINOR,
    currency: str = "USD",
) -> CreateInvoiceInput:
    start = FIRST_PERIOD_START + relativedelta(months=period_index)
    return CreateInvoiceInput(
        subscription_id=seeded.subscription_id,
        customer_id=seeded.customer_id,
        plan_code=seeded.plan_code,
        period_index=period_index,
        period_start=start,
        period_end=FIRST_PERIOD_START + relativedelta(months=period_index + 1),
        amount_minor=amount_minor,
        currency=currency,
        description="Test plan",
    )


def open_invoice(stack: Stack, seeded: Seeded, **kwargs: Any) -> CreateInvoiceResult:
    created = stack.activities.create_invoice(invoice_input(seeded, **kwargs))
    assert created.status == InvoiceStatus.OPEN
    return created


def charge(
    stack: Stack, invoice_id: str, attempt_number: int, reason: str = "scheduled"
) -> ChargeInvoiceResult:
    # As the worker runs it: inside an activity context.
    return ActivityEnvironment().run(
        stack.activities.charge_invoice,
        ChargeInvoiceInput(invoice_id=invoice_id, attempt_number=attempt_number, reason=reason),
    )


def settle(stack: Stack, invoice_id: str, result: ChargeInvoiceResult) -> Any:
    assert result.payment_intent_id is not None
    return stack.activities.settle_invoice(
        SettleInvoiceInput(
            invoice_id=invoice_id,
            attempt_number=result.attempt_number,
            payment_intent_id=result.payment_intent_id,
            charge_id=result.charge_id,
        )
    )


def stored_invoice(stack: Stack, invoice_id: str) -> InvoiceRecord:
    with unit_of_work(stack.session_factory) as session:
        invoice = invoices_repo.get_invoice(session, invoice_id)
    assert invoice is not None
    return invoice


def stored_attempts(stack: Stack, invoice_id: str) -> list[PaymentAttemptRecord]:
    with unit_of_work(stack.session_factory) as session:
        return attempts_repo.list_attempts_for_invoice(session, invoice_id)


def stored_payments(stack: Stack, invoice_id: str) -> list[PaymentRecord]:
    with unit_of_work(stack.session_factory) as session:
        return payments_repo.list_payments_for_invoice(session, invoice_id)


def stored_customer(stack: Stack, customer_id: str) -> CustomerRecord:
    with unit_of_work(stack.session_factory) as session:
        customer = customers_repo.get_customer(session, customer_id)
    assert customer is not None
    return customer


def charge_posts(stack: Stack) -> list[str | None]:
    """Idempotency keys of every PaymentIntent creation sent so far."""
    return [r.idempotency_key for r in stack.http.requests_to(PAYMENT_INTENTS)]


def provider_intents(stack: Stack, invoice_id: str) -> list[Any]:
    """Every PaymentIntent localstripe holds for the invoice (read behind the gateway's back;
    localstripe's list takes no filters)."""
    intents: list[Any] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = stack.stripe.v1.payment_intents.list(params=params)  # type: ignore[arg-type]
        intents.extend(
            i
            for i in page.data
            if "invoice_id" in i.metadata and i.metadata["invoice_id"] == invoice_id
        )
        if not page.has_more or not page.data:
            return intents
        params["starting_after"] = page.data[-1].id


def assert_final(error: ApplicationError, error_type: str) -> None:
    assert error.type == error_type
    assert error.non_retryable, f"{error_type} must not be retried by Temporal"


# -- create_invoice ------------------------------------------------------------------------------


@BOTH_BACKENDS
def test_create_invoice_twice_for_a_period_issues_one_invoice_and_numbers_stay_gap_free(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack)
    prefix = invoice_prefix_for(seeded.customer_id)

    first = stack.activities.create_invoice(invoice_input(seeded))
    again = stack.activities.create_invoice(invoice_input(seeded))
    second_period = stack.activities.create_invoice(invoice_input(seeded, period_index=1))

    assert (first.created, again.created) == (True, False)
    assert (again.invoice_id, again.number) == (first.invoice_id, first.number)
    assert first.number == format_invoice_number(prefix, 1)
    assert (first.status, first.amount_due_minor, first.currency) == (
        InvoiceStatus.OPEN,
        AMOUNT_MINOR,
        "USD",
    )
    # The retry did not burn a number: the next period is 0002, not 0003.
    assert second_period.number == format_invoice_number(prefix, 2)
    with unit_of_work(stack.session_factory) as session:
        invoices = invoices_repo.list_invoices_for_subscription(session, seeded.subscription_id)
    assert [(i.id, i.number) for i in invoices] == [
        (first.invoice_id, first.number),
        (second_period.invoice_id, second_period.number),
    ]
    assert invoices[0].finalized_at == NOW
    assert stored_customer(stack, seeded.customer_id).next_invoice_sequence == 3


@BOTH_BACKENDS
def test_create_invoice_reports_the_period_the_invoice_stores(stack: Stack) -> None:
    # A re-run computed under other zone rules (a worker with a newer tzdata) asks for another
    # end; the answer is what the invoice stores, which the workflow keeps as the invoiced
    # period (README, "Replay safety").
    seeded = seed_subscription(stack)
    asked = invoice_input(seeded)
    first = stack.activities.create_invoice(asked)
    rerun = stack.activities.create_invoice(
        dataclasses.replace(asked, period_end=asked.period_end + timedelta(hours=1))
    )

    assert (first.period_start, first.period_end) == (asked.period_start, asked.period_end)
    assert rerun.created is False
    assert (rerun.period_start, rerun.period_end) == (asked.period_start, asked.period_end)


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
def test_create_invoice_racing_itself_issues_one_invoice_without_burning_a_number(
    stack: Stack, database_url: str
) -> None:
    """Two workers run create_invoice for the same period at once (a retry overlapping a slow
    first run): both read "no invoice yet", then queue on the customer's numbering row."""
    seeded = seed_subscription(stack)
    prefix = invoice_prefix_for(seeded.customer_id)
    results: list[CreateInvoiceResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(stack.activities.create_invoice(invoice_input(seeded)))
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    observer = create_engine(
        normalize_url(database_url), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        with stack.engine.connect() as blocker:
            # Hold the customer's row lock so both runs get past their "already issued?" read
            # and wait inside allocate_invoice_number.
            transaction = blocker.begin()
            blocker.execute(
                text("SELECT id FROM customers WHERE id = :id FOR UPDATE"),
                {"id": seeded.customer_id},
            )
            workers = [threading.Thread(target=run) for _ in range(2)]
            for worker in workers:
                worker.start()
            deadline = time.monotonic() + 10
            with observer.connect() as watch:
                while True:
                    waiting = watch.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND wait_event_type = 'Lock'"
                        )
                    ).scalar_one()
                    if waiting >= 2 or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
            assert waiting == 2, "both create_invoice runs should be waiting on the row lock"
            transaction.rollback()
            for worker in workers:
                worker.join(timeout=10)
    finally:
        observer.dispose()

    assert errors == []
    assert sorted(r.created for r in results) == [False, True]
    assert {(r.invoice_id, r.number) for r in results} == {
        (results[0].invoice_id, format_invoice_number(prefix, 1))
    }
    with unit_of_work(stack.session_factory) as session:
        invoices = invoices_repo.list_invoices_for_subscription(session, seeded.subscription_id)
    assert len(invoices) == 1
    # The loser's number allocation was rolled back with its insert: no gap.
    assert stored_customer(stack, seeded.customer_id).next_invoice_sequence == 2
    nxt = stack.activities.create_invoice(invoice_input(seeded, period_index=1))
    assert nxt.number == format_invoice_number(prefix, 2)


def test_a_free_period_invoice_is_paid_on_creation_without_any_charge(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    stack.http.clear()

    created = stack.activities.create_invoice(invoice_input(seeded, amount_minor=0))

    assert (created.status, created.amount_due_minor) == (InvoiceStatus.PAID, 0)
    invoice = stored_invoice(stack, created.invoice_id)
    assert (invoice.status, invoice.amount_paid_minor, invoice.paid_at) == (
        InvoiceStatus.PAID,
        0,
        NOW,
    )
    assert stored_attempts(stack, created.invoice_id) == []
    assert stored_payments(stack, created.invoice_id) == []
    assert stack.http.recorded == []


# -- charge_invoice: at most once --------------------------------------------------------------


def fail_settlement_reads(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider takes the charge, answers without its balance transaction (as a provider
    that ignores ``expand`` would), then cannot be read for its settlement (an outage)."""

    def unavailable(**_: object) -> None:
        raise TransientPaymentError("provider unavailable (test)")

    monkeypatch.setattr(stack.gateway, "settlement_details", unavailable)
    monkeypatch.setattr(stripe_gateway, "_settlement_of_charge", lambda charge: None)


@BOTH_BACKENDS
def test_a_successful_charge_settles_the_invoice_in_the_same_activity(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)

    paid = charge(stack, invoice.invoice_id, 1)

    assert paid.outcome == ChargeOutcomeKind.PAID
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert paid.payment_id == payment.id
    assert (payment.amount_minor, payment.currency) == (AMOUNT_MINOR, "USD")
    assert payment.stripe_payment_intent_id == paid.payment_intent_id
    assert payment.balance_transaction_id is not None and payment.fee_minor is not None
    stored = stored_invoice(stack, invoice.invoice_id)
    assert (stored.status, stored.amount_paid_minor) == (InvoiceStatus.PAID, AMOUNT_MINOR)


def test_a_settlement_outage_after_a_charge_keeps_the_charge_for_settle_invoice(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    fail_settlement_reads(stack, monkeypatch)

    paid = charge(stack, invoice.invoice_id, 1)

    # The money is taken and its attempt recorded; the payment row waits for settle_invoice
    # (the workflow runs it when no payment id comes back).
    assert (paid.outcome, paid.payment_id) == (ChargeOutcomeKind.PAID, None)
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert attempt.status == AttemptStatus.SUCCEEDED
    assert stored_payments(stack, invoice.invoice_id) == []
    monkeypatch.undo()
    settled = settle(stack, invoice.invoice_id, paid)
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert settled.payment_id == payment.id and payment.attempt_id == attempt.id
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.PAID


@BOTH_BACKENDS
def test_a_settlement_write_that_fails_rolls_back_alone_and_the_charge_outcome_commits(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outcome and the settlement share one transaction; the settlement sits in a savepoint
    # so that a failure writing it cannot take the record of the money with it.
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    real_transition = invoices_repo.transition_invoice

    def transition_fails_after_the_payment_insert(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database fault while marking the invoice paid (test)")

    monkeypatch.setattr(
        invoices_repo, "transition_invoice", transition_fails_after_the_payment_insert
    )
    paid = charge(stack, invoice.invoice_id, 1)

    assert (paid.outcome, paid.payment_id) == (ChargeOutcomeKind.PAID, None)
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert (attempt.status, attempt.stripe_payment_intent_id) == (
        AttemptStatus.SUCCEEDED,
        paid.payment_intent_id,
    )
    # The payment row inserted before the fault went with the savepoint, not half of it.
    assert stored_payments(stack, invoice.invoice_id) == []
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.OPEN
    monkeypatch.setattr(invoices_repo, "transition_invoice", real_transition)
    settled = settle(stack, invoice.invoice_id, paid)
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert settled.payment_id == payment.id and payment.attempt_id == attempt.id
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.PAID


@BOTH_BACKENDS
def test_a_worker_lost_mid_charge_is_retried_under_the_same_key_and_settles_once(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    key = idempotency_key_for(invoice.invoice_id, 1)
    # Stripe creates the PaymentIntent (and takes the money), then the answer is lost.
    # retryable=False: the SDK must not retry by itself; Temporal's retry is what we test.
    stack.http.drop_responses(PAYMENT_INTENTS, retryable=False)

    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 1)

    [lost] = stored_attempts(stack, invoice.invoice_id)
    assert (lost.attempt_number, lost.status, lost.idempotency_key) == (
        1,
        AttemptStatus.PENDING,
        key,
    )
    assert lost.outcome is None

    retried = charge(stack, invoice.invoice_id, 1)  # what Temporal's RetryPolicy does

    assert (retried.outcome, retried.attempt_number, retried.idempotency_key) == (
        ChargeOutcomeKind.PAID,
        1,
        key,
    )
    # Both PaymentIntent creations carry the same key, and the same amount and card. Real
    # Stripe answers the second with the first PaymentIntent, so the customer is charged once;
    # localstripe ignores the key and holds two PaymentIntents, which is why we assert the
    # contract on the wire rather than localstripe's state.
    sent = stack.http.requests_to(PAYMENT_INTENTS)
    assert [(r.idempotency_key, r.response_dropped) for r in sent] == [(key, True), (key, False)]
    first_body, second_body = stack.http.bodies_with_key(PAYMENT_INTENTS, key)
    assert first_body == second_body
    assert (first_body["amount"], first_body["currency"]) == ([str(AMOUNT_MINOR)], ["usd"])

    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert attempt.status == AttemptStatus.SUCCEEDED
    assert attempt.stripe_payment_intent_id == retried.payment_intent_id

    # The successful charge settled the invoice in the same activity; settling again (the
    # workflow's fallback) finds that payment and records nothing more.
    assert retried.payment_id is not None
    settled = settle(stack, invoice.invoice_id, retried)

    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.id == settled.payment_id == retried.payment_id
    assert (payment.amount_minor, payment.currency) == (AMOUNT_MINOR, "USD")
    assert payment.stripe_payment_intent_id == retried.payment_intent_id
    assert payment.attempt_id == attempt.id
    paid = stored_invoice(stack, invoice.invoice_id)
    assert (paid.status, paid.amount_paid_minor, paid.paid_at) == (
        InvoiceStatus.PAID,
        AMOUNT_MINOR,
        NOW,
    )


class CrashedAfterCharge(BaseException):
    """Stands in for the SIGKILL of fault-injection runs: nothing after it runs."""


def test_the_after_charge_hook_runs_between_the_providers_answer_and_our_write(
    stack: Stack,
) -> None:
    seen: list[tuple[str, bool]] = []

    def crash_on_first_send(key: str, redriven: bool) -> None:
        seen.append((key, redriven))
        if not redriven:
            raise CrashedAfterCharge(key)

    stack.activities = BillingActivities(
        stack.session_factory,
        stack.gateway,
        stack.clock,
        after_charge_hook=crash_on_first_send,
    )
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    key = idempotency_key_for(invoice.invoice_id, 1)

    with pytest.raises(CrashedAfterCharge):
        charge(stack, invoice.invoice_id, 1)

    # Stripe took the money; our records only know a send may have happened.
    [intent] = provider_intents(stack, invoice.invoice_id)
    assert intent.status == "succeeded"
    [pending] = stored_attempts(stack, invoice.invoice_id)
    assert (pending.status, pending.outcome, pending.idempotency_key) == (
        AttemptStatus.PENDING,
        None,
        key,
    )

    retried = charge(stack, invoice.invoice_id, 1)

    assert seen == [(key, False), (key, True)]
    assert (retried.outcome, retried.idempotency_key) == (ChargeOutcomeKind.PAID, key)
    assert charge_posts(stack) == [key, key]


@BOTH_BACKENDS
def test_a_paid_invoice_is_never_sent_to_the_provider_again(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    assert first.outcome == ChargeOutcomeKind.PAID
    settle(stack, invoice.invoice_id, first)
    stack.http.clear()

    again = charge(stack, invoice.invoice_id, 2, reason="retry")

    assert stack.http.recorded == []
    assert (again.outcome, again.already_paid) == (ChargeOutcomeKind.PAID, True)
    assert (again.attempt_number, again.payment_intent_id) == (1, first.payment_intent_id)
    assert [a.attempt_number for a in stored_attempts(stack, invoice.invoice_id)] == [1]
    assert len(stored_payments(stack, invoice.invoice_id)) == 1


@BOTH_BACKENDS
def test_a_succeeded_attempt_not_yet_settled_blocks_a_new_charge(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    fail_settlement_reads(stack, monkeypatch)
    first = charge(stack, invoice.invoice_id, 1)
    assert (first.outcome, first.payment_id) == (ChargeOutcomeKind.PAID, None)
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.OPEN
    stack.http.clear()

    again = charge(stack, invoice.invoice_id, 2, reason="retry")

    assert stack.http.recorded == []
    assert (again.outcome, again.already_paid, again.attempt_number) == (
        ChargeOutcomeKind.PAID,
        True,
        1,
    )
    assert again.payment_intent_id == first.payment_intent_id
    assert [a.attempt_number for a in stored_attempts(stack, invoice.invoice_id)] == [1]


@pytest.mark.parametrize(
    ("card", "outcome", "status"),
    [
        (cards.DECLINES_AFTER_ATTACH, ChargeOutcomeKind.SOFT_DECLINE, AttemptStatus.FAILED),
        (
            cards.REQUIRES_AUTHENTICATION,
            ChargeOutcomeKind.AUTHENTICATION_REQUIRED,
            AttemptStatus.REQUIRES_ACTION,
        ),
    ],
)
def test_rerunning_a_finished_attempt_replays_its_outcome_without_the_provider(
    stack: Stack, card: str, outcome: ChargeOutcomeKind, status: AttemptStatus
) -> None:
    seeded = seed_subscription(stack, card=card)
    invoice = open_invoice(stack, seeded)
    first = charge(stack, invoice.invoice_id, 1)
    assert first.outcome == outcome
    assert first.payment_intent_id is not None
    stack.http.clear()

    replayed = charge(stack, invoice.invoice_id, 1)

    assert stack.http.recorded == []
    assert replayed == first
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert (attempt.status, attempt.outcome) == (status, outcome)
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.OPEN


def test_soft_decline_records_the_decline_code_for_dunning(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    invoice = open_invoice(stack, seeded)

    result = charge(stack, invoice.invoice_id, 1)

    assert result.decline_code == "card_declined"
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert (attempt.decline_code, attempt.completed_at) == ("card_declined", NOW)
    assert attempt.payment_method_id == seeded.payment_method_id
    assert stored_payments(stack, invoice.invoice_id) == []


def test_an_attempt_with_an_unknown_outcome_is_re_driven_under_its_own_key(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    key_1 = idempotency_key_for(invoice.invoice_id, 1)
    stack.http.drop_responses(PAYMENT_INTENTS, retryable=False)
    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 1)

    # The workflow moves on to attempt 2 (e.g. after the activity gave up and a new card came).
    result = charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")

    assert (result.outcome, result.attempt_number, result.idempotency_key) == (
        ChargeOutcomeKind.PAID,
        1,
        key_1,
    )
    assert charge_posts(stack) == [key_1, key_1]
    assert idempotency_key_for(invoice.invoice_id, 2) not in charge_posts(stack)
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert (attempt.attempt_number, attempt.status) == (1, AttemptStatus.SUCCEEDED)


def test_a_re_driven_attempt_resends_exactly_the_first_request(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    key_1 = idempotency_key_for(invoice.invoice_id, 1)
    stack.http.drop_responses(PAYMENT_INTENTS, retryable=False)
    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 1)
    # The customer gives a new card (update_payment_method), and the workflow charges again.
    new_card = cards.create_card_payment_method(stack.stripe, cards.SUCCEEDS)
    stack.activities.attach_payment_method(
        AttachPaymentMethodInput(
            subscription_id=seeded.subscription_id,
            customer_id=seeded.customer_id,
            payment_method_id=new_card,
        )
    )

    result = charge(stack, invoice.invoice_id, 2, reason="payment_method_updated")

    assert result.idempotency_key == key_1
    first, resent = stack.http.bodies_with_key(PAYMENT_INTENTS, key_1)
    assert resent["payment_method"] == first["payment_method"] == [seeded.payment_method_id]
    assert resent == first


# -- charge_invoice: re-driven after the provider forgot the key --------------------------------
#
# Stripe forgets an Idempotency-Key ~24 hours after it first saw it; a re-send after that is a new
# charge. localstripe ignores keys altogether, so it behaves exactly like Stripe after expiry:
# a re-sent creation makes a second PaymentIntent. That makes these tests real.


def provider_reads(stack: Stack) -> list[str]:
    """Paths of every GET of PaymentIntents or charges recorded (since the last clear)."""
    return [
        r.path
        for r in stack.http.recorded
        if r.method == "GET" and r.path.startswith((PAYMENT_INTENTS, "/v1/charges"))
    ]


@BOTH_BACKENDS
def test_a_lost_answer_re_driven_after_the_key_expired_is_reconciled_not_charged_again(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    key = idempotency_key_for(invoice.invoice_id, 1)
    # Stripe creates the PaymentIntent and takes the money; the answer is lost.
    stack.http.drop_responses(PAYMENT_INTENTS, retryable=False)
    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 1)
    [lost] = stored_attempts(stack, invoice.invoice_id)
    assert (lost.status, lost.created_at) == (AttemptStatus.PENDING, NOW)
    [original] = provider_intents(stack, invoice.invoice_id)
    assert original.status == "succeeded"
    assert original.metadata["idempotency_key"] == key

    # The activity gave up after 12 hours; the workflow re-drives the attempt hourly. This
    # re-drive comes 25 hours after the first send: Stripe no longer knows the key.
    stack.clock.at = NOW + timedelta(hours=25)
    stack.http.clear()
    redriven = charge(stack, invoice.invoice_id, 1)

    assert charge_posts(stack) == []  # nothing sent: no second charge
    assert provider_reads(stack) != []  # it asked the provider instead
    assert (redriven.outcome, redriven.attempt_number, redriven.idempotency_key) == (
        ChargeOutcomeKind.PAID,
        1,
        key,
    )
    assert redriven.payment_intent_id == original.id
    assert redriven.charge_id == original.latest_charge.id
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert (attempt.status, attempt.outcome) == (AttemptStatus.SUCCEEDED, ChargeOutcomeKind.PAID)
    assert (attempt.stripe_payment_intent_id, attempt.stripe_charge_id) == (
        original.id,
        original.latest_charge.id,
    )
    assert attempt.completed_at == NOW + timedelta(hours=25)

    settle(stack, invoice.invoice_id, redriven)

    [payment] = stored_payments(stack, invoice.invoice_id)
    assert (payment.stripe_payment_intent_id, payment.amount_minor) == (original.id, AMOUNT_MINOR)
    paid = stored_invoice(stack, invoice.invoice_id)
    assert (paid.status, paid.amount_paid_minor) == (InvoiceStatus.PAID, AMOUNT_MINOR)
    assert [i.id for i in provider_intents(stack, invoice.invoice_id)] == [original.id]


@pytest.mark.parametrize(
    ("card", "outcome", "status"),
    [
        (cards.DECLINES_AFTER_ATTACH, ChargeOutcomeKind.SOFT_DECLINE, AttemptStatus.FAILED),
        (
            cards.REQUIRES_AUTHENTICATION,
            ChargeOutcomeKind.AUTHENTICATION_REQUIRED,
            AttemptStatus.REQUIRES_ACTION,
        ),
    ],
    ids=["soft-decline", "requires-action"],
)
def test_a_lost_decline_re_driven_after_the_key_expired_records_the_first_outcome(
    stack: Stack, card: str, outcome: ChargeOutcomeKind, status: AttemptStatus
) -> None:
    seeded = seed_subscription(stack, card=card)
    invoice = open_invoice(stack, seeded)
    stack.http.drop_responses(PAYMENT_INTENTS, retryable=False)
    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 1)
    [original] = provider_intents(stack, invoice.invoice_id)

    stack.clock.at = NOW + timedelta(hours=25)
    stack.http.clear()
    redriven = charge(stack, invoice.invoice_id, 1)

    # Dunning goes on from the first send's decline; the card is not tried a second time.
    assert charge_posts(stack) == []
    assert (redriven.outcome, redriven.payment_intent_id) == (outcome, original.id)
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert (attempt.status, attempt.outcome, attempt.stripe_payment_intent_id) == (
        status,
        outcome,
        original.id,
    )
    assert len(provider_intents(stack, invoice.invoice_id)) == 1


@BOTH_BACKENDS
def test_a_lost_request_re_driven_after_the_key_expired_is_sent_once_with_the_same_key(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    key = idempotency_key_for(invoice.invoice_id, 1)
    # This time the request itself never reached Stripe.
    stack.http.drop_requests(PAYMENT_INTENTS, retryable=False)
    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 1)
    assert stored_attempts(stack, invoice.invoice_id)[0].status == AttemptStatus.PENDING
    [lost] = stack.http.requests_to(PAYMENT_INTENTS)
    assert (lost.idempotency_key, lost.request_dropped, lost.status) == (key, True, None)
    assert provider_intents(stack, invoice.invoice_id) == []

    stack.clock.at = NOW + timedelta(hours=25)
    stack.http.clear()
    redriven = charge(stack, invoice.invoice_id, 1)

    # The provider holds nothing for the key, so re-sending is safe: after looking, once, with
    # the same key and the same request (amount, card).
    assert provider_reads(stack) != []
    # The reconciliation reads came first; only the settlement reads follow the POST.
    [post] = [n for n, r in enumerate(stack.http.recorded) if r.method == "POST"]
    assert any(r.method == "GET" for r in stack.http.recorded[:post])
    [resent] = stack.http.requests_to(PAYMENT_INTENTS)
    assert (resent.idempotency_key, resent.status) == (key, 200)
    first_body, resent_body = stack.http.bodies_with_key(PAYMENT_INTENTS, key)
    assert resent_body == first_body
    assert first_body["payment_method"] == [seeded.payment_method_id]
    assert (redriven.outcome, redriven.idempotency_key) == (ChargeOutcomeKind.PAID, key)
    [intent] = provider_intents(stack, invoice.invoice_id)
    assert redriven.payment_intent_id == intent.id
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert (attempt.status, attempt.stripe_payment_intent_id) == (
        AttemptStatus.SUCCEEDED,
        intent.id,
    )


@pytest.mark.parametrize(
    "later",
    [timedelta(seconds=5), IDEMPOTENCY_KEY_SAFE_WINDOW - timedelta(minutes=1)],
    ids=["temporal-retry", "just-inside-the-window"],
)
def test_a_re_drive_inside_the_keys_window_relies_on_the_key_without_reading(
    stack: Stack, later: timedelta
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    key = idempotency_key_for(invoice.invoice_id, 1)
    stack.http.drop_responses(PAYMENT_INTENTS, retryable=False)
    with pytest.raises(TransientPaymentError):
        charge(stack, invoice.invoice_id, 1)

    stack.clock.at = NOW + later
    stack.http.clear()
    retried = charge(stack, invoice.invoice_id, 1)

    # The hot path: Stripe still holds the key and answers with the first result. One request,
    # no reads. (localstripe ignores the key and creates a second PaymentIntent; Stripe would
    # return the first, which the re-sent key is the whole point of.)
    sent = [(r.method, r.path, r.idempotency_key) for r in stack.http.recorded]
    assert sent[0] == ("POST", PAYMENT_INTENTS, key)
    # Then only the settlement's reads of the charge it made (not of PaymentIntents).
    assert all(m == "GET" and not p.startswith(PAYMENT_INTENTS) for m, p, _ in sent[1:])
    assert retried.outcome == ChargeOutcomeKind.PAID


def test_a_void_invoice_is_refused_without_calling_the_provider(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    stack.activities.close_invoice(
        CloseInvoiceInput(invoice.invoice_id, InvoiceStatus.VOID, "subscription_canceled")
    )
    stack.http.clear()

    with pytest.raises(ApplicationError) as raised:
        charge(stack, invoice.invoice_id, 1)

    assert_final(raised.value, "ChangeRefused")
    assert invoice.number in str(raised.value)
    assert stack.http.recorded == []
    assert stored_attempts(stack, invoice.invoice_id) == []


@pytest.mark.parametrize("stripe_customer", [True, False], ids=["no-default-card", "no-customer"])
def test_a_customer_without_a_payment_method_is_a_hard_decline(
    stack: Stack, stripe_customer: bool
) -> None:
    seeded = seed_subscription(stack, card=None, stripe_customer=stripe_customer)
    assert stored_customer(stack, seeded.customer_id).default_payment_method_id is None
    invoice = open_invoice(stack, seeded)

    result = charge(stack, invoice.invoice_id, 1)

    assert (result.outcome, result.decline_code) == (
        ChargeOutcomeKind.HARD_DECLINE,
        "no_payment_method",
    )
    assert charge_posts(stack) == []
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert (attempt.status, attempt.outcome, attempt.decline_code) == (
        AttemptStatus.FAILED,
        ChargeOutcomeKind.HARD_DECLINE,
        "no_payment_method",
    )
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.OPEN


# -- settle_invoice --------------------------------------------------------------------------------


def test_settling_twice_records_one_payment(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    paid = charge(stack, invoice.invoice_id, 1)

    first = settle(stack, invoice.invoice_id, paid)
    stack.http.clear()
    second = settle(stack, invoice.invoice_id, paid)

    # The recorded payment answers the retry; the provider is not asked again.
    assert stack.http.recorded == []

    assert second == first
    assert (first.amount_minor, first.currency, first.paid_at) == (AMOUNT_MINOR, "USD", NOW)
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.id == first.payment_id
    assert payment.stripe_charge_id == paid.charge_id
    assert payment.balance_transaction_id is not None
    assert (payment.fee_minor, payment.net_minor) == (first.fee_minor, first.net_minor)
    assert payment.fee_minor is not None and payment.net_minor is not None
    assert payment.fee_minor + payment.net_minor == payment.amount_minor
    assert stored_invoice(stack, invoice.invoice_id).amount_paid_minor == AMOUNT_MINOR


@pytest.mark.parametrize(
    ("other_amount", "other_currency"), [(999, "USD"), (AMOUNT_MINOR, "EUR")], ids=str
)
def test_settling_with_money_that_does_not_match_the_invoice_is_refused(
    stack: Stack, other_amount: int, other_currency: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    fail_settlement_reads(stack, monkeypatch)
    paid = charge(stack, invoice.invoice_id, 1)
    monkeypatch.undo()
    assert seeded.stripe_customer_id is not None and seeded.payment_method_id is not None
    other = stack.gateway.charge(
        provider_customer_id=seeded.stripe_customer_id,
        payment_method_id=seeded.payment_method_id,
        amount_minor=other_amount,
        currency=other_currency,
        idempotency_key=f"unrelated-{uuid.uuid4().hex}",
        description="something else",
        metadata={"invoice_id": "not-this-invoice"},
    )
    assert other.kind == ChargeOutcomeKind.PAID
    assert other.payment_intent_id is not None

    with pytest.raises(ApplicationError) as raised:
        stack.activities.settle_invoice(
            SettleInvoiceInput(
                invoice_id=invoice.invoice_id,
                attempt_number=paid.attempt_number,
                payment_intent_id=other.payment_intent_id,
                charge_id=other.charge_id,
            )
        )

    assert_final(raised.value, "ChangeRefused")
    assert f"{other_amount} {other_currency}" in str(raised.value)
    assert stored_payments(stack, invoice.invoice_id) == []
    still = stored_invoice(stack, invoice.invoice_id)
    assert (still.status, still.amount_paid_minor) == (InvoiceStatus.OPEN, 0)


class _ScriptedStripe(stripe.HTTPClient):
    """Answers every request with one real-Stripe-shaped JSON body: for a case localstripe
    cannot produce (it has no currency conversion)."""

    name = "scripted"

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self._body = body

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        return json.dumps(self._body).encode(), 200, {"request-id": "req_scripted"}

    def close(self) -> None:
        pass


def test_an_invoice_paid_in_another_currency_than_the_settlement_currency_settles(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack, currency="EUR")
    invoice = open_invoice(stack, seeded, currency="EUR")
    paid = charge(stack, invoice.invoice_id, 1)
    assert paid.outcome == ChargeOutcomeKind.PAID and paid.charge_id is not None
    # What real Stripe answers for that charge on an account that settles in USD.
    real_stripe = StripeGateway(
        make_stripe_client(
            api_key="sk_test_x",
            api_base="https://api.stripe.invalid",
            max_network_retries=0,
            http_client=_ScriptedStripe(
                {
                    "id": paid.charge_id,
                    "object": "charge",
                    "amount": AMOUNT_MINOR,
                    "currency": "eur",
                    "payment_intent": paid.payment_intent_id,
                    "balance_transaction": {
                        "id": "txn_fx",
                        "object": "balance_transaction",
                        "amount": 2710,
                        "currency": "usd",
                        "exchange_rate": 1.084,
                        "fee": 109,
                        "net": 2601,
                    },
                }
            ),
        )
    )
    activities = BillingActivities(stack.session_factory, real_stripe, FixedClock(NOW))

    activities.settle_invoice(
        SettleInvoiceInput(
            invoice_id=invoice.invoice_id,
            attempt_number=1,
            payment_intent_id=paid.payment_intent_id or "",
            charge_id=paid.charge_id,
        )
    )

    settled = stored_invoice(stack, invoice.invoice_id)
    assert (settled.status, settled.amount_paid_minor) == (InvoiceStatus.PAID, AMOUNT_MINOR)
    assert len(stored_payments(stack, invoice.invoice_id)) == 1


# -- close_invoice -------------------------------------------------------------------------------


def test_voiding_an_open_invoice(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    close = CloseInvoiceInput(invoice.invoice_id, InvoiceStatus.VOID, "subscription_canceled")

    result = stack.activities.close_invoice(close)
    again = stack.activities.close_invoice(close)

    assert (result.status, result.was_paid) == (InvoiceStatus.VOID, False)
    assert (again.status, again.was_paid) == (InvoiceStatus.VOID, False)
    voided = stored_invoice(stack, invoice.invoice_id)
    assert (voided.status, voided.voided_at, voided.status_reason) == (
        InvoiceStatus.VOID,
        NOW,
        "subscription_canceled",
    )
    assert voided.amount_paid_minor == 0
    # A void invoice cannot be written off instead: its lifecycle is over.
    with pytest.raises(ApplicationError) as raised:
        stack.activities.close_invoice(
            CloseInvoiceInput(invoice.invoice_id, InvoiceStatus.UNCOLLECTIBLE, "late")
        )
    assert_final(raised.value, "ChangeRefused")


def test_closing_a_paid_invoice_reports_it_paid_and_leaves_it_paid(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    settle(stack, invoice.invoice_id, charge(stack, invoice.invoice_id, 1))

    for status in (InvoiceStatus.VOID, InvoiceStatus.UNCOLLECTIBLE):
        result = stack.activities.close_invoice(
            CloseInvoiceInput(invoice.invoice_id, status, "subscription_canceled")
        )
        assert (result.status, result.was_paid) == (InvoiceStatus.PAID, True)

    paid = stored_invoice(stack, invoice.invoice_id)
    assert (paid.status, paid.amount_paid_minor, paid.voided_at) == (
        InvoiceStatus.PAID,
        AMOUNT_MINOR,
        None,
    )


def test_close_invoice_takes_only_void_or_uncollectible(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)

    with pytest.raises(ApplicationError) as raised:
        stack.activities.close_invoice(CloseInvoiceInput(invoice.invoice_id, InvoiceStatus.PAID))

    assert_final(raised.value, "ChangeRefused")
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.OPEN


def test_an_invoice_whose_charge_succeeded_is_not_voided_before_settlement(
    stack: Stack,
) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)
    paid = charge(stack, invoice.invoice_id, 1)
    assert paid.outcome == ChargeOutcomeKind.PAID

    closed = stack.activities.close_invoice(
        CloseInvoiceInput(invoice.invoice_id, InvoiceStatus.VOID, "subscription_canceled")
    )
    assert closed.was_paid
    assert stored_invoice(stack, invoice.invoice_id).status != InvoiceStatus.VOID

    settle(stack, invoice.invoice_id, paid)
    assert stored_invoice(stack, invoice.invoice_id).status == InvoiceStatus.PAID
    assert len(stored_payments(stack, invoice.invoice_id)) == 1


def _authenticate_at_localstripe(stack: Stack, payment_intent_id: str) -> None:
    """What the customer does on-session with 3-D Secure (localstripe's test hook)."""
    intent = stack.stripe.v1.payment_intents.retrieve(payment_intent_id)
    request = urllib.request.Request(
        f"{stack.localstripe.url}{PAYMENT_INTENTS}/{payment_intent_id}/_authenticate",
        data=f"client_secret={intent.client_secret}&success=true".encode(),
        headers={"Authorization": f"Bearer {LOCALSTRIPE_API_KEY}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_a_written_off_invoice_paid_later_becomes_paid(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.REQUIRES_AUTHENTICATION)
    invoice = open_invoice(stack, seeded)
    needs_auth = charge(stack, invoice.invoice_id, 1)
    assert needs_auth.outcome == ChargeOutcomeKind.AUTHENTICATION_REQUIRED
    assert needs_auth.payment_intent_id is not None
    written_off = stack.activities.close_invoice(
        CloseInvoiceInput(invoice.invoice_id, InvoiceStatus.UNCOLLECTIBLE, "dunning_exhausted")
    )
    assert written_off.status == InvoiceStatus.UNCOLLECTIBLE

    _authenticate_at_localstripe(stack, needs_auth.payment_intent_id)
    confirmed = stack.activities.confirm_authenticated_payment(
        ConfirmAuthenticatedPaymentInput(invoice.invoice_id, needs_auth.payment_intent_id)
    )
    assert (confirmed.succeeded, confirmed.attempt_number) == (True, 1)
    stack.activities.settle_invoice(
        SettleInvoiceInput(
            invoice_id=invoice.invoice_id,
            attempt_number=confirmed.attempt_number,
            payment_intent_id=needs_auth.payment_intent_id,
            charge_id=confirmed.charge_id,
        )
    )

    paid = stored_invoice(stack, invoice.invoice_id)
    assert (paid.status, paid.amount_paid_minor, paid.paid_at) == (
        InvoiceStatus.PAID,
        AMOUNT_MINOR,
        NOW,
    )
    assert paid.marked_uncollectible_at == NOW
    [payment] = stored_payments(stack, invoice.invoice_id)
    assert payment.stripe_payment_intent_id == needs_auth.payment_intent_id
    [attempt] = stored_attempts(stack, invoice.invoice_id)
    assert attempt.status == AttemptStatus.SUCCEEDED


# -- notifications, payment methods, subscription mirror -------------------------------------


def test_a_notice_is_enqueued_once_per_dedupe_key(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    invoice = open_invoice(stack, seeded)

    def notice(attempt: int) -> EnqueueNotificationInput:
        return EnqueueNotificationInput(
            kind=NoticeKind.PAYMENT_FAILED,
            customer_id=seeded.customer_id,
            subscription_id=seeded.subscription_id,
            dedupe_key=f"{invoice.invoice_id}:{NoticeKind.PAYMENT_FAILED}:1",
            invoice_id=invoice.invoice_id,
            payload={"attempt": attempt},
        )

    first = stack.activities.enqueue_notification(notice(1))
    again = stack.activities.enqueue_notification(notice(99))

    assert (first.created, again.created) == (True, False)
    assert again.notification_id == first.notification_id
    with unit_of_work(stack.session_factory) as session:
        queued = notifications_repo.list_notifications(session, customer_id=seeded.customer_id)
    assert [(n.id, n.payload, n.sent_at) for n in queued] == [
        (first.notification_id, {"attempt": 1}, None)
    ]


def test_a_card_declined_at_attach_leaves_the_default_card_unchanged(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    declined = cards.create_card_payment_method(stack.stripe, cards.DECLINED_AT_ATTACH)

    with pytest.raises(ApplicationError) as raised:
        stack.activities.attach_payment_method(
            AttachPaymentMethodInput(seeded.subscription_id, seeded.customer_id, declined)
        )

    assert_final(raised.value, "PaymentMethodRejected")
    assert stored_customer(stack, seeded.customer_id).default_payment_method_id == (
        seeded.payment_method_id
    )
    assert seeded.stripe_customer_id is not None
    at_provider = stack.gateway.default_payment_method(
        provider_customer_id=seeded.stripe_customer_id
    )
    assert at_provider == seeded.payment_method_id

    # A good card does replace it, in both places.
    good = cards.create_card_payment_method(stack.stripe, cards.SUCCEEDS)
    attached = stack.activities.attach_payment_method(
        AttachPaymentMethodInput(seeded.subscription_id, seeded.customer_id, good)
    )
    assert (attached.payment_method_id, attached.card_last4) == (good, "4242")
    assert stored_customer(stack, seeded.customer_id).default_payment_method_id == good
    at_provider = stack.gateway.default_payment_method(
        provider_customer_id=seeded.stripe_customer_id
    )
    assert at_provider == good


def test_syncing_an_unknown_subscription_is_not_found(stack: Stack) -> None:
    seeded = seed_subscription(stack)

    with pytest.raises(ApplicationError) as raised:
        stack.activities.sync_subscription(
            SyncSubscriptionInput("sub_does_not_exist", SubscriptionStatus.ACTIVE)
        )

    assert_final(raised.value, "NotFound")
    assert "sub_does_not_exist" in str(raised.value)

    period_end = FIRST_PERIOD_START + relativedelta(months=1)
    synced = stack.activities.sync_subscription(
        SyncSubscriptionInput(
            seeded.subscription_id,
            SubscriptionStatus.PAST_DUE,
            current_period_start=FIRST_PERIOD_START,
            current_period_end=period_end,
            next_billing_at=period_end,
        )
    )
    assert synced.updated
    with unit_of_work(stack.session_factory) as session:
        mirrored = subscriptions_repo.get_subscription(session, seeded.subscription_id)
    assert mirrored is not None
    assert (mirrored.status, mirrored.next_billing_at, mirrored.updated_at) == (
        SubscriptionStatus.PAST_DUE,
        period_end,
        NOW,
    )


@BOTH_BACKENDS
def test_a_cancel_voids_an_open_invoice_the_workflow_never_charged(stack: Stack) -> None:
    """An orphan: the period's invoice written by a local activity whose workflow task was then
    discarded, the next task applying an immediate cancel first (chaos run, seed 77416468: the
    subscription canceled, its invoice open for good). The cancel's sync voids it, with its
    event; an invoice a charge was attempted for is left to the workflow."""
    from db.repositories import events as events_repo

    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    declined = open_invoice(stack, seeded)
    charge(stack, declined.invoice_id, 1)
    orphan = open_invoice(stack, seeded, period_index=1)

    for _ in range(2):  # a local activity runs again: the second sync changes nothing
        stack.activities.sync_subscription(
            SyncSubscriptionInput(
                seeded.subscription_id,
                SubscriptionStatus.CANCELED,
                canceled_at=NOW,
                ended_at=NOW,
                cancel_reason="customer left",
                changed_at=NOW,
            )
        )

    assert stored_invoice(stack, orphan.invoice_id).status == InvoiceStatus.VOID
    assert stored_invoice(stack, declined.invoice_id).status == InvoiceStatus.OPEN
    with stack.session_factory() as session:
        voided = events_repo.list_events(session, limit=100, type="invoice.voided")
    assert [e.object_id for e in voided] == [orphan.invoice_id]
