"""Helpers the test modules share: configs, reading the outbox file, a clock tests move.

Tests import from here (``from helpers import ...``), never from one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import engage_async as ea
from engage_async._outbox import SqliteOutbox

USER_AGENT = "EngageAsyncTests/1.0"


def make_config(base_url: str, api_key: str, tmp_path: Path, **overrides: Any) -> ea.EngageConfig:
    """A config for tests: quick retries, a short deadline, an outbox under `tmp_path`."""
    values: dict[str, Any] = {
        "base_url": base_url,
        "api_key": api_key,
        "user_agent": USER_AGENT,
        "outbox_path": tmp_path / "outbox.sqlite3",
        "xml_dir": tmp_path / "xml",
        "interactive_deadline": 1.0,
        "retry_initial_delay": 0.01,
        "retry_max_delay": 0.05,
        "rate_limit": 1000.0,
        "identity_ttl": 0.0,
    }
    values.update(overrides)
    return ea.EngageConfig(**values)


async def create_outbox(path: Path) -> None:
    """Create an empty outbox at `path`, as an app's first EngageSession does: a flusher opens
    only an outbox that exists.
    """
    outbox = await SqliteOutbox.open(path)
    await outbox.close()


def outbox_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of ``changes``, in seq order, read through a connection of the test's own."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM changes ORDER BY seq")]


class FakeClock:
    """A `Clock` whose time moves only when told to (`advance`), or when code sleeps on it.

    `sleep` moves the clock forward by the time slept and yields to the event loop once, so a
    backoff of ten minutes costs a test nothing. `jump_wall` moves the wall clock alone, as
    when the system clock is set (the monotonic clock never jumps).
    """

    def __init__(self, wall: float = 1_800_000_000.0, monotonic: float = 1_000.0) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self.slept: list[float] = []

    def wall(self) -> float:
        """The wall clock, seconds since the epoch."""
        return self._wall

    def monotonic(self) -> float:
        """The monotonic clock."""
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        """Pass `seconds` at once (recorded in `slept`)."""
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass on both clocks."""
        self._wall += seconds
        self._monotonic += seconds

    def jump_wall(self, seconds: float) -> None:
        """Set the wall clock `seconds` ahead (negative: back); the monotonic one stays."""
        self._wall += seconds


# --- subprocesses (test_budget, test_deployment) -------------------------------------------

SCRIPTS = Path(__file__).parent / "scripts"


async def start_script(
    script: Path,
    *args: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> asyncio.subprocess.Process:
    """Start a Python script of ours with pipes for stdin and stdout; stderr goes to `log`
    (appended), or stays the test's own.
    """
    import sys  # here, so that this block stays apart from the imports others edit

    with contextlib.ExitStack() as stack:
        stderr = stack.enter_context(log.open("ab")) if log is not None else None
        return await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            *args,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )


async def read_line(process: asyncio.subprocess.Process, timeout: float) -> str:
    """The next line the process prints, stripped; fails on end of output or after `timeout`."""
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    if not line:
        raise AssertionError(f"the process ended (status {await process.wait()}) without a line")
    return line.decode().strip()


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """Kill the process if it still runs, and reap it (a test's `finally`)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
