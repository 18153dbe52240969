"""How close a drain comes to the best the shared rate budget allows, workload by workload.

Once every process on an outbox shares one budget per API key (`rate_limit`, 40 requests a
second by default), the drain's ceiling is the budget times the changes each request carries.
For each workload this prints the drain time, the requests Engage received per change, and
the ratio of the best time the budget allows to the time taken (1.00 is the ceiling).

FakeEngage runs in a child process, answering 429 above 200 requests a second per key (what
Engage documents). The config is the default apart from where the outbox lives, a User-Agent,
and, for the updates, ``assume_default_contact_type`` (the tenant has one contact type, so
updates of contacts the app never read can go in bulk).

Workloads, each queued by an `EngageSession` while the fake is down (so the rows are exactly
what an app writes in an outage), then drained by a started `OutboxFlusher`:

1. plain creates: bulk POSTs; their GUIDs come from one lookup each afterwards (Engage's
   batch status lists none), or from the batch status in the ``items`` shape;
2. creates with ``store_external_id``: the bulk API cannot carry it, one POST each;
3. updates of existing contacts: bulk PATCHes;
4. a mix of the three with Engage down for `--outage` seconds in the middle.

The best time is the longer of two bounds. The budget's: the requests that cannot be avoided
(every bulk request and one status poll per batch, one POST per create with an option, one
lookup per create whose GUID the status does not tell) at `rate_limit` a second, plus
`batch_poll_initial` once when there are bulk batches (Engage processes them out of band, and
a client learns the outcome only by polling), plus the outage. And, for the workloads whose
bulk requests carry thousands of changes each (where the budget is not what limits them), a
bare aiohttp client's: the same bulk bodies posted, `batch_poll_initial` waited, each batch's
status read once. The ratio printed is best / drain.

Checked after each drain: every change applied, no contact created twice, and the most
requests Engage saw in any one-second window.

    python benchmarks/budget.py [--scale 1.0] [--outage 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import attrs
from _common import UPDATE_BODY, USER_AGENT, child_process, machine, print_table, verdict

import engage_async as ea
from engage_async.testing import FakeEngage

ENGAGE_429_ABOVE = 200.0
TARGET_RATIO = 0.9
BULK_MAX = 4000
# Queued this many at a time: the session's group commit takes them in a few transactions.
QUEUE_CONCURRENCY = 200


# --- the fake, in a child process -------------------------------------------------------------


def serve_fake(pipe: Connection) -> None:
    """The child process: a FakeEngage answering commands from the pipe until "stop"."""

    async def serve() -> None:
        async with FakeEngage(rate_limit=ENGAGE_429_ABOVE) as fake:
            pipe.send((fake.url, fake.api_key))
            loop = asyncio.get_running_loop()
            while True:
                command, *args = await loop.run_in_executor(None, pipe.recv)
                if command == "stop":
                    break
                pipe.send(await _answer(fake, command, *args))

    asyncio.run(serve())


async def _answer(fake: FakeEngage, command: str, *args: Any) -> Any:
    if command == "seed":
        prefix, count = args
        return [fake.add_contact({"email": f"{prefix}{i}@example.com"}) for i in range(count)]
    if command == "down":
        await fake.go_down()
        return None
    if command == "up":
        await fake.come_up()
        return None
    if command == "shape":
        fake.shapes = {**fake.shapes, args[0]: args[1]}
        return None
    if command == "clear":
        fake.clear_requests()
        return None
    if command == "traffic":
        kinds: dict[str, int] = {}
        for request in fake.requests:
            kind = _kind(request.method, request.path)
            kinds[kind] = kinds.get(kind, 0) + 1
        return len(fake.requests), kinds, fake.peak_rate(1.0)
    if command == "created":
        # How many of the emails hold exactly one contact, and how many hold more.
        prefix, count = args
        found = [len(fake.find("email", f"{prefix}{i}@example.com")) for i in range(count)]
        return sum(n == 1 for n in found), sum(n > 1 for n in found)
    if command == "updated":
        ids, value = args
        contacts = fake.contacts
        return sum(contacts[guid].attributes.get("city") == value for guid in ids)
    raise ValueError(f"unknown command {command!r}")


def _kind(method: str, path: str) -> str:
    if path.endswith("/bulk/status"):
        return "batch status"
    if path.endswith("/bulk"):
        return f"bulk {method}"
    if path.endswith("/contacts/id"):
        return "lookup"
    return f"{method} single"


class RemoteFake:
    """The child's fake, asked over the pipe (its answers are small)."""

    def __init__(self, pipe: Connection) -> None:
        self._pipe = pipe
        self.url, self.api_key = pipe.recv()
        self._lock = asyncio.Lock()

    async def ask(self, command: str, *args: Any) -> Any:
        async with self._lock:
            loop = asyncio.get_running_loop()
            self._pipe.send((command, *args))
            return await loop.run_in_executor(None, self._pipe.recv)


