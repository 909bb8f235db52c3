"""The shared schedule of provider requests (``billing.pacing``): a ring of slots per paced
queue, each taken (and stamped) or stamped again by one atomic statement, so any number of
workers, threads and processes share it without a lock of ours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    case,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.models import PROVIDER_PACING_SLOTS

__all__ = ["Held", "Outlook", "create_slots", "hold_slot", "outlook", "restamp"]

_S = PROVIDER_PACING_SLOTS.c


@dataclass(frozen=True)
class Held:
    """A slot taken for one request: ``at`` is its planned instant (Unix seconds on the
    schedule's clock), already stamped, the slot next free a reuse after it; ``now`` the clock
    when it was taken. Nobody else takes the slot until the hold lapses, a lease after ``at``:
    until then its holder alone may stamp it again (``restamp``)."""

    slot: int
    at: float
    now: float

    @property
    def wait_s(self) -> float:
        return max(0.0, self.at - self.now)


@dataclass(frozen=True)
class Outlook:
    """Why no slot could be held, in the schedule's clock: ``now``, the soonest an unheld slot
    comes free (None: every slot is held), the soonest a hold lapses (None: none is held),
    and how many of the ring's slots exist."""

    now: float
    soonest_unheld: float | None
    soonest_lapse: float | None
    slots: int


def _now(session: Session) -> ColumnElement[Any]:
    """Now, in Unix seconds: the database server's own clock on PostgreSQL (one clock for
    every worker, whatever theirs say); this machine's on SQLite (a file on one machine), read
    by SQLite when the statement runs, i.e. once it holds the write lock (to the millisecond):
    a time taken before the statement was sent would be stale by however long it waited for
    the lock, and a slot stamped then would be stamped in the past."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", func.clock_timestamp())
    # julianday('now') counts days from noon, 24 November 4714 BC; the Unix epoch is day
    # 2440587.5 of it.
    return (func.julianday("now") - 2440587.5) * 86400.0


def _later(session: Session, a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.greatest(a, b)
    return func.max(a, b)  # SQLite's scalar max of its arguments


def _unheld(now: ColumnElement[Any]) -> ColumnElement[bool]:
    """Not held, or held past its lease (its holder gone)."""
    return or_(_S.held_by.is_(None), _S.held_until < now)


def hold_slot(
    session: Session,
    name: str,
    *,
    count: int,
    reuse_s: float,
    gap_s: float,
    token: str,
    max_wait_s: float,
    lease_s: float,
) -> Held | None:
    """Take the slot of ring ``name`` (its first ``count``) that comes free soonest and plan
    its request there, but no sooner than ``gap_s`` after the ring's latest plan up to a
    ring's spread beyond there, if that is within ``max_wait_s``. The plan is stamped at
    once (the slot next free ``reuse_s`` after it) and the slot held for ``token`` until the
    plan plus ``lease_s``, so that a holder late for its plan may stamp it again. None,
    taking nothing, if every slot is held or the plan is further away (``outlook`` says
    which). One UPDATE: on PostgreSQL the choice skips rows other transactions are taking, so
    concurrent callers take different slots."""
    now = _now(session)
    soonest = (
        select(_S.slot)
        .where(_S.name == name, _S.slot < count, _unheld(now))
        .order_by(_S.free_at, _S.slot)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    # The plan: the slot's own instant (or now), but ``gap_s`` after the ring's latest plan up
    # to a ring's spread (``count * gap_s``) beyond it. Plans later than that are left out: a
    # slot held for a second ahead (every free one was being taken by someone else) must not
    # push the free slots' holders after it.
    base = _later(session, _S.free_at, now)
    ring = PROVIDER_PACING_SLOTS.alias("ring")
    prior_plan = (
        select(func.max(ring.c.planned_at))
        .where(
            ring.c.name == name,
            ring.c.slot < count,
            ring.c.planned_at < base + count * gap_s,
        )
        .scalar_subquery()
    )
    plan = _later(session, base, func.coalesce(prior_plan + gap_s, base))
    row = session.execute(
        update(PROVIDER_PACING_SLOTS)
        .where(
            _S.name == name,
            _S.slot == soonest,
            _unheld(now),
            plan - now <= max_wait_s,
        )
        .values(
            free_at=plan + reuse_s,
            planned_at=plan,
            held_by=token,
            held_until=plan + lease_s,
        )
        .returning(_S.slot, _S.free_at, now)
    ).first()
    if row is None:
        return None
    # The plan as the slot's next use counts it: PostgreSQL reads clock_timestamp() afresh
    # for each mention, so ``planned_at`` may be some microseconds after it.
    return Held(slot=int(row[0]), at=float(row[1]) - reuse_s, now=float(row[2]))


def restamp(session: Session, name: str, *, slot: int, token: str, reuse_s: float) -> float | None:
    """For a request that leaves later than its planned instant: stamp held ``slot`` now, its
    next use ``reuse_s`` after now. Returns the stamp; None if the hold is lost (its lease ran
    out and another request took the slot: the request must take a slot afresh)."""
    now = _now(session)
    row = session.execute(
        update(PROVIDER_PACING_SLOTS)
        .where(_S.name == name, _S.slot == slot, _S.held_by == token)
        .values(free_at=_later(session, _S.free_at, now + reuse_s), planned_at=now)
        .returning(_S.free_at)
    ).first()
    # From the stored instant, not a returned clock: PostgreSQL reads clock_timestamp()
    # afresh for each mention, so a RETURNING one is a few microseconds after SET's.
    return None if row is None else float(row[0]) - reuse_s


def outlook(session: Session, name: str, *, count: int) -> Outlook:
    """The ring's state, for a request that could not hold a slot."""
    now = _now(session)
    unheld = _unheld(now)
    row = session.execute(
        select(
            now,
            func.min(case((unheld, _S.free_at))),
            func.min(case((unheld, None), else_=_S.held_until)),
            func.count(),
        ).where(_S.name == name, _S.slot < count)
    ).one()
    return Outlook(
        now=float(row[0]),
        soonest_unheld=None if row[1] is None else float(row[1]),
        soonest_lapse=None if row[2] is None else float(row[2]),
        slots=int(row[3]),
    )


def create_slots(session: Session, name: str, *, count: int) -> None:
    """Create ring ``name``'s missing slots below ``count``, each free from now (a slot made
    by another worker meanwhile is left as it is)."""
    values = [
        {"name": name, "slot": slot, "free_at": 0.0, "planned_at": 0.0} for slot in range(count)
    ]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement: Any = pg_insert(PROVIDER_PACING_SLOTS).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite_insert(PROVIDER_PACING_SLOTS).on_conflict_do_nothing()
    else:
        statement = insert(PROVIDER_PACING_SLOTS)
    for start in range(0, count, 500):
        session.execute(statement, values[start : start + 500])
