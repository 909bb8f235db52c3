"""Instants as scenarios write them and as timelines report them.

A scenario gives instants to the minute, either absolute (``2032-01-31T14:00:00Z``, or with an
offset) or on the customer's wall clock (``2032-01-31T09:00``, or a date for local midnight).
A timeline reports every instant in UTC with a ``Z``, to the minute for anything the clock
stamped (attempts, status changes, notices), because those carry the milliseconds the
activities took to run, which differ from run to run.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

#: What the scenario format accepts: a date, or a date-time to the minute (``:00`` seconds
#: allowed), with ``Z``, an offset, or nothing (the customer's wall clock).
INSTANT_PATTERN = r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:00)?(Z|[+-]\d{2}:\d{2})?)?$"
_INSTANT_RE = re.compile(INSTANT_PATTERN)
# The same shape with any seconds, to tell "has seconds" apart from "malformed".
_WITH_SECONDS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?$")

INSTANT_EXAMPLES = (
    "2032-01-31T14:00:00Z (UTC), 2032-01-31T09:00:00-05:00 (with an offset), "
    "2032-01-31T09:00 (the customer's local time) or 2032-01-31 (local midnight)"
)


class InstantFormatError(ValueError):
    """The text is not an instant the scenario format accepts; the message says why."""


def parse_instant(text: object, zone: ZoneInfo) -> datetime:
    """An aware UTC datetime from scenario text; wall-clock forms are read in ``zone``.

    A local time that does not exist (a DST gap) or exists twice (fall-back) is read with
    ``fold=0``, the billing calendar's rule, so every run reads it the same way.
    """
    if not isinstance(text, str):
        raise InstantFormatError(
            f"must be an ISO 8601 date-time string such as {INSTANT_EXAMPLES}; "
            f"got {text!r} ({type(text).__name__})"
        )
    if not _INSTANT_RE.match(text):
        if _WITH_SECONDS_RE.match(text):
            raise InstantFormatError(
                f"{text!r} has seconds; scenario instants are given to the minute "
                "(seconds 00 or left out)"
            )
        raise InstantFormatError(
            f"{text!r} is not an ISO 8601 date-time; use a form such as {INSTANT_EXAMPLES}"
        )
    try:
        parsed = (
            datetime.fromisoformat(text)
            if "T" in text
            else datetime.combine(date.fromisoformat(text), datetime.min.time())
        )
    except ValueError as error:
        raise InstantFormatError(f"{text!r} is not a valid date-time ({error})") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone, fold=0)
    return parsed.astimezone(UTC)


def format_instant(instant: datetime) -> str:
    """``2032-01-31T14:00:00Z``: UTC, whole seconds (a timeline never shows milliseconds)."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_minute(instant: datetime) -> datetime:
    """The instant truncated to its minute, in UTC.

    Truncation, not rounding: whatever the clock stamped happened a few milliseconds *after*
    the timer or action that caused it, so truncating lands on the cause's minute.
    """
    return instant.astimezone(UTC).replace(second=0, microsecond=0)


def ceil_minute(instant: datetime) -> datetime:
    """The first whole minute at or after ``instant`` (UTC)."""
    floor = to_minute(instant)
    return floor if floor == instant.astimezone(UTC) else floor + timedelta(minutes=1)
