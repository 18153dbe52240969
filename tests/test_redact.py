"""Keeping personal data out of messages: `scrub` and `mask`."""

from __future__ import annotations

import pytest

from engage_async._redact import MAX_TEXT, mask, scrub

GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bad email anna@example.com here", "bad email *** here"),
        ("bad email anna.svensson+news@mail.example.se.", "bad email ***"),
        ("phone +46701234567 invalid", "phone *** invalid"),
        ("phone +46 70-123 45 67 invalid", "phone *** invalid"),
        ("phone 0701234567", "phone ***"),
        ("ssn 198506059738", "ssn ***"),
        ("ssn 19850605-9738", "ssn ***"),
        ("ssn 850605-9738", "ssn ***"),
        ('{"email":"anna@example.com"}', '{"email":"***"}'),
        ("<p>anna@example.com</p>", "<p>***</p>"),
    ],
)
def test_scrub_removes_personal_data(text: str, expected: str) -> None:
    """Emails, phone numbers and personal numbers become ***."""
    assert expected == scrub(text)


@pytest.mark.parametrize(
    "text",
    [
        f"contact {GUID} not found",
        f"contact {GUID.upper()} not found",
        "ValidationError: zipCode",
        "error 404, code 1234567",
        "An error has occurred.",
    ],
)
def test_scrub_keeps_what_is_not_personal(text: str) -> None:
    """Contact ids, codes and short numbers are kept as they are."""
    assert text == scrub(text)


def test_scrub_truncates() -> None:
    """Text longer than the limit is cut to the limit and marked with ..."""
    assert "a" * MAX_TEXT + "..." == scrub("a" * (MAX_TEXT * 5))


def test_scrub_custom_limit() -> None:
    """The limit can be given."""
    assert "abcde..." == scrub("abcdefghij", limit=5)


def test_scrub_short_text_not_marked() -> None:
    """Text within the limit is not marked as cut."""
    assert "a" * MAX_TEXT == scrub("a" * MAX_TEXT)


@pytest.mark.parametrize(
    ("personal", "fragment"),
    [
        ("anna.svensson@example.com", "anna.svens"),
        ("+46701234567", "+4670123"),
        ("198506059738", "1985060"),
    ],
)
def test_scrub_leaves_no_fragment_at_the_cut(personal: str, fragment: str) -> None:
    """Personal data straddling the cut is scrubbed too, not left as a readable fragment.

    Truncating before scrubbing leaves the start of an email (a name) or of a personal number
    (a birth date) that no longer matches the patterns.
    """
    text = "x" * (MAX_TEXT - 1 - len(fragment)) + " " + personal + " rest"

    assert fragment not in scrub(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("anna@example.com", "a***@e***.com"),
        ("anna.svensson@mail.example.se", "a***@m***.se"),
        ("anna@localhost", "a***@l***"),
        ("+46701234567", "+4********67"),
        ("198506059738", "19********38"),
        ("Svenssonberg", "Sv********rg"),
        ("12345", "1***"),
        ("Anna", "A***"),
        ("Bo", "***"),
        ("", "***"),
    ],
)
def test_mask(value: str, expected: str) -> None:
    """mask keeps a hint: the first letters of email parts, the ends of long values, and of a
    short value (eight characters or fewer) only its first letter.
    """
    assert expected == mask(value)


@pytest.mark.parametrize(
    "value", ["anna.svensson@example.com", "+46701234567", "198506059738", "Svenssonberg"]
)
def test_mask_never_returns_the_value(value: str) -> None:
    """A masked value never equals, nor contains, the value it masks."""
    assert value not in mask(value)
