"""Payload limits at the session: a payload the guard refuses sends nothing and queues nothing.

The limits themselves (depth, sizes, characters) are pinned in `test_wire.py`; here each kind
of refusal goes through `create_contact` and `update_contact` against `FakeEngage`, which
must not see a single request, and the outbox must stay empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import engage_async as ea
from engage_async._wire import MAX_DEPTH, MAX_PAYLOAD_BYTES, MAX_VALUE_BYTES
from engage_async.testing import FakeEngage

GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
EMAIL = "anna@example.com"


def deep(levels: int) -> dict[str, Any]:
    """``{"a": {"a": ... "x"}}`` with `levels` objects, built without recursion."""
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    result: dict[str, Any] = value
    return result


def deep_list(levels: int) -> list[Any]:
    """``[[..."x"...]]`` with `levels` lists, built without recursion."""
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    result: list[Any] = value
    return result


# (id, extra attributes, the field named in the error, as a suffix of the payload's name)
BAD: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("deep-objects", lambda: {"custom": deep(1000)}, ".custom" + ".a" * (MAX_DEPTH - 1)),
    ("deep-lists", lambda: {"tags": deep_list(1000)}, ".tags" + "[0]" * (MAX_DEPTH - 1)),
    ("surrogate-value", lambda: {"lastName": "Lind\ud800gren"}, ".lastName"),
    ("surrogate-name", lambda: {"preferences": {"accepts\udc00Sms": True}}, ".preferences"),
    ("nul-value", lambda: {"firstName": "An\x00na"}, ".firstName"),
    ("nul-name", lambda: {"first\x00Name": "Anna"}, ""),
    ("oversize-value", lambda: {"note": "x" * (MAX_VALUE_BYTES + 1)}, ".note"),
    (
        "oversize-payload",
        lambda: {f"note{i}": "x" * (MAX_VALUE_BYTES - 64) for i in range(5)},
        "",
    ),
]
EVERY_BAD_PAYLOAD = pytest.mark.parametrize(
    ("extra", "suffix"), [pytest.param(make, suffix, id=name) for name, make, suffix in BAD]
)


def test_the_oversize_payload_case_is_over_the_limit() -> None:
    """The "oversize-payload" case is larger than MAX_PAYLOAD_BYTES with no value over
    MAX_VALUE_BYTES, so it tests the payload limit and not the value limit.
    """
    values = {name: make for name, make, _ in BAD}["oversize-payload"]()

    assert (True, True) == (
        sum(len(v) for v in values.values()) > MAX_PAYLOAD_BYTES,
        all(len(v) <= MAX_VALUE_BYTES for v in values.values()),
    )


@EVERY_BAD_PAYLOAD
async def test_create_contact_sends_nothing(
    fake: FakeEngage, session: ea.EngageSession, extra: Callable[[], dict[str, Any]], suffix: str
) -> None:
    """`create_contact` with a payload over a limit raises `PayloadError` naming the field,
    and Engage receives no request at all (not even the lookup before the create).
    """
    with pytest.raises(ea.PayloadError) as info:
        await session.create_contact({"email": EMAIL, **extra()})

    assert ("attributes" + suffix, []) == (info.value.field, fake.requests)


@EVERY_BAD_PAYLOAD
async def test_update_contact_sends_nothing(
    fake: FakeEngage, session: ea.EngageSession, extra: Callable[[], dict[str, Any]], suffix: str
) -> None:
    """`update_contact` with a payload over a limit raises `PayloadError` naming the field,
    and Engage receives no request at all.
    """
    with pytest.raises(ea.PayloadError) as info:
        await session.update_contact(GUID, {"firstName": "Anna", **extra()})

    assert ("changes" + suffix, []) == (info.value.field, fake.requests)


@EVERY_BAD_PAYLOAD
async def test_refused_while_engage_is_down_queues_nothing(
    fake: FakeEngage,
    session: ea.EngageSession,
    config: ea.EngageConfig,
    extra: Callable[[], dict[str, Any]],
    suffix: str,
) -> None:
    """With Engage down, a refused payload is not queued either: the outbox stays empty."""
    await fake.go_down()

    with pytest.raises(ea.PayloadError):
        await session.update_contact(GUID, {"firstName": "Anna", **extra()})
    with pytest.raises(ea.PayloadError):
        await session.create_contact({"email": EMAIL, **extra()})

    async with ea.OutboxAdmin(config.outbox_path) as admin:
        stats = await admin.stats()
    assert 0 == sum(stats.by_state.values())


async def test_payload_error_never_repeats_the_value(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """The error names the field and the reason, never the refused text (personal data)."""
    with pytest.raises(ea.PayloadError) as info:
        await session.create_contact({"email": EMAIL, "lastName": "Lindgren\x00"})

    assert "Lindgren" not in str(info.value) + repr(info.value)
    assert [] == fake.requests


@pytest.mark.parametrize("flag", ["false", "true", 1, 0, None])
async def test_create_as_unapproved_accepts_only_a_bool(
    fake: FakeEngage, session: ea.EngageSession, flag: object
) -> None:
    """`create_as_unapproved` is a bool: "false" (truthy) or 1 is a `TypeError` naming the
    argument, before any request.
    """
    with pytest.raises(TypeError, match=r"^create_as_unapproved: "):
        await session.create_contact({"email": EMAIL}, create_as_unapproved=flag)  # type: ignore[arg-type]

    assert [] == fake.requests
