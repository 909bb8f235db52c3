"""The catalog, listing and change commands of the CLI against a running harness: plans from a
YAML file (all or nothing), customers and subscriptions at 80 columns with whole ids,
pause/resume and a plan change with its preview."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from datetime import timedelta
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from billing import cli
from billing.testing.cards import SUCCEEDS
from billing.testing.harness import BillingHarness
from billing.testing.localstripe import LocalStripe
from db.engine import unit_of_work
from db.repositories import plans as plans_repo

PLANS_YAML = """
plans:
  - code: seats-monthly
    name: Seats (monthly)
    amount_minor: 1000
    currency: USD
    interval: month
  - code: seats-annual
    name: Seats (annual)
    amount_minor: 10000
    currency: USD
    interval: year
"""


def runner_env(harness: BillingHarness, localstripe: LocalStripe) -> dict[str, str]:
    return {
        "BILLING_TEMPORAL_ADDRESS": harness.client.service_client.config.target_host,
        "BILLING_TEMPORAL_CONNECT_TIMEOUT_S": "0",
        "BILLING_DATABASE_URL": harness.database_url,
        "BILLING_STRIPE_API_BASE": localstripe.url,
        "BILLING_TASK_QUEUE": harness.task_queue,
        "BILLING_PAYMENTS_TASK_QUEUE": harness.payments_task_queue,
        "COLUMNS": "80",
    }


async def run(env: dict[str, str], *args: str) -> Result:
    return await asyncio.to_thread(
        lambda: CliRunner().invoke(cli.app, list(args), env=env, catch_exceptions=False)
    )


async def test_plans_from_a_file_listings_and_changes_from_the_cli(
    harness: BillingHarness, localstripe: LocalStripe, tmp_path: Path
) -> None:
    env = runner_env(harness, localstripe)
    good = tmp_path / "plans.yaml"
    good.write_text(PLANS_YAML)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        PLANS_YAML.replace(
            "currency: USD\n    interval: year", "currency: XYZ\n    interval: year"
        ).replace("seats-", "more-")
    )

    refused = await run(env, "plans", "create", str(bad))
    assert refused.exit_code == 2 and "plans[1].currency" in refused.output
    with unit_of_work(harness.session_factory) as session:
        assert plans_repo.get_plan(session, "more-monthly") is None  # nothing half-written

    created = await run(env, "plans", "create", str(good))
    assert created.exit_code == 0, created.output
    assert "created   seats-monthly" in created.output
    again = await run(env, "plans", "create", str(good))
    assert "unchanged seats-annual" in again.output
    archived = await run(env, "plans", "archive", "seats-annual")
    assert archived.exit_code == 0
    listed = await run(env, "plans", "list", "--archived")
    assert "seats-annual" in listed.output and "seats-monthly" not in listed.output

    sub = await harness.signup("seats-monthly", card=SUCCEEDS)
    sub_id = sub.subscription_id
    await harness.wait_for(sub_id, lambda v: v.invoices_issued == 1 and not v.open_invoice)
    await harness.advance(timedelta(days=10))

    customers = await run(env, "customers", "list")
    assert sub.customer_id in customers.output  # whole, on one line, at 80 columns
    shown = await run(env, "customers", "show", sub.customer_id)
    assert "visa 4242" in shown.output and sub_id in shown.output
    subs = await run(env, "subscriptions", "list", "--plan", "seats-monthly")
    assert sub_id in subs.output
    assert all(len(line) <= 80 for line in subs.output.splitlines())

    preview = await run(env, "subscriptions", "change-plan", sub_id, "--quantity", "3", "--preview")
    assert preview.exit_code == 0, preview.output
    # Priced by the workflow at the service's time (the test server's clock, days ahead of
    # this machine's): exactly what the change then bills.
    subtotal = re.search(r"seats-monthly x 3; subtotal (-?\d+) USD", preview.output)
    assert subtotal is not None, preview.output
    changed = await run(env, "subscriptions", "change-plan", sub_id, "--quantity", "3")
    assert changed.exit_code == 0, changed.output
    assert "now seats-monthly x 3" in changed.output
    due = re.search(r"\((open|paid), (\d+) due\)", changed.output)
    assert due is not None and int(due.group(2)) > 0
    assert int(subtotal.group(1)) == int(due.group(2)), (preview.output, changed.output)
    exported = await run(env, "invoices", "list", "--subscription-id", sub_id, "--csv", "--lines")
    assert exported.exit_code == 0, exported.output
    rows = list(csv.DictReader(io.StringIO(exported.output)))
    assert [(r["kind"], r["quantity"]) for r in rows] == [
        ("subscription", "1"),
        ("proration", "1"),
        ("proration", "3"),
    ]
    change_rows = [r for r in rows if r["kind"] == "proration"]
    assert int(change_rows[0]["amount_minor"]) < 0 < int(change_rows[1]["amount_minor"])
    assert sum(int(r["amount_minor"]) for r in change_rows) == int(due.group(2))
    assert {r["invoice_amount_due_minor"] for r in change_rows} == {due.group(2)}
    no_csv = await run(env, "invoices", "list", "--lines")
    assert no_csv.exit_code == 2 and "--lines goes with --csv" in no_csv.output
    refused_change = await run(
        env, "subscriptions", "change-plan", sub_id, "--plan", "seats-annual"
    )
    assert refused_change.exit_code == 2 and "archived" in refused_change.output
    await harness.wait_for(sub_id, lambda v: v.open_invoice is None)

    paused = await run(env, "subscriptions", "pause", sub_id)
    assert paused.exit_code == 0 and "paused" in paused.output
    twice = await run(env, "subscriptions", "pause", sub_id)
    assert twice.exit_code == 1 and "already paused" in twice.output
    resumed = await run(env, "subscriptions", "resume", sub_id)
    assert resumed.exit_code == 0 and "active" in resumed.output


def test_migrate_seeds_demo_plans_only_in_dev(tmp_path: Path) -> None:
    from db.engine import make_engine, make_session_factory

    for environment, expected in (("production", 0), ("test", 0), ("dev", 5)):
        url = f"sqlite:///{tmp_path / environment}.db"
        result = CliRunner().invoke(
            cli.app,
            ["migrate"],
            env={"BILLING_DATABASE_URL": url, "BILLING_ENVIRONMENT": environment},
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        engine = make_engine(url)
        try:
            with unit_of_work(make_session_factory(engine)) as session:
                assert len(plans_repo.list_plans(session)) == expected, environment
        finally:
            engine.dispose()
