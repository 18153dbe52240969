"""What the integrity check at open costs, against SQLite's own checks on the same file.

Builds an outbox of `--changes` queued creates (the rows the session writes while Engage is
down: a body of a signup form, a ref, a key), once with every change waiting and once with all
but 1% delivered (the usual state: history kept for `keep_done`), then times, on a warm page
cache (median of `--rounds`):

* the package's check (`_schema.check_pages`: every b-tree walked, every row decoded);
* a whole `SqliteOutbox.open` + `close` (the check included), as a session or flusher pays it;
* ``PRAGMA quick_check`` and ``PRAGMA integrity_check``.

    python benchmarks/open_check.py [--changes 100000] [--rounds 5] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import machine, print_table

from engage_async import _rows
from engage_async._changes import NewChange, Operation, row_factory
from engage_async._keys import contact_key, new_ref
from engage_async._outbox import SqliteOutbox
from engage_async._schema import check_pages, migrate


def signup(number: int) -> NewChange:
    ref = new_ref()
    email = f"person{number}@example.com"
    return NewChange(
        Operation.CREATE,
        contact_key(ref=ref),
        body={
            "email": email,
            "firstName": "Anna",
            "lastName": "Svensson",
            "street": "Storgatan 12",
            "zipCode": "41101",
            "city": "Göteborg",
            "mobilePhone": "+46701234567",
            "preferences": {"acceptsEmail": True, "acceptsSms": False},
        },
        ref=ref,
        contact_type="Member",
        key_name="email",
        key_value=email,
        if_exists="return",
        reason="EngageConnectionError: POST /api/v3/contacts: cannot connect to Engage",
    )


def build(path: Path, changes: int, done: float) -> None:
    """An outbox file written by the package's own statements, in one transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.row_factory = row_factory
    now = time.time()
    conn.execute("BEGIN")
    for number in range(changes):
        _rows.enqueue(conn, signup(number), now)
    delivered = int(changes * done)
    conn.execute(
        "UPDATE changes SET state = 'done', contact_id = lower(hex(randomblob(16))),"
        " done_at = ? WHERE seq <= ?",
        (now, delivered),
    )
    conn.execute(
        "INSERT INTO identities SELECT 'ref:' || ref, contact_id, ? FROM changes"
        " WHERE contact_id IS NOT NULL",
        (now,),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def median_ms(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def pragma(path: Path, name: str) -> Callable[[], object]:
    def run() -> object:
        with sqlite3.connect(path) as conn:
            result = conn.execute(f"PRAGMA {name}").fetchall()
        conn.close()
        assert result == [("ok",)], result
        return result

    return run


def package_check(path: Path) -> Callable[[], object]:
    def run() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            check_pages(conn)
        finally:
            conn.close()

    return run


def open_and_close(path: Path) -> Callable[[], object]:
    async def cycle() -> None:
        outbox = await SqliteOutbox.open(path, create=False)
        await outbox.close()

    return lambda: asyncio.run(cycle())


def main(args: argparse.Namespace) -> None:
    print(machine())
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        rows = []
        for done in (0.0, 0.99):
            path = Path(directory) / f"outbox-{done}.sqlite3"
            build(path, args.changes, done)
            size = path.stat().st_size / 1e6
            pragma(path, "quick_check")()  # warm the page cache
            rows.append(
                [
                    f"{args.changes} changes, {done:.0%} done, {size:.0f} MB",
                    f"{median_ms(package_check(path), args.rounds):.0f}",
                    f"{median_ms(open_and_close(path), args.rounds):.0f}",
                    f"{median_ms(pragma(path, 'quick_check'), args.rounds):.0f}",
                    f"{median_ms(pragma(path, 'integrity_check'), args.rounds):.0f}",
                ]
            )
    print_table(
        ["outbox", "check ms", "open+close ms", "quick_check ms", "integrity_check ms"], rows
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", help="where the outbox files go (default: a temp dir)")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
