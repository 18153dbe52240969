"""`OutboxAdmin`: stats, listings with personal data masked, requeue, discard and export.

Every test runs on both outbox backends (the admin given a path, or a URL and a schema),
except those about files that are not there.
"""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
from helpers import BACKEND, BACKENDS, FakeClock

import engage_async as ea
from engage_async._changes import Change, NewChange, Operation
from engage_async._keys import contact_key, new_ref
from engage_async._outboxes import open_location
from engage_async._store import OutboxStore
from engage_async.testing import FakeEngage

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
OTHER_GUID = "b16fd8f3-d0f5-aaaa-aa60-b00300f9aaaa"
STATES = ("pending", "inflight", "waiting_guid", "done", "dead")

PERSON = {
    "firstName": "Astrid",
    "lastName": "Lindgren",
    "email": "astrid.lindgren@example.com",
    "mobilePhone": "+46701234567",
    "socialSecurityNumber": "198506059738",
    "street": "Storgatan 12",
}


def create(email: str, *, ref: str | None = None, **fields: Any) -> NewChange:
    """A queued create of a Member keyed by `email`, as the session queues one."""
    ref = ref or new_ref()
    return NewChange(
        Operation.CREATE,
        contact_key(ref=ref),
        body={"email": email, "firstName": "Anna", **fields},
        ref=ref,
        contact_type="Member",
        key_name="email",
        key_value=email,
        if_exists="return",
        reason="EngageConnectionError: POST /api/v3/contacts: cannot connect to Engage",
    )


def update_by_ref(ref: str, body: dict[str, Any]) -> NewChange:
    """An update to the contact a queued create will make."""
    return NewChange(Operation.UPDATE, contact_key(ref=ref), body=body, ref=ref)


def update_by_id(contact_id: str, body: dict[str, Any]) -> NewChange:
    """An update to a contact whose GUID is known."""
    return NewChange(
        Operation.UPDATE, contact_key(contact_id=contact_id), body=body, contact_id=contact_id
    )


def promote(ref: str) -> NewChange:
    """A contact-type change to Member: a barrier later updates do not merge across."""
    return NewChange(Operation.CONTACT_TYPE, contact_key(ref=ref), ref=ref, contact_type="Member")


@attrs.define
class Spool:
    """An outbox opened the way the library opens it, with the flusher's operations, to
    put changes in each state.
    """

    outbox: OutboxStore

    async def add(self, change: NewChange) -> str:
        """Enqueue `change` as a row of its own; its change id."""
        queued = await self.outbox.enqueue(change)
        assert not queued.merged
        return queued.change_id

    async def row(self, change_id: str) -> Change:
        """The row of `change_id` as it is now."""
        found = await self.outbox.get_change(change_id)
        assert found is not None
        return found

    async def seq(self, change_id: str) -> int:
        """The outbox seq of `change_id`."""
        return (await self.row(change_id)).seq

    async def kill(
        self, change_id: str, code: str = "ValidationError", message: str = "422: email"
    ) -> None:
        """Dead-letter a change the way a flusher does when Engage rejects it for good."""
        await self.outbox.bury({await self.seq(change_id): (code, message)})

    async def finish(self, change_id: str) -> None:
        """Mark a change done, as when Engage applied it."""
        await self.outbox.finish([await self.seq(change_id)])

    async def wait_for_guid(self, change_id: str) -> None:
        """Put a create in waiting_guid, as after an XML export."""
        await self.outbox.exported([], [await self.seq(change_id)], "20240101000000_1_contacts.xml")

    async def claim_all(self) -> list[str]:
        """Lease every due change as a flusher would; their change ids."""
        claimed = await self.outbox.claim("tests", limit=1000, lease_seconds=300.0)
        return [change.change_id for change in claimed]

    async def postpone(self, change_id: str) -> None:
        """Put a change off for a day, counting an attempt (as after a transient failure)."""
        claimed = await self.claim_all()
        assert change_id in claimed
        others = [await self.seq(other) for other in claimed if other != change_id]
        await self.outbox.release(
            "tests", [await self.seq(change_id)], delay=86400.0, count_attempt=True
        )
        await self.outbox.release("tests", others)


