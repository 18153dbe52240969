"""Hold an outbox the way one app process does: a session, an in-app flusher and an admin.

Usage: ``hold_outbox.py OUTBOX``. Runs its own FakeEngage on loopback, opens the three
objects on OUTBOX (each its own connection), prints ``ready`` and then obeys one command per
line on stdin:

* ``work``: Engage goes down, three updates are queued, Engage comes back, the flusher
  drains them and the admin counts; prints ``ok <delivered>`` or ``error <what>``.
* ``quit``: closes everything and exits.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import engage_async as ea
from engage_async.testing import FakeEngage


async def work(
    fake: FakeEngage, session: ea.EngageSession, flusher: ea.OutboxFlusher, admin: ea.OutboxAdmin
) -> str:
    """Queue three updates during an outage and drain them; what happened, in one line."""
    guids = [
        fake.add_contact({"email": f"p{i}-{len(fake.contacts)}@example.com"}) for i in range(3)
    ]
    await fake.go_down()
    for guid in guids:
        delivery = await session.update_contact(guid, {"firstName": "Held"})
        if not delivery.queued:
            return "error not queued"
    await fake.come_up()
    report = await flusher.flush_once()
    stats = await admin.stats()
    if stats.by_state["pending"] or stats.by_state["dead"]:
        return f"error left {dict(stats.by_state)}"
    return f"ok {report.updated}"


async def main(outbox: Path) -> None:
    """Open the three holders, then follow the commands on stdin."""
    loop = asyncio.get_running_loop()
    async with FakeEngage(rate_limit=None) as fake:
        config = ea.EngageConfig(
            base_url=fake.url,
            api_key=fake.api_key,
            user_agent="LockTest/1.0",
            outbox_path=outbox,
            interactive_deadline=1.0,
            retry_initial_delay=0.001,
            retry_max_delay=0.002,
            bulk_threshold=1000,
        )
        async with (
            ea.EngageSession(config) as session,
            ea.OutboxFlusher(config) as flusher,
            ea.OutboxAdmin(outbox) as admin,
        ):
            print("ready", flush=True)
            while True:
                command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
                if command != "work":
                    break
                try:
                    line = await work(fake, session, flusher, admin)
                except Exception as exc:
                    line = f"error {type(exc).__name__}: {exc}"
                print(line, flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
