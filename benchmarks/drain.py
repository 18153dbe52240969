"""How fast `OutboxFlusher.flush_once` drains a large backlog of updates, and its memory.

Setup (not timed): a FakeEngage (rate limit off, requests not recorded) is seeded with N
contacts, and the outbox gets one queued update for each, written by the outbox's own enqueue
code, so the rows are exactly what the session writes when Engage is down.

Baseline (timed): the same N updates as the same bulk PATCH bodies (4000 items each), posted
straight to the fake with a bare aiohttp session, each batch's status then read once.

Drain (timed): `flush_once()` on a fresh `OutboxFlusher`, until it returns with nothing
pending; then the fake is checked to hold every update. Memory: the growth of this process's
resident set during the drain, both as ``ru_maxrss`` (peak so far) before and after, and as the
peak of ``VmRSS`` sampled every few milliseconds from /proc/self/status.

By default the fake runs in a child process, so this process's memory and CPU are the
client's alone (Engage is another machine, after all); ``--in-process`` serves it from this
process instead, its memory (which keeps every batch it received) counted in too.

    python benchmarks/drain.py [--changes 100000] [--in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from _common import (
    UPDATE_BODY,
    USER_AGENT,
    child_process,
    fill_outbox,
    fsync_probe,
    machine,
    make_config,
    max_rss_mb,
    print_table,
    rss_mb,
    verdict,
)

import engage_async as ea
from engage_async.testing import FakeEngage

RATE_TARGET = 5000.0
RSS_TARGET_MB = 100.0
BULK_MAX = 4000
# Why the session queued these: what it records after a refused connection.


def body_for(marker: str, index: int) -> dict[str, Any]:
    """The update of contact `index`: a realistic body, its last name telling runs apart."""
    return {**UPDATE_BODY, "lastName": f"{marker}-{index}"}


def seed(fake: FakeEngage, count: int) -> list[str]:
    return [
        fake.add_contact({"email": f"contact-{i}@example.com", "firstName": "Anna"})
        for i in range(count)
    ]


def count_applied(fake: FakeEngage, ids: list[str], marker: str) -> int:
    contacts = fake.contacts
    return sum(
        contacts[guid].attributes.get("lastName") == f"{marker}-{index}"
        for index, guid in enumerate(ids)
    )


class Fake(Protocol):
    url: str
    api_key: str
    ids: list[str]

    def applied(self, marker: str) -> int: ...


class LocalFake:
    """The fake served from this process."""

    def __init__(self, fake: FakeEngage, ids: list[str]) -> None:
        self.fake, self.url, self.api_key, self.ids = fake, fake.url, fake.api_key, ids

    def applied(self, marker: str) -> int:
        return count_applied(self.fake, self.ids, marker)


class RemoteFake:
    """The fake served from a child process, asked over a pipe."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.url, self.api_key, self.ids = pipe.recv()

    def applied(self, marker: str) -> int:
        self.pipe.send(("applied", marker))
        result: int = self.pipe.recv()
        return result


def serve_fake(pipe: Connection, count: int) -> None:
    """The child process: serve a seeded fake until told to stop."""

    async def serve() -> None:
        async with FakeEngage(rate_limit=None, record_requests=False) as fake:
            ids = seed(fake, count)
            pipe.send((fake.url, fake.api_key, ids))
            loop = asyncio.get_running_loop()
            while True:
                command, *rest = await loop.run_in_executor(None, pipe.recv)
                if command == "stop":
                    break
                pipe.send(count_applied(fake, ids, *rest))

    asyncio.run(serve())


@contextlib.asynccontextmanager
async def running_fake(count: int, *, in_process: bool) -> Any:
    """A fake seeded with `count` contacts, served here or from a child process."""
    if in_process:
        async with FakeEngage(rate_limit=None, record_requests=False) as fake:
            yield LocalFake(fake, seed(fake, count))
        return
    async with child_process(serve_fake, count) as pipe:
        yield await asyncio.get_running_loop().run_in_executor(None, RemoteFake, pipe)


async def baseline(fake: Fake, marker: str) -> float:
    """Seconds to apply the same updates as bulk PATCH bodies through a bare aiohttp session."""
    headers = {
        "apikey": fake.api_key,
        "User-Agent": USER_AGENT,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    async with aiohttp.ClientSession(fake.url, headers=headers) as http:
        gc.collect()
        start = time.perf_counter()
        for first in range(0, len(fake.ids), BULK_MAX):
            items = [
                {**body_for(marker, index), "contactId": guid}
                for index, guid in enumerate(fake.ids[first : first + BULK_MAX], first)
            ]
            body = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode()
            async with http.patch("/api/v3/contacts/bulk", data=body) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"bulk PATCH -> {resp.status}")
                batch_id = await resp.json()
            async with http.get("/api/v3/contacts/bulk/status", params={"batchId": batch_id}) as r:
                status = await r.json()
                if status["status"] != "Finished" or status["failedCount"]:
                    raise RuntimeError(f"batch {batch_id}: {status['status']}")
        return time.perf_counter() - start


