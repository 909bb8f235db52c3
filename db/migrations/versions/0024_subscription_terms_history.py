"""A subscription's price history, and MRR's expansion and contraction from it:

- ``subscription_terms_changes``: every plan or seat change (plan, unit amount, quantity,
  interval before and after) at the instant the workflow applied it, written with the terms by
  ``update_subscription_state``;
- ``report_mrr_customer_months`` and ``report_mrr_monthly`` (0023) gain ``expansion_minor``
  and ``contraction_minor``, and are recomputed with each subscription's monthly amount at each
  month start taken from that history instead of its price now.

Revision ID: 0024
Revises: 0023

How one subscription counts (``billing.reports.SubscriptionHistory``): at each month start
after its creation, its MRR is its monthly amount there (the ``to_`` terms of its last terms
change before that instant, or, with none, the ``from_`` terms of its first one, or, with none
logged, its terms now) if its status there counts (0023's rule), else 0. Between two month
starts at which it is above 0 on both sides, a rise is *expansion* and a fall *contraction*; a
start from 0 is *new*, or *reactivated* if its MRR was above 0 at an earlier month start; a
fall to 0 is *churned*. (0023 called a start *reactivated* if the subscription had counted at
any instant before; a spell between two month starts, which MRR never saw, now leaves a later
start *new*.)

Terms changed before this revision were not logged: a subscription changed then counts at its
terms of this revision's time over its whole past, as before.

The triggers are 0023's: PostgreSQL gets a new ``report_mrr_refresh`` and the status-change
trigger function on the new table too; SQLite's row triggers are all rewritten (their bodies
carry the computation). Both tables are emptied and backfilled in the same transaction as the
triggers, as in 0023. The downgrade drops the history (and the two figures), puts 0023's
triggers back and recomputes the tables by 0023's rule.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision: str = "0024"
down_revision: str | Sequence[str] | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _revision_0023() -> ModuleType:
    """Revision 0023's module: its trigger builders take the figures and the computation."""
    path = Path(__file__).with_name("0023_report_mrr_monthly.py")
    spec = importlib.util.spec_from_file_location("billing_migration_0023", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R23 = _revision_0023()
COUNTED = R23.COUNTED
CHANGES = R23.CHANGES
TERMS = "subscription_terms_changes"
#: The figures of a row: 0023's, then the two this revision adds.
MOVES = ("expansion_minor", "contraction_minor")
FIGURES = (*R23.FIGURES, *MOVES)
#: Frozen here (billing.calendar.IntervalUnit when written).
_INTERVALS = "'day', 'week', 'month', 'year'"


def _terms_monthly(alias: str, side: str) -> str:
    """The monthly amount of one side of a terms change: a stored generated column, so the
    triggers' statements stay shallow enough for SQLite's parser."""
    return f"{alias}.{side}_monthly_minor"


def monthly_of_side(side: str) -> str:
    """The generated column's expression (``from_monthly_minor``, ``to_monthly_minor``)."""
    return R23.monthly_of(  # type: ignore[no-any-return]
        f"{side}_amount_minor", f"{side}_quantity", f"{side}_interval", f"{side}_interval_count"
    )


def fresh_rows(dialect: str, where: str, *, source: str = "subscriptions s") -> str:
    """``report_mrr_customer_months`` of the customers whose subscriptions (alias ``s`` in
    ``source``) match ``where`` (whole (currency, customer) pairs), from scratch: (currency,
    customer_id, month, *FIGURES). Nested subqueries only (SQLite refuses CTEs in triggers)."""

    def nm(column: str) -> str:
        return R23._next_month(dialect, column)  # type: ignore[no-any-return]

    def status_where(sub: str, alias: str, condition: str) -> str:
        """The status the last change of ``sub`` matching ``condition`` left, else its first."""
        return (
            f"COALESCE((SELECT {alias}.to_status FROM {CHANGES} {alias} "
            f"WHERE {alias}.subscription_id = {sub}.id AND {condition} "
            f"ORDER BY {alias}.changed_at DESC, {alias}.id DESC LIMIT 1), {sub}.initial)"
        )

    def monthly_where(sub: str, alias: str, condition: str) -> str:
        return (
            f"COALESCE((SELECT {_terms_monthly(alias, 'to')} FROM {TERMS} {alias} "
            f"WHERE {alias}.subscription_id = {sub}.id AND {condition} "
            f"ORDER BY {alias}.changed_at DESC, {alias}.id DESC LIMIT 1), {sub}.initial_m)"
        )

    own_monthly = R23._monthly("s.")
    # Each subscription: its first status and monthly amount (before its first change of
    # each).
    subs = (
        f"SELECT s.id, s.currency, s.customer_id, {nm('s.created_at')} AS b0, "
        f"COALESCE((SELECT c0.from_status FROM {CHANGES} c0 WHERE c0.subscription_id = s.id "
        "ORDER BY c0.changed_at, c0.id LIMIT 1), s.status) AS initial, "
        f"COALESCE((SELECT {_terms_monthly('t0', 'from')} FROM {TERMS} t0 "
        "WHERE t0.subscription_id = s.id ORDER BY t0.changed_at, t0.id LIMIT 1), "
        f"{own_monthly}) AS initial_m FROM {source} WHERE ({where})"
    )
    # The boundaries where a subscription's MRR may move: the first one after its creation
    # (b0), and the first after each change (a change at a month's first instant counts from
    # the next one) that is not before b0; its MRR at each: the status and the monthly amount
    # every change before it left.
    status_there = status_where("sub", "c3", f"{nm('c3.changed_at')} <= p.b")
    monthly_there = monthly_where("sub", "t3", f"{nm('t3.changed_at')} <= p.b")
    value = f"CASE WHEN {status_there} IN {COUNTED} THEN {monthly_there} ELSE 0 END AS v"
    if dialect == "postgresql":
        # Each subscription's own points (an index probe per subscription): a join of two
        # derived tables was planned as a nested loop for a bulk refresh (the generic plan
        # guesses a few keys), quadratic in the customers.
        valued = (
            f"SELECT sub.id, sub.currency, sub.customer_id, p.b, {value} "
            f"FROM ({subs}) AS sub CROSS JOIN LATERAL (SELECT sub.b0 AS b "
            f"UNION SELECT {nm('c2.changed_at')} FROM {CHANGES} c2 "
            "WHERE c2.subscription_id = sub.id "
            f"UNION SELECT {nm('t2.changed_at')} FROM {TERMS} t2 "
            "WHERE t2.subscription_id = sub.id) AS p WHERE p.b >= sub.b0"
        )
    else:
        # SQLite has no LATERAL; its refresh covers one customer.
        points = (
            f"SELECT s.id AS id, {nm('s.created_at')} AS b FROM {source} WHERE ({where}) "
            f"UNION SELECT c2.subscription_id, {nm('c2.changed_at')} FROM {source} "
            f"JOIN {CHANGES} c2 ON c2.subscription_id = s.id WHERE ({where}) "
            f"UNION SELECT t2.subscription_id, {nm('t2.changed_at')} FROM {source} "
            f"JOIN {TERMS} t2 ON t2.subscription_id = s.id WHERE ({where})"
        )
        valued = (
            f"SELECT sub.id, sub.currency, sub.customer_id, p.b, {value} "
            f"FROM ({subs}) AS sub JOIN ({points}) AS p ON p.id = sub.id AND p.b >= sub.b0"
        )
    # Where it moved, with its value at the previous point and its highest at any point
    # before that one (above 0: it counted at an earlier month start, so a return is a
    # reactivation).
    moved = (
        "SELECT y.currency, y.customer_id, y.b, y.v, y.was, y.peak FROM ("
        "SELECT w.*, lag(w.v, 1, 0) OVER (PARTITION BY w.id ORDER BY w.b) AS was, "
        "COALESCE(max(w.v) OVER (PARTITION BY w.id ORDER BY w.b "
        "ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS peak "
        f"FROM ({valued}) AS w) AS y WHERE y.v <> y.was"
    )
    per_customer = (
        "SELECT t.currency, t.customer_id, t.b AS month, sum(t.v - t.was) AS mrr_minor, "
        "sum(CASE WHEN t.was = 0 THEN 1 WHEN t.v = 0 THEN -1 ELSE 0 END) AS subscriptions, "
        "sum(CASE WHEN t.was = 0 AND t.peak = 0 THEN t.v ELSE 0 END) AS new_minor, "
        "sum(CASE WHEN t.was = 0 AND t.peak > 0 THEN t.v ELSE 0 END) AS reactivated_minor, "
        "sum(CASE WHEN t.v = 0 THEN t.was ELSE 0 END) AS churned_minor, "
        "sum(CASE WHEN t.was > 0 AND t.v > t.was THEN t.v - t.was ELSE 0 END) "
        "AS expansion_minor, "
        "sum(CASE WHEN t.v > 0 AND t.v < t.was THEN t.was - t.v ELSE 0 END) "
        "AS contraction_minor "
        f"FROM ({moved}) AS t GROUP BY t.currency, t.customer_id, t.b"
    )
    # The customer counts while some of its subscriptions does (0023's rule).
    return R23.with_customers(per_customer, MOVES)  # type: ignore[no-any-return]


_EVENTS = {
    "insert": "REFERENCING NEW TABLE AS new_rows",
    "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "REFERENCING OLD TABLE AS old_rows",
}
#: The status-change trigger function of 0023 reads only ``subscription_id``: it serves both.
_TERMS_TRIGGER = "report_mrr_terms_changes_changed"
_SQLITE_LOGS = ((CHANGES, "status_changes"), (TERMS, "terms_changes"))


def _empty_rollups() -> None:
    # The per-customer rows first: on SQLite their delete trigger writes the monthly sums.
    op.execute("DELETE FROM report_mrr_customer_months")
    op.execute("DELETE FROM report_mrr_monthly")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        TERMS,
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subscription_id", sa.String(40), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        *(
            sa.Column(f"{side}_{name}", kind, nullable=False)
            for name, kind in (
                ("plan_code", sa.String(63)),
                ("amount_minor", sa.BigInteger()),
                ("quantity", sa.Integer()),
                ("interval", sa.String(8)),
                ("interval_count", sa.Integer()),
            )
            for side in ("from", "to")
        ),
        *(
            sa.Column(
                f"{side}_monthly_minor",
                sa.BigInteger(),
                sa.Computed(monthly_of_side(side), persisted=True),
                nullable=False,
            )
            for side in ("from", "to")
        ),
        sa.CheckConstraint(
            f'"from_interval" IN ({_INTERVALS})',
            name=op.f("ck_subscription_terms_changes_from_interval"),
        ),
        sa.CheckConstraint(
            f'"to_interval" IN ({_INTERVALS})',
            name=op.f("ck_subscription_terms_changes_to_interval"),
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_subscription_terms_changes_subscription_id_subscriptions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscription_terms_changes")),
    )
    op.create_index(
        "ix_subscription_terms_changes_subscription_id_changed_at",
        TERMS,
        ["subscription_id", "changed_at"],
    )
    # Triggers off, columns on, triggers on, recomputed: one transaction, so every row is
    # counted once by the new rule (CREATE TRIGGER holds the writers until commit, as in 0023).
    if dialect != "postgresql":
        for name in R23._sqlite_trigger_names():
            op.execute(f"DROP TRIGGER {name}")
    for table in ("report_mrr_customer_months", "report_mrr_monthly"):
        for name in MOVES:
            op.add_column(table, R23._count(name))
    if dialect == "postgresql":
        op.execute(R23.pg_refresh(FIGURES, fresh_rows))
        for event in ("insert", "update", "delete"):
            op.execute(
                f"CREATE TRIGGER {_TERMS_TRIGGER}_{event} AFTER {event.upper()} ON {TERMS} "
                f"{_EVENTS[event]} FOR EACH STATEMENT "
                "EXECUTE FUNCTION report_mrr_status_changes_changed()"
            )
    else:
        for statement in R23._sqlite_triggers(FIGURES, fresh_rows, _SQLITE_LOGS):
            op.execute(statement)
    _empty_rollups()
    R23.backfill(dialect, FIGURES, fresh_rows)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER {_TERMS_TRIGGER}_{event} ON {TERMS}")
        op.execute(R23.pg_refresh(R23.FIGURES, R23.fresh_rows))
    else:
        for name in R23._sqlite_trigger_names(tuple(log for _, log in _SQLITE_LOGS)):
            op.execute(f"DROP TRIGGER {name}")
    op.drop_index("ix_subscription_terms_changes_subscription_id_changed_at", table_name=TERMS)
    op.drop_table(TERMS)
    for table in ("report_mrr_customer_months", "report_mrr_monthly"):
        with op.batch_alter_table(table) as batch:
            for name in MOVES:
                batch.drop_column(name)
    if dialect != "postgresql":
        for statement in R23._sqlite_triggers():
            op.execute(statement)
    _empty_rollups()
    R23.backfill(dialect, R23.FIGURES, R23.fresh_rows)
