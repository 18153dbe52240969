"""Helpers shared by the benchmark scripts: configs, percentiles, RSS and a plain table.

Benchmarks print figures and ratios against a baseline measured in the same run; they never
assert on time. Each script runs on its own: ``python benchmarks/<name>.py --help``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
import platform
import resource
import sqlite3
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import engage_async as ea
from engage_async import _rows
from engage_async._changes import NewChange, Operation
from engage_async._outbox import SqliteOutbox

USER_AGENT = "EngageAsyncBench/1.0"
# A realistic small update body: what a shop's "edit my profile" page would send.
UPDATE_BODY: dict[str, Any] = {
    "firstName": "Anna",
    "lastName": "Svensson",
    "city": "Göteborg",
    "preferences": {"acceptsEmail": True, "acceptsSms": False},
}


def make_config(base_url: str, api_key: str, directory: Path, **overrides: Any) -> ea.EngageConfig:
    """A config on `base_url` with its outbox in `directory`; no client-side throttling."""
    values: dict[str, Any] = {
        "base_url": base_url,
        "api_key": api_key,
        "user_agent": USER_AGENT,
        "outbox_path": directory / "outbox.sqlite3",
        "xml_dir": directory / "xml",
        "rate_limit": 1e6,
        "identity_ttl": 0.0,
    }
    values.update(overrides)
    return ea.EngageConfig(**values)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (0 < fraction <= 1)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def rss_mb() -> float:
    """The current resident set size of this process, from /proc (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def max_rss_mb() -> float:
    """The peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def fsync_probe(directory: Path, writes: int = 200) -> float:
    """Median seconds of a 4 KiB write + fsync in `directory`: how fast this disk commits.

    Printed beside the figures, since every durable commit waits for one (or more).
    """
    path = directory / "fsync-probe"
    times = []
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        for _ in range(writes):
            start = time.perf_counter()
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times)


def machine() -> str:
    """One line about where the figures come from."""
    return (
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cpu(s), engage-async {ea.__version__}"
    )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers, columns padded; the first column left-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * width for width in widths))
    for row in cells[1:]:
        print(line(row))


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


# Why an update waits in the outboxes the benchmarks fill: what the session records.
REASON = "EngageConnectionError: PATCH /api/v3/contacts/{id}: cannot connect to Engage"


async def fill_outbox(
    path: Path, ids: Sequence[str], body_of: Callable[[int], dict[str, Any]]
) -> None:
    """Queue one update per contact (`body_of(index)`) with the outbox's own enqueue code,
    many per commit, so the rows are exactly what a session writes while Engage is down.
    """
    outbox = await SqliteOutbox.open(path)
    try:
        now = time.time()

        def enqueue_all(changes: list[NewChange], conn: sqlite3.Connection) -> None:
            for change in changes:
                _rows.enqueue(conn, change, now)

        for start in range(0, len(ids), 10_000):
            changes = [
                NewChange(
                    Operation.UPDATE,
                    contact_key=f"id:{guid}",
                    body=body_of(index),
                    contact_id=guid,
                    reason=REASON,
                )
                for index, guid in enumerate(ids[start : start + 10_000], start)
            ]
            await outbox._write(functools.partial(enqueue_all, changes))
    finally:
        await outbox.close()


@contextlib.asynccontextmanager
async def child_process(target: Callable[..., None], *args: Any) -> AsyncIterator[Connection]:
    """Run `target(pipe, *args)` in a spawned child (a fake Engage, so that its CPU and memory
    are not the client's); yield this end of the pipe. At the end the child is told
    ``("stop",)`` and killed if it lingers.
    """
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    child.close()  # so that a child dying early reads as EOFError here, not as a hang
    try:
        yield parent
    finally:
        with contextlib.suppress(OSError):
            parent.send(("stop",))
        process.join(10)
        if process.is_alive():
            process.kill()
