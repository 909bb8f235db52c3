"""The customer's credit balance (``billing.balance``): signed entries, summed per currency.

Every write that depends on the balance (using it to pay an invoice) takes the customer's row
lock first (``lock_customer``), so two invoices finalized at once for the same customer cannot
both spend the same credit. Entries are keyed by ``source_key``: a retried or replayed write
finds its entry instead of moving the balance twice.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from billing.balance import BalanceEntryKind
from billing.errors import InvalidInput, NotFound
from billing.ids import new_id
from billing.records import BalanceEntryRecord, CustomerRecord
from db.models import BALANCE_ENTRIES, CUSTOMERS, INVOICES
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows


def lock_customer(session: Session, customer_id: str) -> None:
    """Take the customer's row lock until the transaction ends (a no-op UPDATE: PostgreSQL
    locks the row; SQLite's writer lock covers the database)."""
    locked = session.execute(
        update(CUSTOMERS)
        .where(CUSTOMERS.c.id == customer_id)
        .values(next_invoice_sequence=CUSTOMERS.c.next_invoice_sequence)
        .returning(CUSTOMERS.c.id)
    ).first()
    if locked is None:
        raise NotFound(f"customer {customer_id} not found")


def lock_customer_of_invoice(session: Session, invoice_id: str) -> CustomerRecord | None:
    """The invoice's customer, read under the customer's row lock (the lock ``lock_customer``
    takes, until the transaction ends): one statement for the lock and the read. None if
    there is no such invoice.

    ``FOR NO KEY UPDATE`` is the lock ``lock_customer``'s UPDATE takes, so the two exclude
    each other, while inserts that only refer to the customer (``FOR KEY SHARE``) go on.
    SQLite has no row locks: its writer lock, taken when the transaction begins, covers it."""
    return fetch_one(session, CustomerRecord, _LOCK_CUSTOMER_OF_INVOICE, {"invoice_id": invoice_id})


_LOCK_CUSTOMER_OF_INVOICE = (
    select_rows(CUSTOMERS)
    .where(
        CUSTOMERS.c.id
        == select(INVOICES.c.customer_id)
        .where(INVOICES.c.id == bindparam("invoice_id"))
        .scalar_subquery()
    )
    .with_for_update(key_share=True)
)


def credit_balance(session: Session, customer_id: str, currency: str) -> int:
    """The customer's credit in ``currency`` (minor units; below 0: a debit they owe, an
    amount too small to charge carried to their next invoice)."""
    total = session.execute(
        _CREDIT_BALANCE, {"customer_id": customer_id, "currency": currency}
    ).scalar_one()
    return int(total)


_CREDIT_BALANCE = select(func.coalesce(func.sum(BALANCE_ENTRIES.c.amount_minor), 0)).where(
    BALANCE_ENTRIES.c.customer_id == bindparam("customer_id"),
    BALANCE_ENTRIES.c.currency == bindparam("currency"),
)


def credit_balances(session: Session, customer_id: str) -> dict[str, int]:
    """``{currency: credit}`` for every currency the customer ever had an entry in."""
    rows = session.execute(
        select(BALANCE_ENTRIES.c.currency, func.sum(BALANCE_ENTRIES.c.amount_minor))
        .where(BALANCE_ENTRIES.c.customer_id == customer_id)
        .group_by(BALANCE_ENTRIES.c.currency)
        .order_by(BALANCE_ENTRIES.c.currency)
    ).all()
    return {currency: int(total) for currency, total in rows}


def get_entry_by_source(session: Session, source_key: str) -> BalanceEntryRecord | None:
    return fetch_one(
        session,
        BalanceEntryRecord,
        select_rows(BALANCE_ENTRIES).where(BALANCE_ENTRIES.c.source_key == source_key),
    )


def list_entries(
    session: Session, customer_id: str, currency: str | None = None
) -> list[BalanceEntryRecord]:
    """The customer's entries, oldest first."""
    statement = select_rows(BALANCE_ENTRIES).where(BALANCE_ENTRIES.c.customer_id == customer_id)
    if currency is not None:
        statement = statement.where(BALANCE_ENTRIES.c.currency == currency)
    return fetch_all(
        session,
        BalanceEntryRecord,
        statement.order_by(BALANCE_ENTRIES.c.created_at, BALANCE_ENTRIES.c.id),
    )


def record_entry(
    session: Session,
    *,
    customer_id: str,
    currency: str,
    amount_minor: int,
    kind: BalanceEntryKind,
    source_key: str,
    description: str,
    at: datetime,
    invoice_id: str | None = None,
    credit_note_id: str | None = None,
    allow_debit: bool = False,
) -> tuple[BalanceEntryRecord, bool]:
    """Record one movement once per ``source_key``: ``(entry, True)``, or the entry already
    recorded for that key and False (then nothing moves).

    A negative movement (credit used) is refused with InvalidInput when the balance does not
    hold it; the caller must hold the customer's lock (``lock_customer``) for that check to
    mean anything under concurrency. A repeat with the same key but another amount is refused
    too: the key names one decision. ``allow_debit``: the movement may take the balance
    below 0 (a debit: an amount too small to charge carried, or given back by a void).
    """
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int) or amount_minor == 0:
        raise InvalidInput(
            f"a balance entry moves a non-zero whole number of minor units; got {amount_minor!r}",
            field="amount_minor",
        )
    existing = get_entry_by_source(session, source_key)
    if existing is None and amount_minor < 0 and not allow_debit:
        held = credit_balance(session, customer_id, currency)
        if held + amount_minor < 0:
            raise InvalidInput(
                f"customer {customer_id} has {held} minor units of {currency} credit; "
                f"{-amount_minor} cannot be used",
                field="amount_minor",
            )
    record = BalanceEntryRecord(
        id=new_id("cbe"),
        customer_id=customer_id,
        currency=currency,
        amount_minor=amount_minor,
        kind=BalanceEntryKind(kind),
        source_key=source_key,
        description=description,
        created_at=at,
        invoice_id=invoice_id,
        credit_note_id=credit_note_id,
    )
    stored, inserted = (
        (existing, False)
        if existing is not None
        else insert_or_get(
            session, BALANCE_ENTRIES, record, lambda: get_entry_by_source(session, source_key)
        )
    )
    if not inserted and (
        stored.amount_minor != amount_minor
        or stored.customer_id != customer_id
        or stored.currency != currency
    ):
        raise InvalidInput(
            f"balance entry {source_key!r} was already recorded as {stored.amount_minor} "
            f"{stored.currency} for customer {stored.customer_id}; "
            f"it cannot also be {amount_minor} {currency} for {customer_id}",
            field="source_key",
        )
    return stored, inserted
