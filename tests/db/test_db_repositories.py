"""Repositories: records in, records out; idempotent inserts return (existing, False)."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, inspect, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from billing.calendar import IntervalUnit
from billing.dunning import DunningPolicy, FinalAction
from billing.errors import ChangeRefused, InvalidInput, NotFound
from billing.ids import new_id
from billing.invoices import InvoiceStatus
from billing.payments import ChargeOutcomeKind
from billing.plans import Plan
from billing.records import (
    AttemptStatus,
    CustomerRecord,
    InvoiceRecord,
    NotificationRecord,
    PaymentAttemptRecord,
    PaymentRecord,
    SubscriptionRecord,
)
from billing.subscription import SubscriptionStatus
from db.base import Base
from db.engine import unit_of_work
from db.models import (
    CustomerRow,
    InvoiceRow,
    NotificationRow,
    PaymentAttemptRow,
    PaymentRow,
    SubscriptionRow,
)
from db.repositories import (
    attempts,
    customers,
    invoices,
    notifications,
    payments,
    plans,
    subscriptions,
)


@pytest.mark.parametrize(
    ("record_type", "model"),
    [
        (CustomerRecord, CustomerRow),
        (SubscriptionRecord, SubscriptionRow),
        (InvoiceRecord, InvoiceRow),
        (PaymentAttemptRecord, PaymentAttemptRow),
        (PaymentRecord, PaymentRow),
        (NotificationRecord, NotificationRow),
    ],
)
def test_record_fields_are_the_table_columns(record_type: type, model: type[Base]) -> None:
    """Rows become records by column name, so the two must never drift apart."""
    assert {f.name for f in dataclasses.fields(record_type)} == set(inspect(model).columns.keys())


# ---- customers ------------------------------------------------------------------------------


def test_customer_round_trip_and_lookup_by_external_id(session: Session, factory: Any) -> None:
    customer = factory.customer(session, external_id="crm-42", email=None)
    assert customers.get_customer(session, customer.id) == customer
    assert customers.get_customer_by_external_id(session, "crm-42") == customer
    assert customers.get_customer_by_external_id(session, "crm-43") is None
    assert customers.get_customer(session, "cus_missing") is None
    assert customer.next_invoice_sequence == 1


def test_inserting_a_customer_twice_returns_the_first(session: Session, factory: Any) -> None:
    first = factory.customer(session, external_id="crm-7")

    same_id, created = customers.insert_customer(
        session, dataclasses.replace(first, name="Someone Else")
    )
    assert (same_id, created) == (first, False)

    # A retried signup that minted a new id still finds the customer by external id.
    other_id = new_id("cus")
    same_ref, created = customers.insert_customer(
        session, dataclasses.replace(first, id=other_id, invoice_prefix="NEWPREFX")
    )
    assert (same_ref, created) == (first, False)
    assert customers.get_customer(session, other_id) is None


def test_the_first_stripe_customer_id_wins(session: Session, factory: Any) -> None:
    customer = factory.customer(session)
    assert customers.set_stripe_customer_id(session, customer.id, "cus_stripe_1") == "cus_stripe_1"
    # A racing worker created a second provider customer: it is told to use the first.
    assert customers.set_stripe_customer_id(session, customer.id, "cus_stripe_2") == "cus_stripe_1"
    stored = customers.get_customer(session, customer.id)
    assert stored is not None and stored.stripe_customer_id == "cus_stripe_1"
    with pytest.raises(NotFound):
        customers.set_stripe_customer_id(session, "cus_missing", "cus_stripe_3")


def test_default_payment_method_is_replaced(session: Session, factory: Any) -> None:
    customer = factory.customer(session)
    later = factory.t0 + timedelta(days=3)
    customers.set_default_payment_method(session, customer.id, "pm_1")
    customers.set_default_payment_method(session, customer.id, "pm_2", now=later)
    stored = customers.get_customer(session, customer.id)
    assert stored is not None
    assert stored.default_payment_method_id == "pm_2"
    assert stored.updated_at == later
    with pytest.raises(NotFound):
        customers.set_default_payment_method(session, "cus_missing", "pm_3")


# ---- plans ------------------------------------------------------------------------------------


def test_plan_round_trips_with_its_dunning_policy(session: Session) -> None:
    plan = Plan(
        "team-weekly",
        "Team (weekly)",
        1500,
        "EUR",
        IntervalUnit.WEEK,
        interval_count=2,
        trial_days=7,
        dunning=DunningPolicy([2, 4, 8], FinalAction.MARK_UNPAID),
    )
    plans.upsert_plan(session, plan)
    assert plans.get_plan(session, "team-weekly") == plan
    assert plans.get_plan(session, "nope") is None


def test_upsert_overwrites_by_code_and_list_is_ordered(session: Session) -> None:
    basic = Plan("basic-monthly", "Basic", 900, "USD", IntervalUnit.MONTH)
    pro = Plan("pro-annual", "Pro", 29000, "USD", IntervalUnit.YEAR)
    plans.upsert_plan(session, pro)
    plans.upsert_plan(session, basic)
    repriced = dataclasses.replace(basic, amount_minor=1200)
    plans.upsert_plan(session, repriced, active=False)

    assert plans.list_plans(session) == [repriced, pro]
    assert plans.list_plans(session, active_only=True) == [pro]


# ---- subscriptions ------------------------------------------------------------------------------


def test_subscription_insert_is_idempotent_on_the_signup_key(
    session: Session, factory: Any
) -> None:
    subscription = factory.subscription(
        session, signup_idempotency_key="signup-1", signup_request_hash="a" * 64
    )
    assert subscriptions.get_subscription(session, subscription.id) == subscription
    assert subscriptions.get_subscription_by_signup_key(session, "signup-1") == subscription

    retry = dataclasses.replace(subscription, id=new_id("sub"), workflow_id="subscription-other")
    assert subscriptions.insert_subscription(session, retry) == (subscription, False)
    assert subscriptions.get_subscription(session, retry.id) is None


def test_a_signup_lease_is_held_by_one_until_released_or_lapsed(
    session: Session, factory: Any
) -> None:
    customer = factory.customer(session)
    t0 = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
    held = {"now": t0, "expires_at": t0 + timedelta(minutes=2)}
    assert customers.take_signup_lease(session, customer.id, "a", **held) is True
    assert customers.take_signup_lease(session, customer.id, "a", **held) is True  # its own
    assert customers.take_signup_lease(session, customer.id, "b", **held) is False
    customers.release_signup_lease(session, customer.id, "b")  # not b's to release
    assert customers.take_signup_lease(session, customer.id, "b", **held) is False
    # A holder that died: its lease lapses.
    later = {"now": t0 + timedelta(minutes=2), "expires_at": t0 + timedelta(minutes=4)}
    assert customers.take_signup_lease(session, customer.id, "b", **later) is True
    customers.release_signup_lease(session, customer.id, "b")
    assert customers.take_signup_lease(session, customer.id, "c", **held) is True
    assert customers.take_signup_lease(session, "cus_missing", "c", **held) is None


def test_only_an_unused_customer_without_a_provider_customer_is_deleted(
    session: Session, factory: Any
) -> None:
    bare = factory.customer(session)
    linked = factory.customer(session, stripe_customer_id="cus_provider_1")
    subscribed = factory.subscription(session).customer_id
    assert customers.delete_customer_without_subscriptions(session, linked.id) is False
    assert customers.delete_customer_without_subscriptions(session, subscribed) is False
    assert customers.delete_customer_without_subscriptions(session, bare.id) is True
    assert customers.get_customer(session, bare.id) is None


def test_signup_keys_are_scoped_and_legacy_keys_match_any_sender(
    session: Session, factory: Any
) -> None:
    mine = factory.subscription(
        session, signup_idempotency_key="k", signup_key_scope="api-a", signup_request_hash="a"
    )
    theirs = factory.subscription(
        session, signup_idempotency_key="k", signup_key_scope="api-b", signup_request_hash="b"
    )
    assert subscriptions.get_subscription_by_signup_key(session, "k", "api-a") == mine
    assert subscriptions.get_subscription_by_signup_key(session, "k", "api-b") == theirs
    assert subscriptions.get_subscription_by_signup_key(session, "k", "api-c") is None
    legacy = factory.subscription(session, signup_idempotency_key="old", signup_request_hash="c")
    with session.begin_nested():
        session.execute(
            update(SubscriptionRow)
            .where(SubscriptionRow.id == legacy.id)
            .values(signup_key_scope=None)
        )
    found = subscriptions.get_subscription_by_signup_key(session, "old", "api-c")
    assert found is not None and found.id == legacy.id


def test_subscription_state_is_mirrored(session: Session, factory: Any) -> None:
    subscription = factory.subscription(session, status=SubscriptionStatus.TRIALING)
    start = factory.t0 + timedelta(days=14)
    now = start + timedelta(minutes=1)

    updated = subscriptions.update_subscription_state(
        session,
        subscription.id,
        status=SubscriptionStatus.ACTIVE,
        current_period_start=start,
        current_period_end=start + timedelta(days=28),
        next_billing_at=start + timedelta(days=28),
        cancel_at_period_end=True,
        canceled_at=None,
        ended_at=None,
        paused_at=None,
        cancel_reason="customer asked",
        now=now,
    )

    assert updated is True
    assert subscriptions.get_subscription(session, subscription.id) == dataclasses.replace(
        subscription,
        status=SubscriptionStatus.ACTIVE,
        current_period_start=start,
        current_period_end=start + timedelta(days=28),
        next_billing_at=start + timedelta(days=28),
        cancel_at_period_end=True,
        cancel_reason="customer asked",
        updated_at=now,
    )


def _sync(session: Session, subscription_id: str, status: SubscriptionStatus, at: Any) -> bool:
    return subscriptions.update_subscription_state(
        session,
        subscription_id,
        status=status,
        current_period_start=None,
        current_period_end=None,
        next_billing_at=None,
        cancel_at_period_end=False,
        canceled_at=at if status == SubscriptionStatus.CANCELED else None,
        ended_at=at if status == SubscriptionStatus.CANCELED else None,
        paused_at=None,
        cancel_reason=None,
        now=at,
    )


def test_a_canceled_subscription_is_not_revived_by_a_late_sync(
    session: Session, factory: Any
) -> None:
    subscription = factory.subscription(session)
    canceled_at = factory.t0 + timedelta(days=40)
    assert _sync(session, subscription.id, SubscriptionStatus.CANCELED, canceled_at)

    assert not _sync(session, subscription.id, SubscriptionStatus.ACTIVE, canceled_at)
    stored = subscriptions.get_subscription(session, subscription.id)
    assert stored is not None and stored.status == SubscriptionStatus.CANCELED
    assert not _sync(session, "sub_missing", SubscriptionStatus.ACTIVE, canceled_at)


def test_status_changes_are_logged_once_each_at_the_decided_instant(
    session: Session, factory: Any
) -> None:
    subscription = factory.subscription(session, status=SubscriptionStatus.PENDING)
    t0 = factory.t0
    steps = [
        (SubscriptionStatus.ACTIVE, t0),
        (SubscriptionStatus.ACTIVE, t0 + timedelta(days=30)),  # a period sync: no change
        (SubscriptionStatus.PAST_DUE, t0 + timedelta(days=60)),
        (SubscriptionStatus.PAST_DUE, t0 + timedelta(days=60)),  # a retried sync
        (SubscriptionStatus.ACTIVE, t0 + timedelta(days=63)),
        (SubscriptionStatus.CANCELED, t0 + timedelta(days=90)),
        (SubscriptionStatus.ACTIVE, t0 + timedelta(days=91)),  # a late sync: refused
    ]
    for status, at in steps:
        _sync(session, subscription.id, status, at)

    changes = subscriptions.list_status_changes(session, subscription.id)
    assert [(c.from_status, c.to_status, c.changed_at) for c in changes] == [
        (SubscriptionStatus.PENDING, SubscriptionStatus.ACTIVE, t0),
        (SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE, t0 + timedelta(days=60)),
        (SubscriptionStatus.PAST_DUE, SubscriptionStatus.ACTIVE, t0 + timedelta(days=63)),
        (SubscriptionStatus.ACTIVE, SubscriptionStatus.CANCELED, t0 + timedelta(days=90)),
    ]
    assert subscriptions.list_status_changes(session, "sub_missing") == []


def test_only_a_pending_subscription_can_be_deleted(session: Session, factory: Any) -> None:
    pending = factory.subscription(session, status=SubscriptionStatus.PENDING)
    active = factory.subscription(session)
    assert subscriptions.delete_pending_subscription(session, pending.id) is True
    assert subscriptions.delete_pending_subscription(session, active.id) is False
    assert subscriptions.get_subscription(session, pending.id) is None
    assert subscriptions.get_subscription(session, active.id) == active


# ---- invoices -----------------------------------------------------------------------------------


def test_insert_invoice_is_idempotent_per_period(session: Session, factory: Any) -> None:
    subscription = factory.subscription(session)
    number = customers.allocate_invoice_number(session, subscription.customer_id)
    draft = factory.invoice_record(subscription, 0, number=number)

    first, created = invoices.insert_invoice(session, draft)
    assert created is True
    assert first == draft

    retry = dataclasses.replace(draft, id=new_id("in"), number="RETRY-0001", amount_due_minor=1)
    assert invoices.insert_invoice(session, retry) == (first, False)
    assert invoices.get_invoice_for_period(session, subscription.id, draft.period_start) == first
    assert invoices.get_invoice(session, retry.id) is None


def test_invoices_are_listed_in_period_order(session: Session, factory: Any) -> None:
    subscription = factory.subscription(session)
    later = factory.invoice(session, subscription, 2)
    earlier = factory.invoice(session, subscription, 1)
    assert invoices.list_invoices_for_subscription(session, subscription.id) == [earlier, later]


def test_invoice_lifecycle_stamps_each_transition(session: Session, factory: Any) -> None:
    invoice = factory.invoice(session)
    finalized_at = factory.t0 + timedelta(hours=1)
    paid_at = factory.t0 + timedelta(hours=2)

    opened = invoices.transition_invoice(
        session, invoice.id, to=InvoiceStatus.OPEN, at=finalized_at
    )
    paid = invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.PAID, at=paid_at)

    assert opened.status == InvoiceStatus.OPEN
    assert opened.finalized_at == finalized_at
    assert paid.status == InvoiceStatus.PAID
    assert paid.paid_at == paid_at
    assert paid.finalized_at == finalized_at
    assert paid.amount_paid_minor == invoice.amount_due_minor
    assert invoices.get_invoice(session, invoice.id) == paid


def test_a_paid_invoice_cannot_be_voided_and_stays_unchanged(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    with unit_of_work(session_factory) as session:
        invoice = factory.invoice(session)
        invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.OPEN, at=factory.t0)
        paid = invoices.transition_invoice(
            session, invoice.id, to=InvoiceStatus.PAID, at=factory.t0
        )

    with (
        pytest.raises(ChangeRefused, match="is paid and cannot become void"),
        unit_of_work(session_factory) as session,
    ):
        invoices.transition_invoice(
            session,
            invoice.id,
            to=InvoiceStatus.VOID,
            at=factory.t0 + timedelta(days=1),
            reason="customer disputed",
        )

    with unit_of_work(session_factory) as session:
        assert invoices.get_invoice(session, invoice.id) == paid


def test_repeating_a_transition_changes_nothing(session: Session, factory: Any) -> None:
    invoice = factory.invoice(session)
    opened = invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.OPEN, at=factory.t0)
    again = invoices.transition_invoice(
        session, invoice.id, to=InvoiceStatus.OPEN, at=factory.t0 + timedelta(days=1)
    )
    assert again == opened


def test_uncollectible_invoice_can_still_be_paid(session: Session, factory: Any) -> None:
    invoice = factory.invoice(session)
    invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.OPEN, at=factory.t0)
    given_up = invoices.transition_invoice(
        session,
        invoice.id,
        to=InvoiceStatus.UNCOLLECTIBLE,
        at=factory.t0 + timedelta(days=14),
        reason="dunning exhausted",
    )
    paid = invoices.transition_invoice(
        session, invoice.id, to=InvoiceStatus.PAID, at=factory.t0 + timedelta(days=20)
    )
    assert given_up.status_reason == "dunning exhausted"
    assert given_up.marked_uncollectible_at == factory.t0 + timedelta(days=14)
    assert paid.status == InvoiceStatus.PAID
    assert paid.marked_uncollectible_at == given_up.marked_uncollectible_at


def test_paying_more_than_due_is_refused(session: Session, factory: Any) -> None:
    invoice = factory.invoice(session)
    invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.OPEN, at=factory.t0)
    with pytest.raises(InvalidInput, match="2901"):
        invoices.transition_invoice(
            session, invoice.id, to=InvoiceStatus.PAID, at=factory.t0, amount_paid_minor=2901
        )


def test_transition_of_an_unknown_invoice_says_so(session: Session) -> None:
    with pytest.raises(NotFound, match="in_missing"):
        invoices.transition_invoice(session, "in_missing", to=InvoiceStatus.OPEN, at=None)  # type: ignore[arg-type]


# PostgreSQL only: SQLite takes the write lock at BEGIN, so the two cannot interleave there.
@pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_void_loses_to_a_payment_committed_after_it_read_the_invoice(
    backend: str,
    session_factory: sessionmaker[Session],
    factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compare-and-set: a worker read the invoice as open, then another worker's payment
    committed before its UPDATE. The void must be refused, not overwrite the payment."""
    with unit_of_work(session_factory) as session:
        invoice = factory.invoice(session)
        invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.OPEN, at=factory.t0)

    real_get_invoice = invoices.get_invoice
    payment_landed = False

    def get_invoice_then_get_paid(session: Session, invoice_id: str) -> InvoiceRecord | None:
        nonlocal payment_landed
        seen = real_get_invoice(session, invoice_id)
        if not payment_landed:
            payment_landed = True
            with unit_of_work(session_factory) as other:
                invoices.transition_invoice(other, invoice_id, to=InvoiceStatus.PAID, at=factory.t0)
        return seen

    monkeypatch.setattr(invoices, "get_invoice", get_invoice_then_get_paid)
    with (
        pytest.raises(ChangeRefused, match="is paid"),
        unit_of_work(session_factory) as session,
    ):
        invoices.transition_invoice(session, invoice.id, to=InvoiceStatus.VOID, at=factory.t0)
    monkeypatch.undo()

    with unit_of_work(session_factory) as session:
        stored = invoices.get_invoice(session, invoice.id)
    assert stored is not None
    assert stored.status == InvoiceStatus.PAID
    assert stored.voided_at is None


