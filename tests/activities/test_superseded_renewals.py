# The ``stack`` fixture is imported from the activities' main test module; each test's
# ``stack`` parameter is that fixture, not a redefinition.
# ruff: noqa: F811
"""Renewals written by a workflow task that was then discarded (migration 0022).

``create_invoice`` runs as a local activity inside the workflow task that decides the period's
invoice. A task can be discarded after that write (worker killed, server restarted), and the
task that replaces it can decide otherwise: a plan or seat change applied first bills the
period at other terms, a pause or an interval change does not bill it at all. The lost task's
row was never charged (charges are ordinary activities, scheduled only by completed tasks):

- ``create_invoice`` asked for the period at other terms voids it as ``superseded`` and issues
  the invoice asked for, instead of adopting the amount first written;
- every sync names the open invoice the workflow is collecting, and any other open invoice of
  the subscription that no charge was attempted for is voided;
- neither ever voids an invoice a charge was attempted for, even racing the charge.

Real activities, a real database (both backends) and localstripe."""

from __future__ import annotations

import threading

from temporalio.exceptions import ApplicationError

from billing.balance import BalanceEntryKind
from billing.contracts import CreateInvoiceResult, SyncSubscriptionInput
from billing.ids import invoice_id_for
from billing.invoices import InvoiceLine, InvoiceLineKind, InvoiceStatus, bills_the_same
from billing.subscription import SubscriptionStatus
from billing.testing import cards
from db.engine import unit_of_work
from db.repositories import balances as balances_repo
from db.repositories import events as events_repo
from db.repositories import invoices as invoices_repo
from tests.activities.test_billing_activities import (
    FIRST_PERIOD_START,
    NOW,
    Stack,
    charge,
    invoice_input,
    open_invoice,
    provider_intents,
    seed_subscription,
    stack,  # noqa: F401  (a fixture, used by its name)
    stored_attempts,
    stored_invoice,
)
from tests.conftest import BOTH_BACKENDS


def events_of(stack: Stack, subscription_id: str) -> list[tuple[str, str]]:
    with stack.session_factory() as session:
        found = events_repo.list_events(session, limit=500)
    return [
        (e.type, e.object_id)
        for e in sorted(found, key=lambda e: e.sequence)
        if e.subscription_id == subscription_id and e.type.startswith("invoice.")
    ]


def renewals(stack: Stack, subscription_id: str) -> list[tuple[str, InvoiceStatus, int]]:
    with unit_of_work(stack.session_factory) as session:
        found = invoices_repo.list_invoices_for_subscription(session, subscription_id)
    return [(i.id, i.status, i.subtotal_minor) for i in sorted(found, key=lambda i: i.number)]


def sync(stack: Stack, subscription_id: str, **fields: object) -> None:
    stack.activities.sync_subscription(
        SyncSubscriptionInput(
            subscription_id,
            fields.pop("status", SubscriptionStatus.ACTIVE),  # type: ignore[arg-type]
            changed_at=NOW,
            **fields,  # type: ignore[arg-type]
        )
    )


def line(amount: int, plan: str = "p", quantity: int = 1) -> InvoiceLine:
    return InvoiceLine(
        kind=InvoiceLineKind.SUBSCRIPTION,
        description="Plan",
        amount_minor=amount,
        period_start=NOW,
        period_end=NOW,
        plan_code=plan,
        quantity=quantity,
        unit_amount_minor=amount // quantity,
    )


def test_bills_the_same_compares_lines_not_instants() -> None:
    import dataclasses
    from datetime import timedelta

    first = [line(900)]
    assert bills_the_same(first, [line(900)])
    # Another period end (a worker with newer tzdata): the same invoice.
    shifted = dataclasses.replace(first[0], period_end=NOW + timedelta(hours=1))
    assert bills_the_same(first, [shifted])
    assert not bills_the_same(first, [line(2900)])
    assert not bills_the_same(first, [line(900, plan="q")])
    assert not bills_the_same(first, [line(1800, quantity=2)])
    proration = dataclasses.replace(line(-300), kind=InvoiceLineKind.PRORATION, change_id="c1")
    assert not bills_the_same(first, [*first, proration])
    assert not bills_the_same([], first)


