"""Every row transition of the PostgreSQL outbox: the one home of its SQL.

The same transitions, under the same rules, as `_rows` for SQLite (merging, head-of-chain
claims, "look up first" marked at the claim, dependents dying with their create, learned
contact types, XML plans, creates waiting for the API); what differs is how concurrent
writers on many hosts are kept apart:

* Each function runs on a connection its caller (`_pg_outbox.PgOutbox`) took from the pool,
  inside a transaction the caller opened when the transition needs more than one statement.
* Every time is the server's (``<schema>.clock()``): a lease ends at the server's time plus
  the lease, a due time is the server's time plus the delay. No host clock is ever written
  or compared, so hosts whose clocks disagree agree on everything.
* Claims lock the rows they pick with ``FOR UPDATE SKIP LOCKED`` in a CTE (never
  ``IN (subquery LIMIT)``, which the planner may run twice): two flushers never wait for each
  other and never take the same row. Only the head of each contact's chain is claimable.
* Writers to one contact (enqueues, a GUID found) take a transaction-scoped advisory lock on
  its key first, so a contact's changes get their seqs in the order they commit, and a
  merge never lands in a row a flusher has just claimed (the tail is read ``FOR UPDATE``).

`s` is the schema name (checked by `EngageConfig`: letters, digits, underscores).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs

from ._changes import Batch, Change, NewChange, Operation, Queued, State, dumps
from ._coalesce import fold_into, identity_of
from ._create_policy import without_type
from ._keys import contact_key, identity_key, is_ref, new_change_id
from ._redact import scrub
from ._rows import WAITS_FOR_API
from ._store import Failures, OutboxCounts, Pause
from ._wire import is_contact_id

if TYPE_CHECKING:
    import asyncpg
    import asyncpg.pool

    Conn: TypeAlias = (
        asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    )

__all__ = [
    "batch_rows",
    "bury",
    "claim",
    "claim_batches",
    "claim_waiting",
    "clear_pause",
    "committed",
    "counts",
    "create_again",
    "create_became_update",
    "create_of",
    "discard",
    "due_count",
    "enqueue",
    "enqueue_at_once",
    "enqueue_many_at_once",
    "enqueue_outcome",
    "export_rows",
    "exported",
    "finish",
    "finish_export",
    "forget_lease_of_batches",
    "get_change",
    "has_active",
    "identity",
    "learn_types",
    "leaving",
    "list_changes",
    "local_flushers",
    "lock_key",
    "next_batch_poll",
    "not_found_yet",
    "open_changes",
    "pause",
    "plan_export",
    "poll_batch_later",
    "prune",
    "queued_create",
    "record_guid",
    "recover",
    "register",
    "release",
    "renew",
    "replan_export",
    "requeue",
    "requeue_dead",
    "set_pause",
    "settle_batch",
    "stale_exports",
    "submit_batch",
    "unfinished_count",
    "upsert_identities",
    "wait_for_api",
    "waiting_for_api",
]

_ACTIVE = "state IN ('pending', 'inflight', 'waiting_guid')"
_UNLEASED = "lease_owner = NULL, lease_until = NULL"
_INSERT_COLUMNS = (
    "change_id, operation, contact_key, contact_id, ref, contact_type, key_name, key_value,"
    " identity, body, query, lookup_first, if_exists, created_at, updated_at, next_attempt_at,"
    " last_error"
)


def lock_key(key: str) -> int:
    """The second key of the advisory lock on a contact key or identity (32-bit, signed)."""
    return zlib.crc32(key.encode()) - 2**31


async def _lock(conn: Conn, space: int, *keys: str) -> None:
    """Take the transaction's advisory locks on `keys`, in one order for everyone (no
    deadlock between two writers that each need two).
    """
    for number in sorted({lock_key(key) for key in keys}):
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", space, number)


def _change(row: Any) -> Change:
    """A ``SELECT *`` row of ``changes`` (an asyncpg record reads as a sqlite3 row does)."""
    return Change.from_row(row)


def _changes(rows: Iterable[Any]) -> list[Change]:
    return [_change(row) for row in rows]


# --- the identity map ---------------------------------------------------------------------------


async def upsert_identities(conn: Conn, s: str, rows: Iterable[tuple[str, str]]) -> None:
    """Record (key, GUID) rows, replacing what each key named before."""
    latest = dict(rows)  # one statement may not touch a key twice
    if not latest:
        return
    await conn.execute(
        f"INSERT INTO {s}.identities (key, contact_id, updated_at)"
        f" SELECT k, g, {s}.clock() FROM unnest($1::text[], $2::text[]) AS t (k, g)"
        " ON CONFLICT (key) DO UPDATE SET contact_id = excluded.contact_id,"
        " updated_at = excluded.updated_at",
        list(latest),
        list(latest.values()),
    )


async def learn_types(conn: Conn, s: str, rows: Iterable[tuple[str, str]]) -> None:
    """Record (GUID, contact type) rows: what type Engage last showed each contact."""
    latest = dict(rows)
    if not latest:
        return
    await conn.execute(
        f"INSERT INTO {s}.contact_types (contact_id, contact_type, updated_at)"
        f" SELECT g, t, {s}.clock() FROM unnest($1::text[], $2::text[]) AS x (g, t)"
        " ON CONFLICT (contact_id) DO UPDATE SET contact_type = excluded.contact_type,"
        " updated_at = excluded.updated_at",
        list(latest),
        list(latest.values()),
    )


async def identity(conn: Conn, s: str, key: str, max_age: float | None) -> str | None:
    """The GUID recorded for `key`, if recorded less than `max_age` seconds ago."""
    found = await conn.fetchval(
        f"SELECT contact_id FROM {s}.identities WHERE key = $1"
        f" AND ($2::float8 IS NULL OR updated_at >= {s}.clock() - $2::float8)",
        key,
        max_age,
    )
    return None if found is None else str(found)


async def _guid_found(conn: Conn, s: str, space: int, create: Any, contact_id: str) -> None:
    """A create's contact is `contact_id`: record its ref and key, and point the changes
    waiting on its contact key at the GUID (which releases them).
    """
    new_key = contact_key(contact_id=contact_id)
    await _lock(conn, space, create["contact_key"], new_key)
    keys = [f"ref:{create['ref']}"]
    if create["key_name"] and create["key_value"]:
        keys.append(identity_key(create["key_name"], create["key_value"], create["contact_type"]))
    await upsert_identities(conn, s, [(key, contact_id) for key in keys])
    if create["contact_type"]:
        await learn_types(conn, s, [(contact_id, create["contact_type"])])
    await conn.execute(
        f"UPDATE {s}.changes SET contact_key = $1, contact_id = $2, updated_at = {s}.clock()"
        f" WHERE contact_key = $3 AND {_ACTIVE}",
        new_key,
        contact_id,
        create["contact_key"],
    )


async def record_guid(conn: Conn, s: str, space: int, seq: int, contact_id: str) -> None:
    """The create at `seq` exists as `contact_id`: done, and its chain freed (in a
    transaction).
    """
    create = await conn.fetchrow(
        f"SELECT ref, key_name, key_value, contact_type, contact_key FROM {s}.changes"
        " WHERE seq = $1",
        seq,
    )
    if create is None:
        return
    await _guid_found(conn, s, space, create, contact_id)
    await conn.execute(
        f"UPDATE {s}.changes SET state = 'done', contact_id = $1, done_at = {s}.clock(),"
        f" updated_at = {s}.clock(), {_UNLEASED} WHERE seq = $2",
        contact_id,
        seq,
    )


async def create_became_update(
    conn: Conn, s: str, space: int, change: Change, contact_id: str, body: Mapping[str, Any]
) -> None:
    """The create at `change.seq` turns into an update of `contact_id` applying `body` (in a
    transaction).
    """
    await _guid_found(
        conn,
        s,
        space,
        {
            "ref": change.ref,
            "key_name": change.key_name,
            "key_value": change.key_value,
            "contact_type": change.contact_type,
            "contact_key": change.contact_key,
        },
        contact_id,
    )
    await conn.execute(
        f"UPDATE {s}.changes SET operation = 'update', body = $1, folded = NULL,"
        f" lookup_first = false, updated_at = {s}.clock() WHERE seq = $2",
        dumps(body),
        change.seq,
    )


# --- enqueue ---------------------------------------------------------------------------------


async def has_active(conn: Conn, s: str, key: str) -> bool:
    """Do changes to this contact still wait?"""
    found = await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {s}.changes WHERE contact_key = $1 AND {_ACTIVE})", key
    )
    return bool(found)


async def _queued_create_row(
    conn: Conn, s: str, key_name: str, key_value: str, contact_type: str | None
) -> Any:
    """The newest create still waiting for this key and contact type (normalised key)."""
    return await conn.fetchrow(
        f"SELECT change_id, ref, contact_key FROM {s}.changes WHERE operation = 'create'"
        f" AND {_ACTIVE} AND identity = $1 ORDER BY seq DESC LIMIT 1",
        identity_key(key_name, key_value, contact_type),
    )


async def queued_create(
    conn: Conn, s: str, key_name: str, key_value: str, contact_type: str
) -> tuple[str, str] | None:
    """(change_id, ref) of a create still waiting for this key and type."""
    row = await _queued_create_row(conn, s, key_name, key_value, contact_type)
    return None if row is None else (row["change_id"], row["ref"])


async def create_of(conn: Conn, s: str, ref: str) -> Change | None:
    """The create that made `ref`, in any state."""
    row = await conn.fetchrow(
        f"SELECT * FROM {s}.changes WHERE ref = $1 AND operation = 'create'"
        " ORDER BY seq DESC LIMIT 1",
        ref,
    )
    return None if row is None else _change(row)


def _known_type_sql(s: str, key: str, ref: str) -> str:
    """The contact type an update's contact has, as far as the outbox knows: from the newest
    create or type change queued for it (by its contact key `key`, else its ref `ref`).
    """
    typed = "operation IN ('create', 'contact_type', 'promote') AND contact_type IS NOT NULL"
    return (
        f"coalesce((SELECT contact_type FROM {s}.changes WHERE contact_key = {key}"
        f" AND {_ACTIVE} AND {typed} ORDER BY seq DESC LIMIT 1),"
        f" (SELECT contact_type FROM {s}.changes WHERE ref = {ref} AND {typed}"
        " ORDER BY seq DESC LIMIT 1))"
    )


def _insert_values(change: NewChange, change_id: str) -> tuple[Any, ...]:
    return (
        change_id,
        str(change.operation),
        change.contact_key,
        change.contact_id,
        change.ref,
        change.contact_type,
        change.key_name,
        change.key_value,
        identity_of(change.operation, change.key_name, change.key_value, change.contact_type),
        dumps(change.body),
        dumps(change.query),
        change.lookup_first,
        change.if_exists,
        change.reason,
    )


def _insert_select(s: str, offset: int) -> str:
    """``SELECT`` of an insert's values from parameters ``$offset+1 ...``; an update whose
    type is not given gets the type the outbox knows.
    """
    types = ("text",) * 11 + ("boolean", "text", "text")
    p = [f"${offset + n}::{kind}" for n, kind in enumerate(types, start=1)]
    contact_type = (
        f"CASE WHEN {p[1]} = 'update' AND {p[5]} IS NULL"
        f" THEN {_known_type_sql(s, p[2], p[4])} ELSE {p[5]} END"
    )
    return (
        f"SELECT {p[0]}, {p[1]}, {p[2]}, {p[3]}, {p[4]}, {contact_type}, {p[6]}, {p[7]},"
        f" {p[8]}, {p[9]}, {p[10]}, {p[11]}, {p[12]}, now.t, now.t, now.t, {p[13]}"
    )


async def enqueue_at_once(
    conn: Conn, s: str, space: int, change: NewChange, change_id: str
) -> Queued | None:
    """Insert a change that no queued change of its contact can take in, in one statement
    (autocommit): None when it might be merged after all (`enqueue` then decides).

    Creates never come here (a second create for a key joins the first, which needs a read
    after the lock). The lock is taken inside the statement, so this contact's seqs still
    follow their commits; its snapshot is older than the lock, so a pending change committed
    in between is not merged into, only queued behind (order kept, one request more).
    """
    # Only a pending tail can take a merge. Asked as "the tail's state" so that the plan,
    # made once for every contact (generic), walks this contact's index entries backwards
    # from its newest, never the pending rows of every contact.
    mergeable = (
        f"coalesce((SELECT state FROM {s}.changes WHERE contact_key = $5::text AND {_ACTIVE}"
        " ORDER BY seq DESC LIMIT 1) = 'pending', false)"
        if change.operation is Operation.UPDATE and change.body is not None
        else "false"
    )
    seq = await conn.fetchval(
        f"WITH locked AS (SELECT pg_advisory_xact_lock($1, $2))"
        f" INSERT INTO {s}.changes ({_INSERT_COLUMNS})"
        f" {_insert_select(s, 2)} FROM locked, (SELECT {s}.clock() AS t) AS now"
        f" WHERE NOT {mergeable} RETURNING seq",
        space,
        lock_key(change.contact_key),
        *_insert_values(change, change_id),
    )
    if seq is None:
        return None
    return Queued(change_id, ref=change.ref)


_MANY_COLUMNS = (
    "change_id, operation, contact_key, contact_id, ref, contact_type, key_name, key_value,"
    " identity, body, query, lookup_first, if_exists, last_error, mergeable"
)
_MANY_TYPES = ("text",) * 11 + ("boolean", "text", "text", "boolean")


async def enqueue_many_at_once(
    conn: Conn, s: str, space: int, items: Sequence[tuple[NewChange, str]]
) -> set[str]:
    """`enqueue_at_once` for several changes (each with its change id) in one statement; the
    change ids inserted (the others might be merged: `enqueue` decides).

    The advisory locks of all their contacts are taken first, in one order, so two such
    statements never deadlock, and each contact's seqs follow the order of `items`.
    """
    columns = [
        [*_insert_values(change, change_id), _may_merge(change)] for change, change_id in items
    ]
    arrays = [list(column) for column in zip(*columns, strict=True)]
    params = ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(_MANY_TYPES, start=3))
    contact_type = (
        "CASE WHEN i.operation = 'update' AND i.contact_type IS NULL"
        f" THEN {_known_type_sql(s, 'i.contact_key', 'i.ref')} ELSE i.contact_type END"
    )
    tail_pending = (
        f"coalesce((SELECT t.state FROM {s}.changes AS t WHERE t.contact_key = i.contact_key"
        f" AND t.{_ACTIVE} ORDER BY t.seq DESC LIMIT 1) = 'pending', false)"
    )
    rows = await conn.fetch(
        f"WITH locked AS (SELECT count(pg_advisory_xact_lock($1, k)) AS n"
        f" FROM (SELECT DISTINCT k FROM unnest($2::integer[]) AS u (k) ORDER BY k) AS keys)"
        f" INSERT INTO {s}.changes ({_INSERT_COLUMNS})"
        f" SELECT i.change_id, i.operation, i.contact_key, i.contact_id, i.ref, {contact_type},"
        " i.key_name, i.key_value, i.identity, i.body, i.query, i.lookup_first, i.if_exists,"
        " now.t, now.t, now.t, i.last_error"
        f" FROM unnest({params}) WITH ORDINALITY AS i ({_MANY_COLUMNS}, n),"
        f" locked, (SELECT {s}.clock() AS t) AS now"
        f" WHERE locked.n >= 0 AND NOT (i.mergeable AND {tail_pending})"
        " ORDER BY i.n RETURNING change_id",
        space,
        [lock_key(change.contact_key) for change, _ in items],
        *arrays,
    )
    return {row["change_id"] for row in rows}


def _may_merge(change: NewChange) -> bool:
    return change.operation is Operation.UPDATE and change.body is not None


async def enqueue(conn: Conn, s: str, space: int, change: NewChange) -> Queued:
    """Insert `change`, or merge it into what waits for the same contact (in a transaction)."""
    if change.operation is Operation.CREATE and change.key_name and change.key_value:
        twin_identity = identity_key(change.key_name, change.key_value, change.contact_type)
        await _lock(conn, space, twin_identity)
        twin = await _queued_create_row(
            conn, s, change.key_name, change.key_value, change.contact_type
        )
        if twin is not None:
            # The contact is already on its way in: a second create would make a duplicate.
            if change.if_exists == "update" and change.body:
                await _lock(conn, space, twin["contact_key"])
                changes = without_type(change.body)
                if await _merge_into_tail(conn, s, twin["contact_key"], changes) is None:
                    # Its create is already on the wire: the attributes follow it as an update.
                    await _insert(
                        conn,
                        s,
                        NewChange(
                            Operation.UPDATE,
                            twin["contact_key"],
                            body=changes,
                            ref=twin["ref"],
                            reason=change.reason,
                        ),
                    )
            return Queued(twin["change_id"], ref=twin["ref"], duplicate=True)
    await _lock(conn, space, change.contact_key)
    if change.operation is not Operation.CREATE and change.contact_id is None:
        guid = await identity(conn, s, change.contact_key, None)
        if guid is not None:
            # The ref's create was delivered (by another host, say) after the session saw it
            # waiting: the change follows the GUID, as the rows already re-keyed did. The
            # delivery has committed, so nobody holds both locks any more.
            new_key = contact_key(contact_id=guid)
            await _lock(conn, space, new_key)
            change = attrs.evolve(change, contact_key=new_key, contact_id=guid)
    if change.operation is Operation.UPDATE and change.body is not None:
        merged = await _merge_into_tail(conn, s, change.contact_key, change.body, change.query)
        if merged is not None:
            return merged
    return await _insert(conn, s, change)


async def _merge_into_tail(
    conn: Conn,
    s: str,
    key: str,
    changes: Mapping[str, Any],
    query: Mapping[str, str] | None = None,
) -> Queued | None:
    """Fold `changes` into the contact's last waiting change where `fold_into` allows, else
    None. The tail is locked first, so a flusher cannot claim it between this read and the
    write (a claim skips a locked row).
    """
    tail = await conn.fetchrow(
        f"SELECT seq, change_id, ref, operation, state, body, folded, key_name, key_value,"
        f" contact_type, query FROM {s}.changes WHERE contact_key = $1 AND {_ACTIVE}"
        " ORDER BY seq DESC LIMIT 1 FOR UPDATE",
        key,
    )
    fold = None if tail is None else fold_into(tail, changes, query)
    if tail is None or fold is None:
        return None
    if fold.create:
        await conn.execute(
            f"UPDATE {s}.changes SET body = $1, folded = $2, key_value = $3, identity = $4,"
            f" updated_at = {s}.clock() WHERE seq = $5",
            dumps(fold.body),
            dumps(fold.folded),
            fold.key_value,
            fold.identity,
            tail["seq"],
        )
    else:
        await conn.execute(
            f"UPDATE {s}.changes SET body = $1, updated_at = {s}.clock() WHERE seq = $2",
            dumps(fold.body),
            tail["seq"],
        )
    return Queued(tail["change_id"], ref=tail["ref"], merged=True)


async def _insert(conn: Conn, s: str, change: NewChange) -> Queued:
    change_id = new_change_id()
    await conn.execute(
        f"INSERT INTO {s}.changes ({_INSERT_COLUMNS})"
        f" {_insert_select(s, 0)} FROM (SELECT {s}.clock() AS t) AS now",
        *_insert_values(change, change_id),
    )
    return Queued(change_id, ref=change.ref)


async def enqueue_outcome(conn: Conn, s: str, change: NewChange) -> Queued:
    """What a committed enqueue whose answer was lost did, read afterwards: the change now
    holding it (the contact's newest, or the queued create for its key).
    """
    if change.operation is Operation.CREATE and change.key_name and change.key_value:
        twin = await _queued_create_row(
            conn, s, change.key_name, change.key_value, change.contact_type
        )
        if twin is not None and twin["ref"] != change.ref:
            return Queued(twin["change_id"], ref=twin["ref"], duplicate=True)
    row = await conn.fetchrow(
        f"SELECT change_id, ref FROM {s}.changes WHERE contact_key = $1 ORDER BY seq DESC LIMIT 1",
        change.contact_key,
    )
    if row is None:
        raise LookupError("committed, yet not found")
    return Queued(row["change_id"], ref=row["ref"] or change.ref)


async def committed(conn: Conn, s: str, change_id: str) -> bool:
    """Whether a change with this id is in the outbox (after a commit whose answer was lost)."""
    return bool(
        await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {s}.changes WHERE change_id = $1)", change_id
        )
    )


# --- flushers and leases ---------------------------------------------------------------------


async def register(
    conn: Conn, s: str, owner: str, process: tuple[str, int, str], lease: float
) -> None:
    """`owner` is alive until the server's clock passes its lease (registered if new)."""
    host, pid, pidns = process
    await conn.execute(
        f"INSERT INTO {s}.flushers (owner, host, pid, pidns, lease_until)"
        f" VALUES ($1, $2, $3, $4, {s}.clock() + $5)"
        " ON CONFLICT (owner) DO UPDATE SET lease_until = excluded.lease_until",
        owner,
        host,
        pid,
        pidns,
        lease,
    )


async def renew(
    conn: Conn, s: str, owner: str, process: tuple[str, int, str], lease: float
) -> None:
    """`owner` is alive: its lease, and those of the rows and batches it holds, run until
    the server's clock plus `lease` (in a transaction).
    """
    await register(conn, s, owner, process, lease)
    await conn.execute(
        f"UPDATE {s}.changes SET lease_until = {s}.clock() + $2"
        " WHERE lease_owner = $1 AND state IN ('inflight', 'waiting_guid')",
        owner,
        lease,
    )
    await conn.execute(
        f"UPDATE {s}.batches SET lease_until = {s}.clock() + $2"
        " WHERE lease_owner = $1 AND state = 'submitted'",
        owner,
        lease,
    )


async def leaving(conn: Conn, s: str, owner: str) -> None:
    """`owner` stops for good (it gave back what it held): forget it."""
    await conn.execute(f"DELETE FROM {s}.flushers WHERE owner = $1", owner)


async def local_flushers(conn: Conn, s: str, host: str, pidns: str) -> list[tuple[str, int]]:
    """(owner, pid) of the flushers registered from this host and pid namespace."""
    rows = await conn.fetch(
        f"SELECT owner, pid FROM {s}.flushers WHERE host = $1 AND pidns = $2", host, pidns
    )
    return [(row["owner"], row["pid"]) for row in rows]


async def recover(conn: Conn, s: str, owner: str, gone: Sequence[str]) -> int:
    """Give back what any flusher held once its lease ran out on the server's clock (or at
    once for `gone`, seen dead on this host); how many rows came back. One statement.

    `owner`'s own rows come back too once their lease ran out: its flushes renew what they
    hold, so a lease of its own that ran out is one it no longer knows of (a claim whose
    answer was lost, a flush the database failed under); only its registration is kept.
    """
    expired = f"(lease_until < {s}.clock() OR lease_owner = ANY($2::text[]))"
    count = await conn.fetchval(
        f"WITH back AS (UPDATE {s}.changes SET state = 'pending', {_UNLEASED},"
        f" next_attempt_at = {s}.clock(), updated_at = {s}.clock(),"
        " lookup_first = lookup_first OR sending, sending = false"
        f" WHERE state = 'inflight' AND lease_owner IS NOT NULL"
        f" AND batch_id IS NULL AND {expired} RETURNING 1),"
        f" waiting AS (UPDATE {s}.changes SET {_UNLEASED} WHERE state = 'waiting_guid'"
        f" AND lease_owner IS NOT NULL AND {expired} RETURNING 1),"
        f" batches AS (UPDATE {s}.batches SET {_UNLEASED} WHERE state = 'submitted'"
        f" AND lease_owner IS NOT NULL AND {expired} RETURNING 1),"
        f" forgotten AS (DELETE FROM {s}.flushers WHERE owner <> $1"
        f" AND (lease_until < {s}.clock() OR owner = ANY($2::text[])) RETURNING 1)"
        # Statements in WITH run to completion whether or not the query reads them.
        " SELECT count(*) FROM back",
        owner,
        list(gone),
    )
    return int(count or 0)


async def claim(conn: Conn, s: str, owner: str, limit: int, lease: float) -> list[Change]:
    """Lease up to `limit` due heads of their contacts' chains, oldest first. One statement.

    An update whose type was not known when it was queued carries the type learned since (a
    bulk update is sent under it).
    """
    known_type = (
        f"coalesce(c.contact_type, CASE WHEN c.operation = 'update' THEN (SELECT t.contact_type"
        f" FROM {s}.contact_types AS t WHERE t.contact_id = c.contact_id) END)"
    )
    rows = await conn.fetch(
        f"WITH picked AS (SELECT c.seq"
        f" FROM {s}.changes AS c WHERE c.state = 'pending' AND c.next_attempt_at <= {s}.clock()"
        f" AND NOT EXISTS (SELECT 1 FROM {s}.changes AS p WHERE p.contact_key = c.contact_key"
        f" AND p.seq < c.seq AND p.{_ACTIVE})"
        " ORDER BY c.seq LIMIT $2 FOR UPDATE OF c SKIP LOCKED)"
        f" UPDATE {s}.changes AS c SET state = 'inflight', lease_owner = $1,"
        f" lease_until = {s}.clock() + $3, updated_at = {s}.clock(), sending = false"
        " FROM picked WHERE c.seq = picked.seq"
        " RETURNING c.seq, c.change_id, c.operation, c.state, c.contact_key, c.contact_id,"
        f" c.ref, {known_type} AS contact_type, c.key_name, c.key_value, c.body, c.folded,"
        " c.query, c.lookup_first, c.if_exists, c.attempts,"
        " c.lookups, c.send_alone, c.created_at, c.updated_at, c.next_attempt_at,"
        " c.lease_owner, c.lease_until, c.batch_id, c.batch_index, c.error_code,"
        " c.last_error, c.exported_to",
        owner,
        limit,
        lease,
    )
    claimed = _changes(rows)
    claimed.sort(key=lambda change: change.seq)
    return claimed


async def about_to_send(conn: Conn, s: str, owner: str, seqs: Sequence[int]) -> None:
    """`owner` is about to send these creates: if it vanishes now, each may exist on Engage
    and is looked up before it is sent again (`recover`).
    """
    await conn.execute(
        f"UPDATE {s}.changes SET sending = true WHERE seq = ANY($1::bigint[])"
        " AND operation = 'create' AND state = 'inflight' AND lease_owner = $2",
        list(seqs),
        owner,
    )


# --- outcomes ----------------------------------------------------------------------------


async def release(
    conn: Conn,
    s: str,
    owner: str,
    seqs: Sequence[int],
    *,
    delay: float,
    count_attempt: bool,
    error: str | None,
    send_alone: bool,
    maybe_sent: bool = False,
) -> None:
    """Give `owner`'s claimed rows back as pending, due again in `delay` seconds.

    `maybe_sent`: their request may have reached Engage: a create marked as about to be sent
    is looked up before it is sent again. Otherwise the mark is dropped (it never left).
    """
    await conn.execute(
        f"UPDATE {s}.changes SET state = 'pending', {_UNLEASED},"
        f" next_attempt_at = {s}.clock() + $3, attempts = attempts + $4,"
        " last_error = coalesce($5, last_error), send_alone = send_alone OR $6,"
        " lookup_first = lookup_first OR ($7 AND sending), sending = false,"
        f" updated_at = {s}.clock()"
        " WHERE seq = ANY($1::bigint[]) AND state = 'inflight' AND lease_owner = $2",
        list(seqs),
        owner,
        delay,
        int(count_attempt),
        error and scrub(error),
        send_alone,
        maybe_sent,
    )


async def finish(conn: Conn, s: str, seqs: Sequence[int]) -> None:
    """Rows Engage applied: done; a contact-type change records the contact's type. One
    statement.
    """
    await conn.execute(
        f"WITH done AS (UPDATE {s}.changes SET state = 'done', done_at = {s}.clock(),"
        f" updated_at = {s}.clock(), {_UNLEASED} WHERE seq = ANY($1::bigint[])"
        " RETURNING operation, contact_id, contact_type)"
        f" INSERT INTO {s}.contact_types (contact_id, contact_type, updated_at)"
        f" SELECT DISTINCT ON (contact_id) contact_id, contact_type, {s}.clock() FROM done"
        " WHERE operation IN ('contact_type', 'promote') AND contact_id IS NOT NULL"
        " AND contact_type IS NOT NULL"
        " ON CONFLICT (contact_id) DO UPDATE SET contact_type = excluded.contact_type,"
        " updated_at = excluded.updated_at",
        list(seqs),
    )


async def _bury_dependents(conn: Conn, s: str, dead: Sequence[Any], code: str) -> int:
    """Creates without a GUID died: the changes waiting on them die with them."""
    creates = [
        row for row in dead if row["operation"] == Operation.CREATE and row["contact_id"] is None
    ]
    if not creates:
        return 0
    result = await conn.execute(
        f"UPDATE {s}.changes AS c SET state = 'dead', error_code = $1, last_error = d.message,"
        f" updated_at = {s}.clock(), {_UNLEASED}"
        " FROM unnest($2::text[], $3::bigint[], $4::text[]) AS d (key, seq, message)"
        f" WHERE c.contact_key = d.key AND c.seq > d.seq AND c.{_ACTIVE}",
        code,
        [row["contact_key"] for row in creates],
        [row["seq"] for row in creates],
        [row["message"] for row in creates],
    )
    return _rowcount(result)


def _rowcount(status: str) -> int:
    """The row count of a command tag such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0


async def bury(conn: Conn, s: str, failures: Failures) -> int:
    """Dead-letter `failures` and the changes waiting on a dead create; how many in all (in a
    transaction).
    """
    if not failures:
        return 0
    seqs = list(failures)
    dead = await conn.fetch(
        f"UPDATE {s}.changes AS c SET state = 'dead', error_code = f.code, last_error = f.message,"
        f" attempts = attempts + 1, updated_at = {s}.clock(), batch_id = NULL, {_UNLEASED}"
        " FROM unnest($1::bigint[], $2::text[], $3::text[]) AS f (seq, code, message)"
        " WHERE c.seq = f.seq"
        " RETURNING c.seq, c.operation, c.contact_key, c.contact_id,"
        " 'its create ' || c.change_id || ' is dead' AS message",
        seqs,
        [failures[seq][0] for seq in seqs],
        [scrub(failures[seq][1]) for seq in seqs],
    )
    return len(dead) + await _bury_dependents(conn, s, dead, "CreateDead")


# --- bulk batches -------------------------------------------------------------------------


async def submit_batch(
    conn: Conn,
    s: str,
    batch_id: str,
    kind: Operation,
    contact_type: str | None,
    seqs: Sequence[int],
    first_poll: float,
) -> None:
    """Record an accepted bulk request and tie its rows to it (in a transaction)."""
    await conn.execute(
        f"INSERT INTO {s}.batches (batch_id, kind, contact_type, submitted_at, next_poll_at)"
        f" VALUES ($1, $2, $3, {s}.clock(), {s}.clock() + $4) ON CONFLICT (batch_id) DO NOTHING",
        batch_id,
        str(kind),
        contact_type,
        first_poll,
    )
    await conn.execute(
        f"UPDATE {s}.changes AS c SET batch_id = $1, batch_index = r.index - 1, {_UNLEASED},"
        f" updated_at = {s}.clock()"
        " FROM unnest($2::bigint[]) WITH ORDINALITY AS r (seq, index) WHERE c.seq = r.seq",
        batch_id,
        list(seqs),
    )


async def claim_batches(conn: Conn, s: str, owner: str, limit: int, lease: float) -> list[Batch]:
    """Lease batches due for a status poll. One statement."""
    rows = await conn.fetch(
        f"WITH picked AS (SELECT batch_id FROM {s}.batches WHERE state = 'submitted'"
        f" AND next_poll_at <= {s}.clock() AND lease_owner IS NULL"
        " ORDER BY next_poll_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
        f" UPDATE {s}.batches AS b SET lease_owner = $1, lease_until = {s}.clock() + $3"
        " FROM picked WHERE b.batch_id = picked.batch_id"
        f" RETURNING b.batch_id, b.kind, b.contact_type, b.submitted_at, b.polls,"
        f" greatest(0, {s}.clock() - b.submitted_at) AS age, b.next_poll_at",
        owner,
        limit,
        lease,
    )
    ordered = sorted(rows, key=lambda row: row["next_poll_at"])
    return [
        Batch(
            row["batch_id"],
            Operation(row["kind"]),
            row["contact_type"],
            row["submitted_at"],
            row["polls"],
            row["age"],
        )
        for row in ordered
    ]


async def batch_rows(conn: Conn, s: str, batch_id: str) -> list[Change]:
    """The changes sent in a batch, in the order they were sent."""
    rows = await conn.fetch(
        f"SELECT * FROM {s}.changes WHERE batch_id = $1 AND state = 'inflight'"
        " ORDER BY batch_index",
        batch_id,
    )
    return _changes(rows)


async def poll_batch_later(conn: Conn, s: str, batch_id: str, delay: float, status: Any) -> None:
    """The batch still runs: keep its latest status, poll again in `delay` seconds."""
    await conn.execute(
        f"UPDATE {s}.batches SET next_poll_at = {s}.clock() + $1, polls = polls + 1,"
        f" status = $2, {_UNLEASED} WHERE batch_id = $3",
        delay,
        json.dumps(status),
        batch_id,
    )


async def forget_lease_of_batches(conn: Conn, s: str, owner: str, batch_ids: Sequence[str]) -> None:
    """Give back batches `owner` leased and could not poll, as they were."""
    await conn.execute(
        f"UPDATE {s}.batches SET {_UNLEASED} WHERE batch_id = ANY($1::text[]) AND lease_owner = $2",
        list(batch_ids),
        owner,
    )


async def settle_batch(
    conn: Conn,
    s: str,
    batch_id: str,
    status: Any,
    failed: Failures,
    resend: Sequence[int],
    space: int,
    created: Mapping[int, str],
) -> tuple[int, int]:
    """Settle a finished batch; (rows applied, rows dead) (in a transaction).

    `created` are the creates whose GUID the batch status told (done at once); the other
    creates wait for a lookup. Creates sent again reached Engage in a batch whose outcome for
    them is unclear: each is looked up before it is sent again.
    """
    buried = await bury(conn, s, failed)
    await conn.execute(
        f"UPDATE {s}.changes SET state = 'pending', send_alone = true,"
        " lookup_first = lookup_first OR operation = 'create', sending = false,"
        f" next_attempt_at = {s}.clock(), updated_at = {s}.clock(), batch_id = NULL,"
        f" {_UNLEASED} WHERE batch_id = $1 AND state = 'inflight' AND seq = ANY($2::bigint[])",
        batch_id,
        list(resend),
    )
    known = 0
    for seq, contact_id in sorted(created.items()):
        row = await conn.fetchrow(
            f"SELECT ref, key_name, key_value, contact_type, contact_key FROM {s}.changes"
            " WHERE seq = $1 AND batch_id = $2 AND state = 'inflight' AND operation = 'create'",
            seq,
            batch_id,
        )
        if row is None:
            continue
        await _guid_found(conn, s, space, row, contact_id)
        await conn.execute(
            f"UPDATE {s}.changes SET state = 'done', contact_id = $1, done_at = {s}.clock(),"
            f" updated_at = {s}.clock(), batch_id = NULL, sending = false, {_UNLEASED}"
            " WHERE seq = $2",
            contact_id,
            seq,
        )
        known += 1
    waiting = _rowcount(
        await conn.execute(
            f"UPDATE {s}.changes SET state = 'waiting_guid', next_attempt_at = {s}.clock(),"
            f" updated_at = {s}.clock(), batch_id = NULL, {_UNLEASED}"
            " WHERE batch_id = $1 AND state = 'inflight' AND operation = 'create'",
            batch_id,
        )
    )
    updated = _rowcount(
        await conn.execute(
            f"UPDATE {s}.changes SET state = 'done', done_at = {s}.clock(),"
            f" updated_at = {s}.clock(), batch_id = NULL, {_UNLEASED}"
            " WHERE batch_id = $1 AND state = 'inflight'",
            batch_id,
        )
    )
    await conn.execute(
        f"UPDATE {s}.batches SET state = 'finished', status = $1, finished_at = {s}.clock(),"
        f" {_UNLEASED} WHERE batch_id = $2",
        json.dumps(status),
        batch_id,
    )
    return known + waiting + updated, buried


async def next_batch_poll(conn: Conn, s: str) -> float | None:
    """Seconds until a batch in flight is due for a poll, or None when none is in flight; a
    batch another flusher holds is looked at again in a second.
    """
    wait = await conn.fetchval(
        f"SELECT min(CASE WHEN lease_owner IS NOT NULL THEN 1.0"
        f" ELSE next_poll_at - {s}.clock() END) FROM {s}.batches WHERE state = 'submitted'"
    )
    return None if wait is None else max(0.0, float(wait))


# --- GUID reconciliation ------------------------------------------------------------------


async def claim_waiting(conn: Conn, s: str, owner: str, limit: int, lease: float) -> list[Change]:
    """Lease creates due for a GUID lookup: those other changes wait on first. One
    statement.
    """
    rows = await conn.fetch(
        f"WITH candidates AS (SELECT c.seq, EXISTS (SELECT 1 FROM {s}.changes AS d"
        f" WHERE d.contact_key = c.contact_key AND d.seq > c.seq AND d.{_ACTIVE}) AS blocking"
        f" FROM {s}.changes AS c WHERE c.state = 'waiting_guid'"
        f" AND c.next_attempt_at <= {s}.clock() AND c.lease_owner IS NULL),"
        f" picked AS (SELECT c.seq, k.blocking FROM {s}.changes AS c"
        " JOIN candidates AS k ON k.seq = c.seq"
        " ORDER BY k.blocking DESC, c.seq LIMIT $2 FOR UPDATE OF c SKIP LOCKED)"
        f" UPDATE {s}.changes AS c SET lease_owner = $1, lease_until = {s}.clock() + $3"
        " FROM picked WHERE c.seq = picked.seq RETURNING c.*, picked.blocking",
        owner,
        limit,
        lease,
    )
    ordered = sorted(rows, key=lambda row: (not row["blocking"], row["seq"]))
    return _changes(ordered)


async def not_found_yet(conn: Conn, s: str, seq: int, delay: float, count: bool) -> None:
    """A waiting create's key is not on Engage yet: look again in `delay` seconds."""
    await conn.execute(
        f"UPDATE {s}.changes SET lookups = lookups + $1, next_attempt_at = {s}.clock() + $2,"
        f" updated_at = {s}.clock(), {_UNLEASED} WHERE seq = $3",
        int(count),
        delay,
        seq,
    )


async def create_again(conn: Conn, s: str, seq: int, reason: str) -> None:
    """A create Engage never showed: pending again, looked up first, an attempt counted."""
    await conn.execute(
        f"UPDATE {s}.changes SET state = 'pending', lookup_first = true, lookups = 0,"
        f" attempts = attempts + 1, next_attempt_at = {s}.clock(), last_error = $1,"
        f" updated_at = {s}.clock(), {_UNLEASED} WHERE seq = $2",
        scrub(reason),
        seq,
    )


async def exported(
    conn: Conn, s: str, done: Sequence[int], waiting: Sequence[int], path: str
) -> None:
    """Rows written to an XML file: updates are done, creates wait for their GUID."""
    await conn.execute(
        f"WITH d AS (UPDATE {s}.changes SET state = 'done', done_at = {s}.clock(),"
        f" exported_to = $3, updated_at = {s}.clock(), {_UNLEASED}"
        " WHERE seq = ANY($1::bigint[]) RETURNING 1)"
        f" UPDATE {s}.changes SET state = 'waiting_guid', exported_to = $3,"
        f" next_attempt_at = {s}.clock(), updated_at = {s}.clock(), {_UNLEASED}"
        " WHERE seq = ANY($2::bigint[])",
        list(done),
        list(waiting),
        path,
    )


# --- the shared pause ---------------------------------------------------------------------


async def pause(conn: Conn, s: str) -> Pause | None:
    """The pause every flusher obeys, if one is set (it may have run out)."""
    rows = await conn.fetch(
        f"SELECT name, value, {s}.clock() AS now FROM {s}.control"
        " WHERE name IN ('paused_until', 'pause_reason', 'outages')"
    )
    values = {row["name"]: row["value"] for row in rows}
    if "paused_until" not in values:
        return None
    now = rows[0]["now"]
    until = float(values["paused_until"])
    return Pause(
        until,
        max(0.0, until - now),
        values.get("pause_reason", ""),
        int(values.get("outages", "0")),
    )


async def set_pause(
    conn: Conn,
    s: str,
    delay: float,
    reason: str,
    outages: int,
    expected_outages: int | None = None,
) -> bool:
    """Make every flusher hold off for `delay` seconds of the server's clock; False (nothing
    changed) when `expected_outages` is given and the outages counted so far are not that
    many (another flusher escalated the pause first). In a transaction.
    """
    if expected_outages is not None:
        await conn.execute(f"LOCK TABLE {s}.control IN SHARE ROW EXCLUSIVE MODE")
        counted = await conn.fetchval(f"SELECT value FROM {s}.control WHERE name = 'outages'")
        if (int(counted) if counted is not None else 0) != expected_outages:
            return False
    await conn.execute(
        f"INSERT INTO {s}.control (name, value)"
        f" VALUES ('paused_until', ({s}.clock() + $1)::text), ('pause_reason', $2),"
        " ('outages', $3) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        delay,
        scrub(reason),
        str(outages),
    )
    return True


async def clear_pause(conn: Conn, s: str) -> None:
    """Lift the pause and reset the outage count."""
    await conn.execute(
        f"DELETE FROM {s}.control WHERE name IN ('paused_until', 'pause_reason', 'outages')"
    )


# --- what is left ---------------------------------------------------------------------------


async def unfinished_count(conn: Conn, s: str) -> int:
    """How many changes are pending, in flight or waiting for a GUID."""
    count = await conn.fetchval(
        f"SELECT (SELECT count(*) FROM {s}.changes WHERE state = 'pending')"
        f" + (SELECT count(*) FROM {s}.changes WHERE state = 'inflight')"
        f" + (SELECT count(*) FROM {s}.changes WHERE state = 'waiting_guid')"
    )
    return int(count)


async def due_count(conn: Conn, s: str, at_most: int) -> int:
    """How many pending changes are due now, counting no further than `at_most`."""
    count = await conn.fetchval(
        f"SELECT count(*) FROM (SELECT 1 FROM {s}.changes WHERE state = 'pending'"
        f" AND next_attempt_at <= {s}.clock() LIMIT $1) AS due",
        at_most,
    )
    return int(count)


async def prune(conn: Conn, s: str, older_than: float) -> int:
    """Delete done changes and finished batches done more than `older_than` seconds ago."""
    result = await conn.execute(
        f"WITH b AS (DELETE FROM {s}.batches WHERE state = 'finished'"
        f" AND finished_at < {s}.clock() - $1 RETURNING 1)"
        f" DELETE FROM {s}.changes WHERE state = 'done' AND done_at < {s}.clock() - $1",
        older_than,
    )
    return _rowcount(result)


# --- the admin's view ---------------------------------------------------------------------


async def counts(conn: Conn, s: str) -> OutboxCounts:
    """Counts per state, the oldest waiting change's age, the pause, batches in flight."""
    by_state = dict.fromkeys((str(state) for state in State), 0)
    rows = await conn.fetch(f"SELECT state, count(*) AS n FROM {s}.changes GROUP BY state")
    by_state.update({row["state"]: row["n"] for row in rows})
    oldest = await conn.fetchval(
        f"SELECT {s}.clock() - min(created_at) FROM {s}.changes WHERE {_ACTIVE}"
    )
    batches = await conn.fetchval(f"SELECT count(*) FROM {s}.batches WHERE state = 'submitted'")
    return OutboxCounts(
        by_state=by_state,
        oldest_pending_age=None if oldest is None else max(0.0, float(oldest)),
        pause=await pause(conn, s),
        batches_in_flight=int(batches),
    )


def _normalised_keys(value: str) -> list[str]:
    """`value` as each kind of key attribute normalises it (email, phone, anything else)."""
    return [
        identity_key(attribute, value, None).split(":", 3)[3]
        for attribute in ("email", "mobilePhone", "externalId")
    ]


# An identity key's value part, and which normalisation its attribute uses.
_KEY_MATCHES = (
    "regexp_replace({col}, '^(?:[^:]*:){{3}}', '') = CASE split_part({col}, ':', 2)"
    " WHEN 'email' THEN $1 WHEN 'any' THEN $1"
    " WHEN 'mobilePhone' THEN $2 WHEN 'socialSecurityNumber' THEN $2 ELSE $3 END"
    " AND {col} LIKE 'key:%'"
)


async def _contact_of(conn: Conn, s: str, key: str) -> tuple[list[str], list[str]]:
    """The refs and GUIDs the outbox knows for the contact `key` names (a ref, a GUID, or a
    key value such as an email).
    """
    if is_ref(key):
        return [key], []
    if is_contact_id(key):
        return [], [key.lower()]
    values = _normalised_keys(key)
    creates = await conn.fetch(
        f"SELECT ref, contact_id FROM {s}.changes WHERE operation = 'create'"
        f" AND identity IS NOT NULL AND {_KEY_MATCHES.format(col='identity')}",
        *values,
    )
    known = await conn.fetch(
        f"SELECT contact_id FROM {s}.identities WHERE {_KEY_MATCHES.format(col='key')}",
        *values,
    )
    refs = sorted({row["ref"] for row in creates if row["ref"]})
    contact_ids = sorted(
        {row["contact_id"] for row in creates if row["contact_id"]}
        | {row["contact_id"] for row in known}
    )
    return refs, contact_ids


async def list_changes(
    conn: Conn, s: str, state: str | None, limit: int, key: str | None
) -> list[Change]:
    """Changes oldest first, in one `state` and for one contact when given."""
    clauses: list[str] = []
    params: list[Any] = []
    if state is not None:
        params.append(state)
        clauses.append(f"state = ${len(params)}")
    if key is not None:
        refs, contact_ids = await _contact_of(conn, s, key)
        params += [refs, [f"ref:{ref}" for ref in refs], contact_ids]
        n = len(params)
        clauses.append(
            f"(ref = ANY(${n - 2}::text[]) OR contact_key = ANY(${n - 1}::text[])"
            f" OR contact_id = ANY(${n}::text[]))"
        )
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    params.append(limit)
    rows = await conn.fetch(
        f"SELECT * FROM {s}.changes {where} ORDER BY seq LIMIT ${len(params)}", *params
    )
    return _changes(rows)


async def get_change(conn: Conn, s: str, change_id: str) -> Change | None:
    """One change by its id."""
    row = await conn.fetchrow(f"SELECT * FROM {s}.changes WHERE change_id = $1", change_id)
    return None if row is None else _change(row)


_REVIVE = (
    "UPDATE {s}.changes SET state = 'pending', next_attempt_at = {s}.clock(), attempts = 0,"
    " error_code = NULL, last_error = NULL, updated_at = {s}.clock() WHERE "
)


async def requeue(conn: Conn, s: str, change: Change) -> None:
    """Make a change due now with its attempts reset; a dead create's dependents too."""
    await conn.execute(_REVIVE.format(s=s) + "seq = $1", change.seq)
    if change.operation is Operation.CREATE and change.contact_id is None:
        await conn.execute(
            _REVIVE.format(s=s)
            + "contact_key = $1 AND state = 'dead' AND error_code = 'CreateDead'",
            change.contact_key,
        )


async def requeue_dead(conn: Conn, s: str) -> int:
    """Requeue every dead change; how many."""
    return _rowcount(await conn.execute(_REVIVE.format(s=s) + "state = 'dead'"))


async def discard(conn: Conn, s: str, change: Change, reason: str) -> None:
    """Dead-letter a waiting change on purpose; a create without a GUID takes its dependents
    (in a transaction).
    """
    await conn.execute(
        f"UPDATE {s}.changes SET state = 'dead', error_code = 'Discarded', last_error = $1,"
        f" updated_at = {s}.clock() WHERE seq = $2",
        scrub(f"discarded: {reason}"),
        change.seq,
    )
    await _bury_dependents(
        conn,
        s,
        [
            {
                "seq": change.seq,
                "operation": change.operation,
                "contact_id": change.contact_id,
                "contact_key": change.contact_key,
                "message": f"its create {change.change_id} was discarded",
            }
        ],
        "CreateDead",
    )


async def open_changes(conn: Conn, s: str) -> list[Change]:
    """Every change not yet done, oldest first."""
    return _changes(
        await conn.fetch(f"SELECT * FROM {s}.changes WHERE state <> 'done' ORDER BY seq")
    )


# --- XML files, planned before they are written -----------------------------------------------


async def plan_export(
    conn: Conn, s: str, owner: str, seqs: Sequence[int], path: str, digest: str
) -> str:
    """Plan `owner`'s rows `seqs` into the file `path`: "planned", "taken" or "lost" (in a
    transaction).
    """
    held = await conn.fetchval(
        f"SELECT count(*) FROM {s}.changes WHERE seq = ANY($1::bigint[])"
        " AND state = 'inflight' AND lease_owner = $2",
        list(seqs),
        owner,
    )
    if held != len(set(seqs)):
        return "lost"
    inserted = await conn.fetchval(
        f"INSERT INTO {s}.xml_plans (path, digest, planned_at) VALUES ($1, $2, {s}.clock())"
        " ON CONFLICT (path) DO NOTHING RETURNING 1",
        path,
        digest,
    )
    if inserted is None:
        return "taken"
    await conn.execute(
        f"UPDATE {s}.changes SET xml_plan = $1, updated_at = {s}.clock(), {_UNLEASED}"
        " WHERE seq = ANY($2::bigint[])",
        path,
        list(seqs),
    )
    return "planned"


async def replan_export(conn: Conn, s: str, path: str, new_path: str, digest: str) -> bool:
    """The plan `path` goes to `new_path` with the bytes `digest` names (in a transaction)."""
    if new_path == path:
        await conn.execute(
            f"UPDATE {s}.xml_plans SET digest = $1, planned_at = {s}.clock() WHERE path = $2",
            digest,
            path,
        )
        return True
    inserted = await conn.fetchval(
        f"INSERT INTO {s}.xml_plans (path, digest, planned_at) VALUES ($1, $2, {s}.clock())"
        " ON CONFLICT (path) DO NOTHING RETURNING 1",
        new_path,
        digest,
    )
    if inserted is None:
        return False
    await conn.execute(f"UPDATE {s}.changes SET xml_plan = $1 WHERE xml_plan = $2", new_path, path)
    await conn.execute(f"DELETE FROM {s}.xml_plans WHERE path = $1", path)
    return True


async def stale_exports(conn: Conn, s: str, older_than: float) -> list[tuple[str, str]]:
    """(path, digest) of the plans made more than `older_than` seconds ago, oldest first."""
    rows = await conn.fetch(
        f"SELECT path, digest FROM {s}.xml_plans WHERE planned_at < {s}.clock() - $1"
        " ORDER BY planned_at, path",
        older_than,
    )
    return [(row["path"], row["digest"]) for row in rows]


async def export_rows(conn: Conn, s: str, path: str) -> list[Change]:
    """The rows still parked in the plan `path`, in seq order."""
    rows = await conn.fetch(
        f"SELECT * FROM {s}.changes WHERE xml_plan = $1 AND state = 'inflight'"
        " AND lease_owner IS NULL ORDER BY seq",
        path,
    )
    return _changes(rows)


async def finish_export(conn: Conn, s: str, path: str, written: str) -> int:
    """The plan `path` is on disk as `written`: updates done, creates waiting for their GUID,
    the plan gone; how many rows (in a transaction).
    """
    parked = "xml_plan = $2 AND state = 'inflight' AND lease_owner IS NULL"
    waiting = _rowcount(
        await conn.execute(
            f"UPDATE {s}.changes SET state = 'waiting_guid', exported_to = $1, xml_plan = NULL,"
            f" next_attempt_at = {s}.clock(), updated_at = {s}.clock()"
            f" WHERE {parked} AND operation = 'create'",
            written,
            path,
        )
    )
    done = _rowcount(
        await conn.execute(
            f"UPDATE {s}.changes SET state = 'done', done_at = {s}.clock(), exported_to = $1,"
            f" xml_plan = NULL, updated_at = {s}.clock() WHERE {parked}",
            written,
            path,
        )
    )
    await conn.execute(f"UPDATE {s}.changes SET xml_plan = NULL WHERE xml_plan = $1", path)
    await conn.execute(f"DELETE FROM {s}.xml_plans WHERE path = $1", path)
    return waiting + done


async def wait_for_api(
    conn: Conn, s: str, owner: str, seqs: Sequence[int], delay: float, reason: str
) -> None:
    """`owner`'s claimed creates cannot go into an XML file: pending, due in `delay` seconds,
    marked as waiting for the API with `reason`.
    """
    await conn.execute(
        f"UPDATE {s}.changes SET state = 'pending', {_UNLEASED},"
        f" next_attempt_at = {s}.clock() + $1, error_code = $2, last_error = $3,"
        f" updated_at = {s}.clock() WHERE seq = ANY($4::bigint[]) AND state = 'inflight'"
        " AND lease_owner = $5",
        delay,
        WAITS_FOR_API,
        scrub(reason),
        list(seqs),
        owner,
    )


async def waiting_for_api(conn: Conn, s: str) -> int:
    """How many pending changes wait for the API because an XML file cannot carry them."""
    count = await conn.fetchval(
        f"SELECT count(*) FROM {s}.changes WHERE state = 'pending' AND error_code = $1",
        WAITS_FOR_API,
    )
    return int(count)
