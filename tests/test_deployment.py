"""The real deployment, run as subprocesses on one outbox against one `FakeEngage`, on either
outbox backend (a SQLite file, or a PostgreSQL schema every process reaches by URL).

Three app processes (``tests/scripts/deploy_app.py``; the first runs an in-app flusher), an
``engage-async flush`` sidecar and ``engage-async outbox stats`` runs, all configured by the
same ``ENGAGE_*`` variables, as an operator would deploy them. The fake serves from this
test's event loop and records when each request arrived; it also answers 429 above the same
rate a real tenant would.

What is pinned: no process logs an outbox failure; every create exists exactly once and
every contact ends with its last value; nothing is dead; Engage never receives more than
`rate_limit` requests in any one second; and the sidecar and the app each exit within a few
seconds of SIGTERM, even in the middle of draining thousands of queued creates, leaving
nothing ``inflight``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
from helpers import (
    BACKENDS,
    SCRIPTS,
    execute,
    make_config,
    outbox_rows,
    query,
    read_line,
    start_script,
    stop_process,
)

import engage_async as ea
from engage_async.testing import FakeEngage

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS, indirect=True)]

APP: Final = SCRIPTS / "deploy_app.py"
# Startup of a fresh interpreter with aiohttp and lxml is the slow part.
START_TIMEOUT: Final = 30.0
# The bound on "within a few seconds of SIGTERM": a request in flight is given
# `shutdown_timeout` (5 s by default) to be answered, then abandoned.
EXIT_LIMIT: Final = 10.0
# What a process logs when the outbox failed it or a step crashed, when a change went dead,
# and when Engage said 429 (the budget let too many through).
TROUBLE: Final = re.compile(
    r"outbox commit failed|outbox unavailable|could not renew leases|flush failed|"
    r"OutboxError|Traceback|dead-lettered|answered 429|\bERROR\b|\bCRITICAL\b"
)
# The lines the race of test_an_update_by_ref_committed_as_its_create_is_delivered_is_applied
# leaves; see test_three_apps_a_sidecar_and_an_outage_deliver_everything_once_within_the_rate.
STATS_LINE: Final = re.compile(r"(pending|inflight|waiting_guid|done|dead)\s+(\d+)")


def deployment_env(fake: FakeEngage, config: ea.EngageConfig, rate: float) -> dict[str, str]:
    """The ``ENGAGE_*`` variables every process of the deployment shares.

    Engage's own waits are shortened so the test takes seconds: the flushers' pause after an
    outage, the breaker's cooldown, the batch polls. The rest are the defaults (lease,
    shutdown timeout, bulk threshold, interactive deadline, durability). The outbox is the
    one `config` names: a file by its absolute path, or a PostgreSQL URL and schema.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGAGE_")}
    env.update(
        {
            "ENGAGE_BASE_URL": fake.url,
            "ENGAGE_API_KEY": fake.api_key,
            "ENGAGE_USER_AGENT": "DeploymentTest/1.0",
            "ENGAGE_XML_DIR": str(config.xml_dir),
            "ENGAGE_RATE_LIMIT": f"{rate:g}",
            "ENGAGE_BACKGROUND_DELAYS": "0.5,1",
            "ENGAGE_BREAKER_COOLDOWN": "1",
            "ENGAGE_BATCH_POLL_INITIAL": "0.2",
            "ENGAGE_BATCH_POLL_MAX": "1",
            "ENGAGE_POLL_INTERVAL": "0.2",
        }
    )
    if config.outbox_url is not None:
        env.update(
            {"ENGAGE_OUTBOX_URL": config.outbox_url, "ENGAGE_OUTBOX_SCHEMA": config.outbox_schema}
        )
    else:
        env["ENGAGE_OUTBOX"] = str(config.outbox_path)
    return env


