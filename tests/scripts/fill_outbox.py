"""Queue updates until the outbox file cannot grow, under a small RLIMIT_FSIZE.

Usage: ``fill_outbox.py OUTBOX BASE_URL LIMIT_BYTES``. BASE_URL must refuse connections, so
that every update is queued. Prints ``queued <change_id>`` after each update that returned
``queued=True``, and ``error <ExceptionType> <message>`` for the first one that raised; then
exits 0. SIGXFSZ is ignored, so writes past the limit fail with EFBIG instead of killing us.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import sys
import uuid
from pathlib import Path

import engage_async as ea
from engage_async._wire import MAX_VALUE_BYTES

# Big enough that a few commits reach the limit: the largest value the payload guard takes.
NOTE_SIZE = MAX_VALUE_BYTES


async def main(outbox: Path, base_url: str) -> None:
    """Fill the outbox until a write fails; report each outcome on stdout."""
    config = ea.EngageConfig(
        base_url=base_url,
        api_key="fill-outbox-key",
        user_agent="FillOutbox/1.0",
        outbox_path=outbox,
        interactive_deadline=1.0,
        retry_initial_delay=0.001,
        retry_max_delay=0.002,
        breaker_threshold=1,
        breaker_cooldown=600.0,
    )
    async with ea.EngageSession(config) as session:
        for i in range(10_000):
            try:
                delivery = await session.update_contact(
                    str(uuid.uuid4()), {"firstName": f"N{i}", "notes": "x" * NOTE_SIZE}
                )
            except Exception as exc:
                print("error", type(exc).__name__, exc, flush=True)
                return
            if not delivery.queued:
                print("error NotQueued", delivery, flush=True)
                return
            print("queued", delivery.change_id, flush=True)
    print("error NeverFull", flush=True)


if __name__ == "__main__":
    outbox_path, url, limit = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    asyncio.run(main(outbox_path, url))
