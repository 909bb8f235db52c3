"""The pending-signup sweeper's contracts: its workflow input and its one activity's input and
result. Every pending signup ends started or cleaned up: a signup whose workflow start failed
ambiguously, or whose process died between the database commit and the start, stays
``pending``; the sweeper starts it (idempotent by workflow id) or, when it can never start,
removes it with the card it attached (``billing.signup.SignupService.sweep_pending``)."""

from __future__ import annotations

from dataclasses import dataclass, field

#: One sweeper per namespace and task queue: the worker starts it under this id, and a second
#: start finds the running one.
SWEEPER_WORKFLOW_ID_PREFIX = "pending-signup-sweeper"
SWEEP_PENDING_SIGNUPS = "sweep_pending_signups"


def sweeper_workflow_id(task_queue: str) -> str:
    return f"{SWEEPER_WORKFLOW_ID_PREFIX}-{task_queue}"


@dataclass(frozen=True)
class PendingSignupSweepInput:
    #: Seconds between sweeps.
    interval_s: int = 60
    #: A pending signup younger than this (seconds) may still be starting; it is left alone.
    grace_s: int = 120
    #: Sweeps per run before continuing as new (keeps the history short).
    sweeps_per_run: int = 60


@dataclass(frozen=True)
class SweepPendingSignupsInput:
    grace_s: int = 120


@dataclass(frozen=True)
class SweepPendingSignupsResult:
    """Subscription ids: started (or found started), cleaned up, and left for the next sweep
    with the reason."""

    started: list[str] = field(default_factory=list)
    cleaned_up: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