# ---- attempts ---------------------------------------------------------------------------------


def test_a_retried_attempt_reuses_the_first_row_and_its_key(session: Session, factory: Any) -> None:
    invoice = factory.invoice(session)
    first = factory.attempt(session, invoice, 1)
    assert first.status == AttemptStatus.PENDING

    retry = factory.attempt_record(invoice, 1, id=new_id("pa"), reason="retry")
    assert attempts.insert_pending_attempt(session, retry) == (first, False)
    assert attempts.get_attempt(session, invoice.id, 1) == first
    assert attempts.get_attempt(session, invoice.id, 2) is None


def test_a_duplicate_insert_leaves_the_transaction_usable(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    """The duplicate is answered without aborting the caller's transaction (one statement,
    ``ON CONFLICT DO NOTHING``, no savepoint): what follows in it still commits."""
    with unit_of_work(session_factory) as session:
        invoice = factory.invoice(session)
        first = factory.attempt(session, invoice, 1)
    with unit_of_work(session_factory) as session:
        again = factory.attempt_record(invoice, 1, id=new_id("pa"))
        assert attempts.insert_pending_attempt(session, again) == (first, False)
        second = factory.attempt(session, invoice, 2)
    with unit_of_work(session_factory) as session:
        assert attempts.get_attempt(session, invoice.id, 2) == second


def test_an_insert_once_is_one_statement(session: Session, factory: Any) -> None:
    """A billing cycle makes several of these: one round trip each (no SAVEPOINT and
    RELEASE around the INSERT), whether it inserts or finds the row there."""
    invoice = factory.invoice(session)
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement.split(None, 1)[0].upper())

    bind = session.get_bind()
    event.listen(bind, "before_cursor_execute", count)
    try:
        factory.attempt(session, invoice, 1)
        assert sent == ["INSERT"]
    finally:
        event.remove(bind, "before_cursor_execute", count)


