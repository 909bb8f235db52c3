"""MRR and dunning kept by the database, as collected vs invoiced is (0019):

- ``report_mrr_prices``: the subscriptions that count toward MRR now (status active,
  past_due or needs_attention), per currency and price (amount, interval, count, quantity);
- ``report_mrr_customers`` / ``report_mrr_currency_customers``: per currency and customer,
  how many of those have a monthly amount above 0; per currency, how many customers have one;
- ``report_dunning_invoices``: one row per invoice whose first attempt failed (its UTC month,
  currency, status, amount due, that failure's class and the later attempt that paid it, 0 for
  none), and ``report_dunning_monthly``: the same summed per month and key;
- indexes that find what changed since an instant: subscriptions by ``created_at``, status
  changes by ``changed_at``;

each kept by triggers in the same transaction as every write to ``subscriptions``,
``payment_attempts`` and ``invoices``, and backfilled from the rows already there.

Revision ID: 0021
Revises: 0018

The MRR report then reads the subscriptions steady over its months as "counted now" less the
few created or changed since its first month, instead of scanning the book four times; the
dunning report reads a dozen rows a month instead of joining every failed attempt with the
invoices. ``db.repositories.reports`` keeps the from-scratch queries these must equal
(tests/db/test_report_rollups.py).

PostgreSQL: statement triggers over transition tables (one grouped upsert per statement, in
key order); each month/price/currency total kept in 16 slots (``pg_backend_pid() % 16``) so
concurrent writers do not queue on one row. A dunning row is recomputed from the invoice and
its attempts after locking the invoice (``FOR NO KEY UPDATE``, as any update of it does), in a
statement that starts after the lock is held, so two transactions refreshing one invoice see
each other's committed attempts: the last refresh is computed from everything. SQLite: row
triggers (one writer at a time), slot 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SLOTS = 16
#: Frozen here (billing.reports.MRR_STATUSES when written); a later rule gets a revision.
COUNTED = "('active', 'past_due', 'needs_attention')"
#: A price's columns, as SQL ("interval" is a keyword in PostgreSQL).
PRICE = ("currency", "amount_minor", '"interval"', "interval_count", "quantity")


def _paying(r: str) -> str:
    """The row's monthly amount (billing.reports.monthly_recurring_minor: amount x quantity
    over the interval's months, rounded half to even) is above 0: the exact amount is above
    one half, i.e. 2 x amount x quantity x d > count x n for months per unit n / d (month 1,
    year 12, week 12/52, day 12/365). Exact, in numeric."""
    return (
        f"(2 * {r}amount_minor::numeric * {r}quantity * CASE {r}\"interval\" WHEN 'week' THEN 52 "
        f"WHEN 'day' THEN 365 ELSE 1 END > {r}interval_count::numeric * CASE {r}\"interval\" "
        "WHEN 'month' THEN 1 ELSE 12 END)"
    )


def _sqlite_paying(r: str) -> str:
    # SQLite has no numeric: integers (64-bit; a product that would overflow becomes REAL,
    # far beyond any amount a price has).
    return _paying(r).replace("::numeric", "")


def _month(dialect: str, column: str) -> str:
    if dialect == "postgresql":
        return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM')"
    return f"substr({column}, 1, 7)"


#: An attempt that can decide an invoice's dunning row: a first attempt that did not pay, or
#: a later one that did. An attempt neither before nor after a write changes nothing.
RELEVANT = (
    "(({r}attempt_number = 1 AND {r}outcome <> 'paid') "
    "OR ({r}attempt_number > 1 AND {r}outcome = 'paid'))"
)
#: The invoice columns a dunning row copies.
INVOICE_WATCHED = ("status", "amount_due_minor", "created_at", "currency")
DUNNING_KEY = ("month", "currency", "status", "first_failure", "paid_by_attempt")


def _fresh_dunning(dialect: str, where: str) -> str:
    """The dunning rows of the invoices matching ``where`` (alias ``i``), from scratch."""
    return (
        f"SELECT i.id AS invoice_id, {_month(dialect, 'i.created_at')} AS month, i.currency, "
        "i.status, a.outcome AS first_failure, COALESCE((SELECT min(p.attempt_number) FROM "
        "payment_attempts p WHERE p.invoice_id = i.id AND p.outcome = 'paid' AND "
        "p.attempt_number > 1), 0) AS paid_by_attempt, i.amount_due_minor "
        "FROM invoices i JOIN payment_attempts a ON a.invoice_id = i.id "
        f"AND a.attempt_number = 1 AND a.outcome <> 'paid' WHERE {where}"
    )


def _pg_functions() -> list[str]:
    key = ", ".join(DUNNING_KEY)
    refresh = f"""
