"""The plan catalog: validated plans written to the database."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy.orm import Session, sessionmaker

from billing.errors import InvalidInput
from billing.plans import Plan, parse_plan, validate_plan
from db.engine import unit_of_work
from db.repositories import plans as plans_repo


def create_plan(session_factory: sessionmaker[Session], raw: Mapping[str, object] | Plan) -> Plan:
    """Validate then insert a plan. Nothing is written unless every field is valid, and an
    existing code is refused (a plan's price never changes under its subscribers)."""
    plan = validate_plan(raw) if isinstance(raw, Plan) else parse_plan(raw)
    with unit_of_work(session_factory) as session:
        if plans_repo.get_plan(session, plan.code) is not None:
            raise InvalidInput(
                f"plan {plan.code!r} already exists; plans are immutable, create a new code",
                field="code",
            )
        plans_repo.upsert_plan(session, plan)
    return plan
