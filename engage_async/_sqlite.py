"""The outbox's SQLite file: opening it safely, and running transactions off the event loop.

aiosqlite gives each connection one worker thread. Its public API costs a thread hop per
statement; a transaction of four statements then costs four hops, which is most of an
enqueue's time. `Database.write` instead sends one function that runs the whole transaction
(``BEGIN IMMEDIATE`` ... ``COMMIT``) on that thread in a single hop, through aiosqlite's
``Connection._execute``. The other use of aiosqlite internals: its worker thread is made a
daemon before it starts, so a connection nobody closed cannot keep the interpreter from
exiting (aiosqlite makes it non-daemon). Its version is capped in pyproject.toml, and
tests/test_sqlite.py fails first if either seam moves.

Every write transaction starts with ``BEGIN IMMEDIATE``: a deferred transaction that later
needs the write lock fails at once with SQLITE_BUSY, ignoring the busy timeout, when another
process holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, TypeVar

import aiosqlite

from ._errors import OutboxError
from ._schema import Damaged

__all__ = ["Database", "damaged", "sqlite_uri"]

T = TypeVar("T")


def _describe(exc: BaseException) -> str:
    """A short reason for an OutboxError; SQLite's messages hold no personal data."""
    return f"{type(exc).__name__}: {exc}"


def _not_a_database(exc: sqlite3.Error) -> bool:
    """SQLite's verdict on a file that is not SQLite at all (it reads the header itself)."""
    return isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc)


def _refused_at_once(exc: OutboxError) -> bool:
    """Did SQLite answer "busy" or "locked" without waiting? It does for a moment's exclusive
    lock (a new file switched to WAL while another process reads it), busy_timeout or not.
    """
    cause = exc.__cause__
    return isinstance(cause, sqlite3.OperationalError) and (
        getattr(cause, "sqlite_errorcode", 0) & 0xFF in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
    )


async def _patiently(attempt: Callable[[], Awaitable[T]], seconds: float) -> T:
    """`attempt()`, again after a short wait while SQLite refuses it at once for another
    process's lock, for up to `seconds` (the busy timeout it would otherwise have waited).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    delay = 0.005
    while True:
        try:
            return await attempt()
        except OutboxError as exc:
            if not _refused_at_once(exc) or loop.time() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def damaged(exc: BaseException) -> bool:
    """Is `exc` SQLite's verdict that the file is damaged (a page it cannot make sense of)?"""
    return getattr(exc, "sqlite_errorname", None) == "SQLITE_CORRUPT"


class _DamagedAt(Damaged):
    """A damaged outbox, named by its path, with what to do about it."""


def _damaged(path: Path, detail: str) -> _DamagedAt:
    return _DamagedAt(
        f"the outbox at {path.resolve()} is damaged ({detail}); stop everything that uses it "
        "and run `engage-async outbox salvage NEW_PATH` to copy what can be read into a new "
        "outbox"
    )


def sqlite_uri(path: Path, mode: Literal["ro", "rw", "rwc"]) -> str:
    """A ``file:`` URI for `path` opened in `mode` ("ro" and "rw" never create the file)."""
    return f"file:{urllib.parse.quote(str(path))}?mode={mode}"