@attrs.define
class Process:
    """A process of the deployment: its stdout lines as they come, its stderr in a log."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    lines: list[str] = attrs.field(factory=list)
    _arrived: asyncio.Event = attrs.field(factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    def read_along(self) -> None:
        """Collect stdout in the background (so the pipe never fills)."""

        async def read() -> None:
            assert self.process.stdout is not None
            async for raw in self.process.stdout:
                self.lines.append(raw.decode().rstrip("\n"))
                self._arrived.set()

        self._reader = asyncio.create_task(read())

    async def wait_for_line(self, line: str, timeout: float) -> None:
        """Wait until the process has printed `line`."""
        async with asyncio.timeout(timeout):
            while line not in self.lines:
                self._arrived.clear()
                await self._arrived.wait()

    async def tell(self, command: str) -> None:
        """Send one command line to its stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()

    async def terminate(self) -> float:
        """SIGTERM, and the seconds until it exited (fails past `EXIT_LIMIT`)."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.process.wait(), EXIT_LIMIT)
        took = time.monotonic() - sent
        assert 0 == status, f"{self.name} exited {status}: {self.stderr()[-3000:]}"
        if self._reader is not None:
            await self._reader
        return took

    def stderr(self) -> str:
        """What it logged."""
        return self.log.read_text(encoding="utf-8", errors="replace")


@attrs.define
class Deployment:
    """The processes on one outbox, and the stats runs made meanwhile."""

    fake: FakeEngage
    config: ea.EngageConfig
    directory: Path
    env: dict[str, str]
    processes: list[Process] = attrs.field(factory=list)
    stats_runs: list[tuple[int, str]] = attrs.field(factory=list)

    async def start_app(self, name: str, *, flusher: bool = False) -> Process:
        """Start an app process (with an in-app flusher if asked); returns once it is open."""
        log = self.directory / f"{name}.log"
        args = [name, "--flusher"] if flusher else [name]
        process = Process(name, await start_script(APP, *args, env=self.env, log=log), log)
        self.processes.append(process)
        assert "ready" == await read_line(process.process, START_TIMEOUT), process.stderr()
        process.read_along()
        return process

    async def start_sidecar(self) -> Process:
        """Start ``engage-async flush``, configured by the environment only."""
        log = self.directory / "sidecar.log"
        with log.open("ab") as output:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "engage_async.cli",
                "flush",
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=output,
            )
        process = Process("sidecar", child, log)
        self.processes.append(process)
        process.read_along()
        return process

    async def flush_once(self, **env: str) -> str:
        """Run ``engage-async flush --once`` to the end (with `env` on top); its output."""
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engage_async.cli",
            "flush",
            "--once",
            "--no-progress",
            env={**self.env, **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(child.communicate(), 120)
        text = output.decode()
        assert 0 == child.returncode, text[-3000:]
        return text

    async def stats_now_and_then(self, every: float) -> None:
        """Run ``engage-async outbox stats`` from a process of its own, again and again."""
        while True:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "engage_async.cli",
                "outbox",
                "stats",
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                output, _ = await child.communicate()
            finally:
                await stop_process(child)  # when cancelled mid-run: not left behind
            assert child.returncode is not None
            self.stats_runs.append((child.returncode, output.decode()))
            await asyncio.sleep(every)

    def rows(self) -> list[dict[str, object]]:
        """Every row of the outbox, read with a connection of the test's own."""
        return outbox_rows(self.config)

    def states(self) -> dict[str, int]:
        """How many rows are in each state."""
        counts: dict[str, int] = {}
        for row in self.rows():
            state = str(row["state"])
            counts[state] = counts.get(state, 0) + 1
        return counts

    def failures(self) -> list[str]:
        """What any process logged of `TROUBLE`, and every app call that raised."""
        found = []
        for process in self.processes:
            found += [
                f"{process.name}: {line}"
                for line in process.stderr().splitlines()
                if TROUBLE.search(line)
            ]
            found += [
                f"{process.name}: {line}" for line in process.lines if line.startswith("error")
            ]
        return found


