"""The outbox's tables, and the forward migrations between their versions.

``PRAGMA application_id`` marks the file as ours, so a foreign SQLite database at the outbox
path is refused instead of being written into; ``PRAGMA user_version`` is the schema version.
A migration is appended to `MIGRATIONS`, never edited once released: a file is walked forward
one version at a time, each step in its own transaction. A file from a newer engage-async is
refused rather than guessed at.

A file is also refused when a page of its tables or indexes cannot be read (`check_pages`),
so a damaged outbox is reported when it is opened, not at the first flush. Walking every
b-tree costs 0.1-0.2 s for 100,000 changes, a third to a sixth of ``PRAGMA quick_check``
(benchmarks/open_check.py; docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Mapping
from typing import Final

from ._errors import OutboxError

__all__ = [
    "APPLICATION_ID",
    "INDEX_WALKS",
    "MIGRATIONS",
    "TABLE_WALKS",
    "Damaged",
    "check_pages",
    "migrate",
]

APPLICATION_ID: Final = 0x45414F42  # "EAOB": engage-async outbox

_V1 = """
CREATE TABLE changes (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- order of acceptance
    change_id       TEXT NOT NULL UNIQUE,
    operation       TEXT NOT NULL
                    CHECK (operation IN ('create', 'update', 'contact_type', 'promote')),
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'inflight', 'waiting_guid', 'done', 'dead')),
    contact_key     TEXT NOT NULL,      -- 'id:<guid>' or 'ref:<ref>': changes to one contact
                                        -- are applied in seq order
    contact_id      TEXT,               -- the GUID, once known
    ref             TEXT,               -- the ref of the create this contact came from
    contact_type    TEXT,               -- create: its type; contact_type: the target type;
                                        -- update: the contact's type when known (for XML)
    key_name        TEXT,               -- the contact's key attribute, for lookups
    key_value       TEXT,
    identity        TEXT,               -- create: its identity-map key (normalised key value),
                                        -- so a second create for the same contact joins it
    body            TEXT,               -- the exact JSON body to send
    folded          TEXT,               -- updates folded into a create (applied as an
                                        -- update if the contact turns out to exist)
    query           TEXT,               -- JSON object: source, storeExternalId, ...
    lookup_first    INTEGER NOT NULL DEFAULT 0,  -- a create that may exist: look up first
    if_exists       TEXT,               -- create: 'return' or 'update'
    attempts        INTEGER NOT NULL DEFAULT 0,  -- definitive failures only, never outages
    lookups         INTEGER NOT NULL DEFAULT 0,  -- GUID lookups made while waiting_guid
    send_alone      INTEGER NOT NULL DEFAULT 0,  -- replay through the single endpoint: a bulk
                                                 -- request could not tell this row's fate
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    due_delay       REAL NOT NULL DEFAULT 0,  -- the wait that set next_attempt_at: a due time
                                              -- further ahead than that was written by a
                                              -- clock that was ahead, and is due now
    lease_owner     TEXT,
    lease_until     REAL,
    batch_id        TEXT,
    batch_index     INTEGER,
    error_code      TEXT,
    last_error      TEXT,
    exported_to     TEXT,
    xml_plan        TEXT,               -- the XML file this row is going into, decided and
                                        -- committed before the file is written (xml_plans);
                                        -- cleared once the file is recorded
    done_at         REAL
);
-- The head of each contact's chain, and what a claim scans.
CREATE INDEX changes_active_by_contact ON changes (contact_key, seq)
    WHERE state IN ('pending', 'inflight', 'waiting_guid');
