"""The PostgreSQL outbox: `OutboxStore` over a schema every host shares.

What it promises, as the SQLite outbox does, and across hosts:

* A write returns only after its transaction committed. There is no group commit: a pool of
  connections (`outbox_pool_size`, at most) runs transactions side by side. An enqueue whose
  commit answer is lost (the server went away during ``COMMIT``) is checked on a fresh
  connection: a change that is there is reported queued, one that is not raises
  `OutboxError`; only when even that check cannot be made is the caller told it may or may
  not be kept.
* Session calls (enqueue, lookups of the identity map) wait for the database at most a
  tenth of ``interactive_deadline`` (at least 0.2 s), the share of the deadline the session
  keeps for the outbox: an unreachable database raises `OutboxError` within the deadline.
* Leases, pauses and due times are the server's clock (`_pg_schema`): a lease is renewed by
  its owner and ends when the server's clock passes it, judged by whoever claims next.
* Flushers of every host wake on ``LISTEN``/``NOTIFY``: an enqueue notifies (at most every
  50 ms per process), a dedicated connection listens, reconnects when lost (and then wakes
  its flushers once, since notifications sent meanwhile are gone), and the flushers keep
  their poll as a fallback.

The SQL lives in `_pg_rows`; this module owns the pool, the timeouts, the wake-ups and the
lazily written cache entries. ``asyncpg`` is imported only here and in `_pg_budget` (the
``postgres`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import attrs

from . import _pg_rows as rows
from ._changes import Batch, Change, NewChange, Operation, Queued
from ._clock import SYSTEM_CLOCK, Clock
from ._config import url_without_password
from ._errors import OutboxError
from ._keys import new_change_id
from ._outbox import _PROCESS, _process_gone
from ._pg_schema import lock_space, migrate
from ._store import Failures, OutboxCounts, Pause

if TYPE_CHECKING:
    import asyncpg
    import asyncpg.pool

    from ._pg_rows import Conn

__all__ = ["PgOutbox", "import_asyncpg"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_LAZY_IDENTITY_DELAY: Final = 0.5
# NOTIFY costs a database-wide lock at commit: one per process per this many seconds is
# enough to wake every idle flusher promptly.
_NOTIFY_EVERY: Final = 0.05
# The listener checks its connection this often (asyncpg notices a dead peer only when TCP
# gives up), and waits this long, growing, before reconnecting.
_LISTEN_CHECK: Final = 5.0
_RECONNECT_DELAYS: Final = (0.5, 1.0, 2.0, 5.0)
# Transactions that lost a deadlock or serialization race are run again (they rolled back).
_RETRIES: Final = 3

# Callers queueing at the same moment share one INSERT of this many rows at most, with at
# most this many such statements running: measured with 200 callers, two statements of a
# hundred rows each beat ten of twenty by four times (benchmarks/pg_outbox.py).
_INSERTS_PER_STATEMENT: Final = 500
_INSERT_STATEMENTS: Final = 2

# In-process wake-ups, as in the SQLite outbox: keyed by (location, schema).
_listeners: dict[tuple[str, str], set[Callable[[], None]]] = {}


@attrs.define
class _Insert:
    """A caller's change waiting for (or in) a shared INSERT statement."""

    change: NewChange
    change_id: str
    future: asyncio.Future[bool]
    deadline: float  # loop time
    started: bool = False

    def __attrs_post_init__(self) -> None:
        # Nobody may be left to read the outcome if the caller was cancelled meanwhile.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())


def import_asyncpg() -> Any:
    """The asyncpg module, or OutboxError saying how to install it."""
    try:
        import asyncpg  # noqa: PLC0415 - an optional extra, imported only when used
    except ImportError:
        raise OutboxError(
            "outbox_url is a PostgreSQL URL but asyncpg is not installed: "
            "pip install 'engage-async[postgres]'"
        ) from None
    return asyncpg


async def _keep_session(conn: Any) -> None:
    """What a connection going back to the pool needs beyond asyncpg's own rollback of an
    open transaction: nothing. asyncpg's default reset (``RESET ALL``, ``UNLISTEN *``, unlock
    all advisory locks, ...) is a round trip per release, a third of an enqueue's time, for
    state this outbox never leaves behind: it takes only transaction-scoped locks and listens
    on a connection of its own.
    """
    del conn


