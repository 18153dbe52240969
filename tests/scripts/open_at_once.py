"""Open (and so create) outboxes when told, as an app worker starting up does.

Usage: ``open_at_once.py``. Prints ``ready``; then for every line ``go PATH`` on stdin opens an
`EngageSession` whose outbox is PATH (creating it if no other process has yet), closes it, and
prints ``opened`` or ``error <ExceptionType> <message>``. Ends at end of input.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import engage_async as ea


async def open_once(path: Path) -> str:
    """Open a session on the outbox at `path` and close it again; what happened."""
    config = ea.EngageConfig(
        base_url="http://127.0.0.1:9",  # never called
        api_key="open-at-once",
        user_agent="OpenAtOnce/1.0",
        outbox_path=path,
    )
    try:
        async with ea.EngageSession(config):
            pass
    except Exception as exc:  # reported to the test, which names it
        return f"error {type(exc).__name__} {exc}"
    return "opened"


def main() -> int:
    """Open an outbox for each ``go PATH`` line, reporting each."""
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, path = line.strip().partition(" ")
        if command != "go":
            return 2
        print(asyncio.run(open_once(Path(path))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
