"""Every row transition of the SQLite outbox: the one home of its SQL.

Each function runs on the database thread inside a transaction opened by its caller
(`_outbox.SqliteOutbox`), takes the connection and the time (`now`, epoch seconds from the
outbox's clock), and does one thing to the rows. Nothing else in the package writes SQL
against the outbox.

The tables (`_schema`): ``changes`` (one row per queued change, in ``seq`` order per contact),
``identities`` (key -> GUID), ``batches`` (bulk requests being followed) and ``control`` (the
pause every flusher obeys).

Leases: a claimed row is ``inflight`` with an owner. The owner's heartbeat is a counter in
``flushers`` that it moves on while it works; another process gives the owner's rows back to
``pending`` only after it saw that counter stand still for a whole lease on its own monotonic
clock (`recover_owner`), never by comparing times another clock wrote. Only the head of each
contact's chain is claimable, so changes to one contact go out in order while different
contacts never wait for each other.

Due times survive clock jumps: each is stored with the wait that set it (``due_delay``,
``poll_delay``, the pause's ``pause_delay``), and one further ahead than that wait was written
by a clock that was ahead: it is due (or over) now (`_DUE`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ._changes import Batch, Change, NewChange, Operation, Queued, State, dumps
from ._coalesce import fold_into, identity_of
from ._create_policy import without_type
from ._keys import contact_key, identity_key, identity_matches, is_ref, new_change_id
from ._redact import scrub
from ._store import Failures, OutboxCounts, Pause
from ._wire import is_contact_id

__all__ = [
    "WAITS_FOR_API",
    "about_to_send",
    "batch_rows",
    "beat",
    "bury",
    "claim",
    "claim_batches",
    "claim_waiting",
    "clear_pause",
    "counts",
    "create_again",
    "create_became_update",
    "create_of",
    "discard",
    "due_count",
    "enqueue",
    "export_rows",
    "exported",
    "finish",
    "finish_export",
    "forget_lease_of_batches",
    "get_change",
    "has_active",
    "heartbeats",
    "identity",
    "learn_types",
    "leaving",
    "list_changes",
    "mark_moved",
    "moved_to",
    "next_batch_poll",
    "not_found_yet",
    "open_changes",
    "pause",
    "plan_export",
    "poll_batch_later",
    "prune",
    "queued_create",
    "record_guid",
    "recover_owner",
    "release",
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
# Every transition that ends a lease clears it the same way.
_UNLEASED = "lease_owner = NULL, lease_until = NULL"
# A row is due at its time, or at once when that time is further ahead than the wait that
# set it (a clock that was ahead wrote it). `:now` is the reader's wall clock.
_DUE = "(c.next_attempt_at <= :now OR c.next_attempt_at - c.due_delay > :now)"
_BATCH_DUE = "(next_poll_at <= :now OR next_poll_at - poll_delay > :now)"


def _seq_list(seqs: Iterable[int]) -> str:
    """Seqs as one JSON array parameter, read with ``seq IN (SELECT value FROM json_each(?))``:
    one statement for a whole batch instead of one per row, half the time.
    """
    return json.dumps(list(seqs))


def _changes(rows: Iterable[sqlite3.Row]) -> list[Change]:
    return [Change.from_row(row) for row in rows]


# --- the identity map ---------------------------------------------------------------------------


def upsert_identities(conn: sqlite3.Connection, rows: Iterable[tuple[str, str, float]]) -> None:
    """Record (key, GUID, when) rows, replacing what each key named before."""
    conn.executemany(
        "INSERT INTO identities (key, contact_id, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET contact_id = excluded.contact_id, "
        "updated_at = excluded.updated_at",
        rows,
    )


def learn_types(conn: sqlite3.Connection, rows: Iterable[tuple[str, str, float]]) -> None:
    """Record (GUID, contact type, when) rows: what type Engage last showed each contact."""
    conn.executemany(
        "INSERT INTO contact_types (contact_id, contact_type, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (contact_id) DO UPDATE SET contact_type = excluded.contact_type, "
        "updated_at = excluded.updated_at",
        rows,
    )


def identity(conn: sqlite3.Connection, key: str, oldest: float | None) -> str | None:
    """The GUID recorded for `key`, if recorded at `oldest` or later."""
    row = conn.execute(
        "SELECT contact_id, updated_at FROM identities WHERE key = ?", (key,)
    ).fetchone()
    if row is None or (oldest is not None and row["updated_at"] < oldest):
        return None
    return str(row["contact_id"])


def _guid_found(conn: sqlite3.Connection, change: Any, contact_id: str, now: float) -> None:
    """A create's contact is `contact_id`: record its ref and key, and point the changes
    waiting on its contact key at the GUID (which releases them).
    """
    keys = [f"ref:{change['ref']}"]
    if change["key_name"] and change["key_value"]:
        keys.append(identity_key(change["key_name"], change["key_value"], change["contact_type"]))
    upsert_identities(conn, [(key, contact_id, now) for key in keys])
    if change["contact_type"]:
        # Created as that type, or found by a lookup scoped to it.
        learn_types(conn, [(contact_id, change["contact_type"], now)])
    conn.execute(
        f"UPDATE changes SET contact_key = ?, contact_id = ?, updated_at = ? "
        f"WHERE contact_key = ? AND {_ACTIVE}",
        (contact_key(contact_id=contact_id), contact_id, now, change["contact_key"]),
    )


def record_guid(conn: sqlite3.Connection, seq: int, contact_id: str, now: float) -> None:
    """The create at `seq` exists as `contact_id`: done, and its chain freed."""
    create = conn.execute(
        "SELECT ref, key_name, key_value, contact_type, contact_key FROM changes WHERE seq = ?",
        (seq,),
    ).fetchone()
    if create is None:
        return
    _guid_found(conn, create, contact_id, now)
    conn.execute(
        f"UPDATE changes SET state = 'done', contact_id = ?, done_at = ?, updated_at = ?, "
        f"{_UNLEASED} WHERE seq = ?",
        (contact_id, now, now, seq),
    )


def create_became_update(
    conn: sqlite3.Connection, change: Change, contact_id: str, body: Mapping[str, Any], now: float
) -> None:
    """The create at `change.seq` turns into an update of `contact_id` applying `body`."""
    _guid_found(
        conn,
        {
            "ref": change.ref,
            "key_name": change.key_name,
            "key_value": change.key_value,
            "contact_type": change.contact_type,
            "contact_key": change.contact_key,
        },
        contact_id,
        now,
    )
    conn.execute(
        "UPDATE changes SET operation = 'update', body = ?, folded = NULL, "
        "lookup_first = 0, updated_at = ? WHERE seq = ?",
        (dumps(body), now, change.seq),
    )


# --- enqueue ---------------------------------------------------------------------------------


def has_active(conn: sqlite3.Connection, contact_key: str) -> bool:
    """Do changes to this contact still wait?"""
    row = conn.execute(
        f"SELECT 1 FROM changes WHERE contact_key = ? AND {_ACTIVE} LIMIT 1",
        (contact_key,),
    ).fetchone()
    return row is not None


def _queued_create_row(
    conn: sqlite3.Connection, key_name: str, key_value: str, contact_type: str | None
) -> sqlite3.Row | None:
    """The newest create still waiting for this key and contact type.

    Matched on the normalised key, as Engage matches it: "ANN@Example.com" is the contact
    "ann@example.com" is.
    """
    row: sqlite3.Row | None = conn.execute(
        f"SELECT change_id, ref, contact_key FROM changes WHERE operation = 'create' "
        f"AND {_ACTIVE} AND identity = ? ORDER BY seq DESC LIMIT 1",
        (identity_key(key_name, key_value, contact_type),),
    ).fetchone()
    return row


def queued_create(
    conn: sqlite3.Connection, key_name: str, key_value: str, contact_type: str
) -> tuple[str, str] | None:
    """(change_id, ref) of a create still waiting for this key and type."""
    row = _queued_create_row(conn, key_name, key_value, contact_type)
    return None if row is None else (row["change_id"], row["ref"])


def create_of(conn: sqlite3.Connection, ref: str) -> Change | None:
    """The create that made `ref`, in any state."""
    row = conn.execute(
        "SELECT * FROM changes WHERE ref = ? AND operation = 'create' ORDER BY seq DESC LIMIT 1",
        (ref,),
    ).fetchone()
    return None if row is None else Change.from_row(row)


def _tail(conn: sqlite3.Connection, contact_key: str) -> sqlite3.Row | None:
    """The last change still waiting for this contact: the only one a new change may join."""
    row: sqlite3.Row | None = conn.execute(
        f"SELECT seq, change_id, ref, operation, state, body, folded, key_name, key_value, "
        f"contact_type, query FROM changes WHERE contact_key = ? AND {_ACTIVE} "
        "ORDER BY seq DESC LIMIT 1",
        (contact_key,),
    ).fetchone()
    return row


def enqueue(conn: sqlite3.Connection, change: NewChange, now: float) -> Queued:
    """Insert `change`, or merge it into what waits for the same contact."""
    if change.operation is not Operation.CREATE and change.contact_id is None:
        guid = identity(conn, change.contact_key, None)
        if guid is not None:
            # The ref's create was delivered (by another process, say) after the session saw
            # it waiting: the change follows the GUID, as the rows already re-keyed did.
            change = attrs.evolve(change, contact_key=contact_key(contact_id=guid), contact_id=guid)
    if change.operation is Operation.CREATE and change.key_name and change.key_value:
        twin = _queued_create_row(conn, change.key_name, change.key_value, change.contact_type)
        if twin is not None:
            # The contact is already on its way in: a second create would make a duplicate.
            if change.if_exists == "update" and change.body:
                changes = without_type(change.body)
                if _merge_into_tail(conn, twin["contact_key"], changes, now) is None:
                    # Its create is already on the wire: the attributes follow it as an update.
                    _insert(
                        conn,
                        NewChange(
                            Operation.UPDATE,
                            twin["contact_key"],
                            body=changes,
                            ref=twin["ref"],
                            reason=change.reason,
                        ),
                        now,
                    )
            return Queued(twin["change_id"], ref=twin["ref"], duplicate=True)
    if change.operation is Operation.UPDATE and change.body is not None:
        merged = _merge_into_tail(conn, change.contact_key, change.body, now, change.query)
        if merged is not None:
            return merged
    return _insert(conn, change, now)


def _merge_into_tail(
    conn: sqlite3.Connection,
    contact_key: str,
    changes: Mapping[str, Any],
    now: float,
    query: Mapping[str, str] | None = None,
) -> Queued | None:
    """Fold `changes` into the contact's last waiting change where `fold_into` allows, else
    None.
    """
    tail = _tail(conn, contact_key)
    fold = None if tail is None else fold_into(tail, changes, query)
    if tail is None or fold is None:
        return None
    if fold.create:
        conn.execute(
            "UPDATE changes SET body = ?, folded = ?, key_value = ?, identity = ?, "
            "updated_at = ? WHERE seq = ?",
            (dumps(fold.body), dumps(fold.folded), fold.key_value, fold.identity, now, tail["seq"]),
        )
    else:
        conn.execute(
            "UPDATE changes SET body = ?, updated_at = ? WHERE seq = ?",
            (dumps(fold.body), now, tail["seq"]),
        )
    return Queued(tail["change_id"], ref=tail["ref"], merged=True)


def _known_type(conn: sqlite3.Connection, change: NewChange) -> str | None:
    """The contact type an update's contact has, as far as the outbox knows: from the newest
    create or type change queued for it (by its ref or its GUID). An XML file needs it.
    """
    typed = "operation IN ('create', 'contact_type', 'promote') AND contact_type IS NOT NULL"
    # Two indexed lookups rather than one OR that may scan.
    row = conn.execute(
        f"SELECT contact_type FROM changes WHERE contact_key = ? "
        f"AND {_ACTIVE} AND {typed} ORDER BY seq DESC LIMIT 1",
        (change.contact_key,),
    ).fetchone()
    if row is None and change.ref is not None:
        row = conn.execute(
            f"SELECT contact_type FROM changes WHERE ref = ? AND {typed} ORDER BY seq DESC LIMIT 1",
            (change.ref,),
        ).fetchone()
    return None if row is None else str(row[0])


def _insert(conn: sqlite3.Connection, change: NewChange, now: float) -> Queued:
    change_id = new_change_id()
    contact_type = change.contact_type
    if change.operation is Operation.UPDATE and contact_type is None:
        contact_type = _known_type(conn, change)
    conn.execute(
        "INSERT INTO changes (change_id, operation, contact_key, contact_id, ref, contact_type,"
        " key_name, key_value, identity, body, query, lookup_first, if_exists, created_at,"
        " updated_at, next_attempt_at, last_error)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            change_id,
            str(change.operation),
            change.contact_key,
            change.contact_id,
            change.ref,
            contact_type,
            change.key_name,
            change.key_value,
            identity_of(change.operation, change.key_name, change.key_value, change.contact_type),
            dumps(change.body),
            dumps(change.query),
            int(change.lookup_first),
            change.if_exists,
            now,
            now,
            now,
            change.reason,
        ),
    )
    return Queued(change_id, ref=change.ref)


# --- leases ----------------------------------------------------------------------------------


def beat(
    conn: sqlite3.Connection,
    owner: str,
    identity: tuple[str, int, str],
    until: float,
) -> None:
    """`owner` is alive: move its heartbeat on (registering it the first time) and push back
    the expiry shown on what it holds (for people: liveness is judged by the heartbeat).
    """
    host, pid, pidns = identity
    conn.execute(
        "INSERT INTO flushers (owner, host, pid, pidns) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (owner) DO UPDATE SET beats = beats + 1",
        (owner, host, pid, pidns),
    )
    conn.execute(
        "UPDATE changes SET lease_until = ? "
        "WHERE lease_owner = ? AND state IN ('inflight', 'waiting_guid')",
        (until, owner),
    )
    conn.execute(
        "UPDATE batches SET lease_until = ? WHERE lease_owner = ? AND state = 'submitted'",
        (until, owner),
    )


def leaving(conn: sqlite3.Connection, owner: str) -> None:
    """`owner` stops for good (it gave back what it held): forget its heartbeat."""
    conn.execute("DELETE FROM flushers WHERE owner = ?", (owner,))


def heartbeats(conn: sqlite3.Connection) -> dict[str, tuple[int, str, int, str]]:
    """Every owner that holds a lease or has a heartbeat: owner -> (beats, host, pid, pid
    namespace); beats -1 for a holder with no heartbeat row.
    """
    known = {
        row["owner"]: (row["beats"], row["host"], row["pid"], row["pidns"])
        for row in conn.execute("SELECT owner, beats, host, pid, pidns FROM flushers")
    }
    holders = conn.execute(
        "SELECT lease_owner FROM changes WHERE state = 'inflight' AND lease_owner IS NOT NULL "
        "UNION SELECT lease_owner FROM changes WHERE state = 'waiting_guid' "
        "AND lease_owner IS NOT NULL "
        "UNION SELECT lease_owner FROM batches WHERE state = 'submitted' "
        "AND lease_owner IS NOT NULL"
    ).fetchall()
    for (holder,) in holders:
        known.setdefault(holder, (-1, "", 0, ""))
    return known


def recover_owner(conn: sqlite3.Connection, owner: str, beats: int, now: float) -> int:
    """`owner` is gone (its heartbeat stood still at `beats`, -1 for none): give back what
    it held, and forget it; how many rows came back. Nothing happens if it beat since.
    """
    row = conn.execute("SELECT beats FROM flushers WHERE owner = ?", (owner,)).fetchone()
    if (row["beats"] if row is not None else -1) != beats:
        return 0
    cursor = conn.execute(
        f"UPDATE changes SET state = 'pending', {_UNLEASED}, next_attempt_at = ?, "
        "due_delay = 0, lookup_first = max(lookup_first, sending), sending = 0, updated_at = ? "
        "WHERE state = 'inflight' AND lease_owner = ? AND batch_id IS NULL",
        (now, now, owner),
    )
    conn.execute(
        f"UPDATE changes SET {_UNLEASED} WHERE state = 'waiting_guid' AND lease_owner = ?",
        (owner,),
    )
    conn.execute(
        f"UPDATE batches SET {_UNLEASED} WHERE state = 'submitted' AND lease_owner = ?",
        (owner,),
    )
    leaving(conn, owner)
    return cursor.rowcount


def claim(
    conn: sqlite3.Connection, owner: str, limit: int, until: float, now: float
) -> list[Change]:
    """Lease up to `limit` due heads of their contacts' chains until `until`, oldest first."""
    rows = conn.execute(
        "SELECT c.*, t.contact_type AS known_type FROM changes AS c "
        "LEFT JOIN contact_types AS t ON t.contact_id = c.contact_id "
        f"WHERE c.state = 'pending' AND {_DUE} "
        "AND NOT EXISTS (SELECT 1 FROM changes AS p "
        "WHERE p.contact_key = c.contact_key AND p.seq < c.seq "
        "AND p.state IN ('pending', 'inflight', 'waiting_guid')) ORDER BY c.seq LIMIT :limit",
        {"now": now, "limit": limit},
    ).fetchall()
    claimed = [_with_known_type(row) for row in rows]
    conn.execute(
        "UPDATE changes SET state = 'inflight', lease_owner = ?, lease_until = ?, "
        "sending = 0, updated_at = ? WHERE seq IN (SELECT value FROM json_each(?))",
        (owner, until, now, _seq_list(change.seq for change in claimed)),
    )
    return claimed


