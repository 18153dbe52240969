"""Leases, pauses and due times when wall clocks jump.

A lease is taken over only when its owner stopped renewing it, as the taker observed on its
own monotonic clock; a pause, a due time or a poll time further ahead than the wait that set
it was written by a clock that was ahead, and is over (due) now. Each test gives the outbox
handles their own `FakeClock`, as processes with disagreeing clocks would have.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import FakeClock, make_config, outbox_rows

import engage_async as ea
from engage_async._changes import NewChange, Operation, Queued
from engage_async._keys import contact_key
from engage_async._outbox import SqliteOutbox
from engage_async.testing import FakeEngage

DAY = 86400.0
LEASE = 30.0
GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"


def update(number: int = 0) -> NewChange:
    """An update of a contact of its own."""
    guid = f"2e40b702-2767-4abe-ae99-{number:012x}"
    return NewChange(
        Operation.UPDATE, contact_key(contact_id=guid), body={"city": "Kiruna"}, contact_id=guid
    )


@pytest.fixture(name="path")
def path_fixture(tmp_path: Path) -> Path:
    """Where the outbox lives."""
    return tmp_path / "outbox.sqlite3"


@pytest.fixture(name="opened")
async def opened_fixture(path: Path) -> AsyncIterator[list[SqliteOutbox]]:
    """A list to put open outbox handles in; all closed afterwards."""
    handles: list[SqliteOutbox] = []
    yield handles
    for handle in handles:
        await handle.close()


async def handle(path: Path, clock: FakeClock, opened: list[SqliteOutbox]) -> SqliteOutbox:
    """An outbox handle on `path` with its own clock."""
    outbox = await SqliteOutbox.open(path, clock=clock)
    opened.append(outbox)
    return outbox


async def test_a_live_flushers_rows_are_not_taken_by_a_clock_a_day_ahead(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    """A flusher whose wall clock is a day ahead never takes rows from a flusher that keeps
    renewing, however long it watches; it takes them once the owner stood still for a lease.
    """
    behind, ahead = FakeClock(), FakeClock(wall=FakeClock().wall() + DAY)
    owner = await handle(path, behind, opened)
    other = await handle(path, ahead, opened)
    await owner.enqueue(update())
    await owner.register("owner")
    [claimed] = await owner.claim("owner", limit=10, lease_seconds=LEASE)

    for _ in range(5):
        ahead.advance(2 * LEASE)
        assert 0 == await other.recover_expired("other", lease_seconds=LEASE)
        await owner.renew("owner", LEASE)
    assert ["inflight"] == [row["state"] for row in outbox_rows(path)]

    ahead.advance(LEASE)  # the owner stopped renewing: seen standing still ...
    assert 0 == await other.recover_expired("other", lease_seconds=LEASE)
    ahead.advance(LEASE)  # ... for a whole lease
    assert 1 == await other.recover_expired("other", lease_seconds=LEASE)
    assert [("pending", None)] == [(r["state"], r["lease_owner"]) for r in outbox_rows(path)]
    assert claimed.seq == outbox_rows(path)[0]["seq"]


async def test_a_late_owner_cannot_settle_rows_taken_from_it(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    """After its rows were given back, an owner that wakes up cannot release them as its own:
    the release matches the owner, so a taken row stays as its new holder left it.
    """
    owner = await handle(path, FakeClock(), opened)
    watcher = FakeClock()
    other = await handle(path, watcher, opened)
    await owner.enqueue(update())
    await owner.register("owner")
    [claimed] = await owner.claim("owner", limit=10, lease_seconds=LEASE)
    await other.recover_expired("other", lease_seconds=LEASE)
    watcher.advance(LEASE)
    assert 1 == await other.recover_expired("other", lease_seconds=LEASE)
    [again] = await other.claim("other", limit=10, lease_seconds=LEASE)

    await owner.release("owner", [claimed.seq], delay=600.0, count_attempt=True)

    row = outbox_rows(path)[0]
    assert (again.seq, "inflight", "other", 0) == (
        row["seq"],
        row["state"],
        row["lease_owner"],
        row["attempts"],
    )


async def test_a_dead_flusher_on_this_host_is_seen_at_once(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    """A flusher process that ran on this host and no longer exists gives its rows back at
    the next look, without waiting for a lease.
    """
    outbox = await handle(path, FakeClock(), opened)
    await outbox.enqueue(update())
    script = (
        "import asyncio, sys\n"
        "from engage_async._outbox import SqliteOutbox\n"
        "async def main():\n"
        "    o = await SqliteOutbox.open(sys.argv[1])\n"
        "    await o.register('gone')\n"
        "    await o.claim('gone', limit=10, lease_seconds=30.0)\n"
        "    await o.close()\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    assert ["gone"] == [row["lease_owner"] for row in outbox_rows(path)]

    assert 1 == await outbox.recover_expired("me", lease_seconds=LEASE)
    assert ["pending"] == [row["state"] for row in outbox_rows(path)]


async def test_a_pause_set_by_a_clock_a_day_ahead_is_over(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    """A pause written by a clock a day ahead does not keep flushers with a right clock idle
    for a day; one written by a clock that agrees is in force for its length.
    """
    right, ahead = FakeClock(), FakeClock(wall=FakeClock().wall() + DAY)
    mine = await handle(path, right, opened)
    theirs = await handle(path, ahead, opened)

    await theirs.set_pause(delay=600.0, reason="EngageUnavailable", outages=1)
    pause = await mine.pause()
    assert pause is not None
    assert 0.0 == pause.remaining

    await mine.set_pause(delay=600.0, reason="EngageUnavailable", outages=1)
    pause = await mine.pause()
    assert pause is not None
    assert 600.0 == pytest.approx(pause.remaining)


async def test_changes_queued_by_a_clock_an_hour_ahead_are_due(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    """Changes queued before the clock went back an hour are due at once, not in an hour."""
    ahead = FakeClock(wall=FakeClock().wall() + 3600)
    queued: Queued = await (await handle(path, ahead, opened)).enqueue(update())

    claimed = await (await handle(path, FakeClock(), opened)).claim(
        "me", limit=10, lease_seconds=LEASE
    )

    assert [queued.change_id] == [change.change_id for change in claimed]


async def test_a_backoff_set_by_a_clock_ahead_is_over_and_one_that_agrees_is_kept(
    path: Path, opened: list[SqliteOutbox]
) -> None:
    """A change put off for five minutes by a clock a day ahead is due now; put off by a clock
    that agrees, it waits its five minutes.
    """
    right = FakeClock()
    mine = await handle(path, right, opened)
    theirs = await handle(path, FakeClock(wall=right.wall() + DAY), opened)
    await mine.enqueue(update(1))
    await mine.enqueue(update(2))
    [first, second] = await mine.claim("me", limit=10, lease_seconds=LEASE)
    await mine.release("me", [first.seq], delay=300.0)
    [taken] = await theirs.claim("them", limit=10, lease_seconds=LEASE)
    assert taken.seq == first.seq  # due for a clock a day ahead, naturally
    await theirs.release("them", [first.seq], delay=300.0)
    await mine.release("me", [second.seq], delay=300.0)

    due_now = await mine.claim("me", limit=10, lease_seconds=LEASE)
    right.advance(300.0)
    due_later = await mine.claim("me", limit=10, lease_seconds=LEASE)

    assert [first.seq] == [change.seq for change in due_now]
    assert [second.seq] == [change.seq for change in due_later]


async def test_a_flusher_with_a_right_clock_delivers_through_a_pause_set_ahead(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """End to end: a pause left by a flusher whose clock was a day ahead does not stop a
    flusher with a right clock from delivering what is queued.
    """
    config = make_config(fake.url, fake.api_key, tmp_path)
    guid = fake.add_contact({"email": "p@example.com"})
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        assert (await engage.update_contact(guid, {"city": "Boden"})).queued
        await fake.come_up()
    ahead = await SqliteOutbox.open(config.outbox_path, clock=FakeClock(wall=2_000_000_000.0))
    try:
        await ahead.set_pause(delay=900.0, reason="EngageUnavailable", outages=3)
    finally:
        await ahead.close()

    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert (1, 0) == (report.updated, report.pending)
    assert "Boden" == fake.contacts[guid].attributes.get("city")
