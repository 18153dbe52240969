"""Tests of the sidecar, ``engage-async flush``, run as a real subprocess against the test's
`FakeEngage`.

The fake serves from this test's event loop, so every subprocess is awaited through asyncio
and never blocks the loop. The sidecar is configured only through ``ENGAGE_*`` variables, on
either outbox backend.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BACKENDS,
    CONTACTS,
    PROCESS_TIMEOUT,
    FakeClock,
    attribute,
    changes,
    contact_type,
    eventually,
    execute,
    flusher_config,
    one_id,
    sidecar_env,
    start_flush,
)

import engage_async as ea
from engage_async.testing import FakeEngage

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS, indirect=True)]

REPORT = re.compile(
    r"sent (\d+), created (\d+), updated (\d+), reconciled (\d+), dead (\d+), "
    r"exported (\d+), uploaded (\d+), pending (\d+)"
)


# Startup of a fresh interpreter with aiohttp and lxml is the slow part.
def queueing_clock() -> FakeClock:
    """The clock of a session queueing work for a sidecar, which reads the rows on the real
    clock: it starts at the real time, and the session's retries move it ahead by no more
    than a few milliseconds, so the rows are due when the sidecar looks.
    """
    return FakeClock(wall=time.time())


async def flush_once(env: Mapping[str, str], log: Path) -> tuple[int, dict[str, int]]:
    """Run ``engage-async flush --once`` to the end; its exit status and printed counts.

    `log` must be new: it receives this run's output only.
    """
    process = await start_flush(env, log, "--once", "--no-progress")
    status = await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT)
    output = log.read_text(encoding="utf-8")
    printed = [match for match in map(REPORT.fullmatch, output.splitlines()) if match]
    assert len(printed) == 1, output[-3000:]
    names = ("sent", "created", "updated", "reconciled", "dead", "exported", "uploaded", "pending")
    return status, dict(zip(names, map(int, printed[0].groups()), strict=True))


async def test_flush_once_drains_the_outbox_and_prints_the_counts(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """``flush --once`` sends what is due, prints the report's counts and exits 0."""
    config = flusher_config(fake, tmp_path)
    existing = fake.add_contact({"email": "side@example.com"})
    async with ea.EngageSession(config, clock=queueing_clock()) as engage:
        await fake.go_down()
        await engage.create_contact({"email": "once1@example.com", "firstName": "One"})
        await engage.create_contact({"email": "once2@example.com"}, contact_type="Contact")
        await engage.update_contact(existing, {"city": "Kalmar"})
        await fake.come_up()

    status, counts = await flush_once(sidecar_env(fake, config), tmp_path / "once.log")

    expected = {
        "sent": 3,
        "created": 2,
        "updated": 1,
        "reconciled": 0,
        "dead": 0,
        "exported": 0,
        "uploaded": 0,
        "pending": 0,
    }
    assert (0, expected) == (status, counts)
    assert "One" == attribute(fake, one_id(fake, "once1@example.com"), "firstName")
    assert "Contact" == contact_type(fake, one_id(fake, "once2@example.com"))
    assert "Kalmar" == attribute(fake, existing, "city")
    assert ["done"] * 3 == [row["state"] for row in changes(config)]


async def test_sigterm_finishes_the_step_in_progress_and_exits_0(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """SIGTERM while a request is on the wire: the sidecar finishes that step (the change is
    done, not handed back) and exits 0.
    """
    config = flusher_config(fake, tmp_path)
    guid = fake.add_contact({"email": "term@example.com"})
    async with ea.EngageSession(config, clock=queueing_clock()) as engage:
        await fake.go_down()
        await engage.update_contact(guid, {"firstName": "Finished"})
        await fake.come_up()
    fake.inject("slow", method="PATCH", delay=0.5)
    log = tmp_path / "sidecar.log"
    process = await start_flush(sidecar_env(fake, config), log)
    try:
        await eventually(lambda: fake.requests_to("PATCH", f"{CONTACTS}/*"), PROCESS_TIMEOUT)
        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert 0 == status, log.read_text(encoding="utf-8")
    assert ["done"] == [row["state"] for row in changes(config)]
    assert "Finished" == attribute(fake, guid, "firstName")


async def test_sigterm_stops_an_idle_sidecar(fake: FakeEngage, tmp_path: Path) -> None:
    """A sidecar with nothing to do exits 0 on SIGTERM, promptly."""
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=queueing_clock()) as engage:
        await fake.go_down()
        await engage.create_contact({"email": "idle@example.com"})
        await fake.come_up()
    log = tmp_path / "sidecar.log"
    # Once the outbox is drained the sidecar waits a minute for the next poll: only SIGTERM
    # cutting that wait short makes it exit within the bound below.
    process = await start_flush(sidecar_env(fake, config, ENGAGE_POLL_INTERVAL="60"), log)
    try:
        await eventually(
            lambda: ["done"] == [row["state"] for row in changes(config)], PROCESS_TIMEOUT
        )
        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert 0 == status, log.read_text(encoding="utf-8")