def admin_of(where: Path | str, **options: Any) -> ea.OutboxAdmin:
    """An OutboxAdmin on `where` (a path, or the test's PostgreSQL URL, with its schema)."""
    if BACKEND.schema is not None:
        options.setdefault("schema", BACKEND.schema)
    return ea.OutboxAdmin(where, **options)


@pytest.fixture(name="outbox_path")
def outbox_path_fixture(tmp_path: Path) -> Path | str:
    """Where the outbox under test lives."""
    if BACKEND.url is not None:
        return BACKEND.url
    return tmp_path / "outbox.sqlite3"


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    """The clock of the spool's outbox and of the admin."""
    return FakeClock()


@pytest.fixture(name="spool")
async def spool_fixture(outbox_path: Path | str, clock: FakeClock) -> AsyncIterator[Spool]:
    """An open outbox at `outbox_path` to put changes into."""
    outbox = await open_location(
        outbox_path, schema=BACKEND.schema or "engage_outbox", clock=clock, create=True
    )
    try:
        yield Spool(outbox)
    finally:
        await outbox.close()


@pytest.fixture(name="admin")
async def admin_fixture(
    spool: Spool, outbox_path: Path | str, clock: FakeClock
) -> AsyncIterator[ea.OutboxAdmin]:
    """An OutboxAdmin on the spool's outbox, on the spool's clock."""
    async with admin_of(outbox_path, clock=clock) as admin:
        yield admin


def everything_said(entry: ea.OutboxEntry) -> str:
    """All an entry would show: its repr, its str, and every field (body included)."""
    fields = attrs.asdict(entry)
    return " ".join([repr(entry), str(entry), json.dumps(fields, default=str, ensure_ascii=False)])


# --- opening ------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_admin_on_a_missing_outbox_raises_and_creates_nothing(tmp_path: Path) -> None:
    """OutboxAdmin on a path with no outbox raises OutboxError and leaves no file behind."""
    path = tmp_path / "nothing.sqlite3"

    with pytest.raises(ea.OutboxError):
        async with admin_of(path) as admin:
            await admin.stats()

    assert [] == list(tmp_path.iterdir())


@pytest.mark.sqlite_only
async def test_admin_in_a_missing_directory_raises_and_creates_nothing(tmp_path: Path) -> None:
    """A missing directory is an OutboxError too, and is not created."""
    admin = ea.OutboxAdmin(tmp_path / "missing" / "outbox.sqlite3")

    with pytest.raises(ea.OutboxError):
        await admin.stats()

    await admin.close()
    assert [] == list(tmp_path.iterdir())


async def test_admin_works_without_async_with(spool: Spool, outbox_path: Path | str) -> None:
    """The coroutines open the outbox on first use; close() releases it and may be repeated."""
    await spool.add(create("anna@example.com"))
    admin = admin_of(str(outbox_path))

    try:
        assert 1 == (await admin.stats()).by_state["pending"]
    finally:
        await admin.close()
        await admin.close()


# --- stats --------------------------------------------------------------------------------


async def test_stats_of_an_empty_outbox(admin: ea.OutboxAdmin) -> None:
    """An empty outbox counts zero in every state, has no age, no pause, no batch."""
    stats = await admin.stats()

    assert dict.fromkeys(STATES, 0) == dict(stats.by_state)
    assert stats.oldest_pending_age is None
    assert stats.paused_until is None
    assert stats.pause_reason is None
    assert 0 == stats.batches_in_flight


