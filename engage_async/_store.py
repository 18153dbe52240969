"""What an outbox must do, whatever keeps its rows: the storage interface.

The session, the flusher and the admin speak to an outbox only through `OutboxStore`: every
row transition (enqueue, claim, lease, release, settle, bury with dependents, revive, record a
GUID, prune, ...) is one method here, implemented once per backend. Times passed in are
durations; each backend turns them into due times with its own clock, so a backend whose
processes share one clock (a database server's) can use it.

Two backends implement it: SQLite (`_outbox.SqliteOutbox`, its SQL in `_rows`) for one host,
and PostgreSQL (`_pg_outbox.PgOutbox`, its SQL in `_pg_rows`) for several; `_outboxes`
opens the one an `outbox_url` names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import attrs

from ._changes import Batch, Change, NewChange, Operation, Queued

__all__ = ["Failures", "OutboxCounts", "OutboxStore", "Pause"]

# seq -> (Engage's error code, message): changes Engage rejected for good.
Failures = Mapping[int, tuple[str | None, str]]


@attrs.frozen
class Pause:
    """Every flusher holds off: until `until` (epoch, for people), `remaining` seconds from
    now, because of `reason`; `outages` in a row so far.
    """

    until: float
    remaining: float
    reason: str
    outages: int


@attrs.frozen
class OutboxCounts:
    """How an outbox stands, as the admin shows it."""

    by_state: Mapping[str, int]
    oldest_pending_age: float | None
    pause: Pause | None
    batches_in_flight: int


class OutboxStore(Protocol):
    """The rows of one outbox and every transition they go through."""

    @property
    def location(self) -> str:
        """Where the outbox is (a path, or a URL without its password), for messages."""
        ...

    async def close(self) -> None:
        """Commit what is waiting and close; safe to call twice."""
        ...

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake` when a change is enqueued (at least in this process); returns the undo."""
        ...

    # --- what the session does -------------------------------------------------------------

    async def enqueue(self, change: NewChange) -> Queued:
        """Commit `change`, merged with what waits for the same contact."""
        ...

    async def has_active(self, contact_key: str) -> bool:
        """Do changes to this contact still wait (pending, in flight or awaiting a GUID)?"""
        ...

    async def queued_create(
        self, key_name: str, key_value: str, contact_type: str
    ) -> tuple[str, str] | None:
        """(change_id, ref) of a create still waiting for this key and type, if any."""
        ...

    async def create_of(self, ref: str) -> Change | None:
        """The create that made `ref`, in any state, or None if this outbox never saw it."""
        ...

    async def identity(self, key: str, *, max_age: float | None = None) -> str | None:
        """The GUID recorded for `key`, if recorded less than `max_age` seconds ago."""
        ...

    async def remember(self, keys: Iterable[str], contact_id: str) -> None:
        """Record that every key names `contact_id`; committed before returning."""
        ...

    def remember_later(self, key: str, contact_id: str) -> None:
        """Cache a lookup result; written soon (losing it to a crash costs a lookup)."""
        ...

    def remember_type_later(self, contact_id: str, contact_type: str) -> None:
        """Note the contact type Engage showed for a contact; written soon (losing it costs
        only a bulk update that then goes alone).
        """
        ...

    async def record_guid(self, seq: int, contact_id: str) -> None:
        """The create at `seq` exists as `contact_id`: finish it, record its ref and key, and
        point the changes waiting on its ref at the GUID.
        """
        ...

    # --- what a flusher does (`owner` names the flusher) -------------------------------------

    async def register(self, owner: str) -> None:
        """A flusher named `owner` starts; from now on its heartbeat is watched."""
        ...

    async def unregister(self, owner: str) -> None:
        """The flusher `owner` stops for good, having given back what it held."""
        ...

    async def recover_expired(self, owner: str, *, lease_seconds: float) -> int:
        """Give back rows and batches of flushers (other than `owner`) that stopped renewing
        for `lease_seconds`, as this process observed it; how many rows came back.
        """
        ...

    async def claim(self, owner: str, *, limit: int, lease_seconds: float) -> list[Change]:
        """Lease up to `limit` due changes, each the head of its contact's chain, oldest first.

        A claimed create is marked "look up first" (it may be on the wire when this flusher
        dies); the returned rows show the mark as it was before the claim.
        """
        ...

    async def renew(self, owner: str, lease_seconds: float) -> None:
        """`owner` is alive: its heartbeat moves on, and its leases with it."""
        ...

    async def about_to_send(self, owner: str, seqs: Iterable[int]) -> None:
        """`owner` is about to send these creates (one commit for the group): if it vanishes
        with a request out, each is looked up before it is sent again.
        """
        ...

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
        """Give claimed rows back as pending, due again in `delay` seconds; `maybe_sent`: their
        request may have reached Engage (a create marked about to be sent is then looked up
        before it is sent again), else it provably never left.
        """
        ...

    async def finish(self, seqs: Iterable[int]) -> None:
        """Rows Engage applied: done."""
        ...

    async def bury(self, failures: Failures) -> int:
        """Dead-letter rows Engage rejected for good, with the changes waiting on a dead
        create; how many rows died.
        """
        ...

    async def create_became_update(
        self, change: Change, contact_id: str, body: Mapping[str, Any]
    ) -> None:
        """A create found its contact already there and must still apply `body` to it: the
        row becomes an update of that GUID, keeping its place in the chain.
        """
        ...

    async def submit_batch(
        self,
        batch_id: str,
        kind: Operation,
        contact_type: str | None,
        seqs: Sequence[int],
        *,
        first_poll: float,
    ) -> None:
        """Engage accepted a bulk request: record the batch (first poll in `first_poll`
        seconds) and tie its rows to it.
        """
        ...

    async def claim_batches(self, owner: str, *, limit: int, lease_seconds: float) -> list[Batch]:
        """Lease batches due for a status poll."""
        ...

    async def batch_rows(self, batch_id: str) -> list[Change]:
        """The changes sent in a batch, in the order they were sent."""
        ...

    async def poll_batch_later(self, batch_id: str, *, delay: float, status: Any) -> None:
        """The batch still runs: keep its latest status, poll again in `delay` seconds."""
        ...

    async def unlease_batches(self, owner: str, batch_ids: Sequence[str]) -> None:
        """Give back batches `owner` could not poll, as they were."""
        ...

    async def settle_batch(
        self,
        batch_id: str,
        status: Any,
        *,
        failed: Failures,
        resend: Iterable[int],
        created: Mapping[int, str] | None = None,
    ) -> tuple[int, int]:
        """A batch finished: bury `failed`, send `resend` again alone (creates looked up
        first), record the GUIDs the status told (`created`: seq -> GUID), and of the rest,
        creates wait for their GUID and updates are done; (rows applied, rows dead).
        """
        ...

    async def next_batch_poll(self) -> float | None:
        """Seconds until a batch in flight is due for a poll (or its lease runs out), or None
        when no batch is in flight.
        """
        ...

    async def claim_waiting(self, owner: str, *, limit: int, lease_seconds: float) -> list[Change]:
        """Lease creates due for a GUID lookup, those other changes wait on first."""
        ...

    async def not_found_yet(self, seq: int, *, delay: float, count: bool = True) -> None:
        """A waiting create is not on Engage yet: look again in `delay` seconds (`count`
        False when the lookup got no answer).
        """
        ...

    async def create_again(self, seq: int, reason: str) -> None:
        """A create Engage never showed: send it again (looked up first; an attempt)."""
        ...

    async def exported(self, done: Iterable[int], waiting: Iterable[int], path: str) -> None:
        """Rows written to an XML file: `done` (updates) are done, `waiting` (creates) wait
        for their GUID.
        """
        ...

    async def pause(self) -> Pause | None:
        """The pause every flusher obeys, if one is set (it may have run out)."""
        ...

    async def set_pause(
        self, *, delay: float, reason: str, outages: int, expected_outages: int | None = None
    ) -> bool:
        """Make every flusher hold off for `delay` seconds, `outages` now counted; when
        `expected_outages` is given, only if that many were counted so far (so several
        flushers failing after one probe escalate the pause once). Whether it did.
        """
        ...

    async def clear_pause(self) -> None:
        """Engage answers again: lift the pause and reset the outage count."""
        ...

    async def unfinished_count(self) -> int:
        """How many changes are pending, in flight or waiting for a GUID."""
        ...

    async def due_count(self, *, at_most: int) -> int:
        """How many pending changes are due now, counting no further than `at_most`."""
        ...

    async def prune(self, *, older_than: float) -> int:
        """Delete done changes and finished batches older than `older_than` seconds."""
        ...

    # --- what the admin does -----------------------------------------------------------------

    async def counts(self) -> OutboxCounts:
        """Counts per state, the oldest waiting change's age, the pause, batches in flight."""
        ...

    async def list_changes(self, *, state: str | None, limit: int, key: str | None) -> list[Change]:
        """Changes oldest first, in one `state` and for one contact (a GUID, a ref or a key
        value) when given.
        """
        ...

    async def get_change(self, change_id: str) -> Change | None:
        """One change by its id."""
        ...

    async def requeue(self, change: Change) -> None:
        """Make a dead or pending change due now, with its attempts reset; a dead create's
        dependents come back with it.
        """
        ...

    async def requeue_dead(self) -> int:
        """Requeue every dead change; how many."""
        ...

    async def discard(self, change: Change, reason: str) -> None:
        """Dead-letter a waiting change on purpose; a create takes its dependents along."""
        ...

    async def open_changes(self) -> list[Change]:
        """Every change not yet done, oldest first."""
        ...

    # --- XML files, planned before they are written (what a flusher's XML step does) --------

    async def plan_export(
        self, owner: str, seqs: Sequence[int], path: str, digest: str
    ) -> Literal["planned", "taken", "lost"]:
        """Commit that `owner`'s rows `seqs` go into the XML file `path`, whose bytes `digest`
        names, before it is written; the rows are parked (in flight, no lease) until
        `finish_export`. "taken": another open plan has that name; "lost": `owner` no longer
        holds every row (nothing changed).
        """
        ...

    async def replan_export(self, path: str, new_path: str, digest: str) -> bool:
        """Move the plan `path` to `new_path` (the name was taken on disk), or give it new
        bytes under the same path; False when another open plan has `new_path`.
        """
        ...

    async def stale_exports(self, *, older_than: float) -> list[tuple[str, str]]:
        """(path, digest) of the plans made more than `older_than` seconds ago: their flusher
        died before recording them, or is very slow.
        """
        ...

    async def export_rows(self, path: str) -> list[Change]:
        """The rows still parked in the plan `path`, in seq order."""
        ...

    async def finish_export(self, path: str, written: str) -> int:
        """The plan `path` is on disk as `written`: updates done, creates waiting for their
        GUID, the plan gone; how many rows (0 when it was finished already).
        """
        ...

    async def wait_for_api(
        self, owner: str, seqs: Iterable[int], *, delay: float, reason: str
    ) -> None:
        """Claimed creates an XML file cannot carry: pending again in `delay` seconds, marked
        as waiting for the API with `reason` (not dead, not exported).
        """
        ...

    async def waiting_for_api(self) -> int:
        """How many pending changes wait for the API because an XML file cannot carry them."""
        ...
