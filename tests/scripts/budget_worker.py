"""Send requests as fast as the shared rate budget lets this process, for a while.

Usage: ``budget_worker.py OUTBOX BASE_URL API_KEY RATE CONTACT_ID SECONDS``. Opens an
`EngageSession` on OUTBOX (whose budget file every worker shares), prints ``ready``, waits for
``go`` on stdin, then runs `CALLERS` tasks that each read the contact again and again for
SECONDS seconds. Prints ``answered <n>`` (the calls Engage answered) and exits 0; the first
call that fails prints ``error <ExceptionType>`` and ends the run with status 1.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import engage_async as ea

CALLERS = 10


async def main(
    outbox: Path, base_url: str, api_key: str, rate: float, guid: str, seconds: float
) -> int:
    """Open the session, wait for ``go``, then read as fast as the budget allows."""
    config = ea.EngageConfig(
        base_url=base_url,
        api_key=api_key,
        user_agent="BudgetWorker/1.0",
        outbox_path=outbox,
        rate_limit=rate,
        # Waiting for a slot among 120 callers takes seconds; that is not a failure here.
        interactive_deadline=30.0,
    )
    loop = asyncio.get_running_loop()
    async with ea.EngageSession(config) as session:
        print("ready", flush=True)
        command = await loop.run_in_executor(None, sys.stdin.readline)
        if command.strip() != "go":
            return 2
        until = time.monotonic() + seconds
        answered = 0

        async def caller() -> None:
            nonlocal answered
            while time.monotonic() < until:
                await session.get_contact(guid)
                answered += 1

        results = await asyncio.gather(*(caller() for _ in range(CALLERS)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            print("error", type(failures[0]).__name__, failures[0], flush=True)
            return 1
    print("answered", answered, flush=True)
    return 0


if __name__ == "__main__":
    outbox_path, url, key, limit, contact, duration = sys.argv[1:7]
    sys.exit(asyncio.run(main(Path(outbox_path), url, key, float(limit), contact, float(duration))))
