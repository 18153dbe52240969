"""The flusher's XML step against rows as they lie in the outbox: poison rows isolated, creates
and updates in files of their own, creates with options kept for the API,
avoidTriggeringExport only where it fits, and a file exported once across a crash.

Rows are inserted straight into the outbox with SQL, as a bug or an older version could have
left them: the export must hold against any row, not only against what today's session
queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock, make_config
from lxml import etree

import engage_async as ea
from engage_async import _xmlfiles
from engage_async._changes import Operation
from engage_async._flush_run import FlushRun
from engage_async._outbox import SqliteOutbox
from engage_async._xml_export import XmlExport
from engage_async.cli import main
from engage_async.testing import FakeEngage

NS = {"c": _xmlfiles.NAMESPACE}
GUIDS = [f"2e40b702-2767-4abe-ae99-aa510108e2{i:02x}" for i in range(40)]
OWNER = "test:1"


def xml_config(fake: FakeEngage, tmp_path: Path, **overrides: Any) -> ea.EngageConfig:
    """XML mode on `fake`; a waiting create is looked up once a flush (the next is 30 s away)."""
    values: dict[str, Any] = {
        "fallback_mode": "xml",
        "background_delays": (30.0,),
        "poll_interval": 0.05,
        "lease_seconds": 5.0,
    }
    values.update(overrides)
    return make_config(fake.url, fake.api_key, tmp_path, **values)


def query(config: ea.EngageConfig, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """Rows of an SQL query on the outbox file."""
    with contextlib.closing(sqlite3.connect(config.outbox_path)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, tuple(params)).fetchall()]


def execute(config: ea.EngageConfig, sql: str, params: Iterable[Any] = ()) -> None:
    """Change the outbox behind the library's back (time passing, a crashed flusher)."""
    with contextlib.closing(sqlite3.connect(config.outbox_path)) as conn, conn:
        conn.execute(sql, tuple(params))


async def create_outbox(config: ea.EngageConfig) -> None:
    """An empty outbox file with the current schema."""
    outbox = await SqliteOutbox.open(config.outbox_path)
    await outbox.close()


def insert(
    config: ea.EngageConfig,
    body: str,
    *,
    contact_id: str | None = None,
    email: str | None = None,
    contact_type: str = "Member",
    options: dict[str, str] | None = None,
) -> str:
    """Put a row straight into the outbox, its body as raw JSON text; its change id.

    An update when `contact_id` is given, else a create keyed by `email`. Nothing checks the
    body: this is what a bug, or an older version without the payload guard, could leave.
    """
    change_id = f"chg_{os.urandom(16).hex()}"
    now = time.time()
    if contact_id is not None:
        operation, key, ref, key_name = "update", f"id:{contact_id}", None, None
    else:
        ref = f"ref_{os.urandom(16).hex()}"
        operation, key, key_name = "create", f"ref:{ref}", "email"
    execute(
        config,
        "INSERT INTO changes (change_id, operation, contact_key, contact_id, ref, contact_type,"
        " key_name, key_value, body, query, created_at, updated_at, next_attempt_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            change_id,
            operation,
            key,
            contact_id,
            ref,
            contact_type,
            key_name,
            email,
            body,
            json.dumps(options or {}),
            now,
            now,
            now,
        ],
    )
    return change_id


def rows(config: ea.EngageConfig) -> dict[str, dict[str, Any]]:
    """The outbox rows keyed by change id."""
    return {row["change_id"]: row for row in query(config, "SELECT * FROM changes")}


def files(config: ea.EngageConfig) -> list[Path]:
    """The import files in xml_dir (not the sent/ folder, not temporary files)."""
    if not config.xml_dir.exists():
        return []
    return sorted(config.xml_dir.glob("*_contacts.xml"))


def contacts_in(path: Path) -> list[dict[str, str]]:
    """{field: text} of every contact in an import file."""
    root = etree.parse(str(path)).getroot()
    return [
        {etree.QName(child).localname: child.text or "" for child in element}
        for element in root.iterfind("c:new/*", NS)
    ]


def emails_and_ids(path: Path) -> set[str]:
    """The email of each create, or the contactId of each update, in an import file."""
    return {c.get("contactId") or c.get("email", "") for c in contacts_in(path)}


def plain_create(email: str, **fields: Any) -> str:
    """A create's body as JSON text."""
    return json.dumps({"email": email, **fields})


def deep_body(levels: int) -> str:
    """A body nested `levels` objects deep, as JSON text written by hand (no recursion)."""
    return '{"email":"deep@example.com","deep":' + '{"a":' * levels + "1" + "}" * levels + "}"


