"""Provider calls run on the payments task queue, whose workers cap their rate (Stripe's
live-mode limit is about 100 requests per second); database work stays on the billing queue.
A history's activity task queue is not part of replay's determinism check, so runs recorded
before the payments queue existed (or on another queue name) still replay."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import stripe
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from activities import provider_pacing
from activities.provider_pacing import DatabasePacer
from activities.stripe_gateway import make_stripe_client
from billing.cli import _payments_worker
from billing.contracts import ActivityName
from billing.invoices import InvoiceStatus
from billing.pacing import PACING_HEADROOM, spacing_s
from billing.settings import Settings
from billing.settlement import LedgerActivityName, SettlementActivityName
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LOCALSTRIPE_API_KEY, LocalStripe
from billing.worker import PAYMENTS_QUEUE_RATE_OVER_CAP, build_dependencies
from db.engine import make_engine, make_session_factory, unit_of_work
from db.repositories.pacing import claim_turn
from tests.conftest import BOTH_BACKENDS, recorded_harness
from workflows.subscription import SubscriptionWorkflow


def scheduled_queues(history: WorkflowHistory) -> dict[str, set[str]]:
    queues: dict[str, set[str]] = {}
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            queues.setdefault(attrs.activity_type.name, set()).add(attrs.task_queue.name)
    return queues


@pytest.fixture
async def capped_harness(
    request: pytest.FixtureRequest,
    temporal_env: Any,
    localstripe: LocalStripe,
    database_url: str,
) -> Any:
    async with recorded_harness(
        request, temporal_env, localstripe, database_url, charge_rate_per_s=7.5
    ) as h:
        yield h


async def test_charge_and_settle_run_on_the_rate_capped_payments_queue(
    capped_harness: BillingHarness,
) -> None:
    h = capped_harness
    signup = await h.signup("basic-monthly", card=SUCCEEDS)
    await h.wait_for(
        signup.subscription_id, lambda v: v.invoices_issued == 1 and not v.open_invoice
    )
    [invoice] = h.snapshot(signup.subscription_id).invoices
    assert invoice.status == InvoiceStatus.PAID

    [run] = await h.run_histories(signup.subscription_id)
    # The charge (which also settles) is the one ordinary activity of a paid period, on the
    # payments queue; the database steps are local activities of the billing worker.
    assert scheduled_queues(run) == {ActivityName.CHARGE_INVOICE: {h.payments_task_queue}}
    # The configured cap reaches the payments worker: Temporal releases the queue at twice
    # the cap (no longer half of it, nor the pacer's own rate), so the shared pacer sets the
    # pace and always has a charge waiting for its next turn.
    assert h._payments_worker is not None
    config = h._payments_worker.config()
    assert config["task_queue"] == h.payments_task_queue
    assert config["max_task_queue_activities_per_second"] == 7.5 * PAYMENTS_QUEUE_RATE_OVER_CAP
    assert PAYMENTS_QUEUE_RATE_OVER_CAP > 1 / PACING_HEADROOM

    # Replay: as recorded, and with every activity moved to another queue (the task queue is
    # not compared on replay, so histories from before the payments queue replay too).
    replayer = Replayer(workflows=[SubscriptionWorkflow])
    result = await replayer.replay_workflow(run, raise_on_replay_failure=False)
    assert result.replay_failure is None
    moved = json.loads(run.to_json())
    scheduled = [
        e["activityTaskScheduledEventAttributes"]
        for e in moved["events"]
        if "activityTaskScheduledEventAttributes" in e
    ]
    assert len(scheduled) >= 1
    for attrs in scheduled:
        attrs["taskQueue"]["name"] = "some-other-queue"
    result = await replayer.replay_workflow(
        WorkflowHistory.from_json(run.workflow_id, moved), raise_on_replay_failure=False
    )
    assert result.replay_failure is None


async def test_the_worker_command_caps_the_payments_queue_from_settings(
    harness: BillingHarness,
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        task_queue="bench-billing",
        charge_rate_per_s=12.5,
    )
    assert settings.payments_queue() == "bench-billing-payments"
    worker = _payments_worker(settings, harness.client, harness.deps)
    config = worker.config()
    assert config["task_queue"] == "bench-billing-payments"
    assert config["max_task_queue_activities_per_second"] == 12.5 * PAYMENTS_QUEUE_RATE_OVER_CAP
    names = {getattr(a, "__temporal_activity_definition").name for a in config["activities"]}
    assert names == {
        ActivityName.CHARGE_INVOICE,
        ActivityName.SETTLE_INVOICE,
        ActivityName.ATTACH_PAYMENT_METHOD,
        ActivityName.CONFIRM_AUTHENTICATED_PAYMENT,
        ActivityName.CANCEL_INVOICE_PAYMENT,
        ActivityName.RECORD_INVOICE_PAYMENT,
        # Settlement (issue 13): refunds and the ledger's reads of Stripe.
        SettlementActivityName.EXECUTE_REFUND,
        LedgerActivityName.IMPORT_PAYOUT,
        LedgerActivityName.SYNC_LEDGER,
        LedgerActivityName.RECONCILE_CHARGES,
    }


def test_payments_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_PAYMENTS_TASK_QUEUE", "stripe-calls")
    monkeypatch.setenv("BILLING_CHARGE_RATE_PER_S", "40")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.payments_queue() == "stripe-calls"
    assert settings.charge_rate_per_s == 40


def test_the_default_charge_rate_keeps_three_requests_each_under_stripes_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BILLING_CHARGE_RATE_PER_S", raising=False)
    monkeypatch.delenv("BILLING_PAYMENTS_TASK_QUEUE", raising=False)
    settings = Settings(_env_file=None, task_queue="q")  # type: ignore[call-arg]
    assert settings.payments_queue() == "q-payments"
    # At most 3 Stripe requests per provider activity; Stripe's live limit is ~100/s.
    assert settings.charge_rate_per_s * 3 < 100


def max_per_window(instants: list[float], window_s: float = 1.0) -> int:
    """The most instants inside any half-open window [t, t + window_s)."""
    ordered = sorted(instants)
    most, first = 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


#: How late a paced request may leave after its granted turn on a loaded machine (2 shared
#: cores: up to 0.18 s was measured with twelve threads on SQLite, and a late wake-up put 26
#: requests in a one-second window under a cap of 25). The schedule's own turns are checked
#: exactly; only the real departures get this allowance.
WAKE_UP_TOLERANCE_S = 0.5


def check_paced(turns: list[tuple[float, float]], cap_per_s: float) -> None:
    """``turns``: (start the schedule granted, when the request really went) pairs. The cap
    holds exactly on the granted turns: at most ``cap_per_s`` in any one-second window and
    consecutive turns at least the spacing apart. A request never goes before its turn and at
    most ``WAKE_UP_TOLERANCE_S`` after it, so the real sends keep the cap in any window of
    ``1 - WAKE_UP_TOLERANCE_S`` seconds (a later wake-up can only bunch them that much)."""
    granted = sorted(start for start, _ in turns)
    assert max_per_window(granted) <= cap_per_s
    gaps = [b - a for a, b in itertools.pairwise(granted)]
    assert min(gaps) >= spacing_s(cap_per_s) - 1e-6, min(gaps)
    # Same machine's clock for the database (SQLite, or the local PostgreSQL); 1 ms of
    # rounding between the two readings.
    lateness = [sent - start for start, sent in turns]
    assert min(lateness) >= -0.001, f"a request went {-min(lateness):.3f} s before its turn"
    assert max(lateness) <= WAKE_UP_TOLERANCE_S, f"a request woke {max(lateness):.3f} s late"
    sent = [at for _, at in turns]
    assert max_per_window(sent, window_s=1 - WAKE_UP_TOLERANCE_S) <= cap_per_s


@BOTH_BACKENDS
def test_two_pacers_on_one_database_share_one_schedule(database_url: str) -> None:
    """Two processes' pacers (each its own engine) and six threads each take 60 turns at a cap
    of 25/s: never more than 25 granted in a one-second window, turns at least the spacing
    apart, no request before its turn and the real ones only a stated tolerance after it, and
    the cap used at 0.95."""
    engines = [make_engine(database_url) for _ in range(2)]
    pacers = [
        DatabasePacer(make_session_factory(e), name="test-payments", cap_per_s=25) for e in engines
    ]
    turns: list[tuple[float, float]] = []
    lock = threading.Lock()

    def take(pacer: DatabasePacer) -> None:
        for _ in range(5):
            start = pacer.wait_turn(max_wait_s=30)
            sent = time.time()
            assert start is not None
            with lock:
                turns.append((start, sent))

    threads = [threading.Thread(target=take, args=(pacers[n % 2],)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    assert len(turns) == 60
    check_paced(turns, 25)
    granted = sorted(start for start, _ in turns)
    # A turn given up for a late wake-up (or a late answer) is a hole of one spacing, by
    # design: on a starved machine there are a few. The bound leaves room for the threads
    # themselves coming back late to ask again (a 2-core machine at load 25: 0.81 of the cap).
    given_up = sum(pacer.late_turns_given_up for pacer in pacers)
    rate = (len(granted) - 1 + given_up) / (granted[-1] - granted[0])
    assert 0.75 * 25 <= rate <= 25


@BOTH_BACKENDS
def test_a_turn_woken_up_too_late_for_is_given_up_and_the_next_one_taken(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose sleep overran (a starved CPU) by more than the slack the headroom leaves
    must not send on its stale turn, which could put cap + 1 requests in one second: it leaves
    that turn unused and takes the next free one."""
    engine = make_engine(database_url)
    pacer = DatabasePacer(make_session_factory(engine), name="late", cap_per_s=10)
    real_sleep = time.sleep
    oversleeps = [0.3]  # the first sleep overruns by 300 ms; later ones are on time

    def starved_sleep(seconds: float) -> None:
        real_sleep(seconds + (oversleeps.pop() if oversleeps else 0.0))

    monkeypatch.setattr("activities.provider_pacing.time.sleep", starved_sleep)
    first = pacer.wait_turn(max_wait_s=5)  # turn now: no sleep, on time
    second = pacer.wait_turn(max_wait_s=5)  # sleeps, overruns: given up, the next one taken
    engine.dispose()
    assert first is not None and second is not None
    assert pacer.late_turns_given_up == 1
    # Not the turn right after the first (one spacing later), but a fresh one after the overrun.
    assert second - first >= 0.3 + pacer.spacing_s * 0.9


