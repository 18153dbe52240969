"""What the PostgreSQL outbox costs, and how fast several flusher processes drain it.

Three measurements, each printed as a ratio against a baseline from the same run, on the
same server:

1. sequential `PgOutbox.enqueue` of distinct contacts' updates (``queued=True`` writes)
   against the same rows inserted with bare asyncpg, one ``BEGIN`` / INSERT / ``COMMIT`` per
   row, into a table of the same schema (target: at most 1.5 times the bare insert's time);
   the two alternate in rounds so drift hits both alike;
2. 200 concurrent callers enqueueing through one outbox (its pool, default size 10) against
   the sequential rate (target: at least 3 times the throughput);
3. a drain: 100,000 queued updates drained by three ``engage-async flush --once`` processes at
   once into a FakeEngage served by a child process (target: at least 5,000 changes/s, from
   starting the processes to the last change done, interpreter start-up included), and
   checked: every update applied, none sent twice.

Without ``--url`` a throwaway PostgreSQL cluster is started as the tests start theirs
(tests/servers.py: 127.0.0.1, ``fsync=off``), so the figures are about round trips and CPU,
not the disk; with ``--url`` an existing server is used, in schemas of our own that are
dropped afterwards.

    python benchmarks/pg_outbox.py [--url URL] [--changes 3000] [--tasks 200]
        [--drain 100000] [--flushers 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
from _common import REASON, UPDATE_BODY, USER_AGENT, machine, print_table, verdict

from engage_async._changes import NewChange, Operation, dumps
from engage_async._pg_outbox import PgOutbox
from engage_async.testing import FakeEngage

SEQUENTIAL_TARGET = 1.5
CONCURRENT_TARGET = 3.0
DRAIN_TARGET = 5000.0
BULK_MAX = 4000


def update_of(guid: str, body: dict[str, Any] | None = None) -> NewChange:
    """What the session queues for an update of `guid` that Engage could not take."""
    return NewChange(
        Operation.UPDATE,
        contact_key=f"id:{guid}",
        body=body or UPDATE_BODY,
        contact_id=guid,
        reason=REASON,
    )


# --- the server -------------------------------------------------------------------------------


@contextlib.contextmanager
def throwaway_server() -> Any:
    """A PostgreSQL cluster of our own (tests/servers.py), removed afterwards; its URL."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from servers import Postgres, _pg_bindir  # type: ignore[import-not-found]

    bindir = _pg_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed: apt-get install postgresql, or --url")
    directory = Path(tempfile.mkdtemp(prefix="engage-bench-pg-"))
    directory.chmod(0o700)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    server = Postgres(directory, bindir)
    try:
        server.init()
        yield server.url
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def schemas(url: str, count: int) -> AsyncIterator[list[str]]:
    """`count` fresh schema names, dropped at the end."""
    names = [f"bench_{uuid.uuid4().hex[:10]}" for _ in range(count)]
    try:
        yield names
    finally:
        conn = await asyncpg.connect(url)
        try:
            for name in names:
                await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        finally:
            await conn.close()


# --- 1 and 2: enqueue -------------------------------------------------------------------------

_INSERT = (
    "INSERT INTO {s}.changes (change_id, operation, contact_key, contact_id, body,"
    " created_at, updated_at, next_attempt_at, last_error)"
    " VALUES ($1, 'update', $2, $3, $4, $5, $5, $5, $6)"
)


async def bare_insert(conn: Any, sql: str, guid: str) -> None:
    """The row `PgOutbox.enqueue(update_of(guid))` writes, in a transaction of its own."""
    async with conn.transaction():
        await conn.execute(
            sql,
            f"chg_{uuid.uuid4().hex}",
            f"id:{guid}",
            guid,
            dumps(UPDATE_BODY),
            time.time(),
            REASON,
        )


async def timed(count: int, one: Callable[[str], Awaitable[Any]]) -> float:
    """Seconds for `count` calls of `one` with fresh contact ids, one after another."""
    guids = [str(uuid.uuid4()) for _ in range(count)]
    start = time.perf_counter()
    for guid in guids:
        await one(guid)
    return time.perf_counter() - start