# --- poison rows ---------------------------------------------------------------------------------

POISON = {
    "250-levels": deep_body(250),
    "10-MB-value": json.dumps({"email": "big@example.com", "note": "SecretValue" * 1_000_000}),
    "lone-surrogate": '{"email":"surrogate@example.com","note":"Secret\\ud800Value"}',
    "nul": '{"email":"nul@example.com","note":"Secret\\u0000Value"}',
    "surrogate-in-name": '{"email":"name@example.com","no\\udc00te":"SecretValue"}',
    "not-an-object": '["SecretValue"]',
}


async def test_poison_rows_die_alone_and_the_rest_is_exported(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """Rows no XML file can hold (250 levels deep, a 10 MB value, a lone surrogate, a NUL, a
    surrogate in a field name, a body that is not an object), inserted straight into the
    outbox, are each dead-lettered alone with a reason naming no value; the creates and
    updates around them are exported, and the flush ends normally.
    """
    config = xml_config(fake, tmp_path)
    await create_outbox(config)
    good_before = insert(config, plain_create("first@example.com", firstName="First"))
    poison = {name: insert(config, body) for name, body in POISON.items()}
    update_poison = insert(config, '{"lastName":"Secret\\u0000Value"}', contact_id=GUIDS[0])
    good_update = insert(config, '{"lastName":"Lind"}', contact_id=GUIDS[1])
    good_after = insert(config, plain_create("last@example.com"))

    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    after = rows(config)
    assert (3, len(POISON) + 1) == (report.exported, report.dead)
    for name, change_id in [*poison.items(), ("update", update_poison)]:
        row = after[change_id]
        assert ("dead", "XmlInvalid") == (row["state"], row["error_code"]), name
        assert row["last_error"], name
        assert "Secret" not in row["last_error"], name
    assert "nested more than" in after[poison["250-levels"]]["last_error"]
    assert "larger than" in after[poison["10-MB-value"]]["last_error"]
    assert "waiting_guid" == after[good_before]["state"]
    assert "waiting_guid" == after[good_after]["state"]
    assert "done" == after[good_update]["state"]
    exported = set().union(*(emails_and_ids(path) for path in files(config)))
    assert {"first@example.com", "last@example.com", GUIDS[1]} == exported
    for path in files(config):
        assert [] == _xmlfiles.validate_file(path)


async def test_flush_once_exits_0_with_poison_in_the_outbox(
    fake: FakeEngage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`engage-async flush --once` in XML mode over poison rows exits 0 (no traceback): the
    poison is dead, the rest exported.
    """
    config = xml_config(fake, tmp_path)
    await create_outbox(config)
    poison = [insert(config, body) for body in POISON.values()]
    good = insert(config, plain_create("fine@example.com"))
    for name in list(os.environ):
        if name.startswith("ENGAGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ENGAGE_BASE_URL", config.base_url)
    monkeypatch.setenv("ENGAGE_API_KEY", config.api_key)
    monkeypatch.setenv("ENGAGE_USER_AGENT", config.user_agent)
    monkeypatch.setenv("ENGAGE_OUTBOX", str(config.outbox_path))
    monkeypatch.setenv("ENGAGE_XML_DIR", str(config.xml_dir))
    monkeypatch.setenv("ENGAGE_FALLBACK_MODE", "xml")

    code = await asyncio.to_thread(main, ["flush", "--once", "--no-progress"])

    after = rows(config)
    assert 0 == code
    assert ["dead"] * len(poison) == [after[change_id]["state"] for change_id in poison]
    assert "waiting_guid" == after[good]["state"]


# --- creates and updates in files of their own ---------------------------------------------------


async def test_creates_and_updates_go_into_separate_files(fake: FakeEngage, tmp_path: Path) -> None:
    """One step with creates and updates writes two files: one of creates with no contactId
    at all, one of updates where every contact has its contactId; each validates.
    """
    config = xml_config(fake, tmp_path)
    await create_outbox(config)
    for i in range(3):
        insert(config, plain_create(f"new{i}@example.com"))
        insert(config, '{"city":"Umeå"}', contact_id=GUIDS[i])

    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    written = [contacts_in(path) for path in files(config)]
    assert 6 == report.exported
    assert 2 == len(written)
    creates, updates = sorted(written, key=lambda contacts: "contactId" in contacts[0])
    assert 3 == len(creates)
    assert [] == [c for c in creates if "contactId" in c]
    assert sorted(GUIDS[:3]) == sorted(c["contactId"] for c in updates)
    for path in files(config):
        assert [] == _xmlfiles.validate_file(path)


# --- creates with options wait for the API -------------------------------------------------------


async def test_a_create_with_options_waits_for_the_api_in_xml_mode(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """A create with source and storeExternalId is never written without them: in XML mode it
    stays pending (not dead, not exported) with a reason, counted by waiting_for_api; once
    the API may be used it goes through POST /contacts with its options.
    """
    config = xml_config(fake, tmp_path)
    await create_outbox(config)
    recruited = insert(
        config,
        plain_create("recruited@example.com"),
        email="recruited@example.com",
        options={"source": "POS", "storeExternalId": "SE014"},
    )
    plain = insert(config, plain_create("plain@example.com"), email="plain@example.com")

    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()
    waiting = (await ea.OutboxAdmin(config.outbox_path).stats()).waiting_for_api

    row = rows(config)[recruited]
    assert (1, 0, 1) == (report.exported, report.dead, waiting)
    assert ("pending", "WaitsForApi") == (row["state"], row["error_code"])
    assert "waits for the API" in row["last_error"]
    assert row["exported_to"] is None
    assert ["plain@example.com"] == [c["email"] for p in files(config) for c in contacts_in(p)]
    assert "waiting_guid" == rows(config)[plain]["state"]

    bulk = xml_config(fake, tmp_path, fallback_mode="bulk")
    execute(bulk, "UPDATE changes SET next_attempt_at = 0 WHERE state = 'pending'")
    async with ea.OutboxFlusher(bulk) as flusher:
        await flusher.flush_once()
    outbox = await SqliteOutbox.open(config.outbox_path)
    try:
        waiting = await outbox.waiting_for_api()
    finally:
        await outbox.close()

    (post,) = fake.requests_to("POST", "/api/v3/contacts")
    assert {"source": "POS", "storeExternalId": "SE014"} == {
        k: v for k, v in post.query.items() if k in {"source", "storeExternalId"}
    }
    assert ("done", 0) == (rows(config)[recruited]["state"], waiting)


# --- avoidTriggeringExport -----------------------------------------------------------------------


@pytest.fixture(name="outbox")
async def outbox_fixture(tmp_path: Path) -> AsyncIterator[SqliteOutbox]:
    """An open outbox in `tmp_path`."""
    outbox = await SqliteOutbox.open(tmp_path / "outbox.sqlite3")
    try:
        yield outbox
    finally:
        await outbox.close()


async def export_claimed(
    config: ea.EngageConfig, outbox: SqliteOutbox, *, avoid: bool
) -> list[Path]:
    """Claim every due row and run the XML step on it; the files written."""
    claimed = await outbox.claim(OWNER, limit=100, lease_seconds=30.0)
    run = FlushRun(outbox, OWNER)
    run.hold(claimed)
    creates = [c for c in claimed if c.operation is Operation.CREATE]
    updates = [c for c in claimed if c.operation is Operation.UPDATE]
    await XmlExport(config, avoid_triggering_export=avoid).write(creates, updates, run)
    return files(config)


def avoid_flag(path: Path) -> str | None:
    """The avoidTriggeringExport attribute of a file's root."""
    return etree.parse(str(path)).getroot().get("avoidTriggeringExport")


async def test_avoid_triggering_export_only_on_update_files_that_qualify(
    fake: FakeEngage, tmp_path: Path, outbox: SqliteOutbox
) -> None:
    """With avoid_triggering_export, updates of non-standard fields alone go into a file with
    avoidTriggeringExport="true"; updates touching a standard field and creates go into files
    without it. Every file validates.
    """
    config = xml_config(fake, tmp_path)
    insert(config, '{"bonusLevel":2,"vip":true}', contact_id=GUIDS[0])
    insert(config, '{"loyaltyTier":"gold"}', contact_id=GUIDS[1])
    insert(config, '{"bonusLevel":3,"firstName":"Anna"}', contact_id=GUIDS[2])
    insert(config, '{"bonusLevel":4,"email":"c@example.com"}')

    written = await export_claimed(config, outbox, avoid=True)

    by_content = {frozenset(emails_and_ids(path)): avoid_flag(path) for path in written}
    assert {
        frozenset(GUIDS[:2]): "true",
        frozenset([GUIDS[2]]): None,
        frozenset(["c@example.com"]): None,
    } == by_content
    for path in written:
        assert [] == _xmlfiles.validate_file(path)


async def test_avoid_triggering_export_is_off_unless_configured(
    fake: FakeEngage, tmp_path: Path, outbox: SqliteOutbox
) -> None:
    """Without the setting no file carries avoidTriggeringExport, and updates are one file."""
    config = xml_config(fake, tmp_path)
    insert(config, '{"bonusLevel":2}', contact_id=GUIDS[0])
    insert(config, '{"firstName":"Anna"}', contact_id=GUIDS[1])

    written = await export_claimed(config, outbox, avoid=False)

    assert [None] == [avoid_flag(path) for path in written]


@pytest.mark.parametrize("configured", [False, True])
async def test_each_updates_own_choice_about_exports_wins_over_the_setting(
    fake: FakeEngage, tmp_path: Path, outbox: SqliteOutbox, configured: bool
) -> None:
    """``update_contact(..., avoid_triggering_export=...)`` is kept in XML as in bulk: an
    update that asked for it goes into a file with avoidTriggeringExport="true", one that
    asked not to into a file without it, whatever the setting; the rest follow the setting.
    """
    config = xml_config(fake, tmp_path)
    insert(
        config, '{"bonusLevel":2}', contact_id=GUIDS[0], options={"avoidTriggeringExport": "true"}
    )
    insert(
        config, '{"bonusLevel":3}', contact_id=GUIDS[1], options={"avoidTriggeringExport": "false"}
    )
    insert(config, '{"bonusLevel":4}', contact_id=GUIDS[2])

    written = await export_claimed(config, outbox, avoid=configured)

    flags = {guid: avoid_flag(path) for path in written for guid in emails_and_ids(path)}
    assert {
        GUIDS[0]: "true",
        GUIDS[1]: None,
        GUIDS[2]: "true" if configured else None,
    } == flags
    for path in written:
        assert [] == _xmlfiles.validate_file(path)


# --- exported once across a crash ----------------------------------------------------------------

KILL_AFTER_LINK = """
import asyncio, os, signal, sys
import engage_async as ea
from engage_async._outbox import SqliteOutbox

async def killed(self, path, written):
    os.kill(os.getpid(), signal.SIGKILL)  # the file is in place, the record never made

SqliteOutbox.finish_export = killed

async def main():
    base_url, api_key, outbox, xml_dir = sys.argv[1:]
    config = ea.EngageConfig(
        base_url=base_url, api_key=api_key, user_agent="EngageAsyncTests/1.0",
        outbox_path=outbox, xml_dir=xml_dir, fallback_mode="xml", background_delays=(30.0,),
    )
    async with ea.OutboxFlusher(config) as flusher:
        await flusher.flush_once()

asyncio.run(main())
"""


def queue_mixed(config: ea.EngageConfig) -> tuple[list[str], list[str]]:
    """Two creates and two updates, inserted; (create ids, update ids)."""
    creates = [insert(config, plain_create(f"k{i}@example.com")) for i in range(2)]
    updates = [insert(config, '{"city":"Kiruna"}', contact_id=GUIDS[i]) for i in range(2)]
    return creates, updates


def let_a_lease_pass(config: ea.EngageConfig) -> None:
    """Let an hour pass for the open plans and the leases of a flusher that is gone."""
    execute(config, "UPDATE xml_plans SET planned_at = planned_at - 3600")
    execute(config, "UPDATE changes SET lease_until = lease_until - 3600")


def assert_exported_once(
    config: ea.EngageConfig, creates: list[str], updates: list[str], expected_files: int
) -> None:
    """Every row exported, each to a file that holds it, no contact in two files, no plan
    left.
    """
    written = files(config)
    assert expected_files == len(written)
    seen = [item for path in written for item in emails_and_ids(path)]
    assert len(seen) == len(set(seen)) == len(creates) + len(updates)
    after = rows(config)
    assert ["waiting_guid"] * len(creates) == [after[c]["state"] for c in creates]
    assert ["done"] * len(updates) == [after[c]["state"] for c in updates]
    for change_id in creates + updates:
        assert Path(after[change_id]["exported_to"]) in written
        assert after[change_id]["xml_plan"] is None
    assert [] == query(config, "SELECT * FROM xml_plans")


async def test_a_flusher_killed_between_writing_a_file_and_recording_it(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """A flusher SIGKILLed after linking its files into place and before recording them: a
    fresh flusher finds the planned files by their bytes and records them; it writes no
    second file with the same rows, neither while the plan is young (its writer may be alive)
    nor after. What the dead flusher held unplanned is sent at once (its process is gone).
    """
    config = xml_config(fake, tmp_path)
    await create_outbox(config)
    creates, updates = queue_mixed(config)

    killed = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            KILL_AFTER_LINK,
            config.base_url,
            config.api_key,
            str(config.outbox_path),
            str(config.xml_dir),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    # Killed at its first record: the creates' file is written and planned, the updates are
    # still leased to the dead flusher.
    assert -signal.SIGKILL == killed.returncode, killed.stderr.decode()
    assert 1 == len(files(config))
    assert 1 == len(query(config, "SELECT * FROM xml_plans"))

    async with ea.OutboxFlusher(config) as flusher:
        # The dead flusher ran on this host: its process is gone, so the updates it held are
        # pending again at once and go into a file; the planned file is left to its lease.
        young = await flusher.flush_once()
        assert (2, 2) == (young.exported, young.pending)
        assert 2 == len(files(config))
        let_a_lease_pass(config)
        report = await flusher.flush_once()

    assert 2 == report.exported
    assert_exported_once(config, creates, updates, expected_files=2)


class Crash(Exception):
    """The flusher dies here (raised from a patched step)."""


async def test_a_flusher_that_died_between_planning_and_writing(
    fake: FakeEngage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flusher dying after its plan was committed and before the file was written: the next
    writes that very file (the planned name, the same rows) and records it.
    """
    config = xml_config(fake, tmp_path)
    await create_outbox(config)
    creates, updates = queue_mixed(config)

    def crash(*args: Any) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(_xmlfiles, "place", crash)
        async with ea.OutboxFlusher(config) as flusher:
            with pytest.raises(Crash):
                await flusher.flush_once()
    # It died at the first file (the creates'); the updates were given back as it stopped.
    (planned,) = [Path(row["path"]) for row in query(config, "SELECT path FROM xml_plans")]
    assert [] == files(config)

    let_a_lease_pass(config)
    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert 4 == report.exported
    assert_exported_once(config, creates, updates, expected_files=2)
    assert {"k0@example.com", "k1@example.com"} == emails_and_ids(planned)
    assert [planned] * 2 == [Path(rows(config)[c]["exported_to"]) for c in creates]


async def test_a_planned_name_another_file_took_moves_to_the_next(
    fake: FakeEngage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a different file holds a planned name when the plan is finished, that file is left
    alone and the plan's rows go into a file under the next free name.
    """
    config = xml_config(fake, tmp_path)
    await create_outbox(config)
    creates = [insert(config, plain_create(f"t{i}@example.com")) for i in range(2)]

    def crash(*args: Any) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(_xmlfiles, "place", crash)
        async with ea.OutboxFlusher(config) as flusher:
            with pytest.raises(Crash):
                await flusher.flush_once()
    (planned,) = [Path(row["path"]) for row in query(config, "SELECT path FROM xml_plans")]
    config.xml_dir.mkdir(exist_ok=True)
    planned.write_bytes(b"another writer's file")

    let_a_lease_pass(config)
    async with ea.OutboxFlusher(config) as flusher:
        await flusher.flush_once()

    after = rows(config)
    moved = Path(after[creates[0]]["exported_to"])
    assert b"another writer's file" == planned.read_bytes()
    assert moved != planned
    assert _xmlfiles.sequence_of(moved.name) > _xmlfiles.sequence_of(planned.name)
    assert {"t0@example.com", "t1@example.com"} == emails_and_ids(moved)
    assert [moved] * 2 == [Path(after[c]["exported_to"]) for c in creates]


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """Run with the process umask set to `value`."""
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


async def test_a_files_name_carries_the_flushers_clock_in_utc(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """The timestamp in an import file's name is the flusher's wall clock, in UTC, so a
    clock moved by a test (or a host in another time zone) names files predictably.
    """
    config = xml_config(fake, tmp_path)
    await create_outbox(config)
    insert(config, plain_create("stamped@example.com"))
    clock = FakeClock(wall=1_900_000_000.0)  # 2030-03-17 17:46:40 UTC

    async with ea.OutboxFlusher(config, clock=clock) as flusher:
        await flusher.flush_once()

    [name] = [path.name for path in files(config)]
    stamp, sequence, _ = name.split("_", 2)
    written = datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC).timestamp()
    # The flush's own waits moved the clock on a little.
    assert ("1", True) == (sequence, 1_900_000_000.0 <= written <= clock.wall())


@pytest.mark.parametrize("mask", [0o000, 0o022])
async def test_the_flusher_writes_files_0600_in_a_directory_0700(
    fake: FakeEngage, tmp_path: Path, mask: int
) -> None:
    """The files the flusher writes are 0600 and the xml_dir it creates 0700, whatever the
    umask: personal data is not for other local users.
    """
    config = xml_config(fake, tmp_path)
    await create_outbox(config)
    insert(config, plain_create("private@example.com"))

    with umask(mask):
        async with ea.OutboxFlusher(config) as flusher:
            await flusher.flush_once()

    (path,) = files(config)
    assert (0o600, 0o700) == (path.stat().st_mode & 0o777, config.xml_dir.stat().st_mode & 0o777)
