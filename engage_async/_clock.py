"""Time, injected: the wall clock, a monotonic clock, and sleeping.

Everything in the package that reads the time or waits goes through a `Clock`, so tests move
time instead of sleeping, and can make the wall clock jump. The monotonic clock never jumps;
the wall clock is what rows are stamped with and what people read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import attrs

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "wait_for_event"]


class Clock(Protocol):
    """Where the package gets the time from and how it waits."""

    def wall(self) -> float:
        """Seconds since the epoch; may jump when the system clock is set."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary start; never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` (on the monotonic clock)."""
        ...


@attrs.frozen
class SystemClock:
    """The real clocks and `asyncio.sleep`."""

    def wall(self) -> float:
        """`time.time()`."""
        return time.time()

    def monotonic(self) -> float:
        """`time.monotonic()`."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """`asyncio.sleep(seconds)`."""
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


async def wait_for_event(clock: Clock, event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds passed on `clock`; True if it was set."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(clock.sleep(timeout))
    try:
        await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, sleeper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return event.is_set()