async def enqueue_figures(url: str, changes: int, tasks: int, rounds: int = 6) -> dict[str, float]:
    """Seconds per write: ours and the bare insert (sequential, interleaved), and ours with
    `tasks` concurrent callers.
    """
    async with schemas(url, 2) as (ours, bare):
        outbox = await PgOutbox.open(url, schema=ours, session_timeout=60.0)
        await (await PgOutbox.open(url, schema=bare)).close()
        conn = await asyncpg.connect(url)
        sql = _INSERT.replace("{s}", bare)
        try:
            await timed(200, lambda g: outbox.enqueue(update_of(g)))  # warm both up
            await timed(200, lambda g: bare_insert(conn, sql, g))
            mine, theirs = [], []
            per_round = max(1, changes // rounds)
            for _ in range(rounds):
                mine.append(await timed(per_round, lambda g: outbox.enqueue(update_of(g))))
                theirs.append(await timed(per_round, lambda g: bare_insert(conn, sql, g)))
            autocommit = await timed(
                per_round,
                lambda g: conn.execute(
                    sql, f"chg_{uuid.uuid4().hex}", f"id:{g}", g, "{}", time.time(), REASON
                ),
            )

            guids = [str(uuid.uuid4()) for _ in range(changes)]
            share = [guids[i::tasks] for i in range(tasks)]

            async def caller(mine_to_write: list[str]) -> None:
                for guid in mine_to_write:
                    queued = await outbox.enqueue(update_of(guid))
                    assert queued.change_id

            start = time.perf_counter()
            await asyncio.gather(*(caller(part) for part in share))
            concurrent = time.perf_counter() - start
        finally:
            await conn.close()
            await outbox.close()
    return {
        "ours": statistics.median(mine) / per_round,
        "bare": statistics.median(theirs) / per_round,
        "autocommit": autocommit / per_round,
        "concurrent": concurrent / changes,
    }


# --- 3: the drain ------------------------------------------------------------------------------


def serve_fake(pipe: Connection, count: int) -> None:
    """The child process: serve a seeded fake; answer what it received when asked."""

    async def serve() -> None:
        async with FakeEngage(rate_limit=None) as fake:
            ids = [
                fake.add_contact({"email": f"contact-{i}@example.com", "firstName": "Anna"})
                for i in range(count)
            ]
            pipe.send((fake.url, fake.api_key, ids))
            loop = asyncio.get_running_loop()
            while True:
                command = await loop.run_in_executor(None, pipe.recv)
                if command == "stop":
                    break
                sent: dict[str, int] = {}
                for request in fake.requests_to("PATCH", "/api/v3/contacts/bulk"):
                    for item in request.json():
                        sent[item["contactId"]] = sent.get(item["contactId"], 0) + 1
                singles = len(fake.requests_to("PATCH", "/api/v3/contacts/*-*"))
                applied = sum(
                    fake.contacts[guid].attributes.get("lastName") == f"Drain-{index}"
                    for index, guid in enumerate(ids)
                )
                pipe.send((applied, sum(sent.values()), len(sent), singles))

    asyncio.run(serve())


async def fill(url: str, schema: str, ids: list[str], tasks: int) -> float:
    """Queue one update per contact through the outbox's own enqueue; seconds taken."""
    outbox = await PgOutbox.open(url, schema=schema, session_timeout=60.0)
    try:
        share = [list(enumerate(ids))[i::tasks] for i in range(tasks)]

        # The app read the contacts earlier, so their type is known: bulk is possible. (The
        # cached types go out with the next enqueue.)
        for guid in ids:
            outbox.remember_type_later(guid, "Member")

        async def caller(part: list[tuple[int, str]]) -> None:
            for index, guid in part:
                await outbox.enqueue(update_of(guid, {**UPDATE_BODY, "lastName": f"Drain-{index}"}))

        start = time.perf_counter()
        await asyncio.gather(*(caller(part) for part in share))
        filled = time.perf_counter() - start
    finally:
        await outbox.close()
    # The statistics autovacuum keeps (it analyzes a table that grew by a tenth within a
    # minute): without them the planner takes 100,000 queued rows for a handful.
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"ANALYZE {schema}.changes")
    finally:
        await conn.close()
    return filled


