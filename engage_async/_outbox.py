"""The SQLite outbox: `OutboxStore` over one file, with group commit.

What it promises:

* A write returns only after its transaction committed. Concurrent writes share one
  transaction (group commit): a single writer task takes everything waiting, runs it in one
  ``BEGIN IMMEDIATE`` ... ``COMMIT`` (a savepoint per item, so one failing item does not fail
  the others), then answers every caller.
* Changes to one contact keep their order, pending updates merge, a row a flusher leased is
  never merged into (the rules are in `_rows`, where the SQL is).
* The identity map (key -> GUID) lives in the same file: refs of creates are kept for ever,
  lookups are a cache, written lazily with the next commit.

The outbox knows nothing of HTTP; the session and the flusher decide what to queue and send.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from . import _rows
from ._changes import Batch, Change, NewChange, Operation, Queued, row_factory
from ._clock import SYSTEM_CLOCK, Clock
from ._errors import OutboxError
from ._schema import migrate
from ._sqlite import Database
from ._store import Failures, OutboxCounts, Pause

__all__ = ["SqliteOutbox"]

log = logging.getLogger(__name__)

# Cached lookups are written lazily, batched with the next commit or after this long:
# losing one to a crash only costs a lookup, so it need not cost an fsync of its own.
_LAZY_IDENTITY_DELAY = 0.5

_Work = Callable[[sqlite3.Connection], Any]

# In-process wake-ups: a flusher of an outbox file hears about every enqueue to that file made
# in the same process, instead of waiting for its next poll. Keyed by the resolved path.
_listeners: dict[str, set[Callable[[], None]]] = {}


class SqliteOutbox:
    """One process's handle on an outbox file. Open with `SqliteOutbox.open`."""

    def __init__(self, db: Database, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = db
        self._clock = clock
        # Resolved once: resolving on every enqueue was a tenth of an enqueue's cost.
        self._listen_key = str(db.path.resolve())
        self._queue: asyncio.Queue[tuple[_Work, asyncio.Future[Any]] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._lazy_identities: dict[str, tuple[str, float]] = {}
        self._lazy_types: dict[str, tuple[str, float]] = {}
        self._lazy_flush: asyncio.TimerHandle | None = None
        # Other flushers' heartbeats as this process last saw them move: owner -> (beats,
        # when it saw that count first, on its monotonic clock).
        self._observed: dict[str, tuple[int, float]] = {}

    @property
    def path(self) -> Path:
        """The outbox file."""
        return self._db.path

    @property
    def location(self) -> str:
        """The outbox file, for messages."""
        return str(self._db.path)

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout: float = 10.0,
        durability: Literal["full", "normal"] = "full",
        clock: Clock = SYSTEM_CLOCK,
        create: bool = True,
    ) -> SqliteOutbox:
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
        if self._lazy_identities or self._lazy_types:
            with contextlib.suppress(OutboxError):
                await self._write(self._take_lazy_identities())
        if self._writer is not None:
            self._queue.put_nowait(None)
            await asyncio.shield(self._writer)
        await self._db.close()

    def _now(self) -> float:
        return self._clock.wall()

    # --- group commit -------------------------------------------------------------------------

    async def _write(self, work: _Work) -> Any:
        """Run `work` in the next group commit and return its result once committed."""
        if self._writer is None or self._writer.done():
            raise OutboxError(f"the outbox at {self.path} is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Nobody may be left to read the result if the caller was cancelled meanwhile.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.put_nowait((work, future))
        # Shielded: a caller cancelled mid-commit must not cancel the commit for the others.
        return await asyncio.shield(future)

    async def _read(self, work: _Work) -> Any:
        """Run `work` on the database thread outside any write transaction."""
        return await self._db.run(work)

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
            if self._lazy_identities or self._lazy_types:
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

    # --- what the session does ------------------------------------------------------------------

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

    async def enqueue(self, change: NewChange) -> Queued:
        """Commit `change` to the outbox, merged with what waits for the same contact.

        Raises:
            OutboxError: nothing was kept (disk full, read-only, locked too long, closed).
        """
        now = self._now()
        queued: Queued = await self._write(lambda conn: _rows.enqueue(conn, change, now))
        for wake in tuple(_listeners.get(self._listen_key, ())):
            wake()
        return queued

    async def has_active(self, contact_key: str) -> bool:
        """Do changes to this contact still wait (pending, in flight or awaiting a GUID)?"""
        result: bool = await self._read(lambda conn: _rows.has_active(conn, contact_key))
        return result

    async def queued_create(
        self, key_name: str, key_value: str, contact_type: str
    ) -> tuple[str, str] | None:
        """(change_id, ref) of a create still waiting for this key and type, if any."""
        result: tuple[str, str] | None = await self._read(
            lambda conn: _rows.queued_create(conn, key_name, key_value, contact_type)
        )
        return result

    async def create_of(self, ref: str) -> Change | None:
        """The create that made `ref`, in any state, or None if the outbox never saw it."""
        result: Change | None = await self._read(lambda conn: _rows.create_of(conn, ref))
        return result

    async def record_guid(self, seq: int, contact_id: str) -> None:
        """The create at `seq` exists as `contact_id`: finish it and free its chain."""
        now = self._now()
        await self._write(lambda conn: _rows.record_guid(conn, seq, contact_id, now))

    async def remember(self, keys: Iterable[str], contact_id: str) -> None:
        """Record that every key in `keys` names `contact_id`; committed before returning."""
        now = self._now()
        rows = [(key, contact_id, now) for key in keys]
        for key, _, _ in rows:
            self._lazy_identities.pop(key, None)
        await self._write(lambda conn: _rows.upsert_identities(conn, rows))

    def remember_later(self, key: str, contact_id: str) -> None:
        """Cache a lookup result; written with the next commit (a crash may lose it)."""
        if self._closed:
            return
        self._lazy_identities[key] = (contact_id, self._now())
        self._flush_soon()

    def remember_type_later(self, contact_id: str, contact_type: str) -> None:
        """Note the contact type Engage showed for a contact; written with the next commit
        (a crash may lose it: its bulk update then goes alone).
        """
        if self._closed:
            return
        self._lazy_types[contact_id] = (contact_type, self._now())
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._lazy_flush is None:
            loop = asyncio.get_running_loop()
            self._lazy_flush = loop.call_later(_LAZY_IDENTITY_DELAY, self._flush_lazy)

    def _flush_lazy(self) -> None:
        self._lazy_flush = None
        if (self._lazy_identities or self._lazy_types) and not self._closed:
            task = asyncio.ensure_future(self._write(self._take_lazy_identities()))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _take_lazy_identities(self) -> _Work:
        """The cached identities and contact types as one piece of work for a commit."""
        rows = [(key, guid, at) for key, (guid, at) in self._lazy_identities.items()]
        types = [(guid, kind, at) for guid, (kind, at) in self._lazy_types.items()]
        self._lazy_identities.clear()
        self._lazy_types.clear()

        def work(conn: sqlite3.Connection) -> None:
            _rows.upsert_identities(conn, rows)
            _rows.learn_types(conn, types)

        return work

    async def identity(self, key: str, *, max_age: float | None = None) -> str | None:
        """The GUID recorded for `key`, if recorded less than `max_age` seconds ago."""
        oldest = None if max_age is None else self._now() - max_age
        lazy = self._lazy_identities.get(key)
        if lazy is not None and (oldest is None or lazy[1] >= oldest):
            return lazy[0]
        result: str | None = await self._read(lambda conn: _rows.identity(conn, key, oldest))
        return result

    # --- what a flusher does ------------------------------------------------------------------

    async def register(self, owner: str) -> None:
        """`owner` (a flusher) starts: its heartbeat row exists from now on."""
        await self.renew(owner, 0.0)

    async def unregister(self, owner: str) -> None:
        """`owner` stops for good, having given back what it held."""
        await self._write(lambda conn: _rows.leaving(conn, owner))

    async def recover_expired(self, owner: str, *, lease_seconds: float) -> int:
        """Give back what flushers that stopped renewing held; how many rows came back.

        Judged by observation, never by times another clock wrote: a flusher is gone once
        this process saw its heartbeat stand still for `lease_seconds` on its own monotonic
        clock, or at once when it ran on this host and its process no longer exists.
        """
        now = self._clock.monotonic()
        beats: dict[str, tuple[int, str, int, str]] = await self._read(_rows.heartbeats)
        gone: list[tuple[str, int]] = []
        for other, (count, host, pid, pidns) in beats.items():
            if other == owner:
                continue
            seen = self._observed.get(other)
            if seen is None or seen[0] != count:
                self._observed[other] = (count, now)
                if _process_gone(host, pid, pidns):
                    gone.append((other, count))
            elif now - seen[1] >= lease_seconds or _process_gone(host, pid, pidns):
                gone.append((other, count))
        for other in set(self._observed) - set(beats):
            del self._observed[other]
        recovered = 0
        for other, count in gone:
            back = await self._recover_owner(other, count)
            if back:
                log.warning(
                    "flusher %s is gone: %d change(s) it held are pending again", other, back
                )
            recovered += back
            self._observed.pop(other, None)
        return recovered

    async def _recover_owner(self, owner: str, beats: int) -> int:
        now = self._now()
        result: int = await self._write(lambda conn: _rows.recover_owner(conn, owner, beats, now))
        return result

    async def claim(self, owner: str, *, limit: int, lease_seconds: float) -> list[Change]:
        """Lease up to `limit` due changes, each the head of its contact's chain."""
        now = self._now()
        result: list[Change] = await self._write(
            lambda conn: _rows.claim(conn, owner, limit, now + lease_seconds, now)
        )
        return result

    async def renew(self, owner: str, lease_seconds: float) -> None:
        """`owner` is alive: its heartbeat moves on (and the expiry shown on its leases)."""
        now = self._now()
        await self._write(lambda conn: _rows.beat(conn, owner, _PROCESS, now + lease_seconds))

    async def about_to_send(self, owner: str, seqs: Iterable[int]) -> None:
        """`owner` is about to send these creates; committed before returning."""
        seqs = list(seqs)
        if seqs:
            await self._write(lambda conn: _rows.about_to_send(conn, owner, seqs))

    async def release(
        self,
        owner: str,
        seqs: Iterable[int],
        *,
        delay: float = 0.0,
        count_attempt: bool = False,
        error: str | None = None,
        send_alone: bool = False,
        maybe_sent: bool = False,
    ) -> None:
        """Give claimed rows back as pending, due again in `delay` seconds."""
        now = self._now()
        seqs = list(seqs)
        await self._write(
            lambda conn: _rows.release(
                conn,
                owner,
                seqs,
                delay=delay,
                count_attempt=count_attempt,
                error=error,
                send_alone=send_alone,
                maybe_sent=maybe_sent,
                now=now,
            )
        )

    async def finish(self, seqs: Iterable[int]) -> None:
        """Rows Engage applied: done."""
        now = self._now()
        seqs = list(seqs)
        await self._write(lambda conn: _rows.finish(conn, seqs, now))

    async def bury(self, failures: Failures) -> int:
        """Dead-letter rows Engage rejected for good, and their dependents; how many."""
        now = self._now()
        result: int = await self._write(lambda conn: _rows.bury(conn, failures, now))
        return result

    async def create_became_update(
        self, change: Change, contact_id: str, body: Mapping[str, Any]
    ) -> None:
        """A create's contact exists and must still get `body`: the row becomes an update."""
        now = self._now()
        await self._write(
            lambda conn: _rows.create_became_update(conn, change, contact_id, body, now)
        )

    async def submit_batch(
        self,
        batch_id: str,
        kind: Operation,
        contact_type: str | None,
        seqs: Sequence[int],
        *,
        first_poll: float,
    ) -> None:
        """Engage accepted a bulk request: record the batch and tie its rows to it."""
        now = self._now()
        await self._write(
            lambda conn: _rows.submit_batch(
                conn, batch_id, kind, contact_type, seqs, first_poll, now
            )
        )

    async def claim_batches(self, owner: str, *, limit: int, lease_seconds: float) -> list[Batch]:
        """Lease batches due for a status poll."""
        now = self._now()
        result: list[Batch] = await self._write(
            lambda conn: _rows.claim_batches(conn, owner, limit, now + lease_seconds, now)
        )
        return result

    async def batch_rows(self, batch_id: str) -> list[Change]:
        """The changes sent in a batch, in the order they were sent."""
        result: list[Change] = await self._read(lambda conn: _rows.batch_rows(conn, batch_id))
        return result

    async def poll_batch_later(self, batch_id: str, *, delay: float, status: Any) -> None:
        """The batch still runs: keep its status, poll again in `delay` seconds."""
        now = self._now()
        await self._write(lambda conn: _rows.poll_batch_later(conn, batch_id, delay, status, now))

    async def unlease_batches(self, owner: str, batch_ids: Sequence[str]) -> None:
        """Give back batches `owner` could not poll, as they were."""
        await self._write(lambda conn: _rows.forget_lease_of_batches(conn, owner, batch_ids))

    async def settle_batch(
        self,
        batch_id: str,
        status: Any,
        *,
        failed: Failures,
        resend: Iterable[int],
        created: Mapping[int, str] | None = None,
    ) -> tuple[int, int]:
        """Settle a finished batch in one transaction; (rows applied, rows dead)."""
        now = self._now()
        resend = list(resend)
        known = dict(created or {})
        result: tuple[int, int] = await self._write(
            lambda conn: _rows.settle_batch(conn, batch_id, status, failed, resend, known, now)
        )
        return result

    async def next_batch_poll(self) -> float | None:
        """Seconds until a batch in flight is due for a poll, or None if none is in flight."""
        now = self._now()
        result: float | None = await self._read(lambda conn: _rows.next_batch_poll(conn, now))
        return result

    async def claim_waiting(self, owner: str, *, limit: int, lease_seconds: float) -> list[Change]:
        """Lease creates due for a GUID lookup, those other changes wait on first."""
        now = self._now()
        result: list[Change] = await self._write(
            lambda conn: _rows.claim_waiting(conn, owner, limit, now + lease_seconds, now)
        )
        return result

    async def not_found_yet(self, seq: int, *, delay: float, count: bool = True) -> None:
        """A waiting create is not on Engage yet: look again in `delay` seconds."""
        now = self._now()
        await self._write(lambda conn: _rows.not_found_yet(conn, seq, delay, count, now))

    async def create_again(self, seq: int, reason: str) -> None:
        """A create Engage never showed: send it again (looked up first)."""
        now = self._now()
        await self._write(lambda conn: _rows.create_again(conn, seq, reason, now))

    async def exported(self, done: Iterable[int], waiting: Iterable[int], path: str) -> None:
        """Rows written to an XML file: updates done, creates waiting for their GUID."""
        now = self._now()
        done, waiting = list(done), list(waiting)
        await self._write(lambda conn: _rows.exported(conn, done, waiting, path, now))

    async def pause(self) -> Pause | None:
        """The pause every flusher obeys, if one is set."""
        now = self._now()
        result: Pause | None = await self._read(lambda conn: _rows.pause(conn, now))
        return result

    async def set_pause(
        self, *, delay: float, reason: str, outages: int, expected_outages: int | None = None
    ) -> bool:
        """Make every flusher hold off for `delay` seconds (only if `expected_outages`, when
        given, is the count so far); whether it did.
        """
        now = self._now()
        done: bool = await self._write(
            lambda conn: _rows.set_pause(conn, delay, reason, outages, now, expected_outages)
        )
        return done

    async def clear_pause(self) -> None:
        """Lift the pause and reset the outage count."""
        await self._write(_rows.clear_pause)

    async def unfinished_count(self) -> int:
        """How many changes are pending, in flight or waiting for a GUID."""
        result: int = await self._read(_rows.unfinished_count)
        return result

    async def due_count(self, *, at_most: int) -> int:
        """How many pending changes are due now, counting no further than `at_most`."""
        now = self._now()
        result: int = await self._read(lambda conn: _rows.due_count(conn, at_most, now))
        return result

    async def prune(self, *, older_than: float) -> int:
        """Delete done changes and finished batches older than `older_than` seconds."""
        cutoff = self._now() - older_than
        result: int = await self._write(lambda conn: _rows.prune(conn, cutoff))
        return result

    # --- what the admin does --------------------------------------------------------------------

    async def counts(self) -> OutboxCounts:
        """Counts per state, the oldest waiting change's age, the pause, batches in flight."""
        now = self._now()
        result: OutboxCounts = await self._db.read(lambda conn: _rows.counts(conn, now))
        return result

    async def list_changes(self, *, state: str | None, limit: int, key: str | None) -> list[Change]:
        """Changes oldest first, in one `state` and for one contact when given."""
        result: list[Change] = await self._db.read(
            lambda conn: _rows.list_changes(conn, state, limit, key)
        )
        return result

    async def get_change(self, change_id: str) -> Change | None:
        """One change by its id."""
        result: Change | None = await self._read(lambda conn: _rows.get_change(conn, change_id))
        return result

    async def requeue(self, change: Change) -> None:
        """Make a change due now, attempts reset; a dead create's dependents too."""
        now = self._now()
        await self._write(lambda conn: _rows.requeue(conn, change, now))

    async def requeue_dead(self) -> int:
        """Requeue every dead change; how many."""
        now = self._now()
        result: int = await self._write(lambda conn: _rows.requeue_dead(conn, now))
        return result

    async def discard(self, change: Change, reason: str) -> None:
        """Dead-letter a waiting change on purpose (a create takes its dependents along)."""
        now = self._now()
        await self._write(lambda conn: _rows.discard(conn, change, reason, now))

    async def open_changes(self) -> list[Change]:
        """Every change not yet done, oldest first."""
        result: list[Change] = await self._db.read(_rows.open_changes)
        return result

    # --- moving to another outbox (`engage-async outbox migrate`) ----------------------------

    async def mark_moved(self, location: str) -> None:
        """Record that this outbox's changes now live at `location` (no password in it)."""
        await self._write(lambda conn: _rows.mark_moved(conn, location))

    async def moved_to(self) -> str | None:
        """Where this outbox's changes were moved, if they were."""
        result: str | None = await self._read(_rows.moved_to)
        return result

    # --- XML files, planned before they are written ------------------------------------------

    async def plan_export(
        self, owner: str, seqs: Sequence[int], path: str, digest: str
    ) -> Literal["planned", "taken", "lost"]:
        """Commit the plan of an XML file before it is written (the rows are parked)."""
        now = self._now()
        seqs = list(seqs)
        result: Literal["planned", "taken", "lost"] = await self._write(
            lambda conn: _rows.plan_export(conn, owner, seqs, path, digest, now)
        )
        return result

    async def replan_export(self, path: str, new_path: str, digest: str) -> bool:
        """Move a plan to another name, or give it new bytes; False if the name is planned."""
        now = self._now()
        result: bool = await self._write(
            lambda conn: _rows.replan_export(conn, path, new_path, digest, now)
        )
        return result

    async def stale_exports(self, *, older_than: float) -> list[tuple[str, str]]:
        """(path, digest) of the plans made more than `older_than` seconds ago."""
        before = self._now() - older_than
        result: list[tuple[str, str]] = await self._read(
            lambda conn: _rows.stale_exports(conn, before, older_than)
        )
        return result

    async def export_rows(self, path: str) -> list[Change]:
        """The rows still parked in the plan `path`."""
        result: list[Change] = await self._read(lambda conn: _rows.export_rows(conn, path))
        return result

    async def finish_export(self, path: str, written: str) -> int:
        """The plan `path` is on disk as `written`: its rows are exported; how many."""
        now = self._now()
        result: int = await self._write(lambda conn: _rows.finish_export(conn, path, written, now))
        return result

    async def wait_for_api(
        self, owner: str, seqs: Iterable[int], *, delay: float, reason: str
    ) -> None:
        """Claimed creates an XML file cannot carry: pending, marked as waiting for the API."""
        now = self._now()
        seqs = list(seqs)
        await self._write(lambda conn: _rows.wait_for_api(conn, owner, seqs, delay, reason, now))

    async def waiting_for_api(self) -> int:
        """How many pending changes wait for the API because an XML file cannot carry them."""
        result: int = await self._read(_rows.waiting_for_api)
        return result


def _pid_namespace() -> str:
    """This process's pid namespace (Linux), so that a pid is only judged on the host and
    namespace it belongs to (containers sharing a volume each have their own).
    """
    try:
        return str(Path("/proc/self/ns/pid").stat().st_ino)
    except OSError:
        return ""


_PROCESS: Final = (socket.gethostname(), os.getpid(), _pid_namespace())


def _process_gone(host: str, pid: int, pidns: str) -> bool:
    """Is a flusher's process known not to exist any more? Only on this host and namespace;
    elsewhere (or unknown) the heartbeat has to tell.
    """
    if not pidns or (host, pidns) != (_PROCESS[0], _PROCESS[2]) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


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
