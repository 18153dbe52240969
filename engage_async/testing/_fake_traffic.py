"""What reaches the simulator and what it does to it: recorded requests, faults, rate windows."""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import json
from collections.abc import Sequence
from typing import Any, Final, Literal, get_args

import attrs
from multidict import CIMultiDictProxy

FaultKind = Literal[
    "hang",
    "slow",
    "server_error",
    "status",
    "rate_limited",
    "create_timeout",
    "lost_reply",
    "drop",
    "being_created",
]
FAULT_KINDS: Final = frozenset(get_args(FaultKind))
# Kinds that only make sense for a single contact create, and so only ever match one.
CREATE_ONLY_KINDS: Final = frozenset({"create_timeout", "being_created"})


@attrs.frozen
class RecordedRequest:
    """One request as it reached the simulator.

    `query` holds decoded values (the first of repeated keys); `raw_query` is the query string
    exactly as sent, still percent-encoded. `fault` names the injected fault that hit the
    request, if any. `time` is `time.monotonic()` on arrival. The repr leaves out the query,
    headers and body: they carry the api key and personal data.
    """

    method: str
    path: str
    query: dict[str, str] = attrs.field(repr=False)
    raw_query: str = attrs.field(repr=False)
    headers: CIMultiDictProxy[str] = attrs.field(repr=False)
    body: bytes = attrs.field(repr=False)
    fault: str | None
    time: float

    def json(self) -> Any:
        """Return the body decoded as JSON (`json.JSONDecodeError` if it is not JSON)."""
        return json.loads(self.body)


@attrs.define(eq=False)
class Fault:
    """An injected misbehaviour, armed until removed or until it has hit `times` requests.

    Made by `FakeEngage.inject`, which documents the kinds. `hits` counts the requests it hit.
    """

    kind: FaultKind
    method: str | None = None
    path: str | None = None
    times: int | None = None
    delay: float = 1.0
    status: int = 502
    retry_after: float | None = None
    body: object = attrs.field(default=None, repr=False)
    content_type: str | None = None
    hits: int = attrs.field(default=0, init=False)
    # Set when the fault is removed (or the fake closes): cuts the requests a hang holds.
    released: asyncio.Event = attrs.field(factory=asyncio.Event, init=False, repr=False)

    @property
    def armed(self) -> bool:
        """Whether the fault still hits matching requests."""
        return not self.released.is_set() and (self.times is None or self.hits < self.times)

    def matches(self, method: str, path: str, *, single_create: bool) -> bool:
        """Tell whether a request with this method and URL path is one this fault hits."""
        if self.kind in CREATE_ONLY_KINDS and not single_create:
            return False
        if self.method is not None and self.method != method:
            return False
        return self.path is None or fnmatch.fnmatchcase(path, self.path)


@attrs.define
class RateWindow:
    """A sliding window of admitted request times, per api key.

    A request is admitted while fewer than `limit` requests were admitted in the second
    before it; refused requests do not count, so a client that backs off gets through again.
    """

    span: float = 1.0
    _admitted: dict[str, collections.deque[float]] = attrs.field(factory=dict, init=False)

    def admit(self, key: str, at: float, limit: float) -> bool:
        """Admit (and count) a request at time `at`, or return False if it is over `limit`."""
        times = self._window(key, at)
        if len(times) >= limit:
            return False
        times.append(at)
        return True

    def used(self, key: str, at: float) -> int:
        """Return how many requests were admitted in the span before time `at`."""
        return len(self._window(key, at))

    def _window(self, key: str, at: float) -> collections.deque[float]:
        times = self._admitted.setdefault(key, collections.deque())
        while times and at - times[0] >= self.span:
            times.popleft()
        return times


def peak_rate(times: Sequence[float], window: float) -> int:
    """Return the most of `times` (ascending) that fall in any half-open window of that length."""
    if window <= 0:
        raise ValueError("window must be positive")
    best = 0
    start = 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
