"""The shared rate budget (`engage_async._budget`): its slot rules, two processes' views of
one budget file, and real processes drawing on it at once.

The slot rules are pure functions over a `Record`, so the window bound is checked by
simulating arrivals: requests that leave late, answers that take long, 429s, priorities
mixed. `Budget` is then driven with a `FakeClock` through two `BudgetFile` objects on one
file, as two processes see it; and last by real subprocesses sending to one `FakeEngage`.
"""

from __future__ import annotations

import asyncio
import fcntl
import heapq
import logging
import math
import random
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Final

import pytest
from helpers import SCRIPTS, FakeClock, read_line, start_script, stop_process

from engage_async import _budget
from engage_async._budget import (
    INTERACTIVE_RESERVE,
    MAX_SLOTS,
    Budget,
    BudgetFile,
    Priority,
    Record,
    Shape,
    after_good_answer,
    after_rate_limited,
    budget_key,
    give_back,
    shape,
    take,
    usable,
)
from engage_async.testing import FakeEngage

NOW: Final = 1_000.0
KEY_OF: Final = ("http://127.0.0.1:1", "budget-test-key")
KEY: Final = budget_key(*KEY_OF)
IN, BG = Priority.INTERACTIVE, Priority.BACKGROUND


def free_record(rate: float) -> Record:
    """A record for `rate` with every slot free."""
    return Record(slots=[0.0] * shape(rate).slots, window=shape(rate).window)


def peak(times: Sequence[float], window: float = 1.0) -> int:
    """The most of `times` in any half-open window of `window` seconds."""
    ordered = sorted(times)
    best = start = 0
    for end, at in enumerate(ordered):
        while at - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


# --- shape ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (0.5, Shape(1, 2.0 * 1.005)),
        (1.0, Shape(1, 1.005)),
        (20.0, Shape(20, 1.005)),
        (40.9, Shape(40, 1.005)),
        (300.0, Shape(MAX_SLOTS, 1.005)),
        (600.0, Shape(MAX_SLOTS, 0.5 * 1.005)),
    ],
)
def test_shape_turns_a_rate_into_slots_and_a_window(rate: float, expected: Shape) -> None:
    """One slot per request a second, reusable a window (a second and a half percent) after;
    below one a second a longer window; above `MAX_SLOTS` a shorter one; never more than the
    rate in all.
    """
    actual = shape(rate)

    assert (expected.slots, True) == (actual.slots, math.isclose(expected.window, actual.window))


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan])
def test_shape_refuses_a_rate_that_is_not_positive(rate: float) -> None:
    """A rate of zero, below or not a number is an error naming the field."""
    with pytest.raises(ValueError, match="rate: must be greater than 0"):
        shape(rate)


# --- the window bound, simulated -----------------------------------------------------------


def simulate(
    rate: float,
    *,
    workers: int,
    seconds: float,
    leave: Callable[[random.Random], float],
    latency: Callable[[random.Random], float],
    seed: int,
    background_share: float = 0.0,
    rate_limited_share: float = 0.0,
) -> list[float]:
    """Arrival times of requests from `workers` callers that each send as fast as the slots
    let them, for `seconds` of simulated time.

    A request takes its slot, arrives `leave()` seconds later (a handshake, a busy event
    loop), is answered `latency()` seconds after arriving, and gives its slot back at the
    answer; the caller asks again at once. `background_share` of the callers are background
    work; `rate_limited_share` of the answers are 429s.
    """
    rng = random.Random(seed)
    window = shape(rate).window
    record = free_record(rate)
    priorities = [BG if rng.random() < background_share else IN for _ in range(workers)]
    events: list[tuple[float, int, int, int, float]] = []
    order = 0

    def push(at: float, worker: int, index: int = -1, taken: float = 0.0) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, worker, index, taken))

    for worker in range(workers):
        push(NOW + rng.uniform(0, 0.01), worker)
    arrivals = []
    while events:
        now, _, worker, index, taken = heapq.heappop(events)
        if index >= 0:  # an answer: the slot goes back, the caller asks again
            give_back(record, index, taken, now, window)
            if rng.random() < rate_limited_share:
                after_rate_limited(record, now, window)
            else:
                after_good_answer(record, now)
            push(now, worker)
            continue
        if now > NOW + seconds:
            continue
        got, wait = take(record, now, priorities[worker])
        if got is None:
            assert wait > 0
            push(now + wait, worker)
            continue
        arrived = now + leave(rng)
        arrivals.append(arrived)
        push(arrived + latency(rng), worker, got, now)
    return arrivals


