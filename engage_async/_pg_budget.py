"""The request budget of an Engage key, shared through the PostgreSQL outbox by every host.

The same slots and the same rules as the budget file (`_budget`: `take`, `give_back`,
`after_rate_limited`, `after_good_answer` over a `Slots` record), kept in one row per key in
``<schema>.budgets`` (the key's hash, the slot times as a ``float8[]``) and changed under
``SELECT ... FOR UPDATE`` in one short transaction. The times are the database server's
(``<schema>.clock()``), so every process on every host measures its window on one clock.

Each process keeps one connection of its own for this (never the outbox's pool: a limiter
that waits for a pooled connection behind a busy outbox would hold every request up). When
the database cannot be reached, the process falls back to a budget of its own in memory, with
a warning, and tries the database again a few seconds later: Engage calls keep flowing
(interactive ones are what the outbox exists for) at up to `rate_limit` from this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final, TypeVar

import attrs

from ._budget import (
    Budget,
    BudgetFile,
    Permit,
    Priority,
    Record,
    SharedBudget,
    Slots,
    budget_key,
    settle,
    take,
)
from ._clock import SYSTEM_CLOCK, Clock
from ._config import url_without_password
from ._pg_outbox import import_asyncpg

__all__ = ["PgBudget", "PgPermit"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# After the database failed, the process uses its own budget this long before trying again.
_RETRY_AFTER: Final = 5.0
_CONNECT_TIMEOUT: Final = 2.0


@attrs.frozen
class PgPermit(Permit):
    """A slot of the shared budget (`shared`), or of the process's own while the database
    could not be reached.
    """

    shared: bool = True


class PgBudget(SharedBudget):
    """The request budget of one Engage key in this process, drawn from the database.

    It answers as `_budget.Budget` does (`try_acquire`, `acquire`, `release`); shared by every
    transport of the process with the same outbox and key, on one event loop.
    """

    _who_slows = "every process on every host of the outbox"
    _registry: dict[tuple[str, str, bytes, int], PgBudget] = {}  # noqa: RUF012 - on purpose

    def __init__(
        self,
        url: str,
        schema: str,
        key: bytes,
        rate: float,
        clock: Clock,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(key, rate, clock, on_close)
        self._url = url
        self._schema = schema
        self._conn: Any = None
        self._conn_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._local = Budget(BudgetFile(None), key, rate, clock)
        self._down_until: float | None = None
        self._warned_mixed = False

    def __repr__(self) -> str:
        return f"<PgBudget {url_without_password(self._url)} schema {self._schema}>"

    @classmethod
    def shared(
        cls, *, url: str, schema: str, base_url: str, api_key: str, rate: float, clock: Clock
    ) -> PgBudget:
        """The budget for this tenant and key in this outbox, made on first use (the lower of
        two rates is kept, with a warning, as `Budget.shared` does).
        """
        key = budget_key(base_url, api_key)
        return cls._one_per(
            cls._registry,
            (url, schema, key),
            rate,
            lambda forget: cls(url, schema, key, rate, clock, on_close=forget),
        )

    def release_user(self) -> None:
        """One user is done; the last one closes the connection (see `leave`)."""
        self._users -= 1
        if self._users <= 0:
            self._on_close()
            self._spawn(self._close())

    async def leave(self) -> None:
        """One user is done with the budget; the last one waits for the slots being given
        back and closes the connection.
        """
        self.release_user()
        if self._users <= 0 and self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _close(self) -> None:
        pending = [task for task in self._tasks if task is not asyncio.current_task()]
        await asyncio.gather(*pending, return_exceptions=True)
        async with self._conn_lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._conn.close(), _CONNECT_TIMEOUT)
                self._conn = None
        self._local.release_user()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # --- the row -------------------------------------------------------------------------

    async def _change(self, change: Callable[[Slots, float], T]) -> T:
        """Run `change` on this key's record and the server's time, atomically across every
        process of every host.
        """
        asyncpg = import_asyncpg()
        s, slots = self._schema, self.shape.slots
        async with self._conn_lock:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self._url, timeout=_CONNECT_TIMEOUT)
            conn = self._conn
            async with conn.transaction():
                if self._clock is not SYSTEM_CLOCK:
                    # Tests move time with an injected clock: the budget's time is that clock's.
                    await conn.execute(
                        "SELECT set_config('engage_outbox.clock_now', $1, true)",
                        repr(self._clock.wall()),
                    )
                select = (
                    "SELECT slots, scale, last_cut, rate_warned, blocked_until, time_window,"  # noqa: S608 - checked name
                    f" last_grown, {s}.clock() AS now FROM {s}.budgets WHERE key = $1 FOR UPDATE"
                )
                row = await conn.fetchrow(select, self._key)
                if row is None:
                    await conn.execute(
                        f"INSERT INTO {s}.budgets (key, slots, time_window) VALUES ($1, $2, $3)"  # noqa: S608 - checked name
                        " ON CONFLICT (key) DO NOTHING",
                        self._key,
                        [0.0] * slots,
                        self.shape.window,
                    )
                    row = await conn.fetchrow(select, self._key)
                stored = list(row["slots"])
                if len(stored) < slots or row["time_window"] < self.shape.window:
                    self._mixed_rates()
                # Processes at different rates share one array: each uses as many of its
                # first slots as its rate gives, so together they keep to the highest rate.
                everything = stored + [0.0] * (slots - len(stored))
                record = Record(
                    everything[:slots],
                    row["scale"],
                    row["last_cut"],
                    row["rate_warned"],
                    row["blocked_until"],
                    max(row["time_window"], self.shape.window),
                    row["last_grown"],
                )
                result = change(record, float(row["now"]))
                everything[:slots] = record.slots
                await conn.execute(
                    f"UPDATE {s}.budgets SET slots = $2, scale = $3, last_cut = $4,"  # noqa: S608 - checked name
                    " rate_warned = $5, blocked_until = $6, time_window = $7, last_grown = $8"
                    " WHERE key = $1",
                    self._key,
                    everything,
                    record.scale,
                    record.last_cut,
                    record.rate_warned,
                    record.blocked_until,
                    record.window,
                    record.last_grown,
                )
            return result

    def _mixed_rates(self) -> None:
        if not self._warned_mixed:
            self._warned_mixed = True
            log.warning(
                "processes on this outbox use different rate_limit values for one Engage key; "
                "together they keep to the highest. Set one value everywhere."
            )

    def _shared_up(self) -> bool:
        return self._down_until is None or self._clock.monotonic() >= self._down_until

    def _went_down(self, exc: BaseException) -> None:
        if self._down_until is None:
            log.warning(
                "the shared rate budget at %s cannot be reached (%s); this process counts on "
                "its own until it can",
                url_without_password(self._url),
                type(exc).__name__,
            )
        self._down_until = self._clock.monotonic() + _RETRY_AFTER
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _attempt(self, priority: Priority) -> tuple[PgPermit | None, float]:
        started = self._clock.monotonic()
        paced = self._pacer.wait(priority, started)
        if paced > 0:
            return None, paced
        permit, wait = await self._take_slot(priority)
        if permit is not None:
            self._pacer.took(priority, started, self.shape)
        return permit, wait

    async def _take_slot(self, priority: Priority) -> tuple[PgPermit | None, float]:
        if self._shared_up():
            asyncpg = import_asyncpg()

            def change(record: Slots, now: float) -> tuple[PgPermit | None, float]:
                index, wait = take(record, now, priority)
                return (None if index is None else PgPermit(index, now)), wait

            try:
                result = await self._change(change)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._went_down(exc)
            else:
                if self._down_until is not None:
                    log.info("the shared rate budget is back")
                    self._down_until = None
                return result
        permit = self._local.try_acquire(priority)
        if permit is not None:
            return PgPermit(permit.index, permit.taken, shared=False), 0.0
        return None, 0.01

    # --- what the transport does -----------------------------------------------------------

    def try_acquire(self, priority: Priority) -> Permit | None:
        """Never: every slot of the shared budget is taken in a transaction (`acquire`)."""
        del priority
        return None

    def release(
        self, permit: Permit, *, rate_limited: bool = False, retry_after: float | None = None
    ) -> None:
        """The request is over; its slot goes back (in the background: the caller has its
        answer already). `rate_limited` if Engage said 429, with `retry_after` seconds when
        it said how long to wait.
        """
        if not isinstance(permit, PgPermit) or not permit.shared:
            self._local.release(permit, rate_limited=rate_limited, retry_after=retry_after)
            self._returned.set()
            return
        self._spawn(self._give_back(permit, rate_limited=rate_limited, retry_after=retry_after))

    async def _give_back(
        self, permit: PgPermit, *, rate_limited: bool, retry_after: float | None
    ) -> None:
        window = self.shape.window

        def change(record: Slots, now: float) -> bool:
            return settle(
                record, permit, now, window, rate_limited=rate_limited, retry_after=retry_after
            )

        asyncpg = import_asyncpg()
        try:
            warn = await self._change(change)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The slot frees itself after the longest hold (`_budget._LONGEST_HOLD`).
            self._went_down(exc)
            return
        finally:
            self._returned.set()
        if warn:
            self._warn_too_high()