def about_to_send(conn: sqlite3.Connection, owner: str, seqs: Iterable[int]) -> None:
    """`owner` is about to send these creates: if it vanishes now, each may exist on Engage
    and is looked up before it is sent again (`recover_owner`).
    """
    conn.execute(
        "UPDATE changes SET sending = 1 WHERE seq IN (SELECT value FROM json_each(?)) "
        "AND operation = 'create' AND state = 'inflight' AND lease_owner = ?",
        (_seq_list(seqs), owner),
    )


def _with_known_type(row: sqlite3.Row) -> Change:
    """A claimed row; an update whose contact's type the outbox did not know when it was
    queued gets the type learned since (a bulk update is sent under it).
    """
    change = Change.from_row(row)
    if change.operation is Operation.UPDATE and change.contact_type is None and row["known_type"]:
        return attrs.evolve(change, contact_type=row["known_type"])
    return change


# --- outcomes ----------------------------------------------------------------------------


def release(
    conn: sqlite3.Connection,
    owner: str,
    seqs: Iterable[int],
    *,
    delay: float,
    count_attempt: bool,
    error: str | None,
    send_alone: bool,
    maybe_sent: bool,
    now: float,
) -> None:
    """Give `owner`'s claimed rows back as pending, due again in `delay` seconds.

    `maybe_sent`: their request may have reached Engage (a timeout, a lost answer, a 5xx):
    a create marked as about to be sent is looked up before it is sent again. Otherwise the
    mark is dropped: the request provably never left.
    """
    conn.executemany(
        f"UPDATE changes SET state = 'pending', {_UNLEASED}, "
        "next_attempt_at = ?, due_delay = ?, attempts = attempts + ?, "
        "last_error = coalesce(?, last_error), send_alone = max(send_alone, ?), "
        "lookup_first = CASE WHEN ? THEN max(lookup_first, sending) ELSE lookup_first END, "
        "sending = 0, updated_at = ? WHERE seq = ? AND state = 'inflight' AND lease_owner = ?",
        [
            (
                now + delay,
                delay,
                int(count_attempt),
                error and scrub(error),
                int(send_alone),
                int(maybe_sent),
                now,
                seq,
                owner,
            )
            for seq in seqs
        ],
    )


