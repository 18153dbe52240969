"""Moving a SQLite outbox into PostgreSQL: ``engage-async outbox migrate --to URL``.

Every change not yet done (pending, in flight, waiting for a GUID, dead), the bulk batches
still followed, the XML files planned, the identity map (refs are answered for ever) and the
contact types learned are copied, in seq order, so each contact's changes keep their order.

Once, however often it runs: every change keeps its ``change_id``, which is unique in the
target, and a change already there is skipped (``ON CONFLICT DO NOTHING``), so a run that was
interrupted is simply run again, and a change the target's flushers already sent is never
copied back. The copy is one PostgreSQL transaction; only after it committed is the SQLite
file marked as moved (``control.moved_to``), after which sessions and flushers refuse it
(`_outboxes.open_outbox`) and point at the new outbox. A run interrupted between the two
finds everything there and only marks the file.

Leases are not copied: what a SQLite flusher held (stop them first) is pending again in the
target, due at once; a create among them is looked up before it is sent, as after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from ._config import sqlite_path_of, url_without_password
from ._errors import OutboxError
from ._outbox import SqliteOutbox
from ._outboxes import is_outbox_url
from ._pg_outbox import import_asyncpg
from ._pg_schema import migrate as migrate_schema
from ._salvage import _check_source
from ._sqlite import sqlite_uri

__all__ = ["MigrationReport", "migrate_outbox"]

_CHUNK: Final = 5000
# The columns of `changes` both backends have, and their PostgreSQL types (for unnest).
_CHANGE_COLUMNS: Final = {
    "change_id": "text",
    "operation": "text",
    "state": "text",
    "contact_key": "text",
    "contact_id": "text",
    "ref": "text",
    "contact_type": "text",
    "key_name": "text",
    "key_value": "text",
    "identity": "text",
    "body": "text",
    "folded": "text",
    "query": "text",
    "lookup_first": "boolean",
    "if_exists": "text",
    "attempts": "integer",
    "lookups": "integer",
    "send_alone": "boolean",
    "created_at": "float8",
    "updated_at": "float8",
    "next_attempt_at": "float8",
    "batch_id": "text",
    "batch_index": "integer",
    "error_code": "text",
    "last_error": "text",
    "exported_to": "text",
    "xml_plan": "text",
}
_BOOLEAN: Final = frozenset({"lookup_first", "send_alone"})
# The other tables, keyed, with their column types; a row already in the target stays.
_KEYED: Final[dict[str, dict[str, str]]] = {
    "identities": {"key": "text", "contact_id": "text", "updated_at": "float8"},
    "contact_types": {"contact_id": "text", "contact_type": "text", "updated_at": "float8"},
    "batches": {
        "batch_id": "text",
        "kind": "text",
        "contact_type": "text",
        "submitted_at": "float8",
        "next_poll_at": "float8",
        "polls": "integer",
        "state": "text",
        "status": "text",
        "finished_at": "float8",
    },
    "xml_plans": {"path": "text", "digest": "text", "planned_at": "float8"},
}


@attrs.frozen
class MigrationReport:
    """What `migrate_outbox` moved.

    Attributes:
        source: the SQLite outbox.
        target: the PostgreSQL outbox (URL without its password, and schema).
        copied: rows copied now, per table.
        already_there: changes a run before this one had copied already.
    """

    source: Path
    target: str
    copied: dict[str, int]
    already_there: int

    def describe(self) -> str:
        """One line per fact, for the command line."""
        copied = ", ".join(f"{table} {count}" for table, count in self.copied.items())
        return (
            f"moved {self.source} to {self.target}: {copied}; "
            f"{self.already_there} change(s) were there already\n"
            f"{self.source} now refuses sessions and flushers: set ENGAGE_OUTBOX_URL"
        )


def _read_source(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Every row to move, read through a read-only connection."""
    with contextlib.closing(sqlite3.connect(sqlite_uri(path, "ro"), uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        conn.execute("BEGIN")  # one snapshot for every table
        tables = {
            "changes": [
                dict(row)
                for row in conn.execute("SELECT * FROM changes WHERE state <> 'done' ORDER BY seq")
            ]
        }
        for table, columns in _KEYED.items():
            where = " WHERE state = 'submitted'" if table == "batches" else ""
            listed = ", ".join(columns)
            tables[table] = [
                dict(row)
                for row in conn.execute(f"SELECT {listed} FROM {table}{where}")  # noqa: S608 - fixed names
            ]
        conn.execute("ROLLBACK")
    return tables


def _moved_change(row: dict[str, Any]) -> list[Any]:
    """A change as it goes into the target: no lease; one a flusher held without a batch or a
    file plan is pending again (a create among them is looked up first).
    """
    row = dict(row)
    if row["state"] == "inflight" and row["batch_id"] is None and row["xml_plan"] is None:
        row["state"] = "pending"
        if row["operation"] == "create":
            row["lookup_first"] = 1
    return [bool(row[name]) if name in _BOOLEAN else row[name] for name in _CHANGE_COLUMNS]


async def _insert(
    conn: Any,
    table: str,
    columns: dict[str, str],
    rows: Sequence[Sequence[Any]],
    conflict: str,
) -> int:
    """Insert `rows` (values in `columns` order) in chunks; how many were new."""
    listed = ", ".join(columns)
    arrays = ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(columns.values(), start=1))
    added = 0
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        values = [list(column) for column in zip(*chunk, strict=True)]
        inserted = await conn.fetch(
            f"INSERT INTO {table} ({listed}) SELECT {listed} FROM unnest({arrays})"  # noqa: S608 - fixed names
            f" WITH ORDINALITY AS t ({listed}, n) ORDER BY n"
            f" ON CONFLICT ({conflict}) DO NOTHING RETURNING 1",
            *values,
        )
        added += len(inserted)
    return added


async def migrate_outbox(
    source: str | os.PathLike[str], to: str, *, schema: str = "engage_outbox"
) -> MigrationReport:
    """Move the SQLite outbox at `source` (a path or ``sqlite:///`` URL) into the PostgreSQL
    outbox at `to`, once (see the module's docstring).

    Raises:
        OutboxError: `source` is not a SQLite outbox of this version, `to` not a PostgreSQL
            URL, or either cannot be reached; nothing was marked moved then.
        ValueError: `to` is not a ``postgresql://`` URL.
    """
    text = os.fspath(source)
    path = sqlite_path_of(text) if is_outbox_url(text) else Path(text)
    if path is None:
        raise ValueError("the outbox to move must be a SQLite file (a path or sqlite:///...)")
    if not is_outbox_url(to) or sqlite_path_of(to) is not None:
        raise ValueError("--to: must be a postgresql://user@host:port/db URL")
    if not path.exists():
        raise OutboxError(f"there is no outbox at {path.resolve()}")
    await asyncio.to_thread(_check_source, path)
    tables = await asyncio.to_thread(_read_source, path)
    target = f"{url_without_password(to)} (schema {schema})"
    asyncpg = import_asyncpg()
    try:
        conn = await asyncpg.connect(to, timeout=30)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise OutboxError(f"cannot connect to {target}: {type(exc).__name__}") from exc
    try:
        await migrate_schema(conn, schema, create=True)
        async with conn.transaction():
            # Two runs at once would both find the same changes missing: one at a time.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"migrate:{schema}")
            moved = [_moved_change(row) for row in tables["changes"]]
            copied = {
                "changes": await _insert(
                    conn, f"{schema}.changes", _CHANGE_COLUMNS, moved, "change_id"
                )
            }
            for table, columns in _KEYED.items():
                key = next(iter(columns))
                rows = [[row[name] for name in columns] for row in tables[table]]
                copied[table] = await _insert(conn, f"{schema}.{table}", columns, rows, key)
            await conn.execute(
                f"INSERT INTO {schema}.moved_from (source, moved_at, changes)"  # noqa: S608 - checked name
                f" VALUES ($1, {schema}.clock(), $2) ON CONFLICT (source) DO UPDATE"
                " SET moved_at = excluded.moved_at, changes = excluded.changes",
                str(path.resolve()),
                len(moved),
            )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise OutboxError(f"moving to {target} failed, nothing was kept: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
    # Only now that the target committed: the old file sends sessions and flushers there.
    old = await SqliteOutbox.open(path, create=False)
    try:
        await old.mark_moved(target)
    finally:
        await old.close()
    return MigrationReport(
        path, target, copied, already_there=len(tables["changes"]) - copied["changes"]
    )
