"""The PostgreSQL outbox's tables, in a schema of their own, and the forward migrations.

Everything lives in one schema (``outbox_schema``, default ``engage_outbox``), created on first
use by a session (a flusher or the admin never create one: they refuse a missing outbox).
``<schema>.schema_migrations`` records each version applied; a migration is appended to
`MIGRATIONS`, never edited once released, and each runs in its own transaction under a
transaction-scoped advisory lock (never a session lock: those leak through PgBouncer's
transaction pooling), so two processes starting at once do not both run it.

A database that holds a *breaking* version newer than this engage-async knows is refused; a
newer version marked not breaking (an expand step that only adds) is accepted, so old and new
processes can run side by side during a rolling deploy.

Times are ``float8`` seconds since the epoch, as in the SQLite file, and every one of them is
the database server's: ``<schema>.clock()``, the start of the current transaction. So hosts
whose clocks disagree agree on every lease, pause and due time. (A connection that sets
``engage_outbox.clock_now`` gets that time instead: an outbox opened with an injected clock,
as the tests do, sets it to that clock's time on every use; nothing else sets it.)
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Final

import attrs

from ._errors import OutboxError

if TYPE_CHECKING:
    import asyncpg

__all__ = ["MIGRATIONS", "Migration", "exists", "lock_space", "migrate"]


@attrs.frozen
class Migration:
    """One forward step: its SQL (``{s}`` is the schema), and whether older code breaks on it."""

    sql: str
    breaking: bool = True


_V1 = """
CREATE FUNCTION {s}.clock() RETURNS float8 LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        nullif(current_setting('engage_outbox.clock_now', true), '')::float8,
        extract(epoch FROM now())::float8
    )
$$;

CREATE TABLE {s}.changes (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- order of acceptance
    change_id       text NOT NULL UNIQUE,
    operation       text NOT NULL
                    CHECK (operation IN ('create', 'update', 'contact_type', 'promote')),
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'inflight', 'waiting_guid', 'done', 'dead')),
    contact_key     text NOT NULL,      -- 'id:<guid>' or 'ref:<ref>': applied in seq order
    contact_id      text,
    ref             text,
    contact_type    text,
    key_name        text,
    key_value       text,
    identity        text,               -- a create's identity-map key, to join a second create
    body            text,               -- the exact JSON body to send
    folded          text,               -- updates folded into a create
    query           text,               -- JSON object: source, storeExternalId, ...
    lookup_first    boolean NOT NULL DEFAULT false,
    sending         boolean NOT NULL DEFAULT false,  -- recorded just before its request goes
                                                     -- out: looked up first if its flusher
                                                     -- then vanished
    if_exists       text,
    attempts        integer NOT NULL DEFAULT 0,
    lookups         integer NOT NULL DEFAULT 0,
    send_alone      boolean NOT NULL DEFAULT false,
    created_at      float8 NOT NULL,
    updated_at      float8 NOT NULL,
    next_attempt_at float8 NOT NULL,
    lease_owner     text,
    lease_until     float8,             -- by the server's clock: expired leases come back
    batch_id        text,
    batch_index     integer,
    error_code      text,
    last_error      text,
    exported_to     text,
    xml_plan        text,
    done_at         float8
);
CREATE INDEX changes_active_by_contact ON {s}.changes (contact_key, seq)
    WHERE state IN ('pending', 'inflight', 'waiting_guid');
