"""The outbox file, how queued changes coalesce in it, and the identity map it holds.

Settings that live in the file (journal mode, user_version, application_id) are read through a
second sqlite3 connection; per-connection settings (synchronous, busy_timeout) through the
Outbox's own connection, since a second connection would only show its own.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock, make_config, new_guid, outbox_rows

import engage_async as ea
from engage_async._outbox import SqliteOutbox as Outbox
from engage_async._schema import APPLICATION_ID, MIGRATIONS
from engage_async.testing import FakeEngage

SYNCHRONOUS_NORMAL = 1
SYNCHRONOUS_FULL = 2


# --- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A second connection to the file, closed afterwards."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        yield conn


def pragma(path: Path, name: str) -> Any:
    """A PRAGMA's value as a second connection reads it."""
    with connect(path) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def mode_of(path: Path) -> int:
    """The file's permission bits."""
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.asynccontextmanager
async def opened(path: Path, **options: Any) -> AsyncIterator[Outbox]:
    """An Outbox open on `path`, closed afterwards."""
    outbox = await Outbox.open(path, **options)
    try:
        yield outbox
    finally:
        await outbox.close()


async def own_pragma(outbox: Outbox, name: str) -> Any:
    """A PRAGMA's value on the Outbox's own connection."""
    return await outbox._read(lambda conn: conn.execute(f"PRAGMA {name}").fetchone()[0])


def make_foreign_database(path: Path, *, with_tables: bool) -> None:
    """Another program's SQLite file: a table of its own, or only its own application_id."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        if with_tables:
            conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
            conn.execute("INSERT INTO notes (text) VALUES ('keep me')")
        else:
            conn.execute("PRAGMA application_id = 1234")
        conn.commit()
    path.chmod(0o644)


@pytest.fixture(name="path")
def path_fixture(tmp_path: Path) -> Path:
    """Where the outbox goes."""
    return tmp_path / "outbox.sqlite3"


@pytest.fixture(name="down")
async def down_fixture(fake: FakeEngage) -> FakeEngage:
    """`fake`, refusing connections."""
    await fake.go_down()
    return fake


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    """The session's clock: its retries pass at once."""
    return FakeClock()


@pytest.fixture(name="session")
async def session_fixture(
    config: ea.EngageConfig, clock: FakeClock
) -> AsyncIterator[ea.EngageSession]:
    """An open EngageSession on `config` and the test's clock."""
    async with ea.EngageSession(config, clock=clock) as session:
        yield session


# --- the file ---------------------------------------------------------------------------------


async def test_journal_mode_is_wal(path: Path) -> None:
    """The outbox file is in WAL mode (a property of the file, seen by any connection)."""
    async with opened(path):
        assert "wal" == pragma(path, "journal_mode")


async def test_synchronous_full_by_default(path: Path) -> None:
    """Commits are fsynced in full unless told otherwise: safe against power loss."""
    async with opened(path) as outbox:
        assert SYNCHRONOUS_FULL == await own_pragma(outbox, "synchronous")


async def test_synchronous_normal_when_asked(path: Path) -> None:
    """durability="normal" sets synchronous=NORMAL."""
    async with opened(path, durability="normal") as outbox:
        assert SYNCHRONOUS_NORMAL == await own_pragma(outbox, "synchronous")


@pytest.mark.parametrize(
    ("durability", "expected"), [("full", SYNCHRONOUS_FULL), ("normal", SYNCHRONOUS_NORMAL)]
)
async def test_session_passes_durability_and_busy_timeout(
    tmp_path: Path, durability: str, expected: int
) -> None:
    """EngageConfig.durability and busy_timeout reach the session's outbox connection."""
    config = make_config(
        "http://127.0.0.1:9", "key", tmp_path, durability=durability, busy_timeout=2.5
    )
    async with ea.EngageSession(config) as session:
        outbox = session._outbox
        assert outbox is not None
        actual = (
            await own_pragma(outbox, "synchronous"),
            await own_pragma(outbox, "busy_timeout"),
        )

    assert (expected, 2500) == actual


async def test_busy_timeout_is_set(path: Path) -> None:
    """The connection waits for a busy lock rather than failing at once (10 s default)."""
    async with opened(path) as outbox:
        assert 10_000 == await own_pragma(outbox, "busy_timeout")


async def test_user_version_and_application_id(path: Path) -> None:
    """user_version is the schema version; application_id marks the file as an outbox."""
    async with opened(path):
        assert (len(MIGRATIONS), APPLICATION_ID) == (
            pragma(path, "user_version"),
            pragma(path, "application_id"),
        )


