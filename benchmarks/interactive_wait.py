"""How long an interactive `contact_overview` waits for its turn while a flusher drains at
full rate through the shared rate budget.

Setup (not timed): a FakeEngage in a child process (allowing `RATE` requests a second, as a
tenant would) is seeded with N contacts, and the outbox gets one queued update for each,
written by the outbox's own enqueue code. ``bulk_threshold`` is set above N, so the flusher
sends them one by one: N requests to drain, far more than the run lasts, at `RATE` a second.

Measured: an interactive loop calls ``contact_overview`` a few times a second (the till of a
shop) for a while, in three phases:

1. baseline: the flusher runs in this process with nothing to send;
2. in-app: the same flusher drains the backlog, in this process and event loop;
3. in-app and sidecar: an ``engage-async flush`` process drains it too;
4. sidecar: the sidecar alone, the in-app flusher closed.

For each interactive call, the time it waited for its budget slot: from its first
`Budget.try_acquire` to the permit (`Budget.acquire` when the try found none), measured by
wrapping both for the interactive priority. Also the whole call's latency, and the ratio of
its p99 to the baseline's. Engage's side: how many requests it received a second (the
flusher's pace) and the most in any one second.

    python benchmarks/interactive_wait.py [--contacts 20000] [--seconds 30] [--per-second 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import (
    UPDATE_BODY,
    child_process,
    fill_outbox,
    machine,
    make_config,
    percentile,
    print_table,
    verdict,
)

import engage_async as ea
from engage_async._budget import Budget, Permit, Priority
from engage_async.testing import FakeEngage

RATE = 40.0
TARGET_MS = 50.0


# --- the fake, in a child process ------------------------------------------------------------


def serve_fake(pipe: Connection, count: int) -> None:
    """The child process: serve a seeded fake, answer questions about its traffic."""

    async def serve() -> None:
        async with FakeEngage(rate_limit=RATE) as fake:
            ids = [
                fake.add_contact({"email": f"contact-{i}@example.com", "firstName": "Anna"})
                for i in range(count)
            ]
            till = fake.add_contact(
                {"email": "till@example.com", "firstName": "Till", "lastName": "Kund"},
                preferences={"acceptsEmail": True},
            )
            pipe.send((fake.url, fake.api_key, ids, till))
            loop = asyncio.get_running_loop()
            while True:
                command, *rest = await loop.run_in_executor(None, pipe.recv)
                if command == "stop":
                    break
                if command == "mark":
                    pipe.send(len(fake.requests))
                elif command == "since":
                    requests = fake.requests[rest[0] :]
                    times = [r.time for r in requests]
                    overviews = sum(r.path.endswith("/contactoverview") for r in requests)
                    pipe.send((len(requests), overviews, peak(times)))

    asyncio.run(serve())


def peak(times: list[float]) -> int:
    """The most of `times` (ascending) within any one second."""
    best = start = 0
    for end, at in enumerate(times):
        while at - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


class RemoteFake:
    """The fake in the child process, asked over a pipe."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.url, self.api_key, self.ids, self.till = pipe.recv()

    def ask(self, *message: Any) -> Any:
        self.pipe.send(message)
        return self.pipe.recv()


@contextlib.asynccontextmanager
async def running_fake(count: int) -> AsyncIterator[RemoteFake]:
    async with child_process(serve_fake, count) as pipe:
        yield await asyncio.get_running_loop().run_in_executor(None, RemoteFake, pipe)


# --- measuring the wait ------------------------------------------------------------------------


class SlotWaits:
    """Wraps `Budget.try_acquire` and `Budget.acquire`: how long each interactive request
    waited for its slot, from its first try to the permit.
    """

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._started: dict[asyncio.Task[Any] | None, float] = {}

    def install(self) -> None:
        try_acquire, acquire = Budget.try_acquire, Budget.acquire
        waits, started = self.waits, self._started

        def timed_try(budget: Budget, priority: Priority) -> Permit | None:
            start = time.perf_counter()
            permit = try_acquire(budget, priority)
            if priority is Priority.INTERACTIVE:
                if permit is None:
                    started[asyncio.current_task()] = start
                else:
                    waits.append(time.perf_counter() - start)
            return permit

        async def timed_acquire(
            budget: Budget, priority: Priority, **options: Any
        ) -> Permit | None:
            permit = await acquire(budget, priority, **options)
            if priority is Priority.INTERACTIVE:
                start = started.pop(asyncio.current_task(), None)
                if start is not None:
                    waits.append(time.perf_counter() - start)
            return permit

        Budget.try_acquire = timed_try  # type: ignore[method-assign]
        Budget.acquire = timed_acquire  # type: ignore[method-assign]


async def interactive(
    session: ea.EngageSession, till: str, waits: SlotWaits, seconds: float, per_second: float
) -> tuple[list[float], list[float]]:
    """Call contact_overview `per_second` times a second for `seconds`: each call's slot
    wait and latency.
    """
    slot_waits: list[float] = []
    latencies: list[float] = []
    period = 1.0 / per_second
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = 0
    while loop.time() - start < seconds:
        first = len(waits.waits)
        began = time.perf_counter()
        await session.contact_overview(contact_id=till)
        latencies.append(time.perf_counter() - began)
        slot_waits.append(sum(waits.waits[first:]))
        n += 1
        await asyncio.sleep(max(0.0, start + n * period - loop.time()))
    return slot_waits, latencies


