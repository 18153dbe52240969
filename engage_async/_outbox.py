"""The durable outbox: changes Engage could not take, kept in SQLite until they are delivered.

What it promises:

* `Outbox.enqueue` returns only after its transaction committed. Concurrent enqueues share
  one transaction (group commit): a single writer task takes everything waiting, runs it in
  one ``BEGIN IMMEDIATE`` ... ``COMMIT``, then answers every caller.
* Changes to one contact keep their order: each row carries a *contact key* and rows are
  delivered in ``seq`` order per key. Pending updates to a contact merge (later values
  win); an update to a queued create folds into its body; a contact-type change is a barrier
  nothing merges across. A row a flusher has leased is never merged into.
* The identity map (key -> GUID) lives in the same file: refs of creates are kept for ever,
  lookups are a cache with a time to live.

The outbox knows nothing of HTTP; the session and the flusher decide what to queue and send.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from ._changes import Change, NewChange, Operation, Queued, State, dumps, loads, row_factory
from ._coalesce import merge_changes
from ._errors import OutboxError
from ._keys import contact_key, identity_key, new_change_id
from ._schema import migrate
from ._sqlite import Database

__all__ = ["Outbox"]

log = logging.getLogger(__name__)


# Cached lookups are written lazily, batched with the next commit or after this long:
# losing one to a crash only costs a lookup, so it need not cost an fsync of its own.
_LAZY_IDENTITY_DELAY = 0.5


_Work = Callable[[sqlite3.Connection], Any]

# In-process wake-ups: a flusher of an outbox file hears about every enqueue to that file made
# in the same process, instead of waiting for its next poll. Keyed by the resolved path.
_listeners: dict[str, set[Callable[[], None]]] = {}


class Outbox:
    """One process's handle on the outbox file. Open with `Outbox.open`, close with `close`."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        # Resolved once: resolving on every enqueue was a tenth of an enqueue's cost.
        self._listen_key = str(db.path.resolve())
        self._queue: asyncio.Queue[tuple[_Work, asyncio.Future[Any]] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._lazy_identities: dict[str, tuple[str, float]] = {}
        self._lazy_flush: asyncio.TimerHandle | None = None

    @property
    def path(self) -> Path:
        """The outbox file."""
        return self._db.path

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout: float = 10.0,
        durability: Literal["full", "normal"] = "full",
        clock: Callable[[], float] = time.time,
        create: bool = True,
    ) -> Outbox:
        """Open the outbox at `path` (creating it unless `create` is False) and bring its
        schema up to date.

        Raises:
            OutboxError: the file is foreign, corrupt, from a newer version, missing, or cannot
                be created or written.
        """
        db = await Database.open(
            path,
            busy_timeout=busy_timeout,
            durability=durability,
            prepare=migrate,
            create=create,
        )
        try:

            def use_rows(conn: sqlite3.Connection) -> None:
                conn.row_factory = row_factory

            await db.run(use_rows)
        except BaseException:
            await db.close()
            raise
        outbox = cls(db, clock=clock)
        outbox._writer = asyncio.create_task(outbox._write_loop(), name="engage-outbox-writer")
        return outbox

    async def close(self) -> None:
        """Commit what is waiting, then close the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._lazy_flush is not None:
            self._lazy_flush.cancel()
        if self._lazy_identities:
            with contextlib.suppress(OutboxError):
                await self.write(self._take_lazy_identities())
        if self._writer is not None:
            self._queue.put_nowait(None)
            await asyncio.shield(self._writer)
        await self._db.close()

    # --- group commit -----------------------------------------------------------------------

    async def write(self, work: _Work) -> Any:
        """Run `work` in the next group commit and return its result once committed.

        For the modules that share the file (the replay queue); `work` runs on the database
        thread inside the transaction, and must not block on anything but SQLite.
        """
        if self._writer is None or self._writer.done():
            raise OutboxError(f"the outbox at {self.path} is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Nobody may be left to read the result if the caller was cancelled meanwhile.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.put_nowait((work, future))
        # Shielded: a caller cancelled mid-commit must not cancel the commit for the others.
        return await asyncio.shield(future)

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            item = await self._queue.get()
            if item is None:
                break
            batch = [item]
            while not self._queue.empty():
                extra = self._queue.get_nowait()
                if extra is None:
                    stopping = True
                    break
                batch.append(extra)
            if self._lazy_identities:
                batch.insert(0, (self._take_lazy_identities(), _detached_future()))
            works = [work for work, _ in batch]
            try:
                outcomes = await self._db.write(functools.partial(_run_batch, works=works))
            except BaseException as exc:
                # Database.write already turned SQLite's errors into OutboxError; anything
                # else is the one piece of work's own error (a batch of one has no savepoint).
                failure: BaseException = exc
                if not isinstance(exc, Exception):
                    failure = OutboxError("the outbox was shut down during a commit")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
                if isinstance(exc, OutboxError):
                    log.error("outbox commit failed: %s", exc)  # noqa: TRY400 - the cause is in the message
                continue
            for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    async def read(self, work: _Work) -> Any:
        """Run `work` on the database thread outside any write transaction."""
        return await self._db.run(work)

    @property
    def clock(self) -> Callable[[], float]:
        """The wall clock the outbox stamps rows with (injectable for tests)."""
        return self._clock

    # --- enqueue ------------------------------------------------------------------------------

    async def enqueue(self, change: NewChange) -> Queued:
        """Commit `change` to the outbox, merged with what waits for the same contact.

        Raises:
            OutboxError: nothing was kept (disk full, read-only, locked too long, closed).
        """
        now = self._clock()
        queued: Queued = await self.write(lambda conn: _enqueue(conn, change, now))
        for wake in tuple(_listeners.get(self._listen_key, ())):
            wake()
        return queued

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake` after every enqueue to this file in this process; returns the undo."""
        key = self._listen_key
        _listeners.setdefault(key, set()).add(wake)

        def unsubscribe() -> None:
            listeners = _listeners.get(key)
            if listeners is not None:
                listeners.discard(wake)
                if not listeners:
                    del _listeners[key]

        return unsubscribe

    async def has_active(self, contact_key: str) -> bool:
        """Do changes to this contact still wait (pending, in flight or awaiting a GUID)?"""

        def query(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM changes WHERE contact_key = ? "
                "AND state IN ('pending', 'inflight', 'waiting_guid') LIMIT 1",
                (contact_key,),
            ).fetchone()
            return row is not None

        return await self._db.run(query)

    async def queued_create(
        self, key_name: str, key_value: str, contact_type: str
    ) -> tuple[str, str] | None:
        """(change_id, ref) of a create still waiting for this key and type, if any."""

        def query(conn: sqlite3.Connection) -> tuple[str, str] | None:
            row = _queued_create(conn, key_name, key_value, contact_type)
            return None if row is None else (row["change_id"], row["ref"])

        return await self._db.run(query)

    async def create_of(self, ref: str) -> Change | None:
        """The create that made `ref`, in any state, or None if the outbox never saw it."""

        def query(conn: sqlite3.Connection) -> Change | None:
            row = conn.execute(
                "SELECT * FROM changes WHERE ref = ? AND operation = 'create' "
                "ORDER BY seq DESC LIMIT 1",
                (ref,),
            ).fetchone()
            return None if row is None else Change.from_row(row)

        return await self._db.run(query)

    async def record_guid(self, seq: int, contact_id: str) -> None:
        """A create reached Engage and its GUID is known: finish it in one transaction.

        Marks the create done, records ref and key -> GUID in the identity map, and points
        the changes waiting on its ref at the GUID, which releases them.
        """
        now = self._clock()
        await self.write(lambda conn: _record_guid(conn, seq, contact_id, now))

    # --- identity map ---------------------------------------------------------------------

    async def remember(self, keys: Iterable[str], contact_id: str) -> None:
        """Record that every key in `keys` names `contact_id`; committed before returning."""
        now = self._clock()
        rows = [(key, contact_id, now) for key in keys]
        for key in keys:
            self._lazy_identities.pop(key, None)
        await self.write(lambda conn: _upsert_identities(conn, rows))

    def remember_later(self, key: str, contact_id: str) -> None:
        """Cache a lookup result; written with the next commit (a crash may lose it)."""
        if self._closed:
            return
        self._lazy_identities[key] = (contact_id, self._clock())
        if self._lazy_flush is None:
            loop = asyncio.get_running_loop()
            self._lazy_flush = loop.call_later(_LAZY_IDENTITY_DELAY, self._flush_lazy)

    def _flush_lazy(self) -> None:
        self._lazy_flush = None
        if self._lazy_identities and not self._closed:
            task = asyncio.ensure_future(self.write(self._take_lazy_identities()))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _take_lazy_identities(self) -> _Work:
        rows = [(key, guid, at) for key, (guid, at) in self._lazy_identities.items()]
        self._lazy_identities.clear()
        return lambda conn: _upsert_identities(conn, rows)

    async def forget(self, key: str) -> None:
        """Drop a cached identity (the contact turned out not to exist any more)."""
        self._lazy_identities.pop(key, None)
        await self.write(lambda conn: conn.execute("DELETE FROM identities WHERE key = ?", (key,)))

    async def identity(self, key: str, *, max_age: float | None = None) -> str | None:
        """The GUID recorded for `key`, if recorded less than `max_age` seconds ago."""
        oldest = None if max_age is None else self._clock() - max_age
        lazy = self._lazy_identities.get(key)
        if lazy is not None and (oldest is None or lazy[1] >= oldest):
            return lazy[0]

        def query(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT contact_id, updated_at FROM identities WHERE key = ?", (key,)
            ).fetchone()
            if row is None or (oldest is not None and row["updated_at"] < oldest):
                return None
            return str(row["contact_id"])

        return await self._db.run(query)