def test_an_insert_that_breaks_another_rule_still_raises(session: Session, factory: Any) -> None:
    """Only a unique constraint's duplicate is answered with the existing row: a foreign key
    to nothing raises, as it did inside a savepoint."""
    invoice = factory.invoice(session)
    orphan = factory.attempt_record(invoice, 1, invoice_id="in_missing")
    with pytest.raises(IntegrityError):
        attempts.insert_pending_attempt(session, orphan)


def test_twenty_concurrent_inserts_of_one_attempt_store_one(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    with unit_of_work(session_factory) as session:
        invoice = factory.invoice(session)
    barrier = threading.Barrier(20)

    def insert(_: int) -> tuple[str, bool]:
        with unit_of_work(session_factory) as session:
            barrier.wait(timeout=30)
            record, created = attempts.insert_pending_attempt(
                session, factory.attempt_record(invoice, 1, id=new_id("pa"))
            )
            return record.id, created

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(insert, range(20)))
    assert sum(created for _, created in results) == 1
    assert len({record_id for record_id, _ in results}) == 1


def test_attempt_outcomes_are_recorded(session: Session, factory: Any) -> None:
    invoice = factory.invoice(session)
    second = factory.attempt(session, invoice, 2)
    first = factory.attempt(session, invoice, 1)
    done_at = factory.t0 + timedelta(seconds=3)

    declined = attempts.record_attempt_outcome(
        session,
        first.id,
        status=AttemptStatus.FAILED,
        outcome=ChargeOutcomeKind.SOFT_DECLINE,
        decline_code="insufficient_funds",
        failure_message="Your card has insufficient funds.",
        payment_intent_id="pi_1",
        charge_id="ch_1",
        payment_method_id="pm_1",
        completed_at=done_at,
    )
    assert declined == dataclasses.replace(
        first,
        status=AttemptStatus.FAILED,
        outcome=ChargeOutcomeKind.SOFT_DECLINE,
        decline_code="insufficient_funds",
        failure_message="Your card has insufficient funds.",
        stripe_payment_intent_id="pi_1",
        stripe_charge_id="ch_1",
        payment_method_id="pm_1",
        completed_at=done_at,
    )
    assert attempts.list_attempts_for_invoice(session, invoice.id) == [declined, second]
    assert attempts.get_attempt_by_payment_intent(session, "pi_1") == declined
    assert attempts.get_attempt_by_payment_intent(session, "pi_other") is None


