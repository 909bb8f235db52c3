"""Customer notices (the e-mail outbox): which kinds exist, which a customer may opt out of,
when the reminders are due, what a mail server's reply means, and each notice's stable
Message-ID. Pure rules: no database, no SMTP, no Temporal.

A notice is written to the outbox (``notifications``) in the same transaction as the change
it reports, and delivered later by ``workflows/notifications.py``. The outbox row is the
single source of truth for whether it was sent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from billing.calendar import IntervalUnit
from billing.subscription import SubscriptionStatus


class NoticeKind(StrEnum):
    """Every kind of customer notice; the values are what ``notifications.kind`` stores (the
    first six are written by the subscription workflow, ``billing.contracts.NoticeKind``)."""

    PAYMENT_FAILED = "payment_failed"
    ACTION_REQUIRED = "action_required"
    PAYMENT_RECOVERED = "payment_recovered"
    SUBSCRIPTION_CANCELED = "subscription_canceled"
    SUBSCRIPTION_UNPAID = "subscription_unpaid"
    TRIAL_ENDING = "trial_ending"
    #: A paid invoice's receipt (written with the payment).
    RECEIPT = "receipt"
    #: An annual plan renews in 7 days.
    UPCOMING_RENEWAL = "upcoming_renewal"
    #: To the business, not a customer: one of its event endpoints failed for 3 days and was
    #: disabled (``notifications.recipient``).
    ENDPOINT_DISABLED = "endpoint_disabled"


#: What a customer may switch off. Dunning notices (failed payment, action required, recovered,
#: unpaid, canceled) are never optional: they are how dunning recovers a card. The annual
#: renewal reminder is not optional either: some laws (e.g. California's automatic renewal law)
#: require it, so it is not ours to suppress.
NON_ESSENTIAL_KINDS = frozenset({NoticeKind.RECEIPT, NoticeKind.TRIAL_ENDING})

#: Stripe's defaults: the trial-ending mail 3 days before, the renewal reminder 7 days before.
TRIAL_ENDING_NOTICE = timedelta(days=3)
UPCOMING_RENEWAL_NOTICE = timedelta(days=7)


class NoticeStatus(StrEnum):
    """Where one outbox notice stands."""

    PENDING = "pending"
    #: The mail server accepted it (``sent_at``).
    SENT = "sent"
    #: The mail server refused it for good (5xx) or every retry failed: ``last_error`` says why.
    FAILED = "failed"
    #: Not sent on purpose: the customer opted out of this non-essential kind, or has no
    #: e-mail address (``last_error`` says which).
    SKIPPED = "skipped"


def is_known_kind(kind: str) -> bool:
    return kind in NoticeKind._value2member_map_


def may_skip(kind: str, *, opted_out: bool) -> bool:
    """Whether a customer's opt-out suppresses this notice (never a dunning notice)."""
    return opted_out and kind in NON_ESSENTIAL_KINDS


@dataclass(frozen=True)
class ReminderFacts:
    """What the reminder rule needs to know of a subscription (instants UTC)."""

    subscription_id: str
    status: SubscriptionStatus
    interval: IntervalUnit
    interval_count: int
    trial_end_at: datetime | None
    next_billing_at: datetime | None
    cancel_at_period_end: bool = False


@dataclass(frozen=True)
class Reminder:
    kind: NoticeKind
    #: The instant the reminder is about (trial end, renewal), UTC; part of the dedupe key, so
    #: a moved date gets its own reminder and the same date never gets two.
    about: datetime

    def dedupe_key(self, subscription_id: str) -> str:
        return f"{subscription_id}:{self.kind.value}:{self.about.isoformat()}"


def reminders_due(facts: ReminderFacts, now: datetime) -> list[Reminder]:
    """Reminders whose window is open at ``now``: the trial ends within 3 days (a trialing
    subscription), or an annual subscription renews within 7 days (and is not set to end).
    A window that already closed (the date passed) gives nothing: a reminder is never sent
    late."""
    due: list[Reminder] = []
    if (
        facts.status == SubscriptionStatus.TRIALING
        and facts.trial_end_at is not None
        and facts.trial_end_at - TRIAL_ENDING_NOTICE <= now < facts.trial_end_at
    ):
        due.append(Reminder(NoticeKind.TRIAL_ENDING, facts.trial_end_at))
    annual = (facts.interval == IntervalUnit.YEAR) or (
        facts.interval == IntervalUnit.MONTH and facts.interval_count % 12 == 0
    )
    if (
        annual
        and facts.status == SubscriptionStatus.ACTIVE
        and not facts.cancel_at_period_end
        and facts.next_billing_at is not None
        and facts.next_billing_at - UPCOMING_RENEWAL_NOTICE <= now < facts.next_billing_at
    ):
        due.append(Reminder(NoticeKind.UPCOMING_RENEWAL, facts.next_billing_at))
    return due


class SmtpVerdict(StrEnum):
    ACCEPTED = "accepted"
    #: 4xx, a timeout, a dropped connection: try again later with the same Message-ID.
    RETRY = "retry"
    #: 5xx: the server will never take it; give up and say why.
    REFUSED = "refused"


def smtp_verdict(code: int | None) -> SmtpVerdict:
    """What an SMTP reply code means for the notice (RFC 5321 4.2.1). ``None``: no reply at all
    (timeout, connection refused or dropped), which is transient."""
    if code is None or 400 <= code < 500:
        return SmtpVerdict.RETRY
    if 500 <= code < 600:
        return SmtpVerdict.REFUSED
    return SmtpVerdict.ACCEPTED


def message_id_for(notification_id: str, from_address: str) -> str:
    """The notice's Message-ID, the same on every attempt (RFC 5322 3.6.4), so a mail sent
    twice (a worker killed between the server's acceptance and our record of it) is one
    message to any receiver that deduplicates by it."""
    domain = from_address.rpartition("@")[2].strip(" >") or "billing.invalid"
    digest = hashlib.sha256(notification_id.encode()).hexdigest()[:12]
    return f"<{notification_id}.{digest}@{domain}>"
