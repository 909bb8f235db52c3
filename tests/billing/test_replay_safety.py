"""Replay safety of the domain: what a running workflow recorded keeps decoding and keeps its
dates whatever the libraries and the host say later.

- A plan decodes from a recorded payload without being validated again, so a babel release
  whose CLDR data refuses the plan's currency cannot break a running subscription; the same
  babel still refuses the currency at every edge (validate_plan, parse_plan, the catalog).
- Zone rules come from the pinned tzdata package only: a host whose zone files say something
  else (PYTHONTZPATH, an older or newer system tzdata) does not move a billing date.
- When a deploy brings new zone rules, the invoiced period keeps its boundaries and the next
  one starts where it ends; the rules apply from there on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter

import billing.calendar
from billing.calendar import BillingPeriod, IntervalUnit, period
from billing.contracts import SubscriptionWorkflowInput
from billing.errors import InvalidCurrency, InvalidInput
from billing.money import currency_exponent
from billing.plans import DEMO_PLANS, find_plan, parse_plan, validate_plan
from billing.subscription import SubscriptionState, SubscriptionStatus
from tests.cldr import cldr_without

REPO = Path(__file__).resolve().parents[2]
HISTORIES = REPO / "tests" / "histories"
#: Recorded by the code before this change (v3) and by today's (top level); the run-2 inputs
#: are continue-as-new payloads.
RECORDED_INPUTS = {
    "v3/test_trial_then_monthly_from_trial_end_sqlite_-s0-run1.json": "USD",
    "test_feb_29_annual_anchor_bills_feb_28_in_common_years_sqlite_-s0-run2.json": "EUR",
    "test_ten_years_of_monthly_billing_continues_as_new_with_bounded_history_sqlite_-s0-run2"
    ".json": "USD",
}


def recorded_input(name: str) -> WorkflowHistory:
    path = HISTORIES / name
    return WorkflowHistory.from_json(path.stem, path.read_text())


async def decode_input(history: WorkflowHistory) -> SubscriptionWorkflowInput:
    started = history.events[0].workflow_execution_started_event_attributes
    [decoded] = await DataConverter.default.decode(
        list(started.input.payloads), [SubscriptionWorkflowInput]
    )
    assert isinstance(decoded, SubscriptionWorkflowInput)
    return decoded


@pytest.mark.parametrize(("name", "currency"), RECORDED_INPUTS.items(), ids=list(RECORDED_INPUTS))
async def test_a_recorded_payload_decodes_after_cldr_refuses_its_currency(
    name: str, currency: str
) -> None:
    history = recorded_input(name)
    before = await decode_input(history)
    assert before.state.plan.currency == currency

    with cldr_without(currency):
        # Today's babel would refuse the currency at an edge ...
        with pytest.raises(InvalidCurrency, match=f"unknown currency '{currency}'"):
            validate_plan(before.state.plan)
        with pytest.raises(InvalidCurrency):
            currency_exponent(currency)
        # ... but what a running workflow recorded decodes as it was.
        after = await decode_input(history)

    assert after == before
    assert after.state.plan.interval in IntervalUnit
    assert type(after.state.plan.interval) is IntervalUnit
    assert type(after.state.plan.dunning.final_action).__name__ == "FinalAction"


async def test_a_continue_as_new_payload_round_trips_under_a_cldr_that_refuses_it() -> None:
    # What the workflow writes when it continues as new, re-read by the next run after a
    # babel upgrade.
    state = (await decode_input(recorded_input(next(iter(RECORDED_INPUTS))))).state
    payloads = await DataConverter.default.encode([SubscriptionWorkflowInput(state=state)])

    with cldr_without(state.plan.currency):
        [decoded] = await DataConverter.default.decode(payloads, [SubscriptionWorkflowInput])

    assert decoded.state == state


def test_every_edge_still_refuses_a_currency_cldr_refuses() -> None:
    raw = {
        "code": "tokyo-gold",
        "name": "Tokyo gold",
        "amount_minor": 5000,
        "currency": "JPY",
        "interval": "month",
    }
    assert parse_plan(raw).currency == "JPY"
    demo = find_plan("tokyo-monthly", DEMO_PLANS)

    with cldr_without("JPY"):
        with pytest.raises(InvalidCurrency) as from_input:
            parse_plan(raw)
        with pytest.raises(InvalidCurrency):
            validate_plan(demo)

    assert from_input.value.field == "currency"
    assert from_input.value.message == (
        "unknown currency 'JPY'; use an ISO 4217 code such as 'USD', 'EUR' or 'JPY'"
    )


def test_validate_plan_normalizes_what_decoding_leaves_as_given() -> None:
    demo = find_plan("basic-monthly", DEMO_PLANS)
    raw = replace(demo, currency="usd", interval="month")  # type: ignore[arg-type]

    assert raw.currency == "usd"  # building a Plan checks and changes nothing
    assert validate_plan(raw) == demo
    with pytest.raises(InvalidInput, match="interval_count must be between 1 and 36"):
        validate_plan(replace(demo, interval_count=37))


# ------------------------------------------------------------------- zone source ----------

# Run in a fresh interpreter: the zone search path is read when zoneinfo is first imported.
PROBE = textwrap.dedent(
    """
    import json
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from billing.calendar import IntervalUnit, add_local_days, billing_date, resolve_timezone

    anchor = datetime(2027, 1, 15, 9, 0, tzinfo=UTC)  # 09:00 in London (GMT)
    host = ZoneInfo("Europe/London")
    ours = resolve_timezone("Europe/London")
    print(json.dumps({
        "host_offset_h": host.utcoffset(datetime(2027, 7, 1)).total_seconds() / 3600,
        "our_offset_h": ours.utcoffset(datetime(2027, 7, 1)).total_seconds() / 3600,
        "july": billing_date(anchor, "Europe/London", IntervalUnit.MONTH, 1, 6).isoformat(),
        "trial_end": add_local_days(anchor, "Europe/London", 180).isoformat(),
    }))
    """
)


def run_probe(tzpath: Path | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONTZPATH", "TZ")}
    if tzpath is not None:
        env["PYTHONTZPATH"] = str(tzpath)
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_billing_dates_ignore_a_host_zone_database_that_says_otherwise(tmp_path: Path) -> None:
    # A host zone database whose Europe/London is Tokyo's rules (+09:00, no DST).
    fake = tmp_path / "zoneinfo"
    (fake / "Europe").mkdir(parents=True)
    tokyo = resources.files("tzdata").joinpath("zoneinfo", "Asia", "Tokyo")
    with tokyo.open("rb") as src, (fake / "Europe" / "London").open("wb") as dst:
        shutil.copyfileobj(src, dst)

    on_fake_host = run_probe(fake)
    clean = run_probe(None)

    # The fake is really what the host's zoneinfo reads ...
    assert on_fake_host["host_offset_h"] == 9
    # ... and the calendar does not: London in July is BST, so 09:00 local is 08:00 UTC.
    assert on_fake_host["our_offset_h"] == 1
    assert on_fake_host["july"] == "2027-07-15T08:00:00+00:00"
    assert on_fake_host["trial_end"] == "2027-07-14T08:00:00+00:00"
    assert {k: v for k, v in on_fake_host.items() if k != "host_offset_h"} == {
        k: v for k, v in clean.items() if k != "host_offset_h"
    }


def test_the_zone_rules_are_the_pinned_tzdata_release() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()

    assert f'"tzdata=={version("tzdata")}"' in pyproject, (
        "pin tzdata exactly in pyproject.toml (README, 'Replay safety')"
    )


# ---------------------------------------------------- a zone-rule change mid-subscription --

LONDON_ANCHOR = datetime(2027, 1, 15, 9, 0, tzinfo=UTC)  # 09:00 GMT


def london_subscription() -> SubscriptionState:
    return SubscriptionState(
        subscription_id="sub_1",
        customer_id="cus_1",
        plan=find_plan("basic-monthly", DEMO_PLANS),
        timezone="Europe/London",
        started_at=LONDON_ANCHOR,
        anchor_at=LONDON_ANCHOR,
        status=SubscriptionStatus.ACTIVE,
    )


@pytest.fixture
def london_abolishes_dst() -> Iterator[None]:
    """A tzdata release in which London keeps GMT all year (Africa/Abidjan's rules), as a
    later deploy could bring: only a patch can produce it, the pinned release is what it is."""
    source = resources.files("tzdata").joinpath("zoneinfo", "Africa", "Abidjan")
    with source.open("rb") as tzif:
        gmt_all_year = ZoneInfo.from_file(tzif, key="Europe/London")
    real = billing.calendar._zone

    def zone(name: str) -> ZoneInfo:
        return gmt_all_year if name == "Europe/London" else real(name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(billing.calendar, "_zone", zone)
        yield


def test_new_zone_rules_start_at_the_end_of_the_invoiced_period(
    london_abolishes_dst: None,
) -> None:
    # Period 5 was invoiced under today's rules: 09:00 BST is 08:00 UTC.
    s = london_subscription()
    invoiced = BillingPeriod(
        index=5,
        start=datetime(2027, 6, 15, 8, 0, tzinfo=UTC),
        end=datetime(2027, 7, 15, 8, 0, tzinfo=UTC),
    )
    s.record_invoiced_period(invoiced, invoiced.start, invoiced.end)
    # The new rules alone would start period 6 an hour after period 5 ended.
    assert period(LONDON_ANCHOR, "Europe/London", IntervalUnit.MONTH, 1, 6).start == datetime(
        2027, 7, 15, 9, 0, tzinfo=UTC
    )

    assert s.next_period_index == 6
    assert s.period(5) == invoiced
    # No gap: the next period starts where the invoiced one ends, and ends by the new rules.
    assert s.next_billing_at == invoiced.end
    assert s.period(6) == BillingPeriod(
        index=6, start=invoiced.end, end=datetime(2027, 8, 15, 9, 0, tzinfo=UTC)
    )
    assert s.period(7).start == s.period(6).end
    assert s.end_of_paid_through() == invoiced.end


def test_the_invoice_s_recorded_boundaries_win_over_the_workflow_s_computation(
    london_abolishes_dst: None,
) -> None:
    # A replay on a worker with the new rules recomputes period 5 differently; the recorded
    # result of create_invoice (what the database stores) carries the boundaries invoiced.
    s = london_subscription()
    recomputed = s.period(5)
    stored_start = datetime(2027, 6, 15, 8, 0, tzinfo=UTC)
    stored_end = datetime(2027, 7, 15, 8, 0, tzinfo=UTC)
    assert (recomputed.start, recomputed.end) != (stored_start, stored_end)

    s.record_invoiced_period(recomputed, stored_start, stored_end)

    assert (s.current_period_start, s.current_period_end) == (stored_start, stored_end)
    assert s.period(6).start == stored_end


def test_state_recorded_before_the_period_index_existed_computes_every_period() -> None:
    s = dataclasses.replace(
        london_subscription(),
        next_period_index=6,
        current_period_start=datetime(2027, 6, 15, 8, 0, tzinfo=UTC),
        current_period_end=datetime(2027, 7, 15, 7, 0, tzinfo=UTC),  # deliberately off
    )

    assert s.current_period_index is None
    assert s.period(6) == period(LONDON_ANCHOR, "Europe/London", IntervalUnit.MONTH, 1, 6)