def quick(rng: random.Random) -> float:
    """Half a millisecond to 20 ms: loopback, a kept-alive connection."""
    return rng.uniform(0.0005, 0.02)


def late(rng: random.Random) -> float:
    """Mostly quick, now and then far longer than a window (a stalled handshake)."""
    return rng.choice((0.0, 0.001, 0.05)) if rng.random() < 0.9 else rng.uniform(0.5, 3.0)


def erratic(rng: random.Random) -> float:
    """Answers of 0.2 s on average, one in five of one to four seconds."""
    return rng.expovariate(1 / 0.2) if rng.random() < 0.8 else rng.uniform(1.0, 4.0)


@pytest.mark.parametrize("rate", [1.0, 2.0, 5.0, 20.0, 40.0, 47.5])
@pytest.mark.parametrize(
    ("leave", "latency"), [(quick, quick), (late, quick), (quick, erratic), (late, erratic)]
)
def test_no_one_second_window_of_arrivals_holds_more_than_the_rate(
    rate: float, leave: Callable[[random.Random], float], latency: Callable[[random.Random], float]
) -> None:
    """Callers sending as fast as the slots allow, whatever the latencies and however late a
    request leaves after taking its slot (even seconds late), never make more than `rate`
    requests arrive in any one second: a slot is reused only a window after the answer of
    the request before it, which arrived before its answer. Half the callers are background
    work, and one answer in fifty is a 429.
    """
    slots = shape(rate).slots
    arrivals = simulate(
        rate,
        workers=slots + 8,
        seconds=8.0,
        leave=leave,
        latency=latency,
        seed=int(rate * 10),
        background_share=0.5,
        rate_limited_share=0.02,
    )

    assert len(arrivals) > 2 * slots  # slots were reused, many times
    assert peak(arrivals) <= rate


def test_above_the_most_slots_each_slot_serves_several_requests_a_second_within_the_rate() -> None:
    """Above `MAX_SLOTS` requests a second each slot is reused several times a second (a
    shorter window), and still no second holds more than the rate.
    """
    arrivals = simulate(
        600.0, workers=MAX_SLOTS + 8, seconds=1.5, leave=late, latency=quick, seed=6000
    )

    assert len(arrivals) > 2 * MAX_SLOTS
    assert peak(arrivals) <= 600


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_below_one_a_second_requests_are_a_whole_period_apart(rate: float) -> None:
    """Below one request a second, no two requests arrive within ``1 / rate`` seconds."""
    arrivals = simulate(rate, workers=4, seconds=40.0, leave=late, latency=quick, seed=7)

    assert len(arrivals) >= 5
    assert 1 == peak(arrivals, 1 / rate)


def test_callers_that_keep_asking_get_nearly_the_whole_rate() -> None:
    """The bound does not cost throughput: with quick answers, callers that always have work
    get 99 % of the rate (each slot serves one request per window plus its latency).
    """
    arrivals = simulate(40.0, workers=60, seconds=30.0, leave=quick, latency=quick, seed=3)
    steady = [at for at in arrivals if NOW + 2 <= at < NOW + 28]

    assert len(steady) / 26 >= 0.97 * 40


# --- take: the interactive reserve ---------------------------------------------------------


