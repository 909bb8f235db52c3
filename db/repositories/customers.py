"""Customers and their gap-free invoice numbering."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, delete, exists, or_, select, update
from sqlalchemy.orm import Session

from billing.errors import NotFound
from billing.invoices import format_invoice_number
from billing.records import CustomerRecord
from db.models import CUSTOMERS, SUBSCRIPTIONS
from db.repositories._rows import fetch_all, fetch_one, insert_or_get, select_rows, utcnow


def get_customer(session: Session, customer_id: str) -> CustomerRecord | None:
    return fetch_one(
        session, CustomerRecord, select_rows(CUSTOMERS).where(CUSTOMERS.c.id == customer_id)
    )


def get_customer_by_external_id(session: Session, external_id: str) -> CustomerRecord | None:
    """The customer the business knows as ``external_id`` (its own reference)."""
    return fetch_one(
        session,
        CustomerRecord,
        select_rows(CUSTOMERS).where(CUSTOMERS.c.external_id == external_id),
    )


def insert_customer(session: Session, record: CustomerRecord) -> tuple[CustomerRecord, bool]:
    """Insert ``record``; ``(existing, False)`` if a customer with its id, or with its
    external id, is already there (a retried signup)."""

    def existing() -> CustomerRecord | None:
        same_id = CUSTOMERS.c.id == record.id
        condition = (
            same_id
            if record.external_id is None
            else or_(same_id, CUSTOMERS.c.external_id == record.external_id)
        )
        return fetch_one(session, CustomerRecord, select_rows(CUSTOMERS).where(condition).limit(1))

    return insert_or_get(session, CUSTOMERS, record, existing)


def take_signup_lease(
    session: Session, customer_id: str, token: str, *, now: datetime, expires_at: datetime
) -> bool | None:
    """Hold the customer for the signup ``token`` until ``expires_at`` (UTC): True if taken
    (free, lapsed, or already ours), False if another signup holds it, None if there is no
    such customer (it may have been removed by the signup that held it).

    One conditional UPDATE, so of two signups racing for the lease exactly one wins on both
    databases; a holder that died frees it when the lease lapses.
    """
    taken = session.execute(
        update(CUSTOMERS)
        .where(
            CUSTOMERS.c.id == customer_id,
            or_(
                CUSTOMERS.c.signup_lease_token.is_(None),
                CUSTOMERS.c.signup_lease_token == token,
                CUSTOMERS.c.signup_lease_expires_at <= now,
            ),
        )
        .values(signup_lease_token=token, signup_lease_expires_at=expires_at)
        .returning(CUSTOMERS.c.id)
    ).scalar_one_or_none()
    if taken is not None:
        return True
    held = session.execute(
        select(CUSTOMERS.c.id).where(CUSTOMERS.c.id == customer_id)
    ).scalar_one_or_none()
    return None if held is None else False


def release_signup_lease(session: Session, customer_id: str, token: str) -> None:
    """Let the next signup for the customer go ahead (only the holder's token releases)."""
    session.execute(
        update(CUSTOMERS)
        .where(CUSTOMERS.c.id == customer_id, CUSTOMERS.c.signup_lease_token == token)
        .values(signup_lease_token=None, signup_lease_expires_at=None)
    )


def delete_customer_without_subscriptions(session: Session, customer_id: str) -> bool:
    """Remove a customer that no subscription refers to and that has no provider customer (a
    signup that created it and then failed before the provider had anything). False if it
    has either, or does not exist."""
    deleted = session.execute(
        delete(CUSTOMERS)
        .where(
            CUSTOMERS.c.id == customer_id,
            CUSTOMERS.c.stripe_customer_id.is_(None),
            ~exists().where(SUBSCRIPTIONS.c.customer_id == customer_id),
        )
        .returning(CUSTOMERS.c.id)
    ).scalar_one_or_none()
    return deleted is not None


def set_stripe_customer_id(
    session: Session, customer_id: str, stripe_customer_id: str, *, now: datetime | None = None
) -> str:
    """Record the provider's customer id, first writer wins; returns the id now on record.

    Two workers racing through ``ensure_customer`` may each get an id back; whichever is
    stored first is the customer's, and the other caller should use the returned one.
    """
    stored = session.execute(
        update(CUSTOMERS)
        .where(CUSTOMERS.c.id == customer_id, CUSTOMERS.c.stripe_customer_id.is_(None))
        .values(stripe_customer_id=stripe_customer_id, updated_at=now or utcnow())
        .returning(CUSTOMERS.c.stripe_customer_id)
    ).scalar_one_or_none()
    if stored is not None:
        return str(stored)
    current = session.execute(
        select(CUSTOMERS.c.id, CUSTOMERS.c.stripe_customer_id).where(CUSTOMERS.c.id == customer_id)
    ).one_or_none()
    if current is None:
        raise NotFound(f"customer {customer_id} not found; create it before linking it")
    # The UPDATE skipped this row, so an id is already recorded: the first writer's.
    return str(current.stripe_customer_id)


def set_default_payment_method(
    session: Session,
    customer_id: str,
    payment_method_id: str | None,
    *,
    now: datetime | None = None,
    card_brand: str | None = None,
    card_last4: str | None = None,
) -> None:
    """Make ``payment_method_id`` the card charged for the customer's invoices; ``card_brand``
    and ``card_last4`` describe it as the provider reported it (None: not known)."""
    updated = session.execute(
        update(CUSTOMERS)
        .where(CUSTOMERS.c.id == customer_id)
        .values(
            default_payment_method_id=payment_method_id,
            default_card_brand=card_brand,
            default_card_last4=card_last4,
            updated_at=now or utcnow(),
        )
        .returning(CUSTOMERS.c.id)
    ).scalar_one_or_none()
    if updated is None:
        raise NotFound(f"customer {customer_id} not found; create it before setting its card")


def allocate_invoice_number(session: Session, customer_id: str) -> str:
    """The customer's next invoice number (``PREFIX-0001``, ``PREFIX-0002``, ...).

    One ``UPDATE ... RETURNING``: the row lock it takes makes concurrent allocations for the
    same customer queue behind each other until commit, so numbers are unique; and the
    increment commits or rolls back with the caller's transaction, so a transaction that
    never stores its invoice leaves no gap.
    """
    allocated = session.execute(
        update(CUSTOMERS)
        .where(CUSTOMERS.c.id == customer_id)
        .values(next_invoice_sequence=CUSTOMERS.c.next_invoice_sequence + 1)
        .returning(CUSTOMERS.c.invoice_prefix, CUSTOMERS.c.next_invoice_sequence - 1)
    ).one_or_none()
    if allocated is None:
        raise NotFound(f"customer {customer_id} not found; cannot number its invoice")
    prefix, sequence = allocated
    return format_invoice_number(prefix, sequence)


def get_customer_by_stripe_id(session: Session, stripe_customer_id: str) -> CustomerRecord | None:
    """Our customer whose provider customer is ``stripe_customer_id`` (``cus_...``)."""
    return fetch_one(
        session,
        CustomerRecord,
        select_rows(CUSTOMERS).where(CUSTOMERS.c.stripe_customer_id == stripe_customer_id),
    )


def advance_payment_method_event(
    session: Session, customer_id: str, event_created_at: datetime
) -> datetime | None:
    """Record that provider news about the customer's default card, created at
    ``event_created_at`` (UTC), is being acted on, unless newer news already was.

    Returns None when this event is the newest seen (or as new: Stripe's ``created`` has
    one-second resolution, and a redelivery of the same event must pass again); otherwise the
    newer event's time, and nothing changes. One conditional UPDATE, so of two deliveries
    racing for the same customer only an ordering that ends with the newest one is possible.
    """
    column = CUSTOMERS.c.default_payment_method_event_at
    advanced = session.execute(
        update(CUSTOMERS)
        .where(
            CUSTOMERS.c.id == customer_id,
            or_(column.is_(None), column <= event_created_at),
        )
        .values(default_payment_method_event_at=event_created_at)
        .returning(CUSTOMERS.c.id)
    ).scalar_one_or_none()
    if advanced is not None:
        return None
    newer: datetime | None = session.execute(
        select(column).where(CUSTOMERS.c.id == customer_id)
    ).scalar_one_or_none()
    if newer is None:
        raise NotFound(f"customer {customer_id} not found")
    return newer


def record_default_payment_method_news(
    session: Session,
    customer_id: str,
    payment_method_id: str,
    event_created_at: datetime | None,
    *,
    now: datetime | None = None,
) -> bool:
    """Record the provider's news that ``payment_method_id`` is now the customer's default
    card, unless newer news (``default_payment_method_event_at`` after ``event_created_at``,
    UTC) has been acted on meanwhile. True if it was recorded.

    The default changed at the provider already: this only keeps our record level with it, so
    a repeat of the same news is recognised and nothing acts on it twice."""
    column = CUSTOMERS.c.default_payment_method_event_at
    statement = update(CUSTOMERS).where(CUSTOMERS.c.id == customer_id)
    if event_created_at is not None:
        statement = statement.where(or_(column.is_(None), column <= event_created_at))
    # News of another card than the one on file: its details are not known here.
    same_card = CUSTOMERS.c.default_payment_method_id == payment_method_id
    recorded = session.execute(
        statement.values(
            default_payment_method_id=payment_method_id,
            default_card_brand=case((same_card, CUSTOMERS.c.default_card_brand), else_=None),
            default_card_last4=case((same_card, CUSTOMERS.c.default_card_last4), else_=None),
            updated_at=now or utcnow(),
        ).returning(CUSTOMERS.c.id)
    ).scalar_one_or_none()
    return recorded is not None


def set_mail_preferences(
    session: Session,
    customer_id: str,
    *,
    locale: str | None,
    mail_opt_out: bool | None,
    now: datetime,
    clear_locale: bool = False,
) -> CustomerRecord:
    """Set the customer's mail locale and/or opt-out of non-essential mails (None: leave it;
    ``clear_locale``: back to English). Raises NotFound for an unknown customer."""
    values: dict[str, object] = {"updated_at": now}
    if locale is not None or clear_locale:
        values["locale"] = locale
    if mail_opt_out is not None:
        values["mail_opt_out"] = mail_opt_out
    session.execute(update(CUSTOMERS).where(CUSTOMERS.c.id == customer_id).values(**values))
    customer = get_customer(session, customer_id)
    if customer is None:
        raise NotFound(f"customer {customer_id!r} not found", field="customer_id")
    return customer


def list_customers(
    session: Session, *, limit: int, after_id: str | None = None, email: str | None = None
) -> list[CustomerRecord]:
    """Customers by id (keyset: those after ``after_id``), with ``email`` if given; at most
    ``limit``."""
    statement = select_rows(CUSTOMERS).order_by(CUSTOMERS.c.id).limit(limit)
    if after_id is not None:
        statement = statement.where(CUSTOMERS.c.id > after_id)
    if email is not None:
        statement = statement.where(CUSTOMERS.c.email == email)
    return fetch_all(session, CustomerRecord, statement)
