"""Contracts of the delivery workflows (customer mails and events for the business): their
inputs, their activities' names, inputs and results, and the retry schedules. Every field
added later gets a default, so running histories still decode."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum

from billing.business_events import (
    DELIVERY_FIRST_RETRY,
    DELIVERY_GIVE_UP,
    DELIVERY_MAX_RETRY_INTERVAL,
)

#: One dispatcher per delivery task queue (a second start finds the running one).
DISPATCHER_WORKFLOW_ID_PREFIX = "delivery-dispatcher"


def dispatcher_workflow_id(task_queue: str) -> str:
    return f"{DISPATCHER_WORKFLOW_ID_PREFIX}-{task_queue}"


def notice_workflow_id(notification_id: str) -> str:
    return f"notice-{notification_id}"


def stream_workflow_id(endpoint_id: str, subscription_id: str) -> str:
    return f"events-{endpoint_id}-{subscription_id}"


class DeliveryActivity(StrEnum):
    CLAIM_NOTIFICATIONS = "claim_notifications"
    SWEEP_REMINDERS = "sweep_reminders"
    DELIVER_NOTIFICATION = "deliver_notification"
    GIVE_UP_NOTIFICATION = "give_up_notification"
    CLAIM_EVENT_STREAMS = "claim_event_streams"
    NEXT_EVENT_DELIVERY = "next_event_delivery"
    POST_EVENT = "post_event"
    GIVE_UP_EVENT_STREAM = "give_up_event_stream"


#: Mail retries: 30 s, 1 min, 2 min, ... at most an hour apart, for up to 2 days; then the
#: notice is marked failed with the last reason.
MAIL_FIRST_RETRY = timedelta(seconds=30)
MAIL_MAX_RETRY_INTERVAL = timedelta(hours=1)
MAIL_GIVE_UP = timedelta(days=2)

__all__ = [
    "DELIVERY_FIRST_RETRY",
    "DELIVERY_GIVE_UP",
    "DELIVERY_MAX_RETRY_INTERVAL",
]


@dataclass(frozen=True)
class DispatcherInput:
    #: Where the delivery workflows run.
    task_queue: str
    #: Seconds between looks at the outbox and the events (a ``wake`` signal looks at once).
    interval_s: float = 5.0
    #: Most notices and streams handed out per look.
    batch: int = 100
    #: A notice or stream handed out this long ago and still pending is handed out again (a
    #: lost start; a running delivery workflow is found by its id), seconds.
    redispatch_after_s: int = 3600
    #: Seconds between reminder sweeps (trial ending, annual renewal).
    reminders_every_s: float = 300.0
    #: Looks per run before continuing as new (keeps the history short).
    looks_per_run: int = 100
    #: Retry schedule and timeouts of the deliveries, seconds (tests shorten them).
    mail_timeout_s: float = 60.0
    post_timeout_s: float = 30.0


@dataclass(frozen=True)
class ClaimInput:
    limit: int = 100
    redispatch_after_s: int = 3600


@dataclass(frozen=True)
class ClaimedNotifications:
    notification_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StreamRef:
    endpoint_id: str
    subscription_id: str


@dataclass(frozen=True)
class ClaimedStreams:
    streams: list[StreamRef] = field(default_factory=list)


@dataclass(frozen=True)
class SweepRemindersInput:
    limit: int = 1000


@dataclass(frozen=True)
class SweepRemindersResult:
    enqueued: int = 0


@dataclass(frozen=True)
class NotificationDeliveryInput:
    notification_id: str
    timeout_s: float = 60.0


@dataclass(frozen=True)
class NotificationDeliveryResult:
    #: A ``billing.notices.NoticeStatus`` value.
    status: str
    reason: str | None = None


@dataclass(frozen=True)
class GiveUpNotificationInput:
    notification_id: str
    reason: str


@dataclass(frozen=True)
class EventStreamInput:
    endpoint_id: str
    subscription_id: str
    post_timeout_s: float = 30.0
    #: Deliveries per run before continuing as new.
    deliveries_per_run: int = 200


@dataclass(frozen=True)
class NextDeliveryResult:
    #: None: nothing pending, or the endpoint is disabled; the stream's workflow ends.
    delivery_id: str | None = None


@dataclass(frozen=True)
class PostEventInput:
    delivery_id: str


@dataclass(frozen=True)
class PostEventResult:
    #: ``delivered``, or ``skipped`` (already delivered, or the endpoint was disabled).
    outcome: str
    status_code: int | None = None


@dataclass(frozen=True)
class GiveUpStreamInput:
    delivery_id: str
    endpoint_id: str
    reason: str
