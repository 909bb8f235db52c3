"""Dunning policy: when to retry a failed invoice payment and what to do when retries run out.

Offsets are measured from the *first* failure of the invoice, not from the previous retry,
so a card update (an extra, immediate retry) never moves the remaining schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from itertools import pairwise

from billing.errors import InvalidInput


class FinalAction(StrEnum):
    #: Cancel the subscription and mark the invoice uncollectible.
    CANCEL = "cancel"
    #: Keep the subscription but stop billing (status ``unpaid``); invoice uncollectible.
    #: A payment-method update reactivates billing at the next anchor date.
    MARK_UNPAID = "mark_unpaid"


#: Stripe recommends "8 tries within 2 weeks" for subscription retries: the first attempt on
#: the billing date plus seven retries spread over fourteen days.
DEFAULT_RETRY_OFFSETS_DAYS: tuple[int, ...] = (1, 3, 5, 7, 9, 11, 14)

MAX_RETRIES = 20
MAX_WINDOW_DAYS = 90

#: Automatic attempts of one invoice are at least this far apart, whatever caused the attempt
#: before (card networks treat bursts of retries as abuse, and each attempt mails the customer).
#: Only the customer's own action (a new card, an authentication) is acted on sooner.
MIN_AUTOMATIC_RETRY_SPACING = timedelta(hours=20)
MAX_RETRY_SPACING_HOURS = 7 * 24


@dataclass(frozen=True)
class DunningPolicy:
    """Retry schedule as days after the first failure, ascending, plus the final action.

    Building one checks nothing (it is decoded from every workflow payload that carries a
    plan, and a rule tightened later must not make a recorded history undecodable); policies
    from outside data go through ``validate_dunning_policy`` at the edge."""

    retry_offsets_days: list[int] = field(default_factory=lambda: list(DEFAULT_RETRY_OFFSETS_DAYS))
    final_action: FinalAction = FinalAction.CANCEL
    #: Least time between two attempts of one invoice when the later one is automatic (hours).
    min_retry_spacing_hours: int = MIN_AUTOMATIC_RETRY_SPACING // timedelta(hours=1)

    @property
    def min_retry_spacing(self) -> timedelta:
        return timedelta(hours=self.min_retry_spacing_hours)

    def retry_at(self, first_failure_at: datetime, retries_done: int) -> datetime | None:
        """When the next scheduled retry is due, or None when the schedule is exhausted."""
        if isinstance(retries_done, bool) or not isinstance(retries_done, int) or retries_done < 0:
            # A negative count would index the schedule from its end and return a plausible date.
            raise InvalidInput(
                f"retries_done must be a whole number >= 0; got {retries_done!r}",
                field="retries_done",
            )
        if retries_done < len(self.retry_offsets_days):
            return first_failure_at + timedelta(days=self.retry_offsets_days[retries_done])
        return None

    def window_end(self, first_failure_at: datetime) -> datetime:
        """When dunning gives up: the last offset (or the failure itself if there are none).

        Hard declines and authentication waits do not retry on schedule, but they still end here,
        so a card nobody fixes reaches the final action on the same day a soft decline would.
        """
        last = self.retry_offsets_days[-1] if self.retry_offsets_days else 0
        return first_failure_at + timedelta(days=last)


def validate_dunning_policy(policy: DunningPolicy) -> DunningPolicy:
    """The policy normalized (a list of offsets, a FinalAction), or InvalidInput naming the
    bad field."""
    offsets = policy.retry_offsets_days
    if not isinstance(offsets, list | tuple) or any(
        isinstance(o, bool) or not isinstance(o, int) for o in offsets
    ):
        raise InvalidInput(
            f"retry_offsets_days must be a list of whole days; got {offsets!r}",
            field="dunning.retry_offsets_days",
        )
    if len(offsets) > MAX_RETRIES:
        raise InvalidInput(
            f"at most {MAX_RETRIES} retries are allowed; got {len(offsets)}",
            field="dunning.retry_offsets_days",
        )
    if any(o < 1 or o > MAX_WINDOW_DAYS for o in offsets):
        raise InvalidInput(
            f"each retry offset must be between 1 and {MAX_WINDOW_DAYS} days; got {list(offsets)}",
            field="dunning.retry_offsets_days",
        )
    if any(b <= a for a, b in pairwise(offsets)):
        raise InvalidInput(
            f"retry offsets must be strictly increasing; got {list(offsets)}",
            field="dunning.retry_offsets_days",
        )
    spacing = policy.min_retry_spacing_hours
    if (
        isinstance(spacing, bool)
        or not isinstance(spacing, int)
        or not (0 <= spacing <= MAX_RETRY_SPACING_HOURS)
    ):
        raise InvalidInput(
            f"min_retry_spacing_hours must be a whole number of hours from 0 to "
            f"{MAX_RETRY_SPACING_HOURS}; got {spacing!r}",
            field="dunning.min_retry_spacing_hours",
        )
    try:
        final_action = FinalAction(policy.final_action)
    except ValueError:
        allowed = ", ".join(a.value for a in FinalAction)
        raise InvalidInput(
            f"unknown final_action {policy.final_action!r}; use one of: {allowed}",
            field="dunning.final_action",
        ) from None
    return replace(policy, retry_offsets_days=list(offsets), final_action=final_action)
