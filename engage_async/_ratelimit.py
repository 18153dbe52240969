"""A client-side rate limiter: never more than `rate` requests in any one-second window.

Engage asks for under 50 requests a second per API key and answers 429 above 200. A token
bucket would allow bursts past the limit after an idle spell; a sliding window of the last
send times does not, which is what "never more in any one-second window" needs.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["RateLimiter"]

# The server sees our requests a little later than we send them, and not always evenly; a
# few milliseconds more than the window keeps its count within the limit too.
_SLACK = 0.005


class RateLimiter:
    """Admit at most `rate` calls per second, first come first served."""

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
        self._sent: deque[float] = deque(maxlen=self.capacity)
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()

    def _try_admit(self) -> float:
        """Admit now and return 0, or return how long to wait."""
        now = self._clock()
        if len(self._sent) < self.capacity:
            self._sent.append(now)
            return 0.0
        wait = self._sent[0] + self.window - now
        if wait <= 0:
            self._sent.append(now)  # the deque's maxlen drops the oldest
            return 0.0
        return wait

    async def acquire(self) -> None:
        """Wait until one more call fits in the window, then count it (first come, first in)."""
        # Always through the lock: a shortcut around it would let a newcomer take the slot a
        # waiter was about to get. An uncontended asyncio.Lock does not suspend.
        async with self._lock:
            while (wait := self._try_admit()) > 0:
                await self._sleep(wait)