@BOTH_BACKENDS
def test_a_renewal_asked_at_other_terms_voids_the_first_and_issues_the_one_asked(
    stack: Stack,
) -> None:
    """The lost task wrote the period at 1000; the task that replaced it applied a change
    first and asks for 2600. Without the supersede, the 1000 invoice was adopted and charged."""
    seeded = seed_subscription(stack)
    lost = open_invoice(stack, seeded, amount_minor=1000)

    asked = invoice_input(seeded, amount_minor=2600)
    results: list[CreateInvoiceResult] = [stack.activities.create_invoice(asked) for _ in range(3)]

    issued = results[0]
    assert issued.created and issued.invoice_id != lost.invoice_id
    assert issued.invoice_id == invoice_id_for(seeded.subscription_id, FIRST_PERIOD_START, 1)
    assert (issued.status, issued.amount_due_minor) == (InvoiceStatus.OPEN, 2600)
    # Asked again (a re-run local activity): the same invoice, nothing more voided or issued.
    assert [(r.invoice_id, r.created) for r in results[1:]] == [(issued.invoice_id, False)] * 2
    first = stored_invoice(stack, lost.invoice_id)
    assert (first.status, first.status_reason) == (InvoiceStatus.VOID, "superseded")
    # The voided invoice keeps its number: the sequence stays gap-free.
    assert (lost.number[-4:], issued.number[-4:]) == ("0001", "0002")
    assert events_of(stack, seeded.subscription_id) == [
        ("invoice.created", lost.invoice_id),
        ("invoice.finalized", lost.invoice_id),
        ("invoice.voided", lost.invoice_id),
        ("invoice.created", issued.invoice_id),
        ("invoice.finalized", issued.invoice_id),
    ]

    # The terms flip back (yet another discarded task): a third invoice, no id collision.
    back = stack.activities.create_invoice(invoice_input(seeded, amount_minor=1000))
    assert back.created and back.amount_due_minor == 1000
    assert back.invoice_id == invoice_id_for(seeded.subscription_id, FIRST_PERIOD_START, 2)
    assert [status for _, status, _ in renewals(stack, seeded.subscription_id)] == [
        InvoiceStatus.VOID,
        InvoiceStatus.VOID,
        InvoiceStatus.OPEN,
    ]


