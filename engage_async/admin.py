"""`OutboxAdmin`: look into an outbox and act on its changes, from code or the CLI.

Listings mask personal data (emails, phones, personal numbers, names, addresses) unless asked
with ``reveal=True``. Requeueing and discarding are the operator's tools for dead letters: a
dead change is never retried on its own, and never silently dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import attrs

from ._changes import Change, State
from ._clock import SYSTEM_CLOCK, Clock
from ._errors import ChangeNotFound
from ._keys import is_change_id
from ._outbox import SqliteOutbox
from ._redact import mask
from ._store import OutboxStore

__all__ = ["OutboxAdmin", "OutboxEntry", "OutboxStats"]

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
    """

    by_state: Mapping[str, int]
    oldest_pending_age: float | None
    paused_until: datetime | None
    pause_reason: str | None = None
    batches_in_flight: int = 0


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


class OutboxAdmin:
    """Inspect and manage the outbox at `outbox_path` (which must exist).

    Use ``async with OutboxAdmin(path) as admin:``, or call the coroutines directly and
    `close` when done.
    """

    def __init__(
        self,
        outbox_path: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.path = Path(outbox_path)
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._store: OutboxStore | None = None

    def __repr__(self) -> str:
        return f"<OutboxAdmin {self.path}>"

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _open(self) -> OutboxStore:
        if self._store is None:
            self._store = await SqliteOutbox.open(
                self.path, busy_timeout=self._busy_timeout, create=False, clock=self._clock
            )
        return self._store

    async def close(self) -> None:
        """Close the outbox file."""
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def stats(self) -> OutboxStats:
        """Counts per state, the age of the oldest waiting change, and the flushers' pause."""
        store = await self._open()
        counts = await store.counts()
        pause = counts.pause if counts.pause is not None and counts.pause.remaining > 0 else None
        return OutboxStats(
            by_state=counts.by_state,
            oldest_pending_age=counts.oldest_pending_age,
            paused_until=None if pause is None else datetime.fromtimestamp(pause.until, UTC),
            pause_reason=None if pause is None else pause.reason,
            batches_in_flight=counts.batches_in_flight,
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
        if state is not None and state not in {str(s) for s in State}:
            raise ValueError(f"state: must be one of {', '.join(str(s) for s in State)}")
        if limit < 1:
            raise ValueError("limit: must be at least 1")
        store = await self._open()
        changes = await store.list_changes(state=state, limit=limit, key=key)
        return [_entry(change, reveal=reveal) for change in changes]

    async def _change(self, change_id: str) -> Change:
        store = await self._open()
        change = await store.get_change(change_id)
        if change is None:
            # Echo only what is shaped like a change id: a pasted email must not reach a log.
            shown = change_id if is_change_id(change_id) else "with that id"
            raise ChangeNotFound(f"no change {shown} in {self.path}")
        return change

    async def show(self, change_id: str, *, reveal: bool = False) -> OutboxEntry:
        """One change, with its body.

        Raises:
            ChangeNotFound: no change has that id.
        """
        return _entry(await self._change(change_id), reveal=reveal)

    async def requeue(self, change_id: str) -> OutboxEntry:
        """Send a dead (or not yet due) change again as soon as a flusher runs.

        Requeueing a dead create also requeues the changes that died with it.

        Raises:
            ChangeNotFound: no change has that id.
            ValueError: it is done, or in flight.
        """
        change = await self._change(change_id)
        if change.state not in {State.DEAD, State.PENDING}:
            raise ValueError(f"change {change_id} is {change.state}; only dead or pending ones")
        await (await self._open()).requeue(change)
        return await self.show(change_id)

    async def requeue_dead(self) -> int:
        """Requeue every dead change; how many."""
        return await (await self._open()).requeue_dead()

    async def discard(self, change_id: str, reason: str) -> OutboxEntry:
        """Give up on a waiting change: it is dead-lettered with `reason` and never sent.

        Discarding a create discards the changes waiting on its ref too.

        Raises:
            ChangeNotFound: no change has that id.
            ValueError: it is done or in flight, or `reason` is empty.
        """
        if not reason or not reason.strip():
            raise ValueError("reason: say why the change is discarded")
        change = await self._change(change_id)
        if change.state not in {State.PENDING, State.WAITING_GUID, State.DEAD}:
            raise ValueError(f"change {change_id} is {change.state}; it cannot be discarded")
        await (await self._open()).discard(change, reason)
        return await self.show(change_id)

    async def export(self, path: str | os.PathLike[str]) -> int:
        """Write every change not yet done to `path` as JSON lines (with personal data; the
        file is created readable by its owner only). Returns how many.
        """
        changes = await (await self._open()).open_changes()
        target = Path(path)
        fd = os.open(target, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        # O_CREAT's mode applies to a new file only; one that was there keeps its own.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for change in changes:
                record = attrs.asdict(_entry(change, reveal=True))
                record["created_at"] = record["created_at"].isoformat()
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return len(changes)
