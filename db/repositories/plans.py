"""The plan catalog, read and written as billing.plans.Plan."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.calendar import IntervalUnit
from billing.dunning import DunningPolicy, FinalAction
from billing.plans import Plan
from billing.records import CatalogPlan
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


def insert_plan(session: Session, plan: Plan, *, now: datetime) -> tuple[CatalogPlan, bool]:
    """Insert the plan once by code: ``(stored, True)``, or the plan already stored under that
    code and False (a retry, or a concurrent create that won). Never overwrites: prices are
    immutable, a new price is a new code."""
    row = {
        "code": plan.code,
        "name": plan.name,
        "amount_minor": plan.amount_minor,
        "currency": plan.currency,
        "interval": plan.interval,
        "interval_count": plan.interval_count,
        "trial_days": plan.trial_days,
        "dunning_retry_offsets_days": list(plan.dunning.retry_offsets_days),
        "dunning_final_action": plan.dunning.final_action,
        "active": True,
        "created_at": now,
    }
    # ON CONFLICT DO NOTHING is atomic on both backends: twenty concurrent creates of one code
    # insert it once, and the others read what won.
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    inserted = session.execute(
        insert(PLANS)
        .values(row)
        .on_conflict_do_nothing(index_elements=[PLANS.c.code])
        .returning(PLANS.c.code)
    ).scalar_one_or_none()
    stored = get_catalog_plan(session, plan.code)
    assert stored is not None
    return stored, inserted is not None


def get_catalog_plan(session: Session, code: str) -> CatalogPlan | None:
    row = session.execute(select_rows(PLANS).where(PLANS.c.code == code)).first()
    return None if row is None else _catalog(row)


def list_catalog(session: Session, *, active: bool | None = None) -> list[CatalogPlan]:
    """The catalog by code; ``active`` True/False keeps only plans open/closed to signups."""
    statement = select_rows(PLANS).order_by(PLANS.c.code)
    if active is not None:
        statement = statement.where(PLANS.c.active.is_(active))
    return [_catalog(row) for row in session.execute(statement)]


def is_active(session: Session, code: str) -> bool:
    """Whether the plan exists and takes new signups and changes to it."""
    return bool(
        session.execute(select(PLANS.c.active).where(PLANS.c.code == code)).scalar_one_or_none()
    )


def archive_plan(session: Session, code: str) -> CatalogPlan | None:
    """Close the plan to new signups (idempotent); None if there is no such plan. Existing
    subscriptions keep billing on their snapshot."""
    session.execute(update(PLANS).where(PLANS.c.code == code).values(active=False))
    return get_catalog_plan(session, code)


def _catalog(row: Any) -> CatalogPlan:
    return CatalogPlan(plan=_plan(row), active=bool(row.active), created_at=row.created_at)


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
