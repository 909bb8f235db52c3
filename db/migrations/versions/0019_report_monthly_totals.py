"""AR aging's indexes; collected vs invoiced per month kept by the database:
``report_monthly_totals`` (one row per UTC month and currency: invoiced, collected, fees,
refunded, each with its count), the triggers on ``invoices``, ``payments`` and ``refunds``
that keep it in the same transaction as every write to them, and a backfill from the rows
already there.

Revision ID: 0019
Revises: 0012

A trigger, not application code, keeps the totals: every writer (activities, the API, the
settlement import, a script, a bulk load) goes through it, so the totals cannot drift from the
rows. Each write takes back its rows' old contribution and adds the new one:

- an invoice that is neither draft nor void adds its ``amount_due_minor`` (and 1) to the month
  it was issued (``created_at``), in its currency; a void or a lowered amount due later takes
  it back from that month, as the report computed from the rows always did;
- a payment adds its amount to the month it settled, in its currency, and its fee (when the
  provider gave one) to that month in its settlement currency;
- a refund that succeeded adds its amount to the month it completed, in its currency.

PostgreSQL: statement triggers over transition tables, one upsert per statement in (month,
currency) order (a bulk insert of a million invoices is one grouped upsert, not a million).
SQLite: row triggers (one writer at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "report_monthly_totals"
COLUMNS = (
    "invoiced_minor",
    "invoices",
    "collected_minor",
    "payments",
    "fees_minor",
    "fee_payments",
    "refunded_minor",
    "refunds",
)

# Frozen here: (source table, when a row counts, its instant, its currency, {column: value});
# ``{r}`` stands for the row (``NEW.`` in a SQLite trigger, nothing in a SELECT). A later rule
# gets its own revision.
CONTRIBUTIONS: dict[str, list[tuple[str, str, str, dict[str, str]]]] = {
    "invoices": [
        (
            "{r}status NOT IN ('void', 'draft')",
            "{r}created_at",
            "{r}currency",
            {"invoiced_minor": "{r}amount_due_minor", "invoices": "1"},
        )
    ],
    "payments": [
        (
            "1 = 1",
            "{r}settled_at",
            "{r}currency",
            {"collected_minor": "{r}amount_minor", "payments": "1"},
        ),
        (
            "{r}fee_minor IS NOT NULL AND {r}settlement_currency IS NOT NULL",
            "{r}settled_at",
            "{r}settlement_currency",
            {"fees_minor": "{r}fee_minor", "fee_payments": "1"},
        ),
    ],
    "refunds": [
        (
            "{r}status = 'succeeded' AND {r}completed_at IS NOT NULL",
            "{r}completed_at",
            "{r}currency",
            {"refunded_minor": "{r}amount_minor", "refunds": "1"},
        )
    ],
}
#: The columns whose change can move a row's contribution (SQLite's UPDATE OF).
WATCHED: dict[str, tuple[str, ...]] = {
    "invoices": ("status", "amount_due_minor", "created_at", "currency"),
    "payments": ("settled_at", "amount_minor", "currency", "fee_minor", "settlement_currency"),
    "refunds": ("status", "completed_at", "amount_minor", "currency"),
}


def _month(dialect: str, column: str) -> str:
    if dialect == "postgresql":
        return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM')"
    # SQLite keeps UTC wall time as 'YYYY-MM-DD HH:MM:SS...' text (db.types.UTCDateTime).
    return f"substr({column}, 1, 7)"


def _contributions(dialect: str, table: str, source: str, sign: str) -> list[str]:
    """SELECTs of (month, currency, every column) for the rows of ``source`` (the table, or a
    transition table of it), each value times ``sign``."""
    selects = []
    for condition, instant, currency, values in CONTRIBUTIONS[table]:
        cells = ", ".join(
            f"{sign} * ({values[c].format(r='')}) AS {c}" if c in values else f"0 AS {c}"
            for c in COLUMNS
        )
        selects.append(
            f"SELECT {_month(dialect, instant.format(r=''))} AS month, "
            f"{currency.format(r='')} AS currency, {cells} "
            f"FROM {source} WHERE {condition.format(r='')}"
        )
    return selects


#: PostgreSQL: each month and currency is kept in this many rows (``slot``), a connection
#: writing to ``pg_backend_pid() % SLOTS``; the report sums them. One row would be locked by
#: every transaction that issues an invoice or records a payment in the month until it
#: commits: on a billing day every charge in the book would wait in one line.
SLOTS = 16


def _grouped_insert(selects: list[str], *, upsert: bool = True) -> str:
    sums = ", ".join(f"sum({c})" for c in COLUMNS)
    having = " OR ".join(f"sum({c}) <> 0" for c in COLUMNS)
    added = ", ".join(f"{c} = {TABLE}.{c} + EXCLUDED.{c}" for c in COLUMNS)
    # The backfill writes slot 0; a trigger its connection's slot.
    slot = f"pg_backend_pid() % {SLOTS}" if upsert else "0"
    return (
        f"INSERT INTO {TABLE} (month, currency, slot, {', '.join(COLUMNS)}) "
        f"SELECT month, currency, {slot}, {sums} FROM ({' UNION ALL '.join(selects)}) AS delta "
        f"GROUP BY month, currency HAVING {having} "
        # In key order, so two statements never lock the same rows in opposite orders.
        "ORDER BY month, currency"
        + (f" ON CONFLICT (month, currency, slot) DO UPDATE SET {added}" if upsert else "")
    )


def _postgresql_function(table: str) -> str:
    new = _contributions("postgresql", table, "new_rows", "1")
    old = _contributions("postgresql", table, "old_rows", "-1")
    return f"""
