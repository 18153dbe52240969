"""Salvage: copy what can still be read from a damaged outbox into a new one.

The damaged file is read by SQLite alone, through a read-only connection (``mode=ro``), on
the thread of the new outbox's connection; the new outbox is created as the package creates
any (0600, migrated, WAL). Rows are read in ranges, and a range that fails is read again row by
row, so a damaged page costs only the rows on it:

* ``changes`` by seq, from 1 to the highest seq any readable structure knows; the changes on
  a damaged page are counted (and named by change id) from the change-id index when it can
  still be read;
* ``identities``, ``batches`` and ``control`` in key order, from both ends towards the
  damage; then the ``ref:`` identities are rebuilt from the changes that carry a ref and a
  GUID (a ref is answered for ever, so those matter; the ``key:`` ones are a cache).

Run it with every process that uses the damaged outbox stopped.
"""

# ruff: noqa: S608 - SQL joined from our own table and column names; values are parameters

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from ._errors import OutboxError
from ._schema import APPLICATION_ID, MIGRATIONS, migrate
from ._sqlite import Database, create_private, sqlite_uri

__all__ = ["SalvageReport", "salvage"]

_CHUNK: Final = 500
# The key-ordered tables, with their key column.
# XML plans come along so that rows parked in one are finished, not stranded; the learned
# contact types are a cache worth keeping; flushers' heartbeats are not (no flusher of the old
# file is alive in the new one: what they held is taken back after a lease).
_KEYED: Final[Mapping[str, str]] = {
    "identities": "key",
    "batches": "batch_id",
    "control": "name",
    "xml_plans": "path",
    "contact_types": "contact_id",
}


@attrs.frozen
class SalvageReport:
    """What `OutboxAdmin.salvage` copied into the new outbox, and what it could not read.

    Attributes:
        path: the new outbox.
        copied: rows copied per table (``changes``, ``identities``, ``batches``, ``control``).
        unreadable: one line per thing that could not be read (seq ranges of changes, tables
            with rows lost between damaged pages); empty when everything was copied. Holds no
            personal data.
        lost_change_ids: the ids of the changes known to be lost (read from the change-id
            index; changes whose index entry was lost too are only counted in `unreadable`).
    """

    path: Path
    copied: Mapping[str, int]
    unreadable: tuple[str, ...] = ()
    lost_change_ids: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True if every row was copied."""
        return not self.unreadable


async def salvage(source: Path, target: Path, *, busy_timeout: float) -> SalvageReport:
    """Copy every readable row of the outbox at `source` into a new outbox at `target`.

    Raises:
        OutboxError: `target` exists, `source` is missing or not an engage-async outbox, or
            not even its header and schema can be read.
    """
    source, target = Path(source), Path(target)
    if not source.exists():
        raise OutboxError(f"there is no outbox at {source.resolve()}")
    if source.resolve() == target.resolve() or target.exists():
        raise OutboxError(f"{target.resolve()} exists already; give a new path")
    await asyncio.to_thread(_check_source, source)
    create_private(target, exclusive=True)
    try:
        db = await Database.open(
            target, busy_timeout=busy_timeout, durability="full", prepare=migrate
        )
    except BaseException:
        _remove(target)
        raise
    try:
        copied, unreadable, lost = await db.run(lambda conn: _Copy(source, conn).run())
    except BaseException:
        await db.close()
        _remove(target)
        raise
    await db.close()
    return SalvageReport(target, copied, tuple(unreadable), tuple(lost))


def _remove(target: Path) -> None:
    """Take away a new outbox that could not be filled: nobody may mistake it for a copy."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{target}{suffix}").unlink()


def _check_source(source: Path) -> None:
    """Refuse a file that is not an outbox of a schema this version knows."""
    where = source.resolve()
    try:
        with contextlib.closing(sqlite3.connect(sqlite_uri(source, "ro"), uri=True)) as conn:
            application_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot read the outbox at {where} at all: {exc}") from exc
    if application_id != APPLICATION_ID:
        raise OutboxError(f"{where} is not an engage-async outbox")
    if version != len(MIGRATIONS):
        raise OutboxError(
            f"the outbox at {where} has schema version {version}; this engage-async salvages "
            f"version {len(MIGRATIONS)} (salvage it with the engage-async that wrote it)"
        )


