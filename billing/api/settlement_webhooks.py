"""Stripe's settlement news, recorded: refunds (ours and those made elsewhere, e.g. in the
dashboard) and disputes of our payments.

An event is only a hint. Its object is read again from Stripe (the charge's refunds, the
refund, the dispute), and that current state is recorded, keyed by Stripe's ids:

* delivered twice (under the same or another event id): the same rows, unchanged;
* delivered out of order (``refund.updated`` before ``refund.created``, a stale
  ``charge.dispute.updated`` after ``charge.dispute.closed``): the fresh read is the truth,
  and a final status is never taken back (``refund_status_after``, ``dispute_status_after``);
* a request killed between the read and the write: the claim is released or goes stale, and
  Stripe's redelivery records it once.

A provider read that fails is answered 503 (the claim released), so Stripe retries the event.
Nothing here writes to Stripe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from activities import event_log
from billing.disputes import ProviderDispute
from billing.ledger import ProviderBalanceTransaction
from billing.records import PaymentRecord, WebhookOutcome
from billing.refunds import ProviderRefund
from db.engine import unit_of_work
from db.repositories import credit_notes as credit_notes_repo
from db.repositories import disputes as disputes_repo
from db.repositories import invoices as invoices_repo
from db.repositories import ledger as ledger_repo

logger = logging.getLogger(__name__)

#: Events whose object is a charge.
_CHARGE_EVENTS = frozenset({"charge.refunded"})
#: Events whose object is a refund.
_REFUND_EVENTS = frozenset(
    {"charge.refund.updated", "refund.created", "refund.updated", "refund.failed"}
)
#: Events whose object is a dispute.
_DISPUTE_EVENTS = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)
SETTLEMENT_EVENT_TYPES = _CHARGE_EVENTS | _REFUND_EVENTS | _DISPUTE_EVENTS
#: Events whose object is a payout: its import runs in ``PayoutImportWorkflow``.
PAYOUT_EVENT_TYPES = frozenset(
    {
        "payout.created",
        "payout.updated",
        "payout.paid",
        "payout.failed",
        "payout.canceled",
        "payout.reconciliation_completed",
    }
)

#: Longest Stripe id we look up (our columns hold 100).
_MAX_ID_LENGTH = 100


class SettlementReader(Protocol):
    """The provider reads this needs (``StripeGateway`` has them)."""

    def list_charge_refunds(self, *, charge_id: str) -> list[ProviderRefund]: ...

    def retrieve_refund(self, *, refund_id: str) -> ProviderRefund: ...

    def retrieve_dispute(self, *, dispute_id: str) -> ProviderDispute: ...

    def retrieve_balance_transaction(
        self, *, transaction_id: str
    ) -> ProviderBalanceTransaction: ...


class SettlementProviderUnavailable(Exception):
    """Stripe could not be read; the event must be retried."""


@dataclass(frozen=True)
class Recorded:
    outcome: WebhookOutcome
    detail: str
    subscription_id: str | None = None
    #: A chargeback holds money of this subscription's payment (for the dispute policy):
    #: ``(subscription id, why)``.
    chargeback: tuple[str, str] | None = None


#: Called with what was recorded, in its transaction (the ledger hooks in here).
AfterRecord = Callable[[Session, PaymentRecord | None, object], None]


def _object_id(obj: dict[str, Any], name: str = "id") -> str | None:
    value = obj.get(name)
    if isinstance(value, dict):
        value = value.get("id")
    if (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
        and " " not in value
    ):
        return value
    return None


def _read(what: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as error:  # any failure: Stripe retries the event, nothing half-applied
        raise SettlementProviderUnavailable(f"{what}: {type(error).__name__}: {error}") from error


def record_settlement_event(
    session_factory: sessionmaker[Session],
    reader: SettlementReader,
    event_type: str,
    obj: dict[str, Any],
    now: datetime,
) -> Recorded:
    """Read back what the event is about and record it (see the module docstring)."""
    if event_type in _CHARGE_EVENTS:
        charge_id = _object_id(obj)
        if charge_id is None:
            return Recorded(WebhookOutcome.IGNORED, "the charge has no id")
        return _record_charge_refunds(session_factory, reader, charge_id, now)
    if event_type in _REFUND_EVENTS:
        refund_id = _object_id(obj)
        if refund_id is None:
            return Recorded(WebhookOutcome.IGNORED, "the refund has no id")
        refund = _read(
            f"reading refund {refund_id}", lambda: reader.retrieve_refund(refund_id=refund_id)
        )
        return _record_refunds(session_factory, reader, refund.charge_id, [refund], now)
    if event_type in _DISPUTE_EVENTS:
        dispute_id = _object_id(obj)
        if dispute_id is None:
            return Recorded(WebhookOutcome.IGNORED, "the dispute has no id")
        dispute = _read(
            f"reading dispute {dispute_id}", lambda: reader.retrieve_dispute(dispute_id=dispute_id)
        )
        return _record_dispute(session_factory, reader, dispute, now)
    return Recorded(WebhookOutcome.IGNORED, f"event type {event_type} is not settlement news")


def _payment_and_subscription(
    session: Session, charge_id: str | None
) -> tuple[PaymentRecord | None, str | None]:
    if charge_id is None:
        return None, None
    payment = credit_notes_repo.payment_by_charge(session, charge_id)
    if payment is None:
        return None, None
    invoice = invoices_repo.get_invoice(session, payment.invoice_id)
    return payment, invoice.subscription_id if invoice is not None else None


def _record_charge_refunds(
    session_factory: sessionmaker[Session], reader: SettlementReader, charge_id: str, now: datetime
) -> Recorded:
    with unit_of_work(session_factory) as session:
        payment, _ = _payment_and_subscription(session, charge_id)
    if payment is None:
        return Recorded(
            WebhookOutcome.NO_SUBSCRIPTION, f"charge {charge_id} is not a payment of ours"
        )
    refunds = _read(
        f"listing the refunds of charge {charge_id}",
        lambda: reader.list_charge_refunds(charge_id=charge_id),
    )
    return _record_refunds(session_factory, reader, charge_id, refunds, now)


def _transactions(
    reader: SettlementReader, transaction_ids: list[str]
) -> list[ProviderBalanceTransaction]:
    """The balance transactions, read now (outside any database transaction)."""
    found: list[ProviderBalanceTransaction] = []
    for txn_id in transaction_ids:
        try:
            found.append(reader.retrieve_balance_transaction(transaction_id=txn_id))
        except Exception as error:  # Stripe retries the event; nothing half-applied
            raise SettlementProviderUnavailable(
                f"reading balance transaction {txn_id}: {type(error).__name__}: {error}"
            ) from error
    return found


def _record_refunds(
    session_factory: sessionmaker[Session],
    reader: SettlementReader,
    charge_id: str | None,
    refunds: list[ProviderRefund],
    now: datetime,
) -> Recorded:
    with unit_of_work(session_factory) as session:
        payment, _ = _payment_and_subscription(session, charge_id)
    if payment is None:
        return Recorded(
            WebhookOutcome.NO_SUBSCRIPTION, f"charge {charge_id} is not a payment of ours"
        )
    transactions = _transactions(
        reader, [r.balance_transaction_id for r in refunds if r.balance_transaction_id]
    )
    with unit_of_work(session_factory) as session:
        payment, subscription_id = _payment_and_subscription(session, charge_id)
        if payment is None:
            return Recorded(
                WebhookOutcome.NO_SUBSCRIPTION, f"charge {charge_id} is not a payment of ours"
            )
        parts = []
        for refund in refunds:
            record, inserted = credit_notes_repo.record_provider_refund(
                session, payment, refund, at=now
            )
            # Its events in the same transaction, keyed by the state it reached: a repeated
            # or stale delivery reaches none and writes nothing.
            event_log.refund_recorded(session, record, now, created=inserted)
            parts.append(
                f"{refund.refund_id} {record.status.value}"
                + (" (made elsewhere, new)" if inserted else "")
            )
        # The ledger after the refunds, so each entry links to its refund.
        for txn in transactions:
            ledger_repo.record_transaction(session, txn, at=now)
    return Recorded(
        WebhookOutcome.RECORDED,
        f"charge {charge_id}: " + (", ".join(parts) if parts else "no refunds"),
        subscription_id,
    )


def _record_dispute(
    session_factory: sessionmaker[Session],
    reader: SettlementReader,
    dispute: ProviderDispute,
    now: datetime,
) -> Recorded:
    # The withdrawal (and a won dispute's reinstatement) are balance transactions: mirrored.
    transactions = _transactions(reader, list(dispute.balance_transaction_ids))
    with unit_of_work(session_factory) as session:
        payment, subscription_id = _payment_and_subscription(session, dispute.charge_id)
        before, record = disputes_repo.record_dispute_change(session, payment, dispute, at=now)
        inserted = before is None
        event_log.dispute_recorded(session, before, record, now)
        for txn in transactions:
            ledger_repo.record_transaction(session, txn, at=now)
    whose = "" if payment is not None else f" (charge {dispute.charge_id} is not a payment of ours)"
    chargeback = None
    if subscription_id is not None and record.status.holds_money:
        chargeback = (
            subscription_id,
            f"chargeback {dispute.dispute_id} ({dispute.reason or 'no reason given'}) on "
            f"charge {dispute.charge_id}",
        )
    return Recorded(
        WebhookOutcome.RECORDED,
        f"dispute {dispute.dispute_id} {record.status.value}{' (new)' if inserted else ''}{whose}",
        subscription_id,
        chargeback,
    )
