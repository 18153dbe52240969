"""`OutboxAdmin` as a one-shot object, and its arguments checked by name.

Used without ``async with``, each call opens the outbox and closes it again; inside, one
connection serves every call. Open connections are counted as this process's descriptors of
the outbox file, read from /proc (listing them opens nothing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import engage_async as ea
from engage_async._changes import NewChange, Operation
from engage_async._keys import contact_key
from engage_async._outbox import SqliteOutbox

GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
CHANGE_ID = "chg_feedfacefeedfacefeedfacefeedface"
PROC_FD = Path("/proc/self/fd")


def descriptors_of(path: Path) -> int:
    """How many descriptors this process holds on `path` (not its -wal or -shm)."""
    target = str(path.resolve())
    count = 0
    for fd in PROC_FD.iterdir():
        try:
            count += str(fd.readlink()) == target
        except OSError:
            continue  # closed while we looked
    return count


@pytest.fixture(name="outbox_path")
async def outbox_path_fixture(tmp_path: Path) -> Path:
    """An outbox holding one queued update, closed again."""
    path = tmp_path / "outbox.sqlite3"
    outbox = await SqliteOutbox.open(path)
    try:
        await outbox.enqueue(
            NewChange(
                Operation.UPDATE,
                contact_key(contact_id=GUID),
                body={"firstName": "Anna"},
                contact_id=GUID,
            )
        )
    finally:
        await outbox.close()
    return path


# --- one-shot and async with ----------------------------------------------------------------


@pytest.mark.skipif(not PROC_FD.is_dir(), reason="needs /proc to count descriptors")
async def test_one_shot_calls_leave_no_connection_open(outbox_path: Path) -> None:
    """Without ``async with``, every call opens the outbox and closes it before returning:
    between calls this process holds no descriptor of the file.
    """
    admin = ea.OutboxAdmin(outbox_path)

    stats = await admin.stats()
    after_stats = descriptors_of(outbox_path)
    entries = await admin.list()
    after_list = descriptors_of(outbox_path)

    assert 1 == stats.by_state["pending"]
    assert 1 == len(entries)
    assert (0, 0) == (after_stats, after_list)


@pytest.mark.skipif(not PROC_FD.is_dir(), reason="needs /proc to count descriptors")
async def test_async_with_keeps_one_connection_for_every_call(outbox_path: Path) -> None:
    """Inside ``async with``, one connection serves every call and stays open between them;
    it is closed when the block ends.
    """
    async with ea.OutboxAdmin(outbox_path) as admin:
        await admin.stats()
        after_stats = descriptors_of(outbox_path)
        await admin.list()
        after_list = descriptors_of(outbox_path)

    assert (1, 1, 0) == (after_stats, after_list, descriptors_of(outbox_path))


async def test_one_shot_calls_see_each_others_writes(outbox_path: Path) -> None:
    """One-shot calls in a row act on the same file: a discard is seen by the next listing."""
    admin = ea.OutboxAdmin(outbox_path)
    (entry,) = await admin.list()

    await admin.discard(entry.change_id, "not wanted")

    assert ["dead"] == [e.state for e in await admin.list()]


async def test_close_without_async_with_is_harmless(outbox_path: Path) -> None:
    """`close` on an admin that never entered ``async with`` does nothing, and later calls
    still work.
    """
    admin = ea.OutboxAdmin(outbox_path)
    await admin.close()

    assert 1 == (await admin.stats()).by_state["pending"]


# --- a missing outbox ---------------------------------------------------------------------


async def test_a_missing_outbox_is_named_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a relative path, the admin's refusal of a missing outbox names the absolute
    path it looked at, and creates nothing.
    """
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ea.OutboxError) as info:
        await ea.OutboxAdmin("engage-outbox.sqlite3").stats()

    assert f"there is no outbox at {tmp_path.resolve() / 'engage-outbox.sqlite3'};" in str(
        info.value
    )
    assert [] == list(tmp_path.iterdir())


# --- arguments ------------------------------------------------------------------------------

Call = Callable[[ea.OutboxAdmin], Awaitable[Any]]