async def test_stats_counts_every_state(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """by_state counts the changes in each of the five states."""
    inflight = await spool.add(create("inflight@example.com"))
    assert [inflight] == await spool.claim_all()
    await spool.add(create("pending@example.com"))
    await spool.wait_for_guid(await spool.add(create("waiting@example.com")))
    await spool.finish(await spool.add(create("done@example.com")))
    await spool.kill(await spool.add(create("dead@example.com")))
    await spool.kill(await spool.add(create("dead2@example.com")))

    stats = await admin.stats()

    assert {"pending": 1, "inflight": 1, "waiting_guid": 1, "done": 1, "dead": 2} == dict(
        stats.by_state
    )


async def test_stats_oldest_pending_age_ignores_dead_and_done(
    spool: Spool, admin: ea.OutboxAdmin, clock: FakeClock
) -> None:
    """oldest_pending_age is the age of the oldest change still waiting, in seconds."""
    clock.jump_wall(-7200)
    await spool.kill(await spool.add(create("dead@example.com")))
    await spool.finish(await spool.add(create("done@example.com")))
    clock.jump_wall(3600)
    await spool.add(create("waiting@example.com"))
    clock.jump_wall(3540)
    await spool.add(create("newer@example.com"))
    clock.jump_wall(60)

    age = (await admin.stats()).oldest_pending_age

    assert 3600.0 == age


async def test_stats_shows_a_pause_in_the_future(
    spool: Spool, admin: ea.OutboxAdmin, clock: FakeClock
) -> None:
    """A flushers' pause that has not run out is shown with its end and reason."""
    until = clock.wall() + 600
    await spool.outbox.set_pause(
        delay=600, reason="EngageUnavailable: GET /api/v3/contacts/id", outages=2
    )

    stats = await admin.stats()

    assert datetime.fromtimestamp(until, UTC) == stats.paused_until
    assert "EngageUnavailable: GET /api/v3/contacts/id" == stats.pause_reason


async def test_stats_hides_a_pause_that_ran_out(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """A pause whose end has passed is no pause."""
    await spool.outbox.set_pause(delay=-60, reason="EngageUnavailable", outages=1)

    stats = await admin.stats()

    assert stats.paused_until is None
    assert stats.pause_reason is None


async def test_stats_counts_batches_in_flight(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """batches_in_flight counts the bulk batches still followed, not the finished ones."""
    ids = [await spool.add(create(f"c{n}@example.com")) for n in range(3)]
    await spool.claim_all()
    for batch, change_id in zip(("b1", "b2", "b3"), ids, strict=True):
        await spool.outbox.submit_batch(
            batch, Operation.CREATE, "Member", [await spool.seq(change_id)], first_poll=0.0
        )
    await spool.outbox.settle_batch("b2", {"status": "Finished"}, failed={}, resend=[])

    stats = await admin.stats()

    assert 2 == stats.batches_in_flight
    assert 1 == stats.by_state["waiting_guid"]


# --- list ---------------------------------------------------------------------------------


async def test_list_returns_changes_oldest_first(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """list() gives every change, in the order the outbox accepted them."""
    ids = [await spool.add(create(f"c{n}@example.com")) for n in range(4)]
    await spool.finish(ids[1])
    await spool.kill(ids[2])

    entries = await admin.list()

    assert ids == [entry.change_id for entry in entries]
    assert ["pending", "done", "dead", "pending"] == [entry.state for entry in entries]


async def test_list_entry_fields(spool: Spool, admin: ea.OutboxAdmin, clock: FakeClock) -> None:
    """An entry tells the change's id, operation, state, contact, type, attempts, error, time."""
    clock.jump_wall(1_700_000_000.25 - clock.wall())
    change = create("anna@example.com")
    change_id = await spool.add(change)
    await spool.kill(change_id, "ValidationError", "422 ValidationError: email")

    (entry,) = await admin.list()

    assert change_id == entry.change_id
    assert "create" == entry.operation
    assert "dead" == entry.state
    assert change.contact_key == entry.contact_key
    assert change.ref == entry.ref
    assert "Member" == entry.contact_type
    assert 1 == entry.attempts
    assert "ValidationError" == entry.error_code
    assert "422 ValidationError: email" == entry.last_error
    assert datetime.fromtimestamp(1_700_000_000.25, UTC) == entry.created_at


async def test_list_filters_by_state(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """list(state=...) gives only the changes in that state."""
    ids = [await spool.add(create(f"c{n}@example.com")) for n in range(4)]
    await spool.kill(ids[0])
    await spool.kill(ids[3])

    dead = await admin.list(state="dead")
    pending = await admin.list("pending")

    assert [ids[0], ids[3]] == [entry.change_id for entry in dead]
    assert [ids[1], ids[2]] == [entry.change_id for entry in pending]
    assert [] == await admin.list(state="inflight")


async def test_list_limit_keeps_the_oldest(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """list(limit=n) gives the n oldest changes."""
    ids = [await spool.add(create(f"c{n}@example.com")) for n in range(5)]

    assert ids[:2] == [entry.change_id for entry in await admin.list(limit=2)]


async def test_list_default_limit_is_100(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """Without a limit, list() gives at most 100 changes."""
    for n in range(105):
        await spool.add(create(f"c{n}@example.com"))

    assert 100 == len(await admin.list())


@pytest.mark.parametrize(
    ("arguments", "named"),
    [({"state": "sleeping"}, "state"), ({"limit": 0}, "limit")],
)
async def test_list_refuses_bad_arguments(
    admin: ea.OutboxAdmin, arguments: dict[str, Any], named: str
) -> None:
    """An unknown state or a limit below 1 is a ValueError naming the argument."""
    with pytest.raises(ValueError, match=named):
        await admin.list(**arguments)


async def test_list_by_ref_gives_that_contacts_changes(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """list(key=ref) gives the create with that ref and the changes waiting on it."""
    ref = new_ref()
    await spool.add(create("other@example.com"))
    ids = [
        await spool.add(create("anna@example.com", ref=ref)),
        await spool.add(promote(ref)),
        await spool.add(update_by_ref(ref, {"lastName": "Svensson"})),
    ]
    await spool.add(update_by_id(GUID, {"city": "Malmö"}))

    assert ids == [entry.change_id for entry in await admin.list(key=ref)]


async def test_list_by_guid_gives_that_contacts_changes(
    spool: Spool, admin: ea.OutboxAdmin
) -> None:
    """list(key=GUID) gives the changes to that contact, whatever the GUID's case."""
    first = await spool.add(update_by_id(GUID, {"city": "Malmö"}))
    await spool.add(update_by_id(OTHER_GUID, {"city": "Lund"}))
    await spool.add(create("anna@example.com"))
    await spool.finish(first)
    second = await spool.add(update_by_id(GUID, {"city": "Ystad"}))

    assert [first, second] == [entry.change_id for entry in await admin.list(key=GUID)]
    assert [first, second] == [entry.change_id for entry in await admin.list(key=GUID.upper())]


async def test_list_by_key_value_finds_the_create(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """list(key=email) finds the queued create of the contact with that email."""
    await spool.add(create("other@example.com"))
    wanted = await spool.add(create("anna@example.com"))

    assert [wanted] == [e.change_id for e in await admin.list(key="anna@example.com")]
    assert [] == await admin.list(key="nobody@example.com")


async def test_list_by_key_value_gives_that_contacts_changes(
    spool: Spool, admin: ea.OutboxAdmin
) -> None:
    """list(key=email) picks the contact, as a GUID or ref does: its create and the changes
    queued on it.
    """
    ref = new_ref()
    await spool.add(create("other@example.com"))
    ids = [
        await spool.add(create("anna@example.com", ref=ref)),
        await spool.add(promote(ref)),
        await spool.add(update_by_ref(ref, {"lastName": "Svensson"})),
    ]

    assert ids == [entry.change_id for entry in await admin.list(key="anna@example.com")]


async def test_list_combines_key_state_and_limit(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """The filters apply together."""
    dead = await spool.add(update_by_id(GUID, {"city": "Malmö"}))
    await spool.kill(dead)
    wanted = await spool.add(update_by_id(GUID, {"city": "Lund"}))
    await spool.add(update_by_id(OTHER_GUID, {"city": "Ystad"}))
    await spool.add(promote(new_ref()))

    pending = await admin.list(state="pending", key=GUID, limit=5)
    dead_ones = await admin.list(state="dead", key=GUID.upper(), limit=1)

    assert [wanted] == [entry.change_id for entry in pending]
    assert [dead] == [entry.change_id for entry in dead_ones]


# --- personal data ------------------------------------------------------------------------


@pytest.fixture(name="queued_person")
async def queued_person_fixture(
    fake: FakeEngage, config: ea.EngageConfig
) -> tuple[Path | str, str, str]:
    """A create of PERSON with preferences and a consent, queued by a real session while
    Engage was down: (outbox path, change id, ref).
    """
    await fake.go_down()
    attributes = {
        **PERSON,
        "preferences": {"acceptsEmail": True},
        "consents": [{"id": "memberConsent", "value": True, "comment": "Astrid Lindgren"}],
    }
    async with ea.EngageSession(config) as session:
        delivery = await session.create_contact(attributes)
    assert delivery.queued
    assert delivery.change_id is not None
    assert delivery.ref is not None
    return config.outbox_url or config.outbox_path, delivery.change_id, delivery.ref


@pytest.mark.parametrize("how", ["list", "show"])
async def test_personal_data_is_masked(
    queued_person: tuple[Path | str, str, str], how: str
) -> None:
    """list and show mask emails, phones, personal numbers, names and street everywhere:
    in the entry's repr and str and in its body.
    """
    path, change_id, _ = queued_person
    async with admin_of(path) as admin:
        entry = (await admin.list())[0] if how == "list" else await admin.show(change_id)

    said = everything_said(entry)
    for name, value in PERSON.items():
        assert value not in said, name
    assert "Lindgren" not in said
    assert entry.body is not None
    assert set(PERSON) <= set(entry.body)
    assert entry.key is not None
    assert entry.key.startswith("email=")


@pytest.mark.parametrize("how", ["list", "show"])
async def test_masking_keeps_what_is_not_personal(
    queued_person: tuple[Path | str, str, str], how: str
) -> None:
    """Masking leaves the change readable: ids, refs, booleans and consent ids stay."""
    path, change_id, ref = queued_person
    async with admin_of(path) as admin:
        entry = (await admin.list())[0] if how == "list" else await admin.show(change_id)

    assert change_id == entry.change_id
    assert ref == entry.ref
    assert entry.body is not None
    assert {"acceptsEmail": True} == entry.body["preferences"]
    assert "memberConsent" == entry.body["consents"][0]["id"]
    assert entry.body["consents"][0]["value"] is True


@pytest.mark.parametrize("how", ["list", "show"])
async def test_reveal_shows_personal_data(
    queued_person: tuple[Path | str, str, str], how: str
) -> None:
    """With reveal=True the plain values are there."""
    path, change_id, _ = queued_person
    async with admin_of(path) as admin:
        if how == "list":
            entry = (await admin.list(reveal=True))[0]
        else:
            entry = await admin.show(change_id, reveal=True)

    assert entry.body is not None
    for name, value in PERSON.items():
        assert value == entry.body[name]
    assert "Astrid Lindgren" == entry.body["consents"][0]["comment"]
    assert f"email={PERSON['email']}" == entry.key


# --- show ---------------------------------------------------------------------------------


async def test_show_gives_one_change_with_its_body(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """show(change_id) gives that change, body included (masked)."""
    await spool.add(create("other@example.com"))
    change_id = await spool.add(update_by_id(GUID, {"countryCode": "SE", "city": "Malmö"}))

    entry = await admin.show(change_id)

    assert change_id == entry.change_id
    assert "update" == entry.operation
    assert GUID == entry.contact_id
    assert entry.body is not None
    assert "SE" == entry.body["countryCode"]
    assert "Malmö" != entry.body["city"]


async def test_show_unknown_change_raises_change_not_found(admin: ea.OutboxAdmin) -> None:
    """An unknown id is ChangeNotFound, which is a LookupError."""
    with pytest.raises(ea.ChangeNotFound) as info:
        await admin.show("chg_feedfacefeedfacefeedfacefeedface")

    assert isinstance(info.value, LookupError)
    assert "chg_feedfacefeedfacefeedfacefeedface" in str(info.value)


# --- requeue ------------------------------------------------------------------------------


async def test_requeue_makes_a_dead_change_pending_and_due_now(
    spool: Spool, admin: ea.OutboxAdmin, clock: FakeClock
) -> None:
    """A requeued dead change is pending, with no attempts and no error code, due now."""
    change_id = await spool.add(create("anna@example.com"))
    await spool.postpone(change_id)
    await spool.kill(change_id)
    assert 2 == (await spool.row(change_id)).attempts

    entry = await admin.requeue(change_id)

    row = await spool.row(change_id)
    assert ("pending", 0, None) == (entry.state, entry.attempts, entry.error_code)
    assert ("pending", 0, None) == (str(row.state), row.attempts, row.error_code)
    assert row.next_attempt_at <= clock.wall()
    assert [change_id] == await spool.claim_all()


async def test_requeue_makes_a_postponed_change_due_now(
    spool: Spool, admin: ea.OutboxAdmin
) -> None:
    """A pending change put off for later is due at once after a requeue."""
    change_id = await spool.add(create("anna@example.com"))
    await spool.postpone(change_id)
    assert [] == await spool.claim_all()

    entry = await admin.requeue(change_id)

    assert ("pending", 0) == (entry.state, entry.attempts)
    assert [change_id] == await spool.claim_all()


async def test_requeue_of_a_dead_create_revives_its_dependents(
    spool: Spool, admin: ea.OutboxAdmin
) -> None:
    """Requeueing a dead create brings back the changes that died with it (CreateDead), and
    nothing else.
    """
    ref = new_ref()
    created = await spool.add(create("anna@example.com", ref=ref))
    dependents = [
        await spool.add(promote(ref)),
        await spool.add(update_by_ref(ref, {"lastName": "Svensson"})),
    ]
    unrelated = await spool.add(create("other@example.com"))
    await spool.kill(unrelated)
    await spool.kill(created)
    assert ["CreateDead", "CreateDead"] == [
        (await spool.row(change_id)).error_code for change_id in dependents
    ]

    await admin.requeue(created)

    states = {entry.change_id: entry.state for entry in await admin.list()}
    assert {created: "pending", **dict.fromkeys(dependents, "pending"), unrelated: "dead"} == (
        states
    )
    for change_id in dependents:
        row = await spool.row(change_id)
        assert (0, None) == (row.attempts, row.error_code)


@pytest.mark.parametrize("state", ["done", "inflight", "waiting_guid"])
async def test_requeue_refuses_a_change_that_is_not_dead_or_pending(
    spool: Spool, admin: ea.OutboxAdmin, state: str
) -> None:
    """A done, in-flight or GUID-waiting change cannot be requeued: ValueError, unchanged."""
    change_id = await spool.add(create("anna@example.com"))
    if state == "done":
        await spool.finish(change_id)
    elif state == "inflight":
        await spool.claim_all()
    else:
        await spool.wait_for_guid(change_id)

    with pytest.raises(ValueError, match=state):
        await admin.requeue(change_id)

    assert state == (await admin.show(change_id)).state


async def test_requeue_unknown_change_raises_change_not_found(admin: ea.OutboxAdmin) -> None:
    """Requeueing an unknown id is ChangeNotFound."""
    with pytest.raises(ea.ChangeNotFound):
        await admin.requeue("chg_feedfacefeedfacefeedfacefeedface")


async def test_requeue_dead_requeues_every_dead_change(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """requeue_dead() makes every dead change pending and returns how many."""
    ref = new_ref()
    created = await spool.add(create("anna@example.com", ref=ref))
    await spool.add(promote(ref))
    await spool.add(update_by_ref(ref, {"lastName": "Svensson"}))
    other = await spool.add(update_by_id(GUID, {"city": "Malmö"}))
    done = await spool.add(create("done@example.com"))
    await spool.finish(done)
    await spool.kill(created)
    await spool.kill(other)

    assert 4 == await admin.requeue_dead()

    stats = await admin.stats()
    assert 0 == stats.by_state["dead"]
    assert 4 == stats.by_state["pending"]
    assert 1 == stats.by_state["done"]
    assert all(entry.attempts == 0 for entry in await admin.list(state="pending"))


async def test_requeue_dead_with_nothing_dead(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """With no dead change, requeue_dead() returns 0 and changes nothing."""
    await spool.add(create("anna@example.com"))

    assert 0 == await admin.requeue_dead()
    assert 1 == (await admin.stats()).by_state["pending"]


# --- discard ------------------------------------------------------------------------------


async def test_discard_dead_letters_with_the_reason(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """A discarded change is dead with error code Discarded and the reason given."""
    change_id = await spool.add(update_by_id(GUID, {"city": "Malmö"}))

    entry = await admin.discard(change_id, "customer asked us to stop")

    assert ("dead", "Discarded") == (entry.state, entry.error_code)
    assert entry.last_error is not None
    assert "customer asked us to stop" in entry.last_error
    assert "Discarded" == (await spool.row(change_id)).error_code
    assert [] == await spool.claim_all()


async def test_discard_a_dead_change(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """A dead change can be discarded too: it stays dead, now Discarded with the reason."""
    change_id = await spool.add(update_by_id(GUID, {"city": "Malmö"}))
    await spool.kill(change_id)

    entry = await admin.discard(change_id, "not worth fixing")

    assert ("dead", "Discarded") == (entry.state, entry.error_code)
    assert entry.last_error is not None
    assert "not worth fixing" in entry.last_error


async def test_discard_reason_is_scrubbed(spool: Spool, admin: ea.OutboxAdmin) -> None:
    """Personal data typed into a reason is not kept in the outbox."""
    change_id = await spool.add(update_by_id(GUID, {"city": "Malmö"}))

    entry = await admin.discard(change_id, "duplicate of anna@example.com")

    assert entry.last_error is not None
    assert "anna@example.com" not in entry.last_error
    assert "duplicate of" in entry.last_error


async def test_discarding_a_create_takes_its_dependents(
    spool: Spool, admin: ea.OutboxAdmin
) -> None:
    """Discarding a queued create dead-letters the changes waiting on its ref (CreateDead),
    and leaves other contacts alone.
    """
    ref = new_ref()
    created = await spool.add(create("anna@example.com", ref=ref))
    dependents = [
        await spool.add(promote(ref)),
        await spool.add(update_by_ref(ref, {"lastName": "Svensson"})),
    ]
    other = await spool.add(create("other@example.com"))

    await admin.discard(created, "duplicate signup")

    entries = {entry.change_id: entry for entry in await admin.list()}
    assert ("dead", "Discarded") == (entries[created].state, entries[created].error_code)
    for change_id in dependents:
        assert ("dead", "CreateDead") == (entries[change_id].state, entries[change_id].error_code)
    assert "pending" == entries[other].state


async def test_discarding_a_non_create_leaves_later_changes_alone(
    spool: Spool, admin: ea.OutboxAdmin
) -> None:
    """Discarding a contact-type change queued on a ref gives up on that change only: the
    create before it and the update after it still go.
    """
    ref = new_ref()
    created = await spool.add(create("anna@example.com", ref=ref))
    type_change = await spool.add(promote(ref))
    later = await spool.add(update_by_ref(ref, {"lastName": "Svensson"}))

    await admin.discard(type_change, "stays a Contact")

    entries = {entry.change_id: entry for entry in await admin.list()}
    assert "dead" == entries[type_change].state
    assert ("pending", None) == (entries[created].state, entries[created].error_code)
    assert ("pending", None) == (entries[later].state, entries[later].error_code)


@pytest.mark.parametrize("reason", ["", "   "])
async def test_discard_needs_a_reason(spool: Spool, admin: ea.OutboxAdmin, reason: str) -> None:
    """An empty or blank reason is a ValueError, and the change is untouched."""
    change_id = await spool.add(create("anna@example.com"))

    with pytest.raises(ValueError, match="reason"):
        await admin.discard(change_id, reason)

    assert "pending" == (await admin.show(change_id)).state


@pytest.mark.parametrize("state", ["done", "inflight"])
async def test_discard_refuses_a_done_or_inflight_change(
    spool: Spool, admin: ea.OutboxAdmin, state: str
) -> None:
    """A change already applied or on the wire cannot be discarded: ValueError, unchanged."""
    change_id = await spool.add(create("anna@example.com"))
    if state == "done":
        await spool.finish(change_id)
    else:
        await spool.claim_all()

    with pytest.raises(ValueError, match=state):
        await admin.discard(change_id, "too late")

    assert state == (await admin.show(change_id)).state


async def test_discard_unknown_change_raises_change_not_found(admin: ea.OutboxAdmin) -> None:
    """Discarding an unknown id is ChangeNotFound."""
    with pytest.raises(ea.ChangeNotFound):
        await admin.discard("chg_feedfacefeedfacefeedfacefeedface", "gone")


# --- export -------------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_export_writes_every_change_not_done(
    spool: Spool, admin: ea.OutboxAdmin, tmp_path: Path
) -> None:
    """export() writes one JSON line per change not done, oldest first, and returns how many."""
    inflight = await spool.add(create("inflight@example.com"))
    await spool.claim_all()
    pending = await spool.add(create("pending@example.com"))
    waiting = await spool.add(create("waiting@example.com"))
    await spool.wait_for_guid(waiting)
    done = await spool.add(create("done@example.com"))
    await spool.finish(done)
    dead = await spool.add(create("dead@example.com"))
    await spool.kill(dead)
    target = tmp_path / "export.jsonl"

    count = await admin.export(target)

    records = read_lines(target)
    assert 4 == count
    assert [inflight, pending, waiting, dead] == [record["change_id"] for record in records]
    assert ["inflight", "pending", "waiting_guid", "dead"] == [r["state"] for r in records]


async def test_export_keeps_personal_data(
    queued_person: tuple[Path | str, str, str], tmp_path: Path
) -> None:
    """The export is for re-entering changes elsewhere: bodies and keys are in plain."""
    path, change_id, _ = queued_person
    target = tmp_path / "export.jsonl"
    async with admin_of(path) as admin:
        assert 1 == await admin.export(target)

    (record,) = read_lines(target)
    assert change_id == record["change_id"]
    for name, value in PERSON.items():
        assert value == record["body"][name]
    assert f"email={PERSON['email']}" == record["key"]
    datetime.fromisoformat(record["created_at"])


async def test_export_file_is_readable_by_its_owner_only(
    spool: Spool, admin: ea.OutboxAdmin, tmp_path: Path
) -> None:
    """The export holds personal data: the file is created with mode 0600."""
    await spool.add(create("anna@example.com"))
    target = tmp_path / "export.jsonl"

    await admin.export(target)

    assert 0o600 == stat.S_IMODE(target.stat().st_mode)


async def test_export_over_an_existing_file_is_owner_only_too(
    spool: Spool, admin: ea.OutboxAdmin, tmp_path: Path
) -> None:
    """Exporting over a file readable by others replaces its content and leaves it 0600."""
    await spool.add(create("anna@example.com"))
    target = tmp_path / "export.jsonl"
    target.write_text("old content\n" * 10)
    target.chmod(0o644)

    assert 1 == await admin.export(target)

    assert 1 == len(read_lines(target))
    assert 0o600 == stat.S_IMODE(target.stat().st_mode)


async def test_export_of_an_empty_outbox(admin: ea.OutboxAdmin, tmp_path: Path) -> None:
    """With nothing waiting, export() writes an empty file and returns 0."""
    target = tmp_path / "export.jsonl"

    assert 0 == await admin.export(str(target))
    assert "" == target.read_text()
