"""The control API of ``engage-async simulate``, as a test in another language would use it.

The end-to-end tests start the real command as a subprocess and drive it with plain aiohttp,
knowing only what it prints; the rest serve the control API in-process for speed.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engage_async.testing import FakeEngage
from engage_async.testing._control import ControlServer

SCRIPT = Path(sys.executable).with_name("engage-async")
USER_AGENT = "OtherLanguageTests/2.0"
# Generous, so a broken command fails the test instead of hanging it; never asserted.
PATIENCE = 60.0


def engage_headers(key: str) -> dict[str, str]:
    """The headers Engage asks for."""
    return {"apikey": key, "User-Agent": USER_AGENT, "Content-Type": "application/json"}


async def engage_get(url: str, key: str, path: str, **params: str) -> tuple[int, Any]:
    """GET from the simulated Engage; (status, JSON body)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}{path}", params=params, headers=engage_headers(key)) as response,
    ):
        return response.status, await response.json(content_type=None)


async def control(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """Call the control API; (status, JSON body)."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body) as response,
    ):
        return response.status, await response.json()


@pytest.fixture(name="simulator")
async def fixture_simulator() -> AsyncIterator[tuple[str, str, str]]:
    """Start `engage-async simulate --port 0 --control-port 0` and read the printed addresses;
    yield (engage url, api key, control url); stop it with SIGTERM afterwards.
    """
    process = await asyncio.create_subprocess_exec(
        SCRIPT,
        "simulate",
        "--port",
        "0",
        "--control-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(PATIENCE):
            first = (await process.stdout.readline()).decode()
            second = (await process.stdout.readline()).decode()
        engage = re.fullmatch(r"FakeEngage listening on (\S+) \(api key: (\S+)\)\n", first)
        control_line = re.fullmatch(r"Control API on (http://127\.0\.0\.1:\d+)/control\n", second)
        assert engage is not None, first
        assert control_line is not None, second
        yield engage[1], engage[2], control_line[1]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(PATIENCE):
            await process.communicate()
    assert 0 == process.returncode


async def test_an_outage_driven_through_the_control_api(simulator: tuple[str, str, str]) -> None:
    """`down` refuses connections to Engage while the control API keeps answering; `up`
    serves again on the same port; the log shows the requests that got through.
    """
    url, key, control_url = simulator

    before, _ = await engage_get(url, key, "/api/v3/contacts/id", email="a@example.com")
    down_status, down = await control("POST", f"{control_url}/control/down")
    with pytest.raises(aiohttp.ClientConnectionError):
        await engage_get(url, key, "/api/v3/contacts/id", email="b@example.com")
    up_status, up = await control("POST", f"{control_url}/control/up")
    after, _ = await engage_get(url, key, "/api/v3/contacts/id", email="c@example.com")
    _, log = await control("GET", f"{control_url}/control/requests")

    assert (404, 200, {"down": True}) == (before, down_status, down)
    assert (200, url, 404) == (up_status, up["url"], after)
    assert [("a@example.com", 0), ("c@example.com", 1)] == [
        (entry["query"]["email"], entry["index"]) for entry in log
    ]


async def test_a_fault_injected_through_the_control_api(simulator: tuple[str, str, str]) -> None:
    """A fault posted to the control API hits matching requests `times` times; the log names
    it, shows the headers without the API key, and can be cleared.
    """
    url, key, control_url = simulator
    fault = {
        "kind": "rate_limited",
        "method": "GET",
        "path": "/api/v3/contacts/id",
        "times": 1,
        "retry_after": 2,
    }

    created_status, created = await control("POST", f"{control_url}/control/faults", fault)
    _, armed = await control("GET", f"{control_url}/control/faults")
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{url}/api/v3/contacts/id",
            params={"email": "x@example.com"},
            headers=engage_headers(key),
        ) as response,
    ):
        limited = (response.status, response.headers.get("Retry-After"))
    second, _ = await engage_get(url, key, "/api/v3/contacts/id", email="x@example.com")
    _, log = await control("GET", f"{control_url}/control/requests")
    _, disarmed = await control("GET", f"{control_url}/control/faults")
    cleared_status, _ = await control("DELETE", f"{control_url}/control/requests")
    _, emptied = await control("GET", f"{control_url}/control/requests")

    assert (201, "rate_limited", 1) == (created_status, created["kind"], created["id"])
    assert [(1, 0)] == [(f["id"], f["hits"]) for f in armed]
    assert ((429, "2"), 404) == (limited, second)
    assert ["rate_limited", None] == [entry["fault"] for entry in log]
    assert "apikey" not in {name.lower() for name in log[0]["headers"]}
    assert key not in str(log)
    assert USER_AGENT == log[0]["headers"]["User-Agent"]
    assert ([], 200, []) == (disarmed, cleared_status, emptied)


async def test_contacts_are_listed_with_their_types(simulator: tuple[str, str, str]) -> None:
    """`GET /control/contacts` lists every contact's id and type, and nothing personal."""
    url, key, control_url = simulator
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/api/v3/contacts",
            json={"email": "c@example.com", "contactType": "Contact"},
            headers=engage_headers(key),
        ) as response,
    ):
        created = await response.json()

    _, contacts = await control("GET", f"{control_url}/control/contacts")

    assert [{"id": created["id"], "contactType": "Contact"}] == contacts


