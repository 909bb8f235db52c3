"""Payouts page by page (``ledger.page_payouts``, the dashboard's keyset): newest first by
(Stripe's creation time, id), ties broken by id, a payout Stripe gave no time sorted by when
we recorded it; every payout exactly once whatever the page size, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from billing.ledger import PayoutStatus, ProviderPayout
from db.repositories import ledger as ledger_repo
from tests.db.conftest import T0


def _payout(session: Session, stripe_id: str, created_h: int | None, recorded_h: int) -> str:
    stored = ledger_repo.record_payout(
        session,
        ProviderPayout(
            payout_id=stripe_id,
            amount_minor=100,
            currency="usd",
            status=PayoutStatus.PAID,
            automatic=True,
            balance_transaction_id=None,
            created=None if created_h is None else T0 + timedelta(hours=created_h),
        ),
        at=T0 + timedelta(hours=recorded_h),
    )
    return stored.stripe_payout_id


@pytest.mark.parametrize("size", [1, 2, 3, 7, 50])
def test_every_payout_once_newest_first(session: Session, size: int) -> None:
    # Three at the same instant (ties), one without a Stripe time (recorded at hour 5).
    for stripe_id, created, recorded in [
        ("po_a", 1, 9),
        ("po_b", 3, 9),
        ("po_c", 3, 9),
        ("po_d", 3, 9),
        ("po_e", None, 5),
        ("po_f", 8, 9),
        ("po_g", 2, 9),
    ]:
        _payout(session, stripe_id, created, recorded)
    seen: list[str] = []
    before = None
    for _ in range(20):
        page = ledger_repo.page_payouts(session, limit=size, before=before)
        seen += [p.stripe_payout_id for p in page]
        if len(page) < size:
            break
        last = page[-1]
        before = (ledger_repo.payout_created_at(last), last.id)
    assert sorted(seen) == ["po_a", "po_b", "po_c", "po_d", "po_e", "po_f", "po_g"]
    assert len(seen) == 7
    times = [ledger_repo.payout_created_at(p) for p in ledger_repo.page_payouts(session, limit=50)]
    assert times == sorted(times, reverse=True)
    assert seen[0] == "po_f" and seen[1] == "po_e" and seen[-1] == "po_a"
