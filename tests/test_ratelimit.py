"""The client-side rate limiter, driven by a fake clock and a fake sleep (nothing really waits)."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from engage_async._ratelimit import RateLimiter


class FakeTime:
    """A clock that moves only when a limiter sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        """The current fake time."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Advance the clock by `seconds`, then let other tasks run once."""
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class HeldSleep:
    """A sleep that waits until the test releases it, so the test decides what runs when."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        """The current fake time."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Wait until `release` is called."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((seconds, future))
        await future

    def release(self, extra: float = 0.0) -> None:
        """Move the clock past the oldest pending sleep (plus `extra`) and wake its sleeper."""
        seconds, future = self.pending.pop(0)
        self.now += seconds + extra
        future.set_result(None)


@pytest.fixture(name="time")
def time_fixture() -> FakeTime:
    """A fresh fake clock at 0."""
    return FakeTime()


def limiter(rate: float, time: FakeTime | HeldSleep) -> RateLimiter:
    """A limiter on the fake clock."""
    return RateLimiter(rate, clock=time.clock, sleep=time.sleep)


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


async def admit_all(rate: float, time: FakeTime, count: int) -> list[float]:
    """Run `count` concurrent acquires; return the fake time of each admission, in call order."""
    limit = limiter(rate, time)
    admitted: list[float] = [math.nan] * count

    async def one(i: int) -> None:
        await through(limit)
        admitted[i] = time.now

    async with asyncio.TaskGroup() as group:
        for i in range(count):
            group.create_task(one(i))
    return admitted


@pytest.mark.parametrize("rate", [0, 0.0, -1.0, math.nan])
def test_rate_must_be_positive(rate: float) -> None:
    """A rate that is not greater than 0 is refused."""
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate)


async def test_first_rate_calls_go_at_once(time: FakeTime) -> None:
    """Up to `rate` calls are admitted without sleeping."""
    admitted = await admit_all(5, time, 5)

    assert ([0.0] * 5, []) == (admitted, time.sleeps)


@pytest.mark.parametrize(("rate", "most"), [(1, 1), (5, 5), (40, 40), (2.5, 2), (7.9, 7)])
async def test_never_more_than_rate_in_any_one_second_window(
    time: FakeTime, rate: float, most: int
) -> None:
    """Many concurrent calls: no one-second window ever holds more than `rate` admissions."""
    admitted = await admit_all(rate, time, 200)

    assert most == most_in_any_window(admitted)


@pytest.mark.parametrize(("rate", "spacing"), [(0.5, 2.0), (0.25, 4.0)])
async def test_rates_below_one_space_calls_out(time: FakeTime, rate: float, spacing: float) -> None:
    """Below one a second, calls are at least 1/rate seconds apart."""
    admitted = sorted(await admit_all(rate, time, 6))

    gaps = [later - earlier for earlier, later in itertools.pairwise(admitted)]

    assert [] == [gap for gap in gaps if gap < spacing]


async def test_idle_time_is_not_banked(time: FakeTime) -> None:
    """After a long idle spell the limit is still per window: no burst of saved-up calls."""
    limit = limiter(3, time)
    admitted: list[float] = []
    for _ in range(3):
        await through(limit)
        admitted.append(time.now)
    time.now = 100.0

    for _ in range(9):
        await through(limit)
        admitted.append(time.now)

    assert 3 == most_in_any_window(admitted)


async def test_sleeps_only_as_long_as_needed(time: FakeTime) -> None:
    """A caller over the limit sleeps until the oldest admission leaves the window, no longer."""
    limit = limiter(2, time)
    await through(limit)
    time.now = 0.4
    await through(limit)
    time.now = 0.5

    await through(limit)

    assert [pytest.approx(limit.window - 0.5)] == time.sleeps


async def test_waiters_are_admitted_first_come_first_served(time: FakeTime) -> None:
    """Callers that had to wait are admitted in the order they called."""
    limit = limiter(2, time)
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
    held = HeldSleep()
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
    assert 1 == len(held.pending)

    held.release(extra=1.0)  # both earlier admissions have now left the window
    newcomer = asyncio.create_task(one("newcomer"))
    for _ in range(5):
        await asyncio.sleep(0)
    while held.pending:
        held.release()
        for _ in range(5):
            await asyncio.sleep(0)
    await asyncio.gather(w1, w2, newcomer)

    assert ["a", "b", "w1", "w2", "newcomer"] == order


async def test_cancelled_waiter_does_not_block_others() -> None:
    """A waiter that is cancelled gives up its place; later callers still get in."""
    held = HeldSleep()
    limit = limiter(1, held)
    await through(limit)
    cancelled = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    held.pending.clear()
    held.now = 10.0

    await through(limit)

    assert 10.0 == held.now


async def test_a_slot_is_free_one_window_after_its_call_ends(time: FakeTime) -> None:
    """The window counts from the end of a call, not its admission: Engage sees a request
    some time after we admit it (a slow handshake), never after its answer came back.
    """
    limit = limiter(2, time)
    await limit.acquire()
    await limit.acquire()
    time.now = 0.7  # both calls were slow; they end now
    limit.release()
    limit.release()

    await limit.acquire()

    assert 0.7 + limit.window == pytest.approx(time.now)


async def test_no_more_than_capacity_calls_in_flight() -> None:
    """With every slot held by an unfinished call, the next caller waits for a release, even
    long after the window has passed.
    """
    clock = FakeTime()
    limit = limiter(2, clock)
    await limit.acquire()
    await limit.acquire()
    clock.now = 60.0
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


async def test_try_acquire_takes_a_free_slot_without_waiting(time: FakeTime) -> None:
    """try_acquire takes a free slot at once, and refuses (without sleeping) when none is."""
    limit = limiter(1, time)

    assert (True, False) == (limit.try_acquire(), limit.try_acquire())
    limit.release()
    assert (False, []) == (limit.try_acquire(), time.sleeps)


async def test_try_acquire_does_not_overtake_a_waiter() -> None:
    """While a caller waits for its turn, try_acquire says no even if a slot is free by then."""
    held = HeldSleep()
    limit = limiter(1, held)
    await through(limit)
    waiter = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    held.now = 10.0  # the window has passed; the waiter has not woken yet

    assert not limit.try_acquire()
    held.release()
    await waiter