@contextlib.asynccontextmanager
async def deployment(tmp_path: Path, rate: float) -> AsyncIterator[Deployment]:
    """A FakeEngage allowing `rate` requests a second, and a deployment on a fresh outbox;
    every process still running at the end is killed.
    """
    async with FakeEngage(rate_limit=rate) as fake:
        config = make_config(fake.url, fake.api_key, tmp_path)
        setup = Deployment(fake, config, tmp_path, deployment_env(fake, config, rate))
        try:
            yield setup
        finally:
            for process in setup.processes:
                await stop_process(process.process)


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait, polling, until `condition()` holds; fail after `timeout` seconds naming `what`."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


def peak_until(fake: FakeEngage, end: int, window: float = 1.0) -> int:
    """The most of the first `end` requests that arrived within any `window` seconds."""
    times = [request.time for request in fake.requests[:end]]
    best = start = 0
    for last, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        best = max(best, last - start + 1)
    return best


# --- three apps, a sidecar and an outage ---------------------------------------------------

APPS: Final = ("a1", "a2", "a3")
CONTACTS: Final = 10
UPDATES: Final = 4
RATE: Final = 20


async def test_three_apps_a_sidecar_and_an_outage_deliver_everything_once_within_the_rate(
    tmp_path: Path,
) -> None:
    """Three app processes (one with an in-app flusher) create and update contacts of their
    own while a sidecar flushes and ``outbox stats`` runs from other processes; Engage goes
    down for three seconds in the middle. Afterwards every create exists exactly once, every
    contact holds its last value, nothing is dead, no process logged an outbox failure, and
    Engage never received more than `RATE` requests in any one second. SIGTERM then ends
    every process, each exiting 0.
    """
    async with deployment(tmp_path, RATE) as setup:
        fake = setup.fake
        apps = [await setup.start_app(name, flusher=name == "a1") for name in APPS]
        # Only a session creates the outbox; the sidecar refuses to start without one.
        sidecar = await setup.start_sidecar()
        stats = asyncio.create_task(setup.stats_now_and_then(0.5))
        try:
            for app in apps:
                await app.tell(f"work {CONTACTS} {UPDATES} 0.1")
            await eventually(lambda: len(fake.requests) >= 40, 30, "40 requests before the outage")
            await fake.go_down()
            down = [len(app.lines) for app in apps]
            await asyncio.sleep(3)
            await fake.come_up()
            up = [len(app.lines) for app in apps]
            for app in apps:
                await app.wait_for_line("done work", 60)
            await eventually(
                lambda: set(setup.states()) <= {"done", "dead"}, 60, "the outbox drained"
            )
        finally:
            stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats
        exit_times = {p.name: await p.terminate() for p in [sidecar, *apps]}
        print(f"\nexit after SIGTERM (idle): {exit_times}")
        rows = setup.rows()

        outcomes = {
            when: [
                line.split()[-1]
                for app, start, end in zip(apps, first, last, strict=True)
                for line in app.lines[start:end]
            ]
            for when, first, last in (
                ("before", [0] * len(apps), down),
                ("during", down, up),
                ("after", up, [len(app.lines) for app in apps]),
            )
        }
        told = {
            when: {word: words.count(word) for word in ("delivered", "queued")}
            for when, words in outcomes.items()
        }
        print(
            f"app calls {told}; stats runs {len(setup.stats_runs)}; "
            f"peak {fake.peak_rate(1.0)} requests in a second of {len(fake.requests)}"
        )
        assert [] == setup.failures()
        # The outage came in the middle: answered before it, queued during it, and answered
        # again after it (for contacts with nothing waiting).
        assert (True, True, True) == (
            told["before"]["delivered"] > 0,
            told["during"]["queued"] > 0,
            told["after"]["delivered"] > 0,
        )
        assert len(APPS) * CONTACTS * (1 + UPDATES) == sum(
            sum(counts.values()) for counts in told.values()
        )
        expected = {
            f"{app}-{i}@example.com": (f"v{UPDATES}", f"c{UPDATES}")
            for app in APPS
            for i in range(CONTACTS)
        }
        found = {email: fake.find("email", email) for email in expected}
        assert dict.fromkeys(expected, 1) == {e: len(ids) for e, ids in found.items()}
        assert len(expected) == len(fake.contacts)
        actual = {}
        for email, (guid,) in found.items():
            attributes = fake.contact_json(guid)["attributes"]
            actual[email] = (attributes["firstName"], attributes["city"])
        assert expected == actual
        assert [] == [row for row in rows if row["state"] != "done"]
        assert fake.peak_rate(1.0) <= RATE
        assert setup.stats_runs
        assert [0] * len(setup.stats_runs) == [status for status, _ in setup.stats_runs]
        for _, output in setup.stats_runs:
            assert 5 == len(STATS_LINE.findall(output)), output


