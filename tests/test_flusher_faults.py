"""Tests of `OutboxFlusher` when things go wrong: lost replies, outages and the shared pause,
poison changes, the bulk API refused (XML files), and leases between several flushers.

Everything runs against `FakeEngage` over real sockets; the outbox is inspected with SQL.
Every test runs on both outbox backends, except one about how SQLite judges leases.
"""

from __future__ import annotations

import asyncio
import collections
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BACKENDS,
    BULK,
    CONTACTS,
    FLUSHER_JUMP_LIMIT,
    FakeClock,
    assert_settled,
    attribute,
    by_change_id,
    changes,
    contact_type,
    drain,
    eventually,
    execute,
    flusher_config,
    one_id,
    query,
    retry_wait,
    writes,
)
from lxml import etree

import engage_async as ea
from engage_async import _xmlfiles
from engage_async._outboxes import open_outbox
from engage_async._retry import BACKGROUND_JITTER
from engage_async.testing import FakeEngage

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

XML_NAME = re.compile(r"\d{14}_\d+_contacts\.xml")
XML_NS = {"c": _xmlfiles.NAMESPACE}


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    """The clock of every session and flusher in a test; batch polls pass at once on it."""
    return FakeClock(jump_limit=FLUSHER_JUMP_LIMIT)


def control(config: ea.EngageConfig) -> dict[str, str]:
    """The outbox's shared flusher state (the pause)."""
    return {row["name"]: row["value"] for row in query(config, "SELECT * FROM control")}


def paused_until(config: ea.EngageConfig) -> float | None:
    """When the shared pause ends, if one is recorded."""
    value = control(config).get("paused_until")
    return None if value is None else float(value)


async def queue_update(engage: ea.EngageSession, target: str, body: dict[str, Any]) -> str:
    """Queue an update (the session's circuit is open or the contact has changes waiting)."""
    delivery = await engage.update_contact(target, body)
    assert delivery.queued
    return delivery.change_id or ""


def write_targets(fake: FakeEngage) -> collections.Counter[str]:
    """How often each contact was the target of a write Engage received.

    Creates count by email (bulk items and single bodies), updates and type changes by
    contact id (bulk items and paths).
    """
    seen: collections.Counter[str] = collections.Counter()
    for request in writes(fake):
        if request.path == BULK:
            for item in request.json():
                seen[item.get("contactId") or item["email"]] += 1
        elif request.path == CONTACTS:
            seen[request.json()["email"]] += 1
        else:
            seen[request.path.removeprefix(f"{CONTACTS}/").split("/")[0]] += 1
    return seen


def xml_files(config: ea.EngageConfig) -> list[Path]:
    """The import files in the XML directory."""
    if not config.xml_dir.exists():
        return []
    return sorted(config.xml_dir.iterdir())


def xml_contacts(path: Path) -> list[tuple[str, dict[str, str]]]:
    """(element name, {field: text}) for every contact under <new> in an import file."""
    root = etree.parse(str(path)).getroot()
    result = []
    for element in root.iterfind("c:new/*", XML_NS):
        fields = {etree.QName(child).localname: child.text or "" for child in element}
        result.append((etree.QName(element).localname, fields))
    return result


# --- lost replies -------------------------------------------------------------------------------


