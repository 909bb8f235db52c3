"""Every example scenario, run through the real `billing simulate --json` command on the
time-skipping server, gives exactly the timeline kept next to it (`NAME.expected.json`).

To regenerate the expected files after an intended change, then review the diff:

    BILLING_UPDATE_EXPECTED=1 .venv/bin/pytest tests/simulate/test_simulate_examples.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.simulate.cli import EXAMPLES, run_cli

UPDATE = os.environ.get("BILLING_UPDATE_EXPECTED") == "1"
SCENARIOS = sorted(EXAMPLES.glob("*.yaml"))

Document = dict[str, Any]


def test_the_issue_s_examples_exist() -> None:
    names = {p.stem for p in SCENARIOS}
    assert names >= {
        "leap-year-month-end",
        "trial-then-monthly",
        "dunning-recovered-by-card-update",
        "dunning-exhausted",
        "cancel-at-period-end-during-dunning",
        "pause-and-resume-over-a-year",
        "annual-plan-ten-years",
        "upgrade-mid-month",
        "downgrade-at-period-end",
        "monthly-to-annual",
        "seats-added-and-removed",
    }
    for scenario in SCENARIOS:
        assert scenario.with_suffix("").with_suffix(".expected.json").exists() or UPDATE, (
            f"{scenario.name} has no expected timeline next to it"
        )


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_example_timeline_equals_its_expected_file(scenario: Path) -> None:
    result = run_cli(scenario, "--json")
    assert result.exit_code == 0, result.stderr
    actual = json.loads(result.stdout)
    expected_path = scenario.with_suffix("").with_suffix(".expected.json")
    if UPDATE:
        expected_path.write_text(result.stdout)
    expected = json.loads(expected_path.read_text())
    assert actual == expected
    # The expected files are reviewed facts, not just "what came out": check the ones each
    # example exists to show.
    FACTS.get(scenario.stem, lambda _: None)(actual)


# ---- what each example shows --------------------------------------------------------------


def only_subscription(doc: Document) -> Document:
    [subscription] = doc["subscriptions"]
    return subscription


def leap_year(doc: Document) -> None:
    sub = only_subscription(doc)
    # 09:00 in New York: 14:00Z in winter, 13:00Z in summer; Feb 29, then month ends.
    starts = [i["period_start"] for i in sub["invoices"]]
    assert starts[:4] == [
        "2032-01-31T14:00:00Z",
        "2032-02-29T14:00:00Z",
        "2032-03-31T13:00:00Z",
        "2032-04-30T13:00:00Z",
    ]
    assert starts[-1] == "2032-12-31T14:00:00Z" and len(starts) == 12
    assert {i["status"] for i in sub["invoices"]} == {"paid"}


def trial(doc: Document) -> None:
    sub = only_subscription(doc)
    assert sub["trial_end"] == sub["anchor"] == "2032-04-24T01:00:00Z"  # 10:00 in Tokyo
    assert [c["status"] for c in sub["status_changes"]] == ["trialing", "active"]
    assert sub["invoices"][0]["period_start"] == "2032-04-24T01:00:00Z"


def recovered_by_card_update(doc: Document) -> None:
    sub = only_subscription(doc)
    june = sub["invoices"][3]
    assert [(a["outcome"], a["reason"]) for a in june["attempts"]] == [
        ("failed", "scheduled"),
        ("failed", "retry"),
        ("failed", "retry"),
        ("succeeded", "payment_method_updated"),
    ]
    # The card update's retry runs when the customer updates the card.
    update = next(a for a in doc["actions"] if a["action"] == "update_card")
    assert june["attempts"][3]["at"] == update["at"] == "2032-06-05T12:30:00Z"
    assert [c["status"] for c in sub["status_changes"]] == ["active", "past_due", "active"]
    # The billing date did not move.
    assert sub["invoices"][4]["period_start"] == "2032-07-01T07:00:00Z"


def exhausted(doc: Document) -> None:
    sub = only_subscription(doc)
    march = sub["invoices"][2]
    days = [int(a["at"][8:10]) for a in march["attempts"]]
    assert days == [10, 11, 13, 15, 17, 19, 21, 24]  # first try + days 1..14 of the policy
    assert march["status"] == "uncollectible"
    assert sub["status"] == "canceled" and sub["ended_at"] == "2032-03-24T08:00:00Z"
    assert len(sub["invoices"]) == 3  # nothing billed after


def cancel_during_dunning(doc: Document) -> None:
    sub = only_subscription(doc)
    assert sub["invoices"][-1]["status"] == "paid"
    assert sub["ended_at"] == sub["invoices"][-1]["period_end"] == "2032-06-15T19:00:00Z"
    assert [c["status"] for c in sub["status_changes"]] == [
        "active",
        "past_due",
        "active",
        "canceled",
    ]


def pause_resume(doc: Document) -> None:
    sub = only_subscription(doc)
    days = [i["period_start"][:10] for i in sub["invoices"]]
    assert "2032-05-15" not in days and "2032-06-15" not in days
    assert "2032-07-15" in days  # the anchor's next date after the resume
    assert [a["outcome"] for a in doc["actions"]] == ["applied", "refused", "applied"]
    assert "already paused" in doc["actions"][1]["detail"]


def annual(doc: Document) -> None:
    sub = only_subscription(doc)
    days = [i["period_start"][:10] for i in sub["invoices"]]
    assert days[:5] == ["2032-02-29", "2033-02-28", "2034-02-28", "2035-02-28", "2036-02-29"]
    assert len(days) == 10


def two_subscriptions(doc: Document) -> None:
    basic, team = doc["subscriptions"]
    assert (basic["name"], team["name"]) == ("basic", "team")
    # One customer: one invoice sequence across both subscriptions, no gaps.
    numbers = sorted(i["number"] for sub in (basic, team) for i in sub["invoices"])
    assert numbers == [f"INV-{n:04d}" for n in range(1, len(numbers) + 1)]
    # The failing card reaches each subscription at its own renewal; the new card pays both
    # open invoices at once (10:00 Berlin, 08:00Z).
    for sub, failed_at in ((team, "2032-03-29T07:00:00Z"), (basic, "2032-04-01T07:00:00Z")):
        assert [(c["at"], c["status"]) for c in sub["status_changes"]][1:3] == [
            (failed_at, "past_due"),
            ("2032-04-03T08:00:00Z", "active"),
        ]
        [dunned] = [i for i in sub["invoices"] if len(i["attempts"]) > 1]
        assert dunned["status"] == "paid"
        assert dunned["attempts"][-1]["reason"] == "payment_method_updated"
        assert dunned["attempts"][-1]["at"] == "2032-04-03T08:00:00Z"
    assert (basic["status"], team["status"]) == ("active", "canceled")
    assert team["ended_at"] == "2032-06-14T07:00:00Z"
    assert team["invoices"][-1]["period_end"] == "2032-06-14T07:00:00Z"
    assert len(basic["invoices"]) == 4  # March to June: the horizon is July 1st, 00:00
    assert {i["status"] for sub in (basic, team) for i in sub["invoices"]} == {"paid"}


def blocked_then_failing_card(doc: Document) -> None:
    """Issue 11, finding 1: the slots that passed while the invoice was blocked are skipped,
    not fired in a burst when the customer's new card declines (the code before fired six
    attempts in the same minute)."""
    sub = only_subscription(doc)
    april = sub["invoices"][1]
    assert [(a["at"], a["reason"]) for a in april["attempts"]] == [
        ("2027-04-01T08:00:00Z", "scheduled"),  # needs authentication: blocked
        ("2027-04-11T11:00:00Z", "payment_method_updated"),  # the customer's own card
        ("2027-04-12T08:00:00Z", "retry"),  # day 11, 21 hours later (at least 20)
        ("2027-04-15T08:00:00Z", "retry"),  # day 14, the last slot
    ]
    failed = [e for e in sub["notices"] if e["kind"] == "payment_failed"]
    assert len(failed) == 3  # one per failed attempt, none in a burst
    assert april["status"] == "uncollectible" and sub["status"] == "canceled"


def amounts(invoice: Document) -> list[int]:
    return [line["amount_minor"] for line in invoice.get("lines", [])]


def upgrade_mid_month(doc: Document) -> None:
    sub = only_subscription(doc)
    first, change, april = sub["invoices"]
    assert (first["amount_paid_minor"], april["amount_paid_minor"]) == (900, 2900)
    # 16 days (less 30 s) of 31 left: -464.51 -> -465 and +1496.73 -> +1497, charged at once.
    assert amounts(change) == [-465, 1497]
    assert change["amount_paid_minor"] == 1032 and change["period_start"].startswith("2032-03-16")
    assert "lines" not in first  # a plain renewal reads as before


def downgrade_at_period_end(doc: Document) -> None:
    sub = only_subscription(doc)
    assert [i["amount_due_minor"] for i in sub["invoices"]] == [2900, 900, 900]
    scheduled, second = doc["actions"]
    assert scheduled["outcome"] == "applied" and "(pending)" in scheduled["detail"]
    assert second["outcome"] == "refused" and "already has a change pending" in second["detail"]


def monthly_to_annual(doc: Document) -> None:
    now, at_renewal = doc["subscriptions"]
    assert amounts(now["invoices"][1]) == [-1964, 29000]
    assert now["anchor"] == "2032-03-11T00:00:30Z"
    assert now["invoices"][-1]["period_start"] == "2033-03-11T00:00:30Z"
    assert [i["period_start"] for i in at_renewal["invoices"]] == [
        "2032-03-01T00:00:00Z",
        "2032-04-01T00:00:00Z",
        "2033-04-01T00:00:00Z",
    ]
    assert at_renewal["invoices"][1]["amount_due_minor"] == 29000


def seats(doc: Document) -> None:
    sub = only_subscription(doc)
    first, april, removal, may = sub["invoices"]
    assert first["amount_due_minor"] == 3 * 1200
    assert amounts(april) == [5 * 1200, -1858, 3097] and april["amount_due_minor"] == 7239
    assert amounts(removal) == [-2000, 800] and removal["amount_due_minor"] == 0
    assert (may["credit_applied_minor"], may["amount_due_minor"]) == (1200, 1200)
    assert [(b["kind"], b["amount_minor"]) for b in doc["balance"]] == [
        ("invoice_credit", 1200),
        ("applied_to_invoice", -1200),
    ]


FACTS: dict[str, Callable[[Document], None]] = {
    "upgrade-mid-month": upgrade_mid_month,
    "downgrade-at-period-end": downgrade_at_period_end,
    "monthly-to-annual": monthly_to_annual,
    "seats-added-and-removed": seats,
    "blocked-invoice-then-a-failing-new-card": blocked_then_failing_card,
    "leap-year-month-end": leap_year,
    "trial-then-monthly": trial,
    "dunning-recovered-by-card-update": recovered_by_card_update,
    "dunning-exhausted": exhausted,
    "cancel-at-period-end-during-dunning": cancel_during_dunning,
    "pause-and-resume-over-a-year": pause_resume,
    "annual-plan-ten-years": annual,
    "two-subscriptions-one-card": two_subscriptions,
}
