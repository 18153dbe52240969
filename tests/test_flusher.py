"""Tests of `OutboxFlusher` against `FakeEngage` over real sockets: replay, bulk, batches,
GUID reconciliation, dead letters, and a flusher running inside an app.

Changes are queued the way an application queues them (an `EngageSession` while the fake is
down) and the outbox is inspected with plain SQL, so these tests pin what lands on disk as
well as what Engage ends up holding. Every test runs on both outbox backends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import (
    BACKENDS,
    BULK,
    CONTACTS,
    FLUSHER_JUMP_LIMIT,
    LOOKUP,
    NOT_FOUND,
    FakeClock,
    assert_settled,
    attribute,
    bulk_items,
    by_change_id,
    changes,
    contact_type,
    create_outbox,
    drain,
    eventually,
    flusher_config,
    one_id,
    query,
    retry_wait,
    writes,
)

import engage_async as ea
from engage_async.testing import FakeEngage

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    """The clock of every session and flusher in a test; batch polls pass at once on it."""
    return FakeClock(jump_limit=FLUSHER_JUMP_LIMIT)


# --- outage, then recovery ---------------------------------------------------------------------


async def test_outage_then_recovery_delivers_everything_once_in_order(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Changes queued during an outage are all applied once, in per-contact order, via bulk.

    Creates (some updated and promoted through their ref), updates and a contact-type change to
    existing contacts: after recovery one flush leaves one contact per key, every attribute at
    its last written value, every type change applied, and the report counts each change once.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=3, bulk_max_items=3)
    old = fake.add_contact({"email": "old@example.com", "firstName": "Old", "city": "Lund"})
    other = fake.add_contact({"email": "other@example.com", "firstName": "Other"})
    members = [f"m{i}@example.com" for i in range(4)]
    plain = [f"c{i}@example.com" for i in range(3)]
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        refs = {}
        for email in members:
            delivery = await engage.create_contact({"email": email, "firstName": "M"})
            assert delivery.queued
            refs[email] = delivery.ref or ""
        for email in plain:
            delivery = await engage.create_contact(
                {"email": email, "firstName": "C"}, contact_type="Contact"
            )
            refs[email] = delivery.ref or ""
        # Folded into the queued create: the last value wins.
        await engage.update_contact(refs["m0@example.com"], {"lastName": "First"})
        await engage.update_contact(refs["m0@example.com"], {"lastName": "Second"})
        # A promotion is a barrier: the update after it must be applied after it.
        await engage.update_contact(refs["c0@example.com"], {"lastName": "Before"})
        await engage.promote_to_member(refs["c0@example.com"])
        await engage.update_contact(refs["c0@example.com"], {"lastName": "After"})
        await engage.update_contact(refs["c0@example.com"], {"city": "Malmo"})
        # Existing contacts.
        await engage.update_contact(old, {"city": "Uppsala"})
        await engage.update_contact(old, {"city": "Kiruna"})
        await engage.update_contact_type(old, "Contact")
        await engage.update_contact(old, {"firstName": "Moved"})
        await engage.update_contact(other, {"lastName": "Else"})
        await fake.come_up()

        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()

        # 7 creates, then old: update, type, update; other: update; c0: type, update.
        expected = ea.FlushReport(
            sent=13, created=7, updated=6, reconciled=7, dead=0, exported=0, pending=0
        )
        assert expected == report
        assert_settled(config)
        assert [] == [row for row in changes(config) if row["state"] != "done"]
        for email in members + plain:
            guid = one_id(fake, email)
            assert guid == await engage.resolve(refs[email])
    m0 = one_id(fake, "m0@example.com")
    assert ("M", "Second", "Member") == (
        attribute(fake, m0, "firstName"),
        attribute(fake, m0, "lastName"),
        contact_type(fake, m0),
    )
    c0 = one_id(fake, "c0@example.com")
    assert ("After", "Malmo", "Member") == (
        attribute(fake, c0, "lastName"),
        attribute(fake, c0, "city"),
        contact_type(fake, c0),
    )
    assert "Contact" == contact_type(fake, one_id(fake, "c1@example.com"))
    assert ("Moved", "Kiruna", "Contact") == (
        attribute(fake, old, "firstName"),
        attribute(fake, old, "city"),
        contact_type(fake, old),
    )
    assert "Else" == attribute(fake, other, "lastName")


async def test_bulk_requests_hold_at_most_bulk_max_items_of_one_contact_type(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A backlog at the threshold goes through the bulk endpoints, in chunks grouped by type.

    Every bulk request, creates and updates alike, names one contact type and carries only
    contacts of it (FakeEngage, as Engage, refuses an update item of another type), no request
    holds more than `bulk_max_items` items, and no change uses a single endpoint. The types
    of contacts the outbox did not create are the ones the session read from Engage.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=3, bulk_max_items=3)
    existing = {
        fake.add_contact(
            {"email": f"e{i}@example.com"}, contact_type="Contact" if i % 2 else "Member"
        ): "Contact" if i % 2 else "Member"
        for i in range(4)
    }
    types = {f"b{i}@example.com": "Contact" if i % 3 == 0 else "Member" for i in range(9)}
    async with ea.EngageSession(config, clock=clock) as engage:
        for guid in existing:
            await engage.get_contact(guid)  # the session learns each contact's type
        await fake.go_down()
        for email, kind in types.items():
            await engage.create_contact({"email": email}, contact_type=kind)
        for guid in existing:
            await engage.update_contact(guid, {"city": "Visby"})
        await fake.come_up()
    fake.clear_requests()
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await flusher.flush_once()

    assert (0, 0) == (report.pending, report.dead)
    creates = fake.requests_to("POST", BULK)
    assert creates
    for request in creates:
        items = request.json()
        assert 1 <= len(items) <= 3
        assert {request.query["contactType"]} == {types[item["email"]] for item in items}
    assert sorted(types) == sorted(item["email"] for r in creates for item in r.json())
    patches = fake.requests_to("PATCH", BULK)
    for request in patches:
        items = request.json()
        assert 1 <= len(items) <= 3
        assert {request.query["contactType"]} == {existing[item["contactId"]] for item in items}
    assert sorted(existing) == sorted(item["contactId"] for r in patches for item in r.json())
    assert [] == fake.requests_to("POST", CONTACTS)
    assert [] == fake.requests_to("PATCH", f"{CONTACTS}/*-*")
    for email, kind in types.items():
        assert kind == contact_type(fake, one_id(fake, email))
    assert ["Visby"] * 4 == [attribute(fake, guid, "city") for guid in existing]


async def test_a_backlog_above_the_threshold_goes_bulk_even_when_chunks_are_smaller(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """`bulk_threshold` counts the due backlog, not the size of one bulk request.

    Ten due creates with a threshold of 5 and at most 3 items a request: the README says the
    single endpoints are only for a backlog below the threshold, so all ten go through
    POST /contacts/bulk in chunks of at most 3.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=5, bulk_max_items=3)
    emails = [f"t{i}@example.com" for i in range(10)]
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for email in emails:
            await engage.create_contact({"email": email})
        await fake.come_up()
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await flusher.flush_once()

    assert 0 == report.pending
    assert [] == fake.requests_to("POST", CONTACTS)
    sent = bulk_items(fake, "POST")
    assert all(len(items) <= 3 for items in sent)
    assert sorted(emails) == sorted(item["email"] for items in sent for item in items)


