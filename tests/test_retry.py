"""Retry timing: interactive backoff with full jitter, and the background schedule."""

from __future__ import annotations

import itertools
import random

import pytest

from engage_async import _retry
from engage_async._retry import (
    BACKGROUND_JITTER,
    background_delay,
    half_jittered_delays,
    jittered_delays,
)

SCHEDULE = (10.0, 30.0, 60.0, 300.0)


class FixedRandom(random.Random):
    """A random source whose uniform(a, b) always lands at the same fraction of the span."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        """a + fraction * (b - a), recording the bounds asked for."""
        self.calls.append((a, b))
        return a + self.fraction * (b - a)


@pytest.fixture(name="no_jitter")
def no_jitter_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make full jitter return its ceiling, so the growth itself can be seen."""
    monkeypatch.setattr(_retry.backoff, "full_jitter", lambda value: value)


# --- interactive ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_jitter")
def test_interactive_ceilings_double_up_to_the_maximum() -> None:
    """The jitter ceiling starts at `initial`, doubles, and stays at `maximum`."""
    assert [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0] == list(
        itertools.islice(jittered_delays(0.1, 1.0), 7)
    )


@pytest.mark.usefixtures("no_jitter")
def test_interactive_initial_above_maximum_is_capped() -> None:
    """An initial delay larger than the maximum is capped from the first retry."""
    assert [0.5, 0.5, 0.5] == list(itertools.islice(jittered_delays(2.0, 0.5), 3))


def test_jittered_delays_never_end() -> None:
    """The generator gives as many delays as a caller asks for."""
    assert 1000 == len(list(itertools.islice(jittered_delays(0.01, 0.05), 1000)))


def test_jittered_delays_within_full_jitter_bounds() -> None:
    """Each delay lies in [0, min(initial * 2**n, maximum)], with real jitter."""
    random.seed(1234)
    ceilings = [min(0.1 * 2**n, 1.0) for n in range(12)]

    delays = list(itertools.islice(jittered_delays(0.1, 1.0), 12))

    assert [] == [
        (n, delay)
        for n, (delay, top) in enumerate(zip(delays, ceilings, strict=True))
        if not 0 <= delay <= top
    ]


def test_jittered_delays_are_jittered() -> None:
    """Two sequences differ: concurrent callers do not retry in lockstep."""
    random.seed(99)
    first = list(itertools.islice(jittered_delays(1.0, 1.0), 20))
    second = list(itertools.islice(jittered_delays(1.0, 1.0), 20))

    assert first != second


# --- background -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "base"), [(0, 10.0), (1, 30.0), (2, 60.0), (3, 300.0), (4, 300.0), (50, 300.0)]
)
def test_background_walks_the_schedule_and_stays_on_its_last_value(
    attempt: int, base: float
) -> None:
    """Attempt n waits schedule[n]; past the end it keeps waiting the last value."""
    assert base == background_delay(SCHEDULE, attempt, rng=FixedRandom(0.0))


def test_background_negative_attempt_is_the_first() -> None:
    """A negative attempt number is treated as the first."""
    assert 10.0 == background_delay(SCHEDULE, -3, rng=FixedRandom(0.0))


def test_background_jitter_only_adds() -> None:
    """Jitter is drawn from [0, base * BACKGROUND_JITTER] and added: the floor is never cut."""
    rng = FixedRandom(1.0)

    delay = background_delay(SCHEDULE, 1, rng=rng)

    assert (30.0 * (1 + BACKGROUND_JITTER), [(0.0, 30.0 * BACKGROUND_JITTER)]) == (
        delay,
        rng.calls,
    )


def test_background_delay_bounds_with_real_randomness() -> None:
    """With the default random source, every delay lies in [base, base * (1 + jitter)]."""
    random.seed(7)

    delays = [background_delay(SCHEDULE, attempt % 6) for attempt in range(200)]

    assert [] == [
        (attempt, delay)
        for attempt, delay in enumerate(delays)
        if not (
            SCHEDULE[min(attempt % 6, 3)]
            <= delay
            <= SCHEDULE[min(attempt % 6, 3)] * (1 + BACKGROUND_JITTER)
        )
    ]


def test_background_single_step_schedule() -> None:
    """A one-value schedule waits that value every time."""
    assert [5.0, 5.0, 5.0] == [
        background_delay((5.0,), attempt, rng=FixedRandom(0.0)) for attempt in range(3)
    ]


def test_half_jittered_delays_stay_within_the_upper_half_of_each_step() -> None:
    """After a 429 the waits double from 0.5 s and are never below half their step, so three
    of them outlast Engage's one-second window whatever the jitter drew.
    """
    for _ in range(200):
        delays = list(itertools.islice(half_jittered_delays(0.5, 4.0), 5))
        steps = [0.5, 1.0, 2.0, 4.0, 4.0]
        assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
        assert sum(delays[:3]) >= 1.75
