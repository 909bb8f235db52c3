"""docs/proration.md cannot go stale: every worked example in it (a ``yaml proration-example``
block) is computed here through the same pure functions the workflow and the preview use
(``billing.plan_change.decide_change``, ``billing.proration.prorate``,
``billing.invoices.credit_notes_carried_over``), and the numbers the note shows must be the
numbers they give."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from billing.invoices import credit_notes_carried_over
from billing.plan_change import check_change, decide_change
from billing.plans import parse_plan
from billing.proration import Terms, prorate
from billing.subscription import OpenInvoice, SubscriptionState, SubscriptionStatus

DOC = Path(__file__).resolve().parents[2] / "docs" / "proration.md"
BLOCK = re.compile(r"```yaml proration-example\n(.*?)```", re.DOTALL)
#: Every rule the note must show with a worked example.
RULES = {
    "upgrade-now-always-invoice",
    "create-prorations",
    "proration-none",
    "downgrade-at-period-end",
    "monthly-to-annual",
    "quantity-change",
    "change-during-dunning",
    "jpy-rounding",
    "kwd-rounding",
    "credit-cap",
}


def examples() -> list[dict[str, Any]]:
    found = [yaml.safe_load(block) for block in BLOCK.findall(DOC.read_text())]
    return found


def instant(value: object) -> datetime:
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed.astimezone(UTC)


def plan(raw: dict[str, Any]) -> Any:
    return parse_plan({"name": raw["code"], **raw})


def test_the_note_has_one_worked_example_per_rule() -> None:
    rules = [e["rule"] for e in examples()]
    assert sorted(rules) == sorted(RULES), rules


def decided(example: dict[str, Any]) -> dict[str, Any]:
    """What the workflow decides for the example's subscription and change."""
    sub = example["subscription"]
    current = plan(sub["plan"])
    start, end = (instant(x) for x in sub["period"])
    state = SubscriptionState(
        subscription_id="sub_doc",
        customer_id="cus_doc",
        plan=current,
        timezone="UTC",
        started_at=start,
        anchor_at=start,
        status=SubscriptionStatus(sub.get("status", "active")),
        next_period_index=1,
        current_period_index=0,
        current_period_start=start,
        current_period_end=end,
        quantity=sub.get("quantity", 1),
        terms_billed_minor=sub.get("billed_minor"),
    )
    unpaid = sub.get("unpaid_invoice")
    if unpaid is not None:
        state.open_invoice = OpenInvoice(
            invoice_id="in_doc",
            number="DOC-0001",
            period_index=0,
            period_start=start,
            period_end=end,
            amount_minor=unpaid["amount_due_minor"],
            currency=current.currency,
            attempts=1,
            first_failure_at=start,
        )
    change = example["change"]
    request = check_change(
        state,
        plan=plan(change["plan"]) if "plan" in change else None,
        quantity=change.get("quantity"),
        effective=change.get("effective"),
        proration=change.get("proration"),
        change_id="doc",
    )
    decision = decide_change(state, request, instant(example["at"]))
    out: dict[str, Any] = {
        "effective": request.effective.value,
        "lines": [line.amount_minor for line in decision.lines],
        "invoiced_now": decision.invoice_now,
        "carried_to_renewal": decision.carry_lines,
    }
    if decision.scheduled:
        out["takes_effect_at"] = decision.effective_at
    if decision.new_anchor_at is not None:
        out["new_anchor"] = decision.new_anchor_at
        out["new_period_end"] = decision.new_period_end
    if unpaid is not None:
        # The unpaid renewal is voided and billed again with the lines, less its credit notes.
        out["adjusts_unpaid_invoice"] = decision.adjust_open_invoice
        rebilled = [current.amount_minor * state.quantity, *out["lines"]]
        carried = credit_notes_carried_over(unpaid.get("credited_minor", 0), sum(rebilled))
        out["amount_due_minor"] = sum(rebilled) - carried
    elif decision.invoice_now:
        out["amount_due_minor"] = max(0, sum(out["lines"]))
    return out


def prorated(example: dict[str, Any]) -> dict[str, Any]:
    """``billing.proration.prorate`` alone (rounding and the credit cap)."""
    old, new = example["old"], example["new"]
    start, end = (instant(x) for x in example["period"])
    currency = example["currency"]
    p = prorate(
        old=Terms("old", "Old", old["unit_amount_minor"], old.get("quantity", 1), currency),
        new=Terms("new", "New", new["unit_amount_minor"], new.get("quantity", 1), currency),
        period_start=start,
        period_end=end,
        at=instant(example["at"]),
        credit_cap_minor=example["credit_cap_minor"],
        change_id="doc",
    )
    return {
        "remaining_s": p.remaining_s,
        "period_s": p.period_s,
        "credit_minor": p.credit_minor,
        "charge_minor": p.charge_minor,
        "lines": [line.amount_minor for line in p.lines],
    }


@pytest.mark.parametrize("example", examples(), ids=lambda e: str(e["rule"]))
def test_each_worked_example_is_what_the_code_computes(example: dict[str, Any]) -> None:
    got = prorated(example) if "old" in example else decided(example)
    expected = {
        key: instant(value) if isinstance(value, datetime) else value
        for key, value in example["expect"].items()
    }
    assert {key: got[key] for key in expected} == expected, example["rule"]