CREATE INDEX changes_pending ON changes (seq) WHERE state = 'pending';
CREATE INDEX changes_inflight ON changes (lease_owner) WHERE state = 'inflight';
CREATE INDEX changes_waiting ON changes (next_attempt_at) WHERE state = 'waiting_guid';
CREATE INDEX changes_by_batch ON changes (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX changes_by_ref ON changes (ref) WHERE ref IS NOT NULL;
CREATE INDEX changes_queued_creates ON changes (identity)
    WHERE operation = 'create' AND state IN ('pending', 'inflight', 'waiting_guid');
CREATE INDEX changes_by_xml_plan ON changes (xml_plan) WHERE xml_plan IS NOT NULL;

-- key -> GUID: 'ref:<ref>' (kept for ever) or 'key:<attribute>:<type>:<value>' (a cache).
CREATE TABLE identities (
    key         TEXT PRIMARY KEY,
    contact_id  TEXT NOT NULL,
    updated_at  REAL NOT NULL
) WITHOUT ROWID;

-- contact id -> its contact type as last seen (a read, a create, a type change): a bulk update
-- is sent under its contacts' type, and an update whose type is unknown goes alone.
CREATE TABLE contact_types (
    contact_id   TEXT PRIMARY KEY,
    contact_type TEXT NOT NULL,
    updated_at   REAL NOT NULL
) WITHOUT ROWID;

-- Bulk batches Engage accepted and that are being followed until they finish.
CREATE TABLE batches (
    batch_id     TEXT PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('create', 'update')),
    contact_type TEXT,
    submitted_at REAL NOT NULL,
    next_poll_at REAL NOT NULL,
    poll_delay   REAL NOT NULL DEFAULT 0,  -- the wait that set next_poll_at (as due_delay)
    polls        INTEGER NOT NULL DEFAULT 0,
    lease_owner  TEXT,
    lease_until  REAL,
    state        TEXT NOT NULL DEFAULT 'submitted' CHECK (state IN ('submitted', 'finished')),
    status       TEXT,              -- Engage's last status answer, kept as sent (opaque)
    finished_at  REAL
) WITHOUT ROWID;
CREATE INDEX batches_due ON batches (next_poll_at) WHERE state = 'submitted';

-- XML files decided before they are written: the name, and the digest of the bytes that go
-- under it. A flusher that dies between writing a file and recording it leaves its plan
-- here; the next one finishes that very file (found by its digest, or written again under
-- the same name), never a second one with the same rows.
CREATE TABLE xml_plans (
    path        TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,      -- SHA-256 of the file's bytes, hex
    planned_at  REAL NOT NULL
) WITHOUT ROWID;

