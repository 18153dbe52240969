"""One "host" of a fleet sharing a PostgreSQL outbox: queue, resolve, pause, claim, recover.

Usage: ``pg_host.py ACTION [ARGS...]``, configured by ``ENGAGE_*`` variables only (run it
under ``skewed.py`` to give the host a wrong clock). Prints one JSON document on stdout:

* ``queue OPS_JSON``: each op is ``{"create": {attributes}}`` or ``{"update": TARGET,
  "changes": {...}}`` (TARGET a GUID or a ref); prints the deliveries (queued, change_id, ref).
* ``resolve REF...``: prints {ref: GUID or null}.
* ``pause SECONDS`` / ``clear-pause``: sets or lifts the pause every flusher obeys.
* ``see-pause``: prints {"remaining": seconds, "until": epoch} of the pause, as this host sees it.
* ``claim OWNER LEASE``: claims every due change for OWNER; prints {"claimed": n}.
* ``recover OWNER``: gives back what expired leases held; prints {"recovered": n}.
* ``wall``: prints {"wall": this host's time.time()}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import engage_async as ea
from engage_async._outboxes import open_outbox


async def queue(config: ea.EngageConfig, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the ops through a session (Engage is expected to be down)."""
    done = []
    async with ea.EngageSession(config) as session:
        for op in ops:
            if "create" in op:
                delivery = await session.create_contact(op["create"])
            else:
                delivery = await session.update_contact(op["update"], op["changes"])
            done.append(
                {"queued": delivery.queued, "change_id": delivery.change_id, "ref": delivery.ref}
            )
    return done


async def main(action: str, args: list[str]) -> Any:
    """Do `action`; what to print."""
    config = ea.EngageConfig.from_env()
    if action == "queue":
        return await queue(config, json.loads(args[0]))
    if action == "resolve":
        async with ea.EngageSession(config) as session:
            return {ref: await session.resolve(ref) for ref in args}
    if action == "wall":
        return {"wall": time.time()}
    outbox = await open_outbox(config, create=False)
    try:
        if action == "pause":
            await outbox.set_pause(delay=float(args[0]), reason="a host paused", outages=1)
            return {}
        if action == "clear-pause":
            await outbox.clear_pause()
            return {}
        if action == "see-pause":
            pause = await outbox.pause()
            return {"remaining": pause.remaining, "until": pause.until} if pause else {}
        if action == "claim":
            claimed = await outbox.claim(args[0], limit=1000, lease_seconds=float(args[1]))
            return {"claimed": len(claimed)}
        if action == "recover":
            return {"recovered": await outbox.recover_expired(args[0], lease_seconds=0)}
    finally:
        await outbox.close()
    raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2:]))), flush=True)
