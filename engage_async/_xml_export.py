"""The flusher's XML step: creates and updates written to import files instead of the API.

Each change becomes one contact element (`_xmlfiles` builds and checks it). A change that
cannot be written, for whatever its row holds (too deep, too large, a character XML cannot
carry, not even an object), is dead-lettered alone with the reason; the rest go into files
of at most 20,000 contacts, creates and updates in files of their own. A create with options
the import cannot carry (source, storeExternalId, createAsUnapproved) is not written: it
stays pending, marked as waiting for the API.

A file is exported in three commits-and-writes, so that it is exported once:

1. its name and the digest of its bytes are committed with its rows (`plan_export`);
2. the file is linked into place (`_xmlfiles.place`), never over another file;
3. its rows are recorded (`finish_export`): updates done, creates waiting for their GUID.

A flusher that dies between 1 and 3 leaves the plan; `resume` (every step of every flusher)
finishes a plan older than a lease: the file found by its digest is recorded, else it is
written again under the planned name from the same rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from . import _xmlfiles
from ._background import Outage
from ._changes import Change, Operation
from ._clock import SYSTEM_CLOCK, Clock
from ._config import EngageConfig
from ._flush_run import FlushRun
from ._store import Failures

__all__ = ["XmlExport"]

log = logging.getLogger(__name__)

WAITS_FOR_API = (
    "waits for the API: the XML import cannot carry the create's options "
    "(source, storeExternalId, createAsUnapproved)"
)


@attrs.frozen
class _File:
    """One import file's rows and bytes, decided before it is written."""

    seqs: tuple[int, ...]
    data: bytes = attrs.field(repr=False)
    digest: str


