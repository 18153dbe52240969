"""`EngageSession`'s life and what it sends on every request, against `FakeEngage`.

Opening, closing and misuse; a borrowed `aiohttp.ClientSession`; the headers Engage requires
on every request; the API key kept out of every message; the client-side rate limit.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from helpers import USER_AGENT, make_config

import engage_async as ea
from engage_async.testing import FakeEngage

GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"

Use = Callable[[ea.EngageSession], Awaitable[object]]
USES: list[tuple[str, Use]] = [
    ("contact_overview", lambda s: s.contact_overview(contact_id=GUID)),
    ("find_contact_id", lambda s: s.find_contact_id(email="anna@example.com")),
    ("get_contact", lambda s: s.get_contact(GUID)),
    ("transactions", lambda s: s.transactions(GUID)),
    ("promotion_assignments", lambda s: s.promotion_assignments(GUID)),
    ("point_accounts", lambda s: s.point_accounts(GUID)),
    ("create_contact", lambda s: s.create_contact({"email": "anna@example.com"})),
    ("update_contact", lambda s: s.update_contact(GUID, {"firstName": "Anna"})),
    ("update_contact_type", lambda s: s.update_contact_type(GUID, "Member")),
    ("promote_to_member", lambda s: s.promote_to_member(GUID)),
    ("resolve", lambda s: s.resolve("ref_" + "0" * 32)),
]
EVERY_METHOD = pytest.mark.parametrize("use", [pytest.param(u, id=n) for n, u in USES])


# --- lifecycle -------------------------------------------------------------------------------


@pytest.fixture(name="made")
def made_fixture(monkeypatch: pytest.MonkeyPatch) -> list[aiohttp.ClientSession]:
    """Every `aiohttp.ClientSession` made during the test, in order (real ones, recorded)."""
    made: list[aiohttp.ClientSession] = []
    real = aiohttp.ClientSession

    def recording(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        http = real(*args, **kwargs)
        made.append(http)
        return http

    monkeypatch.setattr(aiohttp, "ClientSession", recording)
    return made


@EVERY_METHOD
async def test_use_before_open_raises(fake: FakeEngage, config: ea.EngageConfig, use: Use) -> None:
    """Every method of a session not yet opened raises `RuntimeError`, and nothing is sent."""
    session = ea.EngageSession(config)

    with pytest.raises(RuntimeError, match="not open"):
        await use(session)

    assert [] == fake.requests
    await session.close()


@EVERY_METHOD
async def test_use_after_close_raises(fake: FakeEngage, config: ea.EngageConfig, use: Use) -> None:
    """Every method of a closed session raises `RuntimeError`, and nothing is sent."""
    async with ea.EngageSession(config) as session:
        pass

    with pytest.raises(RuntimeError, match="closed"):
        await use(session)

    assert [] == fake.requests


async def test_closed_session_cannot_be_reopened(
    fake: FakeEngage, config: ea.EngageConfig, made: list[aiohttp.ClientSession]
) -> None:
    """A closed session stays closed: neither `open` nor ``async with`` revives it. The failed
    attempts open no new HTTP session, and the session still refuses calls without sending.
    """
    session = ea.EngageSession(config)
    await session.open()
    await session.close()

    with pytest.raises(RuntimeError, match="closed"):
        await session.open()
    with pytest.raises(RuntimeError, match="closed"):
        async with session:
            pass
    with pytest.raises(RuntimeError, match="closed"):
        await session.find_contact_id(email="anna@example.com")

    assert ([True], []) == ([http.closed for http in made], fake.requests)


async def test_open_twice_raises(session: ea.EngageSession) -> None:
    """Opening an open session raises `RuntimeError` and leaves it working."""
    with pytest.raises(RuntimeError, match="open"):
        await session.open()

    assert not session.closed
    assert None is await session.find_contact_id(email="nobody@example.com")


async def test_close_is_idempotent(config: ea.EngageConfig) -> None:
    """`close` may be called again, and on a session that was never opened."""
    never_opened = ea.EngageSession(config)
    await never_opened.close()
    await never_opened.close()

    session = ea.EngageSession(config)
    await session.open()
    assert not session.closed
    await session.close()
    await session.close()

    assert (True, True) == (never_opened.closed, session.closed)


async def test_open_and_close_without_async_with(fake: FakeEngage, config: ea.EngageConfig) -> None:
    """`open` and `close` work as ``async with`` does."""
    contact_id = fake.add_contact({"email": "anna@example.com"})
    session = ea.EngageSession(config)
    await session.open()
    try:
        found = await session.find_contact_id(email="anna@example.com")
    finally:
        await session.close()

    assert contact_id == found


@pytest.mark.parametrize(
    "config",
    [None, {"base_url": "http://127.0.0.1", "api_key": "k", "user_agent": "A/1"}, "http://x"],
    ids=["none", "dict", "url"],
)
def test_config_must_be_an_engage_config(config: object) -> None:
    """Anything but an `EngageConfig` is refused with `TypeError` at construction."""
    with pytest.raises(TypeError, match="EngageConfig"):
        ea.EngageSession(config)  # type: ignore[arg-type]


async def test_borrowed_http_session_is_used_and_left_open(
    fake: FakeEngage, config: ea.EngageConfig
) -> None:
    """A `aiohttp.ClientSession` passed as `http` carries the requests, and is still open
    (and usable) after the `EngageSession` closes: its owner closes it.
    """
    contact_id = fake.add_contact({"email": "anna@example.com"})
    async with aiohttp.ClientSession(headers={"X-Host-Framework": "shop"}) as http:
        async with ea.EngageSession(config, http=http) as session:
            found = await session.find_contact_id(email="anna@example.com")

        assert not http.closed
        async with http.get(f"{fake.url}/api/v3/contacts/{contact_id}") as response:
            status = response.status

    assert contact_id == found
    assert "shop" == fake.requests[0].headers["X-Host-Framework"]
    assert 2 == len(fake.requests)
    assert 401 == status  # the host's own request, without the session's headers


async def test_own_http_session_is_closed(
    fake: FakeEngage, config: ea.EngageConfig, made: list[aiohttp.ClientSession]
) -> None:
    """The aiohttp session a `EngageSession` made is closed with it (no unclosed warning).

    Asserted on the `aiohttp.ClientSession` itself: `EngageSession.closed` turns True before
    anything is closed, so it cannot tell.
    """
    async with ea.EngageSession(config) as session:
        await session.find_contact_id(email="nobody@example.com")
        open_inside = [http.closed for http in made]

    assert ([False], [True]) == (open_inside, [http.closed for http in made])


# --- headers and secrets ---------------------------------------------------------------------


async def test_headers_on_every_request(fake: FakeEngage, session: ea.EngageSession) -> None:
    """Every request, GETs included, carries ``apikey``, the configured ``User-Agent`` and
    ``Content-Type: application/json``; the key never travels in the URL.
    """
    contact_id = fake.add_contact({"email": "anna@example.com"}, contact_type="Contact")
    await session.find_contact_id(email="anna@example.com")
    await session.contact_overview(contact_id=contact_id)
    await session.get_contact(contact_id)
    await session.transactions(contact_id)
    await session.promotion_assignments(contact_id)
    await session.point_accounts(contact_id)
    await session.create_contact({"email": "bo@example.com"})
    await session.update_contact(contact_id, {"firstName": "Anna"})
    await session.promote_to_member(contact_id)

    assert [
        "GET",
        "GET",
        "GET",
        "GET",
        "GET",
        "GET",
        "GET",
        "POST",
        "PATCH",
        "POST",
    ] == [request.method for request in fake.requests]
    for request in fake.requests:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        assert (fake.api_key, USER_AGENT, "application/json") == (
            request.headers.get("apikey"),
            request.headers.get("User-Agent"),
            content_type,
        ), f"{request.method} {request.path}"
        assert fake.api_key not in request.path + request.raw_query


SECRET = "sekret-api-key-4711"


@pytest.fixture(name="secret_fake")
async def secret_fake_fixture() -> AsyncIterator[FakeEngage]:
    """A FakeEngage whose API key is easy to spot in a text."""
    async with FakeEngage(api_key=SECRET, rate_limit=None) as fake:
        yield fake


def leaks(secret: str, exc: BaseException) -> bool:
    """Does `secret` appear in the exception, its chain, its repr or its formatted traceback?"""
    texts = ["".join(traceback.format_exception(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen), repr(seen.args), str(getattr(seen, "body", ""))]
        seen = seen.__cause__ or seen.__context__
    return any(secret in text for text in texts)


async def test_api_key_never_in_exceptions_or_reprs(
    secret_fake: FakeEngage, tmp_path: Path
) -> None:
    """Neither the right key nor a wrong one shows in any exception (message, repr, chain,
    traceback) or in the session's and config's reprs.
    """
    fake = secret_fake
    contact_id = fake.add_contact({"email": "anna@example.com"})
    config = make_config(fake.url, SECRET, tmp_path, breaker_threshold=6, retry_attempts=1)
    wrong = make_config(fake.url, "sekret-wrong-key-0815", tmp_path)
    caught: list[BaseException] = []

    async def expect(error: type[BaseException], call: Awaitable[object]) -> None:
        with pytest.raises(error) as info:
            await call
        caught.append(info.value)

    async with ea.EngageSession(wrong) as session:
        await expect(ea.EngageAuthError, session.get_contact(contact_id))
        assert "sekret-wrong-key-0815" not in repr(session) + repr(wrong)
    async with ea.EngageSession(config) as session:
        await expect(ea.ContactNotFound, session.get_contact(GUID))
        await expect(ea.EngageValidationError, session.update_contact(contact_id, {"email": "x"}))
        await expect(ea.InvalidRequest, session.find_contact_id(email="x"))
        await expect(ea.EmptyValueError, session.update_contact(contact_id, {"email": ""}))
        fake.inject("server_error", times=1)
        await expect(ea.EngageServerError, session.get_contact(contact_id))
        fake.inject("hang", times=1)
        await expect(ea.EngageTimeout, session.get_contact(contact_id))
        await fake.go_down()
        await expect(ea.EngageConnectionError, session.get_contact(contact_id))
        for _ in range(4):
            with pytest.raises(ea.EngageUnavailable):
                await session.get_contact(contact_id)
        await expect(ea.CircuitOpen, session.get_contact(contact_id))
        assert SECRET not in repr(session) + repr(config) + str(config)

    assert 9 == len(caught)
    assert [] == [type(exc).__name__ for exc in caught if leaks(SECRET, exc)]
    assert [] == [type(exc).__name__ for exc in caught if leaks("sekret-wrong-key-0815", exc)]


# --- rate limit ------------------------------------------------------------------------------


async def test_client_side_rate_limit(fake: FakeEngage, tmp_path: Path) -> None:
    """With ``rate_limit=5``, a burst of 12 calls reaches Engage at no more than five in any
    one-second window, and every call is answered.
    """
    contact_id = fake.add_contact({"email": "anna@example.com"})
    config = make_config(
        fake.url, fake.api_key, tmp_path, rate_limit=5.0, interactive_deadline=10.0
    )

    async with ea.EngageSession(config) as session:
        found = await asyncio.gather(
            *(session.find_contact_id(email="anna@example.com") for _ in range(12))
        )

    assert [contact_id] * 12 == found
    assert 12 == len(fake.requests)
    assert fake.peak_rate(1.0) <= 5


async def test_rate_limit_holds_at_engage_when_new_connections_are_slow(
    fake: FakeEngage, config: ea.EngageConfig
) -> None:
    """The limit holds as Engage counts, by arrival: when the first requests of a burst take
    longer to arrive (new connections need a TLS handshake; here 50 ms, added by a trace hook
    on the borrowed aiohttp session) than the later ones on kept-alive connections, Engage
    still never sees more than `rate_limit` requests in any one second.
    """
    fake.add_contact({"email": "anna@example.com"})
    config = attrs.evolve(config, rate_limit=5.0, interactive_deadline=10.0)

    async def handshake(*_: object) -> None:
        await asyncio.sleep(0.05)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(handshake)
    async with (
        aiohttp.ClientSession(trace_configs=[trace]) as http,
        ea.EngageSession(config, http=http) as session,
    ):
        await asyncio.gather(
            *(session.find_contact_id(email="anna@example.com") for _ in range(10))
        )

    assert 10 == len(fake.requests)
    assert fake.peak_rate(1.0) <= 5


async def test_rate_limit_wait_counts_against_the_write_deadline(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """Waiting for the client-side rate limit is part of a write's interactive deadline: a
    write that cannot be sent before its deadline is queued rather than delivered late.

    With one request a second and a 0.3 s deadline, the second of two simultaneous updates
    would have to wait about a second for its turn.
    """
    first = fake.add_contact({"email": "anna@example.com"})
    second = fake.add_contact({"email": "bo@example.com"})
    config = make_config(fake.url, fake.api_key, tmp_path, rate_limit=1.0, interactive_deadline=0.3)

    async with ea.EngageSession(config) as session:
        deliveries = await asyncio.gather(
            session.update_contact(first, {"firstName": "Anna"}),
            session.update_contact(second, {"firstName": "Bo"}),
        )

    assert [False, True] == [delivery.queued for delivery in deliveries]
    assert 1 == len(fake.requests)


async def test_failed_requests_give_their_rate_limit_slots_back(
    fake: FakeEngage, config: ea.EngageConfig
) -> None:
    """A request that fails (Engage refusing connections) frees its rate-limit slot as an
    answered one does: after more failures than the limit has slots, calls still go out.
    """
    guid = fake.add_contact({"email": "anna@example.com"})
    config = attrs.evolve(
        config, rate_limit=2.0, retry_attempts=1, breaker_threshold=100, interactive_deadline=3.0
    )
    async with ea.EngageSession(config) as session:
        await fake.go_down()
        for _ in range(3):
            with pytest.raises(ea.EngageUnavailable):
                await session.get_contact(guid)
        await fake.come_up()
        contact = await session.get_contact(guid)

    assert guid == contact.id