CREATE FUNCTION report_dunning_refresh(ids text[]) RETURNS void LANGUAGE plpgsql AS $body$
BEGIN
    IF ids IS NULL OR cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    -- Serialise with every other writer of these invoices; the statements below start after
    -- the lock is held, so they see what the previous holder committed.
    PERFORM 1 FROM invoices WHERE id = ANY(ids) ORDER BY id FOR NO KEY UPDATE;
    INSERT INTO report_dunning_monthly ({key}, slot, invoices, amount_due_minor)
    SELECT {key}, pg_backend_pid() % {SLOTS}, sum(n), sum(amount)
    FROM (
        SELECT {key}, 1 AS n, amount_due_minor AS amount
        FROM ({_fresh_dunning("postgresql", "i.id = ANY(ids)")}) AS fresh
        UNION ALL
        SELECT {key}, -1, -amount_due_minor FROM report_dunning_invoices
        WHERE invoice_id = ANY(ids)
    ) AS delta
    GROUP BY {key} HAVING sum(n) <> 0 OR sum(amount) <> 0 ORDER BY {key}
    ON CONFLICT ({key}, slot) DO UPDATE SET
        invoices = report_dunning_monthly.invoices + EXCLUDED.invoices,
        amount_due_minor = report_dunning_monthly.amount_due_minor + EXCLUDED.amount_due_minor;
    DELETE FROM report_dunning_invoices WHERE invoice_id = ANY(ids);
    INSERT INTO report_dunning_invoices (invoice_id, {key}, amount_due_minor)
    SELECT invoice_id, {key}, amount_due_minor
    FROM ({_fresh_dunning("postgresql", "i.id = ANY(ids)")}) AS fresh;
END
$body$
"""
    relevant_new = RELEVANT.format(r="")
    attempts = f"""
CREATE FUNCTION report_dunning_payment_attempts() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM report_dunning_refresh(ARRAY(
            SELECT DISTINCT invoice_id FROM new_rows WHERE {relevant_new}));
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM report_dunning_refresh(ARRAY(
            SELECT invoice_id FROM new_rows WHERE {relevant_new}
            UNION SELECT invoice_id FROM old_rows WHERE {relevant_new}));
    ELSE
        PERFORM report_dunning_refresh(ARRAY(
            SELECT DISTINCT invoice_id FROM old_rows WHERE {relevant_new}));
    END IF;
    RETURN NULL;
END
$body$
"""
    changed = " OR ".join(f"o.{c} IS DISTINCT FROM n.{c}" for c in INVOICE_WATCHED)
    invoices = f"""
CREATE FUNCTION report_dunning_invoices_changed() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    -- Only invoices whose first attempt failed have a row to move (ix_payment_attempts_
    -- first_failed); an attempt that fails later refreshes its invoice itself.
    PERFORM report_dunning_refresh(ARRAY(
        SELECT n.id FROM new_rows n JOIN old_rows o ON o.id = n.id WHERE ({changed})
        AND EXISTS (SELECT 1 FROM payment_attempts a WHERE a.invoice_id = n.id
            AND a.attempt_number = 1 AND a.outcome <> 'paid')));
    RETURN NULL;
