"""The workflow's decision function (billing.collection), without a server: hypothesis drives
one open invoice through arbitrary declines, blocks, card changes and worker outages the way
the workflow does (ask ``decide``, carry out the step, ask again) and checks the dunning rules
of issue 11 on every timeline it can find."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from billing.calendar import IntervalUnit
from billing.collection import (
    AttemptReason,
    BillPeriod,
    Charge,
    ContinueAsNew,
    EndAtPeriodEnd,
    Finish,
    RetryRules,
    RunFacts,
    Settle,
    SleepUntil,
    TakeFinalAction,
    WaitForChange,
    decide,
    next_retry,
)
from billing.dunning import MIN_AUTOMATIC_RETRY_SPACING, DunningPolicy
from billing.plans import Plan
from billing.subscription import (
    BlockedReason,
    OpenInvoice,
    SubscriptionState,
    SubscriptionStatus,
)

T0 = datetime(2027, 4, 1, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)

OUTCOMES = st.sampled_from(["soft", "soft", "soft", "hard", "auth"])


def _state(policy: DunningPolicy) -> SubscriptionState:
    plan = Plan(
        code="basic-monthly",
        name="Basic",
        amount_minor=900,
        currency="USD",
        interval=IntervalUnit.MONTH,
        dunning=policy,
    )
    return SubscriptionState(
        subscription_id="sub_1",
        customer_id="cus_1",
        plan=plan,
        timezone="UTC",
        started_at=T0,
        anchor_at=T0,
        status=SubscriptionStatus.PAST_DUE,
        next_period_index=1,
        open_invoice=OpenInvoice(
            invoice_id="inv_1",
            number="INV-1",
            period_index=0,
            period_start=T0,
            period_end=T0 + timedelta(days=30),
            amount_minor=900,
            currency="USD",
        ),
    )


@dataclass
class Attempt:
    at: datetime
    reason: AttemptReason


@dataclass
class Timeline:
    attempts: list[Attempt] = field(default_factory=list)
    final_action_at: datetime | None = None


policies = st.builds(
    DunningPolicy,
    retry_offsets_days=st.lists(st.integers(1, 30), min_size=0, max_size=8, unique=True).map(
        sorted
    ),
    min_retry_spacing_hours=st.sampled_from([20, 0, 1, 47]),
)


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[DunningPolicy, list[str], list[datetime], list[tuple[datetime, datetime]]]:
    policy = draw(policies)
    outcomes = draw(st.lists(OUTCOMES, min_size=30, max_size=30))
    card_changes = sorted(
        T0 + timedelta(minutes=m) for m in draw(st.lists(st.integers(1, 35 * 24 * 60), max_size=5))
    )
    outages = []
    for start, length in draw(
        st.lists(st.tuples(st.integers(0, 35 * 24), st.integers(1, 10 * 24)), max_size=3)
    ):
        outages.append((T0 + start * HOUR, T0 + (start + length) * HOUR))
    return policy, outcomes, card_changes, outages


def drive(
    policy: DunningPolicy,
    outcomes: list[str],
    card_changes: list[datetime],
    outages: list[tuple[datetime, datetime]],
    rules: RetryRules = RetryRules.SPACED,
) -> Timeline:
    """Run the decision loop as the workflow does, from the invoice's first (failed) attempt
    at T0. The worker is down during ``outages``: a timer that fires then is seen at the end."""
    state = _state(policy)
    inv = state.open_invoice
    assert inv is not None
    timeline = Timeline()
    outcome_iter = iter(outcomes)
    changes = list(card_changes)
    now = T0

    def attempt(reason: AttemptReason) -> None:
        timeline.attempts.append(Attempt(now, reason))
        inv.attempts += 1
        inv.last_attempt_at = now
        inv.first_failure_at = inv.first_failure_at or now
        outcome = next(outcome_iter, "soft")
        inv.blocked = {
            "soft": None,
            "hard": BlockedReason.HARD_DECLINE,
            "auth": BlockedReason.AUTHENTICATION_REQUIRED,
        }[outcome]

    attempt(AttemptReason.SCHEDULED)
    for _ in range(200):
        step = decide(state, now, RunFacts(rules=rules))
        match step:
            case Charge():
                if step.unblock:
                    inv.blocked = None
                if step.reason == AttemptReason.RETRY:
                    inv.scheduled_retries_done = step.retry_slots_done
                inv.payment_method_version_seen = state.payment_method_version
                attempt(step.reason)
            case TakeFinalAction():
                timeline.final_action_at = now
                return timeline
            case SleepUntil(at=at):
                wake = at
                if changes and changes[0] < wake:
                    wake = changes.pop(0)
                    state.payment_method_version += 1
                for start, end in outages:
                    if start <= wake < end:
                        wake = end
                assert wake >= now
                now = wake
                # Card changes that happened while the worker was down are seen now.
                while changes and changes[0] <= now:
                    changes.pop(0)
                    state.payment_method_version += 1
            case _:
                raise AssertionError(f"unexpected step {step!r} with an open invoice")
    raise AssertionError("the decision loop did not end")


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_automatic_attempts_keep_their_distance_and_never_burst(
    scenario: tuple[DunningPolicy, list[str], list[datetime], list[tuple[datetime, datetime]]],
) -> None:
    policy, outcomes, card_changes, outages = scenario
    timeline = drive(policy, outcomes, card_changes, outages)
    attempts = timeline.attempts
    for before, after in pairwise(attempts):
        assert after.at >= before.at
        if after.reason.automatic:
            # Only the customer's own action is acted on sooner.
            assert after.at - before.at >= policy.min_retry_spacing, attempts
    automatic_retries = [a for a in attempts if a.reason == AttemptReason.RETRY]
    # Never more retries than the schedule has slots, however long the outages were.
    assert len(automatic_retries) <= len(policy.retry_offsets_days)
    for retry in automatic_retries:
        # A retry never runs before a slot of the schedule has come.
        assert any(retry.at >= T0 + timedelta(days=d) for d in policy.retry_offsets_days), retry


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_the_final_action_comes_once_the_schedule_is_spent_never_before(
    scenario: tuple[DunningPolicy, list[str], list[datetime], list[tuple[datetime, datetime]]],
) -> None:
    policy, outcomes, card_changes, outages = scenario
    timeline = drive(policy, outcomes, card_changes, outages)
    assert timeline.final_action_at is not None
    assert timeline.final_action_at >= policy.window_end(T0)


@settings(max_examples=200, deadline=None)
@given(policies, st.lists(st.just("soft"), min_size=30, max_size=30))
def test_soft_declines_without_outages_follow_the_schedule_exactly(
    policy: DunningPolicy, outcomes: list[str]
) -> None:
    """Nothing to skip: every slot fires on its day, as before the change (when the spacing
    fits between the slots; a longer spacing delays them, which the first test covers)."""
    days = [0, *policy.retry_offsets_days]
    assume(all(timedelta(days=b - a) >= policy.min_retry_spacing for a, b in pairwise(days)))
    timeline = drive(policy, outcomes, [], [])
    assert [a.at for a in timeline.attempts[1:]] == [
        T0 + timedelta(days=d) for d in policy.retry_offsets_days
    ]
    assert timeline.final_action_at == policy.window_end(T0)


def test_the_legacy_rules_fire_every_passed_slot_as_runs_recorded_before_did() -> None:
    """Runs recorded before the change replay with their own rule (each passed slot in turn),
    which is the burst of finding 1."""
    policy = DunningPolicy()
    blocked_until_day_10 = [(T0 + HOUR, T0 + timedelta(days=10))]
    legacy = drive(policy, ["soft"] * 30, [], blocked_until_day_10, RetryRules.LEGACY)
    spaced = drive(policy, ["soft"] * 30, [], blocked_until_day_10, RetryRules.SPACED)
    legacy_on_day_10 = [a for a in legacy.attempts if a.at == T0 + timedelta(days=10)]
    assert len(legacy_on_day_10) == 5  # days 1, 3, 5, 7, 9 at once
    spaced_on_day_10 = [a for a in spaced.attempts if a.at == T0 + timedelta(days=10)]
    assert len(spaced_on_day_10) == 1  # only the latest missed slot
    assert [a.at for a in spaced.attempts[2:]] == [
        T0 + timedelta(days=11),
        T0 + timedelta(days=14),
    ]


def test_the_next_retry_waits_out_the_spacing_after_a_customer_attempt() -> None:
    policy = DunningPolicy(retry_offsets_days=[1, 3])
    state = _state(policy)
    inv = state.open_invoice
    assert inv is not None
    inv.attempts = 2
    inv.first_failure_at = T0
    # The customer's new card was tried 2 hours before the day-1 slot.
    inv.last_attempt_at = T0 + timedelta(hours=22)
    nxt = next_retry(policy, inv, T0 + timedelta(hours=22), RetryRules.SPACED)
    assert nxt is not None
    assert nxt.at == inv.last_attempt_at + MIN_AUTOMATIC_RETRY_SPACING
    assert nxt.slot == 0


def test_decide_outside_collection() -> None:
    policy = DunningPolicy()
    state = _state(policy)
    state.open_invoice = None
    state.status = SubscriptionStatus.ACTIVE
    due = state.period(1).start
    step = decide(state, T0, RunFacts())
    assert step == SleepUntil(due, then=BillPeriod(1))
    assert decide(state, due, RunFacts()) == BillPeriod(1)
    assert decide(state, due, RunFacts(continue_as_new_due=True)) == ContinueAsNew()
    state.cancel_at_period_end = True
    state.current_period_end = due
    assert decide(state, due, RunFacts()) == EndAtPeriodEnd(due)
    state.cancel_at_period_end = False
    for parked in (
        SubscriptionStatus.PAUSED,
        SubscriptionStatus.UNPAID,
        SubscriptionStatus.NEEDS_ATTENTION,
    ):
        state.status = parked
        assert decide(state, due, RunFacts()) == WaitForChange()
    state.status = SubscriptionStatus.CANCELED
    assert decide(state, due, RunFacts()) == Finish()


def test_a_charge_that_succeeded_but_was_not_settled_is_settled_not_charged_again() -> None:
    state = _state(DunningPolicy())
    inv = state.open_invoice
    assert inv is not None
    inv.attempts = 1
    inv.paid_attempt_number = 1
    inv.paid_payment_intent_id = "pi_1"
    # Even with a new card waiting: the money is taken, only the record is missing.
    state.payment_method_version = 3
    assert decide(state, T0, RunFacts()) == Settle()