@contextlib.asynccontextmanager
async def running_fake() -> AsyncIterator[RemoteFake]:
    async with child_process(serve_fake) as pipe:
        yield await asyncio.get_running_loop().run_in_executor(None, RemoteFake, pipe)


# --- a workload ----------------------------------------------------------------------------------


@attrs.define
class Workload:
    """What is queued, and the requests its drain cannot avoid."""

    name: str
    plain_creates: int = 0
    creates_with_option: int = 0
    updates: int = 0
    guids_in_status: bool = False
    outage: float = 0.0

    @property
    def changes(self) -> int:
        return self.plain_creates + self.creates_with_option + self.updates

    def batches(self) -> int:
        return math.ceil(self.plain_creates / BULK_MAX) + math.ceil(self.updates / BULK_MAX)

    def unavoidable_requests(self) -> int:
        lookups = 0 if self.guids_in_status else self.plain_creates
        return 2 * self.batches() + self.creates_with_option + lookups

    def best_seconds(self, config: ea.EngageConfig) -> float:
        polling = config.batch_poll_initial if self.batches() else 0.0
        return self.unavoidable_requests() / config.rate_limit + polling + self.outage


@attrs.frozen
class Result:
    workload: Workload
    seconds: float
    requests: int
    kinds: dict[str, int]
    peak: int
    budget_bound: float
    bare: float

    @property
    def best(self) -> float:
        return max(self.budget_bound, self.bare)


def bench_config(fake: RemoteFake, directory: Path, **overrides: Any) -> ea.EngageConfig:
    """The default config, pointed at the fake, with the outbox in `directory`."""
    values: dict[str, Any] = {
        "base_url": fake.url,
        "api_key": fake.api_key,
        "user_agent": USER_AGENT,
        "outbox_path": directory / "outbox.sqlite3",
        "xml_dir": directory / "xml",
        "assume_default_contact_type": True,
    }
    values.update(overrides)
    return ea.EngageConfig(**values)


async def in_groups(calls: list[Callable[[], Awaitable[ea.Delivery]]]) -> None:
    """Await the calls `QUEUE_CONCURRENCY` at a time; every one must have been queued."""
    for start in range(0, len(calls), QUEUE_CONCURRENCY):
        deliveries = await asyncio.gather(
            *(call() for call in calls[start : start + QUEUE_CONCURRENCY])
        )
        if not all(delivery.queued for delivery in deliveries):
            raise RuntimeError("a change was not queued while Engage was down")


async def queue(fake: RemoteFake, config: ea.EngageConfig, work: Workload, run: str) -> list[str]:
    """Queue the workload's changes while the fake is down; the ids of the updated contacts."""
    ids: list[str] = await fake.ask("seed", f"{run}-old-", work.updates)
    await fake.ask("down")
    body = {**UPDATE_BODY, "city": run}
    async with ea.EngageSession(config) as engage:
        calls: list[Callable[[], Awaitable[ea.Delivery]]] = [
            *(
                functools.partial(engage.create_contact, {"email": f"{run}-new-{i}@example.com"})
                for i in range(work.plain_creates)
            ),
            *(
                functools.partial(
                    engage.create_contact,
                    {"email": f"{run}-opt-{i}@example.com"},
                    store_external_id="S01",
                )
                for i in range(work.creates_with_option)
            ),
            *(functools.partial(engage.update_contact, guid, body) for guid in ids),
        ]
        await in_groups(calls)
    return ids