def create_private(path: Path, *, exclusive: bool = False) -> None:
    """Create the file readable by its owner only: it will hold personal data.

    An existing file is left alone, unless `exclusive`, when it is refused.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        if exclusive:
            raise OutboxError(f"{path.resolve()} exists already; give a new path") from None
        return
    except OSError as exc:
        raise OutboxError(f"cannot create the outbox at {path}: {_describe(exc)}") from exc
    os.close(fd)


def _check_writable(path: Path) -> None:
    """Refuse a file this process may not write (read-only, another user's), without opening
    it: SQLite would open it read-only and fail only at the first write.
    """
    effective = os.access in os.supports_effective_ids
    if not os.access(path, os.W_OK, effective_ids=effective):
        status = path.stat()
        raise OutboxError(
            f"the outbox at {path.resolve()} is not writable by this process (mode "
            f"{stat.S_IMODE(status.st_mode):04o}, owner uid {status.st_uid}); it was left "
            "untouched"
        )


def _tighten_mode(path: Path) -> None:
    """An existing outbox opened by other tools may be group/world readable; narrow it.

    Only ever takes bits away: a file its owner made read-only stays read-only.
    """
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(mode & ~0o077)


def _daemon_thread(connection: aiosqlite.Connection) -> None:
    """Make the connection's worker thread a daemon; it must not have started yet.

    aiosqlite's thread is not a daemon, so a connection left open (an app that crashed before
    closing its session) made the interpreter wait for ever at exit. A daemon thread killed at
    exit is safe: SQLite's journal makes an interrupted transaction roll back.
    """
    # aiosqlite 0.22 keeps it in `_thread`; before 0.21 the connection was the thread itself.
    worker = getattr(connection, "_thread", connection)
    if isinstance(worker, threading.Thread) and not worker.is_alive():
        worker.daemon = True


class Database:
    """One connection to the outbox file, with transactions run in one thread hop each."""

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self._connection = connection
        self.path = path

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout: float,
        durability: Literal["full", "normal"],
        prepare: Callable[[sqlite3.Connection], None],
        create: bool = True,
    ) -> Database:
        """Open the file (creating it unless `create` is False), let `prepare` accept (or
        refuse) and migrate it, then set WAL and the durability.

        `prepare` runs before anything changes the file: a foreign database it refuses is left
        byte for byte as it was, mode included (switching to WAL would rewrite its header).

        Raises:
            OutboxError: the file is foreign, unreadable, damaged, not writable by this
                process, missing (with `create` False), or cannot be created. A missing,
                damaged or unwritable file is named by its absolute path.
        """
        path = Path(path)
        if path.parent and not path.parent.exists():
            raise OutboxError(f"the outbox directory {path.parent.resolve()} does not exist")
        if not create and not path.exists():
            raise OutboxError(
                f"there is no outbox at {path.resolve()}; only an EngageSession creates one: "
                "point outbox_path (ENGAGE_OUTBOX) at the file the app writes"
            )
        # Nothing here opens the file but SQLite: closing any descriptor of it would drop every
        # POSIX lock this process's SQLite connections hold on it (docs/decisions.md).
        if create:
            create_private(path)
        _check_writable(path)
        # "rw": should the file vanish after the check above, SQLite must not create it.
        pending = aiosqlite.connect(sqlite_uri(path, "rw"), isolation_level=None, uri=True)
        _daemon_thread(pending)
        try:
            connection = await pending
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox at {path}: {_describe(exc)}") from exc
        db = cls(connection, path)
        milliseconds = int(busy_timeout * 1000)
        synchronous = "FULL" if durability == "full" else "NORMAL"

        def wait_for_locks(conn: sqlite3.Connection) -> None:
            # First, so that even the first look at the file waits for other processes.
            conn.execute(f"PRAGMA busy_timeout = {milliseconds}")

        def configure(conn: sqlite3.Connection) -> None:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not switch to WAL (got {mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            # A first read creates the -wal and -shm files now, with the database's 0600 mode
            # (SQLite copies it), instead of at some later write.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()

        try:
            await db.run(wait_for_locks)
            try:
                await _patiently(lambda: db.run(prepare), busy_timeout)
            except OutboxError as exc:
                cause = exc.__cause__
                if isinstance(cause, sqlite3.Error) and _not_a_database(cause):
                    raise OutboxError(
                        f"{path} exists and is not an engage-async outbox (not a SQLite "
                        "file); it was left untouched"
                    ) from None
                if isinstance(exc, Damaged) and not isinstance(exc, _DamagedAt):
                    raise _damaged(path, str(exc)) from exc.__cause__
                raise
            _tighten_mode(path)
            await _patiently(lambda: db.run(configure), busy_timeout)
        except BaseException:
            await db.close()
            raise
        return db

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work(connection)` on the connection's thread, outside any transaction."""
        if self._connection._connection is None:
            raise OutboxError(f"the outbox at {self.path} is closed")
        try:
            result: T = await self._connection._execute(  # type: ignore[no-untyped-call]
                work, self._connection._conn
            )
        except sqlite3.Error as exc:
            if damaged(exc):
                raise _damaged(self.path, _describe(exc)) from exc
            raise OutboxError(f"outbox at {self.path}: {_describe(exc)}") from exc
        return result

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``; roll back if it raises.

        Returns only after the commit, so what `work` wrote is on disk (as durable as the
        ``synchronous`` setting makes it).
        """

        def transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return await self.run(transaction)

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one read transaction: a consistent snapshot across its statements."""

        def transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN")
            try:
                return work(conn)
            finally:
                conn.execute("COMMIT")

        return await self.run(transaction)

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        with contextlib.suppress(sqlite3.Error, ValueError):
            await self._connection.close()
