"""Column types that keep the database honest about time and enums."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import DateTime, Dialect, String
from sqlalchemy.types import TypeDecorator

_E = TypeVar("_E", bound=StrEnum)


class UTCDateTime(TypeDecorator[datetime]):
    """An instant: written as UTC, always read back as an aware UTC datetime.

    A naive datetime is refused on write, because nothing can tell which zone it meant.
    SQLite has no time zone type and returns naive values, so they are stored as naive UTC
    and re-labelled UTC on read; PostgreSQL's ``timestamptz`` comes back in the session's
    zone and is converted.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected an aware datetime; got {type(value).__name__} {value!r}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} refused: pass an aware datetime "
                "(e.g. datetime.now(UTC)) so the instant is unambiguous"
            )
        utc = value.astimezone(UTC)
        # SQLite's DATETIME text has no offset; store UTC wall time so text order is time order.
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class StrEnumType(TypeDecorator[_E]):
    """A ``StrEnum`` stored as its value in a VARCHAR (a CHECK constraint lists the values).

    Writing ``.value`` explicitly keeps drivers from adapting the enum by member name.
    """

    impl = String
    cache_ok = True

    def __init__(self, enum_type: type[_E], length: int) -> None:
        super().__init__(length)
        self.enum_type = enum_type

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return self.enum_type(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> _E | None:
        if value is None:
            return None
        return self.enum_type(value)
