"""When the session queues a write, and that a queued write really is on disk.

Engage misbehaves through FakeEngage's faults; the outbox is always read back through a fresh
connection of the test's own (sqlite3, or asyncpg for PostgreSQL), so "on disk" means
committed where another process can see it, not held in the session's memory. The session
answering normally is tested elsewhere. Every test runs on both outbox backends, except those
about the SQLite file itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    BACKENDS,
    CONTACTS,
    LOOKUP,
    FakeClock,
    make_config,
    new_guid,
    outbox_rows,
    row_of,
)

import engage_async as ea
from engage_async._clock import SYSTEM_CLOCK
from engage_async.testing import FakeEngage

SCRIPTS = Path(__file__).parent / "scripts"
ONE_CONTACT = "/api/v3/contacts/*"
# Faults that hold a real socket: only the real clock runs out the deadline meanwhile.
HOLDING_FAULTS = {"hang", "slow"}


# --- helpers ---------------------------------------------------------------------------------


pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def paths(fake: FakeEngage) -> list[tuple[str, str]]:
    """(method, path) of every request that reached `fake`, in order."""
    return [(request.method, request.path) for request in fake.requests]


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    """The session's clock: its retries pass at once."""
    return FakeClock()


@pytest.fixture(name="session")
async def session_fixture(
    config: ea.EngageConfig, clock: FakeClock
) -> AsyncIterator[ea.EngageSession]:
    """An open EngageSession on `config` and the test's clock."""
    async with ea.EngageSession(config, clock=clock) as session:
        yield session


@pytest.fixture(name="real_time_session")
async def real_time_session_fixture(config: ea.EngageConfig) -> AsyncIterator[ea.EngageSession]:
    """An open EngageSession on `config` and the real clock, for a fault that holds a socket
    open: the interactive deadline then bounds the real time the request takes.
    """
    async with ea.EngageSession(config) as session:
        yield session


@pytest.fixture(name="down")
async def down_fixture(fake: FakeEngage) -> FakeEngage:
    """`fake`, refusing connections."""
    await fake.go_down()
    return fake


@pytest.fixture(name="known")
def known_fixture(fake: FakeEngage) -> str:
    """The GUID of a contact that exists in `fake`."""
    return fake.add_contact({"email": "known@example.com", "firstName": "Known"})


# --- updates Engage cannot take ----------------------------------------------------------------


async def test_update_queued_when_engage_is_down(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """Connection refused: the update is queued with a change_id and committed as sent."""
    guid = new_guid()

    delivery = await session.update_contact(guid, {"firstName": "Ann"})

    assert (True, guid) == (delivery.queued, delivery.contact_id)
    assert delivery.change_id is not None
    row = row_of(config, delivery.change_id)
    assert row is not None
    assert ("update", "pending", guid, f"id:{guid}", '{"firstName":"Ann"}') == (
        row["operation"],
        row["state"],
        row["contact_id"],
        row["contact_key"],
        row["body"],
    )


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        pytest.param("hang", {}, id="hang"),
        pytest.param("slow", {"delay": 5.0}, id="slow-beyond-deadline"),
        pytest.param("server_error", {"status": 502}, id="502-html"),
        pytest.param("server_error", {"status": 503}, id="503-html"),
        pytest.param("rate_limited", {}, id="429"),
        pytest.param("drop", {}, id="drop"),
        pytest.param("lost_reply", {}, id="lost-reply"),
    ],
)
async def test_update_queued_on_fault(
    fake: FakeEngage,
    known: str,
    config: ea.EngageConfig,
    clock: FakeClock,
    kind: Any,
    options: dict[str, Any],
) -> None:
    """No usable answer to a PATCH (every fault of that family) queues it, on disk."""
    fake.inject(kind, method="PATCH", **options)

    async with ea.EngageSession(
        config, clock=SYSTEM_CLOCK if kind in HOLDING_FAULTS else clock
    ) as session:
        delivery = await session.update_contact(known, {"firstName": "Changed"})

    assert (True, known) == (delivery.queued, delivery.contact_id)
    assert delivery.change_id is not None
    row = row_of(config, delivery.change_id)
    assert row is not None
    assert ("update", "pending", '{"firstName":"Changed"}') == (
        row["operation"],
        row["state"],
        row["body"],
    )