async def test_new_file_is_private(path: Path) -> None:
    """A new outbox, its WAL and shared-memory files are readable by the owner only."""
    async with opened(path):
        modes = {
            name: mode_of(path.with_name(path.name + suffix))
            for name, suffix in (("db", ""), ("wal", "-wal"), ("shm", "-shm"))
        }

    assert {"db": 0o600, "wal": 0o600, "shm": 0o600} == modes


async def test_existing_readable_outbox_is_tightened(path: Path) -> None:
    """An outbox some other tool left at 0644 is narrowed to 0600 when opened."""
    async with opened(path):
        pass
    path.chmod(0o644)

    async with opened(path):
        assert 0o600 == mode_of(path)


async def test_reopening_keeps_the_rows(down: FakeEngage, tmp_path: Path, clock: FakeClock) -> None:
    """An outbox closed and opened again is accepted as ours, its rows intact."""
    config = make_config(down.url, down.api_key, tmp_path)
    async with ea.EngageSession(config, clock=clock) as session:
        delivery = await session.update_contact_type(new_guid(), "Contact")

    async with opened(config.outbox_path):
        assert [delivery.change_id] == [row["change_id"] for row in outbox_rows(config.outbox_path)]


async def test_non_sqlite_file_is_refused_untouched(path: Path) -> None:
    """A file that is not SQLite is refused with OutboxError and left exactly as it was."""
    content = b"name,email\nAnn,ann@example.com\n" * 40
    path.write_bytes(content)
    path.chmod(0o644)

    with pytest.raises(ea.OutboxError):
        await Outbox.open(path)

    assert (content, 0o644, [path.name]) == (
        path.read_bytes(),
        mode_of(path),
        sorted(p.name for p in path.parent.iterdir()),
    )


@pytest.mark.parametrize("with_tables", [True, False], ids=["other-tables", "other-app-id"])
async def test_foreign_sqlite_database_is_refused(path: Path, with_tables: bool) -> None:
    """Another program's SQLite database is refused with OutboxError."""
    make_foreign_database(path, with_tables=with_tables)

    with pytest.raises(ea.OutboxError, match="not an engage-async outbox"):
        await Outbox.open(path)


@pytest.mark.parametrize("with_tables", [True, False], ids=["other-tables", "other-app-id"])
async def test_foreign_sqlite_database_is_left_byte_for_byte(path: Path, with_tables: bool) -> None:
    """A refused foreign database is not written to: its bytes are exactly as before.

    (Switching it to WAL before refusing it rewrites its header.)
    """
    make_foreign_database(path, with_tables=with_tables)
    before = path.read_bytes()

    with pytest.raises(ea.OutboxError):
        await Outbox.open(path)

    assert before == path.read_bytes()


async def test_foreign_sqlite_database_keeps_its_mode(path: Path) -> None:
    """A refused foreign database keeps its permissions: it is not ours to narrow."""
    make_foreign_database(path, with_tables=True)

    with pytest.raises(ea.OutboxError):
        await Outbox.open(path)

    assert 0o644 == mode_of(path)


async def test_newer_schema_is_refused(path: Path) -> None:
    """An outbox written by a newer engage-async (higher user_version) is refused as is."""
    async with opened(path):
        pass
    newer = len(MIGRATIONS) + 1
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")

    with pytest.raises(ea.OutboxError, match="newer"):
        await Outbox.open(path)

    assert newer == pragma(path, "user_version")


async def test_missing_directory_is_refused(tmp_path: Path) -> None:
    """An outbox path in a directory that does not exist is an OutboxError, not a crash."""
    with pytest.raises(ea.OutboxError):
        await Outbox.open(tmp_path / "nowhere" / "outbox.sqlite3")


async def test_api_key_never_reaches_the_file(
    down: FakeEngage, tmp_path: Path, clock: FakeClock
) -> None:
    """The API key is in no byte of the outbox, its WAL or its shared memory, while open or
    after close, whatever was queued.
    """
    api_key = "ek-Zq7sH3uT9wVb2KxP-secret"
    config = make_config(down.url, api_key, tmp_path)
    path = config.outbox_path
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]

    async with ea.EngageSession(config, clock=clock) as session:
        created = await session.create_contact({"email": "ann@example.com", "firstName": "Ann"})
        assert created.ref is not None
        await session.update_contact(created.ref, {"lastName": "Berg"})
        await session.update_contact_type(created.ref, "Contact")
        for i in range(5):
            await session.update_contact(new_guid(), {"firstName": f"N{i}", "city": "Lund"})
        while_open = {f.name: api_key.encode() in f.read_bytes() for f in files if f.exists()}
    after_close = {f.name: api_key.encode() in f.read_bytes() for f in files if f.exists()}

    assert 7 == len(outbox_rows(path))
    assert {path.name: False, files[1].name: False, files[2].name: False} == while_open
    assert all(not found for found in after_close.values())