def test_authentication_then_success_keeps_the_payment_intent(
    session: Session, factory: Any
) -> None:
    attempt = factory.attempt(session, factory.invoice(session))
    attempts.record_attempt_outcome(
        session,
        attempt.id,
        status="requires_action",
        outcome=ChargeOutcomeKind.AUTHENTICATION_REQUIRED,
        decline_code="authentication_required",
        failure_message=None,
        payment_intent_id="pi_sca",
        charge_id=None,
        payment_method_id="pm_1",
        completed_at=factory.t0,
    )
    succeeded = attempts.record_attempt_outcome(
        session,
        attempt.id,
        status=AttemptStatus.SUCCEEDED,
        outcome=ChargeOutcomeKind.PAID,
        decline_code=None,
        failure_message=None,
        payment_intent_id=None,
        charge_id="ch_sca",
        payment_method_id=None,
        completed_at=factory.t0 + timedelta(minutes=5),
    )
    assert succeeded.status == AttemptStatus.SUCCEEDED
    assert succeeded.stripe_payment_intent_id == "pi_sca"
    assert succeeded.payment_method_id == "pm_1"
    assert succeeded.stripe_charge_id == "ch_sca"
    assert succeeded.decline_code is None


def test_a_succeeded_attempt_cannot_be_marked_failed(
    session_factory: sessionmaker[Session], factory: Any
) -> None:
    outcome: dict[str, Any] = {
        "decline_code": None,
        "failure_message": None,
        "payment_intent_id": "pi_ok",
        "charge_id": "ch_ok",
        "payment_method_id": "pm_1",
        "completed_at": factory.t0,
    }
    with unit_of_work(session_factory) as session:
        attempt = factory.attempt(session, factory.invoice(session))
        succeeded = attempts.record_attempt_outcome(
            session, attempt.id, status="succeeded", outcome=ChargeOutcomeKind.PAID, **outcome
        )
        # Recording the same success again (an activity retry) is fine.
        again = attempts.record_attempt_outcome(
            session, attempt.id, status="succeeded", outcome=ChargeOutcomeKind.PAID, **outcome
        )
        assert again == succeeded

    with (
        pytest.raises(ChangeRefused, match="already succeeded"),
        unit_of_work(session_factory) as session,
    ):
        attempts.record_attempt_outcome(
            session,
            attempt.id,
            status="failed",
            outcome=ChargeOutcomeKind.SOFT_DECLINE,
            **outcome,
        )
    with unit_of_work(session_factory) as session:
        assert attempts.get_attempt(session, attempt.invoice_id, 1) == succeeded
        with pytest.raises(NotFound):
            attempts.record_attempt_outcome(
                session, "pa_missing", status="failed", outcome=None, **outcome
            )


