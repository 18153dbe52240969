"""Following bulk batches until Engage finishes them, and telling which of their rows failed.

Engage answers a bulk request with a batch id; its status is polled at growing intervals.
When a batch finishes, the items it reports as failed are dead-lettered one by one, its
updates are done, and its creates wait for their GUID. `attribute_failures` is the pure rule
that ties Engage's per-item failures to outbox rows.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

from . import _http
from ._background import BackgroundCalls
from ._changes import Batch, Change, Operation
from ._config import EngageConfig
from ._errors import EngageHTTPError
from ._flush_run import FlushRun, work_through
from ._redact import scrub, sent_values, without

__all__ = ["BatchFollower", "attribute_failures", "created_guids"]

log = logging.getLogger(__name__)

_BATCHES_PER_STEP = 16


def attribute_failures(
    rows: list[Change], status: _http.BatchStatus
) -> tuple[dict[int, tuple[str | None, str]], set[int]]:
    """Which rows of a finished batch failed for good, and which must be sent again.

    Failures are matched to rows by their index in the request, then by contact id, then by
    key. Whatever cannot be told apart (a failure naming no row, a count above the failures
    listed, or a batch failed as a whole) is sent again, one by one: a lookup or a single call
    then gives a definitive answer. A create that failed because its key exists is sent again
    too: the lookup before it finds the contact.
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
            resend.add(row.seq)
            continue
        message = failure.message or "rejected in a bulk batch"
        # Kept as the change's last error and shown by `outbox list`: none of what the item
        # sent (its name, its street) may be read there.
        failed[row.seq] = (failure.error_code, scrub(without(message, sent_values(row.body))))
    if status.failed_count is not None and status.failed_count > len(status.failures):
        unclear = True
    if unclear:
        resend.update(r.seq for r in rows if r.seq not in failed)
    return failed, resend


def created_guids(
    rows: list[Change], status: _http.BatchStatus, *, skip: Collection[int] = ()
) -> dict[int, str]:
    """The GUIDs a finished create batch's status gives, by the seq of each row (matched by
    its index in the request); rows in `skip` (failed, or sent again) get none.
    """
    by_index = {r.batch_index: r.seq for r in rows if r.batch_index is not None}
    return {
        by_index[index]: contact_id
        for index, contact_id in status.contact_ids
        if index in by_index and by_index[index] not in skip
    }


class BatchFollower:
    """Polls the batches in flight and settles the finished ones."""

    def __init__(self, config: EngageConfig, calls: BackgroundCalls) -> None:
        self.config = config
        self._calls = calls

    async def poll(self, run: FlushRun) -> bool:
        """Poll the batches due now; True if there were any."""
        store = run.store
        batches = await store.claim_batches(
            run.owner, limit=_BATCHES_PER_STEP, lease_seconds=self.config.lease_seconds
        )

        async def poll_one(batch: Batch) -> None:
            call = _http.bulk_status(self.config.api_root, batch.batch_id)
            try:
                data = await self._calls.request(call, run)
            except EngageHTTPError as exc:
                if exc.status != 404:
                    raise self._calls.outage_for(exc) from exc
                await self._settle_unknown(batch.batch_id, {"error": str(exc)}, run)
            else:
                await self._after_poll(batch, data, run)

        async def unlease(rest: Sequence[Batch]) -> None:
            # Not polled: back as they were.
            await store.unlease_batches(run.owner, [b.batch_id for b in rest])

        await work_through(batches, poll_one, unlease)
        return bool(batches)

    async def _after_poll(self, batch: Batch, data: Any, run: FlushRun) -> None:
        status = _http.read_batch_status(data)
        if status.finished:
            await self._settle(batch, data, status, run)
        elif batch.age > self.config.batch_timeout:
            log.warning("batch %s did not finish in time; resending its changes", batch.batch_id)
            await self._settle_unknown(batch.batch_id, data, run)
        else:
            wait = min(
                self.config.batch_poll_max,
                # The exponent is capped: a batch polled a thousand times would overflow.
                self.config.batch_poll_initial * 2 ** min(batch.polls + 1, 32),
            )
            await run.store.poll_batch_later(batch.batch_id, delay=wait, status=data)

    async def _settle(
        self, batch: Batch, data: Any, status: _http.BatchStatus, run: FlushRun
    ) -> None:
        failed: dict[int, tuple[str | None, str]] = {}
        resend: set[int] = set()
        created: dict[int, str] = {}
        tells_guids = batch.kind is Operation.CREATE and bool(status.contact_ids)
        if status.failures or status.failed_entirely or status.failed_count or tells_guids:
            # Only a batch with failures (or GUIDs to record) needs its rows read back.
            rows = await run.store.batch_rows(batch.batch_id)
            failed, resend = attribute_failures(rows, status)
            if tells_guids:
                created = created_guids(rows, status, skip=failed.keys() | resend)
        applied, dead = await run.store.settle_batch(
            batch.batch_id, data, failed=failed, resend=resend, created=created
        )
        run.count("created" if batch.kind is Operation.CREATE else "updated", applied)
        run.count("dead", dead, operation=batch.kind)
        log.info(
            "batch %s finished: %d applied, %d dead, %d to send again",
            batch.batch_id,
            applied,
            dead,
            len(resend),
        )

    async def _settle_unknown(self, batch_id: str, data: Any, run: FlushRun) -> None:
        rows = await run.store.batch_rows(batch_id)
        await run.store.settle_batch(batch_id, data, failed={}, resend=[r.seq for r in rows])