def finish(conn: sqlite3.Connection, seqs: Iterable[int], now: float) -> None:
    """Rows Engage applied: done; a contact-type change also records the contact's type."""
    seq_list = _seq_list(seqs)
    conn.execute(
        f"UPDATE changes SET state = 'done', done_at = ?, updated_at = ?, {_UNLEASED} "
        "WHERE seq IN (SELECT value FROM json_each(?))",
        (now, now, seq_list),
    )
    learn_types(
        conn,
        conn.execute(
            "SELECT contact_id, contact_type, ? FROM changes "
            "WHERE seq IN (SELECT value FROM json_each(?)) "
            "AND operation IN ('contact_type', 'promote') "
            "AND contact_id IS NOT NULL AND contact_type IS NOT NULL",
            (now, seq_list),
        ).fetchall(),
    )


def _bury_dependents(
    conn: sqlite3.Connection, create: Any, seq: int, code: str, message: str, now: float
) -> int:
    """A create without a GUID is dead: the changes waiting on it die with it."""
    if create["operation"] != Operation.CREATE or create["contact_id"] is not None:
        return 0
    dependents = conn.execute(
        f"UPDATE changes SET state = 'dead', error_code = ?, last_error = ?, "
        f"updated_at = ?, {_UNLEASED} WHERE contact_key = ? AND seq > ? AND {_ACTIVE}",
        (code, message, now, create["contact_key"], seq),
    )
    return dependents.rowcount


