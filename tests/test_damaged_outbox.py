"""A damaged outbox is refused when it is opened, and `salvage` copies what can be read.

The damage is real: a COPY of an outbox file, made while no connection is open, gets one of
its b-tree pages overwritten by the test itself (the package never opens the file but through
SQLite). The pages are found by walking the b-tree from its root page as the file format
describes it (https://www.sqlite.org/fileformat.html, section 1.6).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config, outbox_rows

import engage_async as ea
from engage_async import cli
from engage_async._changes import NewChange, Operation
from engage_async._keys import contact_key, new_ref
from engage_async._outbox import SqliteOutbox
from engage_async._schema import INDEX_WALKS, TABLE_WALKS, check_pages
from engage_async.testing import FakeEngage

GARBAGE = 0xA5
CHANGES = 240


def queued_create(number: int) -> NewChange:
    """A queued create of a Member, as the session queues one while Engage is down."""
    ref = new_ref()
    email = f"person{number}@example.com"
    return NewChange(
        Operation.CREATE,
        contact_key(ref=ref),
        body={
            "email": email,
            "firstName": "Anna",
            "lastName": "Svensson",
            "street": f"Storgatan {number}",
            "city": "Göteborg",
        },
        ref=ref,
        contact_type="Member",
        key_name="email",
        key_value=email,
        if_exists="return",
        reason="EngageConnectionError: POST /api/v3/contacts: cannot connect to Engage",
    )


async def fill(path: Path, count: int = CHANGES) -> list[str]:
    """An outbox at `path` holding `count` queued creates; their change ids in seq order."""
    outbox = await SqliteOutbox.open(path)
    try:
        queued = await asyncio.gather(*(outbox.enqueue(queued_create(n)) for n in range(count)))
    finally:
        await outbox.close()
    return [q.change_id for q in queued]


def btree_pages(path: Path, name: str) -> tuple[list[int], list[int], int]:
    """The interior and leaf pages of the table or index `name`, and the page size."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,))
        (root_page,) = root.fetchone()
    data = path.read_bytes()
    size = int.from_bytes(data[16:18], "big")
    size = 65536 if size == 1 else size
    interior: list[int] = []
    leaves: list[int] = []

    def walk(page: int) -> None:
        base = (page - 1) * size
        header = base + (100 if page == 1 else 0)
        kind = data[header]
        if kind in {0x0A, 0x0D}:  # index leaf, table leaf
            leaves.append(page)
            return
        assert kind in {0x02, 0x05}, f"page {page} is not a b-tree page"
        interior.append(page)
        cells = int.from_bytes(data[header + 3 : header + 5], "big")
        for i in range(cells):
            pointer = header + 12 + 2 * i
            offset = int.from_bytes(data[pointer : pointer + 2], "big")
            walk(int.from_bytes(data[base + offset : base + offset + 4], "big"))
        walk(int.from_bytes(data[header + 8 : header + 12], "big"))

    walk(root_page)
    return interior, leaves, size


def overwrite_page(path: Path, page: int, size: int) -> None:
    """Overwrite one page of the file with garbage (the test's own write, no connection open)."""
    with path.open("r+b") as handle:
        handle.seek((page - 1) * size)
        handle.write(bytes([GARBAGE]) * size)


