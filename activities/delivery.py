"""Delivery activities: customer mails from the outbox (SMTP) and events to the business's
endpoints (signed HTTP POSTs), run by ``workflows/delivery.py``.

Both are at least once, made as close to exactly once as the protocols allow:
- a notice is marked sent only after the mail server accepted it (250 after DATA). A worker
  killed between that acceptance and our write sends it again on retry, with the same
  Message-ID, which receivers (and most mail stores) use to drop the duplicate;
- an event delivery is marked delivered only after a 2xx; a retry after a lost 2xx sends the
  same event id, which receivers deduplicate on.

Errors: a 5xx from the mail server is a business outcome (the notice is failed with the
reason, returned); a 4xx, a timeout or a dropped connection raises and Temporal retries with
backoff. A non-2xx from an endpoint raises too.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import event_log
from activities.pinned_http import (
    POST_ERRORS,
    AddressRefused,
    Dialer,
    pinned_post,
)
from activities.smtp_mailer import SmtpMailer, SmtpSendError
from billing.business_events import (
    SIGNATURE_HEADER,
    EventType,
    sign_payload,
    stream_subscription_id,
)
from billing.clock import Clock
from billing.delivery import (
    ClaimedNotifications,
    ClaimedStreams,
    ClaimInput,
    DeliveryActivity,
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
)
from billing.event_endpoints import Resolver, resolve_host
from billing.ids import new_id
from billing.mail.render import (
    EndpointDisabledContext,
    NoticeContext,
    RenderedMail,
    render_endpoint_disabled,
    render_notice,
)
from billing.notices import (
    UPCOMING_RENEWAL_NOTICE,
    NoticeKind,
    NoticeStatus,
    ReminderFacts,
    SmtpVerdict,
    is_known_kind,
    may_skip,
    message_id_for,
    reminders_due,
    smtp_verdict,
)
from billing.records import DeliveryStatus, EventRecord, NotificationRecord
from billing.subscription import SubscriptionStatus
from db.engine import unit_of_work
from db.repositories import customers as customers_repo
from db.repositories import events as events_repo
from db.repositories import invoices as invoices_repo
from db.repositories import notifications as notifications_repo
from db.repositories import plans as plans_repo
from db.repositories import subscriptions as subscriptions_repo


class MailSettings:
    """What the mails need besides the SMTP server: the From address and the customer's
    links."""

    def __init__(
        self,
        *,
        from_address: str,
        card_update_url: str | None = None,
        authentication_url: str | None = None,
        business_contact: str | None = None,
    ) -> None:
        self.from_address = from_address
        self.card_update_url = card_update_url
        self.authentication_url = authentication_url
        #: The business's address for mails about its event endpoints, when an endpoint has
        #: no ``contact_email`` of its own (``BILLING_EVENTS_CONTACT_EMAIL``).
        self.business_contact = business_contact


def authentication_link(payload: dict[str, Any], fallback: str | None) -> str | None:
    """The action-required mail's link: the page the payment provider gave for this payment
    (Stripe's ``next_action.redirect_to_url.url``, carried in the notice), else the
    business's own page from ``BILLING_MAIL_AUTHENTICATION_URL`` with the payment's id, else
    None (the mail then asks the customer to sign in to their account to confirm it)."""
    given = payload.get("authentication_url")
    if isinstance(given, str) and given.startswith("https://"):
        return given
    if fallback and payload.get("payment_intent_id"):
        return fallback.replace("{payment_intent_id}", str(payload["payment_intent_id"]))
    return None


def _instant(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return value if isinstance(value, datetime) else None


class DeliveryActivities:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        clock: Clock,
        *,
        mailer: SmtpMailer | None,
        mail: MailSettings,
        post_timeout_s: float = 10.0,
        allow_insecure_endpoints: bool = False,
        resolve: Resolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        dial: Dialer | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.clock = clock
        self.mailer = mailer
        self.mail = mail
        self.post_timeout_s = post_timeout_s
        self.allow_insecure_endpoints = allow_insecure_endpoints
        #: The endpoint's host is resolved by this, once per attempt (tests give a fake DNS).
        self._resolve = resolve or resolve_host
        #: TLS trust for endpoints (default: the system's CAs); tests give their own CA.
        self._ssl_context = ssl_context
        #: TEST ONLY: how a checked address is dialed (tests route a "public" one locally).
        self._dial = dial

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.claim_notifications,
            self.sweep_reminders,
            self.deliver_notification,
            self.give_up_notification,
            self.claim_event_streams,
            self.next_event_delivery,
            self.post_event,
            self.give_up_event_stream,
        ]

    # ---------------------------------------------------------------------------- mails --

    @activity.defn(name=DeliveryActivity.CLAIM_NOTIFICATIONS)
    def claim_notifications(self, input: ClaimInput) -> ClaimedNotifications:
        if self.mailer is None:
            return ClaimedNotifications()  # no SMTP server configured: notices wait
        with unit_of_work(self.session_factory) as session:
            claimed = notifications_repo.claim_pending_notifications(
                session,
                now=self.clock.now(),
                redispatch_after=timedelta(seconds=input.redispatch_after_s),
                limit=input.limit,
            )
        return ClaimedNotifications(notification_ids=[n.id for n in claimed])

    @activity.defn(name=DeliveryActivity.SWEEP_REMINDERS)
    def sweep_reminders(self, input: SweepRemindersInput) -> SweepRemindersResult:
        """Enqueue the reminders whose window is open (trial ending in 3 days, annual renewal
        in 7), each once per date by its dedupe key; a trial's also as
        ``subscription.trial_will_end``."""
        now = self.clock.now()
        enqueued = 0
        with unit_of_work(self.session_factory) as session:
            for sub in notifications_repo.reminder_candidates(
                session, now=now, horizon=UPCOMING_RENEWAL_NOTICE, limit=input.limit
            ):
                facts = ReminderFacts(
                    subscription_id=sub.id,
                    status=SubscriptionStatus(sub.status),
                    interval=sub.interval,
                    interval_count=sub.interval_count,
                    trial_end_at=sub.trial_end_at,
                    next_billing_at=sub.next_billing_at,
                    cancel_at_period_end=sub.cancel_at_period_end,
                )
                for reminder in reminders_due(facts, now):
                    key = reminder.dedupe_key(sub.id)
                    _, created = notifications_repo.enqueue_notification(
                        session,
                        NotificationRecord(
                            id=new_id("ntf"),
                            kind=reminder.kind.value,
                            customer_id=sub.customer_id,
                            subscription_id=sub.id,
                            dedupe_key=key,
                            payload={"about": reminder.about.isoformat()},
                            created_at=now,
                        ),
                    )
                    if created:
                        enqueued += 1
                        if reminder.kind == NoticeKind.TRIAL_ENDING:
                            events_repo.record_event(
                                session,
                                type=EventType.SUBSCRIPTION_TRIAL_WILL_END,
                                subscription_id=sub.id,
                                object_id=sub.id,
                                object=event_log.subscription_object(session, sub),
                                dedupe_key=key,
                                created_at=now,
                            )
        return SweepRemindersResult(enqueued=enqueued)

    @activity.defn(name=DeliveryActivity.DELIVER_NOTIFICATION)
    def deliver_notification(self, input: NotificationDeliveryInput) -> NotificationDeliveryResult:
        if self.mailer is None:
            raise ApplicationError("no SMTP server configured (BILLING_SMTP_HOST)")
        now = self.clock.now()
        with unit_of_work(self.session_factory) as session:
            notice = notifications_repo.get_notification(session, input.notification_id)
            if notice is None:
                raise ApplicationError(
                    f"notice {input.notification_id} not found", non_retryable=True
                )
            if notice.status != NoticeStatus.PENDING:
                return NotificationDeliveryResult(status=str(notice.status))
            skip = self._skip_reason(session, notice)
            if skip is not None:
                status, reason = skip
                notifications_repo.finish_notice(
                    session, notice.id, status=status, at=now, reason=reason, attempted=False
                )
                return NotificationDeliveryResult(status=status.value, reason=reason)
            message = self._message(session, notice)
        message_id = str(message["Message-ID"])
        try:
            self.mailer.send(message)
        except SmtpSendError as error:
            with unit_of_work(self.session_factory) as session:
                if smtp_verdict(error.code) == SmtpVerdict.REFUSED:
                    notifications_repo.finish_notice(
                        session,
                        notice.id,
                        status=NoticeStatus.FAILED,
                        at=self.clock.now(),
                        message_id=message_id,
                        reason=f"the mail server refused it: {error.reason}",
                    )
                    return NotificationDeliveryResult(
                        status=NoticeStatus.FAILED.value, reason=error.reason
                    )
                notifications_repo.record_notice_attempt(
                    session, notice.id, message_id=message_id, error=error.reason
                )
            # Transient: Temporal retries with backoff, same Message-ID.
            raise ApplicationError(
                f"mail not accepted yet: {error.reason}", type="SmtpTemporaryFailure"
            ) from None
        # Accepted. A crash before this commit sends it again, under the same Message-ID.
        with unit_of_work(self.session_factory) as session:
            notifications_repo.finish_notice(
                session,
                notice.id,
                status=NoticeStatus.SENT,
                at=self.clock.now(),
                message_id=message_id,
            )
        return NotificationDeliveryResult(status=NoticeStatus.SENT.value)

    @activity.defn(name=DeliveryActivity.GIVE_UP_NOTIFICATION)
    def give_up_notification(self, input: GiveUpNotificationInput) -> None:
        with unit_of_work(self.session_factory) as session:
            notifications_repo.finish_notice(
                session,
                input.notification_id,
                status=NoticeStatus.FAILED,
                at=self.clock.now(),
                reason=input.reason,
                attempted=False,
            )

    def _skip_reason(
        self, session: Session, notice: NotificationRecord
    ) -> tuple[NoticeStatus, str] | None:
        if notice.customer_id is None:  # a mail to the business
            if not notice.recipient:
                return NoticeStatus.SKIPPED, (
                    "no address for the business: set the endpoint's contact_email or "
                    "BILLING_EVENTS_CONTACT_EMAIL"
                )
            if notice.kind != NoticeKind.ENDPOINT_DISABLED:
                return NoticeStatus.FAILED, f"no mail template for notice kind {notice.kind!r}"
            return None
        customer = customers_repo.get_customer(session, notice.customer_id)
        if customer is None or not customer.email:
            return NoticeStatus.SKIPPED, "the customer has no e-mail address"
        if not is_known_kind(notice.kind):
            return NoticeStatus.FAILED, f"no mail template for notice kind {notice.kind!r}"
        if may_skip(notice.kind, opted_out=customer.mail_opt_out):
            return NoticeStatus.SKIPPED, "the customer opted out of non-essential mails"
        return None

    def _message(self, session: Session, notice: NotificationRecord) -> EmailMessage:
        if notice.customer_id is None:
            return self._business_message(notice)
        customer = customers_repo.get_customer(session, notice.customer_id)
        assert customer is not None and customer.email
        payload = notice.payload or {}
        kind = NoticeKind(notice.kind)
        sub = (
            subscriptions_repo.get_subscription(session, notice.subscription_id)
            if notice.subscription_id
            else None
        )
        invoice = (
            invoices_repo.get_invoice(session, notice.invoice_id) if notice.invoice_id else None
        )
        plan = plans_repo.get_plan(session, sub.plan_code) if sub is not None else None
        amount = invoice.amount_due_minor if invoice is not None else None
        currency = invoice.currency if invoice is not None else None
        if (
            invoice is None
            and sub is not None
            and kind
            in (
                NoticeKind.TRIAL_ENDING,
                NoticeKind.UPCOMING_RENEWAL,
            )
        ):
            amount, currency = sub.amount_minor, sub.currency
        about = _instant(payload.get("about"))
        auth_url = authentication_link(payload, self.mail.authentication_url)
        context = NoticeContext(
            kind=kind,
            customer_name=customer.name,
            locale=customer.locale,
            timezone=(sub.timezone if sub is not None else None) or customer.timezone,
            invoice_number=invoice.number if invoice is not None else None,
            amount_minor=amount,
            currency=currency,
            period_start=invoice.period_start if invoice is not None else None,
            period_end=invoice.period_end if invoice is not None else None,
            paid_at=invoice.paid_at if invoice is not None else None,
            plan_name=plan.name if plan is not None else None,
            next_retry_at=_instant(payload.get("next_retry_at")),
            trial_end_at=about if kind == NoticeKind.TRIAL_ENDING else None,
            renews_at=about if kind == NoticeKind.UPCOMING_RENEWAL else None,
            ended_at=_instant(payload.get("ended_at")),
            hard_decline=bool(payload.get("hard_decline")),
            card_update_url=self.mail.card_update_url,
            authentication_url=auth_url,
        )
        mail = render_notice(context)
        to = formataddr((customer.name or "", customer.email))
        return self._envelope(notice, to=to, subject=mail.subject, mail=mail)

    def _business_message(self, notice: NotificationRecord) -> EmailMessage:
        """A mail to the business about one of its endpoints (English: the operator's
        language is not known)."""
        assert notice.recipient
        payload = notice.payload or {}
        mail = render_endpoint_disabled(
            EndpointDisabledContext(
                endpoint_id=str(payload.get("endpoint_id", "")),
                url=str(payload.get("url", "")),
                reason=str(payload.get("reason", "")),
                disabled_at=_instant(payload.get("disabled_at")) or notice.created_at,
            )
        )
        return self._envelope(notice, to=notice.recipient, subject=mail.subject, mail=mail)

    def _envelope(
        self, notice: NotificationRecord, *, to: str, subject: str, mail: RenderedMail
    ) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.mail.from_address
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = format_datetime(notice.created_at)
        message["Message-ID"] = message_id_for(notice.id, self.mail.from_address)
        message["Auto-Submitted"] = "auto-generated"
        message["X-Billing-Notice"] = f"{notice.kind} {notice.id}"
        message.set_content(mail.text)
        message.add_alternative(mail.html, subtype="html")
        return message

    # --------------------------------------------------------------------------- events --

    @activity.defn(name=DeliveryActivity.CLAIM_EVENT_STREAMS)
    def claim_event_streams(self, input: ClaimInput) -> ClaimedStreams:
        with unit_of_work(self.session_factory) as session:
            streams = events_repo.claim_streams(
                session,
                now=self.clock.now(),
                redispatch_after=timedelta(seconds=input.redispatch_after_s),
                limit=input.limit,
            )
        return ClaimedStreams(
            streams=[StreamRef(s.endpoint_id, s.subscription_id) for s in streams]
        )

    @activity.defn(name=DeliveryActivity.NEXT_EVENT_DELIVERY)
    def next_event_delivery(self, input: StreamRef) -> NextDeliveryResult:
        with unit_of_work(self.session_factory) as session:
            endpoint = events_repo.get_endpoint(session, input.endpoint_id)
            if endpoint is None or not endpoint.enabled:
                return NextDeliveryResult()
            delivery = events_repo.next_delivery(
                session, events_repo.Stream(input.endpoint_id, input.subscription_id)
            )
        return NextDeliveryResult(delivery_id=delivery.id if delivery is not None else None)

    @activity.defn(name=DeliveryActivity.POST_EVENT)
    def post_event(self, input: PostEventInput) -> PostEventResult:
        with unit_of_work(self.session_factory) as session:
            delivery = events_repo.get_delivery(session, input.delivery_id)
            if delivery is None:
                raise ApplicationError(
                    f"delivery {input.delivery_id} not found", non_retryable=True
                )
            if delivery.status != DeliveryStatus.PENDING:
                return PostEventResult(outcome="skipped")
            endpoint = events_repo.get_endpoint(session, delivery.endpoint_id)
            event = events_repo.get_event(session, delivery.event_id)
        if endpoint is None or event is None or not endpoint.enabled:
            return PostEventResult(outcome="skipped")
        body = event_body(event)
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        try:
            timestamp = int(self.clock.now().timestamp())
            # Resolved once, checked, and connected to exactly the checked address (no
            # DNS-rebinding window); TLS verified against the host name; no redirects.
            result = pinned_post(
                endpoint.url,
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "billing-events/1",
                    SIGNATURE_HEADER: sign_payload(body, endpoint.secret, timestamp=timestamp),
                },
                timeout_s=self.post_timeout_s,
                resolve=self._resolve,
                allow_private=self.allow_insecure_endpoints,
                ssl_context=self._ssl_context,
                dial=self._dial,
            )
            status_code = result.status_code
            if not 200 <= status_code < 300:
                error = f"the endpoint answered {status_code}"
        except AddressRefused as refused:
            error = f"refused: {refused}"
        except POST_ERRORS as failure:
            error = f"{type(failure).__name__}: {failure}"[:400]
        delivered = error is None
        with unit_of_work(self.session_factory) as session:
            events_repo.record_delivery_attempt(
                session,
                delivery.id,
                at=self.clock.now(),
                status_code=status_code,
                error=error,
                duration_ms=int((time.monotonic() - started) * 1000),
                delivered=delivered,
            )
        if not delivered:
            raise ApplicationError(f"event not accepted: {error}", type="EventDeliveryFailed")
        return PostEventResult(outcome="delivered", status_code=status_code)

    @activity.defn(name=DeliveryActivity.GIVE_UP_EVENT_STREAM)
    def give_up_event_stream(self, input: GiveUpStreamInput) -> None:
        """The stream's head delivery failed for 3 days: fail it and disable the endpoint
        (its other deliveries wait; re-enabling it resumes them in order), and, in the same
        transaction, queue the mail that tells the business (once per disabling: a retry,
        or the endpoint's other streams giving up too, find it disabled already)."""
        now = self.clock.now()
        with unit_of_work(self.session_factory) as session:
            events_repo.fail_delivery(session, input.delivery_id, reason=input.reason)
            endpoint = events_repo.get_endpoint(session, input.endpoint_id)
            if endpoint is None or not endpoint.enabled:
                return
            reason = f"deliveries failed for 3 days: {input.reason}"[:500]
            events_repo.update_endpoint(
                session, endpoint.id, now=now, enabled=False, disabled_reason=reason
            )
            recipient = endpoint.contact_email or self.mail.business_contact
            notifications_repo.enqueue_notification(
                session,
                NotificationRecord(
                    id=new_id("ntf"),
                    kind=NoticeKind.ENDPOINT_DISABLED.value,
                    customer_id=None,
                    recipient=recipient,
                    dedupe_key=f"{endpoint.id}:{NoticeKind.ENDPOINT_DISABLED.value}:"
                    f"{now.isoformat()}",
                    payload={
                        "endpoint_id": endpoint.id,
                        "url": endpoint.url,
                        "reason": input.reason[:400],
                        "disabled_at": now.isoformat(),
                    },
                    created_at=now,
                ),
            )


def event_body(event: EventRecord) -> bytes:
    """The JSON an endpoint receives: the event's id, type, created (Unix seconds), its
    subscription (null for an account-level event), its stream (the subscription's id, or
    ``account``) and sequence number in it, and the object as the API shows it."""
    return json.dumps(
        {
            "id": event.id,
            "object": "event",
            "type": event.type,
            "created": int(event.created_at.timestamp()),
            "subscription_id": stream_subscription_id(event.subscription_id),
            "stream": event.subscription_id,
            "sequence": event.sequence,
            "data": {"object": event.object},
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
