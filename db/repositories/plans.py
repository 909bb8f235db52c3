"""The plan catalog, read and written as billing.plans.Plan."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.calendar import IntervalUnit
from billing.dunning import DunningPolicy, FinalAction
from billing.plans import Plan
from db.models import PLANS
from db.repositories._rows import select_rows, utcnow


def upsert_plan(
    session: Session, plan: Plan, *, active: bool = True, now: datetime | None = None
) -> None:
    """Create the plan or overwrite it by code. Existing subscriptions keep their snapshot."""
    values: dict[str, Any] = {
        "code": plan.code,
        "name": plan.name,
        "amount_minor": plan.amount_minor,
        "currency": plan.currency,
        "interval": plan.interval,
        "interval_count": plan.interval_count,
        "trial_days": plan.trial_days,
        "dunning_retry_offsets_days": list(plan.dunning.retry_offsets_days),
        "dunning_final_action": plan.dunning.final_action,
        "active": active,
    }
    # INSERT ... ON CONFLICT DO UPDATE is atomic on both backends, where select-then-write
    # would race with a concurrent seed. Both dialects spell it the same way.
    row = {**values, "created_at": now or utcnow()}
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(PLANS).values(row)
        session.execute(pg.on_conflict_do_update(index_elements=[PLANS.c.code], set_=values))
    else:
        lite = sqlite.insert(PLANS).values(row)
        session.execute(lite.on_conflict_do_update(index_elements=[PLANS.c.code], set_=values))


def get_plan(session: Session, code: str) -> Plan | None:
    row = session.execute(select_rows(PLANS).where(PLANS.c.code == code)).first()
    return None if row is None else _plan(row)


def list_plans(session: Session, *, active_only: bool = False) -> list[Plan]:
    """Every plan, by code (only those open for new signups if ``active_only``)."""
    statement = select_rows(PLANS).order_by(PLANS.c.code)
    if active_only:
        statement = statement.where(PLANS.c.active.is_(True))
    return [_plan(row) for row in session.execute(statement)]


def _plan(row: Any) -> Plan:
    # Rows were validated when written (billing.catalog, signup); reading them does not
    # validate again, so a plan stays readable whatever a later library says about its
    # currency. Signup validates the plan it sells (billing.signup).
    return Plan(
        code=row.code,
        name=row.name,
        amount_minor=row.amount_minor,
        currency=row.currency,
        interval=IntervalUnit(row.interval),
        interval_count=row.interval_count,
        trial_days=row.trial_days,
        dunning=DunningPolicy(
            retry_offsets_days=list(row.dunning_retry_offsets_days),
            final_action=FinalAction(row.dunning_final_action),
        ),
    )
