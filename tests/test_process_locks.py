"""No process drops another's SQLite locks on the outbox.

POSIX locks belong to a process and a file: closing any descriptor of the file drops every
lock the process's SQLite connections hold. A process that then closes its own connection
believes it is the last user, checkpoints, and deletes the ``-wal`` and ``-shm`` files under
the live connections (SQLite's "How To Corrupt An SQLite Database File", section 2.2).
Here one process holds a session, a flusher and an admin on the outbox while another runs
``engage-async outbox stats`` on it again and again.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "hold_outbox.py"
CLI = [sys.executable, "-m", "engage_async.cli"]
WATCHDOG_SECONDS = 60.0


def sidecar_files(outbox: Path) -> list[str]:
    """Which of the outbox's -wal and -shm files exist."""
    return [suffix for suffix in ("-wal", "-shm") if Path(f"{outbox}{suffix}").exists()]


def read_line(child: subprocess.Popen[str]) -> str:
    """The child's next line of output ("" if it ended)."""
    assert child.stdout is not None
    return child.stdout.readline().strip()


@pytest.mark.slow
def test_stats_from_another_process_leaves_a_holders_files_in_place(tmp_path: Path) -> None:
    """While one process holds a session, a flusher and an admin on the outbox, another runs
    `engage-async outbox stats` on it again and again: the -wal and -shm files stay in place
    all the time, and the holder's later writes and flushes all succeed.
    """
    outbox = tmp_path / "outbox.sqlite3"
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(outbox)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(WATCHDOG_SECONDS, child.kill)
    watchdog.start()
    seen: list[list[str]] = []
    results: list[str] = []
    try:
        assert "ready" == read_line(child)
        assert child.stdin is not None
        for _ in range(3):
            for _ in range(3):
                stats = subprocess.run(
                    [*CLI, "outbox", "stats", "--outbox", str(outbox)],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=WATCHDOG_SECONDS,
                )
                assert 0 == stats.returncode, stats.stderr
                seen.append(sidecar_files(outbox))
            child.stdin.write("work\n")
            child.stdin.flush()
            results.append(read_line(child))
            seen.append(sidecar_files(outbox))
        child.stdin.write("quit\n")
        child.stdin.flush()
    finally:
        watchdog.cancel()
        _, errors = child.communicate(timeout=WATCHDOG_SECONDS)

    assert 0 == child.returncode, errors
    assert [["-wal", "-shm"]] * len(seen) == seen, errors
    assert ["ok 3"] * 3 == results, errors


OPENER = Path(__file__).parent / "scripts" / "open_at_once.py"


@pytest.mark.slow
def test_workers_starting_at_once_all_open_one_new_outbox(tmp_path: Path) -> None:
    """Several app workers start together and each opens (the first creates) the same new
    outbox, round after round on fresh files: every one of them opens it. (Switching a new
    file to WAL needs a moment's exclusive lock, which SQLite may refuse at once instead of
    waiting. Seen as "database is locked" when four workers started together.
    """
    workers = [
        subprocess.Popen(
            [sys.executable, str(OPENER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    watchdog = threading.Timer(WATCHDOG_SECONDS, lambda: [w.kill() for w in workers])
    watchdog.start()
    try:
        assert ["ready"] * len(workers) == [read_line(w) for w in workers]
        outcomes = []
        for round_number in range(8):
            path = tmp_path / f"outbox-{round_number}.sqlite3"
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.write(f"go {path}\n")
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.flush()
            outcomes += [read_line(w) for w in workers]
    finally:
        watchdog.cancel()
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
            worker.wait(timeout=WATCHDOG_SECONDS)
            if worker.stdout is not None:
                worker.stdout.close()

    assert [] == [outcome for outcome in outcomes if outcome != "opened"]
