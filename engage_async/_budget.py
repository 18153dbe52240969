"""One request budget per Engage API key, shared by every session and flusher on one host.

Engage counts requests per API key and asks for fewer than 50 a second. An app runs several
workers, an in-app flusher, a sidecar, all with one key, so the budget cannot belong to an
object or a process. It lives in a small file beside the outbox (``<outbox>.budget``), which
every process that uses the outbox maps into memory, and where a restarted process finds it
as the others left it.

The budget is a set of *slots*, ``rate_limit`` of them per second: a request holds a slot
from the moment it may go until its answer (or failure), and the slot is free again one
window after that. Engage counts requests as they arrive, which we cannot observe; but a
request that reuses a slot arrives after the earlier one's answer, and so after the earlier
one arrived, plus a window: however late a request leaves (a new connection's handshake),
no one-second window of arrivals holds more requests than there are slots.

Interactive calls come first: the flusher may take a slot only while more than
`INTERACTIVE_RESERVE` are free, so a till never waits behind a draining backlog.

After a 429, every process slows together: the usable share of the slots (`scale`) is halved,
and grows back slowly while answers are good (`after_good_answer`), so a `rate_limit` above
what the tenant allows still drains.

Time is the host's monotonic clock, which every process on one host shares and which never
jumps; after a reboot it starts again, and a time stored further ahead than any legitimate
one is treated as past. The slot rules are pure functions over a `Record`; `BudgetFile` is
the one place that keeps records, under an exclusive `flock` held for a few microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import math
import mmap
import os
import threading
from array import array
from collections.abc import Callable, Iterator, MutableSequence
from enum import IntEnum
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import attrs

from ._clock import Clock, wait_for_event
from ._metrics import NO_METRICS, Metrics

__all__ = [
    "Budget",
    "BudgetFile",
    "Pacer",
    "Permit",
    "Priority",
    "Record",
    "Shape",
    "SharedBudget",
    "Slots",
    "settle",
    "shape",
]

log = logging.getLogger(__name__)

# Slots the flusher leaves to interactive calls.
INTERACTIVE_RESERVE: Final = 2
# The most slots a key keeps; above this many requests a second the window shrinks instead.
MAX_SLOTS: Final = 256
# Half a percent more than the window (5 ms of a second) absorbs the clocks' and the
# network's jitter.
_SLACK: Final = 0.005
# A slot held longer than this belongs to a process that died with a request out.
_LONGEST_HOLD: Final = 600.0
# Processes read the monotonic clock before they take the file's lock, so one may see a time
# another wrote a moment "ahead". A time further ahead than this (beyond the window a free
# time may be set ahead by) was written by another boot, whose clock ran further: past.
_CLOCK_DISAGREEMENT: Final = 1.0
# After a 429: the share of slots in use is cut by this factor, at most once a window...
_CUT: Final = 0.5
_LOWEST_SCALE: Final = 0.05
# ...and grows back by this share of the full rate per second while answers are good: a
# halving is undone in 50 s, the floor in about 95 s. By time, not by answers: at 40 answers
# a second a per-answer step would undo a cut in seconds and meet the next 429 at once.
_RECOVERY_PER_SECOND: Final = 0.01
# When no slot can be known to free (all are held), look again this soon.
_POLL: Final = 0.01


class Priority(IntEnum):
    """Who is asking: a caller waiting on an answer, or background work."""

    INTERACTIVE = 0
    BACKGROUND = 1


@attrs.frozen
class Shape:
    """How a rate becomes slots: `slots` of them, each free `window` seconds after use."""

    slots: int
    window: float


def shape(rate: float) -> Shape:
    """The slots for `rate` requests a second: one slot per request a second, reusable a
    second after its answer; above `MAX_SLOTS` a second, `MAX_SLOTS` slots each reusable
    several times a second; below one a second, one slot every ``1 / rate`` seconds. Windows
    carry `_SLACK` on top.
    """
    if not rate > 0:
        raise ValueError("rate: must be greater than 0")
    if rate < 1:
        return Shape(1, (1.0 / rate) * (1 + _SLACK))
    slots = min(math.floor(rate), MAX_SLOTS)
    # Each slot may serve `uses` requests a second: their spacing keeps any one-second
    # window at `uses` or fewer per slot, so at `rate` or fewer in all.
    uses = math.floor(rate / slots)
    return Shape(slots, (1.0 / uses) * (1 + _SLACK))


@attrs.define
class Pacer:
    """Spaces one process's background requests at least ``window / slots`` apart.

    Slots alone let a flusher that finds them all free take every one but the reserve at
    once; they all free again a window later, together, and an interactive call arriving
    after the reserve is used waits for that moment (measured: 160-210 ms when an in-app
    flusher started on a backlog). Spaced, background slots free one at a time, so an
    interactive call waits at most one spacing. The pace is the budget's full rate, which the
    slots already cap, so a drain is no slower.
    """

    next_at: float = -math.inf

    def wait(self, priority: Priority, now: float) -> float:
        """Seconds before a request of `priority` may take a slot (0: now)."""
        if priority is Priority.INTERACTIVE:
            return 0.0
        return max(0.0, self.next_at - now)

    def took(self, priority: Priority, now: float, shape: Shape) -> None:
        """A request of `priority` took a slot at `now`."""
        if priority is Priority.BACKGROUND:
            self.next_at = now + shape.window / shape.slots


class Slots(Protocol):
    """A key's slots and pace, as every process sees them (`Record`, or a view of the file).

    Each slot holds a time: ``>= 0`` it is free from then on; ``< 0`` it is held, taken at
    ``-t - 1``. `scale` is the share of the slots in use after 429s.
    """

    slots: MutableSequence[float]
    scale: float
    last_cut: float
    rate_warned: bool
    blocked_until: float
    # The longest window any process on the key frees a slot after (rates may differ).
    window: float
    # When the share last grew back after a cut.
    last_grown: float


@attrs.define
class Record:
    """`Slots` in memory (for tests and for reasoning; the file has its own view)."""

    slots: MutableSequence[float]
    scale: float = 1.0
    last_cut: float = -math.inf
    rate_warned: bool = False
    blocked_until: float = 0.0
    window: float = 1.0 + _SLACK
    last_grown: float = -math.inf


def usable(record: Slots) -> int:
    """How many slots are in use at the current scale (never fewer than one)."""
    return max(1, min(len(record.slots), math.floor(len(record.slots) * record.scale)))


def _free_at(value: float, now: float, window: float) -> float | None:
    """When a slot is free (None while a live request holds it).

    Times from another boot (the budget file outlives a reboot, the monotonic clock does
    not) are past: a slot is never freed more than a window ahead, nor taken in the future.
    """
    if value >= 0:
        return now if value - now > window + _CLOCK_DISAGREEMENT else value
    taken = -value - 1
    if taken - now > _CLOCK_DISAGREEMENT or now - taken > _LONGEST_HOLD:
        return now  # another boot's, or its holder died with the request out
    return None


def take(record: Slots, now: float, priority: Priority) -> tuple[int | None, float]:
    """Take a free slot for a request going now: (its index, 0.0); or (None, seconds until it
    is worth looking again).

    Background work takes a slot only while more than `INTERACTIVE_RESERVE` are free.
    """
    if now < record.blocked_until <= now + _LONGEST_HOLD + _CLOCK_DISAGREEMENT:
        return None, record.blocked_until - now  # Engage asked everyone to wait (Retry-After)
    count = usable(record)
    slots = record.slots
    window = record.window
    needed = 1
    if priority is Priority.BACKGROUND:
        needed += min(INTERACTIVE_RESERVE, count - 1)
    found: list[int] = []
    # The common case, with slots to spare, stops at the first few.
    for index in range(count):
        value = slots[index]
        if 0 <= value <= now or ((at := _free_at(value, now, window)) is not None and at <= now):
            found.append(index)
            if len(found) >= needed:
                slots[found[0]] = -now - 1
                return found[0], 0.0
    upcoming = sorted(
        at
        for value in slots[:count]
        if (at := _free_at(value, now, window)) is not None and at > now
    )
    missing = needed - len(found)
    if len(upcoming) >= missing:
        return None, max(_POLL / 10, upcoming[missing - 1] - now)
    return None, _POLL


def give_back(record: Slots, index: int, taken: float, now: float, window: float) -> None:
    """The request in slot `index` (taken at `taken`) is over: free one window from now.

    Nothing happens if the slot was meanwhile judged abandoned and taken by someone else.
    """
    if index < len(record.slots) and record.slots[index] == -taken - 1:
        record.slots[index] = now + window


def after_rate_limited(
    record: Slots, now: float, window: float, retry_after: float | None = None
) -> bool:
    """Engage answered 429: use half the slots (once a window), and when it said how long,
    nobody sends before then; True if this cut the share.
    """
    if retry_after is not None and retry_after > 0:
        record.blocked_until = max(record.blocked_until, now + min(retry_after, _LONGEST_HOLD))
    if now - record.last_cut < window:
        return False
    record.scale = max(_LOWEST_SCALE, record.scale * _CUT)
    record.last_cut = now
    return True


def after_good_answer(record: Slots, now: float) -> None:
    """An answer that was not a 429: grow the share of slots back towards all of them, by
    `_RECOVERY_PER_SECOND` for each second since the cut or the last growth.
    """
    if record.scale >= 1.0:
        return
    since = max(record.last_cut, record.last_grown)
    if since > now + _CLOCK_DISAGREEMENT:
        # Written by another boot: the recovery counts from now.
        record.last_cut = record.last_grown = since = now
    if now > since:
        record.scale = min(1.0, record.scale + (now - since) * _RECOVERY_PER_SECOND)
        record.last_grown = now


def settle(
    record: Slots,
    permit: Permit,
    now: float,
    window: float,
    *,
    rate_limited: bool,
    retry_after: float | None,
) -> bool:
    """A request is over: its slot goes back, and the answer moves the pace (a 429 cuts it,
    anything else lets it grow back). True when this is the key's first cut, which the
    caller reports once: the setting is higher than the tenant allows.
    """
    give_back(record, permit.index, permit.taken, now, window)
    if not rate_limited:
        after_good_answer(record, now)
        return False
    cut = after_rate_limited(record, now, window, retry_after)
    warn = cut and not record.rate_warned
    record.rate_warned = record.rate_warned or cut
    return warn


# --- the file ------------------------------------------------------------------------------

_MAGIC: Final = b"EABUDGT2"
_KEYS: Final = 8
_KEY_BYTES: Final = 16
# After the key, eight doubles of pace (slot count, scale, last cut, warned, blocked until,
# window, last grown, 1 spare), then the slot times: all 8-byte aligned, so the file is read
# in place as doubles.
_META: Final = 8
_RECORD_BYTES: Final = _KEY_BYTES + 8 * (_META + MAX_SLOTS)
_SIZE: Final = 64 + _KEYS * _RECORD_BYTES
_T = TypeVar("_T")


class _FileRecord:
    """`Slots` read and written in place in the mapped file (no copy per request)."""

    def __init__(self, doubles: Any, count: int) -> None:
        # A memoryview cast to doubles (typeshed types memoryview items as ints).
        self._doubles = doubles
        self.slots: MutableSequence[float] = doubles[_META : _META + count]

    def release(self) -> None:
        """Let go of the view of the file."""
        self.slots.release()  # type: ignore[attr-defined]

    @property
    def scale(self) -> float:
        value = float(self._doubles[1])
        return value if 0 < value <= 1 else 1.0

    @scale.setter
    def scale(self, value: float) -> None:
        self._doubles[1] = value

    @property
    def last_cut(self) -> float:
        return float(self._doubles[2])

    @last_cut.setter
    def last_cut(self, value: float) -> None:
        self._doubles[2] = value

    @property
    def rate_warned(self) -> bool:
        return bool(self._doubles[3] != 0)

    @rate_warned.setter
    def rate_warned(self, value: bool) -> None:
        self._doubles[3] = float(value)

    @property
    def blocked_until(self) -> float:
        return float(self._doubles[4])

    @blocked_until.setter
    def blocked_until(self, value: float) -> None:
        self._doubles[4] = value

    @property
    def last_grown(self) -> float:
        return float(self._doubles[6])

    @last_grown.setter
    def last_grown(self, value: float) -> None:
        self._doubles[6] = value

    @property
    def window(self) -> float:
        value = float(self._doubles[5])
        return value if value > 0 else 1.0 + _SLACK

    @window.setter
    def window(self, value: float) -> None:
        self._doubles[5] = value


class BudgetFile:
    """Records of up to eight keys in a file every process maps, changed under `flock`.

    The lock is held only while a record is read and changed in place (microseconds), so
    taking it on the event loop's thread costs less than handing the work to another thread.
    A process that dies holding it drops it with its descriptor.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is None:
            # This process alone (a probe that must not create files): memory, no lock.
            self._fd = -1
            self._map = mmap.mmap(-1, _SIZE)
            self._map[: len(_MAGIC)] = _MAGIC
        else:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            self._fd = os.open(path, os.O_RDWR)
            try:
                with self._locked():
                    if os.fstat(self._fd).st_size < _SIZE:
                        os.ftruncate(self._fd, _SIZE)
                    self._map = mmap.mmap(self._fd, _SIZE)
                    if self._map[: len(_MAGIC)] != _MAGIC:
                        self._map[:_SIZE] = _MAGIC + bytes(_SIZE - len(_MAGIC))
            except BaseException:
                os.close(self._fd)
                raise
        self._view = memoryview(self._map)
        # key -> (its bytes in the file, its doubles, views by slot count): made once.
        self._records: dict[bytes, tuple[Any, Any, dict[int, _FileRecord]]] = {}
        # flock excludes other processes; threads of this one (several event loops) need
        # their own lock.
        self._thread_lock = threading.Lock()
        self._mixed_rates: set[bytes] = set()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._fd < 0:
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def change(self, key: bytes, shape: Shape, change: Callable[[Slots], _T]) -> _T:
        """Run `change` on the record of `key` as seen at `shape` (its slots free if new),
        atomically across processes.
        """
        with self._thread_lock:
            if self._fd < 0:
                return change(self._record(key, shape))
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                return change(self._record(key, shape))
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _record(self, key: bytes, shape: Shape) -> _FileRecord:
        slots = shape.slots
        cached = self._records.get(key)
        # Another process may have moved the key (a ninth key reusing the first record).
        if cached is None or cached[0] != key:
            offset = self._find(key)
            doubles: Any = self._view[offset + _KEY_BYTES : offset + _RECORD_BYTES].cast("d")
            cached = (self._view[offset : offset + _KEY_BYTES], doubles, {})
            self._records[key] = cached
        _, doubles, views = cached
        if doubles[0] == 0:
            # New: every slot free.
            doubles[0 : _META + MAX_SLOTS] = array("d", [slots] + [0.0] * (_META - 1 + MAX_SLOTS))
            doubles[5] = shape.window
        elif doubles[0] != slots or doubles[5] < shape.window:
            # Another process runs the key at another rate. Each uses the first slots of one
            # array as many as its rate gives, so together they never exceed the higher rate;
            # the slots in use are kept as they are.
            if key not in self._mixed_rates:
                self._mixed_rates.add(key)
                log.warning(
                    "processes on this outbox use different rate_limit values for one Engage "
                    "key; together they keep to the highest. Set one value everywhere."
                )
            doubles[0] = max(doubles[0], slots)
            doubles[5] = max(doubles[5], shape.window)
        record = views.get(slots)
        if record is None:
            record = views[slots] = _FileRecord(doubles, slots)
        return record

    def _find(self, key: bytes) -> int:
        empty: int | None = None
        for number in range(_KEYS):
            offset = 64 + number * _RECORD_BYTES
            stored = bytes(self._view[offset : offset + _KEY_BYTES])
            if stored == key:
                return offset
            if empty is None and stored == bytes(_KEY_BYTES):
                empty = offset
        # Eight keys share this outbox already: the first record is reused.
        offset = 64 if empty is None else empty
        self._view[offset : offset + _KEY_BYTES] = key
        self._view[offset + _KEY_BYTES : offset + _KEY_BYTES + 8] = bytes(8)
        return offset

    def close(self) -> None:
        """Unmap and close the file (every view of it is let go first: a mapping with
        views left cannot be closed).
        """
        for key_bytes, doubles, views in self._records.values():
            for record in views.values():
                record.release()
            doubles.release()
            key_bytes.release()
        self._records.clear()
        self._view.release()
        self._map.close()
        if self._fd >= 0:
            os.close(self._fd)