def bury(conn: sqlite3.Connection, failures: Failures, now: float) -> int:
    """Dead-letter `failures` and the changes waiting on a dead create; how many in all."""
    buried = 0
    for seq, (code, message) in failures.items():
        row = conn.execute(
            "SELECT change_id, operation, contact_key, contact_id FROM changes WHERE seq = ?",
            (seq,),
        ).fetchone()
        if row is None:
            continue
        conn.execute(
            f"UPDATE changes SET state = 'dead', error_code = ?, last_error = ?, "
            f"attempts = attempts + 1, updated_at = ?, batch_id = NULL, {_UNLEASED} "
            "WHERE seq = ?",
            (code, scrub(message), now, seq),
        )
        buried += 1 + _bury_dependents(
            conn, row, seq, "CreateDead", f"its create {row['change_id']} is dead", now
        )
    return buried


# --- bulk batches -------------------------------------------------------------------------


def submit_batch(
    conn: sqlite3.Connection,
    batch_id: str,
    kind: Operation,
    contact_type: str | None,
    seqs: Sequence[int],
    first_poll: float,
    now: float,
) -> None:
    """Record an accepted bulk request, first polled in `first_poll` seconds, and tie its rows
    to it (their leases end: the batch is followed by whoever polls it).
    """
    conn.execute(
        "INSERT INTO batches (batch_id, kind, contact_type, submitted_at, next_poll_at,"
        " poll_delay) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (batch_id) DO NOTHING",
        (batch_id, str(kind), contact_type, now, now + first_poll, first_poll),
    )
    conn.executemany(
        f"UPDATE changes SET batch_id = ?, batch_index = ?, {_UNLEASED}, updated_at = ? "
        "WHERE seq = ?",
        [(batch_id, index, now, seq) for index, seq in enumerate(seqs)],
    )


