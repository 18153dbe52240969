"""`OutboxAdmin`: look into an outbox and act on its changes, from code or the CLI.

Listings mask personal data (emails, phones, personal numbers, names, addresses) unless asked
with ``reveal=True``. Requeueing and discarding are the operator's tools for dead letters: a
dead change is never retried on its own, and never silently dropped. `OutboxAdmin.salvage`
copies what can still be read from a damaged outbox into a new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import attrs

from ._changes import Change, State
from ._clock import SYSTEM_CLOCK, Clock
from ._config import sqlite_path_of, url_without_password
from ._errors import ChangeNotFound
from ._keys import is_change_id
from ._outboxes import is_outbox_url, open_location
from ._redact import mask
from ._salvage import SalvageReport, salvage
from ._store import OutboxStore

__all__ = ["OutboxAdmin", "OutboxEntry", "OutboxStats", "SalvageReport"]

# Values under these names are not personal and stay readable in a masked listing.
_PLAIN = frozenset(
    {"contactType", "countryCode", "lang", "id", "source", "contactId", "storeExternalId"}
)


@attrs.frozen
class OutboxStats:
    """How many changes are in each state, and how the flushers stand.

    Attributes:
        by_state: count per state (pending, inflight, waiting_guid, done, dead).
        oldest_pending_age: seconds since the oldest change still waiting was accepted.
        paused_until: when the flushers' pause after an outage ends, if one is set.
        pause_reason: why they pause.
        batches_in_flight: bulk batches Engage accepted that are still being followed.
        waiting_for_api: creates that wait for the API because an XML import file cannot
            carry their options (source, store, unapproved).
    """

    by_state: Mapping[str, int]
    oldest_pending_age: float | None
    paused_until: datetime | None
    pause_reason: str | None = None
    batches_in_flight: int = 0
    waiting_for_api: int = 0


@attrs.frozen
class OutboxEntry:
    """One change in the outbox, masked unless revealed."""

    change_id: str
    operation: str
    state: str
    contact_key: str
    contact_type: str | None
    attempts: int
    last_error: str | None
    created_at: datetime
    contact_id: str | None = None
    ref: str | None = None
    error_code: str | None = None
    key: str | None = None
    body: Mapping[str, Any] | None = attrs.field(default=None, repr=False)
    exported_to: str | None = None
    batch_id: str | None = None


def _masked(value: Any, name: str = "") -> Any:
    if isinstance(value, Mapping):
        return {key: _masked(item, str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item, name) for item in value]
    if isinstance(value, str) and name not in _PLAIN:
        return mask(value)
    return value


def _entry(change: Change, *, reveal: bool) -> OutboxEntry:
    key = None
    if change.key_name and change.key_value:
        value = change.key_value if reveal else mask(change.key_value)
        key = f"{change.key_name}={value}"
    return OutboxEntry(
        change_id=change.change_id,
        operation=str(change.operation),
        state=str(change.state),
        contact_key=change.contact_key,
        contact_type=change.contact_type,
        attempts=change.attempts,
        last_error=change.last_error,
        created_at=datetime.fromtimestamp(change.created_at, UTC),
        contact_id=change.contact_id,
        ref=change.ref,
        error_code=change.error_code,
        key=key,
        body=change.body if reveal or change.body is None else _masked(change.body),
        exported_to=change.exported_to,
        batch_id=change.batch_id,
    )


def _path(value: object, name: str) -> Path:
    """`value` as a Path, or TypeError/ValueError naming the argument."""
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{name}: must be a str or os.PathLike, not {type(value).__name__}")
    if not os.fspath(value):
        raise ValueError(f"{name}: must not be empty")
    return Path(value)


def _change_id(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"change_id: must be a str, not {type(value).__name__}")
    if not is_change_id(value):
        # The value is not echoed: a pasted email must not reach a log.
        raise ValueError("change_id: not a change id (chg_ and 32 hex digits)")
    return value


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: must be a bool, not {type(value).__name__}")
    return value


class OutboxAdmin:
    """Inspect and manage the outbox at `outbox_path` (which must exist): a SQLite file's
    path, or an outbox URL (``sqlite:///path`` or ``postgresql://user@host:port/db``, whose
    outbox is in `schema`).

    Every coroutine works on its own: ``await OutboxAdmin(path).stats()`` opens the outbox,
    answers and closes it again. Inside ``async with OutboxAdmin(path) as admin:`` one
    connection serves every call until the block ends.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value (the message names it),
            here and in every coroutine.
    """

    def __init__(
        self,
        outbox_path: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
        schema: str = "engage_outbox",
    ) -> None:
        given = _path(outbox_path, "outbox_path")
        # A URL keeps its "//" (Path would fold it): kept as text, the path only for SQLite.
        url = is_outbox_url(os.fspath(outbox_path))
        self._location = os.fspath(outbox_path) if url else str(given)
        file = sqlite_path_of(self._location) if url else given
        #: The SQLite file, or None for a PostgreSQL outbox.
        self.path: Path | None = file
        if not isinstance(schema, str):
            raise TypeError(f"schema: must be a str, not {type(schema).__name__}")
        self._schema = schema
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float):
            raise TypeError(f"busy_timeout: must be a number, not {type(busy_timeout).__name__}")
        if not math.isfinite(busy_timeout) or busy_timeout < 0:
            raise ValueError("busy_timeout: must be a finite number of seconds, at least 0")
        self._busy_timeout = float(busy_timeout)
        self._clock = clock
        self._store: OutboxStore | None = None

    @property
    def location(self) -> str:
        """The outbox's path, or its URL without the password."""
        return str(self.path) if self.path is not None else url_without_password(self._location)

    def __repr__(self) -> str:
        return f"<OutboxAdmin {self.location}>"

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # Never raises and never touches the event loop: it may run at exit, or in any thread.
        if getattr(self, "_store", None) is not None:
            _warn(f"unclosed {self!r}: use `async with`", ResourceWarning, source=self)

    async def __aenter__(self) -> Self:
        if self._store is None:
            self._store = await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open(self) -> OutboxStore:
        return await open_location(
            self.path if self.path is not None else self._location,
            schema=self._schema,
            busy_timeout=self._busy_timeout,
            clock=self._clock,
        )

    @contextlib.asynccontextmanager
    async def _outbox(self) -> AsyncIterator[OutboxStore]:
        """The connection of the ``async with`` block, else one opened for this call alone."""
        if self._store is not None:
            yield self._store
            return
        store = await self._open()
        try:
            yield store
        finally:
            await store.close()

    async def close(self) -> None:
        """Close the connection an ``async with`` opened; safe to call at any time."""
        if self._store is not None:
            store, self._store = self._store, None
            await store.close()

    async def stats(self) -> OutboxStats:
        """Counts per state, the age of the oldest waiting change, and the flushers' pause."""
        async with self._outbox() as store:
            counts = await store.counts()
            waiting_for_api = await store.waiting_for_api()
        pause = counts.pause if counts.pause is not None and counts.pause.remaining > 0 else None
        return OutboxStats(
            by_state=counts.by_state,
            oldest_pending_age=counts.oldest_pending_age,
            paused_until=None if pause is None else datetime.fromtimestamp(pause.until, UTC),
            pause_reason=None if pause is None else pause.reason,
            batches_in_flight=counts.batches_in_flight,
            waiting_for_api=waiting_for_api,
        )

    async def list(
        self,
        state: str | None = None,
        limit: int = 100,
        key: str | None = None,
        *,
        reveal: bool = False,
    ) -> list[OutboxEntry]:
        """Changes, oldest first, optionally in one `state` and for one contact.

        `key` picks a contact by GUID, ref, or key value (an email, say, in any letter case):
        its create and every change queued for it.
        """
        if state is not None and not isinstance(state, str):
            raise TypeError(f"state: must be a str or None, not {type(state).__name__}")
        if state is not None and state not in {str(s) for s in State}:
            raise ValueError(f"state: must be one of {', '.join(str(s) for s in State)}")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit: must be an int, not {type(limit).__name__}")
        if limit < 1:
            raise ValueError("limit: must be at least 1")
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key: must be a str or None, not {type(key).__name__}")
        if key is not None and not key.strip():
            raise ValueError("key: must not be blank (None lists every contact)")
        reveal = _flag(reveal, "reveal")
        async with self._outbox() as store:
            changes = await store.list_changes(state=state, limit=limit, key=key)
        return [_entry(change, reveal=reveal) for change in changes]

    async def _change(self, store: OutboxStore, change_id: str) -> Change:
        change = await store.get_change(change_id)
        if change is None:
            raise ChangeNotFound(f"no change {change_id} in {self.location}")
        return change

    async def show(self, change_id: str, *, reveal: bool = False) -> OutboxEntry:
        """One change, with its body.

        Raises:
            ChangeNotFound: no change has that id.
        """
        change_id = _change_id(change_id)
        reveal = _flag(reveal, "reveal")
        async with self._outbox() as store:
            return _entry(await self._change(store, change_id), reveal=reveal)

    async def requeue(self, change_id: str) -> OutboxEntry:
        """Send a dead (or not yet due) change again as soon as a flusher runs.

        Requeueing a dead create also requeues the changes that died with it.

        Raises:
            ChangeNotFound: no change has that id.
            ValueError: it is done, or in flight.
        """
        change_id = _change_id(change_id)
        async with self._outbox() as store:
            change = await self._change(store, change_id)
            if change.state not in {State.DEAD, State.PENDING}:
                raise ValueError(f"change {change_id} is {change.state}; only dead or pending ones")
            await store.requeue(change)
            return _entry(await self._change(store, change_id), reveal=False)

    async def requeue_dead(self) -> int:
        """Requeue every dead change; how many."""
        async with self._outbox() as store:
            return await store.requeue_dead()

    async def discard(self, change_id: str, reason: str) -> OutboxEntry:
        """Give up on a waiting change: it is dead-lettered with `reason` and never sent.

        Discarding a create discards the changes waiting on its ref too.

        Raises:
            ChangeNotFound: no change has that id.
            ValueError: it is done or in flight, or `reason` is empty.
        """
        change_id = _change_id(change_id)
        if not isinstance(reason, str):
            raise TypeError(f"reason: must be a str, not {type(reason).__name__}")
        if not reason.strip():
            raise ValueError("reason: say why the change is discarded")
        async with self._outbox() as store:
            change = await self._change(store, change_id)
            if change.state not in {State.PENDING, State.WAITING_GUID, State.DEAD}:
                raise ValueError(f"change {change_id} is {change.state}; it cannot be discarded")
            await store.discard(change, reason)
            return _entry(await self._change(store, change_id), reveal=False)

    async def export(self, path: str | os.PathLike[str]) -> int:
        """Write every change not yet done to `path` as JSON lines (with personal data; the
        file is created readable by its owner only). Returns how many.

        Raises:
            ValueError: `path` is the outbox (or its -wal or -shm file).
        """
        target = _path(path, "path")
        if self.path is not None:
            outbox = self.path.resolve()
            own = {outbox, *(Path(f"{outbox}{end}") for end in ("-wal", "-shm"))}
            if target.resolve() in own:
                # Only SQLite may open the outbox's files (docs/decisions.md), let alone
                # truncate them.
                raise ValueError("path: is the outbox's own file; give another")
        async with self._outbox() as store:
            changes = await store.open_changes()
        fd = os.open(target, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        # O_CREAT's mode applies to a new file only; one that was there keeps its own.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for change in changes:
                record = attrs.asdict(_entry(change, reveal=True))
                record["created_at"] = record["created_at"].isoformat()
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return len(changes)

    async def salvage(self, new_path: str | os.PathLike[str]) -> SalvageReport:
        """Copy every change that can still be read from this outbox, which may be damaged,
        into a new outbox at `new_path`, with the identities, batches and pause it can read.

        Stop everything that uses the outbox first. The outbox is read by SQLite alone,
        read-only, and never through this admin's connection (a damaged outbox cannot be
        opened); a damaged page costs only the rows on it. The report says what was copied and
        what could not be read; point ``ENGAGE_OUTBOX`` at the new file to carry on.

        Raises:
            OutboxError: `new_path` exists, this outbox is missing or not an outbox, or not
                even its header can be read.
        """
        target = _path(new_path, "new_path")
        if self.path is None:
            raise ValueError("salvage copies a damaged SQLite outbox; this one is PostgreSQL")
        return await salvage(self.path, target, busy_timeout=self._busy_timeout)