class XmlExport:
    """Writes changes to XML import files in `config.xml_dir`.

    ``avoidTriggeringExport`` goes on the update files that qualify: every update in it asked
    for it (its own choice, else `avoid_triggering_export`, by default the config's setting)
    and holds only its contactId and non-standard fields.
    """

    def __init__(
        self,
        config: EngageConfig,
        *,
        avoid_triggering_export: bool | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self._clock = clock
        if avoid_triggering_export is None:
            avoid_triggering_export = config.avoid_triggering_export
        self.avoid_triggering_export = avoid_triggering_export

    @property
    def directory(self) -> Path:
        """Where the files go."""
        return self.config.xml_dir

    async def write(self, creates: list[Change], updates: list[Change], run: FlushRun) -> None:
        """Write `creates` and `updates` to import files; no write goes through the API.

        Raises:
            Outage: the directory cannot be written (every flusher pauses, nothing is lost;
                a file already planned is finished by the next flush).
        """
        waiting = [c for c in creates if c.query]
        if waiting:
            await run.store.wait_for_api(
                run.owner,
                [c.seq for c in waiting],
                delay=self.config.background_delays[-1],
                reason=WAITS_FOR_API,
            )
            run.let_go(c.seq for c in waiting)
            log.info("%d create(s) with options wait for the API", len(waiting))
        creates = [c for c in creates if not c.query]
        if not creates and not updates:
            return
        files, bad = await asyncio.to_thread(self._prepare, creates, updates)
        await run.bury(bad)
        for planned in files:
            await self._export(planned, run)

    async def resume(self, run: FlushRun) -> bool:
        """Finish the files planned more than a lease ago and never recorded (their flusher
        died between planning and recording); True if there were any.

        Raises:
            Outage: the directory cannot be written.
        """
        plans = await run.store.stale_exports(older_than=self.config.lease_seconds)
        for path, file_digest in plans:
            await self._resume(Path(path), file_digest, run)
        return bool(plans)

    # --- building -----------------------------------------------------------------------------

    def _contact(self, change: Change) -> _xmlfiles.XmlContact:
        """The contact element of one change, checked against the schema.

        Raises:
            XmlContentError: it cannot be written as a valid import contact.
        """
        contact_id = None
        if change.operation is Operation.UPDATE:
            if change.contact_id is None:
                raise _xmlfiles.XmlContentError("an update without its contact's id")
            contact_id = change.contact_id
        contact = _xmlfiles.build_contact(
            change.seq,
            change.contact_type or self.config.default_contact_type,
            {} if change.body is None else change.body,
            contact_id=contact_id,
        )
        _xmlfiles.check_contact(contact)
        return contact

    def _built(
        self, changes: Sequence[Change]
    ) -> tuple[list[_xmlfiles.XmlContact], dict[int, tuple[str | None, str]]]:
        """The contacts of `changes` that can be written, and the reasons of the others."""
        contacts: list[_xmlfiles.XmlContact] = []
        bad: dict[int, tuple[str | None, str]] = {}
        for change in changes:
            try:
                contacts.append(self._contact(change))
            except _xmlfiles.XmlContentError as exc:
                bad[change.seq] = ("XmlInvalid", str(exc))
            except Exception as exc:
                # Whatever a row holds, it dies alone. Only the type is kept: lxml's and
                # Python's messages may quote the value.
                bad[change.seq] = (
                    "XmlInvalid",
                    f"cannot be built as an import contact ({type(exc).__name__})",
                )
        return contacts, bad

    def _avoids(self, contact: _xmlfiles.XmlContact, wanted: Mapping[int, bool]) -> bool:
        """Whether `contact` (an update) asked to skip Engage's exports and may."""
        return wanted.get(contact.seq, False) and _xmlfiles.only_custom_fields(contact)

    def _render(
        self,
        contacts: Sequence[_xmlfiles.XmlContact],
        wanted: Mapping[int, bool],
        *,
        update: bool,
    ) -> _File:
        # Decided from the rows alone, so a plan rebuilt after a crash renders the same bytes.
        avoid = update and all(self._avoids(c, wanted) for c in contacts)
        data = _xmlfiles.render(contacts, avoid_triggering_export=avoid)
        return _File(tuple(c.seq for c in contacts), data, _xmlfiles.digest(data))

    def _wanted(self, updates: Sequence[Change]) -> dict[int, bool]:
        """Each update's choice about Engage's exports, by seq."""
        return {c.seq: c.avoids_export(self.avoid_triggering_export) for c in updates}

    def _prepare(
        self, creates: Sequence[Change], updates: Sequence[Change]
    ) -> tuple[list[_File], Failures]:
        """The files to write (creates, then updates, each at most 20,000 contacts) and the
        changes that cannot be written. Runs in a worker thread: building and checking
        thousands of contacts would hold up the event loop.
        """
        create_contacts, bad = self._built(creates)
        update_contacts, bad_updates = self._built(updates)
        bad.update(bad_updates)
        wanted = self._wanted(updates)
        # Updates that may skip Engage's exports go apart, so their file carries it even when
        # other updates are written in the same step.
        avoiding = [self._avoids(c, wanted) for c in update_contacts]
        groups = [
            (create_contacts, False),
            ([c for c, avoids in zip(update_contacts, avoiding, strict=True) if avoids], True),
            ([c for c, avoids in zip(update_contacts, avoiding, strict=True) if not avoids], True),
        ]
        size = _xmlfiles.MAX_CONTACTS_PER_FILE
        files = [
            self._render(contacts[start : start + size], wanted, update=update)
            for contacts, update in groups
            for start in range(0, len(contacts), size)
        ]
        return files, bad

    def _rebuild(self, rows: Sequence[Change]) -> tuple[_File | None, Failures]:
        """A planned file built again from its rows (all creates or all updates), and the rows
        that can no longer be written. In one worker thread, as `_prepare`: lxml elements are
        best kept to the thread that made them.
        """
        contacts, bad = self._built(rows)
        if not contacts:
            return None, bad
        update = rows[0].operation is not Operation.CREATE
        return self._render(contacts, self._wanted(rows), update=update), bad

    # --- writing ----------------------------------------------------------------------------

    async def _export(self, file: _File, run: FlushRun) -> None:
        """Plan `file` under a free name, then write and record it."""
        stamp = _xmlfiles.stamp(datetime.fromtimestamp(self._clock.wall(), UTC))
        name = await self._disk(_xmlfiles.free_name, self.directory, stamp)
        while True:
            outcome = await run.store.plan_export(
                run.owner, file.seqs, str(self.directory / name), file.digest
            )
            if outcome != "taken":
                break
            name = await self._disk(
                _xmlfiles.free_name, self.directory, stamp, after=_xmlfiles.sequence_of(name)
            )
        if outcome == "lost":
            # This flusher's lease ran out and another took some of these rows: they are
            # theirs now, and the rest is given back when this flush ends.
            log.warning("lost the lease on rows of an XML file; not writing it")
            return
        run.let_go(file.seqs)  # parked under the plan: no longer this flush's to give back
        await self._write_planned(self.directory / name, file, run)

    async def _write_planned(self, planned: Path, file: _File, run: FlushRun) -> None:
        """Link the planned file into place (moving the plan to the next free name if another
        file has taken that one) and record it.
        """
        stamp = planned.name.split("_", 1)[0]
        tried = _xmlfiles.sequence_of(planned.name)
        while True:
            written = await self._disk(_xmlfiles.place, self.directory, planned.name, file.data)
            if written is not None:
                break
            # Another file has the name: move the plan to the next name free on disk and
            # not planned by another flusher.
            while True:
                name = await self._disk(_xmlfiles.free_name, self.directory, stamp, after=tried)
                tried = _xmlfiles.sequence_of(name)
                moved = self.directory / name
                if await run.store.replan_export(str(planned), str(moved), file.digest):
                    planned = moved
                    break
        count = await run.store.finish_export(str(planned), str(written))
        run.count("exported", count, operation=run.operation_of(file.seqs))
        log.info("wrote %d change(s) to %s", count, written.name)

    async def _resume(self, planned: Path, file_digest: str, run: FlushRun) -> None:
        """Finish a plan whose flusher did not: record the file if it was written, else write
        the same file again from the same rows under the same name.
        """
        store = run.store
        found = await self._disk(_xmlfiles.find_written, self.directory, planned.name, file_digest)
        if found is not None:
            count = await store.finish_export(str(planned), str(found))
            run.count("exported", count)
            log.warning("recorded %s, written before its flusher stopped", found.name)
            return
        rows = await store.export_rows(str(planned))
        if rows:
            file, bad = await asyncio.to_thread(self._rebuild, rows)
            await run.bury(bad)
            if file is not None:
                if file.digest != file_digest:
                    # Built differently now (a row set aside, or other settings): the plan
                    # names these bytes before they are written, as any plan does.
                    await store.replan_export(str(planned), str(planned), file.digest)
                log.warning("writing %s again: its flusher stopped before it", planned.name)
                await self._write_planned(planned, file, run)
                return
        await store.finish_export(str(planned), str(planned))  # nothing left: drop the plan

    async def _disk(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a file operation in a worker thread; a disk that refuses is an outage."""
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except OSError as exc:
            raise Outage(f"cannot write XML files to {self.directory}: {exc}") from exc
