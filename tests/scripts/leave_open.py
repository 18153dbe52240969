"""Use the package the way a careless or crashing app does, then let the interpreter exit.

Usage: ``leave_open.py MODE OUTBOX``. Creates the outbox with a session (closed properly),
then, by MODE:

* ``one-shot-admin``: ``asyncio.run(OutboxAdmin(OUTBOX).stats())``, nothing closed by hand;
* ``entered-admin``: enters an admin's ``async with`` and never leaves it;
* ``return``: opens a session and a flusher and returns without closing them;
* ``raise``: the same, but the app raises instead of returning.

Prints ``done`` when the last line of the script ran; the exit is up to the interpreter.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import engage_async as ea


def config(outbox: Path) -> ea.EngageConfig:
    """Nothing is sent: the objects are only opened."""
    return ea.EngageConfig(
        base_url="http://127.0.0.1:9", api_key="key", user_agent="Tests/1.0", outbox_path=outbox
    )


async def create(outbox: Path) -> None:
    """Create the outbox as an app's first session does."""
    async with ea.EngageSession(config(outbox)):
        pass


async def careless(mode: str, outbox: Path) -> None:
    """Open what MODE says and leave it open."""
    if mode == "one-shot-admin":
        await ea.OutboxAdmin(outbox).stats()
    elif mode == "entered-admin":
        admin = ea.OutboxAdmin(outbox)
        await admin.__aenter__()
        await admin.stats()
    else:
        session = ea.EngageSession(config(outbox))
        await session.open()
        flusher = ea.OutboxFlusher(config(outbox))
        await flusher.open()
        if mode == "raise":
            raise RuntimeError("the app crashed")


if __name__ == "__main__":
    asyncio.run(create(Path(sys.argv[2])))
    try:
        asyncio.run(careless(sys.argv[1], Path(sys.argv[2])))
    finally:
        print("done", flush=True)