END
$body$
"""
    return [refresh, attempts, invoices, _pg_mrr_function()]


def _mrr_delta(sources: list[tuple[str, str]]) -> str:
    """(n, customer_id, paying, price...) for each counted row of each (transition table,
    sign)."""
    columns = ", ".join(PRICE)
    return " UNION ALL ".join(
        f"SELECT {sign} AS n, customer_id, {_paying('')} AS paying, {columns} "
        f"FROM {table} WHERE status IN {COUNTED}"
        for table, sign in sources
    )


def _pg_mrr_statements(sources: list[tuple[str, str]]) -> str:
    price = ", ".join(PRICE)
    delta = _mrr_delta(sources)
    crossed = (
        "CASE WHEN up.subscriptions > 0 AND up.subscriptions - d.n <= 0 THEN 1 "
        "WHEN up.subscriptions <= 0 AND up.subscriptions - d.n > 0 THEN -1 ELSE 0 END"
    )
    return f"""
        INSERT INTO report_mrr_prices ({price}, slot, subscriptions)
        SELECT {price}, pg_backend_pid() % {SLOTS}, sum(n) FROM ({delta}) AS delta
        GROUP BY {price} HAVING sum(n) <> 0 ORDER BY {price}
        ON CONFLICT ({price}, slot) DO UPDATE
        SET subscriptions = report_mrr_prices.subscriptions + EXCLUDED.subscriptions;
        -- A customer counts while some subscription of theirs in the currency has MRR above
        -- 0: the per-currency count moves when their count crosses 0. The upsert locks the
        -- customer's row, so the value it returns is after every committed write.
        WITH d AS (
            SELECT currency, customer_id, sum(n) AS n FROM ({delta}) AS delta WHERE paying
            GROUP BY currency, customer_id HAVING sum(n) <> 0
        ), up AS (
            INSERT INTO report_mrr_customers (currency, customer_id, subscriptions)
            SELECT currency, customer_id, n FROM d ORDER BY currency, customer_id
            ON CONFLICT (currency, customer_id) DO UPDATE
            SET subscriptions = report_mrr_customers.subscriptions + EXCLUDED.subscriptions
            RETURNING currency, customer_id, subscriptions
        )
        INSERT INTO report_mrr_currency_customers (currency, slot, customers)
        SELECT up.currency, pg_backend_pid() % {SLOTS}, sum({crossed})
        FROM up JOIN d ON d.currency = up.currency AND d.customer_id = up.customer_id
        GROUP BY up.currency HAVING sum({crossed}) <> 0 ORDER BY up.currency
        ON CONFLICT (currency, slot) DO UPDATE
        SET customers = report_mrr_currency_customers.customers + EXCLUDED.customers;
"""


def _pg_mrr_function() -> str:
    return f"""
CREATE FUNCTION report_mrr_subscriptions() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {_pg_mrr_statements([("new_rows", "1")])}
    ELSIF TG_OP = 'UPDATE' THEN
        {_pg_mrr_statements([("new_rows", "1"), ("old_rows", "-1")])}
    ELSE
        {_pg_mrr_statements([("old_rows", "-1")])}
    END IF;
    RETURN NULL;
