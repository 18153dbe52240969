"""Keeping personal data out of messages, logs and listings.

Engage's error texts may echo what was sent (an email, a phone number), so any text that came
from Engage or from a payload passes through `scrub` before it reaches an exception message or
a log line. `sent_values` and `without` mask the values of a payload wherever a text repeats
them (a name or a street, which no pattern recognises). `mask` shortens one known-personal value
for the admin listing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

_GUID = r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
_EMAIL = r"[^\s@\"'<>(),;:\[\]{}]+@[^\s@\"'<>(),;:\[\]{}]+"
# Eight or more digits, maybe with a leading + and inner spaces or dashes: phone numbers and
# personal identity numbers. Dates get caught too; over-scrubbing is the safe side.
_NUMBER = r"\+?\d[\d -]{6,}\d"
_SCRUB = re.compile(f"(?P<guid>{_GUID})|{_EMAIL}|{_NUMBER}")

MAX_TEXT = 200
# Shorter sent values are not masked where a text repeats them: "SE" or "12" would blank out
# half of an error message, and say nothing about a person.
SHORTEST_VALUE: Final = 3
_SHORTEST_NUMBER: Final = 6


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


def sent_values(payload: Any) -> set[str]:
    """Every text of `payload` (decoded JSON) long enough to be worth masking, and every
    long number (a personal or member number sent as one), as text.
    """
    found: set[str] = set()
    stack = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if len(value) >= SHORTEST_VALUE:
                found.add(value)
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            text = str(value)
            if len(text) >= _SHORTEST_NUMBER:
                found.add(text)
    return found


def without(text: str, values: Iterable[str]) -> str:
    """`text` with each of `values` it holds replaced by ``***``, longest first (so a value
    inside a longer one does not leave the rest of it readable).
    """
    for value in sorted((v for v in set(values) if v and v in text), key=len, reverse=True):
        text = text.replace(value, "***")
    return text