@BOTH_BACKENDS
def test_the_same_terms_adopt_the_lost_tasks_invoice(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    lost = open_invoice(stack, seeded)
    again = stack.activities.create_invoice(invoice_input(seeded))
    assert (again.invoice_id, again.created) == (lost.invoice_id, False)
    assert stored_invoice(stack, lost.invoice_id).status == InvoiceStatus.OPEN


@BOTH_BACKENDS
def test_a_renewal_a_charge_was_attempted_for_is_never_superseded(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    known = open_invoice(stack, seeded)
    charge(stack, known.invoice_id, 1)

    asked = stack.activities.create_invoice(invoice_input(seeded, amount_minor=2600))

    assert (asked.invoice_id, asked.created) == (known.invoice_id, False)
    assert stored_invoice(stack, known.invoice_id).status == InvoiceStatus.OPEN
    assert len(renewals(stack, seeded.subscription_id)) == 1


@BOTH_BACKENDS
def test_superseding_gives_the_credit_back_before_the_new_invoice_uses_it(stack: Stack) -> None:
    seeded = seed_subscription(stack)
    with unit_of_work(stack.session_factory) as session:
        balances_repo.record_entry(
            session,
            customer_id=seeded.customer_id,
            currency="USD",
            amount_minor=600,
            kind=BalanceEntryKind.ADJUSTMENT,
            source_key="test:credit",
            description="goodwill",
            at=NOW,
        )
    lost = open_invoice(stack, seeded, amount_minor=1000)
    assert lost.amount_due_minor == 400

    issued = stack.activities.create_invoice(invoice_input(seeded, amount_minor=2600))

    assert issued.amount_due_minor == 2000  # the 600 of credit, applied once
    with unit_of_work(stack.session_factory) as session:
        assert balances_repo.credit_balance(session, seeded.customer_id, "USD") == 0


@BOTH_BACKENDS
def test_a_sync_voids_the_open_invoices_the_workflow_does_not_collect(stack: Stack) -> None:
    seeded = seed_subscription(stack, card=cards.DECLINES_AFTER_ATTACH)
    declined = open_invoice(stack, seeded)
    charge(stack, declined.invoice_id, 1)
    orphan = open_invoice(stack, seeded, period_index=1)
    known = open_invoice(stack, seeded, period_index=2)

    # A sync recorded before the field (an old history's): nothing is swept unless it cancels.
    sync(stack, seeded.subscription_id, status=SubscriptionStatus.PAUSED, paused_at=NOW)
    assert stored_invoice(stack, orphan.invoice_id).status == InvoiceStatus.OPEN

    for _ in range(2):  # a local activity runs again: the second sync changes nothing
        sync(
            stack,
            seeded.subscription_id,
            status=SubscriptionStatus.PAUSED,
            paused_at=NOW,
            open_invoice_id=known.invoice_id,
            sweep_orphans=True,
        )

    swept = stored_invoice(stack, orphan.invoice_id)
    assert (swept.status, swept.status_reason) == (InvoiceStatus.VOID, "superseded")
    assert stored_invoice(stack, known.invoice_id).status == InvoiceStatus.OPEN
    assert stored_invoice(stack, declined.invoice_id).status == InvoiceStatus.OPEN
    voided = [o for t, o in events_of(stack, seeded.subscription_id) if t == "invoice.voided"]
    assert voided == [orphan.invoice_id]

    # The workflow collects nothing now: the invoice it never charged goes too.
    sync(stack, seeded.subscription_id, open_invoice_id=None, sweep_orphans=True)
    assert stored_invoice(stack, known.invoice_id).status == InvoiceStatus.VOID
    assert stored_invoice(stack, declined.invoice_id).status == InvoiceStatus.OPEN


def race_charge_and_sweep(
    stack: Stack, subscription_id: str, invoice_id: str
) -> list[ApplicationError]:
    """A charge of the invoice and a sync that collects nothing, started together; the
    charge's refusals."""
    start = threading.Barrier(2)
    refused: list[ApplicationError] = []

    def charging() -> None:
        start.wait()
        try:
            charge(stack, invoice_id, 1)
        except ApplicationError as error:
            refused.append(error)

    def sweeping() -> None:
        start.wait()
        sync(stack, subscription_id, open_invoice_id=None, sweep_orphans=True)

    threads = [threading.Thread(target=charging), threading.Thread(target=sweeping)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return refused


@BOTH_BACKENDS
def test_a_sweep_racing_a_charge_never_voids_an_invoice_being_charged(stack: Stack) -> None:
    """20 rounds of a charge and a sweep of the same never-charged invoice, in parallel. Each
    ends one of two ways: charged and never voided, or voided and never sent to Stripe."""
    seeded = seed_subscription(stack)
    outcomes: set[str] = set()
    for period in range(20):
        invoice = open_invoice(stack, seeded, period_index=period)
        refused = race_charge_and_sweep(stack, seeded.subscription_id, invoice.invoice_id)
        stored = stored_invoice(stack, invoice.invoice_id)
        attempts = stored_attempts(stack, invoice.invoice_id)
        intents = provider_intents(stack, invoice.invoice_id)
        if stored.status == InvoiceStatus.VOID:
            assert attempts == [] and intents == [] and len(refused) == 1, (stored, attempts)
            assert "only open invoices are charged" in str(refused[0])
            outcomes.add("voided")
        else:
            assert stored.status == InvoiceStatus.PAID and len(attempts) == 1, (stored, attempts)
            assert [i.status for i in intents] == ["succeeded"] and refused == []
            # Never voided on the way (a void invoice may still become paid by money taken).
            assert stored.voided_at is None, stored
            outcomes.add("charged")
    assert outcomes  # which ways the races went is up to the scheduler