def _answer_lost(exc: BaseException | None, asyncpg: Any) -> bool:
    """Did the statement perhaps run, with only its answer lost (connection gone, or given
    up on while running)?
    """
    return isinstance(
        exc, TimeoutError | OSError | asyncpg.ConnectionDoesNotExistError | asyncpg.InterfaceError
    )


def _describe(exc: BaseException) -> str:
    """A short reason: the error's class and (for the server's errors) its message, which
    never holds the password.
    """
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PgOutbox:
    """One process's handle on a PostgreSQL outbox. Open with `PgOutbox.open`."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        url: str,
        schema: str,
        clock: Clock,
        session_timeout: float,
        timeout: float,
        lease_seconds: float,
        pool_size: int = 10,
    ) -> None:
        self._asyncpg = import_asyncpg()
        self._pool = pool
        self._url = url
        self._schema = schema
        self._space = lock_space(schema)
        self._clock = clock
        self._session_timeout = session_timeout
        self._timeout = timeout
        self._lease_seconds = lease_seconds
        self._location = url_without_password(url)
        self._listen_key = (self._location, schema)
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lazy_identities: dict[str, str] = {}
        self._lazy_types: dict[str, str] = {}
        self._lazy_flush: asyncio.TimerHandle | None = None
        self._last_notify = -1.0
        self._notify_pending = False
        self._wakes: set[Callable[[], None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._pool_size = pool_size
        self._waiting_inserts: list[_Insert] = []
        self._inserting = 0

    @property
    def location(self) -> str:
        """The outbox as a URL without its password, and its schema."""
        return f"{self._location} (schema {self._schema})"

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        schema: str = "engage_outbox",
        pool_size: int = 10,
        clock: Clock = SYSTEM_CLOCK,
        create: bool = True,
        session_timeout: float = 0.3,
        timeout: float = 10.0,
        lease_seconds: float = 30.0,
    ) -> PgOutbox:
        """Connect to the outbox at `url`, creating its schema if `create`, else refusing a
        database without one.

        `timeout` bounds connecting and every statement of a flusher or the admin;
        `session_timeout` those of a session.

        Raises:
            OutboxError: asyncpg is missing, the server cannot be reached or refused the
                login, there is no outbox and `create` is False, or it is from a newer
                engage-async.
        """
        asyncpg = import_asyncpg()
        where = url_without_password(url)
        setup = None
        if clock is not SYSTEM_CLOCK:
            # Tests move time with an injected clock: the outbox's time is that clock's.
            async def setup(conn: Any) -> None:
                await conn.execute(
                    "SELECT set_config('engage_outbox.clock_now', $1, false)", repr(clock.wall())
                )

        try:
            async with asyncio.timeout(timeout):
                pool = await asyncpg.create_pool(
                    url,
                    min_size=1,
                    max_size=pool_size,
                    setup=setup,
                    reset=_keep_session,
                    timeout=timeout,
                    command_timeout=max(timeout, 60.0),
                    server_settings={
                        "application_name": "engage-async",
                        # Every statement here finds its rows by equality on indexed columns,
                        # so one generic plan serves all parameters; left to choose, the server
                        # plans the enqueue afresh each time (2 ms, most of an enqueue).
                        "plan_cache_mode": "force_generic_plan",
                    },
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise OutboxError(f"cannot connect to the outbox at {where}: {_describe(exc)}") from exc
        try:
            async with asyncio.timeout(timeout):
                async with pool.acquire() as conn:
                    await migrate(conn, schema, create=create)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, OutboxError) or not isinstance(exc, Exception):
                raise
            raise OutboxError(
                f"cannot prepare the outbox at {where} (schema {schema}): {_describe(exc)}"
            ) from exc
        return cls(
            pool,
            url=url,
            schema=schema,
            clock=clock,
            session_timeout=session_timeout,
            timeout=timeout,
            lease_seconds=lease_seconds,
            pool_size=pool_size,
        )

    async def close(self) -> None:
        """Write what is waiting, stop listening, close the pool. Safe to call twice."""
        if self._closed:
            return
        if self._lazy_flush is not None:
            self._lazy_flush.cancel()
        if self._lazy_identities or self._lazy_types:
            with contextlib.suppress(OutboxError):
                await self._write_lazy()
        # A NOTIFY still to go out tells the other hosts about this process's last enqueue.
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=1.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for wake in self._wakes:
            _listeners.get(self._listen_key, set()).discard(wake)
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout)
        except (TimeoutError, OSError, self._asyncpg.InterfaceError):
            self._pool.terminate()

    # --- running statements ---------------------------------------------------------------

    async def _use(
        self,
        work: Callable[[Conn], Awaitable[T]],
        *,
        transaction: bool = False,
        session: bool = False,
        timeout: float | None = None,
    ) -> T:
        """Run `work` on a pooled connection (in a transaction if asked), within the
        session's or the flusher's timeout; the database's errors become OutboxError.
        """
        if self._closed:
            raise OutboxError(f"the outbox at {self.location} is closed")
        if timeout is None:
            timeout = self._session_timeout if session else self._timeout
        asyncpg = self._asyncpg
        for attempt in range(_RETRIES + 1):
            try:
                async with asyncio.timeout(timeout), self._pool.acquire() as conn:
                    if not transaction:
                        return await work(conn)
                    async with conn.transaction():
                        return await work(conn)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
                if attempt == _RETRIES:
                    raise self._error(exc) from exc
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise self._error(exc) from exc
        raise AssertionError("unreachable")

    def _error(self, exc: BaseException) -> OutboxError:
        return OutboxError(f"the outbox at {self.location} failed: {_describe(exc)}")

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # --- wake-ups ------------------------------------------------------------------------------

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake` after every enqueue to this outbox, from any process on any host
        (``NOTIFY``), and once after the listener reconnected; returns the undo.
        """
        _listeners.setdefault(self._listen_key, set()).add(wake)
        self._wakes.add(wake)
        if self._listener is None and not self._closed:
            self._listener = asyncio.ensure_future(self._listen())

        def unsubscribe() -> None:
            self._wakes.discard(wake)
            listeners = _listeners.get(self._listen_key)
            if listeners is not None:
                listeners.discard(wake)
                if not listeners:
                    del _listeners[self._listen_key]

        return unsubscribe

    @property
    def _channel(self) -> str:
        return f"{self._schema}_changes"

    def _wake_local(self) -> None:
        for wake in tuple(_listeners.get(self._listen_key, ())):
            wake()

    async def _listen(self) -> None:
        """Keep a connection of its own (never pooled: a pooled one forgets its LISTEN when
        it goes back) listening, and reconnect when it is lost.
        """
        asyncpg = self._asyncpg
        failures = 0
        while not self._closed:
            conn = None
            try:
                conn = await asyncpg.connect(self._url, timeout=self._timeout)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(self._channel, lambda *_: self._wake_own())
                failures = 0
                # Whatever was notified while nobody listened is lost: look once.
                self._wake_own()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), _LISTEN_CHECK)
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1", timeout=_LISTEN_CHECK)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox listener at %s lost: %s", self.location, _describe(exc))
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 1.0)
            delay = _RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)]
            failures += 1
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter

    def _wake_own(self) -> None:
        for wake in tuple(self._wakes):
            wake()

    def _notify(self) -> None:
        """Tell the other processes a change is waiting: now, or at the end of the window
        if this process notified less than `_NOTIFY_EVERY` ago.
        """
        if self._notify_pending or self._closed:
            return
        loop = asyncio.get_running_loop()
        wait = self._last_notify + _NOTIFY_EVERY - loop.time()
        self._notify_pending = True

        async def send() -> None:
            if wait > 0:
                await asyncio.sleep(wait)
            self._notify_pending = False
            self._last_notify = loop.time()
            channel = self._channel
            with contextlib.suppress(OutboxError):
                await self._use(lambda conn: conn.execute("SELECT pg_notify($1, '')", channel))

        self._spawn(send())

    # --- what the session does ------------------------------------------------------------------

    async def enqueue(self, change: NewChange) -> Queued:
        """Commit `change`, merged with what waits for the same contact.

        Raises:
            OutboxError: nothing was kept (the database is unreachable, too slow, or refused);
                or, as the message says, the answer to the commit was lost and not even a
                second connection can tell whether it was kept.
        """
        if self._lazy_identities or self._lazy_types:
            # Cached lookups go out with the next write, as in the SQLite outbox: a flusher
            # that claims this change then knows its contact's type.
            with contextlib.suppress(OutboxError):
                await self._write_lazy()
        queued: Queued | None = None
        # A change by a ref goes the long way: its ref may have become a GUID meanwhile.
        if change.operation is not Operation.CREATE and change.contact_id is not None:
            queued = await self._insert_at_once(change)
        if queued is None:
            queued = await self._enqueue_in_transaction(change)
        self._wake_local()
        self._notify()
        return queued

    async def _insert_at_once(self, change: NewChange) -> Queued | None:
        """The one-statement enqueue (`_pg_rows.enqueue_at_once`), shared with the other
        callers waiting at the same moment (one statement for all of them); a lost answer
        is checked by the change's id.
        """
        loop = asyncio.get_running_loop()
        item = _Insert(change, new_change_id(), loop.create_future(), self._session_timeout)
        item.deadline += loop.time()
        self._waiting_inserts.append(item)
        self._dispatch_inserts()
        try:
            try:
                inserted = await asyncio.wait_for(
                    asyncio.shield(item.future), self._session_timeout
                )
            except TimeoutError:
                if not item.started:
                    # Never sent: nothing was kept.
                    self._waiting_inserts.remove(item)
                    raise self._error(TimeoutError()) from None
                # Its statement runs within this item's deadline: its outcome comes soon.
                inserted = await item.future
        except OutboxError as exc:
            if not item.started or not _answer_lost(exc.__cause__, self._asyncpg):
                raise
            s = self._schema
            try:
                kept = await self._use(
                    lambda conn: rows.committed(conn, s, item.change_id), session=True
                )
            except OutboxError:
                raise self._unknown(exc) from exc.__cause__
            if not kept:
                raise
            inserted = True
        return Queued(item.change_id, ref=change.ref) if inserted else None

    def _dispatch_inserts(self) -> None:
        """Start a statement for the waiting inserts while the pool has room for one: a
        caller alone goes at once; callers arriving together share a statement.
        """
        while self._waiting_inserts and self._inserting < min(self._pool_size, _INSERT_STATEMENTS):
            batch = self._waiting_inserts[:_INSERTS_PER_STATEMENT]
            del self._waiting_inserts[:_INSERTS_PER_STATEMENT]
            for item in batch:
                item.started = True
            self._inserting += 1
            self._spawn(self._insert_batch(batch))

    async def _insert_batch(self, batch: list[_Insert]) -> None:
        s, space = self._schema, self._space
        loop = asyncio.get_running_loop()
        timeout = max(0.0, min(item.deadline for item in batch) - loop.time())
        items = [(item.change, item.change_id) for item in batch]

        async def work(conn: Conn) -> set[str]:
            if len(items) == 1:
                change, change_id = items[0]
                queued = await rows.enqueue_at_once(conn, s, space, change, change_id)
                return set() if queued is None else {change_id}
            return await rows.enqueue_many_at_once(conn, s, space, items)

        try:
            inserted = await self._use(work, session=True, timeout=timeout)
        except OutboxError as exc:
            for item in batch:
                failure = OutboxError(str(exc))
                failure.__cause__ = exc.__cause__
                item.future.set_exception(failure)
        else:
            for item in batch:
                item.future.set_result(item.change_id in inserted)
        finally:
            self._inserting -= 1
            self._dispatch_inserts()

    async def _enqueue_in_transaction(self, change: NewChange) -> Queued:
        """The enqueue that may merge (`_pg_rows.enqueue`), in a transaction; a COMMIT whose
        answer was lost is looked up by the transaction's id.
        """
        s, space = self._schema, self._space
        xid: str | None = None
        committing = False

        async def work(conn: Conn) -> Queued:
            nonlocal xid, committing
            transaction = conn.transaction()
            await transaction.start()
            try:
                xid = await conn.fetchval("SELECT pg_current_xact_id()::text")
                queued = await rows.enqueue(conn, s, space, change)
            except BaseException:
                with contextlib.suppress(Exception):
                    await transaction.rollback()
                raise
            committing = True
            await transaction.commit()
            return queued

        try:
            return await self._use(work, session=True)
        except OutboxError as exc:
            if not committing or xid is None or not _answer_lost(exc.__cause__, self._asyncpg):
                raise
            status = await self._xact_status(xid)
            if status == "committed":
                # Merged or inserted; which row is in the outbox now, a fresh read says.
                return await self._use(
                    lambda conn: rows.enqueue_outcome(conn, s, change), session=True
                )
            if status == "aborted":
                raise
            raise self._unknown(exc) from exc.__cause__

    def _unknown(self, exc: OutboxError) -> OutboxError:
        return OutboxError(
            f"the outbox at {self.location} went away while committing, and it cannot be told "
            f"whether the change was kept ({exc})"
        )

    async def _xact_status(self, xid: str) -> str | None:
        """What became of a transaction whose COMMIT got no answer (None: cannot tell)."""
        try:
            status = await self._use(
                lambda conn: conn.fetchval("SELECT pg_xact_status($1::xid8)", xid),
                session=True,
            )
        except OutboxError:
            return None
        return None if status is None else str(status)

    async def has_active(self, contact_key: str) -> bool:
        """Do changes to this contact still wait (pending, in flight or awaiting a GUID)?"""
        s = self._schema
        return await self._use(lambda conn: rows.has_active(conn, s, contact_key), session=True)

    async def queued_create(
        self, key_name: str, key_value: str, contact_type: str
    ) -> tuple[str, str] | None:
        """(change_id, ref) of a create still waiting for this key and type, if any."""
        s = self._schema
        return await self._use(
            lambda conn: rows.queued_create(conn, s, key_name, key_value, contact_type),
            session=True,
        )

    async def create_of(self, ref: str) -> Change | None:
        """The create that made `ref`, in any state, on any host."""
        s = self._schema
        return await self._use(lambda conn: rows.create_of(conn, s, ref), session=True)

    async def identity(self, key: str, *, max_age: float | None = None) -> str | None:
        """The GUID recorded for `key` (by any host), if recorded less than `max_age` seconds
        ago by the server's clock.
        """
        lazy = self._lazy_identities.get(key)
        if lazy is not None:
            return lazy
        s = self._schema
        return await self._use(lambda conn: rows.identity(conn, s, key, max_age), session=True)

    async def remember(self, keys: Iterable[str], contact_id: str) -> None:
        """Record that every key names `contact_id`; committed before returning."""
        s = self._schema
        pairs = [(key, contact_id) for key in keys]
        for key, _ in pairs:
            self._lazy_identities.pop(key, None)
        await self._use(lambda conn: rows.upsert_identities(conn, s, pairs), session=True)

    def remember_later(self, key: str, contact_id: str) -> None:
        """Cache a lookup result; written within half a second (a crash may lose it)."""
        if self._closed:
            return
        self._lazy_identities[key] = contact_id
        self._flush_soon()

    def remember_type_later(self, contact_id: str, contact_type: str) -> None:
        """Note the contact type Engage showed for a contact; written within half a second."""
        if self._closed:
            return
        self._lazy_types[contact_id] = contact_type
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._lazy_flush is None:
            loop = asyncio.get_running_loop()
            self._lazy_flush = loop.call_later(_LAZY_IDENTITY_DELAY, self._flush_lazy)

    def _flush_lazy(self) -> None:
        self._lazy_flush = None
        if (self._lazy_identities or self._lazy_types) and not self._closed:
            self._spawn(self._write_lazy())

    async def _write_lazy(self) -> None:
        s = self._schema
        identities = list(self._lazy_identities.items())
        types = list(self._lazy_types.items())
        self._lazy_identities.clear()
        self._lazy_types.clear()

        async def work(conn: Conn) -> None:
            await rows.upsert_identities(conn, s, identities)
            await rows.learn_types(conn, s, types)

        await self._use(work, transaction=True)

    async def record_guid(self, seq: int, contact_id: str) -> None:
        """The create at `seq` exists as `contact_id`: finish it and free its chain."""
        s, space = self._schema, self._space
        await self._use(
            lambda conn: rows.record_guid(conn, s, space, seq, contact_id), transaction=True
        )

    # --- what a flusher does ------------------------------------------------------------------

    async def register(self, owner: str) -> None:
        """`owner` (a flusher) starts, leased for `lease_seconds` of the server's clock."""
        s, lease = self._schema, self._lease_seconds
        await self._use(lambda conn: rows.register(conn, s, owner, _PROCESS, lease))

    async def unregister(self, owner: str) -> None:
        """`owner` stops for good, having given back what it held."""
        s = self._schema
        await self._use(lambda conn: rows.leaving(conn, s, owner))

    async def recover_expired(self, owner: str, *, lease_seconds: float) -> int:
        """Give back what any flusher (this one too: a claim whose answer was lost) held once
        its lease ran out on the server's clock, and at once what a flusher of this host
        whose process is gone held; how many rows came back.
        """
        del lease_seconds  # the lease is in each row, by the server's clock
        s = self._schema
        host, _, pidns = _PROCESS
        local = await self._use(lambda conn: rows.local_flushers(conn, s, host, pidns))
        gone = [other for other, pid in local if other != owner and _process_gone(host, pid, pidns)]
        back = await self._use(lambda conn: rows.recover(conn, s, owner, gone))
        if back:
            log.warning("flushers whose lease ran out held %d change(s): pending again", back)
        return back

    async def claim(self, owner: str, *, limit: int, lease_seconds: float) -> list[Change]:
        """Lease up to `limit` due changes, each the head of its contact's chain."""
        s = self._schema
        return await self._use(lambda conn: rows.claim(conn, s, owner, limit, lease_seconds))

    async def renew(self, owner: str, lease_seconds: float) -> None:
        """`owner` is alive: its leases run `lease_seconds` more on the server's clock."""
        s = self._schema
        await self._use(
            lambda conn: rows.renew(conn, s, owner, _PROCESS, lease_seconds), transaction=True
        )

    async def about_to_send(self, owner: str, seqs: Iterable[int]) -> None:
        """`owner` is about to send these creates (one statement for the group): if it
        vanishes with a request out, each is looked up before it is sent again.
        """
        s, seqs = self._schema, list(seqs)
        if seqs:
            await self._use(lambda conn: rows.about_to_send(conn, s, owner, seqs))

    async def release(
        self,
        owner: str,
        seqs: Iterable[int],
        *,
        delay: float = 0.0,
        count_attempt: bool = False,
        error: str | None = None,
        send_alone: bool = False,
        maybe_sent: bool = False,
    ) -> None:
        """Give claimed rows back as pending, due again in `delay` seconds; `maybe_sent`: their
        request may have reached Engage (a create about to be sent is then looked up first).
        """
        s, seqs = self._schema, list(seqs)
        await self._use(
            lambda conn: rows.release(
                conn,
                s,
                owner,
                seqs,
                delay=delay,
                count_attempt=count_attempt,
                error=error,
                send_alone=send_alone,
                maybe_sent=maybe_sent,
            )
        )

    async def finish(self, seqs: Iterable[int]) -> None:
        """Rows Engage applied: done."""
        s, seqs = self._schema, list(seqs)
        await self._use(lambda conn: rows.finish(conn, s, seqs))

    async def bury(self, failures: Failures) -> int:
        """Dead-letter rows Engage rejected for good, and their dependents; how many."""
        s = self._schema
        return await self._use(lambda conn: rows.bury(conn, s, failures), transaction=True)

    async def create_became_update(
        self, change: Change, contact_id: str, body: Mapping[str, Any]
    ) -> None:
        """A create's contact exists and must still get `body`: the row becomes an update."""
        s, space = self._schema, self._space
        await self._use(
            lambda conn: rows.create_became_update(conn, s, space, change, contact_id, body),
            transaction=True,
        )

    async def submit_batch(
        self,
        batch_id: str,
        kind: Operation,
        contact_type: str | None,
        seqs: Sequence[int],
        *,
        first_poll: float,
    ) -> None:
        """Engage accepted a bulk request: record the batch and tie its rows to it."""
        s = self._schema
        await self._use(
            lambda conn: rows.submit_batch(conn, s, batch_id, kind, contact_type, seqs, first_poll),
            transaction=True,
        )

    async def claim_batches(self, owner: str, *, limit: int, lease_seconds: float) -> list[Batch]:
        """Lease batches due for a status poll."""
        s = self._schema
        return await self._use(
            lambda conn: rows.claim_batches(conn, s, owner, limit, lease_seconds)
        )

    async def batch_rows(self, batch_id: str) -> list[Change]:
        """The changes sent in a batch, in the order they were sent."""
        s = self._schema
        return await self._use(lambda conn: rows.batch_rows(conn, s, batch_id))

    async def poll_batch_later(self, batch_id: str, *, delay: float, status: Any) -> None:
        """The batch still runs: keep its status, poll again in `delay` seconds."""
        s = self._schema
        await self._use(lambda conn: rows.poll_batch_later(conn, s, batch_id, delay, status))

    async def unlease_batches(self, owner: str, batch_ids: Sequence[str]) -> None:
        """Give back batches `owner` could not poll, as they were."""
        s = self._schema
        await self._use(lambda conn: rows.forget_lease_of_batches(conn, s, owner, batch_ids))

    async def settle_batch(
        self,
        batch_id: str,
        status: Any,
        *,
        failed: Failures,
        resend: Iterable[int],
        created: Mapping[int, str] | None = None,
    ) -> tuple[int, int]:
        """Settle a finished batch in one transaction (GUIDs the status told recorded at
        once); (rows applied, rows dead).
        """
        s, space, resend, known = self._schema, self._space, list(resend), dict(created or {})
        return await self._use(
            lambda conn: rows.settle_batch(conn, s, batch_id, status, failed, resend, space, known),
            transaction=True,
        )

    async def next_batch_poll(self) -> float | None:
        """Seconds until a batch in flight is due for a poll, or None if none is in flight."""
        s = self._schema
        return await self._use(lambda conn: rows.next_batch_poll(conn, s))

    async def claim_waiting(self, owner: str, *, limit: int, lease_seconds: float) -> list[Change]:
        """Lease creates due for a GUID lookup, those other changes wait on first."""
        s = self._schema
        return await self._use(
            lambda conn: rows.claim_waiting(conn, s, owner, limit, lease_seconds)
        )

    async def not_found_yet(self, seq: int, *, delay: float, count: bool = True) -> None:
        """A waiting create is not on Engage yet: look again in `delay` seconds."""
        s = self._schema
        await self._use(lambda conn: rows.not_found_yet(conn, s, seq, delay, count))

    async def create_again(self, seq: int, reason: str) -> None:
        """A create Engage never showed: send it again (looked up first)."""
        s = self._schema
        await self._use(lambda conn: rows.create_again(conn, s, seq, reason))

    async def exported(self, done: Iterable[int], waiting: Iterable[int], path: str) -> None:
        """Rows written to an XML file: updates done, creates waiting for their GUID."""
        s, done, waiting = self._schema, list(done), list(waiting)
        await self._use(lambda conn: rows.exported(conn, s, done, waiting, path))

    async def pause(self) -> Pause | None:
        """The pause every flusher obeys, if one is set."""
        s = self._schema
        return await self._use(lambda conn: rows.pause(conn, s))

    async def set_pause(
        self, *, delay: float, reason: str, outages: int, expected_outages: int | None = None
    ) -> bool:
        """Make every flusher on every host hold off for `delay` seconds (only if
        `expected_outages`, when given, is the count so far); whether it did.
        """
        s = self._schema
        done: bool = await self._use(
            lambda conn: rows.set_pause(conn, s, delay, reason, outages, expected_outages),
            transaction=True,
        )
        return done

    async def clear_pause(self) -> None:
        """Lift the pause and reset the outage count."""
        s = self._schema
        await self._use(lambda conn: rows.clear_pause(conn, s))

    async def unfinished_count(self) -> int:
        """How many changes are pending, in flight or waiting for a GUID."""
        s = self._schema
        return await self._use(lambda conn: rows.unfinished_count(conn, s))

    async def due_count(self, *, at_most: int) -> int:
        """How many pending changes are due now, counting no further than `at_most`."""
        s = self._schema
        return await self._use(lambda conn: rows.due_count(conn, s, at_most))

    async def prune(self, *, older_than: float) -> int:
        """Delete done changes and finished batches older than `older_than` seconds."""
        s = self._schema
        return await self._use(lambda conn: rows.prune(conn, s, older_than))

    # --- what the admin does --------------------------------------------------------------------

    async def counts(self) -> OutboxCounts:
        """Counts per state, the oldest waiting change's age, the pause, batches in flight."""
        s = self._schema
        return await self._use(lambda conn: rows.counts(conn, s), transaction=True)

    async def list_changes(self, *, state: str | None, limit: int, key: str | None) -> list[Change]:
        """Changes oldest first, in one `state` and for one contact when given."""
        s = self._schema
        return await self._use(lambda conn: rows.list_changes(conn, s, state, limit, key))

    async def get_change(self, change_id: str) -> Change | None:
        """One change by its id."""
        s = self._schema
        return await self._use(lambda conn: rows.get_change(conn, s, change_id))

    async def requeue(self, change: Change) -> None:
        """Make a change due now, attempts reset; a dead create's dependents too."""
        s = self._schema
        await self._use(lambda conn: rows.requeue(conn, s, change), transaction=True)

    async def requeue_dead(self) -> int:
        """Requeue every dead change; how many."""
        s = self._schema
        return await self._use(lambda conn: rows.requeue_dead(conn, s))

    async def discard(self, change: Change, reason: str) -> None:
        """Dead-letter a waiting change on purpose (a create takes its dependents along)."""
        s = self._schema
        await self._use(lambda conn: rows.discard(conn, s, change, reason), transaction=True)

    async def open_changes(self) -> list[Change]:
        """Every change not yet done, oldest first."""
        s = self._schema
        return await self._use(lambda conn: rows.open_changes(conn, s))

    # --- XML files, planned before they are written ------------------------------------------

    async def plan_export(
        self, owner: str, seqs: Sequence[int], path: str, digest: str
    ) -> Literal["planned", "taken", "lost"]:
        """Commit the plan of an XML file before it is written (the rows are parked)."""
        s, seqs = self._schema, list(seqs)
        result = await self._use(
            lambda conn: rows.plan_export(conn, s, owner, seqs, path, digest), transaction=True
        )
        assert result in {"planned", "taken", "lost"}
        return result  # type: ignore[return-value]

    async def replan_export(self, path: str, new_path: str, digest: str) -> bool:
        """Move a plan to another name, or give it new bytes; False if the name is planned."""
        s = self._schema
        return await self._use(
            lambda conn: rows.replan_export(conn, s, path, new_path, digest), transaction=True
        )

    async def stale_exports(self, *, older_than: float) -> list[tuple[str, str]]:
        """(path, digest) of the plans made more than `older_than` seconds ago."""
        s = self._schema
        return await self._use(lambda conn: rows.stale_exports(conn, s, older_than))

    async def export_rows(self, path: str) -> list[Change]:
        """The rows still parked in the plan `path`."""
        s = self._schema
        return await self._use(lambda conn: rows.export_rows(conn, s, path))

    async def finish_export(self, path: str, written: str) -> int:
        """The plan `path` is on disk as `written`: its rows are exported; how many."""
        s = self._schema
        return await self._use(
            lambda conn: rows.finish_export(conn, s, path, written), transaction=True
        )

    async def wait_for_api(
        self, owner: str, seqs: Iterable[int], *, delay: float, reason: str
    ) -> None:
        """Claimed creates an XML file cannot carry: pending, marked as waiting for the API."""
        s, seqs = self._schema, list(seqs)
        await self._use(lambda conn: rows.wait_for_api(conn, s, owner, seqs, delay, reason))

    async def waiting_for_api(self) -> int:
        """How many pending changes wait for the API because an XML file cannot carry them."""
        s = self._schema
        return await self._use(lambda conn: rows.waiting_for_api(conn, s))