CREATE INDEX changes_pending ON {s}.changes (seq) WHERE state = 'pending';
CREATE INDEX changes_waiting ON {s}.changes (next_attempt_at) WHERE state = 'waiting_guid';
CREATE INDEX changes_by_batch ON {s}.changes (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX changes_by_ref ON {s}.changes (ref) WHERE ref IS NOT NULL;
CREATE INDEX changes_queued_creates ON {s}.changes (identity)
    WHERE operation = 'create' AND state IN ('pending', 'inflight', 'waiting_guid');
CREATE INDEX changes_by_xml_plan ON {s}.changes (xml_plan) WHERE xml_plan IS NOT NULL;
-- Every row under a lease, by owner: renewing them, and finding those whose lease ran out
-- (every flusher step), read only these. (Fewer indexes than the SQLite file: every index
-- is written again each time a row changes state, which is most of a claim's cost.)
CREATE INDEX changes_leased ON {s}.changes (lease_owner) WHERE lease_owner IS NOT NULL;

CREATE TABLE {s}.identities (
    key         text PRIMARY KEY,
    contact_id  text NOT NULL,
    updated_at  float8 NOT NULL
);

CREATE TABLE {s}.contact_types (
    contact_id   text PRIMARY KEY,
    contact_type text NOT NULL,
    updated_at   float8 NOT NULL
);

CREATE TABLE {s}.batches (
    batch_id     text PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('create', 'update')),
    contact_type text,
    submitted_at float8 NOT NULL,
    next_poll_at float8 NOT NULL,
    polls        integer NOT NULL DEFAULT 0,
    lease_owner  text,
    lease_until  float8,
    state        text NOT NULL DEFAULT 'submitted' CHECK (state IN ('submitted', 'finished')),
    status       text,
    finished_at  float8
);
CREATE INDEX batches_due ON {s}.batches (next_poll_at) WHERE state = 'submitted';

CREATE TABLE {s}.xml_plans (
    path        text PRIMARY KEY,
    digest      text NOT NULL,
    planned_at  float8 NOT NULL
);

-- Flushers and their leases: a flusher renews `lease_until` (and its rows') every third of a
-- lease; once the server's clock passes it, any other flusher takes back what it held.
CREATE TABLE {s}.flushers (
    owner       text PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    pidns       text NOT NULL,
    lease_until float8 NOT NULL
);

-- The pause every flusher obeys.
CREATE TABLE {s}.control (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- One request budget per Engage key (a hash: the key itself is never stored), shared by
-- every process on every host (engage_async/_pg_budget.py).
CREATE TABLE {s}.budgets (
    key         bytea PRIMARY KEY,
    slots       float8[] NOT NULL,
    scale       float8 NOT NULL DEFAULT 1,
    last_cut    float8 NOT NULL DEFAULT '-infinity',
    rate_warned boolean NOT NULL DEFAULT false,
    blocked_until float8 NOT NULL DEFAULT 0,
    time_window float8 NOT NULL DEFAULT 1.005,
    last_grown  float8 NOT NULL DEFAULT '-infinity'
);

-- SQLite outboxes moved here (`engage-async outbox migrate`): which file, and how far.
CREATE TABLE {s}.moved_from (
    source      text PRIMARY KEY,
    moved_at    float8 NOT NULL,
    changes     integer NOT NULL
);
"""

MIGRATIONS: Final[tuple[Migration, ...]] = (Migration(_V1),)


def lock_space(schema: str) -> int:
    """The first key of every advisory lock this schema's outbox takes (a 32-bit number of
    its own, so that other users of advisory locks in the database are not in the way).
    """
    return zlib.crc32(f"engage-outbox:{schema}".encode()) - 2**31


async def exists(conn: asyncpg.Connection, schema: str) -> bool:
    """Whether `schema` holds an outbox (of any version)."""
    found = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_migrations")
    return bool(found)


async def _versions(conn: asyncpg.Connection, schema: str) -> dict[int, bool]:
    rows = await conn.fetch(f"SELECT version, breaking FROM {schema}.schema_migrations")
    return {row["version"]: row["breaking"] for row in rows}


def _check_not_newer(versions: dict[int, bool], schema: str) -> None:
    newer = sorted(v for v, breaking in versions.items() if v > len(MIGRATIONS) and breaking)
    if newer:
        raise OutboxError(
            f"the outbox schema {schema} has version {newer[-1]}, newer than this engage-async "
            f"understands ({len(MIGRATIONS)}); upgrade engage-async"
        )


async def migrate(conn: asyncpg.Connection, schema: str, *, create: bool) -> None:
    """Bring `schema` to the current version (creating it if `create`), or refuse it.

    Raises:
        OutboxError: there is no outbox and `create` is False; the schema is from a newer
            engage-async; or a migration failed (the database's error is the cause).
    """
    if await exists(conn, schema):
        versions = await _versions(conn, schema)
        _check_not_newer(versions, schema)
        if all(v in versions for v in range(1, len(MIGRATIONS) + 1)):
            return  # the common case: up to date, no lock taken
    elif not create:
        raise OutboxError(
            f"there is no outbox in schema {schema} of this database; an EngageSession creates "
            "it (or check outbox_url and outbox_schema)"
        )
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, 0)", lock_space(schema))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
            " version integer PRIMARY KEY, breaking boolean NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        # Read again under the lock: another process may have migrated meanwhile.
        versions = await _versions(conn, schema)
        _check_not_newer(versions, schema)
        for number, migration in enumerate(MIGRATIONS, start=1):
            if number in versions:
                continue
            await conn.execute(migration.sql.replace("{s}", schema))
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (version, breaking) VALUES ($1, $2)",
                number,
                migration.breaking,
            )
