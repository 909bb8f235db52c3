"""The pending-signup sweep as an activity (run by ``PendingSignupSweepWorkflow``). Async: it
starts subscription workflows through the worker's own Temporal client."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity

from billing.clock import Clock
from billing.payments import PaymentGateway
from billing.signup import SignupService
from billing.signup_sweep import (
    SWEEP_PENDING_SIGNUPS,
    SweepPendingSignupsInput,
    SweepPendingSignupsResult,
)


class SignupSweepActivities:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        gateway: PaymentGateway,
        clock: Clock,
        *,
        task_queue: str,
        payments_task_queue: str | None,
    ) -> None:
        """``task_queue``/``payments_task_queue``: where the subscription workflows it starts
        run, as the API's signups start them."""
        self.session_factory = session_factory
        self.gateway = gateway
        self.clock = clock
        self.task_queue = task_queue
        self.payments_task_queue = payments_task_queue

    @activity.defn(name=SWEEP_PENDING_SIGNUPS)
    async def sweep_pending_signups(
        self, input: SweepPendingSignupsInput
    ) -> SweepPendingSignupsResult:
        signups = SignupService(
            self.session_factory,
            self.gateway,
            activity.client(),
            task_queue=self.task_queue,
            payments_task_queue=self.payments_task_queue,
            clock=self.clock,
        )
        report = await signups.sweep_pending(older_than=timedelta(seconds=input.grace_s))
        return SweepPendingSignupsResult(
            started=report.started,
            cleaned_up=report.cleaned_up,
            failed=[f"{subscription_id}: {reason}" for subscription_id, reason in report.failed],
        )