# --- coalescing -------------------------------------------------------------------------------


async def test_two_queued_updates_become_one_row(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """Two updates to one contact: one row, later values winning, preferences merged per
    key and consents merged by id.
    """
    guid = new_guid()
    first = await session.update_contact(
        guid,
        {
            "firstName": "Ann",
            "city": "Lund",
            "preferences": {"acceptsEmail": True, "acceptsSms": True},
            "consents": [{"id": "newsletter", "value": True}, {"id": "sms", "value": True}],
        },
    )
    second = await session.update_contact(
        guid,
        {
            "firstName": "Anna",
            "preferences": {"acceptsSms": False},
            "consents": [{"id": "sms", "value": False}, {"id": "postal", "value": True}],
        },
    )

    rows = outbox_rows(config.outbox_path)
    assert (first.change_id, [first.change_id]) == (
        second.change_id,
        [row["change_id"] for row in rows],
    )
    assert {
        "firstName": "Anna",
        "city": "Lund",
        "preferences": {"acceptsEmail": True, "acceptsSms": False},
        "consents": [
            {"id": "newsletter", "value": True},
            {"id": "sms", "value": False},
            {"id": "postal", "value": True},
        ],
    } == json_of(rows[0], "body")


def json_of(row: dict[str, Any], column: str) -> Any:
    """A JSON column of a row, decoded."""
    return None if row[column] is None else json.loads(row[column])


async def test_cleared_field_wins_over_earlier_value(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """An explicit CLEAR after a value is kept as the later value (null on the wire)."""
    guid = new_guid()
    await session.update_contact(guid, {"city": "Lund", "firstName": "Ann"})
    await session.update_contact(guid, {"city": ea.CLEAR})

    rows = outbox_rows(config.outbox_path)
    assert [{"city": None, "firstName": "Ann"}] == [json_of(row, "body") for row in rows]


async def test_update_folds_into_queued_create(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """An update of a queued create (by its ref) joins the create's body, and is recorded
    in its `folded` column (to apply as an update should the contact turn out to exist).
    """
    created = await session.create_contact({"email": "ann@example.com", "firstName": "Ann"})
    assert created.ref is not None
    updated = await session.update_contact(
        created.ref, {"firstName": "Anna", "preferences": {"acceptsEmail": True}}
    )
    again = await session.update_contact(created.ref, {"lastName": "Berg"})

    rows = outbox_rows(config.outbox_path)
    assert [created.change_id] * 2 == [updated.change_id, again.change_id]
    assert [("create", created.change_id)] == [(r["operation"], r["change_id"]) for r in rows]
    assert {
        "email": "ann@example.com",
        "firstName": "Anna",
        "contactType": "Member",
        "preferences": {"acceptsEmail": True},
        "lastName": "Berg",
    } == json_of(rows[0], "body")
    assert {
        "firstName": "Anna",
        "preferences": {"acceptsEmail": True},
        "lastName": "Berg",
    } == json_of(rows[0], "folded")


async def test_contact_type_change_is_a_barrier(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """Updates do not merge across a contact-type change: the one after it is a new row,
    and a further update merges into that new row.
    """
    guid = new_guid()
    before = await session.update_contact(guid, {"firstName": "Ann"})
    kind = await session.update_contact_type(guid, "Contact")
    after = await session.update_contact(guid, {"firstName": "Anna"})
    later = await session.update_contact(guid, {"lastName": "Berg"})

    rows = outbox_rows(config.outbox_path)
    assert [
        ("update", before.change_id, {"firstName": "Ann"}),
        ("contact_type", kind.change_id, None),
        ("update", after.change_id, {"firstName": "Anna", "lastName": "Berg"}),
    ] == [(r["operation"], r["change_id"], json_of(r, "body")) for r in rows]
    assert after.change_id == later.change_id


async def test_contact_type_change_after_queued_create_is_a_barrier(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """Behind a queued create and a change of its type, an update is a row of its own."""
    created = await session.create_contact({"email": "ann@example.com"})
    assert created.ref is not None
    await session.update_contact_type(created.ref, "Contact")
    update = await session.update_contact(created.ref, {"firstName": "Ann"})

    rows = outbox_rows(config.outbox_path)
    assert ["create", "contact_type", "update"] == [row["operation"] for row in rows]
    assert ({"email": "ann@example.com", "contactType": "Member"}, None) == (
        json_of(rows[0], "body"),
        rows[0]["folded"],
    )
    assert update.change_id == rows[2]["change_id"]


def lease(path: Path, change_id: str, until: float) -> None:
    """Mark a row as claimed by a flusher until `until`, the way a claim would."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "UPDATE changes SET state = 'inflight', lease_owner = 'test-flusher', "
            "lease_until = ? WHERE change_id = ?",
            (until, change_id),
        )
        conn.commit()


async def test_inflight_update_is_never_merged_into(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig, clock: FakeClock
) -> None:
    """A leased update may be on the wire: a new update gets a row of its own behind it."""
    guid = new_guid()
    first = await session.update_contact(guid, {"firstName": "Ann"})
    assert first.change_id is not None
    lease(config.outbox_path, first.change_id, clock.wall() + 600)

    second = await session.update_contact(guid, {"firstName": "Anna"})

    rows = outbox_rows(config.outbox_path)
    assert [
        (first.change_id, "inflight", {"firstName": "Ann"}),
        (second.change_id, "pending", {"firstName": "Anna"}),
    ] == [(r["change_id"], r["state"], json_of(r, "body")) for r in rows]


async def test_inflight_create_is_never_folded_into(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig, clock: FakeClock
) -> None:
    """A leased create keeps its body; an update of its ref becomes a row behind it."""
    created = await session.create_contact({"email": "ann@example.com"})
    assert created.ref is not None
    assert created.change_id is not None
    lease(config.outbox_path, created.change_id, clock.wall() + 600)

    update = await session.update_contact(created.ref, {"firstName": "Ann"})

    rows = outbox_rows(config.outbox_path)
    assert [
        ("create", {"email": "ann@example.com", "contactType": "Member"}, None),
        ("update", {"firstName": "Ann"}, None),
    ] == [(r["operation"], json_of(r, "body"), r["folded"]) for r in rows]
    assert (update.change_id, f"ref:{created.ref}") == (
        rows[1]["change_id"],
        rows[1]["contact_key"],
    )


async def test_updates_to_different_contacts_do_not_merge(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """Coalescing is per contact: updates to two contacts stay two rows."""
    one, other = new_guid(), new_guid()
    await session.update_contact(one, {"firstName": "One"})
    await session.update_contact(other, {"firstName": "Other"})

    rows = outbox_rows(config.outbox_path)
    assert [(one, {"firstName": "One"}), (other, {"firstName": "Other"})] == [
        (r["contact_id"], json_of(r, "body")) for r in rows
    ]


# --- the identity map ---------------------------------------------------------------------------


@pytest.fixture(name="ttl_config")
def ttl_config_fixture(fake: FakeEngage, tmp_path: Path) -> ea.EngageConfig:
    """A config whose identity map answers for a minute."""
    return make_config(fake.url, fake.api_key, tmp_path, identity_ttl=60.0)


async def test_find_contact_id_answers_from_the_map(
    fake: FakeEngage, ttl_config: ea.EngageConfig, clock: FakeClock
) -> None:
    """Within identity_ttl, a second lookup of the same key sends no request."""
    guid = fake.add_contact({"email": "ann@example.com"})
    async with ea.EngageSession(ttl_config, clock=clock) as session:
        first = await session.find_contact_id(email="ann@example.com", contact_type="Member")
        asked = len(fake.requests)
        second = await session.find_contact_id(email="ANN@example.com ", contact_type="member")

    assert (guid, guid, 1, asked) == (first, second, asked, len(fake.requests))


async def test_identity_map_outlives_the_session(
    fake: FakeEngage, ttl_config: ea.EngageConfig, clock: FakeClock
) -> None:
    """A lookup cached by one session answers the next one (it is in the file)."""
    guid = fake.add_contact({"email": "ann@example.com"})
    async with ea.EngageSession(ttl_config, clock=clock) as session:
        await session.find_contact_id(email="ann@example.com")
    fake.clear_requests()

    async with ea.EngageSession(ttl_config, clock=clock) as session:
        again = await session.find_contact_id(email="ann@example.com")

    assert (guid, []) == (again, fake.requests)


async def test_find_contact_id_asks_again_after_the_ttl(
    fake: FakeEngage, ttl_config: ea.EngageConfig, clock: FakeClock
) -> None:
    """An identity older than identity_ttl is not trusted: Engage is asked again."""
    guid = fake.add_contact({"email": "ann@example.com"})
    async with ea.EngageSession(ttl_config, clock=clock) as session:
        await session.find_contact_id(email="ann@example.com")
        clock.advance(ttl_config.identity_ttl - 1)
        within = await session.find_contact_id(email="ann@example.com")
        asked_within = len(fake.requests_to("GET", "/api/v3/contacts/id"))
        clock.advance(2)
        after = await session.find_contact_id(email="ann@example.com")

    assert (guid, 1, guid, 2) == (
        within,
        asked_within,
        after,
        len(fake.requests_to("GET", "/api/v3/contacts/id")),
    )


async def test_resolve_after_delivered_create(fake: FakeEngage, session: ea.EngageSession) -> None:
    """A delivered create's ref resolves to its GUID from the map, with no request."""
    created = await session.create_contact({"email": "ann@example.com"})
    assert created.ref is not None
    fake.clear_requests()

    resolved = await session.resolve(created.ref)

    assert (False, created.contact_id, []) == (created.queued, resolved, fake.requests)
    assert created.contact_id is not None


async def test_ref_of_delivered_create_targets_its_guid(
    fake: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """After delivery, an update by ref goes straight to the GUID: sent, not queued."""
    created = await session.create_contact({"email": "ann@example.com"})
    assert created.ref is not None

    update = await session.update_contact(created.ref, {"firstName": "Ann"})

    assert (False, created.contact_id, []) == (
        update.queued,
        update.contact_id,
        outbox_rows(config.outbox_path),
    )


async def test_resolve_of_queued_create_is_none(
    down: FakeEngage, session: ea.EngageSession
) -> None:
    """A create still queued has no GUID yet: resolve answers None (and does not fail)."""
    created = await session.create_contact({"email": "ann@example.com"})
    assert created.ref is not None

    assert await session.resolve(created.ref) is None


async def test_second_create_while_first_is_queued_is_a_duplicate(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A second create with the same key joins the queued first: its ref, its change_id,
    no second row.
    """
    first = await session.create_contact({"email": "ann@example.com", "firstName": "Ann"})
    second = await session.create_contact({"email": "ann@example.com", "firstName": "Anna"})

    rows = outbox_rows(config.outbox_path)
    assert (True, first.ref, first.change_id) == (second.queued, second.ref, second.change_id)
    assert [first.change_id] == [row["change_id"] for row in rows]


async def test_second_create_differing_only_in_case_is_a_duplicate(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """Engage finds contacts by email whatever its letter case, and the identity map
    normalises it the same way: a second create for "ANN@Example.com" while the create for
    "ann@example.com" is queued joins it instead of queueing a second contact.
    """
    first = await session.create_contact({"email": "ann@example.com"})
    second = await session.create_contact({"email": "ANN@Example.com"})

    rows = outbox_rows(config.outbox_path)
    assert (first.ref, first.change_id) == (second.ref, second.change_id)
    assert [first.change_id] == [row["change_id"] for row in rows]


async def test_duplicate_create_with_if_exists_update_merges_its_attributes(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A duplicate create with if_exists="update" folds its attributes into the queued one."""
    first = await session.create_contact({"email": "ann@example.com", "firstName": "Ann"})
    second = await session.create_contact(
        {"email": "ann@example.com", "lastName": "Berg"}, if_exists="update"
    )

    rows = outbox_rows(config.outbox_path)
    assert (first.change_id, [first.change_id]) == (
        second.change_id,
        [row["change_id"] for row in rows],
    )
    assert {
        "email": "ann@example.com",
        "firstName": "Ann",
        "lastName": "Berg",
        "contactType": "Member",
    } == json_of(rows[0], "body")


async def test_same_key_in_another_contact_type_is_another_contact(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """A key is unique within a contact type only: a Member and a Contact with one email are
    two creates, neither joining the other.
    """
    member = await session.create_contact({"email": "ann@example.com"}, contact_type="Member")
    contact = await session.create_contact({"email": "ann@example.com"}, contact_type="Contact")

    rows = outbox_rows(config.outbox_path)
    assert [member.ref, contact.ref] == [row["ref"] for row in rows]
    assert ["Member", "Contact"] == [row["contact_type"] for row in rows]


async def test_creates_with_different_keys_are_two_rows(
    down: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """Different keys are different contacts: two creates, two rows, two refs."""
    one = await session.create_contact({"email": "one@example.com"})
    other = await session.create_contact({"email": "other@example.com"})

    rows = outbox_rows(config.outbox_path)
    assert [one.ref, other.ref] == [row["ref"] for row in rows]
    assert one.ref != other.ref