BAD_CALLS: list[tuple[str, Call, type[Exception], str]] = [
    ("show(123)", lambda a: a.show(123), TypeError, "change_id"),  # type: ignore[arg-type]
    ("show(None)", lambda a: a.show(None), TypeError, "change_id"),  # type: ignore[arg-type]
    ("show(an email)", lambda a: a.show("anna@example.com"), ValueError, "change_id"),
    ("show(reveal='yes')", lambda a: a.show(CHANGE_ID, reveal="yes"), TypeError, "reveal"),  # type: ignore[arg-type]
    ("list(limit='5')", lambda a: a.list(limit="5"), TypeError, "limit"),  # type: ignore[arg-type]
    ("list(limit=True)", lambda a: a.list(limit=True), TypeError, "limit"),
    ("list(limit=2.5)", lambda a: a.list(limit=2.5), TypeError, "limit"),  # type: ignore[arg-type]
    ("list(limit=0)", lambda a: a.list(limit=0), ValueError, "limit"),
    ("list(state=1)", lambda a: a.list(state=1), TypeError, "state"),  # type: ignore[arg-type]
    ("list(state='lost')", lambda a: a.list(state="lost"), ValueError, "state"),
    ("list(key=5)", lambda a: a.list(key=5), TypeError, "key"),  # type: ignore[arg-type]
    ("list(key=' ')", lambda a: a.list(key=" "), ValueError, "key"),
    ("list(reveal=1)", lambda a: a.list(reveal=1), TypeError, "reveal"),  # type: ignore[arg-type]
    ("requeue(123)", lambda a: a.requeue(123), TypeError, "change_id"),  # type: ignore[arg-type]
    ("requeue('x')", lambda a: a.requeue("x"), ValueError, "change_id"),
    ("discard(123, 'r')", lambda a: a.discard(123, "r"), TypeError, "change_id"),  # type: ignore[arg-type]
    ("discard(id, None)", lambda a: a.discard(CHANGE_ID, None), TypeError, "reason"),  # type: ignore[arg-type]
    ("discard(id, ' ')", lambda a: a.discard(CHANGE_ID, " "), ValueError, "reason"),
    ("export(None)", lambda a: a.export(None), TypeError, "path"),  # type: ignore[arg-type]
    ("export('')", lambda a: a.export(""), ValueError, "path"),
    ("salvage(7)", lambda a: a.salvage(7), TypeError, "new_path"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [pytest.param(call, error, name, id=label) for label, call, error, name in BAD_CALLS],
)
async def test_every_method_names_a_bad_argument(
    outbox_path: Path, call: Call, error: type[Exception], name: str
) -> None:
    """A wrong type is a TypeError and a wrong value a ValueError, raised before the outbox is
    touched, whose message starts with the argument's name.
    """
    async with ea.OutboxAdmin(outbox_path) as admin:
        with pytest.raises(error) as info:
            await call(admin)

    assert str(info.value).startswith(f"{name}: ")


async def test_a_malformed_change_id_is_not_echoed(outbox_path: Path) -> None:
    """A pasted email in place of a change id is refused without repeating it."""
    with pytest.raises(ValueError, match="change_id") as info:
        await ea.OutboxAdmin(outbox_path).show("anna@example.com")

    assert "anna" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"outbox_path": 123}, TypeError, "outbox_path"),
        ({"outbox_path": None}, TypeError, "outbox_path"),
        ({"outbox_path": ""}, ValueError, "outbox_path"),
        ({"outbox_path": "o.sqlite3", "busy_timeout": "10"}, TypeError, "busy_timeout"),
        ({"outbox_path": "o.sqlite3", "busy_timeout": True}, TypeError, "busy_timeout"),
        ({"outbox_path": "o.sqlite3", "busy_timeout": -1}, ValueError, "busy_timeout"),
        ({"outbox_path": "o.sqlite3", "busy_timeout": float("nan")}, ValueError, "busy_timeout"),
    ],
)
def test_the_constructor_names_a_bad_argument(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    """OutboxAdmin(...) checks its own arguments the same way."""
    with pytest.raises(error) as info:
        ea.OutboxAdmin(**kwargs)

    assert str(info.value).startswith(f"{name}: ")


async def test_export_refuses_the_outbox_itself(outbox_path: Path) -> None:
    """Exporting onto the outbox (or its -wal) is refused before anything opens it: only
    SQLite may open those files, and truncating one would lose the changes.
    """
    admin = ea.OutboxAdmin(outbox_path)
    before = outbox_path.read_bytes()

    for target in (outbox_path, Path(f"{outbox_path}-wal")):
        with pytest.raises(ValueError, match=r"^path: "):
            await admin.export(target)

    assert before == outbox_path.read_bytes()
    assert 1 == (await admin.stats()).by_state["pending"]