# --- SIGTERM in the middle of draining thousands of creates ----------------------------------

QUEUED_CREATES: Final = 2000
DRAIN_RATE: Final = 40


async def test_sigterm_mid_drain_of_thousands_of_creates_exits_in_seconds_leaving_nothing_leased(
    tmp_path: Path,
) -> None:
    """An app with an in-app flusher queues 2000 creates (and updates of every tenth) while
    Engage is down; Engage comes back and the app's flusher and a sidecar drain them at 40 a
    second. In the middle of it, with a request of each flusher held by a slow Engage, both
    get SIGTERM: each exits within a few seconds (a request unanswered after
    ``shutdown_timeout`` is abandoned), no row is left ``inflight`` (but those of a bulk batch
    Engage accepted, which the next flusher follows) nor leased, Engage never received
    more than 40 requests in a second, and nothing was logged as an outbox failure. A final
    ``flush --once`` then leaves every create existing exactly once with its last value, and
    nothing dead.

    The final drain is a check, not part of the deployment: it runs alone, after every
    process exited, with the rate limits lifted so that it takes seconds, not minutes.
    """
    async with deployment(tmp_path, DRAIN_RATE) as setup:
        fake = setup.fake
        app = await setup.start_app("a1", flusher=True)
        sidecar = await setup.start_sidecar()
        await fake.go_down()
        queueing = time.monotonic()
        await app.tell(f"creates {QUEUED_CREATES}")
        await app.wait_for_line("done creates", 120)
        queue_seconds = time.monotonic() - queueing
        queued = setup.states()
        await fake.come_up()
        seen = len(fake.requests)
        await eventually(lambda: len(fake.requests) >= seen + 60, 30, "the drain under way")
        held = fake.inject("slow", delay=8.0, times=2)
        await eventually(lambda: held.hits == 2, 30, "a request of each flusher held")

        exits = await asyncio.gather(sidecar.terminate(), app.terminate())
        before_final = len(fake.requests)
        after_exit = setup.states()
        left = setup.rows()
        print(
            f"\nqueued {queued} in {queue_seconds:.1f} s; exit after SIGTERM mid-drain: "
            f"sidecar {exits[0]:.2f} s, app {exits[1]:.2f} s; left {after_exit}; "
            f"peak {peak_until(fake, before_final)} requests in a second of {before_final}"
        )
        # In flight only under a bulk batch Engage accepted (it has them; the next flusher
        # follows the batch), and leased by nobody.
        assert [] == [r["seq"] for r in left if r["state"] == "inflight" and not r["batch_id"]]
        assert [] == [r["seq"] for r in left if r["lease_owner"] is not None]
        # It was the middle of the drain: creates still to send or to reconcile.
        assert after_exit.get("pending", 0) + after_exit.get("waiting_guid", 0) > 0
        assert peak_until(fake, before_final) <= DRAIN_RATE
        assert [] == setup.failures()

        fake.rate_limit = None
        report = await setup.flush_once(ENGAGE_RATE_LIMIT="1000")

        print(f"final drain: {report.strip().splitlines()[-1]}")
        bulk = [f"a1-bulk-{i}@example.com" for i in range(QUEUED_CREATES)]
        found = {email: fake.find("email", email) for email in bulk}
        assert dict.fromkeys(bulk, 1) == {e: len(ids) for e, ids in found.items()}
        expected = {e: "after" if i % 10 == 0 else "before" for i, e in enumerate(bulk)}
        actual = {
            e: fake.contact_json(ids[0])["attributes"]["firstName"] for e, ids in found.items()
        }
        assert expected == actual
        assert {"done"} == set(setup.states())
        assert [] == [line for line in app.lines if line.startswith("error")]


