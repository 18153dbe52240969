"""The flusher's XML step: creates and updates written to import files instead of the API.

Each change becomes one contact element (`_xmlfiles` builds and checks it); one that cannot
be written as valid import XML is dead-lettered alone with the reason, and the rest go into
files of at most 20,000 contacts. Written updates are done; written creates wait for their
GUID, which the reconciler looks up once Engage has imported the file.
"""

from __future__ import annotations

import asyncio
import logging

from . import _xmlfiles
from ._background import Outage
from ._changes import Change, Operation
from ._config import EngageConfig
from ._flush_run import FlushRun

__all__ = ["XmlExport"]

log = logging.getLogger(__name__)


class XmlExport:
    """Writes changes to XML import files in `config.xml_dir`."""

    def __init__(self, config: EngageConfig) -> None:
        self.config = config

    async def write(self, creates: list[Change], updates: list[Change], run: FlushRun) -> None:
        """Write `creates` and `updates` to import files; no write goes through the API.

        Raises:
            Outage: the directory cannot be written (every flusher pauses, nothing is lost).
        """
        if not creates and not updates:
            return
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
        await run.bury(bad)
        create_seqs = {c.seq for c in creates}
        for start in range(0, len(contacts), _xmlfiles.MAX_CONTACTS_PER_FILE):
            chunk = contacts[start : start + _xmlfiles.MAX_CONTACTS_PER_FILE]
            try:
                path = await asyncio.to_thread(_xmlfiles.write_file, self.config.xml_dir, chunk)
            except OSError as exc:
                raise Outage(f"cannot write XML files to {self.config.xml_dir}: {exc}") from exc
            seqs = [c.seq for c in chunk]
            await run.store.exported(
                [s for s in seqs if s not in create_seqs],
                [s for s in seqs if s in create_seqs],
                str(path),
            )
            run.let_go(seqs)
            run.count("exported", len(chunk))
            log.info("wrote %d change(s) to %s", len(chunk), path.name)
