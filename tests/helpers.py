"""Helpers the test modules share: configs, reading the outbox file, a clock tests move.

Tests import from here (``from helpers import ...``), never from one another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import sqlite3
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import attrs

import engage_async as ea
from engage_async._outbox import SqliteOutbox
from engage_async._outboxes import open_outbox

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


class FakeClock:
    """A `Clock` whose time moves only when told to (`advance`), or when code sleeps on it.

    `sleep` moves the clock forward by the time slept and yields to the event loop once, so a
    backoff of ten minutes costs a test nothing. `jump_wall` moves the wall clock alone, as
    when the system clock is set (the monotonic clock never jumps).
    """

    def __init__(self, wall: float = 1_800_000_000.0, monotonic: float = 1_000.0) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self.slept: list[float] = []

    def wall(self) -> float:
        """The wall clock, seconds since the epoch."""
        return self._wall

    def monotonic(self) -> float:
        """The monotonic clock."""
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        """Pass `seconds` at once (recorded in `slept`)."""
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass on both clocks."""
        self._wall += seconds
        self._monotonic += seconds

    def jump_wall(self, seconds: float) -> None:
        """Set the wall clock `seconds` ahead (negative: back); the monotonic one stays."""
        self._wall += seconds