CREATE FUNCTION {TABLE}_{table}() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {_grouped_insert(new)};
    ELSIF TG_OP = 'UPDATE' THEN
        {_grouped_insert(new + old)};
    ELSE
        {_grouped_insert(old)};
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


def _sqlite_triggers(table: str) -> list[str]:
    statements = []
    for n, (condition, instant, currency, values) in enumerate(CONTRIBUTIONS[table]):
        for event, row, sign in (
            ("INSERT", "NEW", "+"),
            ("DELETE", "OLD", "-"),
            (f"UPDATE OF {', '.join(WATCHED[table])}", "OLD", "-"),
            (f"UPDATE OF {', '.join(WATCHED[table])}", "NEW", "+"),
        ):
            r = f"{row}."
            month = _month("sqlite", instant.format(r=r))
            # One writer at a time: one row per month and currency (slot 0).
            key = f"month = {month} AND currency = {currency.format(r=r)} AND slot = 0"
            changes = ", ".join(f"{c} = {c} {sign} ({v.format(r=r)})" for c, v in values.items())
            name = f"{TABLE}_{table}_{n}_{event.split()[0].lower()}_{row.lower()}"
            statements.append(
                f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW "
                f"WHEN {condition.format(r=r)} BEGIN "
                f"INSERT INTO {TABLE} (month, currency, slot) "
                f"VALUES ({month}, {currency.format(r=r)}, 0) "
                "ON CONFLICT (month, currency, slot) DO NOTHING; "
                f"UPDATE {TABLE} SET {changes} WHERE {key}; END"
            )
    return statements


def _sqlite_trigger_names(table: str) -> list[str]:
    return [
        f"{TABLE}_{table}_{n}_{event}_{row}"
        for n in range(len(CONTRIBUTIONS[table]))
        for event, row in (
            ("insert", "new"),
            ("delete", "old"),
            ("update", "old"),
            ("update", "new"),
        )
    ]


# AR aging's indexes (db.models has the same text).
_UNSETTLED = "paid_at IS NULL AND voided_at IS NULL AND marked_uncollectible_at IS NULL"
_SETTLED_STAMPS = ("paid_at", "voided_at", "marked_uncollectible_at")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_index(
        "ix_invoices_unsettled_finalized_at",
        "invoices",
        ["finalized_at", "currency", "amount_due_minor"],
        postgresql_where=sa.text(_UNSETTLED),
        sqlite_where=sa.text(_UNSETTLED),
    )
    for stamp in _SETTLED_STAMPS:
        op.create_index(
            f"ix_invoices_{stamp}",
            "invoices",
            [stamp],
            postgresql_where=sa.text(f"{stamp} IS NOT NULL"),
            sqlite_where=sa.text(f"{stamp} IS NOT NULL"),
        )
    op.create_table(
        TABLE,
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("slot", sa.SmallInteger(), server_default="0", nullable=False),
        *(sa.Column(c, sa.BigInteger(), server_default="0", nullable=False) for c in COLUMNS),
        sa.PrimaryKeyConstraint("month", "currency", "slot", name=op.f(f"pk_{TABLE}")),
    )
    # Triggers first, then the backfill, in one transaction: on PostgreSQL CREATE TRIGGER
    # takes a lock that waits for the writers in flight and holds new ones until commit, so
    # every row is counted once, by the backfill or by a trigger.
    for table in CONTRIBUTIONS:
        if dialect == "postgresql":
            op.execute(_postgresql_function(table))
            for event, referencing in _PG_EVENTS.items():
                op.execute(
                    f"CREATE TRIGGER {TABLE}_{table}_{event} AFTER {event.upper()} ON {table} "
                    f"{referencing} FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_{table}()"
                )
        else:
            for statement in _sqlite_triggers(table):
                op.execute(statement)
    everything = [
        select for table in CONTRIBUTIONS for select in _contributions(dialect, table, table, "1")
    ]
    op.execute(_grouped_insert(everything, upsert=False))


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in CONTRIBUTIONS:
        if dialect == "postgresql":
            for event in _PG_EVENTS:
                op.execute(f"DROP TRIGGER {TABLE}_{table}_{event} ON {table}")
            op.execute(f"DROP FUNCTION {TABLE}_{table}()")
        else:
            for name in _sqlite_trigger_names(table):
                op.execute(f"DROP TRIGGER {name}")
    op.drop_table(TABLE)
    for stamp in reversed(_SETTLED_STAMPS):
        op.drop_index(f"ix_invoices_{stamp}", table_name="invoices")
    op.drop_index("ix_invoices_unsettled_finalized_at", table_name="invoices")
