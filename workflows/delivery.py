"""Delivery workflows: customer mails and events for the business.

- ``DeliveryDispatcherWorkflow`` (one per delivery task queue, started by every worker and
  found running by the others): every few seconds, or at once when signalled ``wake``, it
  claims pending notices and event streams from the database and starts one delivery
  workflow for each (by a deterministic id, so a running one is never started twice), and
  every few minutes it sweeps for due reminders. It never fails: an activity error is retried
  by the next look.
- ``NotificationDeliveryWorkflow`` (one per notice): sends it, Temporal retrying transient
  failures with exponential backoff for up to 2 days, then marks it failed with the reason.
- ``EventStreamWorkflow`` (one per endpoint and subscription): sends that subscription's
  pending events to that endpoint one at a time in sequence order, each retried with
  exponential backoff for up to 3 days; the next is not sent before the previous one was
  accepted. After 3 days the endpoint is disabled. Streams are separate workflows, so a slow
  or dead endpoint delays only its own streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from billing.delivery import (
        DELIVERY_FIRST_RETRY,
        DELIVERY_GIVE_UP,
        DELIVERY_MAX_RETRY_INTERVAL,
        MAIL_FIRST_RETRY,
        MAIL_GIVE_UP,
        MAIL_MAX_RETRY_INTERVAL,
        ClaimedNotifications,
        ClaimedStreams,
        ClaimInput,
        DeliveryActivity,
        DispatcherInput,
        EventStreamInput,
        GiveUpNotificationInput,
        GiveUpStreamInput,
        NextDeliveryResult,
        NotificationDeliveryInput,
        NotificationDeliveryResult,
        PostEventInput,
        PostEventResult,
        StreamRef,
        SweepRemindersInput,
        SweepRemindersResult,
        notice_workflow_id,
        stream_workflow_id,
    )

_DB_STEP = timedelta(seconds=30)
#: The dispatcher looks again at once after a full batch (runs before it slept first).
DRAIN_FULL_BATCHES_PATCH = "dispatcher-drain-full-batches"
#: A database step that fails is retried by the next look (dispatcher) or a few times here.
_DB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=5)


def _reason(error: ActivityError) -> str:
    cause = error.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or error)


@workflow.defn(name="DeliveryDispatcherWorkflow")
class DeliveryDispatcherWorkflow:
    def __init__(self) -> None:
        self._woken = False

    @workflow.signal
    def wake(self) -> None:
        """Look at the outbox and the events now (e.g. right after writing some)."""
        self._woken = True

    @workflow.run
    async def run(self, input: DispatcherInput) -> None:
        since_sweep = input.reminders_every_s  # sweep on the first look
        for _ in range(input.looks_per_run):
            self._woken = False
            claim = ClaimInput(limit=input.batch, redispatch_after_s=input.redispatch_after_s)
            if since_sweep >= input.reminders_every_s:
                since_sweep = 0.0
                try:
                    await workflow.execute_activity(
                        DeliveryActivity.SWEEP_REMINDERS,
                        SweepRemindersInput(),
                        result_type=SweepRemindersResult,
                        start_to_close_timeout=timedelta(minutes=2),
                        retry_policy=_DB_RETRY,
                    )
                except ActivityError as error:
                    workflow.logger.warning("reminder sweep failed: %s", error)
            try:
                notices: ClaimedNotifications = await workflow.execute_activity(
                    DeliveryActivity.CLAIM_NOTIFICATIONS,
                    claim,
                    result_type=ClaimedNotifications,
                    start_to_close_timeout=_DB_STEP,
                    retry_policy=_DB_RETRY,
                )
                streams: ClaimedStreams = await workflow.execute_activity(
                    DeliveryActivity.CLAIM_EVENT_STREAMS,
                    claim,
                    result_type=ClaimedStreams,
                    start_to_close_timeout=_DB_STEP,
                    retry_policy=_DB_RETRY,
                )
            except ActivityError as error:
                workflow.logger.warning("claiming deliveries failed: %s", error)
            else:
                await asyncio.gather(
                    *(self._start_notice(input, n) for n in notices.notification_ids),
                    *(self._start_stream(input, s) for s in streams.streams),
                )
                full = (
                    len(notices.notification_ids) >= input.batch
                    or len(streams.streams) >= input.batch
                )
                # A full batch means more are waiting: look again now, not after the
                # interval (a burst of 200 mails used to wait one poll per 100).
                if full and workflow.patched(DRAIN_FULL_BATCHES_PATCH):
                    continue
            if not self._woken:
                started = workflow.time()
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(lambda: self._woken, timeout=input.interval_s)
                since_sweep += workflow.time() - started
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(input)

    async def _start_notice(self, input: DispatcherInput, notification_id: str) -> None:
        # A running one (still delivering it) is found by its id.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await workflow.start_child_workflow(
                NotificationDeliveryWorkflow.run,
                NotificationDeliveryInput(notification_id, timeout_s=input.mail_timeout_s),
                id=notice_workflow_id(notification_id),
                task_queue=input.task_queue,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            )

    async def _start_stream(self, input: DispatcherInput, stream: StreamRef) -> None:
        # A running one takes the new events, in order, after the ones it is sending.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await workflow.start_child_workflow(
                EventStreamWorkflow.run,
                EventStreamInput(
                    stream.endpoint_id, stream.subscription_id, post_timeout_s=input.post_timeout_s
                ),
                id=stream_workflow_id(stream.endpoint_id, stream.subscription_id),
                task_queue=input.task_queue,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            )


@workflow.defn(name="NotificationDeliveryWorkflow")
class NotificationDeliveryWorkflow:
    @workflow.run
    async def run(self, input: NotificationDeliveryInput) -> NotificationDeliveryResult:
        try:
            result: NotificationDeliveryResult = await workflow.execute_activity(
                DeliveryActivity.DELIVER_NOTIFICATION,
                input,
                result_type=NotificationDeliveryResult,
                start_to_close_timeout=timedelta(seconds=input.timeout_s),
                schedule_to_close_timeout=MAIL_GIVE_UP,
                retry_policy=RetryPolicy(
                    initial_interval=MAIL_FIRST_RETRY,
                    backoff_coefficient=2.0,
                    maximum_interval=MAIL_MAX_RETRY_INTERVAL,
                ),
            )
            return result
        except ActivityError as error:
            reason = f"gave up after retrying for {MAIL_GIVE_UP.days} days: {_reason(error)}"
            await workflow.execute_activity(
                DeliveryActivity.GIVE_UP_NOTIFICATION,
                GiveUpNotificationInput(input.notification_id, reason[:500]),
                start_to_close_timeout=_DB_STEP,
                retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=5)),
            )
            return NotificationDeliveryResult(status="failed", reason=reason)


@workflow.defn(name="EventStreamWorkflow")
class EventStreamWorkflow:
    @workflow.run
    async def run(self, input: EventStreamInput) -> int:
        """Deliver the stream's pending events in order; the number delivered."""
        stream = StreamRef(input.endpoint_id, input.subscription_id)
        for delivered in range(input.deliveries_per_run):
            nxt: NextDeliveryResult = await workflow.execute_activity(
                DeliveryActivity.NEXT_EVENT_DELIVERY,
                stream,
                result_type=NextDeliveryResult,
                start_to_close_timeout=_DB_STEP,
                retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=5)),
            )
            if nxt.delivery_id is None:
                return delivered
            try:
                await workflow.execute_activity(
                    DeliveryActivity.POST_EVENT,
                    PostEventInput(nxt.delivery_id),
                    result_type=PostEventResult,
                    start_to_close_timeout=timedelta(seconds=input.post_timeout_s),
                    schedule_to_close_timeout=DELIVERY_GIVE_UP,
                    retry_policy=RetryPolicy(
                        initial_interval=DELIVERY_FIRST_RETRY,
                        backoff_coefficient=2.0,
                        maximum_interval=DELIVERY_MAX_RETRY_INTERVAL,
                    ),
                )
            except ActivityError as error:
                await workflow.execute_activity(
                    DeliveryActivity.GIVE_UP_EVENT_STREAM,
                    GiveUpStreamInput(nxt.delivery_id, input.endpoint_id, _reason(error)[:400]),
                    start_to_close_timeout=_DB_STEP,
                    retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=5)),
                )
                return delivered
        workflow.continue_as_new(input)
