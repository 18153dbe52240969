"""Queue creates and updates for ever against an Engage that refuses connections.

Usage: ``queue_until_killed.py OUTBOX BASE_URL [DURABILITY]`` (``ENGAGE_OUTBOX_URL`` and
``ENGAGE_OUTBOX_SCHEMA``, when set, name a PostgreSQL outbox instead). Several tasks write at once,
so group commits are under way when the parent kills us. Each change_id is printed (and
flushed) only after its call returned ``queued=True``: a printed id is a promise the outbox
made. Any other outcome is printed as ``error ...`` and ends the run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Literal, cast

import engage_async as ea

WRITERS = 8


async def writer(session: ea.EngageSession, number: int) -> None:
    """Alternate creates and updates, printing each queued change_id."""
    i = 0
    while True:
        tag = f"{number}-{i}-{uuid.uuid4().hex[:8]}"
        if i % 2:
            delivery = await session.update_contact(str(uuid.uuid4()), {"firstName": tag})
        else:
            delivery = await session.create_contact({"email": f"c{tag}@example.com"})
        if not delivery.queued or delivery.change_id is None:
            print("error not queued", flush=True)
            raise SystemExit(1)
        print(delivery.change_id, flush=True)
        i += 1


async def main(outbox: Path, base_url: str, durability: Literal["full", "normal"]) -> None:
    """Run the writers until killed."""
    config = ea.EngageConfig(
        base_url=base_url,
        api_key="crash-test-key",
        user_agent="CrashTest/1.0",
        outbox_path=outbox,
        outbox_url=os.environ.get("ENGAGE_OUTBOX_URL"),
        outbox_schema=os.environ.get("ENGAGE_OUTBOX_SCHEMA", "engage_outbox"),
        durability=durability,
        interactive_deadline=1.0,
        retry_initial_delay=0.001,
        retry_max_delay=0.002,
        breaker_threshold=1,
        breaker_cooldown=600.0,
    )
    async with ea.EngageSession(config) as session, asyncio.TaskGroup() as group:
        for number in range(WRITERS):
            group.create_task(writer(session, number))


if __name__ == "__main__":
    mode = cast("Literal['full', 'normal']", sys.argv[3] if len(sys.argv) > 3 else "full")
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], mode))
