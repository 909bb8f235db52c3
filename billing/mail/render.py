"""Render a customer notice as a mail: subject, plain text and HTML, with amounts and dates
formatted for the customer by babel (their locale and IANA time zone).

Amounts are integer minor units plus an ISO currency: the currency's exponent comes from CLDR
(JPY 0 decimals, KWD 3), and the conversion to a decimal happens here, for display only.
The words are English; the locale decides number, currency and date formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime
from babel.numbers import format_currency
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from billing.money import currency_exponent
from billing.notices import NoticeKind

DEFAULT_LOCALE = "en"

SUBJECTS: dict[NoticeKind, str] = {
    NoticeKind.PAYMENT_FAILED: "Your payment of {amount} failed",
    NoticeKind.ACTION_REQUIRED: "Please confirm your payment of {amount}",
    NoticeKind.PAYMENT_RECOVERED: "Your payment of {amount} went through",
    NoticeKind.SUBSCRIPTION_UNPAID: "Your subscription is unpaid",
    NoticeKind.SUBSCRIPTION_CANCELED: "Your subscription has ended",
    NoticeKind.RECEIPT: "Receipt for invoice {number}: {amount}",
    NoticeKind.TRIAL_ENDING: "Your trial ends on {date}",
    NoticeKind.UPCOMING_RENEWAL: "Your subscription renews on {date} for {amount}",
}


@dataclass(frozen=True)
class NoticeContext:
    """Everything a notice's mail shows; instants UTC, amounts minor units."""

    kind: NoticeKind
    customer_name: str | None
    locale: str | None
    timezone: str
    #: The invoice the notice is about, if any.
    invoice_number: str | None = None
    amount_minor: int | None = None
    currency: str | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    paid_at: datetime | None = None
    plan_name: str | None = None
    #: When the next charge attempt is (payment failed), the trial ends, the plan renews.
    next_retry_at: datetime | None = None
    trial_end_at: datetime | None = None
    renews_at: datetime | None = None
    ended_at: datetime | None = None
    hard_decline: bool = False
    card_update_url: str | None = None
    authentication_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderedMail:
    subject: str
    text: str
    html: str


@cache
def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("billing.mail", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def resolve_locale(locale: str | None) -> Locale:
    """The customer's locale, or English when unset or unknown to CLDR (never an error:
    a mail in English beats no mail)."""
    if not locale:
        return Locale.parse(DEFAULT_LOCALE)
    try:
        return Locale.parse(locale.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return Locale.parse(DEFAULT_LOCALE)


def format_amount(amount_minor: int, currency: str, locale: Locale) -> str:
    """``amount_minor`` of ``currency`` as the locale writes money, with exactly the
    currency's decimals (USD 2, JPY 0, KWD 3)."""
    exponent = currency_exponent(currency)
    value = Decimal(amount_minor).scaleb(-exponent)
    return str(format_currency(value, currency, locale=locale, currency_digits=True))


def format_instant(at: datetime, timezone: str, locale: Locale) -> str:
    """Date and time in the customer's zone, with the zone named."""
    zone = ZoneInfo(timezone)
    return str(format_datetime(at.astimezone(zone), "long", tzinfo=zone, locale=locale))


def format_day(at: datetime, timezone: str, locale: Locale) -> str:
    return str(format_date(at.astimezone(ZoneInfo(timezone)), "long", locale=locale))


def render_notice(context: NoticeContext) -> RenderedMail:
    locale = resolve_locale(context.locale)
    tz = context.timezone

    def instant(at: datetime | None) -> str | None:
        return None if at is None else format_instant(at, tz, locale)

    def day(at: datetime | None) -> str | None:
        return None if at is None else format_day(at, tz, locale)

    amount = (
        format_amount(context.amount_minor, context.currency, locale)
        if context.amount_minor is not None and context.currency is not None
        else None
    )
    values: dict[str, Any] = {
        "name": context.customer_name or "there",
        "invoice_number": context.invoice_number,
        "amount": amount,
        "period_start": day(context.period_start),
        "period_end": day(context.period_end),
        "paid_at": instant(context.paid_at),
        "plan_name": context.plan_name,
        "next_retry_at": instant(context.next_retry_at),
        "trial_end": day(context.trial_end_at),
        "renews_at": day(context.renews_at),
        "ended_at": day(context.ended_at),
        "hard_decline": context.hard_decline,
        "card_update_url": context.card_update_url,
        "authentication_url": context.authentication_url,
    }
    env = _environment()
    kind = context.kind.value
    text = env.get_template(f"{kind}.txt").render(**values)
    html = env.get_template(f"{kind}.html").render(**values)
    reminder_date = (
        context.trial_end_at if context.kind == NoticeKind.TRIAL_ENDING else context.renews_at
    )
    subject = SUBJECTS[context.kind].format(
        amount=amount or "",
        number=context.invoice_number or "",
        date=day(reminder_date) or "",
    )
    return RenderedMail(subject=subject, text=text, html=html)
