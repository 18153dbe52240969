"""Take slots of a budget file and its lock, and hold both until killed.

Usage: ``budget_holder.py BUDGET_FILE BASE_URL API_KEY RATE COUNT``. Takes COUNT slots of the
budget of (BASE_URL, API_KEY) at RATE, never gives them back, then takes the file's lock and
prints ``locked <monotonic time the slots were taken>``; then sleeps until killed, as a
process that dies in the middle of its requests (and of a budget update) would.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from engage_async._budget import Budget, BudgetFile, Priority, budget_key
from engage_async._clock import SYSTEM_CLOCK


async def main(path: Path, base_url: str, api_key: str, rate: float, count: int) -> None:
    """Hold `count` slots and the lock for ever."""
    store = BudgetFile(path)
    budget = Budget(store, budget_key(base_url, api_key), rate, SYSTEM_CLOCK)
    taken = time.monotonic()
    permits = [budget.try_acquire(Priority.INTERACTIVE) for _ in range(count)]
    if None in permits:
        print("error no slot", flush=True)
        return
    with store._locked():
        print("locked", taken, flush=True)
        while True:
            await asyncio.sleep(3600)


if __name__ == "__main__":
    file, url, key, limit, how_many = sys.argv[1:6]
    asyncio.run(main(Path(file), url, key, float(limit), int(how_many)))
