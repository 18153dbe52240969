"""A circuit breaker: after repeated failures, stop trying the network for a while.

When Engage is down, every interactive write would otherwise wait for its own timeout before
being queued. After `threshold` failures in a row the circuit opens: calls skip the network
(writes go straight to the outbox) for `cooldown` seconds. Then one call is let through as a
probe; its success closes the circuit, its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    """Where the breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts failures in a row and decides whether the next call may touch the network."""

    def __init__(
        self, threshold: int, cooldown: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None
        self.state = BreakerState.CLOSED

    def allow(self) -> bool:
        """May a call go out now? In half-open state only one probe is out at a time."""
        if self.state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if self.state is BreakerState.OPEN:
            if now - self._opened_at < self.cooldown:
                return False
            self.state = BreakerState.HALF_OPEN
        # A probe that never reported back (its caller was cancelled) must not keep the
        # circuit shut for good: after a cool-down another call may probe.
        if self._probe_started is not None and now - self._probe_started < self.cooldown:
            return False
        self._probe_started = now
        return True

    def record_success(self) -> None:
        """Engage answered (any status): close the circuit."""
        self._failures = 0
        self._probe_started = None
        self.state = BreakerState.CLOSED

    def record_failure(self) -> None:
        """No usable answer: count it, and open the circuit at the threshold."""
        self._failures += 1
        self._probe_started = None
        if self.state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
            self.state = BreakerState.OPEN
            self._opened_at = self._clock()

    @property
    def remaining_cooldown(self) -> float:
        """Seconds until a probe may go out (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.cooldown - (self._clock() - self._opened_at))