def budget_key(base_url: str, api_key: str) -> bytes:
    """The record of an Engage tenant and key: a hash, so the file never holds the key."""
    return hashlib.sha256(f"{base_url}\n{api_key}".encode()).digest()[:_KEY_BYTES]


@attrs.frozen
class Permit:
    """A slot taken for one request; give it back with `Budget.release`."""

    index: int
    taken: float


_B = TypeVar("_B", bound="SharedBudget")


class SharedBudget:
    """What every budget of one Engage key in this process does, wherever its slots live
    (`Budget`: a file on this host; `_pg_budget.PgBudget`: a database row for every host):
    callers wait in turn per priority, background requests are paced, users are counted.

    A subclass says how a slot is taken (`_attempt`) and given back (`release`).
    """

    # How the first 429's warning names who slows down.
    _who_slows = "every process on the outbox"

    def __init__(self, key: bytes, rate: float, clock: Clock, on_close: Callable[[], None]) -> None:
        self.rate = rate
        self.shape = shape(rate)
        self._key = key
        self._clock = clock
        self._on_close = on_close
        self._users = 0
        self._turns = {priority: asyncio.Lock() for priority in Priority}
        self._returned = asyncio.Event()
        self._pacer = Pacer()

    @classmethod
    def _one_per(
        cls,
        registry: dict[Any, _B],
        place: tuple[Any, ...],
        rate: float,
        make: Callable[[Callable[[], None]], _B],
    ) -> _B:
        """The budget `registry` keeps for `place` (with this event loop: asyncio locks belong
        to one loop), made by `make(forget)` on first use, with one more user. A second user
        asking for another rate: the lower one wins (either may be the one that knows the
        tenant's limit), with a warning.
        """
        registry_key = (*place, id(asyncio.get_running_loop()))
        budget = registry.get(registry_key)
        if budget is None:

            def forget() -> None:
                registry.pop(registry_key, None)

            budget = registry[registry_key] = make(forget)
        elif rate < budget.rate:
            log.warning("two rate_limit values for one Engage key in this process; using %g", rate)
            budget.rate, budget.shape = rate, shape(rate)
        budget._users += 1
        return budget

    async def _attempt(self, priority: Priority) -> tuple[Permit | None, float]:
        """A slot now, or (None, seconds until it is worth looking again)."""
        raise NotImplementedError

    async def acquire(
        self, priority: Priority, *, within: float | None = None, metrics: Metrics = NO_METRICS
    ) -> Permit | None:
        """Wait for a slot; None (and no slot) when none can be had within `within` seconds.
        The wait is reported to `metrics`.
        """
        started = self._clock.monotonic()
        deadline = None if within is None else started + within
        async with self._turns[priority]:
            while True:
                permit, wait = await self._attempt(priority)
                now = self._clock.monotonic()
                if permit is not None:
                    metrics.rate_limit_wait(priority, now - started, admitted=True)
                    return permit
                if deadline is not None and now + wait > deadline:
                    metrics.rate_limit_wait(priority, now - started, admitted=False)
                    return None
                # A slot given back in this process wakes the waiter at once; one given back
                # elsewhere is found when the wait is over.
                self._returned.clear()
                await wait_for_event(self._clock, self._returned, wait)

    def _warn_too_high(self) -> None:
        log.warning(
            "Engage answered 429 at rate_limit=%g: it is higher than this tenant allows; "
            "slowing down for %s",
            self.rate,
            self._who_slows,
        )


