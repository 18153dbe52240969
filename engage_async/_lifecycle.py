"""The open/closed state every resource of the package goes through, and its guard.

A session, a flusher or an admin is made, opened once, used, and closed once; a closed one
is never opened again (as httpx's clients). The messages say what to do about misuse.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Lifecycle"]


class Lifecycle:
    """Tracks ``new`` -> ``open`` -> ``closed`` for the object named `what`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.state: Literal["new", "open", "closed"] = "new"

    def opening(self) -> None:
        """Called first thing in ``open()``.

        Raises:
            RuntimeError: it was opened before.
        """
        if self.state != "new":
            raise RuntimeError(f"this {self.what} is {self.state}; make a new one")

    def opened(self) -> None:
        """Called once ``open()`` succeeded."""
        self.state = "open"

    def closing(self) -> bool:
        """Called first thing in ``close()``: False if it was already closed (nothing to do)."""
        if self.state == "closed":
            return False
        self.state = "closed"
        return True

    def check_open(self) -> None:
        """Raises RuntimeError unless the object is open."""
        if self.state != "open":
            what = "not open yet (use `async with`)" if self.state == "new" else "closed"
            raise RuntimeError(f"this {self.what} is {what}")

    @property
    def closed(self) -> bool:
        """True once closing began."""
        return self.state == "closed"
