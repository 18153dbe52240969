"""A client-side rate limiter: never more than `rate` requests in any one-second window, as
Engage counts them.

Engage asks for under 50 requests a second per API key and answers 429 above 200. Engage
counts requests when they arrive, and we cannot know when that is: a request on a new
connection waits for its handshake, one on a kept-alive connection leaves at once. Counting
them when they are admitted would let a burst's slow first half and fast second half arrive
within one second. So each call holds one of `capacity` slots from admission until its answer
(or failure), and a slot is free again one window after that: the request that reuses it
arrives after the earlier one's answer, which came after the earlier one arrived.

A token bucket would allow bursts past the limit after an idle spell; these slots do not.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["RateLimiter"]

# A few milliseconds more than the window absorb the clock's and the network's jitter.
_SLACK = 0.005


class RateLimiter:
    """Admit at most `rate` calls per second, first come first served.

    Every `acquire` that returns must be matched by one `release` once the call is over.
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not rate > 0:
            raise ValueError("rate: must be greater than 0")
        # Below one a second, one call per 1/rate seconds keeps every one-second window within
        # the rate; above, floor(rate) per second does.
        self.capacity = max(1, math.floor(rate))
        self.window = (1.0 if rate >= 1 else 1.0 / rate) + _SLACK
        self._never_used = self.capacity
        # When each slot used before was given back, oldest first. Slots in use are not here.
        self._free: deque[float] = deque()
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._slot_returned = asyncio.Event()

    @property
    def in_use(self) -> int:
        """How many admitted calls have not been released yet."""
        return self.capacity - self._never_used - len(self._free)

    def _try_admit(self) -> float | None:
        """Take a slot and return 0, return how long to wait for the oldest free slot, or
        None when every slot is in use.
        """
        if self._never_used:
            self._never_used -= 1
            return 0.0
        if not self._free:
            return None
        wait = self._free[0] + self.window - self._clock()
        if wait <= 0:
            self._free.popleft()
            return 0.0
        return wait

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody is waiting; never waits."""
        if self._lock.locked():
            return False  # someone is waiting: first come, first in
        return self._try_admit() == 0

    async def acquire(self) -> None:
        """Wait until a call fits in the window, then take its slot (first come, first in)."""
        # Always through the lock: a shortcut around it would let a newcomer take the slot a
        # waiter was about to get. An uncontended asyncio.Lock does not suspend. Nothing awaits
        # between taking a slot and returning, so a cancelled acquire never keeps one.
        async with self._lock:
            while (wait := self._try_admit()) != 0:
                if wait is None:
                    self._slot_returned.clear()
                    await self._slot_returned.wait()
                else:
                    await self._sleep(wait)

    def release(self) -> None:
        """The call is over (answered or failed): its slot is free one window from now."""
        if self.in_use <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._free.append(self._clock())
        self._slot_returned.set()
