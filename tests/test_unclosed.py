"""Nothing of ours left unclosed keeps the interpreter from exiting; it warns instead.

aiosqlite runs each connection on a thread that is not a daemon, so a connection nobody
closed made the interpreter wait for it for ever at exit. Each case runs in a fresh
interpreter with ResourceWarning shown; the timeout only bounds a hang and is never asserted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "leave_open.py"
HANG_LIMIT = 60.0


def run_script(mode: str, outbox: Path) -> subprocess.CompletedProcess[str]:
    """Run leave_open.py in MODE; a hang fails the test with TimeoutExpired."""
    return subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", str(SCRIPT), mode, str(outbox)],
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT,
        check=False,
    )


@pytest.mark.slow
def test_a_one_shot_admin_call_exits_and_leaves_nothing_open(tmp_path: Path) -> None:
    """``asyncio.run(OutboxAdmin(path).stats())`` exits normally: the call opened and closed
    the outbox itself, so there is nothing to warn about.
    """
    result = run_script("one-shot-admin", tmp_path / "outbox.sqlite3")

    assert (0, "done\n") == (result.returncode, result.stdout), result.stderr
    assert "ResourceWarning" not in result.stderr


@pytest.mark.slow
def test_an_admin_never_left_exits_with_a_warning(tmp_path: Path) -> None:
    """An admin whose ``async with`` was entered and never left does not hold the exit up; it
    warns with a ResourceWarning naming it.
    """
    result = run_script("entered-admin", tmp_path / "outbox.sqlite3")

    assert (0, "done\n") == (result.returncode, result.stdout), result.stderr
    assert "ResourceWarning: unclosed <OutboxAdmin " in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "status"), [("return", 0), ("raise", 1)])
def test_an_unclosed_session_and_flusher_exit_with_warnings(
    tmp_path: Path, mode: str, status: int
) -> None:
    """An app that opens a session and a flusher and returns, or crashes, without closing
    them still exits (with its own status), and each object warns that it was left open.
    """
    result = run_script(mode, tmp_path / "outbox.sqlite3")

    assert (status, "done\n") == (result.returncode, result.stdout), result.stderr
    assert "ResourceWarning: unclosed <EngageSession " in result.stderr
    assert "ResourceWarning: unclosed <OutboxFlusher " in result.stderr
    assert ("RuntimeError: the app crashed" in result.stderr) == (mode == "raise")