def unfinished(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM changes WHERE state IN ('pending', 'inflight', 'waiting_guid')"
        ).fetchone()
        return int(row[0])


async def drain(fake: RemoteFake, config: ea.EngageConfig, work: Workload) -> float:
    """Start a flusher and wait until nothing is left; an outage mid-way if the workload has
    one. Seconds from the start to the end.
    """
    await fake.ask("clear")
    await fake.ask("up")
    # The sessions that queued the changes used the budget's slots (their lookups failed at
    # connect); those come free one window after: the drain starts with a fresh budget.
    await asyncio.sleep(1.1)
    async with ea.OutboxFlusher(config) as flusher:
        started = time.perf_counter()
        task = flusher.start()
        if work.outage:
            # Down about halfway through the best time without the outage.
            await asyncio.sleep((work.best_seconds(config) - work.outage) / 2)
            await fake.ask("down")
            await asyncio.sleep(work.outage)
            await fake.ask("up")
        while unfinished(config.outbox_path):
            if task.done():
                task.result()  # raises what stopped the flusher
                raise RuntimeError("the flusher stopped before the outbox was drained")
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        flusher.stop()
        await task
    return seconds


async def check(
    fake: RemoteFake, config: ea.EngageConfig, work: Workload, run: str, ids: list[str]
) -> None:
    """Every change applied once: each new email holds one contact, each update landed."""
    for prefix, count in (
        (f"{run}-new-", work.plain_creates),
        (f"{run}-opt-", work.creates_with_option),
    ):
        once, doubled = await fake.ask("created", prefix, count)
        if once != count or doubled:
            raise RuntimeError(f"{run}: {once} of {count} created once, {doubled} doubled")
    updated = await fake.ask("updated", ids, run)
    if updated != work.updates:
        raise RuntimeError(f"{run}: {updated} of {work.updates} updates applied")
    dead = (
        sqlite3.connect(config.outbox_path)
        .execute("SELECT count(*) FROM changes WHERE state = 'dead'")
        .fetchone()[0]
    )
    if dead:
        raise RuntimeError(f"{run}: {dead} change(s) dead")


async def measure(fake: RemoteFake, directory: Path, work: Workload, run: str) -> Result:
    config = bench_config(fake, directory / run)
    (directory / run).mkdir()
    await fake.ask("shape", "batch_status", "items" if work.guids_in_status else "status")
    ids = await queue(fake, config, work, run)
    seconds = await drain(fake, config, work)
    requests, kinds, peak = await fake.ask("traffic")
    await check(fake, config, work, run, ids)
    bare = await bare_bulk(fake, config, work, run, ids) if not work.outage else 0.0
    return Result(work, seconds, requests, kinds, peak, work.best_seconds(config), bare)


