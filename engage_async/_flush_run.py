"""One flush's shared state and books: what the flusher's parts settle, and how it went.

Every part of a flush (the sender, the batch follower, the reconciler, the XML export) settles
rows through a `FlushRun`, which writes the transition to the outbox and keeps the books in
step with it: the rows this flusher still holds (given back if the flush stops), the counts
that become the `FlushReport`, and whether Engage answered in the current step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from ._changes import Change, Operation
from ._errors import OutboxError
from ._metrics import NO_METRICS, OTHER, Metrics
from ._models import FlushReport
from ._store import Failures, OutboxStore

__all__ = ["FlushRun", "Stopped", "work_through"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_COUNTED = tuple(field.name for field in attrs.fields(FlushReport) if field.name != "pending")


class Stopped(Exception):
    """The flusher is stopping: no new request goes out, and the flush ends.

    `abandoned`: a request was out and was given up; it may have reached Engage.
    """

    def __init__(self, *, abandoned: bool = False) -> None:
        super().__init__("the flusher is stopping")
        self.abandoned = abandoned


class FlushRun:
    """The state of one `flush_once`, shared by the parts that do its steps."""

    def __init__(self, store: OutboxStore, owner: str, *, metrics: Metrics = NO_METRICS) -> None:
        self.store = store
        self.owner = owner
        self.counts = dict.fromkeys(_COUNTED, 0)
        self._metrics = metrics
        # What each row claimed in this flush does, for the metrics' operation attribute.
        self._operations: dict[int, str] = {}
        # Claimed and not yet settled: given back as pending if the flush stops early...
        self.held: set[int] = set()
        # ... and of those, the ones whose request may have reached Engage (looked up first).
        self.maybe_sent: set[int] = set()
        # Engage took a write (applied it, or rejected it for a reason of its own) in this
        # step. Lookups do not count: during a write outage GETs may still be answered.
        self.served = False
        self.answered = False  # Engage answered any call in this step
        # The due backlog reached bulk_threshold: the bulk endpoints are used until it is
        # drained, the last few changes included. Changes that become due later (released
        # after a GUID was found) are a new backlog, judged on their own.
        self.bulk_backlog = False
        self.stopping = False
        # The request in flight, as the timeout that abandons it once a stop's grace is over.
        self._in_flight: asyncio.Timeout | None = None
        self._abandon_at: float | None = None

    def stop(self, grace: float) -> None:
        """No new request goes out; the one in flight gets `grace` seconds to be answered."""
        self.stopping = True
        self._abandon_at = asyncio.get_running_loop().time() + grace
        if self._in_flight is not None:
            self._in_flight.reschedule(self._abandon_at)

    def going_out(self, request: asyncio.Timeout) -> None:
        """A request is about to go out, bounded by `request` (`asyncio.timeout`).

        Raises:
            Stopped: the flusher is stopping; the request must not go.
        """
        if self.stopping:
            raise Stopped
        self._in_flight = request

    def came_back(self) -> None:
        """The request in flight is over."""
        self._in_flight = None

    def new_step(self) -> None:
        """A step begins: nothing is known yet about Engage in it."""
        self.served = self.answered = False

    def count(self, name: str, number: int = 1, *, operation: str | None = None) -> None:
        """Add to one of the report's counts (and the metrics', by `operation` when known)."""
        self.counts[name] += number
        self._metrics.flushed(name, number, operation)

    def operation_of(self, seqs: Iterable[int]) -> str | None:
        """What the first of these rows does, if this flush claimed it."""
        return next((self._operations.get(seq) for seq in seqs), None)

    def report(self, pending: int) -> FlushReport:
        """The counts so far, with `pending` changes left."""
        return FlushReport(**self.counts, pending=pending)

    async def engage_answered(self, *, write: bool) -> None:
        """Engage answered a call: a pause after an earlier outage is over."""
        if write:
            self.served = True
        if self.answered:
            return
        self.answered = True
        if await self.store.pause() is not None:
            await self.store.clear_pause()

    # --- settling rows -------------------------------------------------------------------------

    def hold(self, changes: Iterable[Change]) -> None:
        """Rows this flush claimed."""
        changes = list(changes)
        self.held.update(change.seq for change in changes)
        self._operations.update((change.seq, str(change.operation)) for change in changes)

    def let_go(self, seqs: Iterable[int]) -> None:
        """Rows that are no longer this flush's to give back (settled, or in a batch)."""
        seqs = set(seqs)
        self.held.difference_update(seqs)
        self.maybe_sent.difference_update(seqs)

    async def about_to_send(self, changes: Iterable[Change]) -> None:
        """These changes' requests are about to go out: the creates among them are recorded
        as such, in one commit, so that a create is looked up first only if its request may
        have reached Engage.
        """
        await self.store.about_to_send(
            self.owner, [c.seq for c in changes if c.operation is Operation.CREATE]
        )

    def may_have_reached(self, changes: Iterable[Change]) -> None:
        """The request carrying these changes may have reached Engage (no answer, a 5xx)."""
        self.maybe_sent.update(change.seq for change in changes)

    async def finish(self, changes: Iterable[Change]) -> None:
        """Engage applied these."""
        seqs = [change.seq for change in changes]
        await self.store.finish(seqs)
        self.let_go(seqs)

    async def bury(self, failures: Failures) -> None:
        """Engage rejected these for good (their dependents die with a create)."""
        if not failures:
            return
        buried = await self.store.bury(failures)
        for operation, number in self._dead_by_operation(failures, buried).items():
            self.count("dead", number, operation=operation)
        self.let_go(failures)
        log.warning("dead-lettered %d change(s): %s", len(failures), _codes(failures))

    async def release(
        self,
        changes: Sequence[Change],
        *,
        delay: float = 0.0,
        count_attempt: bool = False,
        error: str | None = None,
        send_alone: bool = False,
        maybe_sent: bool = False,
    ) -> None:
        """Give rows back as pending, due again in `delay` seconds; `maybe_sent` when their
        request may have reached Engage.
        """
        seqs = [change.seq for change in changes]
        await self.store.release(
            self.owner,
            seqs,
            delay=delay,
            count_attempt=count_attempt,
            error=error,
            send_alone=send_alone,
            maybe_sent=maybe_sent,
        )
        self.let_go(seqs)

    async def release_held(self) -> None:
        """Give back every row claimed but not settled (the flush stopped mid-step): those
        whose request may have reached Engage are looked up before they are sent again; the
        rest provably never left.
        """
        if not self.held:
            return
        held, self.held = self.held, set()
        maybe, self.maybe_sent = held & self.maybe_sent, set()
        if maybe:
            await self.store.release(self.owner, sorted(maybe), maybe_sent=True)
        if held - maybe:
            await self.store.release(self.owner, sorted(held - maybe))

    async def created(self, change: Change, contact_id: str) -> None:
        """The create exists on Engage as `contact_id`."""
        await self.store.record_guid(change.seq, contact_id)
        self.let_go([change.seq])

    async def became_update(self, change: Change, contact_id: str, body: Mapping[str, Any]) -> None:
        """The create's contact exists and must still get `body`: the row is an update now."""
        await self.store.create_became_update(change, contact_id, body)
        self._operations[change.seq] = str(Operation.UPDATE)

    def _dead_by_operation(self, seqs: Iterable[int], buried: int) -> Counter[str]:
        """`buried` rows by operation: `seqs` first, then the changes that waited on a dead
        create, which are counted with it (only a dead create takes others along).
        """
        found: Counter[str] = Counter()
        for seq in seqs:
            if buried <= 0:
                break
            found[self._operations.get(seq, OTHER)] += 1
            buried -= 1
        if buried > 0:
            found[str(Operation.CREATE)] += buried
        return found


def _codes(failures: Failures) -> str:
    counts: dict[str, int] = {}
    for code, _ in failures.values():
        counts[code or "unknown"] = counts.get(code or "unknown", 0) + 1
    return ", ".join(f"{code} x{n}" for code, n in sorted(counts.items()))


async def work_through(
    items: Sequence[T],
    work: Callable[[T], Awaitable[object]],
    give_back: Callable[[Sequence[T]], Awaitable[object]],
) -> None:
    """Run `work` on each of `items` (claimed under this flusher's lease) in turn. When one
    raises (an outage) or the flush is stopped, the items not yet worked go to `give_back` at
    once, so the next flusher need not wait for this one's lease to run out.

    The give-back finishes even if the caller is cancelled, and an `OutboxError` in it gives
    way to the error that stopped the work.
    """

    async def give_back_quietly(rest: Sequence[T]) -> None:
        with contextlib.suppress(OutboxError):
            await give_back(rest)

    done = 0
    try:
        for item in items:
            await work(item)
            done += 1
    finally:
        if done < len(items):
            await asyncio.shield(give_back_quietly(items[done:]))