async def test_a_lost_reply_to_a_single_create_does_not_duplicate_it(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Engage applies a create but the answer never arrives: the next try looks it up first.

    One contact exists afterwards, its GUID is recorded, and the update queued on its ref is
    applied to it.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        queued = await engage.create_contact({"email": "lost@example.com", "firstName": "L"})
        await engage.update_contact_type(queued.ref or "", "Contact")
        await fake.come_up()
        fake.inject("lost_reply", method="POST", path=CONTACTS, times=1)
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await drain(flusher, clock)
        guid = one_id(fake, "lost@example.com")
        assert guid == await engage.resolve(queued.ref or "")

    assert 0 == report.pending
    assert 1 == len(fake.requests_to("POST", CONTACTS))
    assert "Contact" == contact_type(fake, guid)
    assert ["done", "done"] == [row["state"] for row in changes(config)]
    assert 0 == changes(config)[0]["attempts"]


async def test_a_lost_reply_to_a_bulk_create_does_not_duplicate_its_contacts(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Engage accepts a bulk create but the batch id never arrives: no contact is made twice.

    The rows come back, each create is looked up before it is sent again, and every key ends
    with exactly one contact whose GUID the ref resolves to.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=3)
    emails = [f"bulk{i}@example.com" for i in range(4)]
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        refs = [(await engage.create_contact({"email": email})).ref or "" for email in emails]
        await fake.come_up()
        fake.inject("lost_reply", method="POST", path=BULK, times=1)
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await drain(flusher, clock)
        for email, ref in zip(emails, refs, strict=True):
            assert one_id(fake, email) == await engage.resolve(ref)

    assert 0 == report.pending
    assert 1 == len(fake.requests_to("POST", BULK))
    assert [] == fake.requests_to("POST", CONTACTS)
    assert ["done"] * 4 == [row["state"] for row in changes(config)]


# --- outages pause every flusher --------------------------------------------------------------


# Longer than any pause the background delays alone would give, so the pause follows it.
RETRY_AFTER = 45.0


async def _break(fake: FakeEngage, how: str) -> None:
    if how == "refused":
        await fake.go_down()
    elif how == "5xx":
        fake.inject("server_error", status=503)
    elif how == "timeout":
        fake.inject("hang")
    elif how == "401":
        fake.inject("status", status=401)
    else:
        fake.inject("rate_limited", retry_after=RETRY_AFTER)


async def _mend(fake: FakeEngage) -> None:
    fake.clear_faults()
    await fake.come_up()


@pytest.mark.parametrize("how", ["refused", "5xx", "timeout", "429", "401"])
async def test_an_outage_pauses_every_flusher_without_counting_attempts(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock, how: str
) -> None:
    """No answer, a 5xx, a timeout, a 429 or a 401 (a key to fix) gives the rows back untouched
    and pauses all. A 401 is also raised from flush_once: no waiting fixes a refused key.

    Attempts stay 0, the pause is in the outbox's control table (a background delay long, or
    as long as Retry-After asks), a second flusher on the file sends nothing while it lasts;
    afterwards everything is delivered and the pause is lifted.
    """
    config = flusher_config(fake, tmp_path, background_delays=(30.0,), request_timeout=0.2)
    guids = [fake.add_contact({"email": f"o{i}@example.com"}) for i in range(3)]
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for guid in guids:
            await queue_update(engage, guid, {"city": "Boden"})
        created = await engage.create_contact({"email": "onew@example.com"})
        await fake.come_up()
        await _break(fake, how)
        started = clock.wall()
        async with ea.OutboxFlusher(config, clock=clock) as first:
            if how == "401":
                with pytest.raises(ea.EngageAuthError):
                    await first.flush_once()
            else:
                report = await first.flush_once()
                assert (0, 0, 0, 4) == (report.sent, report.updated, report.dead, report.pending)
        rows = changes(config)
        assert [("pending", 0)] * 4 == [(row["state"], row["attempts"]) for row in rows]
        assert all(row["lease_owner"] is None for row in rows)
        until = paused_until(config)
        assert until is not None
        shortest, longest = (
            (RETRY_AFTER, RETRY_AFTER) if how == "429" else (30.0, 30.0 * (1 + BACKGROUND_JITTER))
        )
        assert shortest <= until - started <= longest

        await _mend(fake)
        fake.clear_requests()
        async with ea.OutboxFlusher(config, clock=clock) as second:
            report = await second.flush_once()
            assert (0, 4) == (report.sent, report.pending)
            clock.advance_to(until - 0.01)
            report = await second.flush_once()
            assert (0, 4) == (report.sent, report.pending)
            assert [] == fake.requests
            clock.advance_to(until)
            report = await second.flush_once()
        assert (0, 0) == (report.dead, report.pending)
        assert one_id(fake, "onew@example.com") == await engage.resolve(created.ref or "")

    assert ["Boden"] * 3 == [attribute(fake, guid, "city") for guid in guids]
    assert "paused_until" not in control(config)
    assert [0] * 4 == [row["attempts"] for row in changes(config)]


async def test_writes_failing_while_lookups_answer_is_an_outage_not_poison(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Every write answered 503 while GET lookups work is still an outage.

    Creates queued during an outage are looked up first; those lookups answering must not
    make the creates' 503s count as their own failures: attempts stay 0 and every flusher
    pauses, so a long write outage cannot push the creates into the dead letters.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for i in range(2):
            await engage.create_contact({"email": f"wo{i}@example.com"})
        await fake.come_up()
    fake.inject("server_error", method="POST", status=503)
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await flusher.flush_once()

    assert (0, 2) == (report.dead, report.pending)
    assert [0, 0] == [row["attempts"] for row in changes(config)]
    assert paused_until(config) is not None


async def test_a_409_on_a_single_create_means_the_contact_exists(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Someone created the contact while ours was queued (never sent, so not looked up
    first): 409 ApprovedContactWithKeyExists finishes the create with the existing GUID,
    found by one lookup, nothing dead.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        queued = await engage.create_contact({"email": "race@example.com", "firstName": "Us"})
        await fake.come_up()
        existing = fake.add_contact({"email": "race@example.com", "firstName": "Them"})
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()
        assert existing == await engage.resolve(queued.ref or "")

    assert (0, 0) == (report.dead, report.pending)
    assert 1 == len(fake.requests_to("POST", CONTACTS))
    row = by_change_id(config)[queued.change_id or ""]
    assert ("done", existing, 0) == (row["state"], row["contact_id"], row["attempts"])
    assert [existing] == fake.find("email", "race@example.com")
    assert "Them" == attribute(fake, existing, "firstName")


# --- bulk requests Engage could not settle ------------------------------------------------------


async def test_a_bulk_request_refused_as_a_whole_is_sent_again_one_by_one(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A 400 on a whole bulk request: each change gets its own answer through the single
    endpoints, and all are delivered once.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=3)
    emails = [f"whole{i}@example.com" for i in range(3)]
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for email in emails:
            await engage.create_contact({"email": email})
        await fake.come_up()
    fake.inject("status", method="POST", path=BULK, status=400, times=1)
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await drain(flusher, clock)

    assert (3, 0, 0) == (report.created, report.dead, report.pending)
    assert 1 == len(fake.requests_to("POST", BULK))
    assert sorted(emails) == sorted(r.json()["email"] for r in fake.requests_to("POST", CONTACTS))
    for email in emails:
        one_id(fake, email)


async def test_a_batch_reported_failed_as_a_whole_is_resent_without_duplicates(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Engage reports a batch Failed naming no item: every change in it is sent again one by
    one, the creates looked up first (Engage had in fact applied them), so no contact is made
    twice and the updates are applied.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=3)
    known = [fake.add_contact({"email": f"kw{i}@example.com"}) for i in range(3)]
    emails = [f"fw{i}@example.com" for i in range(3)]
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for email in emails:
            await engage.create_contact({"email": email})
        for guid in known:
            await queue_update(engage, guid, {"city": "Orsa"})
        await fake.come_up()
    fake.inject(
        "status",
        method="GET",
        path=f"{BULK}/status",
        status=200,
        body={"status": "Failed", "failedCount": 0, "failures": []},
        times=2,
    )
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await drain(flusher, clock)

    assert (0, 0) == (report.dead, report.pending)
    assert ["done"] * 6 == [row["state"] for row in changes(config)]
    assert [] == fake.requests_to("POST", CONTACTS)
    for email in emails:
        one_id(fake, email)
    assert ["Orsa"] * 3 == [attribute(fake, guid, "city") for guid in known]
    resent = fake.requests_to("PATCH", f"{CONTACTS}/*-*")
    assert sorted(known) == sorted(r.path.rsplit("/", 1)[1] for r in resent)


async def test_a_batch_that_never_finishes_is_given_up_and_its_creates_sent_alone(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A batch still Pending after `batch_timeout`: its creates are looked up and sent one by
    one; when Engage processes the old batch at last, no contact exists twice.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=2, batch_timeout=60.0)
    emails = ["late1@example.com", "late2@example.com"]
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        refs = [(await engage.create_contact({"email": email})).ref or "" for email in emails]
        await fake.come_up()
        fake.hold_batches = True
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await drain(flusher, clock)
        fake.release_batches()
        for email, ref in zip(emails, refs, strict=True):
            assert one_id(fake, email) == await engage.resolve(ref)

    assert (2, 0, 0) == (report.created, report.dead, report.pending)
    assert 2 == len(fake.requests_to("POST", CONTACTS))
    [batch] = fake.batches.values()
    assert ["ApprovedContactWithKeyExists"] * 2 == [f["errorCode"] for f in batch.failures]


async def test_a_create_engage_says_is_being_created_is_found_on_the_next_try(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """409 ContactWithKeyIsBeingCreated: the create is tried again later, looked up first, and
    finished with the GUID of the contact Engage was making; nothing dead, nothing twice.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        queued = await engage.create_contact({"email": "making@example.com"})
        await fake.come_up()
        fake.inject("being_created", times=1)
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await drain(flusher, clock)
        guid = one_id(fake, "making@example.com")
        assert guid == await engage.resolve(queued.ref or "")

    assert (0, 0) == (report.dead, report.pending)
    assert 1 == len(fake.requests_to("POST", CONTACTS))
    row = by_change_id(config)[queued.change_id or ""]
    assert ("done", guid, 0) == (row["state"], row["contact_id"], row["attempts"])


# --- poison -------------------------------------------------------------------------------------


async def test_a_poisonous_change_dies_after_max_attempts_while_others_flow(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """One update always answered 500 while Engage serves the others in the same flushes: it
    counts attempts, is dead after `max_attempts` with the code, and every other is delivered.
    """
    # One failure opens the session's circuit for a minute: its writes keep queueing.
    config = flusher_config(
        fake, tmp_path, max_attempts=3, breaker_threshold=1, breaker_cooldown=60.0
    )
    poisoned = fake.add_contact({"email": "poison@example.com"})
    others = [fake.add_contact({"email": f"ok{i}@example.com"}) for i in range(3)]
    fake.inject("status", method="PATCH", path=f"{CONTACTS}/{poisoned}", status=500)
    async with (
        ea.EngageSession(config, clock=clock) as engage,
        ea.OutboxFlusher(config, clock=clock) as flusher,
    ):
        await fake.go_down()
        poison = await queue_update(engage, poisoned, {"firstName": "Never"})
        await fake.come_up()
        for guid in others:
            await queue_update(engage, guid, {"firstName": "Fine"})
            clock.advance(retry_wait(config))  # the poisoned change is due again
            await flusher.flush_once()

    row = by_change_id(config)[poison]
    assert ("dead", 3, "InternalServerError") == (row["state"], row["attempts"], row["error_code"])
    assert "500" in row["last_error"]
    assert ["Fine"] * 3 == [attribute(fake, guid, "firstName") for guid in others]
    assert 3 == len(fake.requests_to("PATCH", f"{CONTACTS}/{poisoned}"))
    assert_settled(config)


async def test_a_poisonous_change_retried_alone_still_ends_dead(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A change that always gets a 500 while Engage serves everything else is poison even
    when it is retried on its own.

    After its first failure it is sent alone (the others are delivered); that lone 500 must not
    be taken for an outage over and over, pausing every flusher each time while the change is
    never dead-lettered: draining ends with it dead after `max_attempts`.
    """
    config = flusher_config(fake, tmp_path, max_attempts=3)
    poisoned = fake.add_contact({"email": "poison@example.com"})
    others = [fake.add_contact({"email": f"ok{i}@example.com"}) for i in range(3)]
    fake.inject("status", method="PATCH", path=f"{CONTACTS}/{poisoned}", status=500)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        poison = await queue_update(engage, poisoned, {"firstName": "Never"})
        for guid in others:
            await queue_update(engage, guid, {"firstName": "Fine"})
        await fake.come_up()
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        await drain(flusher, clock, rounds=30)

    assert ["Fine"] * 3 == [attribute(fake, guid, "firstName") for guid in others]
    row = by_change_id(config)[poison]
    assert ("dead", 3) == (row["state"], row["attempts"])


# --- the bulk API refused: XML files ------------------------------------------------------------


@pytest.mark.parametrize("status", [403, 404])
async def test_bulk_refused_for_good_writes_xml_files_instead(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock, status: int
) -> None:
    """A 403 or 404 on /contacts/bulk turns the flusher to XML import files.

    The files are named YYYYMMDDHHmmss_<seq>_contacts.xml and validate against the XSD; the
    creates wait for their GUID, the updates are done, both with exported_to naming the file;
    after the refusal no write goes through the API, in this flush or the next.
    """
    # Lookups of the exported creates half a second apart: however slow a flush's steps, the
    # creates are not looked up so often in one flush that they count as never imported.
    config = flusher_config(fake, tmp_path, bulk_threshold=3, background_delays=(0.5,))
    existing = fake.add_contact({"email": "known@example.com"})
    async with ea.EngageSession(config, clock=clock) as engage:
        await engage.get_contact(existing)  # its type is known: its update goes in bulk
        await fake.go_down()
        create_ids = [
            (await engage.create_contact({"email": "x1@example.com", "firstName": "X"})).change_id,
            (
                await engage.create_contact({"email": "x2@example.com"}, contact_type="Contact")
            ).change_id,
        ]
        update_id = await queue_update(engage, existing, {"city": "Gävle"})
        await fake.come_up()
    fake.inject("status", path=BULK, status=status)
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await flusher.flush_once()
        # Once more after queueing another update: still XML, still no API write.
        async with ea.EngageSession(config, clock=clock) as engage:
            await fake.go_down()
            later = await queue_update(engage, existing, {"city": "Luleå"})
            await fake.come_up()
        clock.advance(retry_wait(config))  # the next lookup is due
        await flusher.flush_once()

    assert (3, 2) == (report.exported, report.pending)
    files = xml_files(config)
    assert files
    for path in files:
        assert XML_NAME.fullmatch(path.name), path.name
        assert [] == _xmlfiles.validate_file(path)
    rows = by_change_id(config)
    for change_id in create_ids:
        row = rows[change_id or ""]
        assert "waiting_guid" == row["state"]
        assert Path(row["exported_to"]) in files
    for change_id in (update_id, later):
        row = rows[change_id]
        assert "done" == row["state"]
        assert Path(row["exported_to"]) in files
    first_refusal = next(i for i, r in enumerate(fake.requests) if r.path == BULK)
    after = [r for r in fake.requests[first_refusal:] if r.method in {"POST", "PATCH"}]
    assert [] == [r for r in after if r.fault is None]
    assert [] == fake.find("email", "x1@example.com")
    exported = [item for path in files for item in xml_contacts(path)]
    assert ("member", "x1@example.com") in [(kind, f.get("email")) for kind, f in exported]
    assert ("contact", "x2@example.com") in [(kind, f.get("email")) for kind, f in exported]
    assert {"contactId": existing, "city": "Luleå"} in [f for _, f in exported]


async def test_after_bulk_was_refused_a_type_change_goes_through_no_api_write(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """The contract: when bulk is refused, the flusher "sends no write through the API".

    A contact-type change queued after the refusal cannot go into an XML file; it must not be
    sent to updateContactType either (dead-lettered with a reason, as in XML mode).
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=2)
    existing = fake.add_contact({"email": "typed@example.com"})
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for i in range(2):
            await engage.create_contact({"email": f"r{i}@example.com"})
        await fake.come_up()
        fake.inject("status", path=BULK, status=403)
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            await flusher.flush_once()
            await fake.go_down()
            change = await engage.update_contact_type(existing, "Contact")
            await fake.come_up()
            await flusher.flush_once()

    assert [] == fake.requests_to("POST", f"{CONTACTS}/*/updateContactType")
    row = by_change_id(config)[change.change_id or ""]
    assert "dead" == row["state"]
    assert row["last_error"]


async def test_xml_mode_sends_no_write_through_the_api(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """fallback_mode="xml": creates and updates go to valid import files, only GET lookups
    reach Engage, contact-type changes are dead with a reason, and once the import has run
    the creates' GUIDs are reconciled and the changes queued on their refs follow as XML
    updates keyed by contactId.
    """
    # One lookup per waiting create and flush: the next is half a minute away.
    config = flusher_config(fake, tmp_path, fallback_mode="xml", background_delays=(30.0,))
    existing = fake.add_contact({"email": "xmlknown@example.com"})
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        created = await engage.create_contact({"email": "xn@example.com", "firstName": "N"})
        await engage.update_contact(created.ref or "", {"lastName": "Folded"})
        update = await queue_update(engage, existing, {"firstName": "Known"})
        retype = await engage.update_contact_type(existing, "Contact")
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()
            assert (2, 1) == (report.exported, report.dead)
            # Queued behind the exported create, which waits for its GUID.
            after = await engage.update_contact(created.ref or "", {"city": "Mora"})
            assert after.queued
            row = by_change_id(config)[created.change_id or ""]
            assert ("waiting_guid", 1) == (row["state"], row["lookups"])
            assert Path(row["exported_to"]) in xml_files(config)

            # Engage runs the import; the next lookup finds the contact.
            guid = fake.add_contact({"email": "xn@example.com", "firstName": "N"})
            clock.advance(retry_wait(config))  # the next lookup is due
            report = await flusher.flush_once()
            assert (1, 1, 0) == (report.reconciled, report.exported, report.pending)
        assert guid == await engage.resolve(created.ref or "")

    assert [] == writes(fake)
    assert {"GET"} == {r.method for r in fake.requests}
    rows = by_change_id(config)
    assert ("dead", "NotInXml") == (
        rows[retype.change_id or ""]["state"],
        rows[retype.change_id or ""]["error_code"],
    )
    assert rows[retype.change_id or ""]["last_error"]
    assert "done" == rows[update]["state"]
    assert "done" == rows[after.change_id or ""]["state"]
    files = xml_files(config)
    assert len(files) >= 2
    for path in files:
        assert XML_NAME.fullmatch(path.name), path.name
        assert [] == _xmlfiles.validate_file(path)
    exported = [item for path in files for item in xml_contacts(path)]
    assert (
        "member",
        {"email": "xn@example.com", "firstName": "N", "lastName": "Folded"},
    ) in exported
    assert ("member", {"contactId": existing, "firstName": "Known"}) in exported
    assert ("member", {"contactId": guid, "city": "Mora"}) in exported


async def test_an_xml_update_is_written_under_its_contacts_own_type(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """An update to a contact created as a Contact is written in a <contact> element.

    The contract names the element after the contact type; the flusher knows this one from
    the create it queued, so the update must not be filed under the default <member>.
    """
    config = flusher_config(fake, tmp_path, fallback_mode="xml")
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        created = await engage.create_contact(
            {"email": "plain@example.com"}, contact_type="Contact"
        )
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            await flusher.flush_once()
            await engage.update_contact(created.ref or "", {"firstName": "Plain"})
            guid = fake.add_contact({"email": "plain@example.com"}, contact_type="Contact")
            clock.advance(retry_wait(config))  # the next lookup is due
            report = await flusher.flush_once()
            assert 0 == report.pending

    exported = [item for path in xml_files(config) for item in xml_contacts(path)]
    assert ("contact", {"contactId": guid, "firstName": "Plain"}) in exported


# --- leases -------------------------------------------------------------------------------------


async def test_two_flushers_on_one_file_never_send_a_change_twice(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Two flushers draining one outbox at once: every contact is written exactly as often as
    it has changes, never twice for the same change, and Engage ends as expected.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=3, bulk_max_items=4)
    existing = [fake.add_contact({"email": f"ex{i}@example.com"}) for i in range(12)]
    emails = [f"two{i}@example.com" for i in range(24)]
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for i, email in enumerate(emails):
            await engage.create_contact(
                {"email": email, "firstName": "T"}, contact_type="Contact" if i % 4 else "Member"
            )
        for guid in existing:
            await queue_update(engage, guid, {"city": "Falun"})
        for guid in existing[:4]:
            await engage.update_contact_type(guid, "Contact")
        await fake.come_up()
    async with (
        ea.OutboxFlusher(config, clock=clock) as one,
        ea.OutboxFlusher(config, clock=clock) as two,
    ):
        for _ in range(40):
            reports = await asyncio.gather(
                one.flush_once(wait_for_batches=False), two.flush_once(wait_for_batches=False)
            )
            if max(report.pending for report in reports) == 0:
                break
            # Batch polls, retries and pauses come due for both.
            clock.advance(retry_wait(config))

    assert [] == [row for row in changes(config) if row["state"] != "done"]
    # One write per change: a create per email, an update per existing contact, and a type
    # change for four of them.
    expected = collections.Counter(emails + existing + existing[:4])
    assert expected == write_targets(fake)
    for email in emails:
        one_id(fake, email)
    assert ["Falun"] * 12 == [attribute(fake, guid, "city") for guid in existing]
    assert ["Contact"] * 4 == [contact_type(fake, guid) for guid in existing[:4]]


@pytest.mark.sqlite_only  # PostgreSQL trusts lease_until, by its clock: test_pg_outbox.py
async def test_a_row_whose_lease_expired_is_delivered_by_another_flusher(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """An inflight row whose owner stopped renewing goes back to pending and is delivered,
    once another flusher has seen the owner stand still for a whole lease on its own clock.
    """
    config = flusher_config(fake, tmp_path)
    guid = fake.add_contact({"email": "leased@example.com"})
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        change = await queue_update(engage, guid, {"firstName": "Leased"})
        await fake.come_up()
    execute(
        config,
        "UPDATE changes SET state = 'inflight', lease_owner = 'crashed:1', lease_until = ?",
        [clock.wall() - 1],
    )
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        first = await flusher.flush_once()
        clock.advance(config.lease_seconds + 1)
        report = await flusher.flush_once()

    assert (0, 1) == (first.updated, first.pending)
    assert (1, 0) == (report.updated, report.pending)
    row = by_change_id(config)[change]
    assert ("done", None) == (row["state"], row["lease_owner"])
    assert "Leased" == attribute(fake, guid, "firstName")


async def test_a_row_leased_by_a_live_flusher_is_left_alone(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A row another flusher holds under a lease still running is not sent."""
    config = flusher_config(fake, tmp_path)
    guid = fake.add_contact({"email": "held@example.com"})
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        change = await queue_update(engage, guid, {"firstName": "Held"})
        await fake.come_up()
    execute(
        config,
        "UPDATE changes SET state = 'inflight', lease_owner = 'alive:1', lease_until = ?",
        [clock.wall() + 60],
    )
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await flusher.flush_once()

    assert (0, 1) == (report.sent, report.pending)
    assert ("inflight", "alive:1") == (
        by_change_id(config)[change]["state"],
        by_change_id(config)[change]["lease_owner"],
    )
    assert [] == writes(fake)


async def test_a_flusher_cancelled_mid_flush_gives_its_rows_back(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Cancelling a flush while its request hangs returns the row to pending at once; another
    flusher then delivers it.
    """
    config = flusher_config(fake, tmp_path)
    guid = fake.add_contact({"email": "cancel@example.com"})
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        change = await queue_update(engage, guid, {"firstName": "Again"})
        await fake.come_up()
    fake.inject("hang", method="PATCH", times=1)
    async with ea.OutboxFlusher(config, clock=clock) as stuck:
        flushing = asyncio.create_task(stuck.flush_once())
        await eventually(lambda: fake.requests_to("PATCH", f"{CONTACTS}/*"))
        assert "inflight" == by_change_id(config)[change]["state"]
        flushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flushing
    row = by_change_id(config)[change]
    assert ("pending", None, 0) == (row["state"], row["lease_owner"], row["attempts"])
    async with ea.OutboxFlusher(config, clock=clock) as other:
        report = await other.flush_once()

    assert (1, 0) == (report.updated, report.pending)
    assert "Again" == attribute(fake, guid, "firstName")


async def test_a_create_reclaimed_after_its_flusher_died_is_looked_up_first(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A create the session knew to be new (queued without "look up first") is recorded as
    about to be sent just before its POST; if its flusher dies with the POST applied, the next
    flusher finds the contact by key instead of creating it again.
    """
    config = flusher_config(fake, tmp_path)
    # Engage answers the lookup (not found) but times out every create: queued as new.
    fake.inject("create_timeout")
    async with ea.EngageSession(config, clock=clock) as engage:
        queued = await engage.create_contact({"email": "ghost@example.com", "firstName": "G"})
        assert queued.queued
    fake.clear_faults()
    assert 0 == by_change_id(config)[queued.change_id or ""]["lookup_first"]

    outbox = await open_outbox(config, clock=clock)
    try:
        [claimed] = await outbox.claim("doomed:1", limit=10, lease_seconds=config.lease_seconds)
        assert 0 == by_change_id(config)[queued.change_id or ""]["sending"]
        await outbox.about_to_send("doomed:1", [claimed.seq])
    finally:
        await outbox.close()
    assert not claimed.lookup_first
    assert 1 == by_change_id(config)[queued.change_id or ""]["sending"]
    # The dead flusher's POST reached Engage before it died.
    guid = fake.add_contact({"email": "ghost@example.com", "firstName": "G"})
    posts = len(fake.requests_to("POST", CONTACTS))

    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        await flusher.flush_once()  # sees the dead flusher's row, not yet its silence
        clock.advance(config.lease_seconds + 1)
        report = await flusher.flush_once()

    assert (0, 1, 0) == (report.created, report.reconciled, report.pending)
    assert posts == len(fake.requests_to("POST", CONTACTS))
    row = by_change_id(config)[queued.change_id or ""]
    assert ("done", guid) == (row["state"], row["contact_id"])
    assert [guid] == fake.find("email", "ghost@example.com")


async def test_flush_once_settles_a_batch_whose_dead_owners_lease_runs_out_meanwhile(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """flush_once(wait_for_batches=True) waits for a batch another flusher held when it died.

    Once that lease expires the batch is polled and settled; flush_once must not spin on a
    batch it can never claim.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=2)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for i in range(2):
            await engage.create_contact({"email": f"orphan{i}@example.com"})
        await fake.come_up()
    fake.hold_batches = True
    async with ea.OutboxFlusher(config, clock=clock) as first:
        await first.flush_once(wait_for_batches=False)
    # The flusher polling the batch died mid-poll: its lease runs out in five minutes.
    lease_left = 300.0
    execute(
        config,
        "UPDATE batches SET lease_owner = 'dead:1', lease_until = ?, next_poll_at = 0",
        [clock.wall() + lease_left],
    )
    fake.hold_batches = False
    # From here on, time moves only when the test moves it, but for the few milliseconds the
    # rate budget spaces background requests by.
    clock.jump_limit = 0.01
    async with ea.OutboxFlusher(config, clock=clock) as second:
        flushing = asyncio.create_task(second.flush_once())
        # It looks at the batch again every second, without polling it: its owner may live.
        await clock.until_sleeping(1.0)
        assert [] == fake.requests_to("GET", f"{BULK}/status")
        assert not flushing.done()
        # The owner's heartbeat stood still for a whole lease: it is gone.
        clock.advance(config.lease_seconds + 1)
        report = await asyncio.wait_for(flushing, 5)

    assert (2, 0) == (report.created, report.pending)
    assert ["finished"] == [b["state"] for b in query(config, "SELECT state FROM batches")]


# --- a running flusher survives odd answers -----------------------------------------------------


async def test_a_running_flusher_survives_an_unreadable_answer(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A 2xx whose body is not JSON (a proxy's page) does not end a background flusher.

    The change it concerned is sent again later and the flusher keeps draining what the app
    queues afterwards.
    """
    # One failure opens the session's circuit for a minute: its writes keep queueing.
    config = flusher_config(fake, tmp_path, breaker_threshold=1, breaker_cooldown=60.0)
    first = fake.add_contact({"email": "page@example.com"})
    second = fake.add_contact({"email": "after@example.com"})
    fake.inject(
        "status",
        method="PATCH",
        status=200,
        body="<html>maintenance</html>",
        content_type="text/html",
        times=1,
    )
    async with (
        ea.EngageSession(config, clock=clock) as engage,
        ea.OutboxFlusher(config, clock=clock) as flusher,
    ):
        await fake.go_down()
        await queue_update(engage, first, {"firstName": "One"})
        await fake.come_up()
        task = flusher.start()
        await eventually(lambda: fake.requests_to("PATCH", f"{CONTACTS}/*"))
        # The flusher paused every flusher and waits; the pause runs out.
        await clock.until_sleeping(config.poll_interval)
        until = paused_until(config)
        assert until is not None
        clock.advance_to(until)
        await queue_update(engage, second, {"firstName": "Two"})
        await eventually(lambda: attribute(fake, second, "firstName") == "Two", timeout=3)
        await eventually(lambda: attribute(fake, first, "firstName") == "One", timeout=3)
        assert not task.done()
