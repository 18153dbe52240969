"""No exception engage-async raises holds the API key, a query string or personal data,
however deep one looks.

Each failure kind is provoked against `FakeEngage` by a lookup whose query holds an email,
with a recognisable API key; then everything reachable from the exception is walked
(``__cause__``, ``__context__``, ``args``, attribute values, recursively through nested
exceptions and containers; not traceback frames) and the text `Logger.exception` writes is
checked as well.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from helpers import make_config

import engage_async as ea
from engage_async.testing import FakeEngage

KEY: Final = "sekrit-key-123"
EMAIL: Final = "anna.svensson@example.com"
# The key, the email in every form a URL or page gives it, and a query string naming it.
SECRETS: Final = (KEY, EMAIL, quote(EMAIL, safe=""), quote_plus(EMAIL), "?email=")
FOREIGN: Final = ("aiohttp", "yarl", "multidict")

Call = Callable[[ea.EngageSession], Awaitable[Any]]


def find_contact_id(session: ea.EngageSession) -> Awaitable[Any]:
    """A lookup by email: the email travels in the query string."""
    return session.find_contact_id(email=EMAIL)


def contact_overview(session: ea.EngageSession) -> Awaitable[Any]:
    """An overview by email: the email travels in the query string."""
    return session.contact_overview(email=EMAIL, contact_type="Member")


def reachable(root: BaseException) -> Iterator[object]:
    """Every object reachable from `root` through what a logger, a debugger or an error
    tracker reads: causes, contexts, args, attribute values, container members.
    """
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, BaseException):
            stack += [item.__cause__, item.__context__, *item.args, *vars(item).values()]
            if isinstance(item, BaseExceptionGroup):
                stack += item.exceptions
        elif isinstance(item, Mapping):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple | set | frozenset):
            stack += list(item)
        elif not isinstance(item, str | bytes | int | float | bool) and hasattr(item, "__dict__"):
            stack += list(vars(item).values())


def leaks(root: BaseException, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    """What is wrong with `root`: secrets in any reachable text, or foreign objects."""
    found = []
    for item in reachable(root):
        module = type(item).__module__
        if module.split(".")[0] in FOREIGN:
            found.append(f"{type(item).__qualname__} from {module}")
        texts = {repr(item), str(item)}
        if isinstance(item, bytes):
            texts.add(item.decode("utf-8", errors="replace"))
        found += [
            f"{secret!r} in {type(item).__name__}"
            for secret in secrets
            if any(secret in text for text in texts)
        ]
    return sorted(set(found))


def logged(exc: BaseException) -> str:
    """What `Logger.exception` writes for `exc`, raised and caught as an app would."""
    stream = io.StringIO()
    logger = logging.getLogger("test_exception_secrets")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise exc
        except ea.EngageError:
            logger.exception("Engage call failed")
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


async def provoke(session: ea.EngageSession, call: Call) -> ea.EngageError:
    """Run `call` and return the EngageError it raises (failing if it raises none)."""
    with pytest.raises(ea.EngageError) as info:
        await asyncio.wait_for(call(session), 10)
    return info.value


@pytest.fixture(name="keyed")
async def keyed_fixture() -> Any:
    """A FakeEngage accepting only `KEY`."""
    async with FakeEngage(api_key=KEY, rate_limit=None) as fake:
        yield fake


@pytest.fixture(name="secret_config")
def secret_config_fixture(keyed: FakeEngage, tmp_path: Path) -> ea.EngageConfig:
    """A config with `KEY`, quick deadlines and a small answer limit."""
    return make_config(
        keyed.url,
        KEY,
        tmp_path,
        interactive_deadline=0.5,
        retry_attempts=2,
        max_answer_bytes=64 * 1024,
    )


ECHO = {
    "errorCode": "InvalidEmailAddress",
    "message": f"{EMAIL} is not valid (GET /api/v3/contacts/id?email={quote(EMAIL)})",
    "messageDetails": {"email": EMAIL, "seen": [f"apikey {KEY}", {"query": f"email={EMAIL}"}]},
}
PAGE = (
    f"<html><body><h1>Error</h1><p>GET https://tenant.voyado.com/api/v3/contacts/id?"
    f"email={quote(EMAIL, safe='')}</p><p>apikey: {KEY}</p><p>{EMAIL}</p></body></html>"
)

# (kind, options, expected exception) for `FakeEngage.inject`.
FAULTS = [
    pytest.param("drop", {}, ea.EngageConnectionError, id="connection-lost"),
    pytest.param("lost_reply", {}, ea.EngageConnectionError, id="reply-lost"),
    pytest.param("hang", {}, ea.EngageTimeout, id="timeout"),
    pytest.param("status", {"status": 400, "body": ECHO}, ea.InvalidRequest, id="400-echo"),
    pytest.param(
        "status",
        {"status": 409, "body": {**ECHO, "errorCode": "MultipleMatches"}},
        ea.MultipleMatches,
        id="409-echo",
    ),
    pytest.param("status", {"status": 422, "body": ECHO}, ea.EngageValidationError, id="422-echo"),
    pytest.param("status", {"status": 429, "body": ECHO}, ea.RateLimited, id="429-echo"),
    pytest.param("status", {"status": 500, "body": ECHO}, ea.EngageServerError, id="500-echo"),
    pytest.param(
        "status",
        {"status": 502, "body": PAGE, "content_type": "text/html"},
        ea.EngageServerError,
        id="502-page",
    ),
    pytest.param(
        "status",
        {"status": 404, "body": PAGE, "content_type": "text/html"},
        ea.UnexpectedResponse,
        id="404-page",
    ),
    pytest.param("status", {"status": 302, "body": ECHO}, ea.UnexpectedResponse, id="302"),
    pytest.param(
        "status",
        {"status": 200, "body": PAGE, "content_type": "text/html"},
        ea.UnexpectedResponse,
        id="200-page",
    ),
    pytest.param(
        "status",
        {"status": 200, "body": f'"{EMAIL} {KEY}",' * 5000},
        ea.UnexpectedResponse,
        id="oversize",
    ),
]


@pytest.mark.parametrize("call", [find_contact_id, contact_overview])
@pytest.mark.parametrize(("kind", "options", "expected"), FAULTS)
async def test_failures_carry_no_secrets(
    keyed: FakeEngage,
    secret_config: ea.EngageConfig,
    call: Call,
    kind: Any,
    options: dict[str, Any],
    expected: type[ea.EngageError],
) -> None:
    """Whatever failed, nothing reachable from the exception, nor what a logger prints of
    it, holds the API key, the email (plain or percent-encoded), a query string or an
    aiohttp object.
    """
    keyed.inject(kind, **options)
    async with ea.EngageSession(secret_config) as session:
        exc = await provoke(session, call)

    assert expected is type(exc)
    assert [] == leaks(exc)
    assert [] == [secret for secret in SECRETS if secret in logged(exc)]


LAST_NAME: Final = "Ålandersson"
STREET: Final = "Storgatan 12"
MEMBER_NUMBER: Final = 19121212
# What a write sends in its body that no pattern recognises: a name, a street, a number.
BODY_SECRETS: Final = (LAST_NAME, "\\u00c5landersson", STREET, str(MEMBER_NUMBER))
WRITE_ECHO = {
    "errorCode": "InvalidAttribute",
    "message": f"lastName {LAST_NAME} at {STREET} ({MEMBER_NUMBER}) refused",
    "messageDetails": {"lastName": [LAST_NAME], "street": STREET, "number": MEMBER_NUMBER},
}
GUID: Final = "2e40b702-2767-4abe-ae99-aa510108e22b"
WRITE_BODY: Final = {"lastName": LAST_NAME, "street": STREET, "memberNumber": MEMBER_NUMBER}


def update_contact(session: ea.EngageSession) -> Awaitable[Any]:
    """An update whose body holds a name, a street and a number."""
    return session.update_contact(GUID, WRITE_BODY)


def create_contact(session: ea.EngageSession) -> Awaitable[Any]:
    """A create whose body holds the email, a name, a street and a number."""
    return session.create_contact({"email": EMAIL, **WRITE_BODY}, contact_type="Member")


@pytest.mark.parametrize("call", [update_contact, create_contact])
@pytest.mark.parametrize(
    ("status", "expected"),
    [(400, ea.InvalidRequest), (422, ea.EngageValidationError)],
)
async def test_a_write_refused_with_its_own_values_echoed_carries_none_of_them(
    keyed: FakeEngage,
    secret_config: ea.EngageConfig,
    call: Call,
    status: int,
    expected: type[ea.EngageError],
) -> None:
    """Engage's refusal of a write may repeat what it was sent (JSON escapes included): no
    value of the body, recognisable or not, is in the exception or what a logger prints.
    """
    keyed.add_contact({"email": "someone.else@example.com"}, contact_id=GUID)
    keyed.inject("status", method="PATCH", status=status, body=WRITE_ECHO)
    keyed.inject("status", method="POST", status=status, body=WRITE_ECHO)
    async with ea.EngageSession(secret_config) as session:
        exc = await provoke(session, call)

    assert expected is type(exc)
    assert [] == leaks(exc, SECRETS + BODY_SECRETS)
    assert [] == [secret for secret in SECRETS + BODY_SECRETS if secret in logged(exc)]
    assert "lastName" in exc.details  # the answer's shape is kept, only the values go


@pytest.mark.parametrize("call", [find_contact_id, contact_overview])
async def test_connection_refused_carries_no_secrets(
    keyed: FakeEngage, secret_config: ea.EngageConfig, call: Call
) -> None:
    """Refused at connect: an `EngageConnectionError` naming the network error, and nothing
    of aiohttp's behind it.
    """
    async with ea.EngageSession(secret_config) as session:
        await keyed.go_down()
        exc = await provoke(session, call)

    assert isinstance(exc, ea.EngageConnectionError)
    assert (False, "ClientConnectorError, ECONNREFUSED") == (exc.request_sent, exc.network_error)
    assert [] == leaks(exc)
    assert [] == [secret for secret in SECRETS if secret in logged(exc)]


async def test_connect_timeout_of_a_lent_session_carries_no_secrets(
    keyed: FakeEngage, tmp_path: Path
) -> None:
    """aiohttp's ConnectionTimeoutError puts the whole URL, query and email included, in its
    text (a lent session with a connect timeout and a full pool gives one): none of it
    reaches the `EngageConnectionError`.
    """
    config = make_config(keyed.url, KEY, tmp_path, retry_attempts=1, interactive_deadline=2.0)
    busy = keyed.inject("hang", path="/api/v3/contacts/*-*")
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(connect=0.1)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
        ea.EngageSession(config, http=http) as session,
    ):
        holder = asyncio.create_task(session.get_contact("2e40b702-2767-4abe-ae99-aa510108e22b"))
        async with asyncio.timeout(5):  # until it holds the only connection
            while not busy.hits:
                await asyncio.sleep(0.01)
        try:
            exc = await provoke(session, find_contact_id)
        finally:
            keyed.remove(busy)
            with pytest.raises(ea.EngageError):
                await holder

    assert isinstance(exc, ea.EngageConnectionError)
    assert (False, "ConnectionTimeoutError") == (exc.request_sent, exc.network_error)
    assert [] == leaks(exc)
    assert [] == [secret for secret in SECRETS if secret in logged(exc)]


async def test_leaks_finds_what_it_looks_for() -> None:
    """The walk itself: a secret hidden deep in a cause's attributes, or an aiohttp object
    in a context, is found.
    """
    inner = ValueError("plain")
    inner.details = {"deep": [("x", {"y": f"email={EMAIL}"})]}  # type: ignore[attr-defined]
    outer = ea.EngageTimeout("outer")
    outer.__cause__ = inner
    other = ea.EngageTimeout("other")
    other.__context__ = aiohttp.ServerDisconnectedError()

    assert [f"{EMAIL!r} in {kind}" for kind in ("dict", "list", "str", "tuple")] == leaks(outer)
    assert ["ServerDisconnectedError from aiohttp.client_exceptions"] == leaks(other)
