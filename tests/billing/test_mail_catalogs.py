"""The mail catalogs: every message the templates and subjects use is translated in every
catalog (French, German), none is fuzzy or left over, and the placeholders match, so a
customer never gets a half-English mail or a broken one."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from billing.mail.render import TRANSLATED_LANGUAGES

MAIL = Path(str(files("billing.mail")))
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def used_messages() -> set[str]:
    """Every msgid in the templates and render.py, extracted as ``pybabel extract`` does
    with billing/mail/babel.cfg."""
    method_map = [
        ("**.py", "python"),
        ("**/templates/**.html", "jinja2"),
        ("**/templates/**.txt", "jinja2"),
    ]
    options = {
        "**/templates/**.html": {"extensions": "jinja2.ext.i18n", "trimmed": "true"},
        "**/templates/**.txt": {"extensions": "jinja2.ext.i18n", "trimmed": "true"},
    }
    keywords = {"_": None, "gettext": None, "N_": None}
    found = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
        str(MAIL), method_map, options, keywords=keywords
    ):
        found.add(message if isinstance(message, str) else message[0])
    return found


@pytest.mark.parametrize("language", TRANSLATED_LANGUAGES)
def test_every_mail_message_is_translated(language: str) -> None:
    used = used_messages()
    assert len(used) > 40  # the extraction found the templates
    with (MAIL / "locale" / language / "LC_MESSAGES" / "messages.po").open("rb") as po:
        catalog = read_po(po, locale=language)
    entries = {m.id: m for m in catalog if m.id}
    assert sorted(used - set(entries)) == [], "messages without a translation"
    assert sorted(set(entries) - used) == [], "translations no message uses any more"
    for message_id, entry in entries.items():
        assert isinstance(entry.string, str) and entry.string.strip(), message_id
        assert not entry.fuzzy, message_id
        assert sorted(_PLACEHOLDER.findall(entry.string)) == sorted(
            _PLACEHOLDER.findall(message_id)
        ), (message_id, entry.string)
