"""`OutboxFlusher`: replays the outbox into Engage, in a web app's event loop or as a sidecar.

One flush works in steps until nothing is due:

1. Batches Engage accepted earlier are polled (growing intervals); when one finishes, the
   items it reports as failed are dead-lettered one by one, its updates are done, and its
   creates wait for their GUID.
2. Creates waiting for a GUID are looked up by key, those other changes wait on first; a
   GUID found is recorded and the changes waiting on the create's ref are released.
3. Due changes are leased and sent: creates are looked up first when marked (or always, when
   claimed again after a crash), then go through ``POST /contacts/bulk`` per contact type,
   updates through ``PATCH /contacts/bulk``, contact-type changes one by one. A small backlog,
   and changes a bulk request could not settle, use the single endpoints instead. In XML mode,
   or once Engage refuses the bulk API for good, creates and updates go to XML import files.

No answer, a 5xx or a 429 pauses every flusher on the file (the pause is stored in the
outbox) without counting against any change. A 5xx counts against a change only when
Engage took other writes in the same step (lookups answering prove nothing about writes), so
one poisonous change is isolated while an outage is not; a change already isolated that
fails alone counts it too, so it ends dead instead of pausing everyone for ever. Rejections
(400, 404, 422) dead-letter the change with Engage's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, NoReturn, Self

import attrs

from . import _http, _xmlfiles
from ._changes import Change, Operation
from ._config import EngageConfig
from ._errors import (
    ContactNotFound,
    EngageAuthError,
    EngageConflict,
    EngageHTTPError,
    EngageServerError,
    EngageUnavailable,
    EngageValidationError,
    InvalidRequest,
    MultipleMatches,
    OutboxError,
    RateLimited,
    UnexpectedResponse,
)
from ._keys import contact_key, lookup_parameter
from ._models import FlushReport
from ._outbox import Outbox
from ._redact import scrub
from ._replay_queue import ReplayQueue
from ._retry import background_delay
from ._transport import Transport
from ._wire import contact_id_from_engage

__all__ = ["OutboxFlusher"]

log = logging.getLogger(__name__)

# In a step with no answer from Engage yet, this many 5xx in a row mean an outage, not a
# poisonous change.
_SERVER_ERRORS_FOR_OUTAGE = 3
_BATCHES_PER_STEP = 16
_LOOKUPS_PER_STEP = 50
_PRUNE_EVERY = 3600.0


class _Outage(Exception):
    """Engage cannot take work right now; every flusher pauses."""

    def __init__(
        self,
        reason: str,
        retry_after: float | None = None,
        *,
        refused_key: EngageAuthError | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        # Engage refused the API key: no waiting fixes that, so flush_once says so.
        self.refused_key = refused_key


@attrs.define
class _Tally:
    """The counts of one flush, filled in as it goes."""

    sent: int = 0
    created: int = 0
    updated: int = 0
    reconciled: int = 0
    dead: int = 0
    exported: int = 0
    # Engage took a write (applied it, or rejected it for a reason of its own) in this step.
    # Lookups do not count: during a write outage GETs may still be answered.
    served: bool = False
    answered: bool = False  # Engage answered any call in this step
    # The due backlog reached bulk_threshold: the bulk endpoints are used until it is drained,
    # the last few changes included. Changes that become due later (released after a GUID
    # was found) are a new backlog, judged on their own.
    bulk: bool = False

    def report(self, pending: int) -> FlushReport:
        return FlushReport(
            sent=self.sent,
            created=self.created,
            updated=self.updated,
            reconciled=self.reconciled,
            dead=self.dead,
            exported=self.exported,
            pending=pending,
        )


class OutboxFlusher:
    """Drains an outbox into Engage.

    In a web app::

        async with ea.OutboxFlusher(config) as flusher:
            flusher.start()      # runs in the background until the block ends
            ...

    or ``await flusher.run()`` as a task, or ``await flusher.flush_once()`` to drain what is due
    and get a `FlushReport`. As a sidecar process: ``engage-async flush``.
    """

    def __init__(self, config: EngageConfig, *, http: Any = None) -> None:
        if not isinstance(config, EngageConfig):
            raise TypeError("config: must be an EngageConfig")
        self.config = config
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._transport = Transport(config, http)
        self._root = config.api_root
        self._outbox: Outbox | None = None
        self._queue: ReplayQueue | None = None
        self._state: Literal["new", "open", "closed"] = "new"
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._held: set[int] = set()
        self._flushing = asyncio.Lock()
        # Once Engage refuses the bulk API for good (403/404), this flusher writes XML.
        self._bulk_refused = False
        # After a bulk request failed with a 5xx, send the next step's changes one by one, so
        # a poisonous change shows itself instead of failing every batch it is in.
        self._single_next = False
        self._last_prune = 0.0

    def __repr__(self) -> str:
        return f"<OutboxFlusher {self.owner} {self._state}>"

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the outbox and the HTTP session.

        Raises:
            RuntimeError: opened before.
            OutboxError: the outbox file cannot be used.
        """
        if self._state != "new":
            raise RuntimeError(f"this OutboxFlusher is {self._state}; make a new one")
        self._outbox = await Outbox.open(
            self.config.outbox_path,
            busy_timeout=self.config.busy_timeout,
            durability=self.config.durability,
        )
        self._queue = ReplayQueue(self._outbox, self.owner)
        self._unsubscribe = self._outbox.subscribe(self._wake.set)
        self._transport.open()
        self._state = "open"

    async def close(self) -> None:
        """Stop a background run, give back what this flusher holds, close. Idempotent."""
        if self._state == "closed":
            return
        self.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._state = "closed"
        try:
            if self._unsubscribe is not None:
                self._unsubscribe()
            if self._outbox is not None:
                await self._outbox.close()
        finally:
            await self._transport.close()

    def start(self) -> asyncio.Task[None]:
        """Run in the background until `stop` or `close` (``async with`` ends it too)."""
        self._ready()
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self.run(), name=f"engage-flusher {self.owner}")
        return self._task

    def stop(self) -> None:
        """Ask `run` to return after the step in progress (a batch on the wire is finished)."""
        self._stopping = True
        self._wake.set()

    def _ready(self) -> ReplayQueue:
        if self._state != "open" or self._queue is None:
            what = "not open yet (use `async with`)" if self._state == "new" else "closed"
            raise RuntimeError(f"this OutboxFlusher is {what}")
        return self._queue

    # --- running ---------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        """Flush whenever something is due, until `stop`, cancellation, or (with
        `handle_signals`) SIGTERM or SIGINT. Opens and closes the flusher if it was not open.
        """
        opened_here = self._state == "new"
        if opened_here:
            await self.open()
        self._ready()
        self._stopping = False
        restore = self._handle_signals() if handle_signals else None
        try:
            while not self._stopping:
                wait = self.config.poll_interval
                # Cleared before the flush, so an enqueue during it wakes the next one.
                self._wake.clear()
                try:
                    await self.flush_once(wait_for_batches=False)
                    await self._prune_now_and_then()
                except OutboxError as exc:
                    log.error("outbox unavailable, retrying: %s", exc)  # noqa: TRY400
                    wait = max(wait, self.config.background_delays[0])
                except EngageAuthError as exc:
                    # The pause is recorded; keep running so a fixed key (or Engage's own
                    # fix) is picked up without a restart.
                    log.error("Engage refused the API key, pausing: %s", exc)  # noqa: TRY400
                    wait = max(wait, self.config.background_delays[-1])
                except Exception:
                    # A flusher running beside an app must not die quietly on one bad step;
                    # the rows it held were given back, so try again after a while.
                    log.exception("flush failed; retrying")
                    wait = max(wait, self.config.background_delays[0])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            if restore is not None:
                restore()
            if opened_here:
                await self.close()

    def _handle_signals(self) -> Callable[[], None] | None:
        loop = asyncio.get_running_loop()
        installed = []
        for number in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(number, self.stop)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or a platform without them
            installed.append(number)

        def restore() -> None:
            for number in installed:
                loop.remove_signal_handler(number)

        return restore

    async def _prune_now_and_then(self) -> None:
        now = time.monotonic()
        if self.config.keep_done <= 0 or now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        queue = self._ready()
        pruned = await queue.prune(queue.outbox.clock() - self.config.keep_done)
        if pruned:
            log.info("pruned %d delivered changes older than %.0f s", pruned, self.config.keep_done)

    async def flush_once(
        self,
        *,
        wait_for_batches: bool = True,
        on_progress: Callable[[FlushReport], None] | None = None,
    ) -> FlushReport:
        """Send what is due now, and return what happened.

        With `wait_for_batches`, also waits for the bulk batches in flight to finish (polling
        at growing intervals) so their outcome is in the report. Returns early while every
        flusher is paused after an outage.

        Raises:
            OutboxError: the outbox cannot be read or written.
            EngageAuthError: Engage refused the API key (every flusher pauses; nothing is
                counted against any change).
        """
        queue = self._ready()
        tally = _Tally()
        async with self._flushing:
            keeper = asyncio.create_task(self._keep_leases())
            try:
                await queue.recover_expired()
                while not self._stopping:
                    if await self._paused():
                        break
                    tally.served = tally.answered = False
                    try:
                        worked = await self._step(tally)
                    except _Outage as outage:
                        await self._pause_all(outage)
                        if outage.refused_key is not None:
                            raise outage.refused_key from None
                        break
                    except UnexpectedResponse as exc:
                        # An answer we cannot read would be the same next second: wait as
                        # after an outage, so the retries follow the long schedule.
                        await self._pause_all(_Outage(str(exc)))
                        break
                    if worked:
                        if on_progress is not None:
                            on_progress(tally.report(await self._pending()))
                        continue
                    wait = await self._next_batch_poll() if wait_for_batches else None
                    if wait is None:
                        break
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
            finally:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
                await asyncio.shield(self._release_held())
        return tally.report(await self._pending())

    async def _pending(self) -> int:
        return await self._ready().unfinished_count()

    async def _keep_leases(self) -> None:
        queue = self._ready()
        interval = self.config.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await queue.renew(self.config.lease_seconds)
            except OutboxError as exc:
                log.warning("could not renew leases: %s", exc)

    async def _release_held(self) -> None:
        """Give back rows claimed but not settled (stopped or cancelled mid-step)."""
        if not self._held:
            return
        held, self._held = list(self._held), set()
        with contextlib.suppress(OutboxError):
            await self._ready().release(held, not_before=self._now())

    def _now(self) -> float:
        return self._ready().outbox.clock()

    async def _paused(self) -> bool:
        pause = await self._ready().pause()
        return pause is not None and pause.until > self._now()

    async def _pause_all(self, outage: _Outage) -> None:
        queue = self._ready()
        await self._release_held()
        previous = await queue.pause()
        outages = (previous.outages if previous else 0) + 1
        delay = background_delay(self.config.background_delays, outages - 1)
        if outage.retry_after is not None:
            delay = max(delay, outage.retry_after)
        await queue.set_pause(self._now() + delay, outage.reason, outages)
        log.warning("Engage unavailable (%s): all flushers pause %.1f s", outage.reason, delay)

    async def _engage_answered(self, tally: _Tally, *, write: bool) -> None:
        if write:
            tally.served = True
        if tally.answered:
            return
        tally.answered = True
        pause = await self._ready().pause()
        if pause is not None:
            await self._ready().clear_pause()

    async def _next_batch_poll(self) -> float | None:
        """Seconds until a batch in flight is due for a poll, or None if none is in flight.

        A batch leased by another flusher is due when that lease runs out (if its owner died,
        this flusher takes it over then).
        """

        def work(conn: Any) -> float | None:
            row = conn.execute(
                "SELECT min(max(next_poll_at, coalesce(lease_until, 0))) FROM batches "
                "WHERE state = 'submitted'"
            ).fetchone()
            return None if row[0] is None else float(row[0])

        due: float | None = await self._ready().outbox.read(work)
        if due is None:
            return None
        return max(0.0, due - self._now())

    # --- one step ----------------------------------------------------------------------------

    async def _step(self, tally: _Tally) -> bool:
        worked = await self._poll_batches(tally)
        worked = await self._reconcile(tally) or worked
        queue = self._ready()
        claimed = await queue.claim(
            limit=self.config.bulk_max_items, lease_seconds=self.config.lease_seconds
        )
        if claimed:
            self._held.update(change.seq for change in claimed)
            threshold = self.config.bulk_threshold
            if not tally.bulk:
                backlog = len(claimed)
                if backlog < threshold:
                    backlog += await queue.due_count(at_most=threshold)
                tally.bulk = backlog >= threshold
            await self._replay(claimed, tally)
            worked = True
        else:
            tally.bulk = False
        return worked

    async def _request(self, call: _http.Call, tally: _Tally, *, write: bool = False) -> Any:
        """One background call: a single attempt with the long timeout; errors typed."""
        try:
            status, headers, body = await self._transport.send(call, self.config.request_timeout)
        except EngageUnavailable as exc:
            raise _Outage(str(exc)) from exc
        answer = _http.read_response(call, status, headers, body)
        await self._engage_answered(tally, write=write)
        return answer

    def _outage_for(self, exc: EngageHTTPError) -> _Outage:
        """An error answer that says "not now" rather than "not this"."""
        if isinstance(exc, RateLimited):
            return _Outage(str(exc), exc.retry_after)
        if isinstance(exc, EngageAuthError):
            # A configuration problem: wait long, someone has to fix the key.
            return _Outage(str(exc), self.config.background_delays[-1], refused_key=exc)
        return _Outage(str(exc))

    # --- settling rows -------------------------------------------------------------------------

    async def _finish(self, changes: Iterable[Change]) -> None:
        seqs = [change.seq for change in changes]
        await self._ready().finish(seqs)
        self._held.difference_update(seqs)

    async def _bury(self, failures: Mapping[int, tuple[str | None, str]], tally: _Tally) -> None:
        if not failures:
            return
        tally.dead += await self._ready().bury(failures)
        self._held.difference_update(failures)
        log.warning("dead-lettered %d change(s): %s", len(failures), _codes(failures))

    async def _release(
        self,
        changes: Sequence[Change],
        *,
        delay: float = 0.0,
        count_attempt: bool = False,
        error: str | None = None,
        send_alone: bool = False,
    ) -> None:
        seqs = [change.seq for change in changes]
        await self._ready().release(
            seqs,
            not_before=self._now() + delay,
            count_attempt=count_attempt,
            error=error,
            send_alone=send_alone,
        )
        self._held.difference_update(seqs)

    async def _created(self, change: Change, contact_id: str) -> None:
        await self._ready().record_guid(change.seq, contact_id)
        self._held.discard(change.seq)

    # --- replaying claimed changes ------------------------------------------------------------

    async def _replay(self, claimed: list[Change], tally: _Tally) -> None:
        orphans = {
            c.seq: ("CreateGone", "the create of its ref is no longer waiting")
            for c in claimed
            if c.contact_id is None and c.operation is not Operation.CREATE
        }
        await self._bury(orphans, tally)
        live = [c for c in claimed if c.seq not in orphans]
        creates = [c for c in live if c.operation is Operation.CREATE]
        updates = [c for c in live if c.operation is Operation.UPDATE]
        type_changes = [
            c for c in live if c.operation in {Operation.CONTACT_TYPE, Operation.PROMOTE}
        ]
        to_create, became_updates = await self._look_up_creates(creates, tally)
        updates += became_updates
        if self.config.fallback_mode == "xml" or self._bulk_refused:
            # XML files are the only way writes leave: a contact-type change has no place in an
            # import file, so it waits in the dead letters for someone to requeue it.
            await self._bury(
                {
                    c.seq: ("NotInXml", "a contact-type change cannot be sent as an XML import")
                    for c in type_changes
                },
                tally,
            )
            await self._export(to_create, updates, tally)
            return
        small = not tally.bulk or self._single_next
        self._single_next = False

        def alone(change: Change) -> bool:
            # The bulk API takes no create options (source, store), so those go one by one.
            return small or change.send_alone or bool(change.query)

        singles = [c for c in (*to_create, *updates) if alone(c)] + type_changes
        await self._send_singly(singles, tally)
        await self._send_bulk(Operation.CREATE, [c for c in to_create if not alone(c)], tally)
        await self._send_bulk(Operation.UPDATE, [c for c in updates if not alone(c)], tally)

    async def _lookup(self, change: Change, tally: _Tally) -> str | None:
        """The GUID of the contact a create is about, by its key; None if not on Engage."""
        if not change.key_name or not change.key_value:
            return None
        identifiers = {lookup_parameter(change.key_name): change.key_value}
        if change.contact_type:
            identifiers["contactType"] = change.contact_type
        call = _http.contact_id_lookup(self._root, identifiers)
        try:
            data = await self._request(call, tally)
        except ContactNotFound:
            await self._engage_answered(tally, write=False)
            return None
        except (EngageServerError, RateLimited, EngageAuthError) as exc:
            raise self._outage_for(exc) from exc
        return contact_id_from_engage(_http.read_contact_id(data))

    async def _look_up_creates(
        self, creates: list[Change], tally: _Tally
    ) -> tuple[list[Change], list[Change]]:
        """Split creates into those to send and those that turned into updates.

        A create marked "look up first" whose contact exists is finished (its GUID recorded)
        or, when it must still change the contact, becomes an update of it.
        """
        to_create: list[Change] = []
        became_updates: list[Change] = []
        for change in creates:
            if not change.lookup_first:
                to_create.append(change)
                continue
            try:
                found = await self._lookup(change, tally)
            except MultipleMatches as exc:
                await self._bury({change.seq: _multiple(exc)}, tally)
                continue
            except EngageHTTPError as exc:
                await self._bury({change.seq: (exc.error_code, str(exc))}, tally)
                continue
            if found is None:
                to_create.append(change)
                continue
            update = await self._existing(change, found, tally)
            if update is not None:
                became_updates.append(update)
        return to_create, became_updates

    async def _existing(self, change: Change, contact_id: str, tally: _Tally) -> Change | None:
        """The create's contact is already on Engage: finish it, or return the update to send.

        ``if_exists="update"`` applies the whole create as an update; otherwise only what later
        calls folded into the create.
        """
        body: dict[str, Any] | None = None
        if change.if_exists == "update" and change.body:
            body = {k: v for k, v in change.body.items() if k != "contactType"}
        elif change.folded:
            body = dict(change.folded)
        if not body:
            await self._created(change, contact_id)
            tally.reconciled += 1
            return None
        await self._ready().create_became_update(change, contact_id, body)
        tally.reconciled += 1
        return attrs.evolve(
            change,
            operation=Operation.UPDATE,
            contact_id=contact_id,
            contact_key=contact_key(contact_id=contact_id),
            body=body,
            folded=None,
            lookup_first=False,
        )

    def _single_call(self, change: Change) -> _http.Call:
        body = _http.encode_json(change.body) if change.body is not None else b"{}"
        version = self.config.api_version
        guid = change.contact_id or ""
        if change.operation is Operation.CREATE:
            query = change.query
            return _http.create_contact(
                self._root,
                version,
                body,
                source=query.get("source"),
                store_external_id=query.get("storeExternalId"),
                create_as_unapproved=query.get("createAsUnapproved") == "true",
            )
        if change.operation is Operation.UPDATE:
            return _http.update_contact(self._root, version, guid, body)
        if change.operation is Operation.PROMOTE:
            return _http.promote_to_member(self._root, version, guid)
        return _http.update_contact_type(self._root, guid, change.contact_type or "")

    async def _send_singly(self, changes: list[Change], tally: _Tally) -> None:
        """Send changes one by one through the single endpoints."""
        server_failures: list[tuple[Change, EngageServerError]] = []
        for change in changes:
            try:
                data = await self._request(self._single_call(change), tally, write=True)
            except EngageServerError as exc:
                server_failures.append((change, exc))
                if not tally.served and len(server_failures) >= _SERVER_ERRORS_FOR_OUTAGE:
                    await self._outage_after(server_failures, tally)
                continue
            except (RateLimited, EngageAuthError) as exc:
                raise self._outage_for(exc) from exc
            except EngageHTTPError as exc:
                await self._rejected(change, exc, tally)
                continue
            tally.sent += 1
            await self._applied(change, data, tally)
        if server_failures:
            if not tally.served:
                await self._outage_after(server_failures, tally)
            await self._count_server_failures(server_failures, tally)

    async def _applied(self, change: Change, data: Any, tally: _Tally) -> None:
        if change.operation is Operation.CREATE:
            await self._created(change, contact_id_from_engage(_http.read_contact_id(data)))
            tally.created += 1
        else:
            await self._finish([change])
            tally.updated += 1

    async def _rejected(self, change: Change, exc: EngageHTTPError, tally: _Tally) -> None:
        """Engage answered no to one change: decide between dead, waiting, and existing."""
        await self._engage_answered(tally, write=True)
        code = exc.error_code
        if change.operation is Operation.CREATE:
            if isinstance(exc, EngageConflict) and code == "ApprovedContactWithKeyExists":
                found = await self._lookup(change, tally)
                if found is not None:
                    update = await self._existing(change, found, tally)
                    if update is not None:
                        await self._send_singly([update], tally)
                    return
            if isinstance(exc, EngageConflict) and code == "ContactWithKeyIsBeingCreated":
                # Someone's create is in progress; it is marked to be looked up next time.
                await self._release([change], delay=self.config.background_delays[0])
                return
        if exc.status == 404 and not isinstance(exc, ContactNotFound):
            # The endpoint itself is missing: not this change's fault.
            raise _Outage(str(exc), self.config.background_delays[-1])
        if isinstance(exc, MultipleMatches):
            await self._bury({change.seq: _multiple(exc)}, tally)
            return
        await self._bury({change.seq: (code or f"HTTP{exc.status}", str(exc))}, tally)

    async def _outage_after(
        self, failures: list[tuple[Change, EngageServerError]], tally: _Tally
    ) -> NoReturn:
        """No write was taken in this step: the 5xx mean an outage, and every flusher pauses.

        Only changes already suspected of being poison (they had a 5xx while Engage took other
        writes, and are now sent alone) count it: a lone poisonous change looks exactly like an
        outage, and without this it would pause every flusher for ever instead of ending dead.
        """
        suspects = [(c, exc) for c, exc in failures if c.send_alone and c.attempts > 0]
        await self._count_server_failures(suspects, tally)
        raise _Outage(str(failures[-1][1]))

    async def _count_server_failures(
        self, failures: list[tuple[Change, EngageServerError]], tally: _Tally
    ) -> None:
        """Engage took other writes, so these 5xx count against their changes.

        Except a 504 ``RequestTimeOut``: Engage rolled the change back because it was slow,
        which says nothing against the change.
        """
        dead: dict[int, tuple[str | None, str]] = {}
        for change, exc in failures:
            if exc.status == 504:
                await self._release([change], delay=self.config.background_delays[0])
                continue
            if change.attempts + 1 >= self.config.max_attempts:
                dead[change.seq] = (exc.error_code or f"HTTP{exc.status}", str(exc))
            else:
                await self._release(
                    [change],
                    delay=background_delay(self.config.background_delays, change.attempts),
                    count_attempt=True,
                    error=str(exc),
                    send_alone=True,
                )
        await self._bury(dead, tally)

    async def _send_bulk(self, kind: Operation, changes: list[Change], tally: _Tally) -> None:
        """Send creates (grouped by contact type) or updates through the bulk endpoint."""
        if not changes:
            return

        def contact_type(change: Change) -> str:
            return change.contact_type or self.config.default_contact_type

        groups = (
            itertools.groupby(sorted(changes, key=contact_type), key=contact_type)
            if kind is Operation.CREATE
            else [(None, iter(changes))]
        )
        for group_type, group in groups:
            members = list(group)
            for start in range(0, len(members), self.config.bulk_max_items):
                chunk = members[start : start + self.config.bulk_max_items]
                await self._send_chunk(kind, group_type, chunk, tally)

    async def _send_chunk(
        self, kind: Operation, contact_type: str | None, chunk: list[Change], tally: _Tally
    ) -> None:
        if self._bulk_refused:  # by Engage, for an earlier chunk of this step
            creates = chunk if kind is Operation.CREATE else []
            await self._export(creates, [] if creates else chunk, tally)
            return
        if kind is Operation.CREATE:
            items = [{k: v for k, v in (c.body or {}).items() if k != "contactType"} for c in chunk]
            call = _http.bulk_create(self._root, contact_type or "", _http.encode_json(items))
        else:
            items = [{**(c.body or {}), "contactId": c.contact_id} for c in chunk]
            call = _http.bulk_update(self._root, _http.encode_json(items))
        try:
            data = await self._request(call, tally, write=True)
        except _Outage:
            self._single_next = True
            raise
        except EngageServerError as exc:
            self._single_next = True
            raise _Outage(str(exc)) from exc
        except (InvalidRequest, EngageValidationError) as exc:
            # The request as a whole was refused: one by one, each change gets its own answer.
            log.warning(
                "bulk request refused (%s); sending %d change(s) one by one", exc, len(chunk)
            )
            await self._release(chunk, send_alone=True)
            return
        except EngageHTTPError as exc:
            if exc.status in {403, 404}:
                log.warning("Engage refuses the bulk API (%s); writing XML files instead", exc)
                self._bulk_refused = True
                creates = chunk if kind is Operation.CREATE else []
                updates = chunk if kind is Operation.UPDATE else []
                await self._export(creates, updates, tally)
                return
            raise self._outage_for(exc) from exc
        batch_id = _http.read_batch_id(data)
        if batch_id is None:
            # Accepted, but with nothing to follow: the changes' fate is unknown, so each is
            # sent again on its own (creates are looked up first).
            await self._release(chunk, send_alone=True, error="bulk answer held no batch id")
            return
        seqs = [c.seq for c in chunk]
        await self._ready().submitted(
            batch_id,
            kind,
            contact_type,
            seqs,
            first_poll=self._now() + self.config.batch_poll_initial,
        )
        self._held.difference_update(seqs)
        tally.sent += len(chunk)
        log.info("batch %s submitted: %d %s(s)", batch_id, len(chunk), kind)

    # --- batches ---------------------------------------------------------------------------

    async def _poll_batches(self, tally: _Tally) -> bool:
        queue = self._ready()
        batches = await queue.claim_batches(
            limit=_BATCHES_PER_STEP, lease_seconds=self.config.lease_seconds
        )
        for index, batch in enumerate(batches):
            try:
                data = await self._request(_http.bulk_status(self._root, batch.batch_id), tally)
            except (_Outage, EngageHTTPError) as exc:
                await queue.unlease_batches([later.batch_id for later in batches[index:]])
                if isinstance(exc, _Outage):
                    raise
                if exc.status == 404:
                    await self._settle_unknown(batch.batch_id, {"error": str(exc)})
                    continue
                raise self._outage_for(exc) from exc
            status = _http.read_batch_status(data)
            if status.finished:
                await self._settle(batch.batch_id, batch.kind, data, status, tally)
            elif self._now() - batch.submitted_at > self.config.batch_timeout:
                log.warning(
                    "batch %s did not finish in time; resending its changes", batch.batch_id
                )
                await self._settle_unknown(batch.batch_id, data)
            else:
                wait = min(
                    self.config.batch_poll_max,
                    self.config.batch_poll_initial * 2 ** (batch.polls + 1),
                )
                await queue.poll_later(batch.batch_id, self._now() + wait, data)
        return bool(batches)

    async def _settle(
        self,
        batch_id: str,
        kind: Operation,
        data: Any,
        status: _http.BatchStatus,
        tally: _Tally,
    ) -> None:
        queue = self._ready()
        failed: dict[int, tuple[str | None, str]] = {}
        resend: set[int] = set()
        if status.failures or status.failed_entirely or status.failed_count:
            # Only a batch with failures needs its rows read back, to tell which failed.
            failed, resend = _attribute(await queue.batch_rows(batch_id), status)
        applied, dead = await queue.batch_finished(batch_id, data, failed=failed, resend=resend)
        if kind is Operation.CREATE:
            tally.created += applied
        else:
            tally.updated += applied
        tally.dead += dead
        log.info(
            "batch %s finished: %d applied, %d dead, %d to send again",
            batch_id,
            applied,
            dead,
            len(resend),
        )

    async def _settle_unknown(self, batch_id: str, data: Any) -> None:
        queue = self._ready()
        rows = await queue.batch_rows(batch_id)
        await queue.batch_finished(batch_id, data, failed={}, resend=[r.seq for r in rows])

    # --- GUID reconciliation ----------------------------------------------------------------

    async def _reconcile(self, tally: _Tally) -> bool:
        queue = self._ready()
        waiting = await queue.claim_waiting(
            limit=_LOOKUPS_PER_STEP, lease_seconds=self.config.lease_seconds
        )
        for index, change in enumerate(waiting):
            try:
                found = await self._lookup(change, tally)
            except _Outage:
                for later in waiting[index:]:
                    await queue.not_found_yet(later.seq, self._now(), count=False)
                raise
            except MultipleMatches as exc:
                await self._bury({change.seq: _multiple(exc)}, tally)
                continue
            if found is not None:
                await queue.record_guid(change.seq, found)
                tally.reconciled += 1
                continue
            allowed = self.config.reconcile_max_lookups * (4 if change.exported_to else 1)
            if change.lookups + 1 >= allowed:
                await queue.create_again(
                    change.seq, f"not on Engage after {change.lookups + 1} lookups"
                )
            else:
                delay = background_delay(self.config.background_delays, change.lookups)
                await queue.not_found_yet(change.seq, self._now() + delay)
        return bool(waiting)

    # --- XML files -----------------------------------------------------------------------------

    async def _export(self, creates: list[Change], updates: list[Change], tally: _Tally) -> None:
        """Write creates and updates to XML import files; no write goes through the API."""
        contacts: list[_xmlfiles.XmlContact] = []
        bad: dict[int, tuple[str | None, str]] = {}
        default_type = self.config.default_contact_type
        for change in (*creates, *updates):
            try:
                contact = _xmlfiles.build_contact(
                    change.seq,
                    change.contact_type or default_type,
                    change.body or {},
                    contact_id=change.contact_id if change.operation is Operation.UPDATE else None,
                )
                _xmlfiles.check_contact(contact)
            except _xmlfiles.XmlContentError as exc:
                bad[change.seq] = ("XmlInvalid", str(exc))
                continue
            contacts.append(contact)
        await self._bury(bad, tally)
        create_seqs = {c.seq for c in creates}
        for start in range(0, len(contacts), _xmlfiles.MAX_CONTACTS_PER_FILE):
            chunk = contacts[start : start + _xmlfiles.MAX_CONTACTS_PER_FILE]
            try:
                path = await asyncio.to_thread(_xmlfiles.write_file, self.config.xml_dir, chunk)
            except OSError as exc:
                raise _Outage(f"cannot write XML files to {self.config.xml_dir}: {exc}") from exc
            seqs = [c.seq for c in chunk]
            await self._ready().exported(
                [s for s in seqs if s not in create_seqs],
                [s for s in seqs if s in create_seqs],
                str(path),
            )
            self._held.difference_update(seqs)
            tally.exported += len(chunk)
            log.info("wrote %d change(s) to %s", len(chunk), path.name)


def _attribute(
    rows: list[Change], status: _http.BatchStatus
) -> tuple[dict[int, tuple[str | None, str]], set[int]]:
    """Which rows of a finished batch failed for good, and which must be sent again.

    Failures are matched to rows by their index in the request, then by contact id, then by
    key. Whatever
    cannot be told apart (a failure naming no row, a count above the failures listed, or a
    batch failed as a whole) is sent again, one by one: a lookup or a single call then gives a
    definitive answer.
    """
    failed: dict[int, tuple[str | None, str]] = {}
    resend: set[int] = set()
    by_index = {r.batch_index: r for r in rows if r.batch_index is not None}
    by_id = {r.contact_id.lower(): r for r in rows if r.contact_id}
    by_key = {r.key_value.lower(): r for r in rows if r.key_value}
    unclear = status.failed_entirely and not status.failures
    for failure in status.failures:
        row = None
        if failure.index is not None:
            row = by_index.get(failure.index)
        if row is None and failure.contact_id:
            row = by_id.get(failure.contact_id.lower())
        if row is None and failure.key:
            row = by_key.get(failure.key.lower())
        if row is None:
            unclear = True
            continue
        if row.operation is Operation.CREATE and failure.error_code == (
            "ApprovedContactWithKeyExists"
        ):
            resend.add(row.seq)  # it exists: the lookup before sending again will find it
            continue
        message = failure.message or "rejected in a bulk batch"
        failed[row.seq] = (failure.error_code, scrub(message))
    if status.failed_count is not None and status.failed_count > len(status.failures):
        unclear = True
    if unclear:
        resend.update(r.seq for r in rows if r.seq not in failed)
    return failed, resend


def _multiple(exc: MultipleMatches) -> tuple[str, str]:
    ids = ", ".join(exc.contact_ids) or "not given"
    return "MultipleMatches", f"several contacts have this key: {ids}"


def _codes(failures: Mapping[int, tuple[str | None, str]]) -> str:
    counts: dict[str, int] = {}
    for code, _ in failures.values():
        counts[code or "unknown"] = counts.get(code or "unknown", 0) + 1
    return ", ".join(f"{code} x{n}" for code, n in sorted(counts.items()))
