"""Dunning: when a failed invoice is retried and when collection gives up."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.dunning import (
    MAX_RETRIES,
    MAX_WINDOW_DAYS,
    DunningPolicy,
    FinalAction,
    validate_dunning_policy,
)
from billing.errors import InvalidInput

FIRST_FAILURE = datetime(2024, 3, 1, 15, 0, tzinfo=UTC)


def test_default_policy_is_eight_tries_within_two_weeks() -> None:
    policy = DunningPolicy()

    retries = [
        policy.retry_at(FIRST_FAILURE, done) for done in range(len(policy.retry_offsets_days))
    ]

    # The failed attempt on the billing date plus seven retries = 8 tries.
    assert len(retries) == 7
    assert retries == [FIRST_FAILURE + timedelta(days=d) for d in (1, 3, 5, 7, 9, 11, 14)]
    assert policy.window_end(FIRST_FAILURE) == FIRST_FAILURE + timedelta(days=14)
    assert policy.final_action == FinalAction.CANCEL


def test_offsets_are_measured_from_the_first_failure_not_the_previous_retry() -> None:
    policy = DunningPolicy(retry_offsets_days=[2, 4, 6])

    # The third retry is 6 days after the first failure, not 2 + 4 + 6 = 12.
    assert policy.retry_at(FIRST_FAILURE, 2) == datetime(2024, 3, 7, 15, 0, tzinfo=UTC)


def test_exhausted_schedule_has_no_next_retry() -> None:
    policy = DunningPolicy()

    assert policy.retry_at(FIRST_FAILURE, 7) is None
    assert policy.retry_at(FIRST_FAILURE, 100) is None


@pytest.mark.parametrize("done", [-1, -7, 1.0, True])
def test_retries_done_must_be_a_non_negative_whole_number(done: Any) -> None:
    with pytest.raises(
        InvalidInput, match=f"retries_done must be a whole number >= 0; got {done!r}"
    ):
        DunningPolicy().retry_at(FIRST_FAILURE, done)


def test_policy_without_retries_gives_up_at_the_first_failure() -> None:
    policy = DunningPolicy(retry_offsets_days=[], final_action=FinalAction.MARK_UNPAID)

    assert policy.retry_at(FIRST_FAILURE, 0) is None
    assert policy.window_end(FIRST_FAILURE) == FIRST_FAILURE


def test_limits_are_inclusive() -> None:
    longest = validate_dunning_policy(
        DunningPolicy(retry_offsets_days=list(range(MAX_WINDOW_DAYS - MAX_RETRIES + 1, 91)))
    )

    assert len(longest.retry_offsets_days) == MAX_RETRIES
    assert longest.window_end(FIRST_FAILURE) == FIRST_FAILURE + timedelta(days=MAX_WINDOW_DAYS)


def test_final_action_may_be_given_by_name() -> None:
    policy = validate_dunning_policy(DunningPolicy(final_action="mark_unpaid"))  # type: ignore[arg-type]
    assert policy.final_action is FinalAction.MARK_UNPAID


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"retry_offsets_days": [3, 3]}, "retry_offsets_days", "strictly increasing; got [3, 3]"),
        ({"retry_offsets_days": [5, 2]}, "retry_offsets_days", "strictly increasing; got [5, 2]"),
        ({"retry_offsets_days": [0, 1]}, "retry_offsets_days", "between 1 and 90 days; got [0, 1]"),
        ({"retry_offsets_days": [-1]}, "retry_offsets_days", "between 1 and 90 days; got [-1]"),
        (
            {"retry_offsets_days": [1, 91]},
            "retry_offsets_days",
            "between 1 and 90 days; got [1, 91]",
        ),
        (
            {"retry_offsets_days": list(range(1, 22))},
            "retry_offsets_days",
            "at most 20 retries are allowed; got 21",
        ),
        ({"retry_offsets_days": [1.5]}, "retry_offsets_days", "whole days; got [1.5]"),
        ({"retry_offsets_days": [True]}, "retry_offsets_days", "whole days; got [True]"),
        ({"retry_offsets_days": "1,3,5"}, "retry_offsets_days", "whole days; got '1,3,5'"),
        (
            {"final_action": "delete"},
            "final_action",
            "unknown final_action 'delete'; use one of: cancel, mark_unpaid",
        ),
    ],
)
def test_invalid_policy_is_refused_with_a_clear_message(
    kwargs: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_dunning_policy(DunningPolicy(**kwargs))

    assert caught.value.field == f"dunning.{field}"
    assert message in caught.value.message


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, MAX_WINDOW_DAYS), max_size=MAX_RETRIES, unique=True).map(sorted),
    st.datetimes(datetime(1970, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)),
)
def test_every_retry_falls_inside_the_window_in_order(offsets: list[int], first: datetime) -> None:
    policy = DunningPolicy(retry_offsets_days=offsets)

    end = policy.window_end(first)
    retries = [policy.retry_at(first, done) for done in range(len(offsets) + 1)]

    scheduled = [r for r in retries if r is not None]
    assert retries[-1] is None
    assert len(scheduled) == len(offsets)
    assert all(first < a < b for a, b in itertools.pairwise(scheduled))
    assert all(first < r <= end for r in scheduled)
    assert end == (scheduled[-1] if scheduled else first)
