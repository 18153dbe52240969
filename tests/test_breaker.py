"""The circuit breaker, on a fake clock."""

from __future__ import annotations

import pytest
from helpers import FakeClock

from engage_async._breaker import BreakerState, CircuitBreaker

THRESHOLD = 3
COOLDOWN = 30.0


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    """A fake clock; the breaker reads its monotonic time."""
    return FakeClock()


@pytest.fixture(name="breaker")
def breaker_fixture(clock: FakeClock) -> CircuitBreaker:
    """A closed breaker: 3 failures open it for 30 s."""
    return CircuitBreaker(THRESHOLD, COOLDOWN, clock=clock.monotonic)


def fail(breaker: CircuitBreaker, times: int) -> None:
    """Record `times` failures."""
    for _ in range(times):
        breaker.record_failure()


@pytest.fixture(name="opened")
def opened_fixture(breaker: CircuitBreaker) -> CircuitBreaker:
    """The breaker, opened by reaching the threshold."""
    fail(breaker, THRESHOLD)
    return breaker


def test_starts_closed(breaker: CircuitBreaker) -> None:
    """A new breaker lets every call through."""
    assert (BreakerState.CLOSED, True, True, 0.0) == (
        breaker.state,
        breaker.allow(),
        breaker.allow(),
        breaker.remaining_cooldown,
    )


def test_stays_closed_below_threshold(breaker: CircuitBreaker) -> None:
    """Fewer failures in a row than the threshold keep it closed."""
    fail(breaker, THRESHOLD - 1)

    assert (BreakerState.CLOSED, True) == (breaker.state, breaker.allow())


def test_opens_at_threshold(breaker: CircuitBreaker) -> None:
    """The threshold-th failure in a row opens the circuit: calls are refused."""
    fail(breaker, THRESHOLD)

    assert (BreakerState.OPEN, False) == (breaker.state, breaker.allow())


def test_success_resets_the_count(breaker: CircuitBreaker) -> None:
    """Failures must be in a row: a success in between starts the count again."""
    fail(breaker, THRESHOLD - 1)
    breaker.record_success()
    fail(breaker, THRESHOLD - 1)

    assert BreakerState.CLOSED == breaker.state


def test_threshold_of_one(clock: FakeClock) -> None:
    """With threshold 1 a single failure opens it."""
    breaker = CircuitBreaker(1, COOLDOWN, clock=clock.monotonic)

    breaker.record_failure()

    assert BreakerState.OPEN == breaker.state


def test_refuses_during_cooldown(opened: CircuitBreaker, clock: FakeClock) -> None:
    """Until the cool-down has passed, nothing goes out; remaining_cooldown counts down."""
    clock.advance(COOLDOWN - 0.001)

    assert (False, BreakerState.OPEN, pytest.approx(0.001)) == (
        opened.allow(),
        opened.state,
        opened.remaining_cooldown,
    )


def test_remaining_cooldown_when_just_opened(opened: CircuitBreaker) -> None:
    """Right after opening, the whole cool-down remains."""
    assert COOLDOWN == opened.remaining_cooldown


def test_after_cooldown_one_probe(opened: CircuitBreaker, clock: FakeClock) -> None:
    """After the cool-down exactly one call is let through, as a probe (half-open)."""
    clock.advance(COOLDOWN)

    assert ([True, False, False], BreakerState.HALF_OPEN, 0.0) == (
        [opened.allow(), opened.allow(), opened.allow()],
        opened.state,
        opened.remaining_cooldown,
    )


def test_probe_success_closes(opened: CircuitBreaker, clock: FakeClock) -> None:
    """A successful probe closes the circuit: everything goes out again."""
    clock.advance(COOLDOWN)
    assert opened.allow()

    opened.record_success()

    assert (BreakerState.CLOSED, True, True) == (opened.state, opened.allow(), opened.allow())


def test_closed_after_probe_needs_a_full_threshold_again(
    opened: CircuitBreaker, clock: FakeClock
) -> None:
    """After closing, it takes a full run of failures to open again."""
    clock.advance(COOLDOWN)
    opened.allow()
    opened.record_success()

    fail(opened, THRESHOLD - 1)

    assert BreakerState.CLOSED == opened.state


def test_probe_failure_reopens(opened: CircuitBreaker, clock: FakeClock) -> None:
    """A failed probe opens the circuit again, for a fresh cool-down."""
    clock.advance(COOLDOWN)
    assert opened.allow()
    clock.advance(5.0)

    opened.record_failure()

    assert (BreakerState.OPEN, False, COOLDOWN) == (
        opened.state,
        opened.allow(),
        opened.remaining_cooldown,
    )


def test_reopened_circuit_probes_again_after_cooldown(
    opened: CircuitBreaker, clock: FakeClock
) -> None:
    """After a failed probe and another cool-down, one more probe goes out."""
    clock.advance(COOLDOWN)
    opened.allow()
    opened.record_failure()
    clock.advance(COOLDOWN)

    assert [True, False] == [opened.allow(), opened.allow()]


def test_lost_probe_does_not_shut_the_circuit_for_good(
    opened: CircuitBreaker, clock: FakeClock
) -> None:
    """A probe that never reports back (its caller was cancelled) frees the way after a while."""
    clock.advance(COOLDOWN)
    assert opened.allow()
    clock.advance(COOLDOWN - 1.0)
    assert not opened.allow()
    clock.advance(1.0)

    assert [True, False] == [opened.allow(), opened.allow()]


def test_success_while_open_closes(opened: CircuitBreaker) -> None:
    """Any answer from Engage (a call that was already out) closes the circuit."""
    opened.record_success()

    assert (BreakerState.CLOSED, True) == (opened.state, opened.allow())