def test_background_work_leaves_the_reserve_to_interactive_calls() -> None:
    """Background work takes slots only while more than `INTERACTIVE_RESERVE` are free; the
    reserve goes to interactive calls, and then nobody gets one.
    """
    record = free_record(10.0)
    got = []
    while (index := take(record, NOW, BG)[0]) is not None:
        got.append(("background", index))
    while (index := take(record, NOW, IN)[0]) is not None:
        got.append(("interactive", index))

    expected = [("background", i) for i in range(10 - INTERACTIVE_RESERVE)] + [
        ("interactive", i) for i in range(10 - INTERACTIVE_RESERVE, 10)
    ]
    assert expected == got


def test_an_interactive_call_is_told_when_the_first_slot_frees_background_the_third() -> None:
    """With no slot free, the wait until it is worth looking again: for an interactive call,
    until the first slot frees; for background work, until the reserve and one more have.
    """
    record = Record(slots=[NOW + 0.7, NOW + 0.3, -NOW - 1, NOW + 0.5, NOW + 0.9])

    _, interactive_wait = take(record, NOW, IN)
    _, background_wait = take(record, NOW, BG)

    assert (0.3, 0.7) == (round(interactive_wait, 6), round(background_wait, 6))


def test_at_one_slot_background_work_is_not_starved() -> None:
    """With a single slot there is no reserve to keep: background work may take it."""
    record = free_record(1.0)

    assert (0, 0.0) == take(record, NOW, BG)


def test_background_work_keeps_the_reserve_after_a_cut_too() -> None:
    """After a 429 cut, the reserve is kept within the slots still in use."""
    record = free_record(10.0)
    record.scale = 0.5
    got = []
    while (index := take(record, NOW, BG)[0]) is not None:
        got.append(index)

    assert [0, 1, 2] == got


# --- take: slots of the dead and of another boot ---------------------------------------------


def test_a_slot_held_longer_than_the_longest_hold_is_taken_back() -> None:
    """A slot held past `_LONGEST_HOLD` belongs to a process that died with its request out:
    it is free; one held a moment less is not.
    """
    longest = _budget._LONGEST_HOLD
    dead = Record(slots=[-(NOW - longest - 0.001) - 1])
    alive = Record(slots=[-(NOW - longest + 1) - 1])

    assert (0, 0.0) == take(dead, NOW, IN)
    assert take(alive, NOW, IN)[0] is None


def test_the_late_answer_of_a_reclaimed_slot_does_not_free_its_new_holder() -> None:
    """When a slot judged abandoned was taken again, the first holder's give_back changes
    nothing: the new request keeps it.
    """
    old_taken = NOW - _budget._LONGEST_HOLD - 1
    record = Record(slots=[-old_taken - 1])
    index, _ = take(record, NOW, IN)
    assert 0 == index

    give_back(record, 0, old_taken, NOW + 0.1, 1.005)

    assert [-NOW - 1] == list(record.slots)


def test_times_from_another_boot_far_ahead_count_as_past() -> None:
    """After a reboot the monotonic clock starts again: a slot free or taken "hours from
    now" was written by the previous boot, and is free now.
    """
    ahead = NOW + 3600.0
    record = Record(slots=[ahead, -ahead - 1])

    first, _ = take(record, NOW, IN)
    second, _ = take(record, NOW, IN)

    assert (0, 1) == (first, second)


def test_a_slot_free_in_a_moment_is_not_another_boots() -> None:
    """A slot freed a window from now is a real one: it is waited for."""
    record = Record(slots=[NOW + 0.4])

    assert (None, 0.4) == (take(record, NOW, IN)[0], round(take(record, NOW, IN)[1], 6))


def test_times_from_a_previous_boot_that_ran_minutes_longer_count_as_past() -> None:
    """A previous boot that ran ten minutes longer than this one has so far left slots free
    "ten minutes from now": no slot is ever free more than a window ahead within one boot, so
    these are the previous boot's, and free now.
    """
    window = shape(40.0).window
    record = Record(slots=[NOW + 600.0 + window] * 40)

    assert 0 == take(record, NOW, IN)[0]