async def test_rate_limited_update_is_queued_after_the_retries(
    fake: FakeEngage, known: str, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A 429 is retried first; only when every attempt got 429 is the update queued."""
    fake.inject("rate_limited", method="PATCH")

    delivery = await session.update_contact(known, {"firstName": "Changed"})

    assert (True, config.retry_attempts) == (
        delivery.queued,
        len(fake.requests_to("PATCH", ONE_CONTACT)),
    )


async def test_rate_limited_with_retry_after_beyond_the_deadline_queues_at_once(
    fake: FakeEngage, known: str, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A Retry-After longer than the deadline is not waited out: the update is queued."""
    fake.inject("rate_limited", method="PATCH", retry_after=60)

    delivery = await session.update_contact(known, {"firstName": "Changed"})

    assert (True, 1) == (delivery.queued, len(fake.requests_to("PATCH", ONE_CONTACT)))
    assert delivery.change_id is not None
    assert row_of(config, delivery.change_id) is not None


async def test_contact_type_change_queued_when_down(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """update_contact_type is queued like an update, with the target type on its row."""
    guid = new_guid()

    delivery = await session.update_contact_type(guid, "Contact")

    assert delivery.queued
    assert delivery.change_id is not None
    row = row_of(config, delivery.change_id)
    assert row is not None
    assert ("contact_type", "Contact", guid) == (
        row["operation"],
        row["contact_type"],
        row["contact_id"],
    )


async def test_promote_to_member_queued_on_server_error(
    fake: FakeEngage, known: str, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """promote_to_member that meets 5xx is queued as a change of type to Member."""
    fake.inject("server_error", method="POST")

    delivery = await session.promote_to_member(known)

    assert delivery.queued
    assert delivery.change_id is not None
    row = row_of(config, delivery.change_id)
    assert row is not None
    assert ("contact_type", "Member") == (row["operation"], row["contact_type"])


# --- what is never queued ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, ea.InvalidRequest),
        (422, ea.EngageValidationError),
        (401, ea.EngageAuthError),
        (403, ea.EngageAuthError),
    ],
)
async def test_caller_errors_are_raised_not_queued(
    fake: FakeEngage,
    known: str,
    session: ea.EngageSession,
    config: ea.EngageConfig,
    status: int,
    error: type[Exception],
) -> None:
    """A 400, 422, 401 or 403 on an update is raised, and nothing reaches the outbox."""
    fake.inject("status", method="PATCH", status=status)

    with pytest.raises(error):
        await session.update_contact(known, {"firstName": "Changed"})

    assert [] == outbox_rows(config)


@pytest.mark.parametrize(
    ("status", "error"), [(400, ea.InvalidRequest), (422, ea.EngageValidationError)]
)
async def test_rejected_create_is_raised_not_queued(
    fake: FakeEngage,
    session: ea.EngageSession,
    config: ea.EngageConfig,
    status: int,
    error: type[Exception],
) -> None:
    """A create Engage rejects with 400 or 422 is raised, and nothing reaches the outbox."""
    fake.inject("status", method="POST", path=CONTACTS, status=status)

    with pytest.raises(error):
        await session.create_contact({"email": "new@example.com"})

    assert [] == outbox_rows(config)


async def test_update_of_unknown_contact_raises_not_found(
    fake: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A 404 on an update is ContactNotFound, raised, and never queued."""
    with pytest.raises(ea.ContactNotFound):
        await session.update_contact(new_guid(), {"firstName": "Nobody"})

    assert [] == outbox_rows(config)


# --- creates -------------------------------------------------------------------------------------


async def test_create_queued_when_down_is_not_looked_up_first(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A create that could not even be looked up is queued with a ref; its POST never left,
    so it is not marked to be looked up first (a contact made elsewhere meets Engage's 409).
    """
    delivery = await session.create_contact({"email": "new@example.com", "firstName": "New"})

    assert (True, None) == (delivery.queued, delivery.contact_id)
    assert delivery.change_id is not None
    assert delivery.ref is not None
    row = row_of(config, delivery.change_id)
    assert row is not None
    assert ("create", delivery.ref, f"ref:{delivery.ref}", "Member", "email", 0) == (
        row["operation"],
        row["ref"],
        row["contact_key"],
        row["contact_type"],
        row["key_name"],
        row["lookup_first"],
    )


async def test_create_hanging_after_post_is_queued_with_lookup_first(
    fake: FakeEngage, real_time_session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """The POST went out and hung: the outcome is unknown, so the row says look up first."""
    fake.inject("hang", method="POST", path=CONTACTS)

    delivery = await real_time_session.create_contact({"email": "new@example.com"})

    assert delivery.queued
    assert delivery.change_id is not None
    assert [("GET", LOOKUP), ("POST", CONTACTS)] == paths(fake)[:2]
    row = row_of(config, delivery.change_id)
    assert row is not None
    assert ("create", 1) == (row["operation"], row["lookup_first"])


async def test_create_with_lost_reply_and_failing_lookup_is_queued_with_lookup_first(
    fake: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """Engage applied the POST but the reply was lost, and the follow-up lookup fails too.

    The contact exists on Engage, so the queued row must say "look up before sending".
    """
    # The first lookup passes untouched (a slow fault of no delay, used once); later ones 502.
    fake.inject("slow", method="GET", path=LOOKUP, delay=0.0, times=1)
    fake.inject("server_error", method="GET", path=LOOKUP)
    fake.inject("lost_reply", method="POST", path=CONTACTS)

    delivery = await session.create_contact({"email": "new@example.com"})

    assert delivery.queued
    assert delivery.change_id is not None
    assert 1 == len(fake.find("email", "new@example.com"))
    row = row_of(config, delivery.change_id)
    assert row is not None
    assert ("create", 1) == (row["operation"], row["lookup_first"])


async def test_create_with_lost_reply_found_by_lookup_is_not_queued(
    fake: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A lost reply followed by a lookup that finds the contact: delivered, one contact, no row."""
    fake.inject("lost_reply", method="POST", path=CONTACTS, times=1)

    delivery = await session.create_contact({"email": "new@example.com"})

    found = fake.find("email", "new@example.com")
    assert (False, found, [], 1) == (
        delivery.queued,
        [delivery.contact_id],
        outbox_rows(config),
        len(fake.requests_to("POST", CONTACTS)),
    )


async def test_create_refused_at_connect_after_lookup_is_queued_without_lookup_first(
    fake: FakeEngage, config: ea.EngageConfig, clock: FakeClock
) -> None:
    """The lookup said 404, then every POST was refused at connect: nothing can have been
    created, so the queued create may be sent without a lookup.

    Engage goes down the moment the POST starts (an aiohttp trace hook); no keep-alive, so the
    POST needs a new connection and is refused.
    """

    async def down_before_post(
        _session: aiohttp.ClientSession, _context: Any, params: aiohttp.TraceRequestStartParams
    ) -> None:
        if params.method == "POST":
            await fake.go_down()

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(down_before_post)
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), trace_configs=[trace]
        ) as http,
        ea.EngageSession(config, http=http, clock=clock) as session,
    ):
        delivery = await session.create_contact({"email": "new@example.com"})

    assert delivery.queued
    assert delivery.change_id is not None
    assert [("GET", LOOKUP)] == paths(fake)
    row = row_of(config, delivery.change_id)
    assert row is not None
    assert ("create", 0) == (row["operation"], row["lookup_first"])


async def test_create_rolled_back_by_engage_is_queued_without_lookup_first(
    fake: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """504 RequestTimeOut on create is documented as rolled back: queued, no lookup needed."""
    fake.inject("create_timeout")

    delivery = await session.create_contact({"email": "new@example.com"})

    assert delivery.queued
    assert delivery.change_id is not None
    assert [] == fake.find("email", "new@example.com")
    row = row_of(config, delivery.change_id)
    assert row is not None
    assert ("create", 0) == (row["operation"], row["lookup_first"])


# --- the interactive deadline ---------------------------------------------------------------


@pytest.mark.parametrize("write", ["update", "create", "contact_type"])
async def test_deadline_holds_against_a_hang(
    fake: FakeEngage,
    known: str,
    real_time_session: ea.EngageSession,
    config: ea.EngageConfig,
    write: str,
) -> None:
    """Against an Engage that never answers, a write comes back queued, not stuck.

    The hang holds a real socket, so the deadline is on the real clock; the bound is loose
    (3x the deadline) on purpose: it catches a hang, not a slow machine.
    """
    fake.inject("hang")
    session = real_time_session
    calls: dict[str, Callable[[], Awaitable[ea.Delivery]]] = {
        "update": lambda: session.update_contact(known, {"firstName": "Changed"}),
        "create": lambda: session.create_contact({"email": "new@example.com"}),
        "contact_type": lambda: session.update_contact_type(known, "Contact"),
    }

    delivery = await asyncio.wait_for(calls[write](), timeout=3 * config.interactive_deadline)

    assert delivery.queued


# --- the circuit breaker ----------------------------------------------------------------------


@pytest.fixture(name="breaker_config")
def breaker_config_fixture(fake: FakeEngage, tmp_path: Path) -> ea.EngageConfig:
    """Three failures open the circuit for a minute."""
    return make_config(fake.url, fake.api_key, tmp_path, breaker_threshold=3, breaker_cooldown=60)


async def test_open_circuit_queues_without_a_request(
    fake: FakeEngage, breaker_config: ea.EngageConfig, clock: FakeClock
) -> None:
    """After `breaker_threshold` failures, writes are queued without touching Engage."""
    fake.inject("server_error")
    async with ea.EngageSession(breaker_config, clock=clock) as session:
        await session.update_contact(new_guid(), {"firstName": "Opens"})
        seen = len(fake.requests)
        assert breaker_config.breaker_threshold == seen

        update = await session.update_contact(new_guid(), {"firstName": "Skips"})
        create = await session.create_contact({"email": "new@example.com"})
        kind = await session.update_contact_type(new_guid(), "Contact")

    assert (True, True, True, seen) == (
        update.queued,
        create.queued,
        kind.queued,
        len(fake.requests),
    )
    ids = {row["change_id"] for row in outbox_rows(breaker_config)}
    assert {update.change_id, create.change_id, kind.change_id} <= ids


# Retry waits stay far below the cool-down, so a failed probe's retries meet an open circuit.
PROBE_SETTINGS: dict[str, Any] = {
    "breaker_threshold": 3,
    "breaker_cooldown": 30.0,
    "retry_initial_delay": 0.001,
    "retry_max_delay": 0.002,
}


async def test_after_cooldown_one_probe_goes_out_and_success_closes(
    fake: FakeEngage, known: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Once the cool-down has passed, one request probes; its success closes the circuit."""
    config = make_config(fake.url, fake.api_key, tmp_path, **PROBE_SETTINGS)
    fake.inject("server_error", times=3)
    async with ea.EngageSession(config, clock=clock) as session:
        await session.update_contact(new_guid(), {"firstName": "Opens"})
        clock.advance(config.breaker_cooldown + 0.001)  # a little more: the retries' jitter
        before = len(fake.requests)

        probe = await session.update_contact(known, {"firstName": "Probe"})
        probed = len(fake.requests) - before
        after = await session.update_contact(known, {"lastName": "Closed"})

    assert (False, 1, False) == (probe.queued, probed, after.queued)
    assert "Closed" == fake.contacts[known].attributes["lastName"]


async def test_failed_probe_sends_one_request_and_reopens(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A probe that fails reopens the circuit: one request went out, the write is queued."""
    config = make_config(fake.url, fake.api_key, tmp_path, **PROBE_SETTINGS)
    fake.inject("server_error")
    async with ea.EngageSession(config, clock=clock) as session:
        await session.update_contact(new_guid(), {"firstName": "Opens"})
        clock.advance(config.breaker_cooldown + 0.001)  # a little more: the retries' jitter
        before = len(fake.requests)

        probe = await session.update_contact(new_guid(), {"firstName": "Probe"})
        probed = len(fake.requests) - before
        again = await session.update_contact(new_guid(), {"firstName": "StillOpen"})

    assert (True, 1, True, before + 1) == (probe.queued, probed, again.queued, len(fake.requests))


# --- refs and order ---------------------------------------------------------------------------


async def test_changes_to_a_queued_create_wait_for_it_even_when_engage_is_back(
    fake: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A queued create's ref names the contact; changes to it queue behind the create and
    nothing about that contact is sent, even once Engage answers again.
    """
    await fake.go_down()
    created = await session.create_contact({"email": "new@example.com", "firstName": "New"})
    assert created.ref is not None
    await fake.come_up()
    fake.clear_requests()

    update = await session.update_contact(created.ref, {"lastName": "Later"})
    kind = await session.update_contact_type(created.ref, "Contact")
    promote = await session.promote_to_member(created.ref)

    assert [] == paths(fake)
    assert (True, True, True) == (update.queued, kind.queued, promote.queued)
    assert (created.ref, created.ref, created.ref) == (update.ref, kind.ref, promote.ref)
    rows = outbox_rows(config)
    assert [
        ("create", created.change_id, "Member"),
        ("contact_type", kind.change_id, "Contact"),
        ("contact_type", promote.change_id, "Member"),
    ] == [(row["operation"], row["change_id"], row["contact_type"]) for row in rows]
    assert (created.change_id, '{"lastName":"Later"}') == (update.change_id, rows[0]["folded"])
    assert {f"ref:{created.ref}"} == {row["contact_key"] for row in rows}


async def test_changes_to_a_queued_create_wait_while_it_is_down(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """While Engage is down, the ref works too: every change lands behind the create."""
    created = await session.create_contact({"email": "new@example.com"})
    assert created.ref is not None

    kind = await session.update_contact_type(created.ref, "Contact")
    update = await session.update_contact(created.ref, {"firstName": "After"})

    rows = outbox_rows(config)
    assert [created.change_id, kind.change_id, update.change_id] == [
        row["change_id"] for row in rows
    ]


async def test_change_to_contact_with_queued_changes_waits_while_engage_is_up(
    fake: FakeEngage, known: str, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A GUID with changes still queued: later changes to it queue behind them, unsent."""
    await fake.go_down()
    first = await session.update_contact(known, {"firstName": "First"})
    await fake.come_up()
    fake.clear_requests()

    kind = await session.update_contact_type(known, "Contact")
    update = await session.update_contact(known, {"firstName": "Second"})

    assert [] == paths(fake)
    assert (True, True, True) == (first.queued, kind.queued, update.queued)
    assert [first.change_id, kind.change_id, update.change_id] == [
        row["change_id"] for row in outbox_rows(config)
    ]
    assert "Known" == fake.contacts[known].attributes["firstName"]


async def test_change_to_another_contact_is_sent_at_once(
    fake: FakeEngage, known: str, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """Queued changes to one contact do not hold back a change to another."""
    await fake.go_down()
    waiting = await session.update_contact(new_guid(), {"firstName": "Waiting"})
    await fake.come_up()
    fake.clear_requests()

    sent = await session.update_contact(known, {"firstName": "Sent"})

    assert (True, False, None) == (waiting.queued, sent.queued, sent.change_id)
    assert [("PATCH", f"{CONTACTS}/{known}")] == paths(fake)
    assert [waiting.change_id] == [row["change_id"] for row in outbox_rows(config)]


# --- honest answers ---------------------------------------------------------------------------


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Hold the outbox's write lock from another connection, as another process would."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


@pytest.fixture(name="impatient_session")
async def impatient_session_fixture(
    down: FakeEngage, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[ea.EngageSession]:
    """A session whose outbox waits only 0.2 s (SQLite's own real wait) for the write lock;
    Engage is down.
    """
    config = make_config(down.url, down.api_key, tmp_path, busy_timeout=0.2)
    async with ea.EngageSession(config, clock=clock) as session:
        yield session


@pytest.mark.sqlite_only
async def test_locked_outbox_raises_for_update(impatient_session: ea.EngageSession) -> None:
    """An update that cannot be committed raises OutboxError: never queued=True."""
    path = impatient_session.config.outbox_path
    with write_lock_held(path), pytest.raises(ea.OutboxError):
        await impatient_session.update_contact(new_guid(), {"firstName": "Lost"})

    assert [] == outbox_rows(path)


@pytest.mark.sqlite_only
async def test_locked_outbox_raises_for_create(impatient_session: ea.EngageSession) -> None:
    """A create that cannot be committed raises OutboxError: never queued=True."""
    path = impatient_session.config.outbox_path
    with write_lock_held(path), pytest.raises(ea.OutboxError):
        await impatient_session.create_contact({"email": "new@example.com"})

    assert [] == outbox_rows(path)


@pytest.mark.sqlite_only
async def test_outbox_works_again_once_the_lock_is_released(
    impatient_session: ea.EngageSession,
) -> None:
    """A failed commit does not break the session: the next write is queued and on disk."""
    path = impatient_session.config.outbox_path
    with write_lock_held(path), pytest.raises(ea.OutboxError):
        await impatient_session.update_contact(new_guid(), {"firstName": "Lost"})

    delivery = await impatient_session.update_contact(new_guid(), {"firstName": "Kept"})

    assert [delivery.change_id] == [row["change_id"] for row in outbox_rows(path)]


@pytest.fixture(name="refused_url")
def refused_url_fixture() -> Iterator[str]:
    """An http URL on loopback whose port is bound but not listening: connections refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.sqlite_only
def test_full_disk_raises_outbox_error(tmp_path: Path, refused_url: str) -> None:
    """When SQLite cannot grow the file (EFBIG under RLIMIT_FSIZE), the write raises
    OutboxError; every write that did return queued=True is on disk, and nothing else is.

    Runs in a subprocess, since the limit applies to the whole process.
    """
    outbox = tmp_path / "outbox.sqlite3"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "fill_outbox.py"), str(outbox), refused_url, "393216"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    lines = result.stdout.splitlines()
    assert 0 == result.returncode, result.stderr
    queued = [line.split()[1] for line in lines if line.startswith("queued ")]
    assert lines, result.stderr
    assert "error OutboxError" == " ".join(lines[-1].split()[:2]), lines[-1]
    assert len(queued) >= 1
    assert sorted(queued) == sorted(row["change_id"] for row in outbox_rows(outbox))


# --- concurrency --------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_many_concurrent_updates_share_commits(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """200 updates at once while Engage is down: all queued, 200 rows, fewer commits.

    Commits are counted at the outbox's one transaction entry point (`Database.write`).
    """
    db = session._outbox._db  # type: ignore[union-attr]
    commits = 0
    write = db.write

    async def counting_write(work: Any) -> Any:
        nonlocal commits
        commits += 1
        return await write(work)

    db.write = counting_write  # type: ignore[method-assign]
    guids = [new_guid() for _ in range(200)]

    deliveries = await asyncio.gather(
        *(session.update_contact(guid, {"firstName": f"N{i}"}) for i, guid in enumerate(guids))
    )

    assert [True] * 200 == [delivery.queued for delivery in deliveries]
    rows = outbox_rows(config)
    assert sorted(guids) == sorted(row["contact_id"] for row in rows)
    assert sorted(d.change_id for d in deliveries) == sorted(row["change_id"] for row in rows)
    assert 1 <= commits < len(guids)
