"""The outbox's SQLite seam: whole transactions in one hop onto aiosqlite's thread."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import aiosqlite
import pytest

from engage_async import OutboxError
from engage_async._sqlite import Database


def accept_any(conn: sqlite3.Connection) -> None:
    """A prepare step that takes any file as it is."""


@pytest.fixture(name="db")
async def db_fixture(tmp_path: Path):
    """An open Database on a fresh file."""
    db = await Database.open(
        tmp_path / "seam.sqlite3", busy_timeout=1.0, durability="full", prepare=accept_any
    )
    await db.run(lambda conn: conn.execute("CREATE TABLE t (v INTEGER)"))
    yield db
    await db.close()


def test_aiosqlite_still_has_the_private_seam() -> None:
    """The two private names Database relies on exist; if aiosqlite moves them, this fails
    first, with a clear name, instead of every outbox test failing obscurely.
    """
    assert callable(aiosqlite.Connection._execute)
    assert isinstance(aiosqlite.Connection._conn, property)


def test_aiosqlite_still_makes_its_thread_before_starting_it() -> None:
    """The second seam: aiosqlite builds the connection's worker thread, not a daemon, when
    the connection object is made, and starts it only when it is awaited; Database.open makes
    it a daemon in between. If aiosqlite changes that, this fails first.
    """
    pending = aiosqlite.connect(":memory:")

    assert isinstance(pending._thread, threading.Thread)
    assert (False, False) == (pending._thread.daemon, pending._thread.is_alive())


async def test_the_connection_thread_is_a_daemon(db: Database) -> None:
    """The thread serving a Database is a running daemon: a connection nobody closed (an app
    that crashed) cannot keep the interpreter from exiting.
    """
    thread = db._connection._thread

    assert (True, True) == (thread.daemon, thread.is_alive())


async def test_write_runs_the_whole_transaction_on_one_thread(db: Database) -> None:
    """Every statement of a write runs on the connection's thread, not the event loop's,
    inside one immediate transaction that is committed when write returns.
    """
    seen: list[tuple[int, bool]] = []

    def work(conn: sqlite3.Connection) -> None:
        seen.append((threading.get_ident(), conn.in_transaction))
        conn.execute("INSERT INTO t VALUES (1)")
        seen.append((threading.get_ident(), conn.in_transaction))

    await db.write(work)

    assert threading.get_ident() not in {ident for ident, _ in seen}
    assert [True, True] == [inside for _, inside in seen]
    assert 1 == len({ident for ident, _ in seen})
    assert [(1,)] == await db.run(lambda conn: conn.execute("SELECT v FROM t").fetchall())


async def test_a_failing_write_is_rolled_back(db: Database) -> None:
    """If the work raises, nothing it wrote is kept, and the error reaches the caller."""

    def work(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (2)")
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await db.write(work)

    assert [] == await db.run(lambda conn: conn.execute("SELECT v FROM t").fetchall())


async def test_sqlite_errors_become_outbox_errors(db: Database) -> None:
    """A SQLite error is an OutboxError with the cause chained, never a raw sqlite3 error."""
    with pytest.raises(OutboxError) as info:
        await db.run(lambda conn: conn.execute("SELECT * FROM no_such_table"))

    assert isinstance(info.value.__cause__, sqlite3.Error)


async def test_closed_database_refuses_work(tmp_path: Path) -> None:
    """After close, work is refused with OutboxError rather than hanging or crashing."""
    db = await Database.open(
        tmp_path / "closed.sqlite3", busy_timeout=1.0, durability="normal", prepare=accept_any
    )
    await db.close()

    with pytest.raises(OutboxError, match="closed"):
        await db.run(lambda conn: conn.execute("SELECT 1"))
