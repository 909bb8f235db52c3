"""Render a customer notice as a mail: subject, plain text and HTML, with amounts and dates
formatted for the customer by babel (their locale and IANA time zone).

Amounts are integer minor units plus an ISO currency: the currency's exponent comes from CLDR
(JPY 0 decimals, KWD 3), and the conversion to a decimal happens here, for display only.

The words come from gettext catalogs (``billing/mail/locale/<lang>/LC_MESSAGES/messages.po``,
French and German so far), chosen by the customer's locale's language (``de-CH`` reads
``de``), English when there is no catalog for it. The catalogs are read from the ``.po``
files shipped in the package and compiled in memory once per process, so there is no build
step. After changing a message in a template or here::

    pybabel extract -F billing/mail/babel.cfg -o billing/mail/locale/messages.pot billing/mail
    pybabel update -i billing/mail/locale/messages.pot -d billing/mail/locale

then translate the new entries; ``tests/billing/test_mail_catalogs.py`` fails while any
message lacks a translation or a catalog holds one that is no longer used.
"""

from __future__ import annotations

import gettext
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache
from importlib.resources import files
from io import BytesIO
from typing import Any
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_currency
from babel.support import Translations
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from billing.money import currency_exponent
from billing.notices import NoticeKind

DEFAULT_LOCALE = "en"


def N_(message: str) -> str:
    """Marks a message for extraction (``pybabel extract -k N_``); translated at render."""
    return message


SUBJECTS: dict[NoticeKind, str] = {
    NoticeKind.PAYMENT_FAILED: N_("Your payment of %(amount)s failed"),
    NoticeKind.ACTION_REQUIRED: N_("Please confirm your payment of %(amount)s"),
    NoticeKind.PAYMENT_RECOVERED: N_("Your payment of %(amount)s went through"),
    NoticeKind.SUBSCRIPTION_UNPAID: N_("Your subscription is unpaid"),
    NoticeKind.SUBSCRIPTION_CANCELED: N_("Your subscription has ended"),
    NoticeKind.RECEIPT: N_("Receipt for invoice %(number)s: %(amount)s"),
    NoticeKind.TRIAL_ENDING: N_("Your trial ends on %(date)s"),
    NoticeKind.UPCOMING_RENEWAL: N_("Your subscription renews on %(date)s for %(amount)s"),
}

#: Languages with a catalog (``locale/<lang>/LC_MESSAGES/messages.po``); others read English.
TRANSLATED_LANGUAGES: tuple[str, ...] = ("de", "fr")


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
def translations_for(language: str) -> gettext.NullTranslations:
    """The mail catalog of ``language`` (read from its ``.po`` and compiled in memory, once),
    or no translation (English) when there is none. Fuzzy entries are left out."""
    if language not in TRANSLATED_LANGUAGES:
        return gettext.NullTranslations()
    po = files("billing.mail") / "locale" / language / "LC_MESSAGES" / "messages.po"
    with po.open("rb") as source:
        catalog = read_po(source, locale=language)
    compiled = BytesIO()
    write_mo(compiled, catalog, use_fuzzy=False)
    compiled.seek(0)
    return Translations(fp=compiled)


@cache
def _environment(language: str = DEFAULT_LOCALE) -> Environment:
    env = Environment(
        loader=PackageLoader("billing.mail", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        extensions=["jinja2.ext.i18n"],
    )
    # Whitespace inside {% trans %} is collapsed, so a message is one line in the catalog.
    env.policies["ext.i18n.trimmed"] = True
    env.install_gettext_translations(translations_for(language), newstyle=True)  # type: ignore[attr-defined]
    return env


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
    language = locale.language if locale.language in TRANSLATED_LANGUAGES else DEFAULT_LOCALE
    translations = translations_for(language)
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
        "lang": language,
        "name": context.customer_name,
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
    env = _environment(language)
    kind = context.kind.value
    text = env.get_template(f"{kind}.txt").render(**values)
    html = env.get_template(f"{kind}.html").render(**values)
    reminder_date = (
        context.trial_end_at if context.kind == NoticeKind.TRIAL_ENDING else context.renews_at
    )
    subject = translations.gettext(SUBJECTS[context.kind]) % {
        "amount": amount or "",
        "number": context.invoice_number or "",
        "date": day(reminder_date) or "",
    }
    return RenderedMail(subject=subject, text=text, html=html)


@dataclass(frozen=True)
class EndpointDisabledContext:
    """The business's mail when an event endpoint is disabled; ``disabled_at`` UTC."""

    endpoint_id: str
    url: str
    reason: str
    disabled_at: datetime


def render_endpoint_disabled(context: EndpointDisabledContext) -> RenderedMail:
    """The mail that tells the business its endpoint was disabled: which one, why, since when,
    and how to turn it back on (its waiting events then follow in order). No secret."""
    values = {
        "endpoint_id": context.endpoint_id,
        "url": context.url,
        "reason": context.reason,
        "disabled_at": format_instant(context.disabled_at, "UTC", resolve_locale(None)),
    }
    env = _environment(DEFAULT_LOCALE)
    return RenderedMail(
        subject=f"Event endpoint {context.endpoint_id} was disabled after failing for 3 days",
        text=env.get_template("endpoint_disabled.txt").render(**values),
        html=env.get_template("endpoint_disabled.html").render(**values),
    )
