"""Helpers the test modules share: configs, reading the outbox file, a clock tests move, and
what the flusher tests need to drive a flusher against `FakeEngage`.

Tests import from here (``from helpers import ...``), never from one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import engage_async as ea
from engage_async._outbox import SqliteOutbox
from engage_async._retry import BACKGROUND_JITTER
from engage_async.testing import FakeEngage, RecordedRequest

USER_AGENT = "EngageAsyncTests/1.0"

CONTACTS = "/api/v3/contacts"
BULK = "/api/v3/contacts/bulk"
LOOKUP = "/api/v3/contacts/id"
NOT_FOUND = {"errorCode": "ContactNotFound", "message": "No contact matches.", "statusCode": 404}

# Sleeps on a flusher test's clock up to this long pass at once (batch polls, a session's
# retries); longer ones (the lease keeper, a running flusher's idle wait) wait for the test.
FLUSHER_JUMP_LIMIT = 60.0


# --- configs ------------------------------------------------------------------------------------


def make_config(base_url: str, api_key: str, tmp_path: Path, **overrides: Any) -> ea.EngageConfig:
    """A config for tests: quick retries, a short deadline, an outbox under `tmp_path`."""
    values: dict[str, Any] = {
        "base_url": base_url,
        "api_key": api_key,
        "user_agent": USER_AGENT,
        "outbox_path": tmp_path / "outbox.sqlite3",
        "xml_dir": tmp_path / "xml",
        "interactive_deadline": 1.0,
        "retry_initial_delay": 0.01,
        "retry_max_delay": 0.05,
        "rate_limit": 1000.0,
        "identity_ttl": 0.0,
    }
    values.update(overrides)
    return ea.EngageConfig(**values)


async def create_outbox(path: Path) -> None:
    """Create an empty outbox at `path`, as an app's first EngageSession does: a flusher opens
    only an outbox that exists.
    """
    outbox = await SqliteOutbox.open(path)
    await outbox.close()


def flusher_config(fake: FakeEngage, tmp_path: Path, **overrides: Any) -> ea.EngageConfig:
    """A config on `fake` for a flusher on ``FakeClock(jump_limit=FLUSHER_JUMP_LIMIT)``.

    Batch polls (2 s growing to 30 s) pass at once on that clock; retries and pauses (10 s)
    pass when the test moves the clock (`drain` does); leases (300 s, renewed every 100 s)
    and a running flusher's idle wait (120 s) never run out unless the test moves the clock.
    """
    values: dict[str, Any] = {
        "background_delays": (10.0,),
        "batch_poll_initial": 2.0,
        "batch_poll_max": 30.0,
        "poll_interval": 120.0,
        "lease_seconds": 300.0,
    }
    values.update(overrides)
    return make_config(fake.url, fake.api_key, tmp_path, **values)


def retry_wait(config: ea.EngageConfig) -> float:
    """The longest a flusher puts a change off or pauses (the longest background delay with
    its jitter), unless Engage asked for longer.
    """
    return max(config.background_delays) * (1 + BACKGROUND_JITTER)


# --- reading and changing the outbox file -------------------------------------------------------


def outbox_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of ``changes``, in seq order, read through a connection of the test's own."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM changes ORDER BY seq")]


def row_of(path: Path, change_id: str) -> dict[str, Any] | None:
    """The row holding `change_id`, read through a connection of the test's own, or None."""
    found = [row for row in outbox_rows(path) if row["change_id"] == change_id]
    return found[0] if found else None


def query(config: ea.EngageConfig, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """Rows of a read-only SQL query on the outbox file."""
    with contextlib.closing(sqlite3.connect(config.outbox_path)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, tuple(params)).fetchall()]


def execute(config: ea.EngageConfig, sql: str, params: Iterable[Any] = ()) -> None:
    """Change the outbox behind the library's back (as a crashed flusher left it)."""
    with contextlib.closing(sqlite3.connect(config.outbox_path)) as conn, conn:
        conn.execute(sql, tuple(params))


def changes(config: ea.EngageConfig) -> list[dict[str, Any]]:
    """Every row of the outbox's `changes` table, in seq order."""
    return outbox_rows(config.outbox_path)


def by_change_id(config: ea.EngageConfig) -> dict[str, dict[str, Any]]:
    """The outbox rows keyed by change id."""
    return {row["change_id"]: row for row in changes(config)}


def assert_settled(config: ea.EngageConfig) -> None:
    """Every change ended done, or dead with a code and a reason: nothing vanished."""
    for row in changes(config):
        assert row["state"] in {"done", "dead"}, row
        if row["state"] == "dead":
            assert row["error_code"], row
            assert row["last_error"], row


# --- what FakeEngage holds and received -------------------------------------------------------


def new_guid() -> str:
    """A contact id Engage has never seen."""
    return str(uuid.uuid4())


def one_id(fake: FakeEngage, email: str) -> str:
    """The id of the only contact holding `email`; fails if there are none or several."""
    found = fake.find("email", email)
    assert 1 == len(found), f"{email}: {found}"
    return found[0]


def attribute(fake: FakeEngage, contact_id: str, name: str) -> Any:
    """An attribute of a contact as Engage would answer it."""
    return fake.contact_json(contact_id)["attributes"][name]


def contact_type(fake: FakeEngage, contact_id: str) -> str:
    """The contact's type as Engage would answer it."""
    return str(fake.contact_json(contact_id)["meta"]["contactType"])


def writes(fake: FakeEngage) -> list[RecordedRequest]:
    """The write requests Engage received (every POST and PATCH)."""
    return [r for r in fake.requests if r.method in {"POST", "PATCH"}]


