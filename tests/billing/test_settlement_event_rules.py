"""Which event a refund, dispute or payout state reports (``billing.business_events``): one per
state reached, none for a repeated or stale report; the account stream is never a
subscription's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.business_events import (
    ACCOUNT_STREAM,
    EventType,
    dispute_event_for,
    payout_event_for,
    refund_event_for,
    stream_subscription_id,
)
from billing.credit_notes import RefundStatus
from billing.disputes import DisputeStatus, dispute_status_after
from billing.ledger import PayoutStatus


@pytest.mark.parametrize(
    ("status", "event"),
    [
        (RefundStatus.PENDING, None),
        (RefundStatus.REQUIRES_ACTION, EventType.REFUND_UPDATED),
        (RefundStatus.SUCCEEDED, EventType.REFUND_SUCCEEDED),
        (RefundStatus.FAILED, EventType.REFUND_FAILED),
        (RefundStatus.CANCELED, EventType.REFUND_UPDATED),
    ],
)
def test_each_refund_status_has_its_event(status: RefundStatus, event: EventType | None) -> None:
    assert refund_event_for(status) == event


@pytest.mark.parametrize(
    ("status", "event"),
    [
        (PayoutStatus.PENDING, None),
        (PayoutStatus.IN_TRANSIT, None),
        (PayoutStatus.PAID, EventType.PAYOUT_PAID),
        (PayoutStatus.FAILED, EventType.PAYOUT_FAILED),
        (PayoutStatus.CANCELED, EventType.PAYOUT_CANCELED),
    ],
)
def test_a_payout_reports_only_its_end(status: PayoutStatus, event: EventType | None) -> None:
    assert payout_event_for(status) == event


def test_the_account_stream_has_no_subscription() -> None:
    assert stream_subscription_id(ACCOUNT_STREAM) is None
    assert stream_subscription_id("sub_123") == "sub_123"


reports = st.lists(
    st.tuples(st.sampled_from(list(DisputeStatus)), st.sampled_from([500, 900])),
    min_size=1,
    max_size=12,
)


@given(reports)
def test_any_sequence_of_dispute_reports_closes_at_most_once_and_repeats_write_nothing(
    seen: list[tuple[DisputeStatus, int]],
) -> None:
    """Stripe's reports in any order, repeated: as recorded (a closed dispute never reopens),
    ``closed`` at most once, and never an event for a report that changes nothing."""
    recorded: tuple[DisputeStatus, int] | None = None
    closed = 0
    for status, amount in seen:
        now = (
            (status, amount)
            if recorded is None
            else (dispute_status_after(recorded[0], status), amount)
        )
        event = dispute_event_for(recorded, now)
        if recorded == now:
            assert event is None
        closed += event == EventType.DISPUTE_CLOSED
        recorded = now
    assert closed <= 1
    assert closed == (1 if recorded is not None and recorded[0].closed else 0)
