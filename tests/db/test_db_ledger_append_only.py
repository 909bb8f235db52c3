"""The ledger is append-only in the database itself (revision 0017), on both databases: an
UPDATE or DELETE of an entry is refused whoever sends it (a repository bug, a hand-run SQL
statement), and the entry is unchanged. A correction is a new entry."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from billing.ledger import ProviderBalanceTransaction
from db.engine import unit_of_work
from db.models import LEDGER_ENTRIES
from db.repositories import ledger
from tests.db.conftest import T0


def _txn(transaction_id: str, amount: int) -> ProviderBalanceTransaction:
    return ProviderBalanceTransaction(
        transaction_id=transaction_id,
        type="adjustment",
        reporting_category="other_adjustment",
        amount_minor=amount,
        fee_minor=0,
        net_minor=amount,
        currency="usd",
        source_id=None,
        created=T0,
        available_on=T0,
    )


def _entry(session_factory: sessionmaker[Session]) -> None:
    with unit_of_work(session_factory) as session:
        ledger.record_transaction(session, _txn("txn_original", 1000), at=T0)


@pytest.mark.parametrize(
    "statement",
    [
        update(LEDGER_ENTRIES).values(amount_minor=1),
        update(LEDGER_ENTRIES).values(description="edited"),
        delete(LEDGER_ENTRIES),
    ],
    ids=["update-amount", "update-text", "delete"],
)
def test_an_update_or_delete_of_a_ledger_entry_is_refused(
    session_factory: sessionmaker[Session], statement: object
) -> None:
    _entry(session_factory)
    with (
        pytest.raises(DatabaseError, match="append-only"),
        unit_of_work(session_factory) as session,
    ):
        session.execute(statement)  # type: ignore[call-overload]
    with unit_of_work(session_factory) as session:
        rows = session.execute(
            select(LEDGER_ENTRIES.c.amount_minor, LEDGER_ENTRIES.c.description)
        ).all()
    assert [tuple(r) for r in rows] == [(1000, None)]


def test_raw_sql_cannot_edit_the_ledger_either(session_factory: sessionmaker[Session]) -> None:
    _entry(session_factory)
    for sql in (
        "UPDATE ledger_entries SET net_minor = 0",
        "DELETE FROM ledger_entries WHERE balance_transaction_id = 'txn_original'",
    ):
        with (
            pytest.raises(DatabaseError, match="append-only"),
            unit_of_work(session_factory) as session,
        ):
            session.execute(text(sql))
    with unit_of_work(session_factory) as session:
        assert ledger.get_entry(session, "txn_original") is not None


def test_a_correction_is_a_new_entry(session_factory: sessionmaker[Session]) -> None:
    _entry(session_factory)
    with unit_of_work(session_factory) as session:
        _, inserted = ledger.record_transaction(session, _txn("txn_correction", -250), at=T0)
        # Importing the original again changes nothing (and does not try to).
        _, again = ledger.record_transaction(session, _txn("txn_original", 1000), at=T0)
    assert inserted and not again
    with unit_of_work(session_factory) as session:
        total = session.execute(select(LEDGER_ENTRIES.c.amount_minor)).scalars().all()
    assert sorted(total) == [-250, 1000]
