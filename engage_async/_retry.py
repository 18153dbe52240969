"""How long to wait before trying again: pure math, apart from the one place that sleeps.

Interactive calls back off exponentially with full jitter, the `backoff` package's
formula. That package is used only here, so it can be swapped without touching callers.
Background work (the flusher) follows Engage's retry policy instead: long, growing intervals
(10 s, 30 s, 60 s, 300 s, ...) with a little jitter on top, so that many clients coming back
after an outage do not all knock at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import backoff

__all__ = ["background_delay", "half_jittered_delays", "jittered_delays"]

# Jitter added on top of a background interval, as a fraction of it: a floor is never
# undercut (Engage asks for "as late as possible"), only spread out.
BACKGROUND_JITTER = 0.2


def jittered_delays(initial: float, maximum: float) -> Iterator[float]:
    """Delays before the 2nd, 3rd, ... attempt: ``U(0, min(initial * 2**n, maximum))``."""
    growth = backoff.expo(base=2, factor=initial, max_value=maximum)
    next(growth)  # backoff's generators yield None first, to be primed
    for ceiling in growth:
        yield backoff.full_jitter(ceiling)


def half_jittered_delays(initial: float, maximum: float) -> Iterator[float]:
    """Delays ``U(d / 2, d)`` for ``d = min(initial * 2**n, maximum)``: spread out, but never
    much shorter than `d` (after a 429 the wait must outlast the tenant's window).
    """
    growth = backoff.expo(base=2, factor=initial, max_value=maximum)
    next(growth)
    for ceiling in growth:
        yield ceiling / 2 + backoff.full_jitter(ceiling / 2)


def background_delay(
    schedule: Sequence[float], attempt: int, *, rng: random.Random | None = None
) -> float:
    """The wait after the `attempt`-th failure (0-based) of background work.

    Walks `schedule` and stays on its last value; adds up to `BACKGROUND_JITTER` on top.
    """
    base = schedule[min(max(attempt, 0), len(schedule) - 1)]
    uniform = (rng or random).uniform
    return base + uniform(0.0, base * BACKGROUND_JITTER)
