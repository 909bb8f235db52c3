"""Test data and a running delivery stack (dispatcher, delivery worker) for the mail and event
delivery tests: real database, real time-skipping Temporal server, real SMTP/HTTP servers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner

from activities.delivery import DeliveryActivities, MailSettings
from activities.smtp_mailer import SmtpConfig, SmtpMailer
from billing.calendar import IntervalUnit
from billing.clock import SystemClock
from billing.delivery import DispatcherInput
from billing.ids import invoice_id_for, new_id
from billing.invoices import InvoiceStatus, invoice_prefix_for
from billing.plans import Plan
from billing.records import CustomerRecord, InvoiceRecord, NotificationRecord, SubscriptionRecord
from billing.subscription import SubscriptionStatus
from billing.worker import (
    build_delivery_worker,
    ensure_delivery_dispatcher,
    wake_dispatcher_on_commit,
)
from db.engine import unit_of_work
from db.repositories import customers, invoices, notifications, plans, subscriptions

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FROM = "Shop Billing <billing@shop.example>"


@dataclass
class Book:
    customer: CustomerRecord
    subscription: SubscriptionRecord
    invoice: InvoiceRecord


def make_book(
    session: Session,
    *,
    currency: str = "USD",
    amount_minor: int = 2900,
    timezone: str = "America/New_York",
    locale: str | None = None,
    email: str | None = "ada@example.com",
    opt_out: bool = False,
    interval: IntervalUnit = IntervalUnit.MONTH,
    status: SubscriptionStatus = SubscriptionStatus.ACTIVE,
    name: str = "Ada Lovelace",
) -> Book:
    code = f"plan-{currency.lower()}-{interval.value}"
    if plans.get_plan(session, code) is None:
        plans.upsert_plan(
            session, Plan(code, f"Pro {currency}", amount_minor, currency, interval), now=T0
        )
    customer_id = new_id("cus")
    customer, _ = customers.insert_customer(
        session,
        CustomerRecord(
            id=customer_id,
            invoice_prefix=invoice_prefix_for(customer_id),
            timezone=timezone,
            email=email,
            name=name,
            created_at=T0,
            updated_at=T0,
            locale=locale,
            mail_opt_out=opt_out,
        ),
    )
    sub_id = new_id("sub")
    sub, _ = subscriptions.insert_subscription(
        session,
        SubscriptionRecord(
            id=sub_id,
            customer_id=customer.id,
            plan_code=code,
            status=status,
            amount_minor=amount_minor,
            currency=currency,
            interval=interval,
            interval_count=1,
            timezone=timezone,
            anchor_at=T0,
            workflow_id=f"subscription-{sub_id}",
            created_at=T0,
            updated_at=T0,
            current_period_start=T0,
            current_period_end=T0 + timedelta(days=31),
            next_billing_at=T0 + timedelta(days=31),
        ),
    )
    invoice, _ = invoices.issue_invoice(
        session,
        InvoiceRecord(
            id=invoice_id_for(sub.id, T0),
            number="",
            subscription_id=sub.id,
            customer_id=customer.id,
            period_index=0,
            period_start=T0,
            period_end=T0 + timedelta(days=31),
            amount_due_minor=amount_minor,
            currency=currency,
            status=InvoiceStatus.OPEN,
            description=f"Pro {currency}",
            created_at=T0,
            finalized_at=T0,
        ),
    )
    return Book(customer, sub, invoice)


#: Every notice kind with the payload its writer gives it.
def notice_payloads(book: Book) -> dict[str, tuple[dict[str, Any], bool]]:
    """kind -> (payload, about the invoice?)"""
    number = book.invoice.number
    return {
        "payment_failed": (
            {
                "invoice_number": number,
                "attempt": 1,
                "payment_intent_id": "pi_123",
                "next_retry_at": (T0 + timedelta(days=3)).isoformat(),
            },
            True,
        ),
        "action_required": (
            {"invoice_number": number, "attempt": 1, "payment_intent_id": "pi_456"},
            True,
        ),
        "payment_recovered": ({"invoice_number": number, "attempt": 2}, True),
        "subscription_unpaid": ({"invoice_number": number}, True),
        "subscription_canceled": (
            {"reason": "dunning_exhausted", "ended_at": (T0 + timedelta(days=20)).isoformat()},
            False,
        ),
        "receipt": ({"invoice_number": number}, True),
        "trial_ending": ({"about": (T0 + timedelta(days=3)).isoformat()}, False),
        "upcoming_renewal": ({"about": (T0 + timedelta(days=7)).isoformat()}, False),
    }


def enqueue(
    session: Session, book: Book, kind: str, payload: dict[str, Any], *, with_invoice: bool
) -> NotificationRecord:
    record, created = notifications.enqueue_notification(
        session,
        NotificationRecord(
            id=new_id("ntf"),
            kind=kind,
            customer_id=book.customer.id,
            subscription_id=book.subscription.id,
            invoice_id=book.invoice.id if with_invoice else None,
            dedupe_key=f"{book.subscription.id}:{kind}:{uuid.uuid4().hex}",
            payload=payload,
            created_at=T0,
        ),
    )
    assert created
    return record


def delivery_activities(
    session_factory: sessionmaker[Session],
    smtp_port: int | None,
    *,
    mailer: SmtpMailer | None = None,
    allow_insecure_endpoints: bool = True,
    business_contact: str | None = None,
) -> DeliveryActivities:
    if mailer is None and smtp_port is not None:
        mailer = SmtpMailer(SmtpConfig(host="127.0.0.1", port=smtp_port, timeout_s=5))
    return DeliveryActivities(
        session_factory,
        SystemClock(),
        mailer=mailer,
        mail=MailSettings(
            from_address=FROM,
            card_update_url="https://shop.example/billing/card",
            authentication_url="https://shop.example/pay/{payment_intent_id}",
            business_contact=business_contact,
        ),
        post_timeout_s=5,
        allow_insecure_endpoints=allow_insecure_endpoints,
    )


@asynccontextmanager
async def delivery_stack(
    client: Client,
    activities: DeliveryActivities,
    *,
    interval_s: float = 0.5,
    wake_on_commit: bool = False,
    batch: int = 100,
) -> AsyncIterator[str]:
    """The delivery worker and its dispatcher on a fresh task queue; yields the queue.
    ``wake_on_commit``: a commit that writes a notice or an event wakes the dispatcher (as
    ``billing worker`` does)."""
    task_queue = f"delivery-{uuid.uuid4().hex[:8]}"
    worker = build_delivery_worker(
        client,
        activities,
        task_queue=task_queue,
        activity_threads=8,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    async with worker:
        dispatcher = DispatcherInput(
            task_queue=task_queue,
            interval_s=interval_s,
            batch=batch,
            mail_timeout_s=10,
            post_timeout_s=10,
        )
        workflow_id = await ensure_delivery_dispatcher(
            client, task_queue=task_queue, dispatcher=dispatcher
        )
        waker = (
            wake_dispatcher_on_commit(activities.session_factory, client, dispatcher=dispatcher)
            if wake_on_commit
            else None
        )
        try:
            yield task_queue
        finally:
            if waker is not None:
                waker.detach()
            await client.get_workflow_handle(workflow_id).terminate("test over")


async def wait_until(
    check: Callable[[], bool], *, timeout_s: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if await asyncio.to_thread(check):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.2)


def notices_of(session_factory: sessionmaker[Session], **filters: Any) -> list[NotificationRecord]:
    with unit_of_work(session_factory) as session:
        return notifications.list_notifications(session, **filters)