def _detached_future() -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _run_batch(conn: sqlite3.Connection, works: list[_Work]) -> list[tuple[bool, Any]]:
    """Run each piece of work; one that fails is rolled back alone and reported to its caller.

    A failure of the commit itself (disk full, say) fails them all, in `Database.write`.
    """
    if len(works) == 1:
        return [(True, works[0](conn))]
    outcomes: list[tuple[bool, Any]] = []
    for work in works:
        conn.execute("SAVEPOINT item")
        try:
            outcomes.append((True, work(conn)))
        except Exception as exc:
            conn.execute("ROLLBACK TO item")
            failure = (
                OutboxError(f"{type(exc).__name__}: {exc}")
                if isinstance(exc, sqlite3.Error)
                else exc
            )
            outcomes.append((False, failure))
        conn.execute("RELEASE item")
    return outcomes


def _upsert_identities(conn: sqlite3.Connection, rows: list[tuple[str, str, float]]) -> None:
    conn.executemany(
        "INSERT INTO identities (key, contact_id, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET contact_id = excluded.contact_id, "
        "updated_at = excluded.updated_at",
        rows,
    )


def _record_guid(conn: sqlite3.Connection, seq: int, contact_id: str, now: float) -> None:
    create = conn.execute(
        "SELECT ref, key_name, key_value, contact_type FROM changes WHERE seq = ?", (seq,)
    ).fetchone()
    if create is None:
        return
    keys = [f"ref:{create['ref']}"]
    if create["key_name"] and create["key_value"]:
        keys.append(identity_key(create["key_name"], create["key_value"], create["contact_type"]))
    _upsert_identities(conn, [(key, contact_id, now) for key in keys])
    conn.execute(
        "UPDATE changes SET state = 'done', contact_id = ?, done_at = ?, updated_at = ?, "
        "lease_owner = NULL, lease_until = NULL WHERE seq = ?",
        (contact_id, now, now, seq),
    )
    conn.execute(
        "UPDATE changes SET contact_key = ?, contact_id = ?, updated_at = ? "
        "WHERE contact_key = ? AND state IN ('pending', 'inflight', 'waiting_guid')",
        (contact_key(contact_id=contact_id), contact_id, now, contact_key(ref=create["ref"])),
    )