# --- 429: the cut and the recovery ---------------------------------------------------------


def test_a_429_halves_the_slots_in_use_once_a_window() -> None:
    """A 429 halves the share of slots in use; more 429s within the same window do not cut
    again (they answer requests sent before the cut); one a window later does.
    """
    record = free_record(40.0)
    cuts = [
        after_rate_limited(record, NOW, 1.005),
        after_rate_limited(record, NOW + 0.5, 1.005),
        after_rate_limited(record, NOW + 1.1, 1.005),
    ]

    assert ([True, False, True], 10) == (cuts, usable(record))


def test_429s_never_cut_below_the_lowest_scale_nor_one_slot() -> None:
    """However many 429s, some slots stay in use: `_LOWEST_SCALE` of them, and at least one."""
    many, one = free_record(100.0), free_record(5.0)
    for n in range(30):
        after_rate_limited(many, NOW + 2 * n, 1.005)
        after_rate_limited(one, NOW + 2 * n, 1.005)

    assert (_budget._LOWEST_SCALE, 5, 1) == (many.scale, usable(many), usable(one))


def test_good_answers_grow_the_share_back_with_time_not_with_their_number() -> None:
    """After a cut, good answers give the share back at `_RECOVERY_PER_SECOND` of the full
    rate per second since the cut: a thousand answers within the same second give back almost
    nothing, and the whole share is back after ``lost / _RECOVERY_PER_SECOND`` seconds.
    """
    record = free_record(40.0)
    after_rate_limited(record, NOW, 1.005)
    lost = 1.0 - record.scale
    for _ in range(1000):
        after_good_answer(record, NOW + 0.5)
    at_once = usable(record)
    back = lost / _budget._RECOVERY_PER_SECOND
    after_good_answer(record, NOW + back - 1.0)
    almost = usable(record)
    after_good_answer(record, NOW + back + 1.0)

    assert (20, 39, 1.0, 40) == (at_once, almost, record.scale, usable(record))


def test_a_cut_from_another_boot_does_not_stop_the_recovery() -> None:
    """A cut stored by the previous boot (its clock ran further) is treated as past."""
    record = free_record(40.0)
    after_rate_limited(record, NOW + 5000.0, 1.005)
    after_good_answer(record, NOW)
    after_good_answer(record, NOW + 60.0)

    assert 1.0 == record.scale


def test_after_a_cut_only_the_slots_in_use_are_taken() -> None:
    """A cut leaves the higher slots alone: requests take the first half only."""
    record = free_record(8.0)
    after_rate_limited(record, NOW, 1.005)
    got = []
    while (index := take(record, NOW, IN)[0]) is not None:
        got.append(index)

    assert [0, 1, 2, 3] == got


# --- Budget over one file, two processes' views --------------------------------------------


@pytest.fixture(name="views")
async def views_fixture(tmp_path: Path) -> AsyncIterator[tuple[FakeClock, Budget, Budget]]:
    """A clock and two budgets of rate 5 for one key, each with its own view of one file."""
    clock = FakeClock()
    path = tmp_path / "outbox.sqlite3.budget"
    one = Budget(BudgetFile(path), KEY, 5.0, clock)
    two = Budget(BudgetFile(path), KEY, 5.0, clock)
    yield clock, one, two
    one.release_user()
    two.release_user()


def take_all(budget: Budget, priority: Priority = IN) -> list[int]:
    """Every slot `budget` can take now, by index."""
    got = []
    while (permit := budget.try_acquire(priority)) is not None:
        got.append(permit.index)
    return got


def take_paced(clock: FakeClock, budget: Budget, priority: Priority) -> list[int]:
    """Every slot `budget` can take, each one spacing (`window / slots`) after the last."""
    got = []
    while (permit := budget.try_acquire(priority)) is not None:
        got.append(permit.index)
        clock.advance(budget.shape.window / budget.shape.slots)
    return got