async def test_a_backlog_below_the_threshold_uses_the_single_endpoints(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Below `bulk_threshold`, creates, updates and type changes go one by one.

    The single create answers the GUID, so nothing needs reconciling.
    """
    config = flusher_config(fake, tmp_path)  # the default threshold, 20
    existing = fake.add_contact({"email": "known@example.com"})
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        first = await engage.create_contact({"email": "s1@example.com", "firstName": "S"})
        await engage.create_contact({"email": "s2@example.com"}, contact_type="Contact")
        await engage.update_contact(existing, {"lastName": "Known"})
        await engage.update_contact_type(existing, "Contact")
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()
        s1 = one_id(fake, "s1@example.com")
        assert s1 == await engage.resolve(first.ref or "")

    expected = ea.FlushReport(sent=4, created=2, updated=2, reconciled=0, dead=0, pending=0)
    assert expected == report
    assert [] == fake.requests_to("POST", BULK) + fake.requests_to("PATCH", BULK)
    assert 2 == len(fake.requests_to("POST", CONTACTS))
    assert 1 == len(fake.requests_to("PATCH", f"{CONTACTS}/{existing}"))
    assert ("Known", "Contact") == (
        attribute(fake, existing, "lastName"),
        contact_type(fake, existing),
    )
    assert "Contact" == contact_type(fake, one_id(fake, "s2@example.com"))


# --- lookup before sending a create again -------------------------------------------------------


async def test_a_queued_create_whose_contact_exists_returns_the_existing_guid(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """if_exists="return": the create (never sent before, so not looked up first) meets
    Engage's 409 ApprovedContactWithKeyExists, is looked up, found, done with the existing
    GUID. Nothing is created or changed on Engage, and `resolve(ref)` answers the existing
    GUID.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        queued = await engage.create_contact({"email": "twin@example.com", "firstName": "New"})
        existing = fake.add_contact({"email": "twin@example.com", "firstName": "Old"})
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()
        assert existing == await engage.resolve(queued.ref or "")

    assert ea.FlushReport(reconciled=1) == report
    assert [("POST", CONTACTS)] == [(r.method, r.path) for r in writes(fake)]
    assert [existing] == fake.find("email", "twin@example.com")
    assert "Old" == attribute(fake, existing, "firstName")
    row = by_change_id(config)[queued.change_id or ""]
    assert ("done", existing) == (row["state"], row["contact_id"])


async def test_a_queued_create_with_if_exists_update_updates_the_existing_contact(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """if_exists="update": the contact Engage says exists (409) is found and gets the
    create's attributes as an update; nothing is created.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        queued = await engage.create_contact(
            {"email": "upd@example.com", "firstName": "Fresh", "city": "Ystad"},
            if_exists="update",
        )
        existing = fake.add_contact({"email": "upd@example.com", "firstName": "Stale"})
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()
        assert existing == await engage.resolve(queued.ref or "")

    assert (0, 1, 1, 0) == (report.created, report.updated, report.reconciled, report.pending)
    assert 1 == len(fake.requests_to("POST", CONTACTS) + fake.requests_to("POST", BULK))
    patches = fake.requests_to("PATCH", f"{CONTACTS}/{existing}")
    assert [{"email": "upd@example.com", "firstName": "Fresh", "city": "Ystad"}] == [
        r.json() for r in patches
    ]
    assert [existing] == fake.find("email", "upd@example.com")
    assert ("Fresh", "Ystad") == (
        attribute(fake, existing, "firstName"),
        attribute(fake, existing, "city"),
    )
    assert "done" == by_change_id(config)[queued.change_id or ""]["state"]


async def test_an_update_folded_into_a_create_is_applied_when_the_contact_existed(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """if_exists="return" with a later update folded in: only the update is applied.

    The create's own attributes do not overwrite the existing contact; the update made through
    the ref afterwards does reach it.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        queued = await engage.create_contact({"email": "fold@example.com", "firstName": "New"})
        await engage.update_contact(queued.ref or "", {"lastName": "Later"})
        existing = fake.add_contact({"email": "fold@example.com", "firstName": "Old"})
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()
        assert existing == await engage.resolve(queued.ref or "")

    assert 0 == report.pending
    assert [{"lastName": "Later"}] == [
        r.json() for r in fake.requests_to("PATCH", f"{CONTACTS}/{existing}")
    ]
    assert ("Old", "Later") == (
        attribute(fake, existing, "firstName"),
        attribute(fake, existing, "lastName"),
    )
    assert [existing] == fake.find("email", "fold@example.com")


# --- batches that stay pending ------------------------------------------------------------------


async def test_a_pending_batch_stays_in_flight_and_is_polled_at_growing_intervals(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """While Engage keeps a batch Pending, its rows stay in flight and polls back off.

    flush_once(wait_for_batches=False) returns with the batch submitted and its rows inflight;
    each later poll schedules the next one `batch_poll_initial * 2**polls` later (capped at
    `batch_poll_max`); once Engage finishes the batch, a flush settles it.
    """
    # The first poll comes late enough that no flusher step, even on PostgreSQL, reaches it.
    config = flusher_config(
        fake, tmp_path, bulk_threshold=2, batch_poll_initial=2.0, batch_poll_max=10.0
    )
    emails = ["p1@example.com", "p2@example.com"]
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for email in emails:
            await engage.create_contact({"email": email})
        await fake.come_up()
    fake.hold_batches = True
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await flusher.flush_once(wait_for_batches=False)
        assert (2, 2) == (report.sent, report.pending)
        [batch] = query(config, "SELECT * FROM batches")
        assert "submitted" == batch["state"]
        assert batch["batch_id"] in fake.batches
        assert [("inflight", batch["batch_id"])] * 2 == [
            (row["state"], row["batch_id"]) for row in changes(config)
        ]
        assert pytest.approx(clock.wall() + 2.0) == batch["next_poll_at"]

        waits = []
        for polls in range(1, 5):
            [before] = query(config, "SELECT polls, next_poll_at FROM batches")
            # Just before the poll is due, a flush leaves the batch alone.
            clock.advance_to(before["next_poll_at"] - 0.01)
            await flusher.flush_once(wait_for_batches=False)
            assert [before] == query(config, "SELECT polls, next_poll_at FROM batches")
            assert polls - 1 == len(fake.requests_to("GET", f"{BULK}/status"))

            clock.advance_to(before["next_poll_at"])
            polled_at = clock.wall()
            await flusher.flush_once(wait_for_batches=False)
            [after] = query(config, "SELECT polls, next_poll_at, state FROM batches")
            assert ("submitted", polls) == (after["state"], after["polls"])
            waits.append(round(after["next_poll_at"] - polled_at, 6))
        assert [4.0, 8.0, 10.0, 10.0] == waits
        assert all(row["state"] == "inflight" for row in changes(config))

        fake.release_batches()
        report = await flusher.flush_once()

    assert (2, 2, 0) == (report.created, report.reconciled, report.pending)
    assert ["finished"] == [b["state"] for b in query(config, "SELECT state FROM batches")]
    assert ["done", "done"] == [row["state"] for row in changes(config)]
    for email in emails:
        one_id(fake, email)


async def test_flush_once_waits_for_the_batches_it_submitted(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """By default flush_once polls a pending batch until it finishes and reports its outcome.

    It waits between polls on its clock (2 s, then 4 s, ...), sending nothing meanwhile.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=2)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        for email in ("w1@example.com", "w2@example.com"):
            await engage.create_contact({"email": email})
        await fake.come_up()
    fake.hold_batches = True
    # From here on, time moves only when the test moves it, but for the few milliseconds the
    # rate budget spaces background requests by.
    clock.jump_limit = 0.01
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        flushing = asyncio.create_task(flusher.flush_once())
        for polls, wait in enumerate([2.0, 4.0, 8.0]):
            await clock.until_sleeping(wait)
            assert polls == len(fake.requests_to("GET", f"{BULK}/status"))
            assert not flushing.done()
            [batch] = query(config, "SELECT next_poll_at FROM batches")
            clock.advance_to(batch["next_poll_at"])
        await clock.until_sleeping(16.0)
        assert 3 == len(fake.requests_to("GET", f"{BULK}/status"))
        fake.release_batches()
        [batch] = query(config, "SELECT next_poll_at FROM batches")
        clock.advance_to(batch["next_poll_at"])
        report = await asyncio.wait_for(flushing, 5)

    assert (2, 2, 0) == (report.created, report.reconciled, report.pending)
    assert 4 == len(fake.requests_to("GET", f"{BULK}/status"))


# --- GUID reconciliation ------------------------------------------------------------------------


async def test_reconciliation_records_the_guid_and_releases_the_changes_waiting_on_the_ref(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """After a bulk create, the GUID is found by key and the ref's queued changes follow it.

    The identity map gets ref -> GUID, the type change and update queued on the ref are sent
    to that GUID (after the lookup that found it), and the contacts with changes waiting on
    them are looked up first.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=3)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        lonely = await engage.create_contact({"email": "lonely@example.com"})
        busy = await engage.create_contact({"email": "busy@example.com"})
        await engage.create_contact({"email": "third@example.com"})
        await engage.update_contact_type(busy.ref or "", "Contact")
        await engage.update_contact(busy.ref or "", {"firstName": "Busy"})
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()
        assert 0 == report.pending
        guid = one_id(fake, "busy@example.com")
        assert guid == await engage.resolve(busy.ref or "")
        assert one_id(fake, "lonely@example.com") == await engage.resolve(lonely.ref or "")

    assert [{"contact_id": guid}] == query(
        config, "SELECT contact_id FROM identities WHERE key = ?", [f"ref:{busy.ref}"]
    )
    assert ("Busy", "Contact") == (attribute(fake, guid, "firstName"), contact_type(fake, guid))
    type_change = fake.requests_to("POST", f"{CONTACTS}/*/updateContactType")
    assert [f"{CONTACTS}/{guid}/updateContactType"] == [r.path for r in type_change]
    assert [f"{CONTACTS}/{guid}"] == [r.path for r in fake.requests_to("PATCH", f"{CONTACTS}/*")]
    # One batch; the lookups after it: the contact with waiting changes comes first.
    [status] = fake.requests_to("GET", f"{BULK}/status")
    status_at = fake.requests.index(status)
    after_batch = [r for r in fake.requests[status_at:] if r.path == LOOKUP]
    assert "busy@example.com" == after_batch[0].query["email"]
    found_at = fake.requests.index(after_batch[0])
    assert found_at < fake.requests.index(type_change[0])


async def test_a_key_not_found_yet_is_looked_up_again_later(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A created contact Engage cannot find yet waits: its lookups count, its next is later.

    When the lookup finds it at last, the GUID is recorded and the create is done.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=2, background_delays=(30.0,))
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        slow = await engage.create_contact({"email": "slow@example.com"})
        await engage.create_contact({"email": "quick@example.com"})
        await fake.come_up()
        fake.hold_batches = True
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            await flusher.flush_once(wait_for_batches=False)
            # Engage has applied the batch but its lookup index lags behind for one contact.
            fake.inject("status", method="GET", path=LOOKUP, status=404, body=NOT_FOUND, times=1)
            fake.release_batches()
            report = await flusher.flush_once()
            assert (2, 1, 1) == (report.created, report.reconciled, report.pending)
            row = by_change_id(config)[slow.change_id or ""]
            assert ("waiting_guid", 1) == (row["state"], row["lookups"])
            looked_up_at = clock.wall()
            assert 30.0 <= row["next_attempt_at"] - looked_up_at <= retry_wait(config)

            # Not yet: the next flush leaves it waiting.
            clock.advance_to(row["next_attempt_at"] - 1.0)
            report = await flusher.flush_once()
            assert (0, 1) == (report.reconciled, report.pending)
            clock.advance_to(row["next_attempt_at"])
            report = await flusher.flush_once()
        assert 0 == report.pending
        assert one_id(fake, "slow@example.com") == await engage.resolve(slow.ref or "")
    assert 1 == len(fake.find("email", "slow@example.com"))


async def test_a_key_changed_by_a_folded_update_is_still_reconciled(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A queued create whose email a later update corrected is found under the new email.

    The customer signs up with a typo while Engage is down and fixes it at once; the fix folds
    into the queued create. After the bulk create the GUID must be looked up by the email the
    contact was created with, so the create ends done, `resolve(ref)` answers, and nothing is
    created twice or dead-lettered.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=2, reconcile_max_lookups=2)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        typo = await engage.create_contact({"email": "anna@exampel.com", "firstName": "Anna"})
        await engage.update_contact(typo.ref or "", {"email": "anna@example.com"})
        await engage.create_contact({"email": "bo@example.com"})
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            await drain(flusher, clock, rounds=10)
        guid = one_id(fake, "anna@example.com")
        assert guid == await engage.resolve(typo.ref or "")

    assert [] == fake.find("email", "anna@exampel.com")
    assert ["done"] * 2 == [row["state"] for row in changes(config)]


# --- dead letters -------------------------------------------------------------------------------


async def test_an_update_engage_rejects_is_dead_with_its_reason(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A 422 (invalid email) and a 404 (contact deleted) dead-letter the update with Engage's
    code and message; an update to another contact in the same flush is delivered.
    """
    config = flusher_config(fake, tmp_path)
    invalid = fake.add_contact({"email": "valid@example.com"})
    gone = fake.add_contact({"email": "gone@example.com"})
    fine = fake.add_contact({"email": "fine@example.com"})
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        bad = await engage.update_contact(invalid, {"email": "not-an-email"})
        lost = await engage.update_contact(gone, {"firstName": "Ghost"})
        await engage.update_contact(fine, {"firstName": "Fine"})
        await fake.come_up()
    del fake.contacts[gone]
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await flusher.flush_once()

    assert (1, 2, 0) == (report.updated, report.dead, report.pending)
    rows = by_change_id(config)
    rejected = rows[bad.change_id or ""]
    assert ("dead", "ValidationError") == (rejected["state"], rejected["error_code"])
    assert "422" in rejected["last_error"]
    assert "email" in rejected["last_error"]
    missing = rows[lost.change_id or ""]
    assert ("dead", "ContactNotFound") == (missing["state"], missing["error_code"])
    assert "404" in missing["last_error"]
    assert 1 == rejected["attempts"]
    assert "valid@example.com" == attribute(fake, invalid, "email")
    assert "Fine" == attribute(fake, fine, "firstName")
    assert_settled(config)


async def test_items_a_bulk_batch_rejects_are_dead_one_by_one(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A bulk create or update item that fails in its batch is dead with the item's code; the
    other items of the same batches are applied.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=3)
    known = [fake.add_contact({"email": f"k{i}@example.com"}) for i in range(3)]
    async with ea.EngageSession(config, clock=clock) as engage:
        for guid in known:
            await engage.get_contact(guid)  # their type is known: their updates go in bulk
        await fake.go_down()
        good = [await engage.create_contact({"email": f"g{i}@example.com"}) for i in range(3)]
        bad = await engage.create_contact({"email": "bad@example.com", "mobilePhone": "12"})
        await engage.update_contact(known[0], {"firstName": "Ok"})
        wrong = await engage.update_contact(known[1], {"email": "nope"})
        await engage.update_contact(known[2], {"firstName": "Ok"})
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()
        for index, delivery in enumerate(good):
            guid = one_id(fake, f"g{index}@example.com")
            assert guid == await engage.resolve(delivery.ref or "")

    assert 1 == len(bulk_items(fake, "POST"))
    assert 1 == len(bulk_items(fake, "PATCH"))
    assert (3, 2, 2, 0) == (report.created, report.updated, report.dead, report.pending)
    rows = by_change_id(config)
    for dead in (bad, wrong):
        row = rows[dead.change_id or ""]
        assert ("dead", "ValidationError") == (row["state"], row["error_code"])
        assert row["last_error"]
    assert [] == fake.find("email", "bad@example.com")
    assert ["Ok", None, "Ok"] == [attribute(fake, guid, "firstName") for guid in known]
    assert "k1@example.com" == attribute(fake, known[1], "email")
    assert_settled(config)


async def test_several_contacts_with_the_key_dead_letter_the_create_with_their_ids(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """Several contacts have the key: the create meets 409, and its lookup MultipleMatches:
    dead, naming the candidates; no contact created.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        queued = await engage.create_contact({"email": "dup@example.com"})
        first = fake.add_contact({"email": "dup@example.com"})
        second = fake.add_contact({"email": "dup@example.com"})
        await fake.come_up()
    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        report = await flusher.flush_once()

    assert (1, 0) == (report.dead, report.pending)
    row = by_change_id(config)[queued.change_id or ""]
    assert ("dead", "MultipleMatches") == (row["state"], row["error_code"])
    assert first in row["last_error"]
    assert second in row["last_error"]
    assert [first, second] == sorted(
        fake.find("email", "dup@example.com"), key=[first, second].index
    )


async def test_a_dead_create_takes_the_changes_waiting_on_it_along(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """A create Engage rejects (422) is dead, and so are the type change and update queued on
    its ref, each with error code CreateDead and a reason naming the create.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock) as engage:
        await fake.go_down()
        create = await engage.create_contact(
            {"email": "doomed@example.com", "mobilePhone": "0"}, contact_type="Contact"
        )
        promote = await engage.promote_to_member(create.ref or "")
        update = await engage.update_contact(create.ref or "", {"firstName": "Never"})
        await fake.come_up()
        async with ea.OutboxFlusher(config, clock=clock) as flusher:
            report = await flusher.flush_once()
        assert await engage.resolve(create.ref or "") is None

    rows = by_change_id(config)
    assert ("dead", "ValidationError") == (
        rows[create.change_id or ""]["state"],
        rows[create.change_id or ""]["error_code"],
    )
    for dependent in (promote, update):
        row = rows[dependent.change_id or ""]
        assert ("dead", "CreateDead") == (row["state"], row["error_code"])
        assert create.change_id in row["last_error"]
    assert [] == fake.find("email", "doomed@example.com")
    assert [] == fake.requests_to("POST", f"{CONTACTS}/*/updateContactType")
    assert_settled(config)
    # Three changes were dead-lettered by this flush, and its report says so.
    assert (3, 0) == (report.dead, report.pending)


async def test_a_flusher_is_used_only_while_open(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """flush_once before `open` or after `close` is a RuntimeError; a closed flusher cannot
    be opened again; closing twice is harmless.
    """
    config = flusher_config(fake, tmp_path)
    await create_outbox(config)
    flusher = ea.OutboxFlusher(config, clock=clock)
    with pytest.raises(RuntimeError, match="not open"):
        await flusher.flush_once()
    async with flusher:
        assert ea.FlushReport() == await flusher.flush_once()
    await flusher.close()
    with pytest.raises(RuntimeError, match="closed"):
        await flusher.flush_once()
    with pytest.raises(RuntimeError):
        await flusher.open()


# --- running inside an app ----------------------------------------------------------------------


async def test_a_started_flusher_drains_what_the_session_queues_without_being_asked(
    fake: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """`start()` runs the flusher in the app's loop; the session's enqueue wakes it.

    The poll interval never runs out on the test's clock, so only the wake-up can explain the
    delivery; the background task ends with the `async with` block.
    """
    config = flusher_config(fake, tmp_path)
    guid = fake.add_contact({"email": "app@example.com"})
    async with (
        ea.EngageSession(config, clock=clock) as engage,
        ea.OutboxFlusher(config, clock=clock) as flusher,
    ):
        task = flusher.start()
        # The first, empty flush is over; it now waits a poll interval, which never ends.
        await clock.until_sleeping(config.poll_interval)
        fake.inject("server_error", method="PATCH", status=503, times=config.retry_attempts)
        queued = await engage.update_contact(guid, {"firstName": "Queued"})
        assert queued.queued
        await eventually(lambda: attribute(fake, guid, "firstName") == "Queued")
        await eventually(lambda: by_change_id(config)[queued.change_id or ""]["state"] == "done")
        assert not task.done()
    assert task.done()
    assert not task.cancelled()
    assert task.exception() is None
