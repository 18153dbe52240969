"""Tests of the sidecar, ``engage-async flush``, run as a real subprocess against the test's
`FakeEngage`.

The fake serves from this test's event loop, so every subprocess is awaited through asyncio
and never blocks the loop. The sidecar is configured only through ``ENGAGE_*`` variables, on
either outbox backend.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import BACKEND, BACKENDS
from test_flusher import (
    CONTACTS,
    attribute,
    changes,
    contact_type,
    eventually,
    flusher_config,
    one_id,
)

import engage_async as ea
from engage_async.testing import FakeEngage

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS, indirect=True)]

REPORT = re.compile(
    r"sent (\d+), created (\d+), updated (\d+), reconciled (\d+), dead (\d+), "
    r"exported (\d+), uploaded (\d+), pending (\d+)"
)
# Startup of a fresh interpreter with aiohttp and lxml is the slow part.
PROCESS_TIMEOUT = 30.0


def sidecar_env(fake: FakeEngage, config: ea.EngageConfig, **extra: str) -> dict[str, str]:
    """The environment of a sidecar on `fake` and the outbox of `config`, tiny delays."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGAGE_")}
    env.update(
        {
            "ENGAGE_BASE_URL": fake.url,
            "ENGAGE_API_KEY": fake.api_key,
            "ENGAGE_USER_AGENT": "EngageSidecarTests/1.0",
            "ENGAGE_OUTBOX": str(config.outbox_path),
            "ENGAGE_XML_DIR": str(config.xml_dir),
            "ENGAGE_BACKGROUND_DELAYS": "0.01",
            "ENGAGE_BATCH_POLL_INITIAL": "0.01",
            "ENGAGE_BATCH_POLL_MAX": "0.05",
            "ENGAGE_POLL_INTERVAL": "0.05",
            "ENGAGE_LEASE_SECONDS": "0.5",
            "ENGAGE_RATE_LIMIT": "1000",
            "ENGAGE_REQUEST_TIMEOUT": "5",
            **BACKEND.env(),
        }
    )
    env.update(extra)
    return env


async def start(env: Mapping[str, str], log: Path, *args: str) -> asyncio.subprocess.Process:
    """Start ``engage-async flush`` with `args`; its output goes to `log` (never a full pipe)."""
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engage_async.cli",
            "flush",
            *args,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )


async def flush_once(env: Mapping[str, str], log: Path) -> tuple[int, dict[str, int]]:
    """Run ``engage-async flush --once`` to the end; its exit status and printed counts.

    `log` must be new: it receives this run's output only.
    """
    process = await start(env, log, "--once", "--no-progress")
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
    async with ea.EngageSession(config) as engage:
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
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        await engage.update_contact(guid, {"firstName": "Finished"})
        await fake.come_up()
    fake.inject("slow", method="PATCH", delay=0.5)
    log = tmp_path / "sidecar.log"
    process = await start(sidecar_env(fake, config), log)
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
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        await engage.create_contact({"email": "idle@example.com"})
        await fake.come_up()
    log = tmp_path / "sidecar.log"
    process = await start(sidecar_env(fake, config), log)
    try:
        await eventually(lambda: fake.find("email", "idle@example.com"), PROCESS_TIMEOUT)
        await asyncio.sleep(0.2)  # idle now, between polls
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
    """SIGKILL the sidecar at random moments mid-drain, restart it each time, then drain with
    ``--once``: every contact exists once, every attribute holds its last written value, every
    type change is applied, and every change ends done.
    """
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    config = flusher_config(fake, tmp_path, durability="normal")
    creates, seeded, expected = _build_workload(fake)
    async with ea.EngageSession(config) as engage:
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
        seen = len(fake.requests)
        process = await start(env, log)
        try:
            # Kill only once it is at work: at a random moment after its first request.
            await eventually(lambda seen=seen: len(fake.requests) > seen, PROCESS_TIMEOUT)
            await asyncio.sleep(rng.uniform(0.0, 0.5))
        finally:
            process.kill()
            await process.wait()
        left_after_kills.append(
            sum(row["state"] not in {"done", "dead"} for row in changes(config))
        )
    context = f"seed {seed}, changes left after each kill: {left_after_kills}"
    assert all(left_after_kills), context
    # Leases of the killed sidecars run out before the final drain.
    await asyncio.sleep(0.6)
    for attempt in range(10):
        once_log = tmp_path / f"once{attempt}.log"
        status, counts = await flush_once(env, once_log)
        assert 0 == status, f"{context}: {once_log.read_text(encoding='utf-8')[-3000:]}"
        if counts["pending"] == 0:
            break
        await asyncio.sleep(0.6)

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
