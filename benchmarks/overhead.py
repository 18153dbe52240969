"""What an `EngageSession` read costs over a bare aiohttp GET of the same URL.

Both clients call one in-process FakeEngage (rate limit off, requests not recorded) for the
same seeded contact, one call at a time. The bare client sends the same headers and reads the
JSON (`await resp.json()`), as a real caller would; the session also checks the answer and
builds the typed `ContactOverview`, which is part of what it costs. After a warm-up, the two
alternate in rounds (the order flips every round) so drift hits both alike. The figure is the
ratio of the per-call medians.

    python benchmarks/overhead.py [--calls 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from _common import USER_AGENT, machine, make_config, percentile, print_table, verdict

import engage_async as ea
from engage_async.testing import FakeEngage

TARGET = 1.15


async def timed(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    """Per-call wall times (seconds) of `count` sequential calls."""
    gc.collect()
    times = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        await call()
        times.append(clock() - start)
    return times


async def main(args: argparse.Namespace) -> float:
    async with FakeEngage(rate_limit=None, record_requests=False) as fake:
        contact_id = fake.add_contact(
            {"email": "anna.svensson@example.com", "firstName": "Anna", "lastName": "Svensson"},
            preferences={"acceptsEmail": True},
            consents=[{"id": "newsletter", "value": True}],
        )
        fake.add_promotion(contact_id, {"name": "Spring sale"})
        with tempfile.TemporaryDirectory(prefix="engage-bench-") as tmp:
            config = make_config(fake.url, fake.api_key, Path(tmp))
            url = f"{fake.url}{config.api_root}/contactoverview?contactId={contact_id}"
            headers = {
                "apikey": fake.api_key,
                "User-Agent": USER_AGENT,
                "Content-Type": "application/json",
                "Accept": "application/json",
            }
            timeout = aiohttp.ClientTimeout(total=config.interactive_deadline)
            async with (
                ea.EngageSession(config) as session,
                aiohttp.ClientSession(headers=headers, timeout=timeout) as http,
            ):

                async def bare() -> object:
                    async with http.get(url) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"bare GET -> {resp.status}")
                        return await resp.json()

                async def engage() -> object:
                    return await session.contact_overview(contact_id=contact_id)

                overview = await engage()
                if overview.id != contact_id or not overview.promotions:
                    raise RuntimeError("the session did not read the seeded contact back")
                await timed(bare, args.warmup)
                await timed(engage, args.warmup)

                per_round = args.calls // args.rounds
                times: dict[str, list[float]] = {"bare": [], "session": []}
                round_rows = []
                for index in range(args.rounds):
                    order = [("bare", bare), ("session", engage)]
                    if index % 2:
                        order.reverse()
                    medians = {}
                    for name, call in order:
                        got = await timed(call, per_round)
                        times[name].extend(got)
                        medians[name] = statistics.median(got)
                    round_rows.append(
                        [
                            f"round {index + 1} ({order[0][0]} first)",
                            f"{medians['bare'] * 1e6:.0f}",
                            f"{medians['session'] * 1e6:.0f}",
                            f"{medians['session'] / medians['bare']:.3f}",
                        ]
                    )

    bare_median = statistics.median(times["bare"])
    session_median = statistics.median(times["session"])
    ratio = session_median / bare_median
    print(f"overhead: {args.calls} contact_overview calls each way, {args.rounds} rounds")
    print(machine())
    print()
    print_table(["", "bare µs (median)", "session µs (median)", "ratio"], round_rows)
    print()
    rows = []
    for label, pick in (
        ("median", statistics.median),
        ("mean", statistics.fmean),
        ("p90", lambda v: percentile(v, 0.9)),
        ("p99", lambda v: percentile(v, 0.99)),
    ):
        b, s = pick(times["bare"]), pick(times["session"])
        rows.append([label, f"{b * 1e6:.0f}", f"{s * 1e6:.0f}", f"{s / b:.3f}"])
    print_table(["per call", "bare µs", "session µs", "ratio"], rows)
    print()
    print(
        f"session/bare median ratio {ratio:.3f} "
        f"(+{(session_median - bare_median) * 1e6:.0f} µs a call); "
        f"target <= {TARGET}: {verdict(ratio <= TARGET)}"
    )
    return ratio


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Median time of EngageSession.contact_overview against a bare aiohttp GET "
        "of the same URL, both on one in-process FakeEngage. Target: ratio <= 1.15."
    )
    parser.add_argument(
        "--calls", type=int, default=2000, help="timed calls each way (default 2000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--warmup", type=int, default=200, help="untimed calls each way first (default 200)"
    )
    args = parser.parse_args()
    if args.calls < args.rounds or args.rounds < 1:
        parser.error("--calls must be at least --rounds, and --rounds at least 1")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