# In-process --------------------------------------------------------------------------------


@pytest.fixture(name="served")
async def fixture_served() -> AsyncIterator[tuple[FakeEngage, str]]:
    """A FakeEngage and its control API in this process; yield the fake and the control url."""
    async with FakeEngage() as fake:
        server = ControlServer(fake)
        await server.start()
        try:
            yield fake, server.url
        finally:
            await server.close()


def test_control_binds_loopback_by_default() -> None:
    """The control API has no authentication: it listens on loopback unless told otherwise."""
    assert "127.0.0.1" == ControlServer(FakeEngage()).host


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "explode"}, "kind"),
        ({}, "kind"),
        ({"kind": "status", "status": 99}, "status"),
        ({"kind": "status", "status": "503"}, "status"),
        ({"kind": "slow", "delay": -1}, "delay"),
        ({"kind": "slow", "delay": "long"}, "delay"),
        ({"kind": "drop", "times": 0}, "times"),
        ({"kind": "drop", "times": 1.5}, "times"),
        ({"kind": "drop", "path": 3}, "path"),
        ({"kind": "drop", "colour": "red"}, "colour"),
        (["drop"], "body"),
    ],
)
async def test_a_malformed_fault_is_400_naming_the_field(
    served: tuple[FakeEngage, str], body: Any, field: str
) -> None:
    """A fault the fake cannot take is refused with 400, naming the field; nothing is armed."""
    fake, url = served

    status, answer = await control("POST", f"{url}/control/faults", body)

    assert (400, True) == (status, field in answer["error"])
    assert [] == fake._faults


async def engage_post(url: str, key: str, path: str, body: Any) -> tuple[int, Any]:
    """POST to the simulated Engage; (status, JSON body)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}{path}", json=body, headers=engage_headers(key)) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_a_hang_is_released_by_removing_the_fault(served: tuple[FakeEngage, str]) -> None:
    """A `hang` holds requests until `DELETE /control/faults/{id}` cuts them, unapplied; the
    fault is then gone.
    """
    fake, url = served
    _, fault = await control("POST", f"{url}/control/faults", {"kind": "hang", "method": "POST"})
    create = {"email": "held@example.com"}
    held = asyncio.create_task(engage_post(fake.url, fake.api_key, "/api/v3/contacts", create))
    async with asyncio.timeout(PATIENCE):
        while not fake.requests:
            await asyncio.sleep(0.01)

    removed_status, _ = await control("DELETE", f"{url}/control/faults/{fault['id']}")
    with pytest.raises(aiohttp.ClientConnectionError):
        async with asyncio.timeout(PATIENCE):
            await held
    again, _ = await control("DELETE", f"{url}/control/faults/{fault['id']}")
    created, _ = await engage_post(fake.url, fake.api_key, "/api/v3/contacts", create)

    assert (200, 404, 201) == (removed_status, again, created)
    assert 1 == len(fake.contacts)


async def test_the_log_reads_from_an_index(served: tuple[FakeEngage, str]) -> None:
    """`?since=N` returns the entries from index N on, so a client can read the log as it
    grows; a malformed `since` is 400.
    """
    fake, url = served
    for email in ("a@example.com", "b@example.com", "c@example.com"):
        await engage_get(fake.url, fake.api_key, "/api/v3/contacts/id", email=email)

    _, tail = await control("GET", f"{url}/control/requests?since=1")
    bad, _ = await control("GET", f"{url}/control/requests?since=-1")

    assert [(1, "b@example.com"), (2, "c@example.com")] == [
        (entry["index"], entry["query"]["email"]) for entry in tail
    ]
    assert 400 == bad


async def test_shapes_are_read_and_changed(served: tuple[FakeEngage, str]) -> None:
    """`PATCH /control/shapes` switches an answer shape; a bad entry is 400 and changes
    nothing.
    """
    fake, url = served

    status, shapes = await control("PATCH", f"{url}/control/shapes", {"contact_id": "id"})
    bad, _ = await control(
        "PATCH", f"{url}/control/shapes", {"error_body": "string", "batch_id": "xml"}
    )
    _, now = await control("GET", f"{url}/control/shapes")

    assert (200, "id") == (status, shapes["contact_id"])
    assert 400 == bad
    assert ("id", "error_code") == (now["contact_id"], now["error_body"])
    assert now == fake.shapes
