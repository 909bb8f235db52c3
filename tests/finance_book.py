"""A small book of customers, subscriptions, status changes, invoices, attempts and payments,
written straight into a migrated database, with the report figures it must give (worked out
by hand in the comments, not by the code under test). Used by the report, API and dashboard
tests on SQLite and PostgreSQL.

All in 2026, UTC. Reports cover January to April; AR aging is as of 2026-04-30T00:00Z.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    CUSTOMERS,
    INVOICES,
    PAYMENT_ATTEMPTS,
    PAYMENTS,
    PLANS,
    REFUNDS,
    SUBSCRIPTION_STATUS_CHANGES,
    SUBSCRIPTION_TERMS_CHANGES,
    SUBSCRIPTIONS,
)


def at(month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


AS_OF = at(4, 30)
# The dashboard's "now": its default report range ends with April.
NOW = at(4, 30, 12)


def _customer(cid: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "external_id": f"ext-{cid}",
        "email": f"{cid}@example.com",
        "name": extra.pop("name", f"Customer {cid}"),
        "timezone": extra.pop("timezone", "UTC"),
        "invoice_prefix": prefix,
        "next_invoice_sequence": 10,
        "created_at": at(1, 1),
        "updated_at": at(1, 1),
        **extra,
    }


def _subscription(
    sid: str,
    cid: str,
    amount: int,
    currency: str,
    interval: str,
    status: str,
    created: datetime,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": sid,
        "customer_id": cid,
        "plan_code": "book-plan",
        "status": status,
        "amount_minor": amount,
        "currency": currency,
        "interval": interval,
        "interval_count": 1,
        "timezone": "UTC",
        "anchor_at": created,
        "workflow_id": f"subscription-{sid}",
        "created_at": created,
        "updated_at": created,
        **extra,
    }


def _invoice(
    iid: str,
    sid: str,
    cid: str,
    number: str,
    amount: int,
    currency: str,
    status: str,
    created: datetime,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": iid,
        "number": number,
        "subscription_id": sid,
        "customer_id": cid,
        "period_index": 0,
        "period_start": created,
        "period_end": created.replace(month=created.month + 1),
        "amount_due_minor": amount,
        "amount_paid_minor": amount if status == "paid" else 0,
        "currency": currency,
        "status": status,
        "description": f"Book plan ({currency})",
        "created_at": created,
        "finalized_at": created,
        **extra,
    }


def _attempt(iid: str, n: int, status: str, outcome: str, when: datetime, **extra: Any) -> dict:
    return {
        "id": f"pa_{iid}_{n}",
        "invoice_id": iid,
        "attempt_number": n,
        "idempotency_key": f"{iid}-attempt-{n}",
        "amount_minor": extra.pop("amount", 0),
        "currency": extra.pop("currency", "USD"),
        "status": status,
        "outcome": outcome,
        "reason": "scheduled" if n == 1 else "retry",
        "created_at": when,
        "completed_at": when,
        **extra,
    }


def _payment(iid: str, n: int, amount: int, currency: str, when: datetime, fee: int) -> dict:
    return {
        "id": f"py_{iid}",
        "invoice_id": iid,
        "attempt_id": f"pa_{iid}_{n}",
        "stripe_payment_intent_id": f"pi_{iid}",
        "stripe_charge_id": f"ch_{iid}",
        "amount_minor": amount,
        "currency": currency,
        "fee_minor": fee,
        "net_minor": amount - fee,
        "settlement_amount_minor": amount,
        "settlement_currency": currency,
        "settled_at": when,
    }


def _insert_each(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    # One statement a row: the rows set different optional columns.
    for row in rows:
        session.execute(insert(table).values(**row))


def write_book(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session, session.begin():
        session.execute(
            insert(PLANS).values(
                code="book-plan",
                name="Book plan",
                amount_minor=1000,
                currency="USD",
                interval="month",
                interval_count=1,
                trial_days=0,
                dunning_retry_offsets_days=[3, 5],
                dunning_final_action="cancel",
                active=True,
                created_at=at(1, 1),
            )
        )
        _insert_each(
            session,
            CUSTOMERS,
            [
                _customer("cus_a", "AAAAAAAA"),
                _customer("cus_b", "BBBBBBBB"),
                _customer(
                    "cus_c",
                    "CCCCCCCC",
                    locale="fr_FR",
                    timezone="Europe/Paris",
                    name="Société Générale d'Essai",
                ),
                _customer("cus_d", "DDDDDDDD"),
            ],
        )
        _insert_each(
            session,
            SUBSCRIPTIONS,
            [
                # USD 10.00 a month from Jan 10, canceled Mar 15.
                _subscription("sub_a", "cus_a", 1000, "USD", "month", "canceled", at(1, 10)),
                # USD 20.00 a month from Feb 5, paused Mar 10 to Apr 20.
                _subscription("sub_b", "cus_b", 2000, "USD", "month", "active", at(2, 5)),
                # EUR 9.99 a week: MRR 999 x 52 / 12 = 4329; trial from Jan 20, active Feb 3;
                # two seats from Mar 20 (MRR 8658).
                _subscription(
                    "sub_c", "cus_c", 999, "EUR", "week", "active", at(1, 20), quantity=2
                ),
                # USD 120.00 a year: MRR 1000; created at the very start of February; USD 60.00
                # a year (MRR 500) from Apr 10.
                _subscription("sub_d", "cus_d", 6000, "USD", "year", "active", at(2, 1)),
            ],
        )
        changes = [
            ("sub_a", "pending", "active", at(1, 10)),
            ("sub_a", "active", "canceled", at(3, 15)),
            ("sub_b", "pending", "active", at(2, 5)),
            ("sub_b", "active", "paused", at(3, 10)),
            ("sub_b", "paused", "active", at(4, 20)),
            ("sub_c", "pending", "trialing", at(1, 20)),
            ("sub_c", "trialing", "active", at(2, 3)),
            ("sub_d", "pending", "active", at(2, 1)),
        ]
        _insert_each(
            session,
            SUBSCRIPTION_STATUS_CHANGES,
            [
                {"subscription_id": s, "from_status": f, "to_status": t, "changed_at": w}
                for s, f, t, w in changes
            ],
        )
        # (subscription, interval, (amount, quantity) before, after, when)
        plan_changes = [
            ("sub_c", "week", (999, 1), (999, 2), at(3, 20)),
            ("sub_d", "year", (12000, 1), (6000, 1), at(4, 10)),
        ]
        _insert_each(
            session,
            SUBSCRIPTION_TERMS_CHANGES,
            [
                {
                    "subscription_id": s,
                    "changed_at": w,
                    "from_plan_code": "book-plan",
                    "to_plan_code": "book-plan",
                    "from_amount_minor": b[0],
                    "to_amount_minor": a[0],
                    "from_quantity": b[1],
                    "to_quantity": a[1],
                    "from_interval": i,
                    "to_interval": i,
                    "from_interval_count": 1,
                    "to_interval_count": 1,
                }
                for s, i, b, a, w in plan_changes
            ],
        )
        _insert_each(
            session,
            INVOICES,
            [
                _invoice(
                    "in_1",
                    "sub_a",
                    "cus_a",
                    "AAAAAAAA-0001",
                    1000,
                    "USD",
                    "paid",
                    at(1, 10),
                    paid_at=at(1, 10, 0, 5),
                ),
                _invoice(
                    "in_2",
                    "sub_a",
                    "cus_a",
                    "AAAAAAAA-0002",
                    1000,
                    "USD",
                    "paid",
                    at(2, 10),
                    paid_at=at(2, 14),
                ),
                _invoice(
                    "in_3",
                    "sub_b",
                    "cus_b",
                    "BBBBBBBB-0001",
                    2000,
                    "USD",
                    "uncollectible",
                    at(2, 5),
                    marked_uncollectible_at=at(3, 8),
                ),
                _invoice("in_4", "sub_d", "cus_d", "DDDDDDDD-0001", 12000, "USD", "open", at(2, 1)),
                _invoice("in_5", "sub_b", "cus_b", "BBBBBBBB-0002", 2000, "USD", "open", at(4, 20)),
                _invoice(
                    "in_6", "sub_c", "cus_c", "CCCCCCCC-0001", 123456, "EUR", "open", at(3, 3)
                ),
                _invoice(
                    "in_7",
                    "sub_a",
                    "cus_a",
                    "AAAAAAAA-0003",
                    1000,
                    "USD",
                    "void",
                    at(3, 10),
                    voided_at=at(3, 15),
                ),
                _invoice(
                    "in_8", "sub_b", "cus_b", "BBBBBBBB-0003", 500, "USD", "open", at(4, 29, 12)
                ),
            ],
        )
        _insert_each(
            session,
            PAYMENT_ATTEMPTS,
            [
                _attempt("in_1", 1, "succeeded", "paid", at(1, 10, 0, 5), amount=1000),
                _attempt(
                    "in_2",
                    1,
                    "failed",
                    "soft_decline",
                    at(2, 10),
                    amount=1000,
                    decline_code="insufficient_funds",
                ),
                _attempt("in_2", 2, "succeeded", "paid", at(2, 14), amount=1000),
                _attempt(
                    "in_3",
                    1,
                    "failed",
                    "hard_decline",
                    at(2, 5),
                    amount=2000,
                    decline_code="stolen_card",
                ),
                _attempt("in_4", 1, "failed", "soft_decline", at(2, 1), amount=12000),
                _attempt(
                    "in_6",
                    1,
                    "requires_action",
                    "authentication_required",
                    at(3, 3),
                    amount=123456,
                    currency="EUR",
                ),
            ],
        )
        _insert_each(
            session,
            PAYMENTS,
            [
                _payment("in_1", 1, 1000, "USD", at(1, 10, 0, 5), fee=59),
                _payment("in_2", 2, 1000, "USD", at(2, 14), fee=59),
            ],
        )
        _insert_each(
            session,
            REFUNDS,
            [
                # in_1 (paid in January) partly refunded after that month ended.
                _refund("rf_1", "in_1", 300, "succeeded", at(1, 31, 22), completed=at(2, 3)),
                # A refund of in_2 the provider refused: nothing refunded.
                _refund("rf_2", "in_2", 1000, "failed", at(4, 1), completed=at(4, 1, 0, 1)),
                # One still pending at the provider: not refunded yet.
                _refund("rf_3", "in_2", 200, "pending", at(4, 29)),
            ],
        )


def _refund(
    rid: str,
    iid: str,
    amount: int,
    status: str,
    created: datetime,
    completed: datetime | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "invoice_id": iid,
        "payment_id": f"py_{iid}",
        "source": "provider",
        "amount_minor": amount,
        "currency": "USD",
        "status": status,
        "stripe_refund_id": f"re_{rid}",
        "created_at": created,
        "updated_at": completed or created,
        "completed_at": completed,
    }


# ---- What the reports must say (worked out by hand) -----------------------------------------

#: (month, currency) -> (opening, new, expansion, contraction, churned, reactivated, closing)
MRR = {
    # Jan: sub_a starts (new 1000); sub_d is created exactly at Feb 1, so not yet.
    ("2026-01", "USD"): (0, 1000, 0, 0, 0, 0, 1000),
    # Feb: sub_b (2000) and sub_d (12000 / 12 = 1000) are new.
    ("2026-02", "USD"): (1000, 3000, 0, 0, 0, 0, 4000),
    # Mar: sub_a canceled and sub_b paused: 3000 churned.
    ("2026-03", "USD"): (4000, 0, 0, 0, 3000, 0, 1000),
    # Apr: sub_b resumed: reactivated, not new; sub_d down to 500 a month: contraction.
    ("2026-04", "USD"): (1000, 0, 0, 500, 0, 2000, 2500),
    # EUR: the trial counts nothing; active from Feb 3 at 999 x 52 / 12 = 4329.
    ("2026-01", "EUR"): (0, 0, 0, 0, 0, 0, 0),
    ("2026-02", "EUR"): (0, 4329, 0, 0, 0, 0, 4329),
    # Mar: sub_c's second seat (8658): expansion.
    ("2026-03", "EUR"): (4329, 0, 4329, 0, 0, 0, 8658),
    ("2026-04", "EUR"): (8658, 0, 0, 0, 0, 0, 8658),
}
#: March USD: 3 customers at the opening, 1 at the closing.
MARCH_USD_CHURN = {
    "churned_customers": 2,
    "logo_churn_rate": "0.6667",
    "revenue_churn_rate": "0.7500",
}

#: (currency, bucket) -> (invoices, outstanding) as of 2026-04-30T00:00Z.
AGING = {
    # in_8: finalized Apr 29 12:00, half a day: current.
    ("USD", "current"): (1, 500),
    # in_5: Apr 20, 10 days.
    ("USD", "1-30"): (1, 2000),
    ("USD", "31-60"): (0, 0),
    # in_4: Feb 1, 88 days.
    ("USD", "61-90"): (1, 12000),
    ("USD", "over-90"): (0, 0),
    ("EUR", "current"): (0, 0),
    ("EUR", "1-30"): (0, 0),
    # in_6: Mar 3, 58 days.
    ("EUR", "31-60"): (1, 123456),
    ("EUR", "61-90"): (0, 0),
    ("EUR", "over-90"): (0, 0),
}

#: (currency, by, key) -> (failed, recovered, recovered amount, rate), Jan to Apr.
DUNNING = {
    # in_2 (soft, paid by attempt 2), in_3 (hard, written off), in_4 (soft, still open).
    ("USD", "total", "all"): (3, 1, 1000, "0.3333"),
    ("USD", "attempt", "2"): (3, 1, 1000, "0.3333"),
    ("USD", "decline_class", "soft_decline"): (2, 1, 1000, "0.5000"),
    ("USD", "decline_class", "hard_decline"): (1, 0, 0, "0.0000"),
    ("EUR", "total", "all"): (1, 0, 0, "0.0000"),
    ("EUR", "decline_class", "authentication_required"): (1, 0, 0, "0.0000"),
}
WRITTEN_OFF = {"USD": (1, 2000), "EUR": (0, 0)}

#: (month, currency) -> (invoiced, invoices, collected, payments, fees)
COLLECTIONS = {
    ("2026-01", "USD"): (1000, 1, 1000, 1, 59),
    # in_2 + in_3 (uncollectible still was invoiced) + in_4.
    ("2026-02", "USD"): (15000, 3, 1000, 1, 59),
    # in_7 is void: not invoiced.
    ("2026-03", "USD"): (0, 0, 0, 0, 0),
    ("2026-04", "USD"): (2500, 2, 0, 0, 0),
    ("2026-01", "EUR"): (0, 0, 0, 0, 0),
    ("2026-02", "EUR"): (0, 0, 0, 0, 0),
    ("2026-03", "EUR"): (123456, 1, 0, 0, 0),
    ("2026-04", "EUR"): (0, 0, 0, 0, 0),
}

#: (month, currency) -> (refunded, refunds, net collected): refunds that succeeded, in the
#: month they completed. rf_1 (300 of in_1's January payment) completed Feb 3: February's
#: collected 1000 (in_2) less 300 is 700, and January keeps its 1000. rf_2 failed and rf_3 is
#: pending: nothing.
REFUNDED = {
    ("2026-01", "USD"): (0, 0, 1000),
    ("2026-02", "USD"): (300, 1, 700),
    ("2026-03", "USD"): (0, 0, 0),
    ("2026-04", "USD"): (0, 0, 0),
    ("2026-01", "EUR"): (0, 0, 0),
    ("2026-02", "EUR"): (0, 0, 0),
    ("2026-03", "EUR"): (0, 0, 0),
    ("2026-04", "EUR"): (0, 0, 0),
}