@BOTH_BACKENDS
def test_a_turn_whose_commit_ran_late_is_given_up_too(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's lateness counts from the database's answer, not from after the commit:
    a worker starved between the two (here 300 ms pass after a turn due at once was granted)
    would otherwise send 300 ms after its turn with the check seeing none of it."""
    engine = make_engine(database_url)
    pacer = DatabasePacer(make_session_factory(engine), name="slow-commit", cap_per_s=10)
    real_unit_of_work = provider_pacing.unit_of_work
    held_up = [0.3]  # the first commit waits 300 ms; later ones do not

    @contextlib.contextmanager
    def slow_commit(session_factory: Any) -> Iterator[Any]:
        with real_unit_of_work(session_factory) as session:
            yield session
            if held_up:
                time.sleep(held_up.pop())  # after the grant's answer, before its commit

    monkeypatch.setattr(provider_pacing, "unit_of_work", slow_commit)
    asked = time.time()
    start = pacer.wait_turn(max_wait_s=5)
    engine.dispose()
    assert start is not None
    assert pacer.late_turns_given_up >= 1  # more on a starved machine: each late for real
    # Not the turn granted at once (before the commit's 300 ms), but a fresh one after them.
    assert start - asked >= 0.3 - 0.05


@BOTH_BACKENDS
def test_a_turn_further_away_than_the_attempt_can_wait_is_not_taken(database_url: str) -> None:
    engine = make_engine(database_url)
    session_factory = make_session_factory(engine)
    with unit_of_work(session_factory) as session:
        # 2 turns a second: the first is now, the second half a second later.
        first = claim_turn(session, "q", spacing_s=0.5, max_wait_s=0)
        assert first is not None and first.wait_s == 0
        assert abs(first.start_at - time.time()) < 1.0
        assert claim_turn(session, "q", spacing_s=0.5, max_wait_s=0.1) is None
        second = claim_turn(session, "q", spacing_s=0.5, max_wait_s=1)
        assert second is not None and 0.3 < second.wait_s <= 0.5
        assert abs(second.start_at - first.start_at - 0.5) < 1e-6
        # Another queue's schedule is its own.
        other = claim_turn(session, "other", spacing_s=0.5, max_wait_s=0)
        assert other is not None and other.wait_s == 0
    engine.dispose()


def test_a_stripe_request_waits_for_its_turn_and_is_not_sent_without_one(
    localstripe: LocalStripe,
) -> None:
    class NoTurn:
        asked: list[float] = []

        def wait_turn(self, *, max_wait_s: float) -> float | None:
            self.asked.append(max_wait_s)
            return None

    pacer = NoTurn()
    client = make_stripe_client(
        api_key=LOCALSTRIPE_API_KEY, api_base=localstripe.url, max_network_retries=0, pacer=pacer
    )
    with pytest.raises(stripe.APIConnectionError, match="next free turn"):
        client.v1.customers.create()
    assert pacer.asked == [30.0]


def test_only_the_worker_paces_its_stripe_requests(database_url: str) -> None:
    settings = Settings(_env_file=None, database_url=database_url, charge_rate_per_s=40)  # type: ignore[call-arg]
    worker = build_dependencies(settings, pace_provider=True)
    assert worker.pacer is not None
    assert (worker.pacer.name, worker.pacer.cap_per_s) == (settings.payments_queue(), 40)
    assert build_dependencies(settings).pacer is None  # the API's