async def flusher(env: dict[str, str]) -> tuple[int, str]:
    """Run ``engage-async flush --once`` to the end; its exit status and last line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engage_async.cli",
        "flush",
        "--once",
        "--no-progress",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    lines = (out.decode() + err.decode()).strip().splitlines()
    return process.returncode or 0, lines[-1] if lines else ""


async def drain_figures(url: str, count: int, flushers: int, tasks: int) -> dict[str, Any]:
    """Fill `count` updates, then drain them with `flushers` processes at once."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=serve_fake, args=(child, count), daemon=True)
    process.start()
    child.close()
    loop = asyncio.get_running_loop()
    try:
        fake_url, api_key, ids = await loop.run_in_executor(None, parent.recv)
        async with schemas(url, 1) as (schema,):
            filled = await fill(url, schema, ids, tasks)
            env = {k: v for k, v in os.environ.items() if not k.startswith("ENGAGE_")}
            env |= {
                "ENGAGE_BASE_URL": fake_url,
                "ENGAGE_API_KEY": api_key,
                "ENGAGE_USER_AGENT": USER_AGENT,
                "ENGAGE_OUTBOX_URL": url,
                "ENGAGE_OUTBOX_SCHEMA": schema,
                "ENGAGE_RATE_LIMIT": "1000000",
                "ENGAGE_BULK_MAX_ITEMS": str(BULK_MAX),
                "ENGAGE_BATCH_POLL_INITIAL": "0.01",
                "ENGAGE_IDENTITY_TTL": "0",
            }
            start = time.perf_counter()
            results = await asyncio.gather(*(flusher(env) for _ in range(flushers)))
            drained = time.perf_counter() - start
            conn = await asyncpg.connect(url)
            try:
                left = await conn.fetchval(
                    f"SELECT count(*) FROM {schema}.changes WHERE state <> 'done'"
                )
            finally:
                await conn.close()
        parent.send("query")
        applied, items, distinct, singles = await loop.run_in_executor(None, parent.recv)
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()
    return {
        "filled": filled,
        "drained": drained,
        "left": left,
        "applied": applied,
        "items": items,
        "distinct": distinct,
        "singles": singles,
        "results": results,
    }


async def main(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(throwaway_server())
        print("PostgreSQL outbox benchmark")
        print(machine())
        print(f"server: {'given' if args.url else 'a throwaway cluster, fsync=off'}")
        print()
        figures = await enqueue_figures(url, args.changes, args.tasks)
        sequential = figures["ours"] / figures["bare"]
        speedup = figures["ours"] / figures["concurrent"]
        print_table(
            ["enqueue (queued=True writes)", "µs/write", "writes/s", "ratio", "target"],
            [
                ["bare asyncpg BEGIN/INSERT/COMMIT", f"{figures['bare'] * 1e6:.0f}",
                 f"{1 / figures['bare']:,.0f}", "1.00", ""],
                ["bare asyncpg INSERT (autocommit)", f"{figures['autocommit'] * 1e6:.0f}",
                 f"{1 / figures['autocommit']:,.0f}",
                 f"{figures['autocommit'] / figures['bare']:.2f}", ""],
                ["PgOutbox.enqueue, sequential", f"{figures['ours'] * 1e6:.0f}",
                 f"{1 / figures['ours']:,.0f}", f"{sequential:.2f}",
                 f"<= {SEQUENTIAL_TARGET} x bare: {verdict(sequential <= SEQUENTIAL_TARGET)}"],
                [f"PgOutbox.enqueue, {args.tasks} callers", f"{figures['concurrent'] * 1e6:.0f}",
                 f"{1 / figures['concurrent']:,.0f}", f"{speedup:.2f}x seq.",
                 f">= {CONCURRENT_TARGET} x sequential: "
                 + verdict(speedup >= CONCURRENT_TARGET)],
            ],
        )  # fmt: skip
        print()
        drain = await drain_figures(url, args.drain, args.flushers, args.tasks)
        rate = args.drain / drain["drained"]
        once = (
            drain["left"] == 0
            and drain["applied"] == args.drain
            and drain["items"] + drain["singles"] == args.drain
            and drain["distinct"] + drain["singles"] == args.drain
        )
        print(f"drain: {args.drain:,} updates queued in {drain['filled']:.1f} s (not timed)")
        print_table(
            [f"drain {args.drain:,} updates", "seconds", "changes/s", "target"],
            [
                [f"{args.flushers} x engage-async flush --once", f"{drain['drained']:.2f}",
                 f"{rate:,.0f}", f">= {DRAIN_TARGET:,.0f}/s: {verdict(rate >= DRAIN_TARGET)}"],
            ],
        )  # fmt: skip
        print(
            f"applied {drain['applied']:,}; sent in bulk {drain['items']:,} items for "
            f"{drain['distinct']:,} contacts, {drain['singles']} alone; left {drain['left']}: "
            f"nothing sent twice: {verdict(once)}"
        )
        for status, last in drain["results"]:
            print(f"  flusher exit {status}: {last}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing PostgreSQL server (default: a throwaway one)")
    parser.add_argument("--changes", type=int, default=3000, help="enqueues timed (default 3000)")
    parser.add_argument("--tasks", type=int, default=200, help="concurrent callers (default 200)")
    parser.add_argument("--drain", type=int, default=100_000, help="updates drained (100000)")
    parser.add_argument("--flushers", type=int, default=3, help="flusher processes (default 3)")
    args = parser.parse_args()
    if min(args.changes, args.tasks, args.drain, args.flushers) < 1:
        parser.error("every count must be at least 1")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
