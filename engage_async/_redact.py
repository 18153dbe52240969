"""Keeping personal data out of messages, logs and listings.

Engage's error texts may echo what was sent (an email, a phone number), so any text that came
from Engage or from a payload passes through `scrub` before it reaches an exception message or
a log line. `mask` shortens one known-personal value for the admin listing.
"""

from __future__ import annotations

import re

_GUID = r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
_EMAIL = r"[^\s@\"'<>(),;:\[\]{}]+@[^\s@\"'<>(),;:\[\]{}]+"
# Eight or more digits, maybe with a leading + and inner spaces or dashes: phone numbers and
# personal identity numbers. Dates get caught too; over-scrubbing is the safe side.
_NUMBER = r"\+?\d[\d -]{6,}\d"
_SCRUB = re.compile(f"(?P<guid>{_GUID})|{_EMAIL}|{_NUMBER}")

MAX_TEXT = 200


def scrub(text: str, *, limit: int = MAX_TEXT) -> str:
    """Return `text` truncated to `limit` characters with personal data replaced by ``***``.

    Contact ids (GUIDs) are kept: they identify without being personal data, and logs need them.
    """
    # Scrub before cutting: a cut through an email would leave a readable piece of it.
    text = _SCRUB.sub(lambda m: m.group("guid") or "***", text)
    return text[:limit] + "..." if len(text) > limit else text


def mask(value: str) -> str:
    """Shorten a personal value to a hint an operator can recognise but not read.

    ``anna@example.com`` -> ``a***@e***.com``; ``+46701234567`` -> ``+4********67``; values
    of eight characters or fewer keep only their first character.
    """
    if "@" in value:
        local, _, domain = value.partition("@")
        host, dot, tld = domain.rpartition(".")
        masked_domain = f"{host[:1]}***{dot}{tld}" if dot else f"{domain[:1]}***"
        return f"{local[:1]}***@{masked_domain}"
    if len(value) <= 8:
        return f"{value[:1]}***" if len(value) > 2 else "***"
    return f"{value[:2]}{'*' * (len(value) - 4)}{value[-2:]}"