# --- kill -9, again and again -------------------------------------------------------------------


def _build_workload(
    fake: FakeEngage,
) -> tuple[list[tuple[str, str]], list[str], dict[str, dict[str, Any]]]:
    """Contacts to create (email, type) and to seed; the expected end state by email."""
    creates = [(f"new{i}@example.com", "Contact" if i % 3 == 0 else "Member") for i in range(60)]
    seeded = [f"old{i}@example.com" for i in range(40)]
    for email in seeded:
        fake.add_contact({"email": email, "firstName": "Before", "city": "Before"})
    expected: dict[str, dict[str, Any]] = {}
    for i, (email, kind) in enumerate(creates):
        if kind == "Contact":
            expected[email] = {
                "firstName": f"F{i}",
                "lastName": f"L{i}",
                "city": f"C{i}",
                "type": "Contact",
            }
        else:
            expected[email] = {"firstName": f"F{i}", "lastName": f"L{i}", "type": "Contact"}
    for i, email in enumerate(seeded):
        expected[email] = {"firstName": f"G{i}", "city": f"D{i}", "type": "Contact"}
    return creates, seeded, expected


async def _queue_workload(
    engage: ea.EngageSession, fake: FakeEngage, creates: list[tuple[str, str]], seeded: list[str]
) -> None:
    """Queue several changes per contact, with barriers so they stay separate rows."""
    for i, (email, kind) in enumerate(creates):
        delivery = await engage.create_contact({"email": email}, contact_type=kind)
        ref = delivery.ref or ""
        await engage.update_contact(ref, {"firstName": f"F{i}"})  # folds into the create
        if kind == "Contact":
            await engage.promote_to_member(ref)
            await engage.update_contact(ref, {"lastName": "wrong"})
            await engage.update_contact(ref, {"lastName": f"L{i}"})
            await engage.update_contact_type(ref, "Contact")
            await engage.update_contact(ref, {"city": f"C{i}"})
        else:
            await engage.update_contact_type(ref, "Contact")
            await engage.update_contact(ref, {"lastName": f"L{i}"})
    for i, email in enumerate(seeded):
        [guid] = fake.find("email", email)
        await engage.update_contact(guid, {"city": f"D{i}"})
        await engage.update_contact_type(guid, "Contact")
        await engage.update_contact(guid, {"firstName": f"G{i}"})


async def test_a_sidecar_killed_again_and_again_leaves_engage_exactly_as_expected(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """SIGKILL the sidecar at random points mid-drain, restart it each time, then drain with
    ``--once``: every contact exists once, every attribute holds its last written value, every
    type change is applied, and every change ends done.
    """
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    config = flusher_config(fake, tmp_path, durability="normal")
    creates, seeded, expected = _build_workload(fake)
    async with ea.EngageSession(config, clock=queueing_clock()) as engage:
        await fake.go_down()
        await _queue_workload(engage, fake, creates, seeded)
        await fake.come_up()
    rows = len(changes(config))
    assert rows >= 300
    # Engage's default pace (40 requests a second) makes the drain take seconds, so every
    # kill lands mid-drain.
    env = sidecar_env(
        fake, config, ENGAGE_BULK_THRESHOLD="5", ENGAGE_BULK_MAX_ITEMS="25", ENGAGE_RATE_LIMIT="40"
    )
    log = tmp_path / "sidecar.log"

    left_after_kills = []
    for _ in range(5):
        # Kill it at work, after a random number of its requests reached Engage.
        kill_after = len(fake.requests) + rng.randint(1, 40)
        process = await start_flush(env, log)
        try:
            await eventually(
                lambda kill_after=kill_after: len(fake.requests) >= kill_after, PROCESS_TIMEOUT
            )
        finally:
            process.kill()
            await process.wait()
        left_after_kills.append(
            sum(row["state"] not in {"done", "dead"} for row in changes(config))
        )
    context = f"seed {seed}, changes left after each kill: {left_after_kills}"
    assert all(left_after_kills), context
    # The killed sidecars' leases run out (they are dead; nobody renews them).
    execute(config, "UPDATE changes SET lease_until = 0 WHERE lease_owner IS NOT NULL")
    execute(config, "UPDATE batches SET lease_until = 0 WHERE lease_owner IS NOT NULL")
    for attempt in range(10):
        once_log = tmp_path / f"once{attempt}.log"
        status, counts = await flush_once(env, once_log)
        assert 0 == status, f"{context}: {once_log.read_text(encoding='utf-8')[-3000:]}"
        if counts["pending"] == 0:
            break

    states = [(row["change_id"], row["state"], row["last_error"]) for row in changes(config)]
    assert [] == [state for state in states if state[1] != "done"], context
    assert len(expected) == len(fake.contacts), context
    actual = {}
    for email in expected:
        guid = one_id(fake, email)
        data = fake.contact_json(guid)
        actual[email] = {
            name: data["attributes"][name] for name in expected[email] if name != "type"
        }
        actual[email]["type"] = data["meta"]["contactType"]
    assert expected == actual, context