# ---- payments ---------------------------------------------------------------------------------


def test_an_invoice_books_one_payment_only(session: Session, factory: Any) -> None:
    invoice = factory.invoice(session)
    first_attempt = factory.attempt(session, invoice, 1)
    second_attempt = factory.attempt(session, invoice, 2)

    payment, created = payments.insert_payment(
        session, factory.payment_record(invoice, first_attempt, fee_minor=114, net_minor=2786)
    )
    assert created is True
    assert payment.fee_minor == 114 and payment.net_minor == 2786

    # A second success for the same invoice is not booked; the caller sees the first.
    duplicate = factory.payment_record(invoice, second_attempt)
    assert payments.insert_payment(session, duplicate) == (payment, False)
    assert payments.get_payment_for_invoice(session, invoice.id) == payment
    assert payments.list_payments_for_invoice(session, invoice.id) == [payment]


# ---- notifications ----------------------------------------------------------------------------


def test_a_notice_is_enqueued_once_per_dedupe_key(session: Session, factory: Any) -> None:
    invoice = factory.invoice(session)
    notice = NotificationRecord(
        id=new_id("ntf"),
        kind="payment_failed",
        customer_id=invoice.customer_id,
        subscription_id=invoice.subscription_id,
        invoice_id=invoice.id,
        dedupe_key=f"payment_failed:{invoice.id}:1",
        payload={"amount_minor": 2900, "currency": "USD", "retry_days": [1, 3]},
        created_at=factory.t0,
    )
    stored, created = notifications.enqueue_notification(session, notice)
    assert (stored, created) == (notice, True)

    replay = dataclasses.replace(notice, id=new_id("ntf"), payload={})
    assert notifications.enqueue_notification(session, replay) == (notice, False)


def test_notices_are_filtered_and_oldest_first(session: Session, factory: Any) -> None:
    subscription = factory.subscription(session)
    other = factory.subscription(session)

    def notice(kind: str, customer_id: str, minutes: int, sub: str | None) -> NotificationRecord:
        record, _ = notifications.enqueue_notification(
            session,
            NotificationRecord(
                id=new_id("ntf"),
                kind=kind,
                customer_id=customer_id,
                subscription_id=sub,
                dedupe_key=new_id("key"),
                created_at=factory.t0 + timedelta(minutes=minutes),
            ),
        )
        return record

    late = notice("payment_failed", subscription.customer_id, 5, subscription.id)
    early = notice("trial_ending", subscription.customer_id, 1, subscription.id)
    other_customer = notice("payment_failed", other.customer_id, 3, other.id)

    assert notifications.list_notifications(session) == [early, other_customer, late]
    assert notifications.list_notifications(session, customer_id=subscription.customer_id) == [
        early,
        late,
    ]
    assert notifications.list_notifications(session, kind="payment_failed") == [
        other_customer,
        late,
    ]
    assert notifications.list_notifications(
        session, subscription_id=subscription.id, kind="trial_ending"
    ) == [early]