def sidecar_env(config: ea.EngageConfig) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGAGE_")}
    env.update(
        {
            "ENGAGE_BASE_URL": config.base_url,
            "ENGAGE_API_KEY": config.api_key,
            "ENGAGE_USER_AGENT": config.user_agent,
            "ENGAGE_OUTBOX": str(config.outbox_path),
            "ENGAGE_XML_DIR": str(config.xml_dir),
            "ENGAGE_RATE_LIMIT": f"{config.rate_limit:g}",
            "ENGAGE_BULK_THRESHOLD": str(config.bulk_threshold),
        }
    )
    return env


async def main(args: argparse.Namespace) -> None:
    waits = SlotWaits()
    waits.install()
    phases: dict[str, tuple[list[float], list[float], tuple[int, int, int], float]] = {}
    with tempfile.TemporaryDirectory(prefix="engage-bench-") as tmp:
        directory = Path(tmp)
        print(
            f"interactive wait: contact_overview {args.per_second:g}/s for {args.seconds:g} s "
            f"a phase; {args.contacts:,} queued updates sent singly at rate_limit {RATE:g}"
        )
        print(machine())
        async with running_fake(args.contacts) as fake:
            config = make_config(
                fake.url,
                fake.api_key,
                directory,
                rate_limit=RATE,
                bulk_threshold=args.contacts + 1,
                interactive_deadline=3.0,
            )

            async def phase(name: str) -> None:
                mark = fake.ask("mark")
                began = time.perf_counter()
                slot_waits, latencies = await interactive(
                    session, fake.till, waits, args.seconds, args.per_second
                )
                elapsed = time.perf_counter() - began
                phases[name] = (slot_waits, latencies, fake.ask("since", mark), elapsed)

            async with ea.EngageSession(config) as session:
                flusher = ea.OutboxFlusher(config)
                await flusher.open()
                sidecar: asyncio.subprocess.Process | None = None
                try:
                    flusher.start()
                    await phase("baseline: flusher idle")
                    await fill_outbox(
                        config.outbox_path,
                        fake.ids,
                        lambda index: {**UPDATE_BODY, "lastName": f"Wait-{index}"},
                    )
                    await asyncio.sleep(1.0)  # the flusher wakes and reaches its pace
                    await phase("in-app flusher draining")
                    sidecar = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "engage_async.cli",
                        "flush",
                        env=sidecar_env(config),
                        stdin=asyncio.subprocess.DEVNULL,
                    )
                    await asyncio.sleep(3.0)  # its interpreter starts; it reaches its pace
                    await phase("in-app and sidecar draining")
                    await flusher.close()
                    await asyncio.sleep(1.0)
                    await phase("sidecar draining")
                finally:
                    await flusher.close()
                    if sidecar is not None:
                        sidecar.send_signal(signal.SIGTERM)
                        await asyncio.wait_for(sidecar.wait(), 30)

    _, base_latencies, *_ = phases["baseline: flusher idle"]
    base_p99 = percentile(base_latencies, 0.99)
    rows = []
    for name, (slot_waits, latencies, (requests, overviews, most), elapsed) in phases.items():
        ms = [w * 1000 for w in slot_waits]
        p99 = percentile(latencies, 0.99)
        rows.append(
            [
                name,
                len(slot_waits),
                f"{percentile(ms, 0.5):.2f}",
                f"{percentile(ms, 0.9):.2f}",
                f"{percentile(ms, 0.99):.2f}",
                f"{max(ms):.2f}",
                f"{statistics.median(latencies) * 1000:.1f}",
                f"{p99 * 1000:.1f}",
                f"{p99 / base_p99:.2f}",
                sum(w > TARGET_MS for w in ms),
                f"{(requests - overviews) / elapsed:.1f}",
                most,
                f"p99 < {TARGET_MS:g} ms: {verdict(percentile(ms, 0.99) < TARGET_MS)}",
            ]
        )
    print()
    print_table(
        ["phase", "calls", "wait p50 ms", "p90", "p99", "max", "call p50 ms", "p99",
         "p99 ratio", f"> {TARGET_MS:g} ms", "flusher req/s", "peak/s", "target"],
        rows,
    )  # fmt: skip
    print()
    print(
        "wait: from the overview's first try for a budget slot to the slot; call: the whole "
        "contact_overview; p99 ratio: the call's p99 over the baseline's; > 50 ms: the calls "
        "that waited longer; flusher req/s: "
        "the other requests Engage received a second; peak/s: the most in any one second."
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The time an interactive contact_overview waits for its budget slot "
        f"while a flusher drains singly at rate_limit {RATE:g}. Target: p99 under "
        f"{TARGET_MS:g} ms."
    )
    parser.add_argument(
        "--contacts", type=int, default=20_000, help="queued updates (default 20000)"
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="length of each phase (default 30)"
    )
    parser.add_argument(
        "--per-second",
        type=float,
        default=5.0,
        help="interactive calls a second (default 5)",
    )
    args = parser.parse_args()
    if args.contacts < 1 or args.seconds <= 0 or args.per_second <= 0:
        parser.error("--contacts, --seconds and --per-second must be positive")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
