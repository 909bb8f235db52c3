"""Shared plumbing: rows to records, records to column values, insert-once."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Executable, Insert, Select, Table, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

R = TypeVar("R")


def select_rows(table: Table) -> Select[Any]:
    """``SELECT`` every column of the table. Columns, not ORM entities: a Session kept across
    commits would otherwise hand back stale objects from its identity map."""
    return select(table)


def fetch_one(
    session: Session,
    record_type: Callable[..., R],
    statement: Executable,
    params: Mapping[str, Any] | None = None,
) -> R | None:
    """The first row as a record. ``params``: values of the statement's ``bindparam``s (see
    "Hot statements" below)."""
    row = session.execute(statement, params).mappings().first()
    return None if row is None else record_type(**row)


def fetch_all(
    session: Session,
    record_type: Callable[..., R],
    statement: Executable,
    params: Mapping[str, Any] | None = None,
) -> list[R]:
    return [record_type(**row) for row in session.execute(statement, params).mappings()]


# Hot statements. A statement built per call (``select(...).where(col == value)``) costs its
# construction and SQLAlchemy's cache key, a walk of the whole statement, every time: about
# 60 us of a simple read's 80 on SQLite, before the compiled form is found in the cache. The
# reads and writes every billed period makes several times (each activity's invoice, its
# attempts, lines and payment, the event outbox's lock, sequence and endpoints) are built
# once, at import, with ``bindparam``s for their values: the same SQL, the cache key
# computed once (tests/db/test_hot_statements.py).


def column_values(record: object) -> dict[str, Any]:
    """The record as ``{column: value}``; record fields are named after the columns."""
    return {f.name: getattr(record, f.name) for f in fields(record)}  # type: ignore[arg-type]


@functools.cache
def _insert_returning(table: Table) -> Insert:
    """``INSERT INTO table ... RETURNING *``, built once per table: the values are bound at
    execution, so SQLAlchemy's compiled-statement cache key is computed once too."""
    return insert(table).returning(*table.c)


@functools.cache
def _insert_unless_duplicate(table: Table, dialect: str, read_back: bool = True) -> Insert | None:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING *`` (PostgreSQL and SQLite), built once
    per table; None on a database without it. ``read_back=False``: ``RETURNING`` the primary
    key only (enough to tell an insert from a duplicate)."""
    returned = table.c if read_back else table.primary_key.columns
    if dialect == "postgresql":
        return pg_insert(table).on_conflict_do_nothing().returning(*returned)
    if dialect == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing().returning(*returned)
    return None


def insert_or_get(
    session: Session,
    table: Table,
    record: R,
    lookup: Callable[[], R | None],
    *,
    read_back: bool = True,
) -> tuple[R, bool]:
    """Insert ``record`` once: ``(stored row, True)``, or ``(existing row, False)`` when a
    unique constraint says it is already there (a retry, or a concurrent writer that won).

    On PostgreSQL and SQLite one statement, ``INSERT ... ON CONFLICT DO NOTHING RETURNING``:
    a unique constraint that holds the row already makes it return nothing (a concurrent
    writer's row is waited for, then seen by ``lookup``), and the caller's transaction carries
    on. One round trip instead of three (SAVEPOINT, INSERT, RELEASE): a billing cycle makes
    several of these. Any other violation (a CHECK, a foreign key) raises as before.
    Elsewhere the INSERT runs in a SAVEPOINT, so a violation rolls back only the savepoint.
    ``lookup`` finds the row that won by its natural key.

    ``read_back=False``: an inserted row is returned as ``record`` itself instead of being
    read back through ``RETURNING``, for tables whose columns store exactly what the record
    holds (no server defaults, no column that rewrites its value). The event outbox uses
    it: its JSON column was encoded on insert and decoded straight back, a quarter of the
    outbox's cost per event.
    """
    statement = _insert_unless_duplicate(table, session.get_bind().dialect.name, read_back)
    if statement is not None:
        inserted = session.execute(statement, column_values(record)).mappings().first()
        if inserted is not None:
            return (type(record)(**inserted) if read_back else record), True
        existing = lookup()
        if existing is None:
            # A conflict that ``lookup`` does not cover (another unique column): the plain
            # INSERT raises its IntegrityError, as the savepoint's path does.
            again = session.execute(_insert_returning(table), column_values(record))
            return type(record)(**again.mappings().one()), True
        return existing, False
    try:
        with session.begin_nested():
            row = session.execute(_insert_returning(table), column_values(record)).mappings().one()
    except IntegrityError:
        existing = lookup()
        if existing is None:
            raise
        return existing, False
    return type(record)(**row), True


def utcnow() -> datetime:
    """Fallback "now" for writes whose caller passed none (aware UTC)."""
    return datetime.now(UTC)
