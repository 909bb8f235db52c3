"""MRR kept per (currency, month) by the database, so any report range reads O(months) rows:

- ``report_mrr_customer_months``: per currency, customer and month, what that customer's
  subscriptions add at the month's start and move in the month before it (see below),
  recomputed from the customer's subscriptions and their status changes on every write that
  can change them;
- ``report_mrr_monthly``: the same summed per currency and month, in 16 slots (0019, 0021).

Revision ID: 0023
Revises: 0022

A row of month ``M`` holds

- the *levels* that move at ``M``'s first instant (the boundary between ``M - 1`` and ``M``):
  MRR, subscriptions counted with MRR above 0, customers owning one; the level at a boundary
  is the sum of the rows up to it;
- the *movements* of the month before ``M`` (from ``M - 1``'s start to ``M``'s): new,
  reactivated, churned, and the customers who stopped counting (churned customers).

How one subscription counts (``billing.reports``): its monthly amount (the price now, rounded
half to even once) at every month start at which it existed and its status just before that
instant counted (active, past_due, needs_attention); the status just before an instant is the
``to_status`` of its last status change (by ``changed_at``, then ``id``) before it, or, with
none, the ``from_status`` of its first change, or, with no change at all, its status now. A
subscription starting to count at a boundary is *reactivated* if it counted at any instant
before the previous boundary (its first counted instant is its creation if its first status
counted, else its first change to a counted status), else *new*. A customer counts while some
of its subscriptions in the currency does. Exactly what ``mrr_report`` computes from the rows
(tests/db/test_report_rollups.py).

A customer's rows are recomputed whole (a customer has few subscriptions) whenever one of its
subscriptions is inserted, deleted, or changes customer, currency, price, quantity, interval,
creation instant or (with no status change logged) status, and whenever a status change of one
of them is written: the old rows are taken off the monthly sums and the new ones added. So a
late change (``changed_at`` before others already logged) moves every boundary it should.

PostgreSQL: statement triggers over transition tables; the refresh first takes a
transaction-level advisory lock per customer (class 23, in hash order; one lock on the whole
book instead for a statement writing more than 64 customers), and its statements
start after the lock is held, so two transactions writing one customer's subscriptions see
each other's committed rows and the last refresh is computed from everything (the pattern of
0021's dunning refresh). SQLite: row triggers (one writer at a time), slot 0, the monthly sums
following ``report_mrr_customer_months`` by its own triggers. No CTE: SQLite refuses them in
triggers, so the computation is written as nested subqueries for both databases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | Sequence[str] | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SLOTS = 16
#: Frozen here (billing.reports.MRR_STATUSES when written); a later rule gets a revision.
COUNTED = "('active', 'past_due', 'needs_attention')"
#: The figures of a row (levels, then movements).
FIGURES = (
    "mrr_minor",
    "subscriptions",
    "customers",
    "new_minor",
    "reactivated_minor",
    "churned_minor",
    "churned_customers",
)
#: The subscription columns a customer's rows depend on (status: only while none is logged).
WATCHED = (
    "customer_id",
    "currency",
    "amount_minor",
    '"interval"',
    "interval_count",
    "quantity",
    "created_at",
)
CHANGES = "subscription_status_changes"
#: Advisory lock class of the refresh (this revision's number): (23, hash of the customer id)
#: per customer, each refresh holding (-23, 0) shared, or exclusive instead of the customers'
#: when it refreshes more than BULK_CUSTOMERS of them.
LOCK_CLASS = 23
BULK_CUSTOMERS = 64


def _next_month(dialect: str, column: str) -> str:
    """``YYYY-MM`` of the UTC month after the one ``column`` falls in: the first boundary
    after the instant."""
    if dialect == "postgresql":
        return (
            f"to_char(date_trunc('month', {column} AT TIME ZONE 'UTC') + interval '1 month', "
            "'YYYY-MM')"
        )
    # SQLite stores UTC wall time as 'YYYY-MM-DD HH:MM:SS.ffffff' (db.types.UTCDateTime).
    return f"strftime('%Y-%m', substr({column}, 1, 7) || '-01', '+1 month')"


def _monthly(r: str) -> str:
    """billing.reports.monthly_recurring_minor in SQL over a subscription row ``r``."""
    return monthly_of(f"{r}amount_minor", f"{r}quantity", f'{r}"interval"', f"{r}interval_count")


def monthly_of(amount: str, quantity: str, interval: str, count: str) -> str:
    """billing.reports.monthly_recurring_minor in SQL over any columns: amount x quantity over
    the interval's months (n / d per unit: month 1, year 12, week 12/52, day 12/365), half to
    even, in integers: p / q with p = amount x quantity x d, q = count x n (also 0024's)."""
    p = (
        f"({amount} * {quantity} * CASE {interval} WHEN 'week' THEN 52 "
        "WHEN 'day' THEN 365 ELSE 1 END)"
    )
    q = f"({count} * CASE {interval} WHEN 'month' THEN 1 ELSE 12 END)"
    return (
        f"({p} / {q} + CASE WHEN 2 * ({p} % {q}) > {q} THEN 1 "
        f"WHEN 2 * ({p} % {q}) = {q} THEN ({p} / {q}) % 2 ELSE 0 END)"
    )


def fresh_rows(dialect: str, where: str, *, source: str = "subscriptions s") -> str:
    """``report_mrr_customer_months`` of the customers whose subscriptions (alias ``s`` in
    ``source``) match ``where`` (it must select whole (currency, customer) pairs), from
    scratch: (currency, customer_id, month, *FIGURES)."""
    nm = _next_month
    # The subscriptions with MRR above 0: their amount, first boundary (b0), first status,
    # and the first boundary at which they had counted (fb).
    subs = (
        "SELECT x.*, "
        f"{nm(dialect, f'CASE WHEN x.initial IN {COUNTED} THEN x.created_at ELSE x.first_change_counted END')}"  # noqa: E501
        " AS fb FROM ("
        f"SELECT s.id, s.currency, s.customer_id, {_monthly('s.')} AS m, s.created_at, "
        f"{nm(dialect, 's.created_at')} AS b0, "
        f"COALESCE((SELECT c.from_status FROM {CHANGES} c WHERE c.subscription_id = s.id "
        "ORDER BY c.changed_at, c.id LIMIT 1), s.status) AS initial, "
        f"(SELECT min(c.changed_at) FROM {CHANGES} c WHERE c.subscription_id = s.id "
        f"AND c.to_status IN {COUNTED}) AS first_change_counted "
        f"FROM {source} WHERE ({where}) AND {_monthly('s.')} > 0) AS x"
    )
    carried = "sub.id, sub.currency, sub.customer_id, sub.m, sub.fb"
    # The status at each boundary where it may change: the first one (its last change before
    # it, or its first status), and each later boundary some change falls before (the last
    # change before it).
    points = (
        f"SELECT {carried}, sub.b0 AS b, COALESCE((SELECT c.to_status FROM {CHANGES} c "
        f"WHERE c.subscription_id = sub.id AND {nm(dialect, 'c.changed_at')} <= sub.b0 "
        "ORDER BY c.changed_at DESC, c.id DESC LIMIT 1), sub.initial) AS status "
        f"FROM ({subs}) AS sub "
        "UNION ALL "
        "SELECT w.id, w.currency, w.customer_id, w.m, w.fb, w.b, w.status FROM ("
        f"SELECT {carried}, sub.b0, {nm(dialect, 'c.changed_at')} AS b, c.to_status AS status, "
        f"row_number() OVER (PARTITION BY c.subscription_id, {nm(dialect, 'c.changed_at')} "
        "ORDER BY c.changed_at DESC, c.id DESC) AS rn "
        f"FROM {CHANGES} c JOIN ({subs}) AS sub ON sub.id = c.subscription_id"
        ") AS w WHERE w.rn = 1 AND w.b > w.b0"
    )
    counted = f"CASE WHEN p.status IN {COUNTED} THEN 1 ELSE 0 END"
    # Where it starts (+1) or stops (-1) counting.
    transitions = (
        "SELECT y.currency, y.customer_id, y.m, y.fb, y.b, y.counted - y.was AS sign FROM ("
        f"SELECT p.*, {counted} AS counted, "
        f"lag({counted}, 1, 0) OVER (PARTITION BY p.id ORDER BY p.b) AS was "
        f"FROM ({points}) AS p) AS y WHERE y.counted <> y.was"
    )
    per_customer = (
        "SELECT t.currency, t.customer_id, t.b AS month, sum(t.sign * t.m) AS mrr_minor, "
        "sum(t.sign) AS subscriptions, "
        "sum(CASE WHEN t.sign = 1 AND t.fb IS NOT NULL AND t.fb < t.b THEN 0 "
        "WHEN t.sign = 1 THEN t.m ELSE 0 END) AS new_minor, "
        "sum(CASE WHEN t.sign = 1 AND t.fb IS NOT NULL AND t.fb < t.b THEN t.m ELSE 0 END) "
        "AS reactivated_minor, "
        "sum(CASE WHEN t.sign = -1 THEN t.m ELSE 0 END) AS churned_minor "
        f"FROM ({transitions}) AS t GROUP BY t.currency, t.customer_id, t.b"
    )
    return with_customers(per_customer)


def with_customers(per_customer: str, extra: Sequence[str] = ()) -> str:
    """The rows of ``per_customer`` (currency, customer_id, month, mrr_minor, subscriptions,
    new, reactivated and churned minor, then ``extra`` figures) with the customer counts: the
    customer's counted subscriptions after each boundary (n) and before it (n -
    subscriptions); it counts while n > 0 (also 0024's)."""
    more = "".join(f", z.{f}" for f in extra)
    return (
        "SELECT z.currency, z.customer_id, z.month, z.mrr_minor, z.subscriptions, "
        "CASE WHEN z.n > 0 AND z.n - z.subscriptions <= 0 THEN 1 "
        "WHEN z.n <= 0 AND z.n - z.subscriptions > 0 THEN -1 ELSE 0 END AS customers, "
        "z.new_minor, z.reactivated_minor, z.churned_minor, "
        "CASE WHEN z.n <= 0 AND z.n - z.subscriptions > 0 THEN 1 ELSE 0 END "
        f"AS churned_customers{more} FROM ("
        "SELECT g.*, sum(g.subscriptions) OVER (PARTITION BY g.currency, g.customer_id "
        f"ORDER BY g.month) AS n FROM ({per_customer}) AS g) AS z"
    )


def _pg_functions() -> list[str]:
    return [pg_refresh(FIGURES, fresh_rows), *_pg_trigger_functions()]


def pg_refresh(all_figures: Sequence[str], fresh_of: Callable[..., str]) -> str:
    """``report_mrr_refresh(keys)``: the customers' rows recomputed by ``fresh_of`` (a
    ``fresh_rows``), their differences added to the monthly sums (also revision 0024's, with
    its figures and rows)."""
    figures = ", ".join(all_figures)
    sums = ", ".join(f"sum({f})" for f in all_figures)
    nonzero = " OR ".join(f"sum({f}) <> 0" for f in all_figures)
    added = ", ".join(f"{f} = report_mrr_monthly.{f} + EXCLUDED.{f}" for f in all_figures)
    # Joined with the keys as a table (an index probe per customer), not "= ANY(keys)": a
    # cached generic plan compares each row with every element of the array, so a bulk load
    # of thousands of customers would take quadratic time.
    wanted = (
        "(SELECT DISTINCT split_part(k, chr(31), 1) AS currency, split_part(k, chr(31), 2) "
        "AS customer_id FROM unnest(keys) AS k) AS wanted"
    )
    fresh = fresh_of(
        "postgresql",
        "true",
        source=f"{wanted} JOIN subscriptions s ON s.customer_id = wanted.customer_id "
        "AND s.currency = wanted.currency",
    )
    old_rows = (
        f"report_mrr_customer_months m JOIN {wanted} ON m.customer_id = wanted.customer_id "
        "AND m.currency = wanted.currency"
    )
    return f"""
CREATE OR REPLACE FUNCTION report_mrr_refresh(keys text[]) RETURNS void LANGUAGE plpgsql
-- Its statements are long: planned afresh at each call they took 20-30 ms, and JIT compiled
-- (at 1M invoices, the first bench of this revision); their generic plans probe indexes per
-- customer whatever the number of keys.
SET plan_cache_mode = force_generic_plan SET jit = off AS $body$
DECLARE
    ids text[];
    lock_key integer;
BEGIN
    -- keys: currency || chr(31) || customer_id.
    IF keys IS NULL OR cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    ids := ARRAY(SELECT DISTINCT split_part(k, chr(31), 2) FROM unnest(keys) AS k);
    -- Serialise with every other writer of these customers, in one order (no deadlock); the
    -- statements below start after the locks are held, so they see what the previous holder
    -- committed. A statement writing many customers (a bulk load) takes the whole book
    -- instead, so it does not fill the lock table.
    IF cardinality(ids) > {BULK_CUSTOMERS} THEN
        PERFORM pg_advisory_xact_lock({-LOCK_CLASS}, 0);
        -- The rows this statement wrote (thousands into a table the statistics think empty)
        -- counted, so the plans probe indexes instead of scanning them per customer.
        ANALYZE subscriptions;
        ANALYZE subscription_status_changes;
    ELSE
        PERFORM pg_advisory_xact_lock_shared({-LOCK_CLASS}, 0);
        FOR lock_key IN SELECT DISTINCT hashtext(i) FROM unnest(ids) AS i ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock({LOCK_CLASS}, lock_key);
        END LOOP;
    END IF;
    INSERT INTO report_mrr_monthly (currency, month, slot, {figures})
    SELECT currency, month, pg_backend_pid() % {SLOTS}, {sums}
    FROM (
        SELECT currency, month, {figures} FROM ({fresh}) AS fresh
        UNION ALL
        SELECT m.currency, m.month, {", ".join(f"-m.{f}" for f in all_figures)} FROM {old_rows}
    ) AS delta
    GROUP BY currency, month HAVING {nonzero} ORDER BY currency, month
    ON CONFLICT (currency, month, slot) DO UPDATE SET {added};
    DELETE FROM report_mrr_customer_months gone USING {wanted}
    WHERE gone.customer_id = wanted.customer_id AND gone.currency = wanted.currency;
    INSERT INTO report_mrr_customer_months (currency, customer_id, month, {figures})
    SELECT currency, customer_id, month, {figures} FROM ({fresh}) AS fresh;
END
$body$
"""


def _pg_trigger_functions() -> list[str]:
    key = "{r}.currency || chr(31) || {r}.customer_id"
    changed = " OR ".join(f"o.{c} IS DISTINCT FROM n.{c}" for c in WATCHED)
    moved = (
        f"({changed} OR (o.status IS DISTINCT FROM n.status AND NOT EXISTS "
        f"(SELECT 1 FROM {CHANGES} c WHERE c.subscription_id = n.id)))"
    )
    subscriptions = f"""
CREATE FUNCTION report_mrr_subscriptions_changed() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM report_mrr_refresh(ARRAY(SELECT DISTINCT {key.format(r="n")} FROM new_rows n));
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM report_mrr_refresh(ARRAY(
            SELECT {key.format(r="n")} FROM new_rows n JOIN old_rows o ON o.id = n.id
            WHERE {moved}
            UNION SELECT {key.format(r="o")} FROM new_rows n JOIN old_rows o ON o.id = n.id
            WHERE {moved}));
    ELSE
        PERFORM report_mrr_refresh(ARRAY(SELECT DISTINCT {key.format(r="o")} FROM old_rows o));
    END IF;
    RETURN NULL;
END
$body$
"""
    changes = f"""
CREATE FUNCTION report_mrr_status_changes_changed() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM report_mrr_refresh(ARRAY(SELECT DISTINCT {key.format(r="s")}
            FROM subscriptions s WHERE s.id IN (SELECT subscription_id FROM new_rows)));
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM report_mrr_refresh(ARRAY(SELECT DISTINCT {key.format(r="s")}
            FROM subscriptions s WHERE s.id IN (SELECT subscription_id FROM new_rows
            UNION SELECT subscription_id FROM old_rows)));
    ELSE
        PERFORM report_mrr_refresh(ARRAY(SELECT DISTINCT {key.format(r="s")}
            FROM subscriptions s WHERE s.id IN (SELECT subscription_id FROM old_rows)));
    END IF;
    RETURN NULL;
END
$body$
"""
    return [subscriptions, changes]


_PG_EVENTS = {
    "insert": "REFERENCING NEW TABLE AS new_rows",
    "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "REFERENCING OLD TABLE AS old_rows",
}
#: (table, function) of every PostgreSQL trigger (on insert, update and delete).
_PG_TRIGGERS = (
    ("subscriptions", "report_mrr_subscriptions_changed"),
    (CHANGES, "report_mrr_status_changes_changed"),
)
_PG_FUNCTIONS = (
    "report_mrr_subscriptions_changed()",
    "report_mrr_status_changes_changed()",
    "report_mrr_refresh(text[])",
)


def _sqlite_triggers(
    all_figures: Sequence[str] = FIGURES,
    fresh_of: Callable[..., str] | None = None,
    logs: Sequence[tuple[str, str]] = ((CHANGES, "status_changes"),),
) -> list[str]:
    """Every SQLite trigger: the monthly sums following the per-customer rows, and the rows
    of a customer recomputed by ``fresh_of`` (this revision's ``fresh_rows`` by default) when
    one of its subscriptions or a row of one of ``logs`` ((table, name), each with a
    ``subscription_id``) is written (also revision 0024's)."""
    fresh_of = fresh_of or fresh_rows
    figures = ", ".join(all_figures)
    statements = []
    # The monthly sums follow the per-customer rows.
    for event, row, sign in (("INSERT", "NEW", "+"), ("DELETE", "OLD", "-")):
        statements.append(
            f"CREATE TRIGGER report_mrr_monthly_{event.lower()} AFTER {event} ON "
            "report_mrr_customer_months FOR EACH ROW BEGIN "
            "INSERT INTO report_mrr_monthly (currency, month, slot) "
            f"VALUES ({row}.currency, {row}.month, 0) ON CONFLICT DO NOTHING; "
            "UPDATE report_mrr_monthly SET "
            + ", ".join(f"{f} = {f} {sign} {row}.{f}" for f in all_figures)
            + f" WHERE currency = {row}.currency AND month = {row}.month AND slot = 0; END"
        )

    def refresh(currency: str, customer: str) -> str:
        return (
            f"DELETE FROM report_mrr_customer_months WHERE customer_id = {customer} "
            f"AND currency = {currency}; "
            f"INSERT INTO report_mrr_customer_months (currency, customer_id, month, {figures}) "
            f"SELECT currency, customer_id, month, {figures} FROM ("
            + fresh_of("sqlite", f"s.customer_id = {customer} AND s.currency = {currency}")
            + "); "
        )

    changed = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in WATCHED)
    for name, event, when, rows in (
        ("insert", "INSERT", "1", ("NEW",)),
        ("delete", "DELETE", "1", ("OLD",)),
        (
            "update",
            "UPDATE",
            f"{changed} OR (OLD.status IS NOT NEW.status AND NOT EXISTS "
            f"(SELECT 1 FROM {CHANGES} c WHERE c.subscription_id = NEW.id))",
            ("OLD", "NEW"),
        ),
    ):
        body = "".join(refresh(f"{r}.currency", f"{r}.customer_id") for r in rows)
        statements.append(
            f"CREATE TRIGGER report_mrr_subscriptions_{name} AFTER {event} ON subscriptions "
            f"FOR EACH ROW WHEN {when} BEGIN {body}END"
        )
    for table, log in logs:
        for name, event, rows in (
            ("insert", "INSERT", ("NEW",)),
            ("delete", "DELETE", ("OLD",)),
            ("update", "UPDATE", ("OLD", "NEW")),
        ):
            body = "".join(
                refresh(
                    f"(SELECT currency FROM subscriptions WHERE id = {r}.subscription_id)",
                    f"(SELECT customer_id FROM subscriptions WHERE id = {r}.subscription_id)",
                )
                for r in rows
            )
            statements.append(
                f"CREATE TRIGGER report_mrr_{log}_{name} AFTER {event} ON {table} "
                f"FOR EACH ROW BEGIN {body}END"
            )
    return statements