END
$body$
"""


_PG_EVENTS = {
    "insert": "REFERENCING NEW TABLE AS new_rows",
    "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "REFERENCING OLD TABLE AS old_rows",
}
#: (table, events, function) of every PostgreSQL trigger.
_PG_TRIGGERS = (
    ("subscriptions", ("insert", "update", "delete"), "report_mrr_subscriptions"),
    ("payment_attempts", ("insert", "update", "delete"), "report_dunning_payment_attempts"),
    # An invoice is inserted before any attempt and cannot be deleted while it has one.
    ("invoices", ("update",), "report_dunning_invoices_changed"),
)
_PG_FUNCTIONS = (
    "report_dunning_payment_attempts",
    "report_dunning_invoices_changed",
    "report_mrr_subscriptions",
    "report_dunning_refresh(text[])",
)

MRR_WATCHED = ("status", "customer_id", *PRICE)


def _sqlite_triggers() -> list[str]:
    key = ", ".join(DUNNING_KEY)
    statements = []
    # The monthly sums follow the per-invoice rows.
    for event, row, sign in (("INSERT", "NEW", "+"), ("DELETE", "OLD", "-")):
        match = " AND ".join(f"{c} = {row}.{c}" for c in DUNNING_KEY)
        values = ", ".join(f"{row}.{c}" for c in DUNNING_KEY)
        statements.append(
            f"CREATE TRIGGER report_dunning_monthly_{event.lower()} AFTER {event} ON "
            f"report_dunning_invoices FOR EACH ROW BEGIN "
            f"INSERT INTO report_dunning_monthly ({key}, slot) VALUES ({values}, 0) "
            "ON CONFLICT DO NOTHING; "
            f"UPDATE report_dunning_monthly SET invoices = invoices {sign} 1, "
            f"amount_due_minor = amount_due_minor {sign} {row}.amount_due_minor "
            f"WHERE {match} AND slot = 0; END"
        )

    def refresh(invoice: str) -> str:
        return (
            f"DELETE FROM report_dunning_invoices WHERE invoice_id = {invoice}; "
            f"INSERT INTO report_dunning_invoices (invoice_id, {key}, amount_due_minor) "
            f"SELECT invoice_id, {key}, amount_due_minor FROM "
            f"({_fresh_dunning('sqlite', f'i.id = {invoice}')}); "
        )

    for event, when, rows in (
        ("INSERT", RELEVANT.format(r="NEW."), ("NEW",)),
        ("DELETE", RELEVANT.format(r="OLD."), ("OLD",)),
        (
            "UPDATE",
            f"{RELEVANT.format(r='OLD.')} OR {RELEVANT.format(r='NEW.')}",
            ("OLD", "NEW"),
        ),
    ):
        body = "".join(refresh(f"{row}.invoice_id") for row in rows)
        statements.append(
            f"CREATE TRIGGER report_dunning_payment_attempts_{event.lower()} AFTER {event} ON "
            f"payment_attempts FOR EACH ROW WHEN {when} BEGIN {body}END"
        )
    statements.append(
        f"CREATE TRIGGER report_dunning_invoices_update AFTER UPDATE OF "
        f"{', '.join(INVOICE_WATCHED)} ON invoices FOR EACH ROW WHEN EXISTS (SELECT 1 FROM "
        "payment_attempts a WHERE a.invoice_id = NEW.id AND a.attempt_number = 1 AND "
        f"a.outcome <> 'paid') BEGIN {refresh('NEW.id')}END"
    )
    # MRR: a counted row adds 1 to its price; a paying counted row 1 to its customer's count,
    # and the currency's customers move when that count crosses 0.
    for name, event, row, sign in (
        ("insert_new", "INSERT", "NEW", "+"),
        ("delete_old", "DELETE", "OLD", "-"),
        ("update_old", f"UPDATE OF {', '.join(MRR_WATCHED)}", "OLD", "-"),
        ("update_new", f"UPDATE OF {', '.join(MRR_WATCHED)}", "NEW", "+"),
    ):
        r = f"{row}."
        price_match = " AND ".join(f"{c} = {r}{c}" for c in PRICE)
        customer = f"currency = {r}currency AND customer_id = {r}customer_id"
        crossed = "1" if sign == "+" else "0"
        statements.append(
            f"CREATE TRIGGER report_mrr_subscriptions_{name} AFTER {event} ON subscriptions "
            f"FOR EACH ROW WHEN {r}status IN {COUNTED} BEGIN "
            f"INSERT INTO report_mrr_prices ({', '.join(PRICE)}, slot) "
            f"VALUES ({', '.join(r + c for c in PRICE)}, 0) ON CONFLICT DO NOTHING; "
            f"UPDATE report_mrr_prices SET subscriptions = subscriptions {sign} 1 "
            f"WHERE {price_match} AND slot = 0; "
            f"INSERT INTO report_mrr_customers (currency, customer_id) "
            f"SELECT {r}currency, {r}customer_id WHERE {_sqlite_paying(r)} "
            "ON CONFLICT DO NOTHING; "
            f"UPDATE report_mrr_customers SET subscriptions = subscriptions {sign} 1 "
            f"WHERE {customer} AND {_sqlite_paying(r)}; "
            f"INSERT INTO report_mrr_currency_customers (currency, slot) "
            f"SELECT {r}currency, 0 WHERE {_sqlite_paying(r)} ON CONFLICT DO NOTHING; "
            f"UPDATE report_mrr_currency_customers SET customers = customers {sign} 1 "
            f"WHERE currency = {r}currency AND slot = 0 AND {_sqlite_paying(r)} AND "
            f"(SELECT subscriptions FROM report_mrr_customers WHERE {customer}) = {crossed}; "
            "END"
        )
    return statements


def _sqlite_trigger_names() -> list[str]:
    return [
        "report_dunning_monthly_insert",
        "report_dunning_monthly_delete",
        "report_dunning_payment_attempts_insert",
        "report_dunning_payment_attempts_delete",
        "report_dunning_payment_attempts_update",
        "report_dunning_invoices_update",
        *(
            f"report_mrr_subscriptions_{name}"
            for name in ("insert_new", "delete_old", "update_old", "update_new")
        ),
    ]


def _backfill(dialect: str) -> list[str]:
    """The rollups of the rows already there (SQLite's triggers on report_dunning_invoices
    sum its rows into report_dunning_monthly as they are inserted)."""
    price = ", ".join(PRICE)
    key = ", ".join(DUNNING_KEY)
    paying = _paying("") if dialect == "postgresql" else _sqlite_paying("")
    return [
        f"INSERT INTO report_mrr_prices ({price}, slot, subscriptions) "
        f"SELECT {price}, 0, count(*) FROM subscriptions WHERE status IN {COUNTED} "
        f"GROUP BY {price}",
        "INSERT INTO report_mrr_customers (currency, customer_id, subscriptions) "
        f"SELECT currency, customer_id, count(*) FROM subscriptions WHERE status IN {COUNTED} "
        f"AND {paying} GROUP BY currency, customer_id",
        "INSERT INTO report_mrr_currency_customers (currency, slot, customers) "
        "SELECT currency, 0, count(*) FROM report_mrr_customers WHERE subscriptions > 0 "
        "GROUP BY currency",
        f"INSERT INTO report_dunning_invoices (invoice_id, {key}, amount_due_minor) "
        f"SELECT invoice_id, {key}, amount_due_minor FROM ({_fresh_dunning(dialect, '1 = 1')}) "
        "AS fresh",
    ]


def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), server_default="0", nullable=False)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_index("ix_subscriptions_created_at", "subscriptions", ["created_at"])
    op.create_index(
        "ix_subscription_status_changes_changed_at",
        "subscription_status_changes",
        ["changed_at", "subscription_id"],
    )
    price_columns: list[sa.Column[Any]] = [
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("interval", sa.String(8), nullable=False),
        sa.Column("interval_count", sa.Integer(), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
    ]
    op.create_table(
        "report_mrr_prices",
        *price_columns,
        sa.Column("slot", sa.SmallInteger(), server_default="0", nullable=False),
        _count("subscriptions"),
        sa.PrimaryKeyConstraint(
            *(c.name for c in price_columns), "slot", name=op.f("pk_report_mrr_prices")
        ),
    )
    op.create_table(
        "report_mrr_customers",
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("customer_id", sa.String(40), nullable=False),
        _count("subscriptions"),
        sa.PrimaryKeyConstraint("currency", "customer_id", name=op.f("pk_report_mrr_customers")),
    )
    op.create_table(
        "report_mrr_currency_customers",
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("slot", sa.SmallInteger(), server_default="0", nullable=False),
        _count("customers"),
        sa.PrimaryKeyConstraint("currency", "slot", name=op.f("pk_report_mrr_currency_customers")),
    )
    dunning_key: list[sa.Column[Any]] = [
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("first_failure", sa.String(32), nullable=False),
        sa.Column("paid_by_attempt", sa.Integer(), nullable=False),
    ]
    op.create_table(
        "report_dunning_invoices",
        sa.Column("invoice_id", sa.String(40), nullable=False),
        *dunning_key,
        sa.Column("amount_due_minor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("invoice_id", name=op.f("pk_report_dunning_invoices")),
    )
    op.create_table(
        "report_dunning_monthly",
        *(sa.Column(c.name, c.type, nullable=False) for c in dunning_key),
        sa.Column("slot", sa.SmallInteger(), server_default="0", nullable=False),
        _count("invoices"),
        _count("amount_due_minor"),
        sa.PrimaryKeyConstraint(*DUNNING_KEY, "slot", name=op.f("pk_report_dunning_monthly")),
    )
    # Triggers first, then the backfill, in one transaction: on PostgreSQL CREATE TRIGGER
    # waits for the writers in flight and holds new ones until commit, so every row is counted
    # once, by the backfill or by a trigger.
    if dialect == "postgresql":
        for function in _pg_functions():
            op.execute(function)
        for table, events, function in _PG_TRIGGERS:
            for event in events:
                op.execute(
                    f"CREATE TRIGGER {function}_{event} AFTER {event.upper()} ON {table} "
                    f"{_PG_EVENTS[event]} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
                )
    else:
        for statement in _sqlite_triggers():
            op.execute(statement)
    for statement in _backfill(dialect):
        op.execute(statement)
    if dialect == "postgresql":
        key = ", ".join(DUNNING_KEY)
        op.execute(
            f"INSERT INTO report_dunning_monthly ({key}, slot, invoices, amount_due_minor) "
            f"SELECT {key}, 0, count(*), sum(amount_due_minor) FROM report_dunning_invoices "
            f"GROUP BY {key}"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for table, events, function in _PG_TRIGGERS:
            for event in events:
                op.execute(f"DROP TRIGGER {function}_{event} ON {table}")
        for function in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION {function}")
    else:
        for name in _sqlite_trigger_names():
            op.execute(f"DROP TRIGGER {name}")
    for table in (
        "report_dunning_monthly",
        "report_dunning_invoices",
        "report_mrr_currency_customers",
        "report_mrr_customers",
        "report_mrr_prices",
    ):
        op.drop_table(table)
    op.drop_index(
        "ix_subscription_status_changes_changed_at", table_name="subscription_status_changes"
    )
    op.drop_index("ix_subscriptions_created_at", table_name="subscriptions")