def _tail(conn: sqlite3.Connection, contact_key: str) -> sqlite3.Row | None:
    """The last change still waiting for this contact: the only one a new change may join."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT seq, change_id, ref, operation, state, body, folded, key_name, key_value, "
        "contact_type FROM changes "
        "WHERE contact_key = ? AND state IN ('pending', 'inflight', 'waiting_guid') "
        "ORDER BY seq DESC LIMIT 1",
        (contact_key,),
    ).fetchone()
    return row


def _queued_create(
    conn: sqlite3.Connection, key_name: str, key_value: str, contact_type: str | None
) -> sqlite3.Row | None:
    """The newest create still waiting for this key and contact type.

    Matched on the normalised key, as Engage matches it: "ANN@Example.com" is the contact
    "ann@example.com" is.
    """
    row: sqlite3.Row | None = conn.execute(
        "SELECT change_id, ref, contact_key FROM changes WHERE operation = 'create' "
        "AND state IN ('pending', 'inflight', 'waiting_guid') AND identity = ? "
        "ORDER BY seq DESC LIMIT 1",
        (identity_key(key_name, key_value, contact_type),),
    ).fetchone()
    return row


def _enqueue(conn: sqlite3.Connection, change: NewChange, now: float) -> Queued:
    if change.operation is Operation.CREATE and change.key_name and change.key_value:
        twin = _queued_create(conn, change.key_name, change.key_value, change.contact_type)
        if twin is not None:
            # The contact is already on its way in: a second create would make a duplicate.
            if change.if_exists == "update" and change.body:
                changes = {k: v for k, v in change.body.items() if k != "contactType"}
                _merge_into_tail(conn, twin["contact_key"], changes, now)
            return Queued(twin["change_id"], ref=twin["ref"], duplicate=True)
    if change.operation is Operation.UPDATE and change.body is not None:
        merged = _merge_into_tail(conn, change.contact_key, change.body, now)
        if merged is not None:
            return merged
    return _insert(conn, change, now)


def _merge_into_tail(
    conn: sqlite3.Connection, contact_key: str, changes: Mapping[str, Any], now: float
) -> Queued | None:
    """Fold `changes` into the contact's last waiting change if that is allowed, else None.

    Allowed only into a pending (not leased) create or update: a row in flight may already be
    on the wire, and a contact-type change is a barrier.
    """
    tail = _tail(conn, contact_key)
    if tail is None or tail["state"] != State.PENDING:
        return None
    if tail["operation"] == Operation.UPDATE:
        body = merge_changes(loads(tail["body"]) or {}, changes)
        conn.execute(
            "UPDATE changes SET body = ?, updated_at = ? WHERE seq = ?",
            (dumps(body), now, tail["seq"]),
        )
    elif tail["operation"] == Operation.CREATE:
        body = merge_changes(loads(tail["body"]) or {}, changes)
        folded = merge_changes(loads(tail["folded"]) or {}, changes)
        key_value = tail["key_value"]
        corrected = changes.get(tail["key_name"]) if tail["key_name"] else None
        if isinstance(corrected, str) and corrected.strip():
            # The contact will be created with the corrected key, so that is what its GUID is
            # looked up by and what a second create for it must match.
            key_value = corrected
        conn.execute(
            "UPDATE changes SET body = ?, folded = ?, key_value = ?, identity = ?, "
            "updated_at = ? WHERE seq = ?",
            (
                dumps(body),
                dumps(folded),
                key_value,
                _identity_of(Operation.CREATE, tail["key_name"], key_value, tail["contact_type"]),
                now,
                tail["seq"],
            ),
        )
    else:
        return None
    return Queued(tail["change_id"], ref=tail["ref"], merged=True)


def _identity_of(
    operation: Operation, key_name: str | None, key_value: str | None, contact_type: str | None
) -> str | None:
    """The identity-map key a create is matched by; None for other changes and keyless ones."""
    if operation is not Operation.CREATE or not key_name or not key_value:
        return None
    return identity_key(key_name, key_value, contact_type)


def _known_type(conn: sqlite3.Connection, change: NewChange) -> str | None:
    """The contact type an update's contact has, as far as the outbox knows: from the newest
    create or type change queued for it (by its ref or its GUID). An XML file needs it.
    """
    typed = "operation IN ('create', 'contact_type', 'promote') AND contact_type IS NOT NULL"
    # Two indexed lookups rather than one OR that may scan.
    row = conn.execute(
        f"SELECT contact_type FROM changes WHERE contact_key = ? "  # noqa: S608 - fixed text
        f"AND state IN ('pending', 'inflight', 'waiting_guid') AND {typed} "
        "ORDER BY seq DESC LIMIT 1",
        (change.contact_key,),
    ).fetchone()
    if row is None and change.ref is not None:
        row = conn.execute(
            f"SELECT contact_type FROM changes WHERE ref = ? AND {typed} "  # noqa: S608
            "ORDER BY seq DESC LIMIT 1",
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
            _identity_of(change.operation, change.key_name, change.key_value, change.contact_type),
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
