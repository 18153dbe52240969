"""What the durable outbox costs, and how fast a write is queued while Engage is down.

Three measurements, each against a baseline from the same run:

1. sequential `Outbox.enqueue` of distinct contacts' updates against the same rows inserted
   with raw `sqlite3`, one ``BEGIN IMMEDIATE`` / INSERT / ``COMMIT`` per row, into a file with
   the same schema and pragmas (WAL, synchronous FULL, busy_timeout). Both files live in one
   temporary directory, and the two alternate in rounds so drift hits both alike;
2. many concurrent enqueuers (group commit) against the sequential rate;
3. `EngageSession.create_contact` latency with Engage down (connection refused), first with
   the circuit closed (every call tries the network, with the default retry delays), then
   with the circuit open (the breaker opened during a warm-up and its cool-down outlasts the
   run): one caller at a time, and several callers at once.

    python benchmarks/outbox.py [--changes 10000] [--tasks 200] [--calls 300] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import (
    UPDATE_BODY,
    fsync_probe,
    machine,
    make_config,
    percentile,
    print_table,
    verdict,
)

import engage_async as ea
from engage_async._changes import NewChange, Operation
from engage_async._outbox import SqliteOutbox as Outbox
from engage_async.testing import FakeEngage

SEQUENTIAL_TARGET = 1.5
CONCURRENT_TARGET = 3.0
OPEN_P99_TARGET = 0.050

_INSERT = (
    "INSERT INTO changes (change_id, operation, contact_key, contact_id, ref, contact_type,"
    " key_name, key_value, body, query, lookup_first, if_exists, created_at, updated_at,"
    " next_attempt_at, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def update_of(guid: str) -> NewChange:
    """What the session queues for an update of `guid` that Engage could not take."""
    return NewChange(Operation.UPDATE, contact_key=f"id:{guid}", body=UPDATE_BODY, contact_id=guid)


def open_raw(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A plain connection with the outbox's pragmas (the schema is already in the file)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def raw_insert(conn: sqlite3.Connection, guid: str) -> None:
    """The row `Outbox.enqueue(update_of(guid))` writes, in a transaction of its own."""
    now = time.time()
    body = json.dumps(UPDATE_BODY, ensure_ascii=False, separators=(",", ":"))
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        _INSERT,
        (
            f"chg_{uuid.uuid4().hex}",
            "update",
            f"id:{guid}",
            guid,
            None,
            None,
            None,
            None,
            body,
            None,
            0,
            None,
            now,
            now,
            now,
            None,
        ),
    )
    conn.execute("COMMIT")


def same_rows(a: Path, b: Path) -> bool:
    """Do both files hold rows alike, ids and times aside?"""
    columns = (
        "operation, state, contact_id IS NOT NULL, ref, contact_type, key_name, key_value,"
        " body, folded, query, lookup_first, if_exists, attempts, last_error"
    )
    shapes = []
    for path in (a, b):
        with sqlite3.connect(path) as conn:
            shapes.append(conn.execute(f"SELECT DISTINCT {columns} FROM changes").fetchall())
    return shapes[0] == shapes[1] and len(shapes[0]) == 1


async def sequential(directory: Path, changes: int, rounds: int) -> dict[str, float]:
    """Seconds for `changes` sequential enqueues, and for the same rows with raw sqlite3."""
    outbox_path, raw_path = directory / "sequential.sqlite3", directory / "raw.sqlite3"
    schema_only = await Outbox.open(raw_path)
    await schema_only.close()
    conn = open_raw(raw_path, busy_timeout=10.0)
    outbox = await Outbox.open(outbox_path, busy_timeout=10.0, durability="full")
    try:
        # Warm both files up (page cache, WAL created); these rows are not timed.
        for _ in range(50):
            await outbox.enqueue(update_of(str(uuid.uuid4())))
            raw_insert(conn, str(uuid.uuid4()))
        totals = {"outbox": 0.0, "raw": 0.0}
        per_round = changes // rounds
        for index in range(rounds):
            guids = [str(uuid.uuid4()) for _ in range(per_round)]

            async def library(guids: list[str] = guids) -> None:
                for guid in guids:
                    await outbox.enqueue(update_of(guid))

            async def baseline(guids: list[str] = guids) -> None:
                for guid in guids:
                    raw_insert(conn, guid)

            order: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("raw", baseline),
                ("outbox", library),
            ]
            if index % 2:
                order.reverse()
            for name, run in order:
                gc.collect()
                start = time.perf_counter()
                await run()
                totals[name] += time.perf_counter() - start
    finally:
        conn.close()
        await outbox.close()
    if not same_rows(outbox_path, raw_path):
        raise RuntimeError("the raw baseline wrote rows unlike the outbox's")
    return totals


async def concurrent(directory: Path, tasks: int, each: int) -> float:
    """Seconds for `tasks` coroutines enqueuing `each` changes apiece, all at once."""
    outbox = await Outbox.open(directory / "concurrent.sqlite3", durability="full")
    try:
        for _ in range(50):
            await outbox.enqueue(update_of(str(uuid.uuid4())))
        guids = [[str(uuid.uuid4()) for _ in range(each)] for _ in range(tasks)]

        async def enqueuer(mine: list[str]) -> None:
            for guid in mine:
                await outbox.enqueue(update_of(guid))

        gc.collect()
        start = time.perf_counter()
        await asyncio.gather(*(enqueuer(mine) for mine in guids))
        return time.perf_counter() - start
    finally:
        await outbox.close()


async def create_latencies(
    session: ea.EngageSession, calls: int, callers: int, prefix: str
) -> list[float]:
    """Per-call seconds of `calls` create_contact calls by `callers` concurrent callers."""
    latencies: list[float] = []

    async def caller(number: int) -> None:
        for i in range(number, calls, callers):
            start = time.perf_counter()
            delivery = await session.create_contact(
                {"email": f"{prefix}-{i}@example.com", "firstName": "Anna", "lastName": "Svensson"}
            )
            latencies.append(time.perf_counter() - start)
            if not delivery.queued:
                raise RuntimeError("Engage is down, yet the create was not queued")

    gc.collect()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    return latencies


async def engage_down(directory: Path, calls: int, callers: int) -> list[list[Any]]:
    """Rows of (scenario, callers, p50, p99, max) for create_contact with Engage down."""
    rows: list[list[Any]] = []
    async with FakeEngage(rate_limit=None, record_requests=False) as fake:
        await fake.go_down()
        # The library's default deadline (3 s): what a queued call must answer within.
        deadline_s = make_config(fake.url, fake.api_key, directory).interactive_deadline

        def row(name: str, n: int, latencies: list[float], target: float) -> list[Any]:
            p99 = percentile(latencies, 0.99)
            worst = max(latencies)
            return [
                name,
                n,
                len(latencies),
                f"{statistics.median(latencies) * 1e3:.1f}",
                f"{p99 * 1e3:.1f}",
                f"{worst * 1e3:.1f}",
                f"p99 <= {target * 1e3:.0f} ms, max <= {deadline_s:.0f} s: "
                + verdict(p99 <= target and worst <= deadline_s),
            ]

        # Circuit closed throughout: the breaker never opens, so every call tries the network.
        closed_dir = directory / "closed"
        closed_dir.mkdir()
        config = make_config(fake.url, fake.api_key, closed_dir, breaker_threshold=10**9)
        async with ea.EngageSession(config) as session:
            await create_latencies(session, 5, 1, "warm")
            closed = await create_latencies(session, calls, callers, "closed")
        rows.append(row("down, circuit closed", callers, closed, deadline_s))

        # Circuit open: it opens during the warm-up and stays open (long cool-down).
        open_dir = directory / "open"
        open_dir.mkdir()
        config = make_config(fake.url, fake.api_key, open_dir, breaker_cooldown=1e6)
        async with ea.EngageSession(config) as session:
            for i in range(20):
                await create_latencies(session, 1, 1, f"opening-{i}")
                # No public view of the breaker: a benchmark may peek.
                if session._breaker.state == "open":
                    break
            else:
                raise RuntimeError("the circuit did not open")
            await create_latencies(session, 50, 1, "warm")
            for n in sorted({1, callers}):
                latencies = await create_latencies(session, calls, n, f"open-{n}")
                rows.append(row("down, circuit open", n, latencies, OPEN_P99_TARGET))
            if session._breaker.state != "open":
                raise RuntimeError("the circuit closed during the run")
    return rows


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="engage-bench-", dir=args.dir) as tmp:
        directory = Path(tmp)
        print(f"outbox: files in {directory} ({filesystem(directory)})")
        print(machine())
        print(f"disk: 4 KiB write + fsync {fsync_probe(directory) * 1e6:.0f} µs (median)")
        print()

        totals = await sequential(directory, args.changes, args.rounds)
        each = args.changes // args.tasks
        concurrent_s = await concurrent(directory, args.tasks, each)
        n = args.changes // args.rounds * args.rounds
        raw_rate, outbox_rate = n / totals["raw"], n / totals["outbox"]
        concurrent_rate = args.tasks * each / concurrent_s
        ratio = totals["outbox"] / totals["raw"]
        speedup = concurrent_rate / outbox_rate
        print_table(
            ["enqueue", "changes", "seconds", "changes/s", "µs/change", "ratio", "target"],
            [
                ["raw sqlite3, sequential", n, f"{totals['raw']:.2f}", f"{raw_rate:,.0f}",
                 f"{1e6 / raw_rate:.0f}", "1.00 (baseline)", ""],
                ["Outbox.enqueue, sequential", n, f"{totals['outbox']:.2f}",
                 f"{outbox_rate:,.0f}", f"{1e6 / outbox_rate:.0f}", f"{ratio:.2f} x time",
                 f"<= {SEQUENTIAL_TARGET}: {verdict(ratio <= SEQUENTIAL_TARGET)}"],
                [f"Outbox.enqueue, {args.tasks} tasks", args.tasks * each, f"{concurrent_s:.2f}",
                 f"{concurrent_rate:,.0f}", f"{1e6 / concurrent_rate:.0f}",
                 f"{speedup:.1f} x rate",
                 f">= {CONCURRENT_TARGET:g}x: {verdict(speedup >= CONCURRENT_TARGET)}"],
            ],
        )  # fmt: skip
        print()

        rows = await engage_down(directory, args.calls, args.callers)
        print_table(
            ["create_contact, Engage down", "callers", "calls", "p50 ms", "p99 ms", "max ms",
             "target"],
            rows,
        )  # fmt: skip


def filesystem(path: Path) -> str:
    """The mount the path is on, from /proc/mounts (best effort)."""
    best = ("?", "?", "?")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown filesystem"
    resolved = str(path.resolve())
    for line in lines:
        device, mount, kind = line.split()[:3]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(
            mount
        ) >= len(best[1]):
            best = (device, mount, kind)
    return f"{best[2]} on {best[0]}, mounted at {best[1]}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Outbox costs: sequential enqueue vs raw sqlite3 (target <= 1.5x the "
        "time), concurrent enqueue vs sequential (target >= 3x the rate), and create_contact "
        "latency with Engage down (target: p99 <= 50 ms with the circuit open, never over "
        "the interactive deadline)."
    )
    parser.add_argument(
        "--changes", type=int, default=10_000, help="changes enqueued each way (default 10000)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="alternating rounds the sequential run is split into (default 10)",
    )
    parser.add_argument("--tasks", type=int, default=200, help="concurrent enqueuers (default 200)")
    parser.add_argument(
        "--calls", type=int, default=300, help="create_contact calls per scenario (default 300)"
    )
    parser.add_argument(
        "--callers",
        type=int,
        default=10,
        help="concurrent callers for the Engage-down scenarios (default 10; the circuit-open "
        "scenario also runs with one)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the temporary outbox files go (default: the system temp dir)",
    )
    args = parser.parse_args()
    if min(args.changes, args.rounds, args.tasks, args.calls, args.callers) < 1:
        parser.error("every count must be at least 1")
    if args.changes < args.tasks or args.changes < args.rounds:
        parser.error("--changes must be at least --tasks and --rounds")
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