def claim_batches(
    conn: sqlite3.Connection, owner: str, limit: int, until: float, now: float
) -> list[Batch]:
    """Lease batches due for a status poll."""
    rows = conn.execute(
        "SELECT batch_id, kind, contact_type, submitted_at, polls FROM batches "
        f"WHERE state = 'submitted' AND {_BATCH_DUE} AND lease_owner IS NULL "
        "ORDER BY next_poll_at LIMIT :limit",
        {"now": now, "limit": limit},
    ).fetchall()
    conn.executemany(
        "UPDATE batches SET lease_owner = ?, lease_until = ? WHERE batch_id = ?",
        [(owner, until, row["batch_id"]) for row in rows],
    )
    return [
        Batch(
            row["batch_id"],
            Operation(row["kind"]),
            row["contact_type"],
            row["submitted_at"],
            row["polls"],
            # A submission stamped in the future was stamped by a clock that was ahead.
            max(0.0, now - row["submitted_at"]),
        )
        for row in rows
    ]


def batch_rows(conn: sqlite3.Connection, batch_id: str) -> list[Change]:
    """The changes sent in a batch, in the order they were sent."""
    rows = conn.execute(
        "SELECT * FROM changes WHERE batch_id = ? AND state = 'inflight' ORDER BY batch_index",
        (batch_id,),
    ).fetchall()
    return _changes(rows)


def poll_batch_later(
    conn: sqlite3.Connection, batch_id: str, delay: float, status: Any, now: float
) -> None:
    """The batch still runs: keep its latest status, poll again in `delay` seconds."""
    conn.execute(
        "UPDATE batches SET next_poll_at = ?, poll_delay = ?, polls = polls + 1, status = ?, "
        f"{_UNLEASED} WHERE batch_id = ?",
        (now + delay, delay, json.dumps(status), batch_id),
    )


def forget_lease_of_batches(conn: sqlite3.Connection, owner: str, batch_ids: Sequence[str]) -> None:
    """Give back batches `owner` leased and could not poll, as they were."""
    conn.executemany(
        f"UPDATE batches SET {_UNLEASED} WHERE batch_id = ? AND lease_owner = ?",
        [(batch_id, owner) for batch_id in batch_ids],
    )


def settle_batch(
    conn: sqlite3.Connection,
    batch_id: str,
    status: Any,
    failed: Failures,
    resend: Iterable[int],
    created: Mapping[int, str],
    now: float,
) -> tuple[int, int]:
    """Settle a finished batch; (rows applied, rows dead).

    `created` are the creates whose GUID the batch status told (done at once); the other
    creates wait for a lookup. Rows sent again are creates that reached Engage in a batch
    whose outcome for them is unclear: each is looked up before it is sent again. Each step
    takes its rows out of the batch (batch_id NULL), so the next ones only see what is left.
    """
    buried = bury(conn, failed, now)
    conn.execute(
        "UPDATE changes SET state = 'pending', send_alone = 1, next_attempt_at = ?, "
        "lookup_first = CASE WHEN operation = 'create' THEN 1 ELSE lookup_first END, "
        f"sending = 0, due_delay = 0, updated_at = ?, batch_id = NULL, {_UNLEASED} "
        "WHERE batch_id = ? AND state = 'inflight' AND seq IN (SELECT value FROM json_each(?))",
        (now, now, batch_id, _seq_list(resend)),
    )
    known = 0
    for seq, contact_id in created.items():
        row = conn.execute(
            "SELECT ref, key_name, key_value, contact_type, contact_key FROM changes "
            "WHERE seq = ? AND batch_id = ? AND state = 'inflight' AND operation = 'create'",
            (seq, batch_id),
        ).fetchone()
        if row is None:
            continue
        _guid_found(conn, row, contact_id, now)
        conn.execute(
            "UPDATE changes SET state = 'done', contact_id = ?, done_at = ?, updated_at = ?, "
            f"batch_id = NULL, sending = 0, {_UNLEASED} WHERE seq = ?",
            (contact_id, now, now, seq),
        )
        known += 1
    waiting = conn.execute(
        "UPDATE changes SET state = 'waiting_guid', next_attempt_at = ?, due_delay = 0, "
        f"updated_at = ?, batch_id = NULL, {_UNLEASED} "
        "WHERE batch_id = ? AND state = 'inflight' AND operation = 'create'",
        (now, now, batch_id),
    ).rowcount
    updated = conn.execute(
        f"UPDATE changes SET state = 'done', done_at = ?, updated_at = ?, "
        f"batch_id = NULL, {_UNLEASED} WHERE batch_id = ? AND state = 'inflight'",
        (now, now, batch_id),
    ).rowcount
    conn.execute(
        f"UPDATE batches SET state = 'finished', status = ?, finished_at = ?, {_UNLEASED} "
        "WHERE batch_id = ?",
        (json.dumps(status), now, batch_id),
    )
    return known + waiting + updated, buried


def next_batch_poll(conn: sqlite3.Connection, now: float) -> float | None:
    """Seconds until a batch in flight is due for a poll, or None when none is in flight.

    A batch another flusher holds is looked at again in a second: it becomes claimable when
    that flusher settles it or is found gone.
    """
    row = conn.execute(
        "SELECT min(CASE WHEN lease_owner IS NOT NULL THEN :now + 1.0 "
        "WHEN next_poll_at - poll_delay > :now THEN :now ELSE next_poll_at END) "
        "FROM batches WHERE state = 'submitted'",
        {"now": now},
    ).fetchone()
    return None if row[0] is None else max(0.0, float(row[0]) - now)