async def bare_bulk(
    fake: RemoteFake, config: ea.EngageConfig, work: Workload, run: str, ids: list[str]
) -> float:
    """Seconds a bare aiohttp client takes to send the workload's bulk requests (the same
    bodies, new emails for the creates), wait `batch_poll_initial` and read each batch's
    status once: the best a client can do where the budget is not what limits the drain.
    """
    if not (work.plain_creates or work.updates):
        return 0.0
    headers = {
        "apikey": fake.api_key,
        "User-Agent": USER_AGENT,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    creates = [{"email": f"{run}-bare-{i}@example.com"} for i in range(work.plain_creates)]
    updates = [{**UPDATE_BODY, "city": f"{run}-bare", "contactId": guid} for guid in ids]
    async with aiohttp.ClientSession(fake.url, headers=headers) as http:
        started = time.perf_counter()
        batches = []
        for method, items in (("POST", creates), ("PATCH", updates)):
            for first in range(0, len(items), BULK_MAX):
                body = json.dumps(items[first : first + BULK_MAX], separators=(",", ":"))
                async with http.request(
                    method,
                    "/api/v3/contacts/bulk",
                    params={"contactType": config.default_contact_type},
                    data=body.encode(),
                ) as answer:
                    batches.append(await answer.json())
        await asyncio.sleep(config.batch_poll_initial)
        for batch_id in batches:
            async with http.get(
                "/api/v3/contacts/bulk/status", params={"batchId": batch_id}
            ) as answer:
                await answer.read()
        return time.perf_counter() - started


def workloads(scale: float, outage: float) -> list[Workload]:
    def n(count: int) -> int:
        return max(1, round(count * scale))

    return [
        Workload(f"{n(5000):,} plain creates", plain_creates=n(5000)),
        Workload(
            f"{n(5000):,} plain creates, GUIDs in batch status",
            plain_creates=n(5000),
            guids_in_status=True,
        ),
        Workload(f"{n(5000):,} creates with store_external_id", creates_with_option=n(5000)),
        Workload(f"{n(20000):,} updates", updates=n(20000)),
        Workload(
            f"mix ({n(1000):,} + {n(500):,} + {n(4000):,}), {outage:g} s outage",
            plain_creates=n(1000),
            creates_with_option=n(500),
            updates=n(4000),
            outage=outage,
        ),
    ]


async def main(args: argparse.Namespace) -> None:
    defaults = ea.EngageConfig(base_url="https://x.example", api_key="k", user_agent="A/1")
    print(
        f"budget: drains through the shared budget at rate_limit={defaults.rate_limit:g}/s "
        f"(the default), FakeEngage in a child process answering 429 above "
        f"{ENGAGE_429_ABOVE:g}/s"
    )
    print(machine())
    print()
    results = []
    with tempfile.TemporaryDirectory(prefix="engage-budget-", dir=args.dir) as tmp:
        async with running_fake() as fake:
            for index, work in enumerate(workloads(args.scale, args.outage)):
                if args.only and index + 1 not in args.only:
                    continue
                result = await measure(fake, Path(tmp), work, f"w{index}")
                results.append(result)
                print(f"  {work.name}: {result.seconds:.1f} s", flush=True)
    print()
    rows = []
    for result in results:
        work = result.workload
        ratio = result.best / result.seconds
        rows.append(
            [
                work.name,
                f"{result.seconds:.1f}",
                f"{result.budget_bound:.1f}",
                f"{result.bare:.1f}" if result.bare else "-",
                f"{result.requests / work.changes:.3f}",
                f"{result.peak}",
                f"{ratio:.2f}",
                f">= {TARGET_RATIO}: {verdict(ratio >= TARGET_RATIO)}",
                f"<= {defaults.rate_limit:g}: {verdict(result.peak <= defaults.rate_limit)}",
            ]
        )
    print_table(
        [
            "workload",
            "drain s",
            "budget s",
            "bare s",
            "requests/change",
            "peak/s",
            "best/drain",
            "target",
            "peak target",
        ],
        rows,
    )
    print()
    for result in results:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(result.kinds.items()))
        print(f"{result.workload.name}: {kinds}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Drain queued creates and updates through the shared rate budget and "
        "compare with the best time it allows. Targets: >= 0.9 of the best rate per "
        "workload, never more than rate_limit requests in one second."
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every workload's size (default 1)"
    )
    parser.add_argument(
        "--outage", type=float, default=10.0, help="seconds Engage is down in the mix (10)"
    )
    parser.add_argument(
        "--only",
        type=lambda text: {int(part) for part in text.split(",")},
        default=set(),
        help="run only these workloads, by number (e.g. 3 or 1,4)",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the temporary outboxes go (default /tmp)"
    )
    args = parser.parse_args()
    if args.scale <= 0 or args.outage < 0:
        parser.error("--scale must be above 0 and --outage at least 0")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
