"""Disputes (chargebacks), as Stripe reports them (https://docs.stripe.com/api/disputes/object).

When a cardholder disputes a charge, Stripe takes the disputed amount (and a dispute fee) from
the account's balance at once, except for inquiries (``warning_*``), which move no money. A won
dispute gives the amount back (the fee too, in most regions); a lost one keeps it. Amounts are
integer minor units.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class DisputeStatus(StrEnum):
    WARNING_NEEDS_RESPONSE = "warning_needs_response"
    WARNING_UNDER_REVIEW = "warning_under_review"
    WARNING_CLOSED = "warning_closed"
    NEEDS_RESPONSE = "needs_response"
    UNDER_REVIEW = "under_review"
    WON = "won"
    LOST = "lost"

    @property
    def closed(self) -> bool:
        return self in (DisputeStatus.WARNING_CLOSED, DisputeStatus.WON, DisputeStatus.LOST)

    @property
    def holds_money(self) -> bool:
        """Whether Stripe holds the disputed amount: an open chargeback, or a lost one. An
        inquiry moves no money; a won dispute gave it back."""
        return self in (
            DisputeStatus.NEEDS_RESPONSE,
            DisputeStatus.UNDER_REVIEW,
            DisputeStatus.LOST,
        )


def dispute_status_after(current: DisputeStatus, reported: DisputeStatus) -> DisputeStatus:
    """The status to record when the provider reports ``reported`` for a dispute we hold as
    ``current``: a closed dispute never reopens through a late or stale report."""
    if current.closed and not reported.closed:
        return current
    return reported


@dataclass(frozen=True, slots=True)
class ProviderDispute:
    """A dispute as the provider holds it (read fresh, never from an event's snapshot)."""

    dispute_id: str
    charge_id: str
    payment_intent_id: str | None
    amount_minor: int
    currency: str
    status: DisputeStatus
    reason: str | None = None
    #: Its balance transactions (the withdrawal, and the reinstatement of a won dispute).
    balance_transaction_ids: tuple[str, ...] = ()
    evidence_due_by: datetime | None = None
    created: datetime | None = None
