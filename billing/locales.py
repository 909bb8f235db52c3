"""A customer's locale: a BCP 47 language tag that CLDR (babel) has data for, such as ``de-CH``
or ``fr``. It decides how mails and invoice documents write amounts, dates and (for the
languages we translate) words. Pure: no I/O."""

from __future__ import annotations

import re

from babel import Locale, UnknownLocaleError

from billing.errors import InvalidInput
from billing.text import LOCALE

#: BCP 47's shape as far as CLDR locales go: a 2-3 letter language, then subtags of 2-8
#: letters or digits (script, region, variant), joined by '-' (or babel's '_').
_TAG = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")


def check_locale(value: str, *, field: str) -> str:
    """``value`` as a BCP 47 tag (``de_ch`` -> ``de-CH``) if CLDR knows the locale; otherwise
    InvalidInput naming ``field`` and saying what was wrong. The message quotes at most 40
    characters of the value, and never one the text rule refused."""
    LOCALE.check(value, field=field)
    if not _TAG.fullmatch(value):
        raise InvalidInput(
            f"{field} must be a BCP 47 language tag such as 'en', 'fr-FR' or 'de-CH' "
            f"(language, then region or script, joined by '-'); got {value[:40]!r}",
            field=field,
        )
    try:
        locale = Locale.parse(value.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        locale = None
    if locale is None or not _has_data(locale, value):
        raise InvalidInput(
            f"{field} {value!r} is not a locale CLDR has data for; use one such as 'en', "
            "'en-GB', 'fr-FR', 'de-CH' or 'ja-JP'",
            field=field,
        )
    return tag_of(locale)


def _has_data(locale: Locale, asked: str) -> bool:
    # Locale.parse fills in likely subtags and may answer a locale other than the one asked
    # for (an unknown region falls back to the language): each part asked for must be there.
    parts = asked.replace("-", "_").split("_")
    known = {p.lower() for p in _parts(locale)}
    return all(p.lower() in known for p in parts)


def _parts(locale: Locale) -> list[str]:
    return [p for p in (locale.language, locale.script, locale.territory, locale.variant) if p]


def tag_of(locale: Locale) -> str:
    """The BCP 47 tag of a babel locale (``de_CH`` -> ``de-CH``)."""
    return "-".join(_parts(locale))
