"""The plan catalog: validated plans written to the database, read back, archived.

Plans are immutable: a code names one price for good. Creating a plan whose code exists with
the very same terms answers the stored plan (a retried request is harmless); other terms are
refused, since a new price is a new plan code. Archiving closes a plan to new signups and to
changes onto it; existing subscriptions keep billing on their snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from billing.clock import Clock, SystemClock
from billing.errors import ChangeRefused, InvalidInput, NotFound
from billing.plans import Plan, parse_plan, validate_plan
from billing.records import CatalogPlan
from db.engine import unit_of_work
from db.repositories import plans as plans_repo

#: Most plans one ``billing plans create FILE`` may hold.
MAX_PLANS_PER_FILE = 500


@dataclass(frozen=True, slots=True)
class CreatedPlan:
    entry: CatalogPlan
    #: False: the same plan was already in the catalog (nothing was written).
    created: bool


def _same_terms(a: Plan, b: Plan) -> bool:
    return a == b


def _insert(session: Session, plan: Plan, clock: Clock) -> CreatedPlan:
    stored, inserted = plans_repo.insert_plan(session, plan, now=clock.now())
    if not inserted and not _same_terms(stored.plan, plan):
        raise ChangeRefused(
            f"plan {plan.code!r} already exists with other terms "
            f"({stored.plan.amount_minor} {stored.plan.currency} per "
            f"{stored.plan.interval_count} {stored.plan.interval.value}); prices are "
            "immutable: create the new price under a new plan code",
            field="code",
        )
    return CreatedPlan(stored, inserted)


def create_plan(
    session_factory: sessionmaker[Session],
    raw: Mapping[str, object] | Plan,
    *,
    clock: Clock | None = None,
) -> Plan:
    """Validate then insert a plan (see the module docstring for an existing code)."""
    return create_plans(session_factory, [raw], clock=clock)[0].entry.plan


def create_plans(
    session_factory: sessionmaker[Session],
    raws: Sequence[Mapping[str, object] | Plan],
    *,
    clock: Clock | None = None,
) -> list[CreatedPlan]:
    """Validate every plan, then insert them in one transaction: a bad plan anywhere writes
    none of them. Errors name the plan's position (``plans[2].currency``)."""
    clock = clock or SystemClock()
    if not raws:
        raise InvalidInput("no plans given; give one plan object or a list of them")
    if len(raws) > MAX_PLANS_PER_FILE:
        raise InvalidInput(f"at most {MAX_PLANS_PER_FILE} plans at once; got {len(raws)}")
    plans: list[Plan] = []
    for index, raw in enumerate(raws):
        try:
            plans.append(validate_plan(raw) if isinstance(raw, Plan) else parse_plan(raw))
        except InvalidInput as invalid:
            if len(raws) == 1:
                raise
            where = f"plans[{index}]" + (f".{invalid.field}" if invalid.field else "")
            raise type(invalid)(f"{where}: {invalid.message}", field=where) from None
    codes = [p.code for p in plans]
    duplicated = sorted({c for c in codes if codes.count(c) > 1})
    if duplicated:
        raise InvalidInput(f"plan code {duplicated[0]!r} is given twice", field="code")
    with unit_of_work(session_factory) as session:
        return [_insert(session, plan, clock) for plan in plans]


def get_plan(session_factory: sessionmaker[Session], code: str) -> CatalogPlan:
    with unit_of_work(session_factory) as session:
        entry = plans_repo.get_catalog_plan(session, code)
        if entry is None:
            raise NotFound(_unknown(session, code), field="code")
        return entry


def list_plans(
    session_factory: sessionmaker[Session], *, active: bool | None = None
) -> list[CatalogPlan]:
    with unit_of_work(session_factory) as session:
        return plans_repo.list_catalog(session, active=active)


def archive_plan(session_factory: sessionmaker[Session], code: str) -> CatalogPlan:
    """Close the plan to new signups (archiving twice is harmless)."""
    with unit_of_work(session_factory) as session:
        entry = plans_repo.archive_plan(session, code)
        if entry is None:
            raise NotFound(_unknown(session, code), field="code")
        return entry


def _unknown(session: Session, code: str) -> str:
    known = ", ".join(p.plan.code for p in plans_repo.list_catalog(session)) or "(none)"
    return f"unknown plan {code!r}; known plans: {known}"