def _sqlite_trigger_names(logs: Sequence[str] = ("status_changes",)) -> list[str]:
    return [
        "report_mrr_monthly_insert",
        "report_mrr_monthly_delete",
        *(
            f"report_mrr_{t}_{e}"
            for t in ("subscriptions", *logs)
            for e in ("insert", "delete", "update")
        ),
    ]


def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), server_default="0", nullable=False)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    figures: list[sa.Column[Any]] = [_count(f) for f in FIGURES]
    op.create_table(
        "report_mrr_customer_months",
        sa.Column("customer_id", sa.String(40), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        *figures,
        sa.PrimaryKeyConstraint(
            "customer_id", "currency", "month", name=op.f("pk_report_mrr_customer_months")
        ),
    )
    op.create_table(
        "report_mrr_monthly",
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("slot", sa.SmallInteger(), server_default="0", nullable=False),
        *(_count(f) for f in FIGURES),
        sa.PrimaryKeyConstraint("currency", "month", "slot", name=op.f("pk_report_mrr_monthly")),
    )
    # Triggers first, then the backfill, in one transaction: on PostgreSQL CREATE TRIGGER
    # waits for the writers in flight and holds new ones until commit, so every row is counted
    # once, by the backfill or by a trigger.
    if dialect == "postgresql":
        for function in _pg_functions():
            op.execute(function)
        for table, function in _PG_TRIGGERS:
            for event in ("insert", "update", "delete"):
                op.execute(
                    f"CREATE TRIGGER {function}_{event} AFTER {event.upper()} ON {table} "
                    f"{_PG_EVENTS[event]} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
                )
    else:
        for statement in _sqlite_triggers():
            op.execute(statement)
    backfill(dialect, FIGURES, fresh_rows)


def backfill(dialect: str, all_figures: Sequence[str], fresh_of: Callable[..., str]) -> None:
    """Both tables (empty) filled from every subscription, by ``fresh_of`` (also revision
    0024's)."""
    names = ", ".join(all_figures)
    op.execute(
        f"INSERT INTO report_mrr_customer_months (currency, customer_id, month, {names}) "
        f"SELECT currency, customer_id, month, {names} FROM ({fresh_of(dialect, '1 = 1')}) "
        "AS fresh"
    )
    if dialect == "postgresql":
        op.execute(
            f"INSERT INTO report_mrr_monthly (currency, month, slot, {names}) "
            f"SELECT currency, month, 0, {', '.join(f'sum({f})' for f in all_figures)} "
            "FROM report_mrr_customer_months GROUP BY currency, month"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for table, function in _PG_TRIGGERS:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER {function}_{event} ON {table}")
        for function in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION {function}")
    else:
        for name in _sqlite_trigger_names():
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("report_mrr_monthly")
    op.drop_table("report_mrr_customer_months")