# --- GUID reconciliation ------------------------------------------------------------------


def claim_waiting(
    conn: sqlite3.Connection, owner: str, limit: int, until: float, now: float
) -> list[Change]:
    """Lease creates due for a GUID lookup: those other changes wait on first."""
    rows = conn.execute(
        "SELECT c.*, EXISTS (SELECT 1 FROM changes AS d "
        "WHERE d.contact_key = c.contact_key AND d.seq > c.seq "
        "AND d.state IN ('pending', 'inflight', 'waiting_guid')) AS blocking "
        f"FROM changes AS c WHERE c.state = 'waiting_guid' AND {_DUE} "
        "AND c.lease_owner IS NULL ORDER BY blocking DESC, c.seq LIMIT :limit",
        {"now": now, "limit": limit},
    ).fetchall()
    conn.executemany(
        "UPDATE changes SET lease_owner = ?, lease_until = ? WHERE seq = ?",
        [(owner, until, row["seq"]) for row in rows],
    )
    return _changes(rows)


def not_found_yet(
    conn: sqlite3.Connection, seq: int, delay: float, count: bool, now: float
) -> None:
    """A waiting create's key is not on Engage yet: look again in `delay` seconds."""
    conn.execute(
        "UPDATE changes SET lookups = lookups + ?, next_attempt_at = ?, due_delay = ?, "
        f"updated_at = ?, {_UNLEASED} WHERE seq = ?",
        (int(count), now + delay, delay, now, seq),
    )


def create_again(conn: sqlite3.Connection, seq: int, reason: str, now: float) -> None:
    """A create Engage never showed after many lookups: pending again, looked up first, and
    an attempt counted (so this cannot go on for ever).
    """
    conn.execute(
        "UPDATE changes SET state = 'pending', lookup_first = 1, lookups = 0, "
        "attempts = attempts + 1, next_attempt_at = ?, due_delay = 0, last_error = ?, "
        f"updated_at = ?, {_UNLEASED} WHERE seq = ?",
        (now, scrub(reason), now, seq),
    )


def exported(
    conn: sqlite3.Connection, done: Iterable[int], waiting: Iterable[int], path: str, now: float
) -> None:
    """Rows written to an XML file: updates are done, creates wait for their GUID."""
    conn.executemany(
        f"UPDATE changes SET state = 'done', done_at = ?, exported_to = ?, "
        f"updated_at = ?, {_UNLEASED} WHERE seq = ?",
        [(now, path, now, seq) for seq in done],
    )
    conn.executemany(
        "UPDATE changes SET state = 'waiting_guid', exported_to = ?, "
        f"next_attempt_at = ?, due_delay = 0, updated_at = ?, {_UNLEASED} WHERE seq = ?",
        [(path, now, now, seq) for seq in waiting],
    )


# --- the shared pause ---------------------------------------------------------------------


def pause(conn: sqlite3.Connection, now: float) -> Pause | None:
    """The pause every flusher obeys, if one is set (it may have run out).

    A pause set further ahead than its own length was set by a clock that was ahead: over.
    """
    rows = dict(conn.execute("SELECT name, value FROM control").fetchall())
    if "paused_until" not in rows:
        return None
    until = float(rows["paused_until"])
    length = float(rows.get("pause_delay", "0"))
    remaining = until - now if until - length <= now else 0.0
    return Pause(until, remaining, rows.get("pause_reason", ""), int(rows.get("outages", "0")))


def set_pause(
    conn: sqlite3.Connection,
    delay: float,
    reason: str,
    outages: int,
    now: float,
    expected_outages: int | None = None,
) -> bool:
    """Make every flusher hold off for `delay` seconds; False (nothing changed) when
    `expected_outages` is given and the outages counted so far are not that many (another
    flusher escalated the pause first).
    """
    if expected_outages is not None:
        row = conn.execute("SELECT value FROM control WHERE name = 'outages'").fetchone()
        if (int(row[0]) if row is not None else 0) != expected_outages:
            return False
    values = {
        "paused_until": repr(now + delay),
        "pause_delay": repr(delay),
        "pause_reason": scrub(reason),
        "outages": str(outages),
    }
    conn.executemany(
        "INSERT INTO control (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        list(values.items()),
    )
    return True


def clear_pause(conn: sqlite3.Connection) -> None:
    """Lift the pause and reset the outage count."""
    conn.execute(
        "DELETE FROM control "
        "WHERE name IN ('paused_until', 'pause_delay', 'pause_reason', 'outages')"
    )


# --- what is left ---------------------------------------------------------------------------


def unfinished_count(conn: sqlite3.Connection) -> int:
    """How many changes are pending, in flight or waiting for a GUID."""
    # One count per state, each answered from that state's partial index.
    row = conn.execute(
        "SELECT (SELECT count(*) FROM changes WHERE state = 'pending') "
        "+ (SELECT count(*) FROM changes WHERE state = 'inflight') "
        "+ (SELECT count(*) FROM changes WHERE state = 'waiting_guid')"
    ).fetchone()
    return int(row[0])


def due_count(conn: sqlite3.Connection, at_most: int, now: float) -> int:
    """How many pending changes are due at `now`, counting no further than `at_most`."""
    row = conn.execute(
        f"SELECT count(*) FROM (SELECT 1 FROM changes AS c WHERE c.state = 'pending' "
        f"AND {_DUE} LIMIT :limit)",
        {"now": now, "limit": at_most},
    ).fetchone()
    return int(row[0])