class Budget(SharedBudget):
    """The request budget of one Engage key in this process, drawn from a shared file.

    Shared by every transport of the process with the same tenant, key and file, on one event
    loop (`Budget.shared`). Within a priority, callers go first come, first served.
    """

    def __init__(
        self,
        store: BudgetFile,
        key: bytes,
        rate: float,
        clock: Clock,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(key, rate, clock, on_close)
        self._store = store

    # One per tenant, key, file and event loop in this process (processes and loops meet in
    # the file).
    _registry: dict[tuple[str, bytes, str, int], Budget] = {}  # noqa: RUF012 - on purpose

    @classmethod
    def shared(
        cls, *, base_url: str, api_key: str, rate: float, store_path: Path | None, clock: Clock
    ) -> Budget:
        """The budget for this tenant and key in this file, made on first use.

        Two different rates for one key: the lower is kept (either user may be the one that
        knows the tenant's limit), with a warning.

        Raises:
            OSError: the file cannot be opened.
        """
        key = budget_key(base_url, api_key)
        where = "" if store_path is None else str(Path(store_path).resolve())
        return cls._one_per(
            cls._registry,
            (base_url, key, where),
            rate,
            lambda forget: cls(
                BudgetFile(Path(where) if where else None), key, rate, clock, forget
            ),
        )

    def release_user(self) -> None:
        """One user is done with the budget; the last one closes its file."""
        self._users -= 1
        if self._users <= 0:
            self._on_close()
            self._store.close()

    async def leave(self) -> None:
        """`release_user`, as the transport calls it (a shared database budget waits there
        for its slots to go back).
        """
        self.release_user()

    def _take(self, priority: Priority) -> tuple[Permit | None, float]:
        now = self._clock.monotonic()
        paced = self._pacer.wait(priority, now)
        if paced > 0:
            return None, paced

        def change(record: Slots) -> tuple[int | None, float]:
            return take(record, now, priority)

        index, wait = self._store.change(self._key, self.shape, change)
        if index is None:
            return None, wait
        self._pacer.took(priority, now, self.shape)
        return Permit(index, now), wait

    def try_acquire(self, priority: Priority) -> Permit | None:
        """A slot now if one is free and nobody of this priority waits; never waits."""
        if self._turns[priority].locked():
            return None
        return self._take(priority)[0]

    async def _attempt(self, priority: Priority) -> tuple[Permit | None, float]:
        return self._take(priority)

    def release(
        self, permit: Permit, *, rate_limited: bool = False, retry_after: float | None = None
    ) -> None:
        """The request is over (answered or failed); `rate_limited` if Engage said 429, with
        `retry_after` seconds when it said how long to wait.
        """
        now = self._clock.monotonic()
        window = self.shape.window

        def change(record: Slots) -> bool:
            return settle(
                record, permit, now, window, rate_limited=rate_limited, retry_after=retry_after
            )

        if self._store.change(self._key, self.shape, change):
            self._warn_too_high()
        self._returned.set()