class RssSampler:
    """Samples VmRSS from a thread; `peak` is the highest seen while running."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    @contextlib.contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mb())


async def main(args: argparse.Namespace) -> None:
    n = args.changes
    with tempfile.TemporaryDirectory(prefix="engage-bench-", dir=args.dir) as tmp:
        directory = Path(tmp)
        print(
            f"drain: {n:,} queued updates, fake Engage "
            f"{'in this process' if args.in_process else 'in a child process'}"
        )
        print(machine())
        print(f"disk: 4 KiB write + fsync {fsync_probe(directory) * 1e6:.0f} µs (median)")
        print()
        setup = time.perf_counter()
        async with running_fake(n, in_process=args.in_process) as fake:
            config = make_config(
                fake.url,
                fake.api_key,
                directory,
                bulk_max_items=BULK_MAX,
                batch_poll_initial=args.poll,
                rate_limit=1e6,
                # The seeded contacts are all of the default type, and the app never read them:
                # a tenant of one contact type, whose updates go in bulk.
                assume_default_contact_type=True,
            )
            await fill_outbox(config.outbox_path, fake.ids, functools.partial(body_for, "Drain"))
            size_mb = config.outbox_path.stat().st_size / 2**20
            print(f"setup: seeded and queued in {time.perf_counter() - setup:.1f} s")
            print(f"outbox file {size_mb:.1f} MB before the drain")

            baseline_s = await baseline(fake, "Base")
            if fake.applied("Base") != n:
                raise RuntimeError("the baseline did not apply every update")

            async with ea.OutboxFlusher(config) as flusher:
                gc.collect()
                rss_before, maxrss_before = rss_mb(), max_rss_mb()
                with RssSampler().running() as sampler:
                    start = time.perf_counter()
                    report = await flusher.flush_once()
                    drain_s = time.perf_counter() - start
                maxrss_after = max_rss_mb()
            applied = fake.applied("Drain")

    if report.pending != 0 or report.updated != n or applied != n:
        raise RuntimeError(
            f"the drain is incomplete: {report!r}, {applied} of {n} applied on the fake"
        )
    rate, base_rate = n / drain_s, n / baseline_s
    sampled = sampler.peak - rss_before
    maxrss = maxrss_after - maxrss_before
    growth = max(sampled, maxrss)
    print()
    print_table(
        ["apply 100k updates" if n == 100_000 else f"apply {n:,} updates", "seconds",
         "changes/s", "time ratio", "target"],
        [
            ["bare aiohttp bulk PATCH (baseline)", f"{baseline_s:.2f}", f"{base_rate:,.0f}",
             "1.00", ""],
            ["OutboxFlusher.flush_once", f"{drain_s:.2f}", f"{rate:,.0f}",
             f"{drain_s / baseline_s:.2f}",
             f">= {RATE_TARGET:,.0f}/s: {verdict(rate >= RATE_TARGET)}"],
        ],
    )  # fmt: skip
    print()
    print_table(
        ["memory during the drain", "before MB", "after/peak MB", "growth MB", "target"],
        [
            ["ru_maxrss (peak so far)", f"{maxrss_before:.0f}", f"{maxrss_after:.0f}",
             f"{maxrss:.0f}", ""],
            ["VmRSS sampled every 5 ms", f"{rss_before:.0f}", f"{sampler.peak:.0f}",
             f"{sampled:.0f}",
             f"<= {RSS_TARGET_MB:.0f} MB: {verdict(growth <= RSS_TARGET_MB)}"],
        ],
    )  # fmt: skip
    print()
    print(f"flush report: {report}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Drain N queued updates into FakeEngage with OutboxFlusher.flush_once, "
        "against posting the same bulk bodies with bare aiohttp. Targets: >= 5,000 changes/s "
        "and <= 100 MB of RSS growth during the drain."
    )
    parser.add_argument(
        "--changes", type=int, default=100_000, help="queued updates (default 100000)"
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=0.01,
        help="batch_poll_initial: seconds before a batch's first status poll (default 0.01)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="serve the fake from this process (its memory then counts in the RSS figures)",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the temporary outbox goes (default: /tmp)"
    )
    args = parser.parse_args()
    if args.changes < 1 or args.poll <= 0:
        parser.error("--changes must be at least 1 and --poll above 0")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
