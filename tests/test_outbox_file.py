"""Which outbox file is used, and when it is refused: missing, or not writable.

Only an EngageSession creates an outbox; a flusher or the admin started elsewhere refuses a
missing one, naming the absolute path it looked at. A file the process cannot write is refused
at open, and the package never adds a permission bit to it.

The tests run as root here, and root may write any file; "another user's file" is tried in a
subprocess that drops to the ``nobody`` user after importing the package.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import USER_AGENT, create_outbox, make_config

import engage_async as ea
from engage_async import cli
from engage_async._outbox import SqliteOutbox

NOBODY = 65534
HANG_LIMIT = 60.0
# Imports everything first: after dropping to nobody, the interpreter's own files may be out
# of reach.
OPEN_AS_NOBODY = f"""
import asyncio, os, sys
import engage_async as ea
if os.geteuid() == 0:
    os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})

async def main():
    config = ea.EngageConfig(
        base_url="http://127.0.0.1:9", api_key="key", user_agent="Tests/1.0",
        outbox_path=sys.argv[1],
    )
    try:
        async with ea.EngageSession(config):
            print("opened")
    except ea.OutboxError as exc:
        print(f"refused: {{exc}}")

asyncio.run(main())
"""


def mode_of(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


# --- a missing outbox -------------------------------------------------------------------------


async def test_a_flusher_refuses_a_missing_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flusher whose outbox does not exist raises OutboxError naming the absolute path, and
    creates nothing: it must not drain an empty outbox of its own while the app's changes
    wait elsewhere.
    """
    monkeypatch.chdir(tmp_path)
    config = make_config("http://127.0.0.1:9", "key", tmp_path, outbox_path="outbox.sqlite3")

    with pytest.raises(ea.OutboxError) as info:
        await ea.OutboxFlusher(config).open()

    assert f"there is no outbox at {tmp_path.resolve() / 'outbox.sqlite3'};" in str(info.value)
    assert [] == list(tmp_path.iterdir())


async def test_a_flusher_opens_the_outbox_a_session_created(tmp_path: Path) -> None:
    """Once an EngageSession has created the outbox, a flusher opens it."""
    config = make_config("http://127.0.0.1:9", "key", tmp_path)
    async with ea.EngageSession(config):
        pass

    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert ea.FlushReport() == report


@pytest.fixture(name="bare_environment")
def bare_environment_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ENGAGE_OUTBOX (nor any other ENGAGE_* but the required three), in an empty
    directory: the default outbox path is relative to it.
    """
    for name in list(os.environ):
        if name.startswith("ENGAGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ENGAGE_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ENGAGE_API_KEY", "key")
    monkeypatch.setenv("ENGAGE_USER_AGENT", USER_AGENT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return elsewhere


def test_flush_in_another_directory_exits_2_naming_the_path(
    bare_environment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`engage-async flush --once` started where no outbox is, without ENGAGE_OUTBOX, exits 2
    with a message naming the absolute path it looked at, and creates no outbox there.
    """
    code = cli.main(["flush", "--once", "--no-progress"])

    captured = capsys.readouterr()
    assert 2 == code
    assert f"no outbox at {bare_environment.resolve() / 'engage-outbox.sqlite3'}" in captured.err
    assert "" == captured.out
    assert [] == list(bare_environment.iterdir())


def test_outbox_stats_in_another_directory_exits_2_naming_the_path(
    bare_environment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`engage-async outbox stats` refuses a missing outbox the same way."""
    code = cli.main(["outbox", "stats"])

    assert 2 == code
    assert str(bare_environment.resolve() / "engage-outbox.sqlite3") in capsys.readouterr().err
    assert [] == list(bare_environment.iterdir())


# --- permissions ------------------------------------------------------------------------------


@pytest.mark.parametrize(("before", "narrowed"), [(0o644, 0o600), (0o444, 0o400), (0o604, 0o600)])
async def test_opening_takes_bits_away_but_never_adds_one(
    tmp_path: Path, before: int, narrowed: int
) -> None:
    """Group and other bits are taken away; a read-only outbox is never made writable (it is
    refused instead, when this process may not write it).
    """
    path = tmp_path / "outbox.sqlite3"
    await create_outbox(path)
    path.chmod(before)
    writable = os.access(path, os.W_OK)

    try:
        await (await SqliteOutbox.open(path)).close()
    except ea.OutboxError:
        assert not writable

    assert (narrowed if writable else before) == mode_of(path)


@pytest.fixture(name="shared_dir")
def shared_dir_fixture() -> Iterator[Path]:
    """A directory any user may use (tmp_path's parents are closed to other users)."""
    directory = Path(tempfile.mkdtemp(prefix="engage-outbox-perms-"))
    directory.chmod(0o777)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def open_as_nobody(path: Path) -> str:
    """Open a session on `path` in a process that runs as nobody; what it printed."""
    result = subprocess.run(
        [sys.executable, "-c", OPEN_AS_NOBODY, str(path)],
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    return result.stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's file")
@pytest.mark.parametrize(
    ("owner", "mode"),
    [(NOBODY, 0o444), (0, 0o644), (0, 0o600)],
    ids=["read-only-own-file", "another-users-readable-file", "another-users-private-file"],
)
def test_an_outbox_this_process_cannot_write_is_refused_at_open(
    shared_dir: Path, owner: int, mode: int
) -> None:
    """A session on an outbox its process may not write (its own file made read-only, another
    user's file) is refused at open with an OutboxError that says so and names the file; the
    file keeps its owner, its mode and its bytes.
    """
    path = shared_dir / "outbox.sqlite3"
    asyncio.run(create_outbox(path))
    os.chown(path, owner, owner)
    path.chmod(mode)
    before = path.read_bytes()

    said = open_as_nobody(path)

    assert said.startswith(f"refused: the outbox at {path.resolve()} ")
    assert "is not writable by this process" in said
    assert (owner, mode, before) == (path.stat().st_uid, mode_of(path), path.read_bytes())


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's file")
def test_an_outbox_of_its_own_is_opened_as_nobody(shared_dir: Path) -> None:
    """The same subprocess opens an outbox that nobody owns and may write: the refusals above
    are about permissions, not about running as nobody.
    """
    path = shared_dir / "outbox.sqlite3"
    asyncio.run(create_outbox(path))
    os.chown(path, NOBODY, NOBODY)

    assert "opened" == open_as_nobody(path)