def damaged_copy(original: Path, copy: Path, table: str = "changes") -> int:
    """Copy `original` to `copy` and overwrite a leaf page in the middle of `table`'s b-tree
    in the copy; the page number.
    """
    assert not Path(f"{original}-wal").exists(), "copy only a file no connection has open"
    shutil.copyfile(original, copy)
    _, leaves, size = btree_pages(copy, table)
    assert len(leaves) >= 3, "the table must span several leaf pages"
    victim = leaves[len(leaves) // 2]
    overwrite_page(copy, victim, size)
    return victim


@pytest.fixture(name="damaged")
async def damaged_fixture(tmp_path: Path) -> tuple[Path, list[str]]:
    """A damaged outbox (one leaf page of `changes` overwritten) and the change ids the
    intact original held.
    """
    original = tmp_path / "original.sqlite3"
    ids = await fill(original)
    damaged = tmp_path / "damaged.sqlite3"
    damaged_copy(original, damaged)
    return damaged, ids


# --- reported at open --------------------------------------------------------------------


async def open_and_close(opener: str, config: ea.EngageConfig) -> None:
    """Open and close the outbox of `config` through a session, a flusher, an admin or the
    outbox itself.
    """
    if opener == "session":
        async with ea.EngageSession(config):
            pass
    elif opener == "flusher":
        async with ea.OutboxFlusher(config):
            pass
    elif opener == "admin":
        await ea.OutboxAdmin(config.outbox_path).stats()
    else:
        await (await SqliteOutbox.open(config.outbox_path)).close()


@pytest.mark.parametrize("opener", ["session", "flusher", "admin", "outbox"])
async def test_a_damaged_outbox_is_refused_when_opened(
    damaged: tuple[Path, list[str]], tmp_path: Path, opener: str
) -> None:
    """Opening a session, a flusher, an admin or the outbox on a file with a damaged page of
    `changes` raises OutboxError at once, naming the file (absolute), the damage and the
    salvage command, instead of queueing into a file no flusher can drain. The file is left
    byte for byte as it was.
    """
    path, _ = damaged
    before = path.read_bytes()
    config = make_config("http://127.0.0.1:9", "key", tmp_path, outbox_path=path)

    with pytest.raises(ea.OutboxError) as info:
        await open_and_close(opener, config)

    message = str(info.value)
    assert str(path.resolve()) in message
    assert "damaged" in message
    assert "changes cannot be read" in message
    assert "engage-async outbox salvage NEW_PATH" in message
    assert before == path.read_bytes()


def test_every_table_and_index_has_a_page_walk(tmp_path: Path) -> None:
    """The check at open walks every b-tree of the schema: a migration that adds a table or
    an index without a walk fails here.
    """
    path = tmp_path / "outbox.sqlite3"
    asyncio.run(fill(path, 1))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        btrees = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE rootpage > 0")
        }

    assert btrees == set(TABLE_WALKS) | set(INDEX_WALKS)
    assert not set(TABLE_WALKS) & set(INDEX_WALKS)