def prune(conn: sqlite3.Connection, older_than: float) -> int:
    """Delete done changes and finished batches done before `older_than` (epoch)."""
    cursor = conn.execute("DELETE FROM changes WHERE state = 'done' AND done_at < ?", (older_than,))
    conn.execute("DELETE FROM batches WHERE state = 'finished' AND finished_at < ?", (older_than,))
    return cursor.rowcount


# --- the admin's view ---------------------------------------------------------------------


def counts(conn: sqlite3.Connection, now: float) -> OutboxCounts:
    """Counts per state, the oldest waiting change's age, the pause, batches in flight."""
    by_state = dict.fromkeys((str(state) for state in State), 0)
    by_state.update(conn.execute("SELECT state, count(*) FROM changes GROUP BY state").fetchall())
    oldest = conn.execute(f"SELECT min(created_at) FROM changes WHERE {_ACTIVE}").fetchone()[0]
    batches = conn.execute("SELECT count(*) FROM batches WHERE state = 'submitted'").fetchone()[0]
    return OutboxCounts(
        by_state=by_state,
        oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
        pause=pause(conn, now),
        batches_in_flight=batches,
    )


def list_changes(
    conn: sqlite3.Connection, state: str | None, limit: int, key: str | None
) -> list[Change]:
    """Changes oldest first, in one `state` and for one contact when given."""
    clauses: list[str] = []
    params: list[Any] = []
    if state is not None:
        clauses.append("state = ?")
        params.append(state)
    if key is not None:
        refs, contact_ids = _contact_of(conn, key)
        clauses.append(
            "(ref IN (SELECT value FROM json_each(?)) "
            "OR contact_key IN (SELECT value FROM json_each(?)) "
            "OR contact_id IN (SELECT value FROM json_each(?)))"
        )
        params += [
            json.dumps(refs),
            json.dumps([f"ref:{ref}" for ref in refs]),
            json.dumps(contact_ids),
        ]
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT * FROM changes {where} ORDER BY seq LIMIT ?",
        (*params, limit),
    ).fetchall()
    return _changes(rows)


def _contact_of(conn: sqlite3.Connection, key: str) -> tuple[list[str], list[str]]:
    """The refs and GUIDs the outbox knows for the contact `key` names (a ref, a GUID, or a
    key value such as an email).
    """
    if is_ref(key):
        return [key], []
    if is_contact_id(key):
        return [], [key.lower()]
    conn.create_function("ea_identity_matches", 2, identity_matches, deterministic=True)
    creates = conn.execute(
        "SELECT ref, contact_id FROM changes WHERE operation = 'create' "
        "AND identity IS NOT NULL AND ea_identity_matches(identity, ?)",
        (key,),
    ).fetchall()
    known = conn.execute(
        "SELECT contact_id FROM identities WHERE key LIKE 'key:%' AND ea_identity_matches(key, ?)",
        (key,),
    ).fetchall()
    refs = sorted({row["ref"] for row in creates if row["ref"]})
    contact_ids = sorted(
        {row["contact_id"] for row in creates if row["contact_id"]}
        | {row["contact_id"] for row in known}
    )
    return refs, contact_ids


def get_change(conn: sqlite3.Connection, change_id: str) -> Change | None:
    """One change by its id."""
    row = conn.execute("SELECT * FROM changes WHERE change_id = ?", (change_id,)).fetchone()
    return None if row is None else Change.from_row(row)


def _revive(conn: sqlite3.Connection, where: str, params: Sequence[Any], now: float) -> int:
    cursor = conn.execute(
        "UPDATE changes SET state = 'pending', next_attempt_at = ?, due_delay = 0, "
        f"attempts = 0, error_code = NULL, last_error = NULL, updated_at = ? WHERE {where}",
        (now, now, *params),
    )
    return cursor.rowcount


def requeue(conn: sqlite3.Connection, change: Change, now: float) -> None:
    """Make a change due now with its attempts reset; a dead create's dependents too."""
    _revive(conn, "seq = ?", (change.seq,), now)
    if change.operation is Operation.CREATE and change.contact_id is None:
        _revive(
            conn,
            "contact_key = ? AND state = 'dead' AND error_code = 'CreateDead'",
            (change.contact_key,),
            now,
        )


def requeue_dead(conn: sqlite3.Connection, now: float) -> int:
    """Requeue every dead change; how many."""
    return _revive(conn, "state = 'dead'", (), now)


def discard(conn: sqlite3.Connection, change: Change, reason: str, now: float) -> None:
    """Dead-letter a waiting change on purpose; a create without a GUID takes its dependents."""
    message = scrub(f"discarded: {reason}")
    conn.execute(
        "UPDATE changes SET state = 'dead', error_code = 'Discarded', last_error = ?, "
        "updated_at = ? WHERE seq = ?",
        (message, now, change.seq),
    )
    _bury_dependents(
        conn,
        {
            "operation": change.operation,
            "contact_id": change.contact_id,
            "contact_key": change.contact_key,
        },
        change.seq,
        "CreateDead",
        f"its create {change.change_id} was discarded",
        now,
    )


def mark_moved(conn: sqlite3.Connection, location: str) -> None:
    """The outbox's changes were moved to `location` (`engage-async outbox migrate`): from
    now on sessions and flushers refuse this file.
    """
    conn.execute(
        "INSERT INTO control (name, value) VALUES ('moved_to', ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (location,),
    )


def moved_to(conn: sqlite3.Connection) -> str | None:
    """Where this outbox's changes were moved, if they were."""
    row = conn.execute("SELECT value FROM control WHERE name = 'moved_to'").fetchone()
    return None if row is None else str(row[0])