class _Copy:
    """One salvage: reads from the damaged file, writes into the new outbox's connection."""

    def __init__(self, source: Path, target: sqlite3.Connection) -> None:
        self.source = source
        self.target = target
        self.unreadable: list[str] = []
        self.lost: list[str] = []

    def run(self) -> tuple[dict[str, int], list[str], list[str]]:
        """Copy table by table; what was copied, what could not be read, the lost change ids.

        Runs on the new outbox's thread; the damaged file gets a connection of its own there,
        so a read that fails never touches a transaction of the new outbox.
        """
        uri = sqlite_uri(self.source, "ro")
        with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as read:
            self.read = read
            copied = {"changes": self._changes()}
            for table, key in _KEYED.items():
                copied[table] = self._keyed(table, key)
        copied["identities"] += self._rebuild_refs()
        return copied, self.unreadable, self.lost

    def _columns(self, table: str) -> list[str]:
        """The columns both copies of `table` have, in the new outbox's order."""
        ours = [row[1] for row in self.target.execute(f"PRAGMA table_info({table})")]
        found = self._fetch(f"PRAGMA table_info({table})")
        if found is None:
            # Raised as is by Database.run: the damage is the old file's, not the new one's.
            raise OutboxError(f"cannot read the schema of {self.source.resolve()} at all")
        theirs = {row[1] for row in found}
        return [name for name in ours if name in theirs]

    def _fetch(self, query: str, parameters: Sequence[object] = ()) -> list[Any] | None:
        """The rows `query` reads from the damaged file, or None if SQLite cannot read them."""
        try:
            return self.read.execute(query, parameters).fetchall()
        except sqlite3.Error:
            return None

    def _write(self, insert: str, rows: Sequence[Any]) -> list[Any]:
        """Insert `rows` in one transaction; the rows the new outbox refused (a row read from
        a damaged page can be garbage that breaks a constraint).
        """
        refused: list[Any] = []
        with _transaction(self.target):
            try:
                self.target.execute("SAVEPOINT rows")
                self.target.executemany(insert, rows)
                self.target.execute("RELEASE rows")
            except sqlite3.Error:
                self.target.execute("ROLLBACK TO rows")
                self.target.execute("RELEASE rows")
                for row in rows:
                    try:
                        self.target.execute(insert, row)
                    except sqlite3.Error:
                        refused.append(row)
        return refused

    # --- changes, by seq ------------------------------------------------------------------------

    def _changes(self) -> int:
        columns = self._columns("changes")
        listed = ", ".join(columns)
        select = f"SELECT {listed} FROM changes"
        insert = f"INSERT INTO changes ({listed}) VALUES ({', '.join('?' * len(columns))})"
        # The highest seq any structure still knows: the table's last page, its sequence, the
        # change-id index (a covering scan, which never reads the table's pages).
        highs = [
            self._fetch("SELECT max(seq) FROM changes"),
            self._fetch("SELECT seq FROM sqlite_sequence WHERE name = 'changes'"),
            self._fetch(f"SELECT max(seq) FROM changes{_BY_ID} WHERE change_id > ''"),
        ]
        high = max(
            (int(rows[0][0]) for rows in highs if rows and rows[0][0] is not None), default=0
        )
        copied = 0
        failed: list[int] = []
        refused: list[int] = []
        at = columns.index("seq")
        for start in range(1, high + 1, _CHUNK):
            end = min(start + _CHUNK - 1, high)
            rows = self._fetch(f"{select} WHERE seq BETWEEN ? AND ?", (start, end))
            if rows is None:
                rows = []
                for seq in range(start, end + 1):
                    row = self._fetch(f"{select} WHERE seq = ?", (seq,))
                    if row is None:
                        failed.append(seq)
                    else:
                        rows.extend(row)
            bad = self._write(insert, rows)
            refused.extend(int(row[at]) for row in bad)
            copied += len(rows) - len(bad)
        if high:
            # A seq lost at the end must not be handed out again in the new outbox.
            with _transaction(self.target):
                self.target.execute("DELETE FROM sqlite_sequence WHERE name = 'changes'")
                self.target.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('changes', ?)", (high,)
                )
        for first, last in _ranges(failed):
            known = self._fetch(
                f"SELECT change_id FROM changes{_BY_ID}"
                " WHERE change_id > '' AND seq BETWEEN ? AND ? ORDER BY seq",
                (first, last),
            )
            if known is None:
                self.unreadable.append(f"changes: seq {_span(first, last)} could not be read")
            elif known:
                self.lost.extend(row[0] for row in known)
                self.unreadable.append(
                    f"changes: {len(known)} change(s) in seq {_span(first, last)} could not be read"
                )
        if refused:
            self.unreadable.append(
                f"changes: {len(refused)} change(s) read from damaged pages were garbled "
                f"(seq {', '.join(_span(a, b) for a, b in _ranges(refused))})"
            )
        return copied

    # --- identities, batches, control: by key --------------------------------------------------

    def _keyed(self, table: str, key: str) -> int:
        """Copy a table ordered by its key: all at once, else from each end up to the damage."""
        columns = self._columns(table)
        listed = ", ".join(columns)
        select = f"SELECT {listed} FROM {table}"
        insert = f"INSERT INTO {table} ({listed}) VALUES ({', '.join('?' * len(columns))})"
        rows = self._fetch(select)
        if rows is None:
            at = columns.index(key)
            rows = self._until_damage(f"{select} ORDER BY {key}")
            seen = {row[at] for row in rows}
            rows += [
                row
                for row in self._until_damage(f"{select} ORDER BY {key} DESC")
                if row[at] not in seen
            ]
            self.unreadable.append(f"{table}: the rows between damaged pages could not be read")
        refused = self._write(insert, rows)
        if refused:
            self.unreadable.append(f"{table}: {len(refused)} row(s) read were garbled")
        return len(rows) - len(refused)

    def _until_damage(self, query: str) -> list[Any]:
        """The rows `query` reads before SQLite meets a page it cannot read."""
        rows: list[Any] = []
        try:
            cursor = self.read.execute(query)
        except sqlite3.Error:
            return rows
        while True:
            try:
                row = cursor.fetchone()
            except sqlite3.Error:
                return rows
            if row is None:
                return rows
            rows.append(row)

    def _rebuild_refs(self) -> int:
        """Recreate the ``ref:`` identities the copied changes prove; how many were missing."""
        with _transaction(self.target):
            added = self.target.execute(
                "INSERT OR IGNORE INTO identities (key, contact_id, updated_at)"
                " SELECT 'ref:' || ref, contact_id, max(updated_at) FROM changes"
                " WHERE ref IS NOT NULL AND contact_id IS NOT NULL GROUP BY ref"
            ).rowcount
        return int(added)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# The change-id index holds every row's change id and seq: it can name what a damaged table
# page took along.
_BY_ID: Final = " INDEXED BY sqlite_autoindex_changes_1"


def _ranges(numbers: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Runs of consecutive numbers in an ascending sequence, as (first, last)."""
    start = previous = None
    for number in numbers:
        if previous is not None and number == previous + 1:
            previous = number
            continue
        if start is not None and previous is not None:
            yield start, previous
        start = previous = number
    if start is not None and previous is not None:
        yield start, previous


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"
