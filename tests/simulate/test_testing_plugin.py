"""The pytest plugin as a user meets it: a separate project whose tests use only the
documented fixtures (docs/testing-plugin.md), run by pytest in a subprocess."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = '''
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from billing.testing.cards import SUCCEEDS

ANNUAL_WITH_FAILING_CARD = textwrap.dedent("""
    start: 2032-01-01T09:00
    timezone: America/Chicago
    subscriptions:
      - plan: pro-annual
    timeline:
      - at: 2032-12-15
        action: card_starts_failing
    horizon: 2033-02-01
""")


def test_my_annual_plan_written_off_when_the_card_fails(run_scenario):
    timeline = run_scenario(ANNUAL_WITH_FAILING_CARD)
    sub = timeline.subscription()
    assert [i.status for i in sub.invoices] == ["paid", "uncollectible"]
    assert len(sub.invoices[1].attempts) == 8
    assert sub.statuses() == ["active", "past_due", "canceled"]


def test_a_scenario_file(run_scenario, tmp_path):
    path = tmp_path / "weekly.yaml"
    path.write_text(
        "start: 2032-05-03T08:00\\n"
        "subscriptions: [{plan: team-weekly}]\\n"
        "horizon: 2032-05-31T08:00\\n"
    )
    timeline = run_scenario(path)
    assert len(timeline.subscription().invoices) == 5  # the horizon is inclusive
    assert timeline.to_dict()["schema_version"] == 1


@pytest.mark.asyncio
async def test_with_the_harness(billing_harness):
    now = await billing_harness.now()
    anchor = now.replace(second=0, microsecond=0) + timedelta(days=1)
    sub = await billing_harness.signup("basic-monthly", card=SUCCEEDS, billing_anchor_at=anchor)
    await billing_harness.advance_to(anchor + timedelta(days=70))
    invoices = billing_harness.snapshot(sub.subscription_id).invoices
    assert [i.amount_paid_minor for i in invoices] == [900, 900, 900]
'''


def plugin_args() -> list[str]:
    """Load the plugin explicitly unless it is registered (the pytest11 entry point)."""
    registered = any(e.value == "billing.testing.plugin" for e in entry_points(group="pytest11"))
    return [] if registered else ["-p", "billing.testing.plugin"]


def test_a_user_project_runs_its_tests_with_the_plugin_s_fixtures(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_my_plans=USER_TESTS)
    result = pytester.runpytest_subprocess(*plugin_args(), "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_a_failing_expectation_fails_the_user_s_test(pytester: pytest.Pytester) -> None:
    # The fixtures report what happened; they do not make tests pass on their own.
    pytester.makepyfile(
        test_wrong="""
        def test_wrong(run_scenario):
            timeline = run_scenario({
                "start": "2032-01-01T09:00",
                "subscriptions": [{"plan": "basic-monthly"}],
                "horizon": "2032-03-15",
            })
            assert len(timeline.subscription().invoices) == 2
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args(), "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert 3 == 2*"])
