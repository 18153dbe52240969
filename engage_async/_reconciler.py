"""Recovering the GUIDs of contacts created through bulk or XML, by looking up their keys.

Neither a bulk batch nor an import file tells the new contacts' GUIDs, so each such create
waits (``waiting_guid``) until a lookup by its key finds it; creates that other changes wait
on go first. A GUID found is recorded, which releases the changes queued behind the create's
ref. A contact Engage never shows after many lookups is created again (looked up first).
"""

from __future__ import annotations

from collections.abc import Sequence

from ._background import BackgroundCalls, multiple_matches
from ._changes import Change
from ._config import EngageConfig
from ._errors import MultipleMatches
from ._flush_run import FlushRun, work_through
from ._retry import background_delay

__all__ = ["Reconciler"]

_LOOKUPS_PER_STEP = 50


class Reconciler:
    """Looks up the GUIDs of creates that wait for one."""

    def __init__(self, config: EngageConfig, calls: BackgroundCalls) -> None:
        self.config = config
        self._calls = calls

    async def reconcile(self, run: FlushRun) -> bool:
        """Look up the waiting creates due now; True if there were any."""
        store = run.store
        waiting = await store.claim_waiting(
            run.owner, limit=_LOOKUPS_PER_STEP, lease_seconds=self.config.lease_seconds
        )

        async def look_up(change: Change) -> None:
            await self._look_up(change, run)

        async def due_again(rest: Sequence[Change]) -> None:
            # Not looked up: due again at once, uncounted and unleased.
            for change in rest:
                await store.not_found_yet(change.seq, delay=0.0, count=False)

        await work_through(waiting, look_up, due_again)
        return bool(waiting)

    async def _look_up(self, change: Change, run: FlushRun) -> None:
        store = run.store
        try:
            found = await self._calls.lookup(change, run)
        except MultipleMatches as exc:
            await run.bury({change.seq: multiple_matches(exc)})
            return
        if found is not None:
            await store.record_guid(change.seq, found)
            run.count("reconciled")
            return
        allowed = self.config.reconcile_max_lookups * (4 if change.exported_to else 1)
        if change.lookups + 1 >= allowed:
            reason = f"not on Engage after {change.lookups + 1} lookups"
            await store.create_again(change.seq, reason)
        else:
            delay = background_delay(self.config.background_delays, change.lookups)
            await store.not_found_yet(change.seq, delay=delay)