-- Flushers that may hold leases, and their heartbeats: a flusher's rows are taken over only
-- by a process that saw its `beats` stand still for a whole lease on its own clock. Host,
-- pid and pid namespace let a process on the same host see at once that the owner is gone.
CREATE TABLE flushers (
    owner  TEXT PRIMARY KEY,
    host   TEXT NOT NULL,
    pid    INTEGER NOT NULL,
    pidns  TEXT NOT NULL,
    beats  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Shared flusher state, e.g. the pause after an outage that every flusher obeys.
CREATE TABLE control (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""

MIGRATIONS: Final[tuple[str, ...]] = (_V1,)


class Damaged(OutboxError):
    """A page of the outbox cannot be read, or holds rows that cannot be what we wrote."""


# One walk per b-tree of the current schema (a migration that adds one adds its walk; a test
# holds the two together). A table is read without an index, so SQLite visits every page of its
# own b-tree, decoding each row up to its last column (``typeof(...) = 'x'`` is never true, but
# SQLite must read the column to know); the walk counts the rows that cannot be ours: a seq
# beyond the highest ever given, which a garbled row header turns into. (``x IS NULL`` on a
# NOT NULL column would catch more but is folded away; ``length`` formats every REAL, which
# costs half as much again.) An index is scanned through INDEXED BY, under its own WHERE if it
# is partial.
TABLE_WALKS: Final[Mapping[str, str]] = {
    "sqlite_sequence": "SELECT count(*) FROM sqlite_sequence WHERE typeof(seq) = 'x'",
    "changes": (
        "SELECT count(*) FROM changes NOT INDEXED"
        " WHERE seq > (SELECT seq FROM sqlite_sequence WHERE name = 'changes')"
        " OR typeof(done_at) = 'x'"
    ),
    "identities": "SELECT count(*) FROM identities NOT INDEXED WHERE typeof(updated_at) = 'x'",
    "batches": "SELECT count(*) FROM batches NOT INDEXED WHERE typeof(finished_at) = 'x'",
    "control": "SELECT count(*) FROM control NOT INDEXED WHERE typeof(value) = 'x'",
    "contact_types": (
        "SELECT count(*) FROM contact_types NOT INDEXED WHERE typeof(updated_at) = 'x'"
    ),
    "flushers": "SELECT count(*) FROM flushers NOT INDEXED WHERE typeof(beats) = 'x'",
    "xml_plans": "SELECT count(*) FROM xml_plans NOT INDEXED WHERE typeof(planned_at) = 'x'",
}
INDEX_WALKS: Final[Mapping[str, str]] = {
    "sqlite_autoindex_changes_1": (
        "SELECT count(*) FROM changes INDEXED BY sqlite_autoindex_changes_1"
        " WHERE change_id IS NOT NULL"
    ),
    "changes_active_by_contact": (
        "SELECT count(*) FROM changes INDEXED BY changes_active_by_contact"
        " WHERE state IN ('pending', 'inflight', 'waiting_guid')"
    ),
    "changes_pending": (
        "SELECT count(*) FROM changes INDEXED BY changes_pending WHERE state = 'pending'"
    ),
    "changes_inflight": (
        "SELECT count(*) FROM changes INDEXED BY changes_inflight WHERE state = 'inflight'"
    ),
    "changes_waiting": (
        "SELECT count(*) FROM changes INDEXED BY changes_waiting WHERE state = 'waiting_guid'"
    ),
    "changes_by_batch": (
        "SELECT count(*) FROM changes INDEXED BY changes_by_batch WHERE batch_id IS NOT NULL"
    ),
    "changes_by_ref": (
        "SELECT count(*) FROM changes INDEXED BY changes_by_ref WHERE ref IS NOT NULL"
    ),
    "changes_queued_creates": (
        "SELECT count(*) FROM changes INDEXED BY changes_queued_creates"
        " WHERE operation = 'create' AND state IN ('pending', 'inflight', 'waiting_guid')"
    ),
    "batches_due": "SELECT count(*) FROM batches INDEXED BY batches_due WHERE state = 'submitted'",
    "changes_by_xml_plan": (
        "SELECT count(*) FROM changes INDEXED BY changes_by_xml_plan WHERE xml_plan IS NOT NULL"
    ),
}


def check_pages(conn: sqlite3.Connection) -> None:
    """Visit every page of every table and index, in one read transaction.

    With ``cell_size_check`` on, SQLite checks each page's header and cell layout as it loads
    it, and every row is decoded: a page overwritten with anything else fails here, and so
    does a row header garbled into a seq out of range. Not caught (``PRAGMA quick_check``
    catches some, at three to six times the cost): a garbled row header that still decodes
    into a plausible seq, garbled bytes inside a value (SQLite keeps no checksums, so nothing
    catches those), overflow pages of rows larger than a page, free pages.

    Raises:
        Damaged: a page cannot be read (the cause is SQLite's error), or a table holds rows
            that cannot be ours.
    """
    conn.execute("PRAGMA cell_size_check = ON")
    try:
        conn.execute("BEGIN")
        try:
            for name, walk in (*TABLE_WALKS.items(), *INDEX_WALKS.items()):
                try:
                    garbled = conn.execute(walk).fetchone()[0]
                except sqlite3.DatabaseError as exc:
                    raise Damaged(f"{name} cannot be read: {exc}") from exc
                if name in TABLE_WALKS and garbled:
                    raise Damaged(f"{name} holds {garbled} garbled row(s)")
        finally:
            # A read transaction has nothing to keep; after a damaged page SQLite may have
            # ended it already, or answer the ROLLBACK with the same error.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
    finally:
        conn.execute("PRAGMA cell_size_check = OFF")


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the file to the current schema, or refuse it. Runs outside a transaction.

    Raises:
        OutboxError: a foreign database, one written by a newer engage-async, or a damaged
            one (`check_pages`).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        has_tables = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
        ).fetchone()[0]
        if application_id != APPLICATION_ID and (application_id != 0 or has_tables):
            raise OutboxError(
                "the file is a SQLite database that is not an engage-async outbox; "
                "it was left untouched"
            )
        if version > len(MIGRATIONS):
            raise OutboxError(
                f"the outbox has schema version {version}, newer than this engage-async "
                f"understands ({len(MIGRATIONS)}); upgrade engage-async"
            )
        if application_id == 0:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    while version < len(MIGRATIONS):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < len(MIGRATIONS):
                for statement in _statements(MIGRATIONS[version]):
                    conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    # A file already at this version was not written to above: a damaged one is left as it
    # is, for salvage.
    check_pages(conn)


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    without_comments = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    return [part.strip() for part in without_comments.split(";") if part.strip()]
