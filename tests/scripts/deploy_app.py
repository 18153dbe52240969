"""One app process of the deployment test: a session (and with ``--flusher`` an in-app
flusher) on the outbox the ``ENGAGE_*`` variables name, writing to contacts of its own.

Usage: ``deploy_app.py NAME [--flusher]``. Prints ``ready`` once open, then obeys commands on
stdin, one a line, and prints what each call was told:

* ``work CONTACTS UPDATES PAUSE``: creates contacts ``NAME-<i>@example.com`` (firstName
  ``v0``), then updates each of them UPDATES times (firstName ``v<j>``, city ``c<j>``) by the
  ref its create returned, round after round, pausing PAUSE seconds between calls.
* ``creates COUNT``: creates contacts ``NAME-bulk-<i>@example.com`` as fast as it can
  (`TASKS` calls at once), and updates every tenth once by its ref (firstName ``after``).

Each call prints ``create <contact> <ref> queued|delivered`` or ``update <contact> <j>
queued|delivered``, or ``error <contact> <ExceptionType>: <message>``; each command ends with
``done <command>``. Library logs (WARNING and up) go to stderr.

On SIGTERM it shuts down as a web framework's lifespan would: it starts no new call, lets the
calls in flight finish, closes the flusher, then the session, prints ``closed`` and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import engage_async as ea

TASKS = 20


class App:
    """The app: its session, its optional flusher, and the calls it makes."""

    def __init__(self, name: str, session: ea.EngageSession) -> None:
        self.name = name
        self.session = session
        self.stopping = asyncio.Event()

    def say(self, *words: object) -> None:
        """One line on stdout, at once (the test reads it as it comes)."""
        print(*words, flush=True)

    async def create(self, contact: str, attributes: dict[str, str]) -> str | None:
        """Create a contact; its ref, or None if the call failed."""
        try:
            delivery = await self.session.create_contact(
                {"email": f"{contact}@example.com", **attributes}
            )
        except Exception as exc:
            self.say("error", contact, f"{type(exc).__name__}: {exc}")
            return None
        self.say("create", contact, delivery.ref, "queued" if delivery.queued else "delivered")
        return delivery.ref

    async def update(self, contact: str, ref: str, number: int, changes: dict[str, str]) -> None:
        """Update a contact by its ref."""
        try:
            delivery = await self.session.update_contact(ref, changes)
        except Exception as exc:
            self.say("error", contact, f"{type(exc).__name__}: {exc}")
            return
        self.say("update", contact, number, "queued" if delivery.queued else "delivered")

    async def work(self, contacts: int, updates: int, pause: float) -> None:
        """Create `contacts` contacts, then update each `updates` times, round after round."""
        names = [f"{self.name}-{i}" for i in range(contacts)]
        refs: dict[str, str] = {}
        for name in names:
            if self.stopping.is_set():
                return
            ref = await self.create(name, {"firstName": "v0"})
            if ref is not None:
                refs[name] = ref
            await asyncio.sleep(pause)
        for number in range(1, updates + 1):
            for name in names:
                if self.stopping.is_set():
                    return
                if name in refs:
                    changes = {"firstName": f"v{number}", "city": f"c{number}"}
                    await self.update(name, refs[name], number, changes)
                await asyncio.sleep(pause)

    async def creates(self, count: int) -> None:
        """Create `count` contacts with `TASKS` calls at once; update every tenth once."""
        numbers = iter(range(count))

        async def one_task() -> None:
            for i in numbers:
                if self.stopping.is_set():
                    return
                name = f"{self.name}-bulk-{i}"
                ref = await self.create(name, {"firstName": "before"})
                if ref is not None and i % 10 == 0:
                    await self.update(name, ref, 1, {"firstName": "after"})

        await asyncio.gather(*(one_task() for _ in range(TASKS)))

    async def obey(self, line: str) -> None:
        """Run one command from stdin."""
        command, *args = line.split()
        if command == "work":
            await self.work(int(args[0]), int(args[1]), float(args[2]))
        elif command == "creates":
            await self.creates(int(args[0]))
        else:
            self.say("error", "-", f"unknown command {command!r}")
        self.say("done", command)


async def read_commands(app: App, running: set[asyncio.Task[None]]) -> None:
    """Start each command read from stdin as a task of its own, until stdin ends."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        task = asyncio.create_task(app.obey(line))
        running.add(task)
        task.add_done_callback(running.discard)


async def main(name: str, *, with_flusher: bool) -> None:
    """Open, obey commands until SIGTERM, then shut down in order."""
    config = ea.EngageConfig.from_env()
    loop = asyncio.get_running_loop()
    session = ea.EngageSession(config)
    await session.open()
    flusher = ea.OutboxFlusher(config) if with_flusher else None
    if flusher is not None:
        await flusher.open()
        flusher.start()
    app = App(name, session)
    loop.add_signal_handler(signal.SIGTERM, app.stopping.set)
    running: set[asyncio.Task[None]] = set()
    commands = asyncio.create_task(read_commands(app, running))
    app.say("ready")
    await app.stopping.wait()
    # The lifespan's shutdown: requests in flight finish (each call ends within the
    # interactive deadline), then the flusher and the session close.
    commands.cancel()
    if running:
        await asyncio.wait(running)
    if flusher is not None:
        await flusher.close()
    await session.close()
    app.say("closed")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main(sys.argv[1], with_flusher="--flusher" in sys.argv[2:]))
