"""The client-side rate limiter, driven by a fake clock and its sleep (nothing really waits)."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
from helpers import FakeClock

from engage_async._ratelimit import RateLimiter


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    """A fake clock at 0 on which every sleep passes at once."""
    return FakeClock(monotonic=0.0)


def held_clock() -> FakeClock:
    """A fake clock at 0 on which a sleep waits until the test moves the clock past its end,
    so the test decides what runs when.
    """
    return FakeClock(monotonic=0.0, jump_limit=0.0)


def limiter(rate: float, clock: FakeClock) -> RateLimiter:
    """A limiter on the fake clock."""
    return RateLimiter(rate, clock=clock.monotonic, sleep=clock.sleep)


def move_to(clock: FakeClock, when: float) -> None:
    """Move the clock forward to `when`."""
    clock.advance(when - clock.monotonic())


async def through(limit: RateLimiter) -> None:
    """One call that takes no time: admitted, then over at once."""
    await limit.acquire()
    limit.release()


def most_in_any_window(times: list[float], window: float = 1.0) -> int:
    """The largest number of `times` inside any half-open window of `window` seconds."""
    ordered = sorted(times)
    return max(
        (sum(1 for t in ordered if start <= t < start + window) for start in ordered), default=0
    )


async def admit_all(rate: float, clock: FakeClock, count: int) -> list[float]:
    """Run `count` concurrent acquires; return the fake time of each admission, in call order."""
    limit = limiter(rate, clock)
    admitted: list[float] = [math.nan] * count

    async def one(i: int) -> None:
        await through(limit)
        admitted[i] = clock.monotonic()

    async with asyncio.TaskGroup() as group:
        for i in range(count):
            group.create_task(one(i))
    return admitted


@pytest.mark.parametrize("rate", [0, 0.0, -1.0, math.nan])
def test_rate_must_be_positive(rate: float) -> None:
    """A rate that is not greater than 0 is refused."""
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate)


async def test_first_rate_calls_go_at_once(clock: FakeClock) -> None:
    """Up to `rate` calls are admitted without sleeping."""
    admitted = await admit_all(5, clock, 5)

    assert ([0.0] * 5, []) == (admitted, clock.slept)


@pytest.mark.parametrize(("rate", "most"), [(1, 1), (5, 5), (40, 40), (2.5, 2), (7.9, 7)])
async def test_never_more_than_rate_in_any_one_second_window(
    clock: FakeClock, rate: float, most: int
) -> None:
    """Many concurrent calls: no one-second window ever holds more than `rate` admissions."""
    admitted = await admit_all(rate, clock, 200)

    assert most == most_in_any_window(admitted)


@pytest.mark.parametrize(("rate", "spacing"), [(0.5, 2.0), (0.25, 4.0)])
async def test_rates_below_one_space_calls_out(
    clock: FakeClock, rate: float, spacing: float
) -> None:
    """Below one a second, calls are at least 1/rate seconds apart."""
    admitted = sorted(await admit_all(rate, clock, 6))

    gaps = [later - earlier for earlier, later in itertools.pairwise(admitted)]

    assert [] == [gap for gap in gaps if gap < spacing]


async def test_idle_time_is_not_banked(clock: FakeClock) -> None:
    """After a long idle spell the limit is still per window: no burst of saved-up calls."""
    limit = limiter(3, clock)
    admitted: list[float] = []
    for _ in range(3):
        await through(limit)
        admitted.append(clock.monotonic())
    move_to(clock, 100.0)

    for _ in range(9):
        await through(limit)
        admitted.append(clock.monotonic())

    assert 3 == most_in_any_window(admitted)


async def test_sleeps_only_as_long_as_needed(clock: FakeClock) -> None:
    """A caller over the limit sleeps until the oldest admission leaves the window, no longer."""
    limit = limiter(2, clock)
    await through(limit)
    move_to(clock, 0.4)
    await through(limit)
    move_to(clock, 0.5)

    await through(limit)

    assert [pytest.approx(limit.window - 0.5)] == clock.slept


async def test_waiters_are_admitted_first_come_first_served(clock: FakeClock) -> None:
    """Callers that had to wait are admitted in the order they called."""
    limit = limiter(2, clock)
    order: list[int] = []

    async def one(i: int) -> None:
        await through(limit)
        order.append(i)

    async with asyncio.TaskGroup() as group:
        for i in range(12):
            group.create_task(one(i))
            await asyncio.sleep(0)

    assert list(range(12)) == order


async def test_a_newcomer_does_not_overtake_a_waiter() -> None:
    """A call made after others started waiting is not admitted before them.

    The scenario: two slots free up at once while W1 holds the limiter's lock and W2 waits
    for it. W1 takes one slot and releases the lock; a newcomer that runs before W2 resumes
    must queue behind W2, not take the second slot through the unlocked fast path.
    """
    held = held_clock()
    limit = limiter(2, held)
    order: list[str] = []

    async def one(name: str) -> None:
        await through(limit)
        order.append(name)

    await one("a")
    await one("b")
    w1 = asyncio.create_task(one("w1"))
    await asyncio.sleep(0)
    w2 = asyncio.create_task(one("w2"))
    await asyncio.sleep(0)
    assert 1 == len(held.sleeping)

    # The waiter's sleep ends, and a second more: both earlier admissions have left the window.
    held.advance(held.sleeping[0] + 1.0)
    newcomer = asyncio.create_task(one("newcomer"))
    for _ in range(5):
        await asyncio.sleep(0)
    while held.sleeping:
        held.advance(held.sleeping[0])
        for _ in range(5):
            await asyncio.sleep(0)
    await asyncio.gather(w1, w2, newcomer)

    assert ["a", "b", "w1", "w2", "newcomer"] == order


async def test_cancelled_waiter_does_not_block_others() -> None:
    """A waiter that is cancelled gives up its place; later callers still get in."""
    held = held_clock()
    limit = limiter(1, held)
    await through(limit)
    cancelled = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    move_to(held, 10.0)

    await through(limit)

    assert (10.0, 1) == (held.monotonic(), len(held.slept))


async def test_a_slot_is_free_one_window_after_its_call_ends(clock: FakeClock) -> None:
    """The window counts from the end of a call, not its admission: Engage sees a request
    some time after we admit it (a slow handshake), never after its answer came back.
    """
    limit = limiter(2, clock)
    await limit.acquire()
    await limit.acquire()
    move_to(clock, 0.7)  # both calls were slow; they end now
    limit.release()
    limit.release()

    await limit.acquire()

    assert 0.7 + limit.window == pytest.approx(clock.monotonic())


async def test_no_more_than_capacity_calls_in_flight() -> None:
    """With every slot held by an unfinished call, the next caller waits for a release, even
    long after the window has passed.
    """
    clock = FakeClock(monotonic=0.0)
    limit = limiter(2, clock)
    await limit.acquire()
    await limit.acquire()
    move_to(clock, 60.0)
    third = asyncio.create_task(limit.acquire())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not third.done()

    limit.release()
    await asyncio.wait_for(third, 1)

    assert 2 == limit.in_use


def test_release_without_acquire_is_an_error() -> None:
    """More releases than acquires is a bug in the caller, said at once."""
    with pytest.raises(RuntimeError, match="acquire"):
        RateLimiter(3).release()


async def test_try_acquire_takes_a_free_slot_without_waiting(clock: FakeClock) -> None:
    """try_acquire takes a free slot at once, and refuses (without sleeping) when none is."""
    limit = limiter(1, clock)

    assert (True, False) == (limit.try_acquire(), limit.try_acquire())
    limit.release()
    assert (False, []) == (limit.try_acquire(), clock.slept)


async def test_try_acquire_does_not_overtake_a_waiter() -> None:
    """While a caller waits for its turn, try_acquire says no even if a slot is free by then."""
    held = held_clock()
    limit = limiter(1, held)
    await through(limit)
    waiter = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    move_to(held, 10.0)  # the window has passed; the waiter has not woken yet

    assert not limit.try_acquire()
    await waiter
