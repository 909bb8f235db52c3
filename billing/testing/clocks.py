"""The clock of code running on Temporal's time-skipping test server."""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio import activity

__all__ = ["ServerTimeClock"]


class ServerTimeClock:
    """ "Now" for activities on a time-skipping server: the scheduled time of the running
    activity attempt, which is the server's (skipped) clock. Outside an activity: ``fallback``
    (the harness sets it to the server's time before each client-side call)."""

    def __init__(self) -> None:
        self.fallback = datetime.now(UTC)

    def now(self) -> datetime:
        try:
            return activity.info().current_attempt_scheduled_time.astimezone(UTC)
        except RuntimeError:
            return self.fallback
