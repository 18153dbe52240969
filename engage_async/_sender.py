"""Sending claimed changes: which way each goes (a pure decision), and sending it that way.

`route` decides, for the changes one step claimed: contact-type changes and changes that must
go alone through the single endpoints; creates and updates through ``POST/PATCH
/contacts/bulk``; or, in XML mode (and once Engage refuses the bulk API), creates and updates
into XML import files and contact-type changes to the dead letters (they have no XML form).

`Sender` carries it out. Creates marked "look up first" are looked up by key before anything
is sent; one whose contact exists is finished, or turned into an update of it.

A 5xx counts against a change only when Engage took other writes in the same step (lookups
answering prove nothing about writes), so one poisonous change is isolated while an outage
is not; a change already isolated that fails alone counts it too, so it ends dead instead of
pausing everyone for ever. Rejections (400, 404, 422) dead-letter the change with Engage's
reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NoReturn

import attrs

from . import _http
from ._background import BackgroundCalls, Outage, multiple_matches
from ._changes import Change, Operation
from ._config import EngageConfig
from ._create_policy import (
    CreateOutcome,
    contact_id_in,
    create_outcome,
    update_for_existing,
    without_type,
)
from ._errors import (
    ContactNotFound,
    EngageAuthError,
    EngageConfigurationError,
    EngageHTTPError,
    EngageServerError,
    EngageValidationError,
    InvalidRequest,
    MultipleMatches,
    RateLimited,
)
from ._flush_run import FlushRun, Stopped
from ._keys import contact_key
from ._retry import background_delay
from ._xml_export import XmlExport

__all__ = [
    "MAX_BULK_BYTES",
    "Routes",
    "Sender",
    "affordable",
    "bulk_chunks",
    "route",
]

log = logging.getLogger(__name__)

# In a step with no answer from Engage yet, this many 5xx in a row mean an outage, not a
# poisonous change.
_SERVER_ERRORS_FOR_OUTAGE = 3


@attrs.frozen
class Routes:
    """Where the changes of one step go."""

    singles: tuple[Change, ...] = ()
    bulk_creates: tuple[Change, ...] = ()
    bulk_updates: tuple[Change, ...] = ()
    xml_creates: tuple[Change, ...] = ()
    xml_updates: tuple[Change, ...] = ()
    not_in_xml: tuple[Change, ...] = ()


def route(
    creates: Sequence[Change],
    updates: Sequence[Change],
    type_changes: Sequence[Change],
    *,
    xml: bool,
    bulk: bool,
    types_assumed: bool = False,
) -> Routes:
    """Which way each change goes.

    `xml`: writes leave only as XML files (XML mode, or Engage refused the bulk API).
    `bulk`: the backlog is big enough for the bulk endpoints. Even then a change goes alone
    when a bulk request could not settle it before (`send_alone`); a create with options
    (source, store, unapproved) does, since the bulk API cannot carry them; and so does an
    update whose contact's type is unknown, since Engage applies a bulk request under one
    contact type, unless `types_assumed` (`assume_default_contact_type`: the tenant has one
    type, under which it goes).
    """
    if xml:
        return Routes(
            xml_creates=tuple(creates), xml_updates=tuple(updates), not_in_xml=tuple(type_changes)
        )

    singles: list[Change] = []
    bulk_creates: list[Change] = []
    bulk_updates: list[Change] = []
    # Each change is judged once: a step holds thousands.
    for changes, in_bulk in ((creates, bulk_creates), (updates, bulk_updates)):
        for change in changes:
            goes = (
                singles if _goes_alone(change, bulk=bulk, types_assumed=types_assumed) else in_bulk
            )
            goes.append(change)
    return Routes(
        singles=(*singles, *type_changes),
        bulk_creates=tuple(bulk_creates),
        bulk_updates=tuple(bulk_updates),
    )


# Operations the bulk API has no endpoint for.
_ALWAYS_ALONE = frozenset({Operation.CONTACT_TYPE, Operation.PROMOTE})


def _goes_alone(change: Change, *, bulk: bool, types_assumed: bool) -> bool:
    return (
        not bulk
        or change.send_alone
        or (change.operation is Operation.CREATE and bool(change.query))
        or (
            change.operation is Operation.UPDATE
            and change.contact_type is None
            and not types_assumed
        )
        or change.operation in _ALWAYS_ALONE
    )


def _own_requests(change: Change, *, bulk: bool, types_assumed: bool) -> int:
    """How many requests of its own a claimed change costs in one step (bulk requests are
    shared by thousands of changes, and not counted).
    """
    lookup = int(change.operation is Operation.CREATE and change.lookup_first)
    return lookup + int(_goes_alone(change, bulk=bulk, types_assumed=types_assumed))


# The most a bulk request's body holds. Engage documents no limit besides 4000 items, but
# 4000 items of up to 64 KiB each (the payload limit) would be 256 MiB; ASP.NET and IIS refuse
# bodies over 30,000,000 bytes by default, and a refused body would pause the flushers for
# ever (a 413 is no verdict on the changes). Typical items are a few hundred bytes.
MAX_BULK_BYTES = 16 * 2**20


def bulk_chunks(sizes: Sequence[int], max_items: int, max_bytes: int) -> list[tuple[int, int]]:
    """Split items of these encoded sizes into consecutive (start, end) ranges, each at most
    `max_items` long and at most `max_bytes` as a JSON array (brackets and commas counted);
    an item larger than `max_bytes` alone goes in a range of its own.
    """
    ranges: list[tuple[int, int]] = []
    start, total = 0, 2
    for index, size in enumerate(sizes):
        grown = total + size + (1 if index > start else 0)
        if index > start and (index - start >= max_items or grown > max_bytes):
            ranges.append((start, index))
            start, grown = index, 2 + size
        total = grown
    if sizes:
        ranges.append((start, len(sizes)))
    return ranges


def affordable(
    claimed: Sequence[Change], *, bulk: bool, requests: int, types_assumed: bool = False
) -> tuple[list[Change], list[Change]]:
    """The claimed changes (oldest first) that one step can send with `requests` requests of
    their own, and the rest, to give back at once.

    A stopping flusher abandons what it has not sent; sizing each step to what it can send
    in the shutdown time also keeps it from holding rows other flushers could send.
    """
    keep: list[Change] = []
    spent = 0
    for index, change in enumerate(claimed):
        cost = _own_requests(change, bulk=bulk, types_assumed=types_assumed)
        if keep and spent + cost > requests:
            return keep, list(claimed[index:])
        keep.append(change)
        spent += cost
    return keep, []


class Sender:
    """Sends the changes a step claimed, each the way `route` says."""

    def __init__(self, config: EngageConfig, calls: BackgroundCalls, export: XmlExport) -> None:
        self.config = config
        self._calls = calls
        self._export = export
        self._root = config.api_root
        # Once Engage refuses the bulk API for good (403/404), this flusher writes XML.
        self.bulk_refused = False
        # After a bulk request failed with a 5xx, send the next step's changes one by one, so
        # a poisonous change shows itself instead of failing every batch it is in.
        self._single_next = False

    def _ways(self, run: FlushRun) -> tuple[bool, bool]:
        """(xml, bulk): whether this step writes files, and whether its API writes go in bulk."""
        xml = self.config.fallback_mode == "xml" or self.bulk_refused
        return xml, run.bulk_backlog and not self._single_next

    def affordable(
        self, claimed: Sequence[Change], run: FlushRun, *, requests: int
    ) -> tuple[list[Change], list[Change]]:
        """`affordable` for this step, judged the way `send` will send it."""
        xml, bulk = self._ways(run)
        return affordable(
            claimed,
            bulk=bulk or xml,
            requests=requests,
            types_assumed=self.config.assume_default_contact_type,
        )

    async def send(self, claimed: list[Change], run: FlushRun) -> None:
        """Settle or send every claimed change."""
        orphans = {
            c.seq: ("CreateGone", "the create of its ref is no longer waiting")
            for c in claimed
            if c.contact_id is None and c.operation is not Operation.CREATE
        }
        await run.bury(orphans)
        live = [c for c in claimed if c.seq not in orphans]
        creates = [c for c in live if c.operation is Operation.CREATE]
        updates = [c for c in live if c.operation is Operation.UPDATE]
        type_changes = [
            c for c in live if c.operation in {Operation.CONTACT_TYPE, Operation.PROMOTE}
        ]
        to_create, became_updates = await self._look_up_creates(creates, run)
        xml, bulk = self._ways(run)
        routes = route(
            to_create,
            [*updates, *became_updates],
            type_changes,
            xml=xml,
            bulk=bulk,
            types_assumed=self.config.assume_default_contact_type,
        )
        self._single_next = False
        await run.bury(
            {
                c.seq: ("NotInXml", "a contact-type change cannot be sent as an XML import")
                for c in routes.not_in_xml
            }
        )
        await self._export.write(list(routes.xml_creates), list(routes.xml_updates), run)
        await self._send_singly(list(routes.singles), run)
        await self._send_bulk(Operation.CREATE, list(routes.bulk_creates), run)
        await self._send_bulk(Operation.UPDATE, list(routes.bulk_updates), run)

    # --- creates that may exist ----------------------------------------------------------

    async def _look_up_creates(
        self, creates: list[Change], run: FlushRun
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
                found = await self._calls.lookup(change, run)
            except MultipleMatches as exc:
                await run.bury({change.seq: multiple_matches(exc)})
                continue
            except EngageHTTPError as exc:
                await run.bury({change.seq: (exc.error_code, str(exc))})
                continue
            if found is None:
                to_create.append(change)
                continue
            update = await self._existing(change, found, run)
            if update is not None:
                became_updates.append(update)
        return to_create, became_updates

    async def _existing(self, change: Change, contact_id: str, run: FlushRun) -> Change | None:
        """The create's contact is already on Engage: finish it, or return the update to send."""
        body = update_for_existing(change.if_exists, change.body, change.folded)
        run.count("reconciled")
        if body is None:
            await run.created(change, contact_id)
            return None
        await run.became_update(change, contact_id, body)
        return attrs.evolve(
            change,
            operation=Operation.UPDATE,
            contact_id=contact_id,
            contact_key=contact_key(contact_id=contact_id),
            body=body,
            folded=None,
            lookup_first=False,
        )

    # --- one by one ----------------------------------------------------------------------

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
            return _http.promote_to_member(
                self._root, version, guid, body, source=change.query.get("source")
            )
        return _http.update_contact_type(self._root, guid, change.contact_type or "")

    async def _write(self, call: _http.Call, changes: list[Change], run: FlushRun) -> Any:
        """Send one write carrying `changes`; when it may have reached Engage without a
        verdict (no answer, a 5xx, abandoned on a stop), they are noted as maybe sent.
        """
        try:
            return await self._calls.request(call, run, write=True)
        except Outage as exc:
            if exc.request_sent:
                run.may_have_reached(changes)
            raise
        except Stopped as exc:
            if exc.abandoned:
                run.may_have_reached(changes)
            raise
        except EngageServerError as exc:
            if create_outcome(error=exc) is not CreateOutcome.ROLLED_BACK:
                run.may_have_reached(changes)
            raise

    async def _send_singly(self, changes: list[Change], run: FlushRun) -> None:
        """Send changes one by one through the single endpoints.

        The creates among them are recorded as about to be sent, in one commit, first.
        """
        if not changes:
            return
        await run.about_to_send(changes)
        server_failures: list[tuple[Change, EngageServerError]] = []
        for change in changes:
            try:
                data = await self._write(self._single_call(change), [change], run)
            except (RateLimited, EngageAuthError, EngageConfigurationError) as exc:
                raise self._calls.outage_for(exc) from exc
            except EngageServerError as exc:
                server_failures.append((change, exc))
                if not run.served and len(server_failures) >= _SERVER_ERRORS_FOR_OUTAGE:
                    await self._outage_after(server_failures, run)
                continue
            except EngageHTTPError as exc:
                await self._rejected(change, exc, run)
                continue
            run.count("sent")
            await self._applied(change, data, run)
        if server_failures:
            if not run.served:
                await self._outage_after(server_failures, run)
            await self._count_server_failures(server_failures, run)

    async def _applied(self, change: Change, data: Any, run: FlushRun) -> None:
        if change.operation is not Operation.CREATE:
            await run.finish([change])
            run.count("updated", operation=change.operation)
            return
        guid = contact_id_in(data)
        if guid is None:
            # Created, but Engage did not say as whom: its lookup will tell.
            await run.release(
                [change], error="the create's answer held no contact id", maybe_sent=True
            )
            return
        await run.created(change, guid)
        run.count("created")

    async def _rejected(self, change: Change, exc: EngageHTTPError, run: FlushRun) -> None:
        """Engage answered no to one change: decide between dead, waiting, and existing."""
        await run.engage_answered(write=True)
        if change.operation is Operation.CREATE:
            outcome = create_outcome(error=exc)
            if outcome is CreateOutcome.EXISTS:
                try:
                    found = await self._calls.lookup(change, run)
                except MultipleMatches as multiple:
                    await run.bury({change.seq: multiple_matches(multiple)})
                    return
                if found is not None:
                    update = await self._existing(change, found, run)
                    if update is not None:
                        await self._send_singly([update], run)
                    return
                if change.attempts + 1 < self.config.max_attempts:
                    # Engage says it exists, its lookup does not see it yet: look again later.
                    await run.release(
                        [change],
                        delay=background_delay(self.config.background_delays, change.attempts),
                        count_attempt=True,
                        error=str(exc),
                        maybe_sent=True,
                    )
                    return
            if outcome is CreateOutcome.BEING_CREATED:
                # Someone's create is in progress: this one is looked up before it goes again.
                await run.release([change], delay=self.config.background_delays[0], maybe_sent=True)
                return
        if exc.status == 404 and not isinstance(exc, ContactNotFound):
            # The endpoint itself is missing: not this change's fault.
            raise Outage(str(exc), self.config.background_delays[-1])
        if isinstance(exc, MultipleMatches):
            await run.bury({change.seq: multiple_matches(exc)})
            return
        await run.bury({change.seq: (exc.error_code or f"HTTP{exc.status}", str(exc))})

    async def _outage_after(
        self, failures: list[tuple[Change, EngageServerError]], run: FlushRun
    ) -> NoReturn:
        """No write was taken in this step: the 5xx mean an outage, and every flusher pauses.

        Only changes already suspected of being poison (they had a 5xx while Engage took other
        writes, and are now sent alone) count it: a lone poisonous change looks exactly like an
        outage, and without this it would pause every flusher for ever instead of ending dead.
        """
        suspects = [(c, exc) for c, exc in failures if c.send_alone and c.attempts > 0]
        await self._count_server_failures(suspects, run)
        raise Outage(str(failures[-1][1]))

    async def _count_server_failures(
        self, failures: list[tuple[Change, EngageServerError]], run: FlushRun
    ) -> None:
        """Engage took other writes, so these 5xx count against their changes.

        Except a 504 ``RequestTimeOut``: Engage rolled the change back because it was slow,
        which says nothing against the change.
        """
        dead: dict[int, tuple[str | None, str]] = {}
        for change, exc in failures:
            rolled_back = create_outcome(error=exc) is CreateOutcome.ROLLED_BACK
            if exc.status == 504:
                await run.release(
                    [change], delay=self.config.background_delays[0], maybe_sent=not rolled_back
                )
                continue
            if change.attempts + 1 >= self.config.max_attempts:
                dead[change.seq] = (exc.error_code or f"HTTP{exc.status}", str(exc))
            else:
                await run.release(
                    [change],
                    delay=background_delay(self.config.background_delays, change.attempts),
                    count_attempt=True,
                    error=str(exc),
                    send_alone=True,
                    maybe_sent=True,
                )
        await run.bury(dead)

    # --- in bulk -------------------------------------------------------------------------

    async def _send_bulk(self, kind: Operation, changes: list[Change], run: FlushRun) -> None:
        """Send creates or updates through the bulk endpoint, one request per contact type
        (and, for updates, per choice of `avoidTriggeringExport`).
        """
        default_type = self.config.default_contact_type
        configured = self.config.avoid_triggering_export
        groups: dict[tuple[str, bool], list[Change]] = {}
        for change in changes:
            key = (change.contact_type or default_type, change.avoids_export(configured))
            groups.setdefault(key, []).append(change)
        for (group_type, avoid_export), members in sorted(groups.items()):
            for first in range(0, len(members), self.config.bulk_max_items):
                chunk = members[first : first + self.config.bulk_max_items]
                items = [self._bulk_item(kind, c) for c in chunk]
                body = _http.encode_json(items)
                if len(body) <= MAX_BULK_BYTES:  # as nearly always: one encoding
                    await self._send_chunk(
                        kind, group_type, chunk, body, run, avoid_export=avoid_export
                    )
                    continue
                encoded = [_http.encode_json(item) for item in items]
                for start, end in bulk_chunks(
                    [len(item) for item in encoded], len(encoded), MAX_BULK_BYTES
                ):
                    await self._send_chunk(
                        kind,
                        group_type,
                        chunk[start:end],
                        b"[" + b",".join(encoded[start:end]) + b"]",
                        run,
                        avoid_export=avoid_export,
                    )

    @staticmethod
    def _bulk_item(kind: Operation, change: Change) -> dict[str, Any]:
        if kind is Operation.CREATE:
            return without_type(change.body or {})
        return {**(change.body or {}), "contactId": change.contact_id}

    async def _send_chunk(
        self,
        kind: Operation,
        contact_type: str,
        chunk: list[Change],
        body: bytes,
        run: FlushRun,
        *,
        avoid_export: bool = False,
    ) -> None:
        creates = chunk if kind is Operation.CREATE else []
        updates = chunk if kind is Operation.UPDATE else []
        if self.bulk_refused:  # by Engage, for an earlier chunk of this step
            await self._export.write(creates, updates, run)
            return
        if kind is Operation.CREATE:
            call = _http.bulk_create(self._root, contact_type, body)
        else:
            call = _http.bulk_update(
                self._root, contact_type, body, avoid_triggering_export=avoid_export
            )
        await run.about_to_send(chunk)
        try:
            data = await self._write(call, chunk, run)
        except Outage:
            self._single_next = True
            raise
        except EngageConfigurationError as exc:
            raise self._calls.outage_for(exc) from exc
        except EngageServerError as exc:
            self._single_next = True
            raise Outage(str(exc)) from exc
        except (InvalidRequest, EngageValidationError) as exc:
            # The request as a whole was refused: one by one, each change gets its own answer.
            log.warning(
                "bulk request refused (%s); sending %d change(s) one by one", exc, len(chunk)
            )
            await run.release(chunk, send_alone=True)
            return
        except EngageHTTPError as exc:
            if exc.status in {403, 404}:
                log.warning("Engage refuses the bulk API (%s); writing XML files instead", exc)
                self.bulk_refused = True
                await self._export.write(creates, updates, run)
                return
            raise self._calls.outage_for(exc) from exc
        batch_id = _http.read_batch_id(data)
        if batch_id is None:
            # Accepted, but with nothing to follow: the changes' fate is unknown, so each is
            # sent again on its own (creates are looked up first).
            await run.release(
                chunk, send_alone=True, error="bulk answer held no batch id", maybe_sent=True
            )
            return
        seqs = [c.seq for c in chunk]
        await run.store.submit_batch(
            batch_id, kind, contact_type, seqs, first_poll=self.config.batch_poll_initial
        )
        run.let_go(seqs)
        run.count("sent", len(chunk))
        log.info("batch %s submitted: %d %s(s)", batch_id, len(chunk), kind)
