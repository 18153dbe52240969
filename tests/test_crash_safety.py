"""A queued change survives ``kill -9`` of the process that queued it.

A subprocess (tests/scripts/queue_until_killed.py) queues changes against an Engage that
refuses connections and prints each change_id only once its call returned ``queued=True``.
The parent reads some of those lines, SIGKILLs the child in mid-stream, and then checks that
every printed change_id is in the outbox, on either backend.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BACKEND, BACKENDS, make_config, outbox_rows

from engage_async._outbox import SqliteOutbox as Outbox

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

SCRIPT = Path(__file__).parent / "scripts" / "queue_until_killed.py"
# How long the child may take to print what we wait for before the test gives up on it.
WATCHDOG_SECONDS = 60.0


@pytest.fixture(name="refused_url")
def refused_url_fixture() -> Iterator[str]:
    """An http URL on loopback whose port is bound but not listening: connections refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def queue_and_kill(outbox: Path, url: str, lines: int, durability: str = "full") -> list[str]:
    """Run the queueing child until it printed `lines` change_ids, SIGKILL it, return them."""
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(outbox), url, durability],
        env={**os.environ, **BACKEND.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(WATCHDOG_SECONDS, child.kill)
    watchdog.start()
    printed: list[str] = []
    try:
        assert child.stdout is not None
        while len(printed) < lines:
            line = child.stdout.readline()
            if not line:
                break
            printed.append(line.strip())
        os.kill(child.pid, signal.SIGKILL)
    finally:
        watchdog.cancel()
        _, errors = child.communicate()
    assert -signal.SIGKILL == child.returncode, errors
    assert lines == len(printed), errors
    assert [] == [line for line in printed if not line.startswith("chg_")], errors
    return printed


def change_ids(path: Path) -> set[str]:
    """Every change_id in the outbox (the file at `path`, or the test's PostgreSQL schema),
    read as a new process would after the crash.
    """
    config = make_config("http://127.0.0.1:9", "key", path.parent, outbox_path=path)
    return {row["change_id"] for row in outbox_rows(config)}


@pytest.mark.slow
@pytest.mark.parametrize("lines", [1, 7, 60, 250])
def test_every_printed_change_survives_kill(tmp_path: Path, refused_url: str, lines: int) -> None:
    """Every change_id the child was told was queued is in the file after SIGKILL."""
    outbox = tmp_path / "outbox.sqlite3"

    printed = queue_and_kill(outbox, refused_url, lines)

    assert [] == [change_id for change_id in printed if change_id not in change_ids(outbox)]


@pytest.mark.slow
@pytest.mark.sqlite_only
def test_normal_durability_survives_a_process_kill(tmp_path: Path, refused_url: str) -> None:
    """synchronous=NORMAL trades power-loss safety only: a killed process loses nothing."""
    outbox = tmp_path / "outbox.sqlite3"

    printed = queue_and_kill(outbox, refused_url, 80, durability="normal")

    assert [] == [change_id for change_id in printed if change_id not in change_ids(outbox)]


@pytest.mark.slow
def test_kills_one_after_another_lose_nothing(tmp_path: Path, refused_url: str) -> None:
    """Killing several writers in turn on one file: all their promises hold together."""
    outbox = tmp_path / "outbox.sqlite3"
    printed: list[str] = []

    for lines in (5, 40, 15):
        printed += queue_and_kill(outbox, refused_url, lines)

    assert [] == [change_id for change_id in printed if change_id not in change_ids(outbox)]


@pytest.mark.slow
@pytest.mark.sqlite_only
async def test_outbox_opens_cleanly_after_a_kill(tmp_path: Path, refused_url: str) -> None:
    """After a kill the file passes SQLite's integrity check and the outbox reopens on it,
    with the killed process's rows pending.
    """
    outbox = tmp_path / "outbox.sqlite3"
    printed = queue_and_kill(outbox, refused_url, 30)

    opened = await Outbox.open(outbox)
    try:

        def inspect(conn: sqlite3.Connection) -> tuple[str, set[str], set[str]]:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            rows = conn.execute("SELECT change_id, state FROM changes").fetchall()
            return check, {row[0] for row in rows}, {row[1] for row in rows}

        check, ids, states = await opened._read(inspect)
    finally:
        await opened.close()

    assert ("ok", {"pending"}) == (check, states)
    assert set(printed) <= ids
