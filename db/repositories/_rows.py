"""Shared plumbing: rows to records, records to column values, insert-once via savepoint."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Executable, Insert, Select, Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

R = TypeVar("R")


def select_rows(table: Table) -> Select[Any]:
    """``SELECT`` every column of the table. Columns, not ORM entities: a Session kept across
    commits would otherwise hand back stale objects from its identity map."""
    return select(table)


def fetch_one(session: Session, record_type: Callable[..., R], statement: Executable) -> R | None:
    row = session.execute(statement).mappings().first()
    return None if row is None else record_type(**row)


def fetch_all(session: Session, record_type: Callable[..., R], statement: Executable) -> list[R]:
    return [record_type(**row) for row in session.execute(statement).mappings()]


def column_values(record: object) -> dict[str, Any]:
    """The record as ``{column: value}``; record fields are named after the columns."""
    return {f.name: getattr(record, f.name) for f in fields(record)}  # type: ignore[arg-type]


@functools.cache
def _insert_returning(table: Table) -> Insert:
    """``INSERT INTO table ... RETURNING *``, built once per table: the values are bound at
    execution, so SQLAlchemy's compiled-statement cache key is computed once too."""
    return insert(table).returning(*table.c)


def insert_or_get(
    session: Session, table: Table, record: R, lookup: Callable[[], R | None]
) -> tuple[R, bool]:
    """Insert ``record`` once: ``(stored row, True)``, or ``(existing row, False)`` when a
    unique constraint says it is already there (a retry, or a concurrent writer that won).

    The INSERT runs in a SAVEPOINT, so a violation rolls back only the savepoint and the
    caller's transaction carries on. ``lookup`` finds the row that won by its natural key; if
    it finds nothing, the violation was something else (a CHECK or a foreign key) and the
    IntegrityError propagates.
    """
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