@pytest.mark.parametrize("name", sorted({*TABLE_WALKS, *INDEX_WALKS}))
async def test_a_garbage_page_in_any_table_or_index_is_found(tmp_path: Path, name: str) -> None:
    """Whichever table or index has a page overwritten, the check names that b-tree."""
    original = tmp_path / "original.sqlite3"
    await fill(original, 60)
    copy = tmp_path / "copy.sqlite3"
    shutil.copyfile(original, copy)
    interior, leaves, size = btree_pages(copy, name)
    overwrite_page(copy, (leaves + interior)[len(leaves) // 2], size)

    with (
        contextlib.closing(sqlite3.connect(copy, isolation_level=None)) as conn,
        pytest.raises(ea.OutboxError) as info,
    ):
        check_pages(conn)

    assert str(info.value).startswith(f"{name} cannot be read")


def cell_offset(path: Path, page: int, size: int, index: int) -> int:
    """Where cell `index` of a leaf page starts in the file."""
    data = path.read_bytes()
    pointer = (page - 1) * size + 8 + 2 * index
    return (page - 1) * size + int.from_bytes(data[pointer : pointer + 2], "big")


@pytest.mark.parametrize("where", ["cell pointers", "second half", "one row's header"])
async def test_a_partly_garbled_leaf_is_found(tmp_path: Path, where: str) -> None:
    """A leaf of `changes` garbled only in part (its cell pointers, its second half, the
    first 16 bytes of one row) is caught too: the check decodes every row, and a garbled row
    header reads as NULLs where there can be none.
    """
    original = tmp_path / "original.sqlite3"
    await fill(original, 60)
    copy = tmp_path / "copy.sqlite3"
    shutil.copyfile(original, copy)
    _, leaves, size = btree_pages(copy, "changes")
    page = leaves[len(leaves) // 2]
    start, length = {
        "cell pointers": ((page - 1) * size + 8, 40),
        "second half": ((page - 1) * size + size // 2, size // 2),
        "one row's header": (cell_offset(copy, page, size, 1), 16),
    }[where]
    with copy.open("r+b") as handle:
        handle.seek(start)
        handle.write(bytes([GARBAGE]) * length)

    with pytest.raises(ea.OutboxError, match=r"damaged \(changes (cannot be read|holds 1 garb)"):
        await (await SqliteOutbox.open(copy)).close()


# --- salvage -------------------------------------------------------------------------------


async def test_salvage_copies_every_readable_change_and_names_the_lost(
    damaged: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """Salvage copies every change not on the damaged page into a new outbox, in seq order,
    and names the ones it lost: together they are exactly the original's.
    """
    path, ids = damaged
    new = tmp_path / "salvaged.sqlite3"

    report = await ea.OutboxAdmin(path).salvage(new)

    copied = [row["change_id"] for row in outbox_rows(new)]
    assert report.lost_change_ids
    assert len(report.lost_change_ids) < 20  # one page's worth, not the rest of the table
    assert ids == sorted(copied + list(report.lost_change_ids), key=ids.index)
    assert [change_id for change_id in ids if change_id in copied] == copied
    assert len(copied) == report.copied["changes"]
    assert not report.complete
    assert 1 == len(report.unreadable)
    assert report.unreadable[0].startswith(
        f"changes: {len(report.lost_change_ids)} change(s) in seq "
    )


async def test_the_salvaged_outbox_is_a_private_outbox_that_opens(
    damaged: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """The new outbox is created by the package (readable by its owner only) and passes the
    check at open; the damaged one is left as it was.
    """
    path, _ = damaged
    before = path.read_bytes()
    new = tmp_path / "salvaged.sqlite3"

    report = await ea.OutboxAdmin(path).salvage(new)
    stats = await ea.OutboxAdmin(new).stats()

    assert 0o600 == stat.S_IMODE(new.stat().st_mode)
    assert report.copied["changes"] == stats.by_state["pending"]
    assert before == path.read_bytes()


async def test_the_flusher_drains_the_salvaged_outbox(
    damaged: tuple[Path, list[str]], tmp_path: Path, fake: FakeEngage
) -> None:
    """Pointed at the salvaged outbox, the flusher creates every change it holds in Engage."""
    path, _ = damaged
    new = tmp_path / "salvaged.sqlite3"
    report = await ea.OutboxAdmin(path).salvage(new)
    config = make_config(fake.url, fake.api_key, tmp_path, outbox_path=new, batch_poll_initial=0.01)

    async with ea.OutboxFlusher(config) as flusher:
        flushed = await flusher.flush_once()

    assert report.copied["changes"] == flushed.created
    assert report.copied["changes"] == len(fake.contacts)
    assert {"done"} == {row["state"] for row in outbox_rows(new)}


async def test_salvage_keeps_identities_batches_and_the_pause(tmp_path: Path) -> None:
    """Identities (refs and cached lookups), batches being followed and the flushers' pause
    are copied as they were.
    """
    original = tmp_path / "original.sqlite3"
    await fill(original, 5)
    with contextlib.closing(sqlite3.connect(original)) as conn, conn:
        conn.execute("INSERT INTO identities VALUES ('ref:ref_1', 'guid-1', 1.0)")
        conn.execute("INSERT INTO identities VALUES ('key:email:member:x', 'guid-2', 2.0)")
        conn.execute(
            "INSERT INTO batches (batch_id, kind, submitted_at, next_poll_at)"
            " VALUES ('b-1', 'create', 1.0, 2.0)"
        )
        conn.execute("INSERT INTO control VALUES ('paused_until', '1900000000.0')")
    new = tmp_path / "salvaged.sqlite3"

    report = await ea.OutboxAdmin(original).salvage(new)

    with contextlib.closing(sqlite3.connect(new)) as conn:
        tables = {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("identities", "control")
        }
        batches = conn.execute("SELECT batch_id, kind FROM batches").fetchall()
    assert report.complete
    assert {
        "changes": 5,
        "identities": 2,
        "batches": 1,
        "control": 1,
        "xml_plans": 0,
        "contact_types": 0,
    } == report.copied
    assert [("key:email:member:x", "guid-2", 2.0), ("ref:ref_1", "guid-1", 1.0)] == tables[
        "identities"
    ]
    assert [("paused_until", "1900000000.0")] == tables["control"]
    assert [("b-1", "create")] == batches


async def test_salvage_reads_identities_from_both_sides_of_a_damaged_page(
    tmp_path: Path,
) -> None:
    """With a leaf of `identities` damaged, the rows before and after it are copied, the
    report says rows between damaged pages were lost, and the ref identities the copied
    changes prove (a ref and its GUID on the create) are rebuilt.
    """
    original = tmp_path / "original.sqlite3"
    await fill(original, 3)
    with contextlib.closing(sqlite3.connect(original)) as conn, conn:
        conn.executemany(
            "INSERT INTO identities VALUES (?, ?, 1.0)",
            [(f"key:email:member:p{n:04}@example.com", f"guid-{n:04}") for n in range(400)],
        )
        conn.execute(
            "UPDATE changes SET contact_id = 'guid-ref', state = 'done', done_at = 1.0"
            " WHERE seq = 1"
        )
        (ref,) = conn.execute("SELECT ref FROM changes WHERE seq = 1").fetchone()
    damaged = tmp_path / "damaged.sqlite3"
    damaged_copy(original, damaged, "identities")
    new = tmp_path / "salvaged.sqlite3"

    report = await ea.OutboxAdmin(damaged).salvage(new)

    with contextlib.closing(sqlite3.connect(new)) as conn:
        keys = [key for (key,) in conn.execute("SELECT key FROM identities ORDER BY key")]
    cached = [key for key in keys if key.startswith("key:")]
    assert 3 == report.copied["changes"]
    assert 300 < len(cached) < 400
    assert "key:email:member:p0000@example.com" in cached
    assert "key:email:member:p0399@example.com" in cached
    assert f"ref:{ref}" in keys
    assert ("identities: the rows between damaged pages could not be read",) == report.unreadable


async def test_salvage_names_every_change_when_the_tables_root_is_damaged(
    tmp_path: Path,
) -> None:
    """With the root page of `changes` damaged no change can be read, but the change-id index
    still names every one of them in the report.
    """
    original = tmp_path / "original.sqlite3"
    ids = await fill(original)
    damaged = tmp_path / "damaged.sqlite3"
    shutil.copyfile(original, damaged)
    interior, _, size = btree_pages(damaged, "changes")
    overwrite_page(damaged, interior[0], size)
    new = tmp_path / "salvaged.sqlite3"

    report = await ea.OutboxAdmin(damaged).salvage(new)

    assert 0 == report.copied["changes"]
    assert ids == list(report.lost_change_ids)
    assert (f"changes: {CHANGES} change(s) in seq 1-{CHANGES} could not be read",) == (
        report.unreadable
    )


async def test_salvage_reads_what_is_still_in_the_wal(tmp_path: Path) -> None:
    """Changes committed but not yet checkpointed into the file (they are in its -wal, as
    after a crash) are salvaged too.
    """
    path = tmp_path / "outbox.sqlite3"
    outbox = await SqliteOutbox.open(path)
    try:
        queued = [(await outbox.enqueue(queued_create(n))).change_id for n in range(3)]
        assert Path(f"{path}-wal").stat().st_size > 0
        new = tmp_path / "salvaged.sqlite3"

        report = await ea.OutboxAdmin(path).salvage(new)
    finally:
        await outbox.close()

    assert report.complete
    assert queued == [row["change_id"] for row in outbox_rows(new)]


async def test_salvage_of_a_healthy_outbox_copies_everything(tmp_path: Path) -> None:
    """An outbox with nothing damaged is copied whole, and the report says so."""
    original = tmp_path / "original.sqlite3"
    ids = await fill(original, 30)
    new = tmp_path / "salvaged.sqlite3"

    report = await ea.OutboxAdmin(original).salvage(new)

    assert report.complete
    assert () == report.lost_change_ids
    assert ids == [row["change_id"] for row in outbox_rows(new)]


@pytest.mark.parametrize("target", ["existing", "itself"])
async def test_salvage_refuses_a_path_that_exists(
    damaged: tuple[Path, list[str]], tmp_path: Path, target: str
) -> None:
    """NEW_PATH must not exist (nor be the damaged outbox): OutboxError naming it, and the
    file there is left alone.
    """
    path, _ = damaged
    new = path if target == "itself" else tmp_path / "taken.sqlite3"
    if target == "existing":
        new.write_text("mine")
    before = new.read_bytes()

    with pytest.raises(ea.OutboxError, match="exists already"):
        await ea.OutboxAdmin(path).salvage(new)

    assert before == new.read_bytes()


async def test_salvage_refuses_a_file_that_is_not_an_outbox(tmp_path: Path) -> None:
    """A SQLite file that is not an outbox is refused, and no new outbox is left behind."""
    foreign = tmp_path / "foreign.sqlite3"
    with contextlib.closing(sqlite3.connect(foreign)) as conn, conn:
        conn.execute("CREATE TABLE t (v)")
    new = tmp_path / "salvaged.sqlite3"

    with pytest.raises(ea.OutboxError, match="not an engage-async outbox"):
        await ea.OutboxAdmin(foreign).salvage(new)

    assert not new.exists()


@pytest.mark.parametrize("bad", [123, None, ""])
async def test_salvage_names_a_bad_new_path(tmp_path: Path, bad: Any) -> None:
    """A NEW_PATH that is no path is a TypeError or ValueError naming `new_path`."""
    with pytest.raises((TypeError, ValueError), match=r"^new_path: "):
        await ea.OutboxAdmin(tmp_path / "any.sqlite3").salvage(bad)


def test_cli_salvage_reports_what_it_could_not_read(
    damaged: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`engage-async outbox salvage NEW_PATH` prints the counts, the unreadable seq range and
    the lost change ids, and exits 1 since something was lost.
    """
    path, ids = damaged
    new = tmp_path / "salvaged.sqlite3"

    code = cli.main(["outbox", "--outbox", str(path), "salvage", str(new)])

    out = capsys.readouterr().out
    lost = [line.split()[1] for line in out.splitlines() if line.startswith("lost: ")]
    assert 1 == code
    assert f"salvaged into {new.resolve()}: changes {CHANGES - len(lost)}," in out
    assert "could not read: changes: " in out
    assert lost
    assert set(lost) <= set(ids)


def test_cli_salvage_of_a_healthy_outbox_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Salvage that copied everything exits 0 and prints no loss."""
    original = tmp_path / "original.sqlite3"
    asyncio.run(fill(original, 3))

    code = cli.main(["outbox", "--outbox", str(original), "salvage", str(tmp_path / "new")])

    out = capsys.readouterr().out
    assert 0 == code
    assert "could not read" not in out
    assert "changes 3, identities 0, batches 0, control 0" in out


def test_cli_salvage_refuses_an_existing_new_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing NEW_PATH exits 2 with a message naming it."""
    original = tmp_path / "original.sqlite3"
    asyncio.run(fill(original, 1))

    code = cli.main(["outbox", "--outbox", str(original), "salvage", str(original)])

    assert 2 == code
    assert f"{original.resolve()} exists already" in capsys.readouterr().err
