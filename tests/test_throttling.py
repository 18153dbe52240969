"""Tests of what a 429 does: its Retry-After holds every process on the key, a rate_limit set
higher than the tenant allows still drains the outbox, and several flushers failing after
one probe escalate the shared pause once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock, create_outbox, make_config, outbox_rows

import engage_async as ea
from engage_async._budget import Budget, BudgetFile, Priority, Record, take
from engage_async._outbox import SqliteOutbox
from engage_async.testing import FakeEngage

# --- Retry-After holds the budget ----------------------------------------------------------


def test_retry_after_holds_every_slot_until_it_runs_out() -> None:
    """No slot is taken before the Retry-After ends, however many are free."""
    record = Record(slots=[0.0] * 4, blocked_until=10.0)

    assert (None, pytest.approx(2.5)) == take(record, 7.5, Priority.INTERACTIVE)
    index, _ = take(record, 10.0, Priority.INTERACTIVE)
    assert index is not None


def test_a_block_from_another_boot_is_ignored() -> None:
    """The budget file outlives a reboot; monotonic time starts again near zero after one."""
    record = Record(slots=[0.0] * 4, blocked_until=1e9)

    index, _ = take(record, 5.0, Priority.INTERACTIVE)

    assert index is not None


async def test_a_429_with_retry_after_holds_the_other_processes_too(tmp_path: Path) -> None:
    """Two budgets on one file stand for two processes: the 429 one of them met holds both."""
    clock = FakeClock()
    path = tmp_path / "outbox.sqlite3.budget"
    first = Budget(BudgetFile(path), b"k" * 16, 10.0, clock)
    second = Budget(BudgetFile(path), b"k" * 16, 10.0, clock)
    try:
        permit = first.try_acquire(Priority.INTERACTIVE)
        assert permit is not None
        first.release(permit, rate_limited=True, retry_after=3.0)

        assert second.try_acquire(Priority.INTERACTIVE) is None
        clock.advance(3.0)
        assert second.try_acquire(Priority.INTERACTIVE) is not None
    finally:
        first.release_user()
        second.release_user()


# --- a rate_limit higher than the tenant's ---------------------------------------------------


async def test_a_rate_limit_set_too_high_still_drains_every_change(
    fake: FakeEngage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tenant admits 20 requests a second, the config says 200: the flusher meets 429s
    without a Retry-After, backs off, slows down, and sends every create exactly once.
    """
    config = make_config(
        fake.url,
        fake.api_key,
        tmp_path,
        rate_limit=200.0,
        background_delays=(0.2,),
        bulk_threshold=1000,
    )
    emails = [f"slow{number}@example.com" for number in range(60)]
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        for email in emails:
            assert (await engage.create_contact({"email": email})).queued
    await fake.come_up()
    fake.rate_limit = 20.0

    async with ea.OutboxFlusher(config) as flusher:
        for _ in range(40):
            await flusher.flush_once()
            if all(row["state"] == "done" for row in outbox_rows(config.outbox_path)):
                break
            await asyncio.sleep(0.2)

    assert all(row["state"] == "done" for row in outbox_rows(config.outbox_path))
    assert sorted(emails) == sorted(
        contact.attributes["email"] for contact in fake.contacts.values()
    )
    # More requests than creates: Engage refused some with 429, and they were sent again
    # after backing off, without pausing every flusher.
    assert not [record for record in caplog.records if "flushers pause" in record.message]
    assert len(fake.requests_to("POST", "/api/v3/contacts")) > len(emails)


# --- one probe, one escalation ---------------------------------------------------------------


def _control(path: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT name, value FROM control").fetchall())


async def test_a_pause_is_escalated_only_by_the_first_of_several_flushers(
    tmp_path: Path,
) -> None:
    """Two flushers probed after the same pause and both failed: the second's escalation is
    refused, so the schedule moves one step, not two.
    """
    path = tmp_path / "outbox.sqlite3"
    await create_outbox(path)
    outbox = await SqliteOutbox.open(path)
    try:
        assert await outbox.set_pause(delay=1.0, reason="first", outages=1, expected_outages=0)
        seen = 1
        assert await outbox.set_pause(
            delay=2.0, reason="a", outages=seen + 1, expected_outages=seen
        )
        refused = await outbox.set_pause(
            delay=4.0, reason="b", outages=seen + 1, expected_outages=seen
        )
    finally:
        await outbox.close()

    assert not refused
    control = _control(path)
    assert ("2", "a", 2.0) == (
        control["outages"],
        control["pause_reason"],
        float(control["pause_delay"]),
    )


async def test_flushers_failing_after_one_probe_move_the_schedule_one_step(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """Three flushers meet the same 503s after one probe: the outages count once.

    The refusal itself is pinned by the test above; here the flushers race for real.
    """
    config = make_config(
        fake.url,
        fake.api_key,
        tmp_path,
        background_delays=(0.05, 30.0, 60.0),
        request_timeout=0.3,
    )
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        for number in range(4):
            assert (await engage.create_contact({"email": f"p{number}@example.com"})).queued
    fake.inject("server_error", status=503)
    await fake.come_up()

    flushers: list[Any] = [ea.OutboxFlusher(config) for _ in range(3)]
    for flusher in flushers:
        await flusher.__aenter__()
    try:
        await asyncio.gather(*(flusher.flush_once() for flusher in flushers))
    finally:
        for flusher in flushers:
            await flusher.__aexit__(None, None, None)

    # However the three interleaved, they all started from no pause: one outage is counted.
    control = _control(config.outbox_path)
    assert "1" == control["outages"]
    # The first step of the schedule (0.05 s, with jitter), not the second (30 s).
    assert float(control["pause_delay"]) < 1.0