def open_changes(conn: sqlite3.Connection) -> list[Change]:
    """Every change not yet done, oldest first."""
    return _changes(conn.execute("SELECT * FROM changes WHERE state != 'done' ORDER BY seq"))


# --- XML files, planned before they are written -----------------------------------------------
#
# A file's name and the digest of its bytes are committed with its rows (parked: in flight
# with no lease, so neither lease expiry nor a claim takes them) before the file is linked
# into place; recording it then finishes the rows. A flusher that died in between leaves the
# plan, and the next finishes that very file. Creates with options the import cannot carry
# wait for the API, pending and marked.

WAITS_FOR_API = "WaitsForApi"


def plan_export(
    conn: sqlite3.Connection, owner: str, seqs: Sequence[int], path: str, digest: str, now: float
) -> str:
    """Plan `owner`'s rows `seqs` into the file `path`: "planned"; "taken" when another open
    plan has that name; "lost" (nothing changed) when `owner` no longer holds every row.
    """
    held = conn.execute(
        "SELECT count(*) FROM changes WHERE seq IN (SELECT value FROM json_each(?)) "
        "AND state = 'inflight' AND lease_owner = ?",
        (_seq_list(seqs), owner),
    ).fetchone()[0]
    if held != len(seqs):
        return "lost"
    inserted = conn.execute(
        "INSERT INTO xml_plans (path, digest, planned_at) VALUES (?, ?, ?) "
        "ON CONFLICT (path) DO NOTHING",
        (path, digest, now),
    ).rowcount
    if not inserted:
        return "taken"
    conn.execute(
        f"UPDATE changes SET xml_plan = ?, updated_at = ?, {_UNLEASED} "
        "WHERE seq IN (SELECT value FROM json_each(?))",
        (path, now, _seq_list(seqs)),
    )
    return "planned"


def replan_export(
    conn: sqlite3.Connection, path: str, new_path: str, digest: str, now: float
) -> bool:
    """The plan `path` goes to `new_path` with the bytes `digest` names (the same path: only
    new bytes); False when another open plan has `new_path`.
    """
    if new_path == path:
        conn.execute(
            "UPDATE xml_plans SET digest = ?, planned_at = ? WHERE path = ?", (digest, now, path)
        )
        return True
    inserted = conn.execute(
        "INSERT INTO xml_plans (path, digest, planned_at) VALUES (?, ?, ?) "
        "ON CONFLICT (path) DO NOTHING",
        (new_path, digest, now),
    ).rowcount
    if not inserted:
        return False
    conn.execute("UPDATE changes SET xml_plan = ? WHERE xml_plan = ?", (new_path, path))
    conn.execute("DELETE FROM xml_plans WHERE path = ?", (path,))
    return True


def stale_exports(conn: sqlite3.Connection, before: float, lease: float) -> list[tuple[str, str]]:
    """(path, digest) of the plans made before `before`, oldest first."""
    # A plan stamped in the future was stamped by a clock that was ahead: stale too.
    rows = conn.execute(
        "SELECT path, digest FROM xml_plans WHERE planned_at < :before "
        "OR planned_at > :before + :lease ORDER BY planned_at, path",
        {"before": before, "lease": lease},
    ).fetchall()
    return [(row["path"], row["digest"]) for row in rows]


def export_rows(conn: sqlite3.Connection, path: str) -> list[Change]:
    """The rows still parked in the plan `path`, in seq order."""
    rows = conn.execute(
        "SELECT * FROM changes WHERE xml_plan = ? AND state = 'inflight' "
        "AND lease_owner IS NULL ORDER BY seq",
        (path,),
    ).fetchall()
    return _changes(rows)


def finish_export(conn: sqlite3.Connection, path: str, written: str, now: float) -> int:
    """The plan `path` is on disk as `written`: its updates are done, its creates wait for
    their GUID, the plan is gone; how many rows. A second call finds nothing to do.
    """
    parked = "xml_plan = ? AND state = 'inflight' AND lease_owner IS NULL"
    waiting = conn.execute(
        "UPDATE changes SET state = 'waiting_guid', exported_to = ?, xml_plan = NULL, "
        "next_attempt_at = ?, due_delay = 0, updated_at = ? "
        f"WHERE {parked} AND operation = 'create'",
        (written, now, now, path),
    ).rowcount
    done = conn.execute(
        "UPDATE changes SET state = 'done', done_at = ?, exported_to = ?, xml_plan = NULL, "
        f"updated_at = ? WHERE {parked}",
        (now, written, now, path),
    ).rowcount
    conn.execute("UPDATE changes SET xml_plan = NULL WHERE xml_plan = ?", (path,))
    conn.execute("DELETE FROM xml_plans WHERE path = ?", (path,))
    return waiting + done


def wait_for_api(
    conn: sqlite3.Connection,
    owner: str,
    seqs: Iterable[int],
    delay: float,
    reason: str,
    now: float,
) -> None:
    """`owner`'s claimed creates cannot go into an XML file: pending, due in `delay` seconds,
    marked as waiting for the API with `reason`.
    """
    conn.execute(
        f"UPDATE changes SET state = 'pending', {_UNLEASED}, next_attempt_at = ?, "
        "due_delay = ?, error_code = ?, last_error = ?, updated_at = ? "
        "WHERE seq IN (SELECT value FROM json_each(?)) AND state = 'inflight' "
        "AND lease_owner = ?",
        (now + delay, delay, WAITS_FOR_API, scrub(reason), now, _seq_list(seqs), owner),
    )


def waiting_for_api(conn: sqlite3.Connection) -> int:
    """How many pending changes wait for the API because an XML file cannot carry them."""
    row = conn.execute(
        "SELECT count(*) FROM changes WHERE state = 'pending' AND error_code = ?",
        (WAITS_FOR_API,),
    ).fetchone()
    return int(row[0])