async def test_sigterm_after_a_bulk_batch_was_accepted_leaves_it_to_the_next_flusher(
    tmp_path: Path,
) -> None:
    """SIGTERM to the sidecar once Engage has accepted a bulk batch of creates it has not yet
    finished following: the sidecar exits at once, leaving nothing ``inflight`` but the rows
    of that batch (Engage has them: they are not to be sent again) and no lease on anything,
    and the next ``flush --once`` follows the batch to its end (every create exists once,
    every row is done).
    """
    async with deployment(tmp_path, DRAIN_RATE) as setup:
        fake = setup.fake
        # The batch is polled only a minute after it was accepted: SIGTERM comes before.
        setup.env.update({"ENGAGE_BATCH_POLL_INITIAL": "60", "ENGAGE_BATCH_POLL_MAX": "60"})
        app = await setup.start_app("a1")
        await fake.go_down()
        await app.tell("creates 40")
        await app.wait_for_line("done creates", 60)
        await fake.come_up()
        sidecar = await setup.start_sidecar()
        await eventually(
            lambda: any(row["batch_id"] for row in setup.rows()), 30, "a batch accepted"
        )
        await sidecar.terminate()
        await app.terminate()
        left = setup.rows()
        batch_leases = [
            row["lease_owner"] for row in query(setup.config, "SELECT lease_owner FROM batches")
        ]
        # The minute passes.
        execute(setup.config, "UPDATE batches SET next_poll_at = 0")
        await setup.flush_once(ENGAGE_BATCH_POLL_INITIAL="0.1", ENGAGE_BATCH_POLL_MAX="0.2")

        emails = [f"a1-bulk-{i}@example.com" for i in range(40)]
        assert [1] * 40 == [len(fake.find("email", email)) for email in emails]
        assert {"done"} == set(setup.states())
        assert [] == setup.failures()
        assert [] == [r for r in left if r["state"] == "inflight" and r["batch_id"] is None]
        assert [] == [r for r in left if r["lease_owner"] is not None]
        assert [None] == batch_leases


# --- the race the deployment test found ------------------------------------------------------


async def test_an_update_by_ref_committed_as_its_create_is_delivered_is_applied(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """An app updates a contact by the ref of its queued create just as a flusher (another
    process's, say) delivers that create: the flusher records the GUID after the session saw
    the create still waiting and before the session's update is committed. The update is
    applied to the contact all the same, and nothing is dead.
    """
    config = make_config(fake.url, fake.api_key, tmp_path, background_delays=(0.01,))
    async with ea.EngageSession(config) as session, ea.OutboxFlusher(config) as flusher:
        await fake.go_down()
        created = await session.create_contact({"email": "race@example.com", "firstName": "v0"})
        await fake.come_up()
        outbox = session._outbox
        assert outbox is not None
        enqueue = outbox.enqueue

        async def enqueue_once_the_flusher_delivered(change: Any) -> Any:
            await flusher.flush_once()
            return await enqueue(change)

        outbox.enqueue = enqueue_once_the_flusher_delivered  # type: ignore[method-assign]
        try:
            updated = await session.update_contact(created.ref or "", {"firstName": "v1"})
        finally:
            outbox.enqueue = enqueue  # type: ignore[method-assign]
        report = await flusher.flush_once()

    [guid] = fake.find("email", "race@example.com")
    assert (True, True) == (created.queued, updated.queued)
    assert ("v1", 0) == (fake.contact_json(guid)["attributes"]["firstName"], report.dead)