def bulk_items(fake: FakeEngage, method: str) -> list[list[dict[str, Any]]]:
    """The item lists of each bulk request of `method`."""
    return [r.json() for r in fake.requests_to(method, BULK)]


# --- waiting --------------------------------------------------------------------------------


async def eventually(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait until `condition()` is true, checking every few milliseconds.

    For what happens in real time (requests on real sockets, another process); `timeout`
    (real seconds) only bounds a failing test, the test asserts nothing about durations.
    """
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def drain(flusher: ea.OutboxFlusher, clock: FakeClock, *, rounds: int = 40) -> ea.FlushReport:
    """Flush until nothing is pending; between flushes, let the flusher's retry delays and
    pauses run out on `clock` (the flusher's).
    """
    report = await flusher.flush_once()
    for _ in range(rounds):
        if report.pending == 0:
            return report
        clock.advance(retry_wait(flusher.config))
        report = await flusher.flush_once()
    return report


# --- time -------------------------------------------------------------------------------------


class FakeClock:
    """A `Clock` whose time moves only when a test moves it (`advance`), or when code sleeps.

    A sleep of at most `jump_limit` seconds passes at once: the clock moves forward by the time
    slept and the sleeper yields to the event loop once, so a backoff of ten minutes costs a
    test nothing. A longer sleep waits until `advance` (or a shorter sleep passing at once)
    moves the clock to its end; `sleeping` and `until_sleeping` tell a test who waits. The
    default `jump_limit` lets every sleep pass at once. `jump_wall` moves the wall clock alone,
    as when the system clock is set (the monotonic clock never jumps, and sleeps follow it).

    A sleep still waiting after `stuck_after` real seconds raises AssertionError, so a test
    that never moves the clock fails instead of hanging.

    Code that waits on real I/O and on this clock in turn sees no time pass during the I/O:
    a session on a FakeClock never reaches its interactive deadline while a request hangs.
    """

    def __init__(
        self,
        wall: float = 1_800_000_000.0,
        monotonic: float = 1_000.0,
        *,
        jump_limit: float = math.inf,
        stuck_after: float = 30.0,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self.jump_limit = jump_limit
        self.stuck_after = stuck_after
        # Every sleep asked for, in order, whether it passed at once or waited.
        self.slept: list[float] = []
        self._waiting: list[tuple[float, asyncio.Future[None]]] = []
        self._sleepers_changed = asyncio.Event()

    def wall(self) -> float:
        """The wall clock, seconds since the epoch."""
        return self._wall

    def monotonic(self) -> float:
        """The monotonic clock."""
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        """Pass `seconds` at once, or wait until the clock is moved past them (`jump_limit`).

        Recorded in `slept` either way.
        """
        self.slept.append(seconds)
        seconds = max(0.0, seconds)
        if seconds <= self.jump_limit:
            self.advance(seconds)
            await asyncio.sleep(0)
            return
        waiter = (self._monotonic + seconds, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._sleepers_changed.set()
        try:
            async with asyncio.timeout(self.stuck_after):
                await waiter[1]
        except TimeoutError:
            raise AssertionError(
                f"a sleep of {seconds} s on a FakeClock waited {self.stuck_after} real seconds "
                "for the test to move the clock"
            ) from None
        finally:
            self._waiting.remove(waiter)

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass on both clocks; wake the sleeps that end by then."""
        if seconds < 0:
            raise ValueError("seconds: time does not go back; use jump_wall")
        self._wall += seconds
        self._monotonic += seconds
        for end, waiter in self._waiting:
            if end <= self._monotonic and not waiter.done():
                waiter.set_result(None)

    def advance_to(self, wall: float) -> None:
        """Let time pass until the wall clock reads exactly `wall` (a time the code computed
        on this clock, so a test lands on it without rounding errors); wake the sleeps that
        end by then.
        """
        self.advance(wall - self._wall)
        self._wall = wall

    def jump_wall(self, seconds: float) -> None:
        """Set the wall clock `seconds` ahead (negative: back); the monotonic one stays."""
        self._wall += seconds

    @property
    def sleeping(self) -> list[float]:
        """How long each sleep waiting for the clock still has to go, soonest first."""
        return sorted(end - self._monotonic for end, _ in self._waiting)

    async def until_sleeping(self, seconds: float | None = None, *, timeout: float = 5.0) -> None:
        """Wait until a task waits on this clock, with `seconds` to go if given.

        `timeout` (real seconds) only bounds a failing test.
        """

        def found() -> bool:
            if seconds is None:
                return bool(self._waiting)
            return any(math.isclose(left, seconds, abs_tol=1e-9) for left in self.sleeping)

        async with asyncio.timeout(timeout):
            while not found():
                self._sleepers_changed.clear()
                await self._sleepers_changed.wait()


# --- subprocesses (test_budget, test_deployment) -------------------------------------------

SCRIPTS = Path(__file__).parent / "scripts"


async def start_script(
    script: Path,
    *args: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> asyncio.subprocess.Process:
    """Start a Python script of ours with pipes for stdin and stdout; stderr goes to `log`
    (appended), or stays the test's own.
    """
    with contextlib.ExitStack() as stack:
        stderr = stack.enter_context(log.open("ab")) if log is not None else None
        return await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            *args,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )


async def read_line(process: asyncio.subprocess.Process, timeout: float) -> str:
    """The next line the process prints, stripped; fails on end of output or after `timeout`."""
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    if not line:
        raise AssertionError(f"the process ended (status {await process.wait()}) without a line")
    return line.decode().strip()


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """Kill the process if it still runs, and reap it (a test's `finally`)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
