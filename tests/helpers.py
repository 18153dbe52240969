"""Helpers the test modules share: configs, reading the outbox file, a clock tests move, and
what the flusher tests need to drive a flusher against `FakeEngage`.

Tests import from here (``from helpers import ...``), never from one another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import os
import re
import sqlite3
import sys
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

import engage_async as ea
from engage_async._outbox import SqliteOutbox
from engage_async._outboxes import open_outbox
from engage_async._retry import BACKGROUND_JITTER
from engage_async.testing import FakeEngage, RecordedRequest

USER_AGENT = "EngageAsyncTests/1.0"
T = TypeVar("T")

# The outbox backends the both-backend suites run against (tests/conftest.py's `backend`).
BACKENDS = ("sqlite", "postgres")


@attrs.define
class Backend:
    """The outbox backend of the running test: the SQLite file under the test's tmp_path, or
    a schema of its own in the test PostgreSQL server.
    """

    kind: str = "sqlite"
    url: str | None = None
    schema: str | None = None

    @property
    def postgres(self) -> bool:
        """Whether the test runs on PostgreSQL."""
        return self.kind == "postgres"

    def settings(self) -> dict[str, Any]:
        """The config fields that point at this backend (none for SQLite: outbox_path)."""
        if not self.postgres:
            return {}
        # A busy test machine may stall a statement past the outbox's share of a test's short
        # interactive deadline; the tests of that share set outbox_timeout=None themselves.
        return {"outbox_url": self.url, "outbox_schema": self.schema, "outbox_timeout": 5.0}

    def env(self) -> dict[str, str]:
        """The same, as ENGAGE_* variables for a subprocess."""
        if not self.postgres:
            return {}
        assert self.url is not None
        assert self.schema is not None
        return {"ENGAGE_OUTBOX_URL": self.url, "ENGAGE_OUTBOX_SCHEMA": self.schema}


# Set by the `backend` fixture for each test; SQLite unless a suite runs on both.
BACKEND = Backend()


def use_backend(kind: str, url: str | None = None) -> Backend:
    """Make `kind` the backend of the test about to run (a fresh schema on PostgreSQL).

    `BACKEND` is changed in place, so modules that imported it see the change.
    """
    BACKEND.kind, BACKEND.url = kind, url
    BACKEND.schema = f"t_{uuid.uuid4().hex[:16]}" if kind == "postgres" else None
    return BACKEND


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to the end on an event loop of its own, in another thread (a test's
    synchronous helper reading PostgreSQL while the test's own loop is busy waiting on it).
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


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
        **BACKEND.settings(),
    }
    values.update(overrides)
    return ea.EngageConfig(**values)


async def create_outbox(where: Path | ea.EngageConfig) -> None:
    """Create an empty outbox (a file at a path, or the one a config names), as an app's
    first EngageSession does: a flusher opens only an outbox that exists.
    """
    if isinstance(where, ea.EngageConfig):
        outbox = await open_outbox(where)
    else:
        outbox = await SqliteOutbox.open(where)
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


def outbox_rows(where: Path | ea.EngageConfig, table: str = "changes") -> list[dict[str, Any]]:
    """Every row of ``changes`` (or another table), in seq (or key) order, read through a
    connection of the test's own: from the SQLite file at a path, or the outbox a config
    names, on either backend.
    """
    order = "seq" if table == "changes" else "1"
    if isinstance(where, ea.EngageConfig) and where.outbox_is_postgres:
        assert where.outbox_url is not None
        return run_sync(_pg_rows(where.outbox_url, f"{where.outbox_schema}.{table}", order))
    path = where.outbox_path if isinstance(where, ea.EngageConfig) else where
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(f"SELECT * FROM {table} ORDER BY {order}")]


async def _pg_rows(url: str, table: str, order: str) -> list[dict[str, Any]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return [dict(row) for row in await conn.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
    finally:
        await conn.close()


_TABLE = re.compile(
    r"\b(FROM|UPDATE|INTO|JOIN)\s+(changes|batches|identities|contact_types|control|flushers"
    r"|xml_plans|budgets|moved_from|schema_migrations)\b",
    re.IGNORECASE,
)


def outbox_sql(config: ea.EngageConfig, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Run SQLite-flavoured `sql` (``?`` parameters, bare table names) against the outbox
    `config` names, on either backend, committed; the rows it returns. On PostgreSQL the
    tables are found in the config's schema and ``?`` become ``$1``, ``$2``, ...
    """
    if config.outbox_is_postgres:
        assert config.outbox_url is not None
        counter = iter(range(1, len(args) + 1))
        pg = _TABLE.sub(lambda m: f"{m[1]} {config.outbox_schema}.{m[2]}", sql)
        pg = re.sub(r"\?", lambda _: f"${next(counter)}", pg)
        return run_sync(_pg_sql(config.outbox_url, pg, args))
    with contextlib.closing(sqlite3.connect(config.outbox_path, isolation_level=None)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, args).fetchall()]


async def _pg_sql(url: str, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return [dict(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def row_of(where: Path | ea.EngageConfig, change_id: str) -> dict[str, Any] | None:
    """The row holding `change_id`, read through a connection of the test's own, or None
    (from a SQLite file, or the outbox a config names on either backend).
    """
    found = [row for row in outbox_rows(where) if row["change_id"] == change_id]
    return found[0] if found else None


def query(config: ea.EngageConfig, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """Rows of a read-only SQL query on the outbox (either backend; see `outbox_sql`)."""
    return outbox_sql(config, sql, *params)


def execute(config: ea.EngageConfig, sql: str, params: Iterable[Any] = ()) -> None:
    """Change the outbox behind the library's back (as a crashed flusher left it)."""
    outbox_sql(config, sql, *params)


def changes(config: ea.EngageConfig) -> list[dict[str, Any]]:
    """Every row of the outbox's `changes` table, in seq order."""
    return outbox_rows(config)


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


# --- the engage-async flush sidecar (test_sidecar, test_metrics) ----------------------------

# A fresh interpreter with aiohttp takes a while to start on a busy machine.
PROCESS_TIMEOUT = 30.0


def sidecar_env(fake: FakeEngage, config: ea.EngageConfig, **extra: str) -> dict[str, str]:
    """The environment of a sidecar on `fake` and the outbox of `config`, tiny delays."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGAGE_")}
    env.update(
        {
            "ENGAGE_BASE_URL": fake.url,
            "ENGAGE_API_KEY": fake.api_key,
            "ENGAGE_USER_AGENT": "EngageSidecarTests/1.0",
            "ENGAGE_OUTBOX": str(config.outbox_path),
            "ENGAGE_XML_DIR": str(config.xml_dir),
            "ENGAGE_BACKGROUND_DELAYS": "0.01",
            "ENGAGE_BATCH_POLL_INITIAL": "0.01",
            "ENGAGE_BATCH_POLL_MAX": "0.05",
            "ENGAGE_POLL_INTERVAL": "0.05",
            "ENGAGE_LEASE_SECONDS": "0.5",
            "ENGAGE_RATE_LIMIT": "1000",
            "ENGAGE_REQUEST_TIMEOUT": "5",
            **BACKEND.env(),
        }
    )
    env.update(extra)
    return env


async def start_flush(env: Mapping[str, str], log: Path, *args: str) -> asyncio.subprocess.Process:
    """Start ``engage-async flush`` with `args`; its output goes to `log` (never a full pipe)."""
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engage_async.cli",
            "flush",
            *args,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