def use_all(budget: Budget) -> list[int]:
    """Send through every slot `budget` can take now, each answered at once, by index."""
    got = []
    while (permit := budget.try_acquire(IN)) is not None:
        budget.release(permit)
        got.append(permit.index)
    return got


async def test_two_processes_share_the_slots(views: tuple[FakeClock, Budget, Budget]) -> None:
    """Slots one process takes, the other cannot: together they get the rate, no more."""
    _, one, two = views

    first = [one.try_acquire(IN), one.try_acquire(IN), one.try_acquire(IN)]
    others = take_all(two)

    assert ([0, 1, 2], [3, 4]) == ([p.index for p in first if p], others)
    assert [] == take_all(one)


async def test_a_slot_given_back_by_one_process_serves_the_other_a_window_later(
    views: tuple[FakeClock, Budget, Budget],
) -> None:
    """A slot given back in one process is free for the other one window after the answer,
    not before.
    """
    clock, one, two = views
    held = [p for p in (one.try_acquire(IN) for _ in range(5)) if p]
    clock.advance(0.2)
    one.release(held[3])

    clock.advance(one.shape.window - 0.001)
    before = take_all(two)
    clock.advance(0.002)
    after = take_all(two)

    assert ([], [3]) == (before, after)


async def test_background_in_one_process_leaves_the_reserve_to_interactive_in_another(
    views: tuple[FakeClock, Budget, Budget],
) -> None:
    """A flusher in one process draining as fast as it may leaves `INTERACTIVE_RESERVE` slots,
    which an interactive call of another process then gets.
    """
    clock, one, two = views

    flusher = take_paced(clock, one, BG)
    interactive = take_all(two, IN)

    assert (5 - INTERACTIVE_RESERVE, INTERACTIVE_RESERVE) == (len(flusher), len(interactive))


async def test_background_requests_of_one_process_are_spaced_and_interactive_ones_not(
    views: tuple[FakeClock, Budget, Budget],
) -> None:
    """A background request waits one spacing (``window / slots``) after this process's last
    one; an interactive call never waits for the pace, and another process has its own.
    """
    clock, one, two = views
    spacing = one.shape.window / one.shape.slots

    first = one.try_acquire(BG)
    too_soon = one.try_acquire(BG)
    other_process = two.try_acquire(BG)
    clock.advance(spacing - 0.001)
    still_too_soon = one.try_acquire(BG)
    clock.advance(0.002)
    spaced = one.try_acquire(BG)
    interactive = one.try_acquire(IN)

    assert (None, None) == (too_soon, still_too_soon)
    assert None not in (first, other_process, spaced, interactive)


async def test_a_flusher_starting_on_a_free_budget_leaves_callers_no_burst_to_wait_out(
    tmp_path: Path,
) -> None:
    """The in-app case: a flusher starts draining as fast as it may while a caller asks
    five times a second. Each caller's request gets its slot within one spacing; taken all
    at once, the flusher's slots would free together a window later, and the third call
    would wait for that.
    """
    clock = FakeClock()
    budget = Budget(BudgetFile(tmp_path / "outbox.sqlite3.budget"), KEY, 10.0, clock)
    spacing = budget.shape.window / budget.shape.slots
    tick = 0.01
    waits: list[float] = []
    asked_at: float | None = None
    try:
        for step in range(300):  # three seconds
            now = clock.monotonic()
            if step % 20 == 0:
                asked_at = now
            if asked_at is not None and (permit := budget.try_acquire(IN)) is not None:
                budget.release(permit)
                waits.append(now - asked_at)
                asked_at = None
            while (permit := budget.try_acquire(BG)) is not None:
                budget.release(permit)
            clock.advance(tick)
    finally:
        budget.release_user()

    assert 15 == len(waits)
    assert max(waits) <= spacing + tick


async def test_a_429_in_one_process_slows_the_other(
    views: tuple[FakeClock, Budget, Budget], caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 answered to one process halves the slots the other uses, with one warning for
    the key; good answers in the other process grow them back.
    """
    clock, one, two = views
    caplog.set_level(logging.WARNING, logger="engage_async._budget")
    permit = one.try_acquire(IN)
    assert permit is not None
    one.release(permit, rate_limited=True)
    clock.advance(5.0)
    permit = one.try_acquire(IN)
    assert permit is not None
    one.release(permit, rate_limited=True)
    clock.advance(5.0)

    after_cut = use_all(two)
    # Good answers over the time the recovery takes.
    for _ in range(4):
        clock.advance(30.0)
        permit = await two.acquire(IN)
        assert permit is not None
        two.release(permit)
    clock.advance(5.0)
    recovered = use_all(two)

    assert ([0], [0, 1, 2, 3, 4]) == (after_cut, recovered)
    assert 1 == sum("answered 429" in r.getMessage() for r in caplog.records)


async def test_acquire_gives_up_when_no_slot_frees_within_the_time(
    views: tuple[FakeClock, Budget, Budget],
) -> None:
    """With every slot held elsewhere, `acquire(within=...)` returns None once the time is up
    rather than waiting for ever; a slot given back meanwhile is had once its window is over.
    """
    clock, one, two = views
    held = [p for p in (one.try_acquire(IN) for _ in range(5)) if p]
    assert 5 == len(held)

    refused = await two.acquire(IN, within=0.5)
    one.release(held[2])
    too_soon = await two.acquire(IN, within=0.5)
    started = clock.monotonic()
    permit = await two.acquire(IN, within=2.0)

    assert (None, None) == (refused, too_soon)
    assert permit is not None
    assert 2 == permit.index
    assert clock.monotonic() - started <= one.shape.window + _budget._POLL


async def test_a_holder_that_died_blocks_its_slots_for_the_longest_hold_only(
    views: tuple[FakeClock, Budget, Budget],
) -> None:
    """A process that dies holding slots (it never gives them back) does not stop the others:
    they use the rest meanwhile, and its slots are theirs once `_LONGEST_HOLD` has passed.
    """
    clock, dead, alive = views
    assert 3 == len([dead.try_acquire(IN) for _ in range(3)])

    meanwhile = use_all(alive)
    clock.advance(_budget._LONGEST_HOLD - 1)
    almost = use_all(alive)
    clock.advance(2)
    later = use_all(alive)

    assert ([3, 4], [3, 4], [0, 1, 2, 3, 4]) == (meanwhile, almost, later)


async def test_processes_with_different_rates_never_exceed_the_higher(tmp_path: Path) -> None:
    """Two processes on one outbox configured with different `rate_limit` values (a sidecar
    left at 5 while the app says 4): together they never send more than the higher rate in
    one instant (better still, the lower; at least never the sum).
    """
    clock = FakeClock()
    path = tmp_path / "outbox.sqlite3.budget"
    five = Budget(BudgetFile(path), KEY, 5.0, clock)
    four = Budget(BudgetFile(path), KEY, 4.0, clock)
    try:
        taken = 0
        for _ in range(3):
            taken += len(take_all(five)) + len(take_all(four))
    finally:
        five.release_user()
        four.release_user()

    assert taken <= 5


async def test_a_budget_file_from_before_a_reboot_does_not_block(tmp_path: Path) -> None:
    """The host ran for half an hour, then rebooted (its monotonic clock starts again near
    zero): the budget file beside the outbox still holds that boot's slot times, and a
    session started a minute after the reboot gets a slot at once.
    """
    path = tmp_path / "outbox.sqlite3.budget"
    before = FakeClock(monotonic=1_800.0)
    old = Budget(BudgetFile(path), KEY, 5.0, before)
    for permit in [old.try_acquire(IN) for _ in range(5)]:
        assert permit is not None
        old.release(permit)
    old.release_user()

    rebooted = Budget(BudgetFile(path), KEY, 5.0, FakeClock(monotonic=60.0))
    try:
        permit = rebooted.try_acquire(IN)
    finally:
        rebooted.release_user()

    assert permit is not None


# --- real processes ------------------------------------------------------------------------

WORKER = SCRIPTS / "budget_worker.py"
RATE: Final = 20
WORKERS: Final = 4
SECONDS: Final = 4.0
# Startup of a fresh interpreter with aiohttp is the slow part.
PROCESS_TIMEOUT: Final = 30.0


@pytest.mark.slow
async def test_processes_sending_as_fast_as_they_may_stay_within_the_rate_together(
    tmp_path: Path,
) -> None:
    """Four processes on one outbox, each with ten callers sending as fast as the budget lets
    them, for four seconds, to one Engage that allows 20 a second: Engage never sees more than
    20 in any one second, never answers 429, and the processes together use most of the rate.
    """
    outbox = tmp_path / "outbox.sqlite3"
    async with FakeEngage(rate_limit=RATE) as fake:
        guid = fake.add_contact({"email": "budget@example.com"})
        args = [str(outbox), fake.url, fake.api_key, str(RATE), guid, str(SECONDS)]
        workers = [await start_script(WORKER, *args) for _ in range(WORKERS)]
        try:
            for worker in workers:
                assert "ready" == await read_line(worker, PROCESS_TIMEOUT)
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.write(b"go\n")
                await worker.stdin.drain()
            said = [await read_line(worker, PROCESS_TIMEOUT) for worker in workers]
            statuses = [await asyncio.wait_for(w.wait(), PROCESS_TIMEOUT) for w in workers]
        finally:
            for worker in workers:
                await stop_process(worker)

        times = [r.time for r in fake.requests]
        # Slots come free together, so requests arrive in bursts a window apart: the span
        # from the first burst to the last, plus the last burst's window.
        throughput = len(times) / (max(times) - min(times) + shape(RATE).window)
        print(f"\n{WORKERS} processes: {len(times)} requests, {throughput:.1f}/s of {RATE}/s")

        answered = [int(line.split()[1]) for line in said if line.startswith("answered")]
        assert ([0] * WORKERS, WORKERS) == (statuses, len(answered)), said
        assert len(times) == sum(answered)
        assert fake.peak_rate(1.0) <= RATE
        assert all(answered), said  # nobody was starved
        assert throughput >= RATE / 2


HOLDER = SCRIPTS / "budget_holder.py"


@pytest.mark.slow
async def test_a_process_killed_holding_slots_and_the_lock_blocks_nobody_for_long(
    tmp_path: Path,
) -> None:
    """A process SIGKILLed while it holds three of five slots and the file's lock: the lock
    goes with it at once, the others use the two slots left, and the three are free once
    `_LONGEST_HOLD` has passed since they were taken (time moved by a clock, not waited).
    """
    path = tmp_path / "outbox.sqlite3.budget"
    holder = await start_script(HOLDER, str(path), *KEY_OF, "5", "3")
    try:
        line = await read_line(holder, PROCESS_TIMEOUT)
        assert line.startswith("locked "), line
        taken = float(line.split()[1])
        with path.open("rb") as probe:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.send_signal(signal.SIGKILL)
            await asyncio.wait_for(holder.wait(), PROCESS_TIMEOUT)
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
    finally:
        await stop_process(holder)

    # Time as the holder saw it when it took its slots; from there it is moved, not waited.
    clock = FakeClock(monotonic=taken)
    survivor = Budget(BudgetFile(path), KEY, 5.0, clock)
    try:
        meanwhile = use_all(survivor)
        clock.advance(_budget._LONGEST_HOLD - 1)
        almost = use_all(survivor)
        clock.advance(2)
        later = use_all(survivor)
    finally:
        survivor.release_user()

    assert ([3, 4], [3, 4], [0, 1, 2, 3, 4]) == (meanwhile, almost, later)
