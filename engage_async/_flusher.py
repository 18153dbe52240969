"""`OutboxFlusher`: replays the outbox into Engage, in a web app's event loop or as a sidecar.

This is the runner: it opens and closes, loops until stopped, and sequences the steps of a
flush; each step's work is done by a part named after it:

1. `BatchFollower` (`_batches`): polls the bulk batches Engage accepted, settles the finished.
2. `Reconciler` (`_reconciler`): looks up the GUIDs of creates sent in bulk or as XML.
3. `Sender` (`_sender`): sends the due changes it claims, singly, in bulk, or (`XmlExport`,
   `_xml_export`) as XML files.

They share one `FlushRun` (`_flush_run`): the rows held, the counts, what Engage did in the
step. No usable answer or a 5xx raises `Outage` (`_background`), and so does a 429 still
answered after a few tries at the lowered pace: every flusher on the outbox pauses (the pause
is stored in the outbox, growing one step along `background_delays` per failed probe), and
nothing counts against any change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import uuid
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from ._background import BackgroundCalls, Outage
from ._batches import BatchFollower
from ._budget import Priority
from ._clock import SYSTEM_CLOCK, Clock, wait_for_event
from ._config import EngageConfig
from ._errors import (
    EngageAuthError,
    EngageConfigurationError,
    OutboxError,
    SftpError,
    SftpRefused,
    SftpUnavailable,
    UnexpectedResponse,
)
from ._flush_run import FlushRun, Stopped
from ._lifecycle import Lifecycle
from ._metrics import Metrics
from ._models import FlushReport
from ._outboxes import open_outbox
from ._reconciler import Reconciler
from ._retry import background_delay
from ._sender import Sender
from ._sftp import XmlUploader
from ._store import OutboxStore
from ._transport import Transport
from ._xml_export import XmlExport

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = ["OutboxFlusher"]

log = logging.getLogger(__name__)

_PRUNE_EVERY = 3600.0
# How often a running flusher looks for XML files to upload when none were just written.
_UPLOAD_EVERY = 300.0


class OutboxFlusher:
    """Drains an outbox into Engage.

    In a web app::

        async with ea.OutboxFlusher(config) as flusher:
            flusher.start()      # runs in the background until the block ends
            ...

    or ``await flusher.run()`` as a task, or ``await flusher.flush_once()`` to drain what is due
    and get a `FlushReport`. As a sidecar process: ``engage-async flush``. `clock` replaces the
    real clocks and sleeping (tests move time with it). Metrics go to `meter_provider` (an
    OpenTelemetry `MeterProvider`; default: the global one) when the ``otel`` extra is
    installed.
    """

    def __init__(
        self,
        config: EngageConfig,
        *,
        http: Any = None,
        clock: Clock = SYSTEM_CLOCK,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if not isinstance(config, EngageConfig):
            raise TypeError("config: must be an EngageConfig")
        self.config = config
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._metrics = Metrics.for_provider(meter_provider, clock=clock)
        self._transport = Transport(
            config, http, priority=Priority.BACKGROUND, clock=clock, metrics=self._metrics
        )
        calls = BackgroundCalls(config, self._transport, clock)
        self._batches = BatchFollower(config, calls)
        self._reconciler = Reconciler(config, calls)
        self._export = XmlExport(config, clock=clock)
        self._sender = Sender(config, calls, self._export)
        self._store: OutboxStore | None = None
        self._lifecycle = Lifecycle("OutboxFlusher")
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._flushing = asyncio.Lock()
        self._run: FlushRun | None = None
        # XML files to Engage's SFTP server, when one is configured (`engage_async._sftp`).
        self._uploader: XmlUploader | None = None
        self._files_written = asyncio.Event()
        self._last_prune: float | None = None

    def __repr__(self) -> str:
        return f"<OutboxFlusher {self.owner} {self._lifecycle.state}>"

    # --- lifecycle -----------------------------------------------------------------------------

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # Never raises and never touches the event loop: it may run at exit, or in any thread.
        lifecycle = getattr(self, "_lifecycle", None)
        if lifecycle is not None and lifecycle.state == "open":
            _warn(f"unclosed {self!r}: use `async with`", ResourceWarning, source=self)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the outbox and the HTTP session.

        Raises:
            RuntimeError: opened before.
            OutboxError: the outbox file cannot be used, or there is none: only an
                `EngageSession` creates one (a flusher started in the wrong directory must not
                drain an empty outbox of its own while the app's changes wait).
        """
        self._lifecycle.opening()
        self._store = await open_outbox(self.config, clock=self._clock, create=False)
        self._unsubscribe = self._store.subscribe(self._wake.set)
        try:
            if self.config.sftp_enabled:
                # Built now, so a missing `sftp` extra fails at start-up, not at the first file.
                self._uploader = XmlUploader(self.config, sleep=self._clock.sleep)
            await self._store.register(self.owner)
            self._transport.open()
        except BaseException:
            await self._store.close()
            raise
        self._lifecycle.opened()

    async def close(self) -> None:
        """Stop a background run, give back what this flusher holds, close. Idempotent.

        Returns within about `config.shutdown_timeout` seconds: a request still unanswered
        then is abandoned, and every claimed change not yet sent is pending again at once.
        """
        if self._lifecycle.closed:
            return
        self.stop()
        if self._task is not None:
            # The run gives up its request after the grace; this is the backstop.
            done, _ = await asyncio.wait({self._task}, timeout=self.config.shutdown_timeout + 5)
            if not done:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._lifecycle.closing()
        self._metrics.close()
        try:
            if self._unsubscribe is not None:
                self._unsubscribe()
            if self._store is not None:
                with contextlib.suppress(OutboxError):
                    await self._store.unregister(self.owner)
                await self._store.close()
        finally:
            await self._transport.close()

    def start(self) -> asyncio.Task[None]:
        """Run in the background until `stop` or `close` (``async with`` ends it too)."""
        self._ready()
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self.run(), name=f"engage-flusher {self.owner}")
        return self._task

    def stop(self) -> None:
        """Ask `run` (and a `flush_once` in progress) to return soon.

        No new request goes out; the one in flight gets `config.shutdown_timeout` seconds to
        be answered and is abandoned then; every claimed change not yet sent goes back to
        pending at once (a create whose request was abandoned is looked up before it is sent
        again).
        """
        self._stopping = True
        self._wake.set()
        if self._run is not None:
            self._run.stop(self.config.shutdown_timeout)

    def _ready(self) -> OutboxStore:
        self._lifecycle.check_open()
        assert self._store is not None
        return self._store

    # --- running ---------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        """Flush whenever something is due, until `stop`, cancellation, or (with
        `handle_signals`) SIGTERM or SIGINT. Opens and closes the flusher if it was not open.
        """
        opened_here = self._lifecycle.state == "new"
        if opened_here:
            await self.open()
        self._ready()
        self._stopping = False
        restore = self._handle_signals() if handle_signals else None
        # Files go up in a task of their own: an SFTP outage must not hold up the API replay.
        uploads = (
            asyncio.create_task(self._upload_loop(), name=f"engage-sftp {self.owner}")
            if self._uploader is not None
            else None
        )
        try:
            while not self._stopping:
                wait = self.config.poll_interval
                # Cleared before the flush, so an enqueue during it wakes the next one.
                self._wake.clear()
                try:
                    await self.flush_once(wait_for_batches=False, upload=False)
                    await self._prune_now_and_then()
                    # A batch due for its poll sooner is polled on time, not a poll later.
                    batch_due = await self._ready().next_batch_poll()
                    if batch_due is not None:
                        wait = min(wait, batch_due)
                except OutboxError as exc:
                    log.error("outbox unavailable, retrying: %s", exc)  # noqa: TRY400
                    wait = max(wait, self.config.background_delays[0])
                except (EngageAuthError, EngageConfigurationError) as exc:
                    # The pause is recorded; keep running so a fixed key or tenant (or
                    # Engage's own fix) is picked up without a restart.
                    log.error("Engage reports a configuration problem, pausing: %s", exc)  # noqa: TRY400
                    wait = max(wait, self.config.background_delays[-1])
                except Exception:
                    # A flusher running beside an app must not die quietly on one bad step;
                    # the rows it held were given back, so try again after a while.
                    log.exception("flush failed; retrying")
                    wait = max(wait, self.config.background_delays[0])
                await wait_for_event(self._clock, self._wake, wait)
        finally:
            if uploads is not None:
                # A cancelled upload leaves only a .part on the server, replaced next time.
                uploads.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await uploads
            if restore is not None:
                restore()
            if opened_here:
                await self.close()

    async def _upload_loop(self) -> None:
        """Upload the XML files as they are written (and files left from before), checking
        again every `_UPLOAD_EVERY` seconds; problems are logged and tried again later.
        """
        while True:
            self._files_written.clear()
            try:
                await self._upload()
            except SftpRefused as exc:
                # A configuration problem: the key and known_hosts are read again each time,
                # so a fix is picked up without a restart.
                log.error("SFTP upload refused: %s", exc)  # noqa: TRY400
            except SftpError as exc:
                log.warning("SFTP upload failed, will try again: %s", exc)
            await wait_for_event(self._clock, self._files_written, _UPLOAD_EVERY)

    async def _upload(self) -> int:
        """Upload the files waiting in `xml_dir`; how many went up.

        Raises:
            SftpRefused: a configuration problem (host key, login, rights).
            SftpError: a local file could not be read or moved.
        """
        if self._uploader is None:
            return 0
        try:
            report = await self._uploader.upload_pending()
        except SftpUnavailable as exc:
            log.warning("Engage's SFTP server is unavailable; the files wait: %s", exc)
            return 0
        return len(report.uploaded)

    def _handle_signals(self) -> Callable[[], None] | None:
        loop = asyncio.get_running_loop()
        installed = []
        for number in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(number, self.stop)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or a platform without them
            installed.append(number)

        def restore() -> None:
            for number in installed:
                loop.remove_signal_handler(number)

        return restore

    async def _prune_now_and_then(self) -> None:
        now = self._clock.monotonic()
        if self.config.keep_done <= 0:
            return
        if self._last_prune is not None and now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        pruned = await self._ready().prune(older_than=self.config.keep_done)
        if pruned:
            log.info("pruned %d delivered changes older than %.0f s", pruned, self.config.keep_done)

    async def flush_once(
        self,
        *,
        wait_for_batches: bool = True,
        on_progress: Callable[[FlushReport], None] | None = None,
        upload: bool = True,
    ) -> FlushReport:
        """Send what is due now, and return what happened.

        With `wait_for_batches`, also waits for the bulk batches in flight to finish (polling
        at growing intervals) so their outcome is in the report. Returns early while every
        flusher is paused after an outage. With an SFTP server configured (and `upload`),
        the XML files written are then uploaded (an unreachable server is logged; the files
        wait for the next flush).

        Raises:
            OutboxError: the outbox cannot be read or written.
            EngageAuthError: Engage refused the API key (every flusher pauses; nothing is
                counted against any change).
            EngageConfigurationError: Engage reports its tenant misconfigured
                (``InvalidSystemConfiguration``); the same.
            SftpRefused: the SFTP server refused the host key, the login or the rights.
        """
        store = self._ready()
        run = FlushRun(store, self.owner, metrics=self._metrics)
        async with self._flushing:
            self._run = run
            if self._stopping:
                run.stop(self.config.shutdown_timeout)
            keeper = asyncio.create_task(self._keep_leases())
            try:
                while not self._stopping:
                    await store.recover_expired(self.owner, lease_seconds=self.config.lease_seconds)
                    await self._metrics.refresh_outbox(store)
                    pause = await store.pause()
                    if pause is not None and pause.remaining > 0:
                        break
                    # The outages counted so far: a failure in this step escalates the pause
                    # only if no other flusher did since (one step of the schedule per probe).
                    seen = pause.outages if pause is not None else 0
                    run.new_step()
                    try:
                        worked = await self._metrics.step(self._step(run))
                    except Outage as outage:
                        await self._pause_all(outage, run, seen)
                        if outage.config_problem is not None:
                            raise outage.config_problem from None
                        break
                    except UnexpectedResponse as exc:
                        # An answer we cannot read would be the same next second: wait as
                        # after an outage, so the retries follow the long schedule.
                        await self._pause_all(Outage(str(exc)), run, seen)
                        break
                    except Stopped:
                        break
                    if worked:
                        if on_progress is not None:
                            on_progress(run.report(await store.unfinished_count()))
                        continue
                    wait = await store.next_batch_poll() if wait_for_batches else None
                    if wait is None:
                        break
                    self._wake.clear()
                    await wait_for_event(self._clock, self._wake, wait)
            finally:
                self._run = None
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
                with contextlib.suppress(OutboxError):
                    await asyncio.shield(run.release_held())
        if run.counts["exported"]:
            self._files_written.set()
        if upload and not self._stopping:
            run.count("uploaded", await self._upload())
        return run.report(await store.unfinished_count())

    async def _step(self, run: FlushRun) -> bool:
        """One step: poll batches, reconcile GUIDs, send what is due; True if it did anything."""
        worked = await self._batches.poll(run)
        worked = await self._reconciler.reconcile(run) or worked
        # An XML file another flusher planned and never recorded is finished, in any mode.
        worked = await self._export.resume(run) or worked
        store = run.store
        claimed = await store.claim(
            self.owner, limit=self.config.bulk_max_items, lease_seconds=self.config.lease_seconds
        )
        if not claimed:
            run.bulk_backlog = False
            return worked
        run.hold(claimed)
        threshold = self.config.bulk_threshold
        if not run.bulk_backlog:
            backlog = len(claimed)
            if backlog < threshold:
                backlog += await store.due_count(at_most=threshold)
            run.bulk_backlog = backlog >= threshold
        # No more than the step can send in the shutdown time; the rest is claimed again next.
        requests = max(1, math.floor(self.config.rate_limit * self.config.shutdown_timeout))
        claimed, spare = self._sender.affordable(claimed, run, requests=requests)
        await run.release(spare)
        await self._sender.send(claimed, run)
        return True

    async def _keep_leases(self) -> None:
        store = self._ready()
        interval = self.config.lease_seconds / 3
        while True:
            await self._clock.sleep(interval)
            try:
                await store.renew(self.owner, self.config.lease_seconds)
            except OutboxError as exc:
                log.warning("could not renew leases: %s", exc)

    # --- the shared pause --------------------------------------------------------------------

    async def _pause_all(self, outage: Outage, run: FlushRun, seen: int) -> None:
        """Every flusher holds off, one step further along `background_delays` than the
        `seen` outages, unless another flusher already paused after the same probe.
        """
        store = self._ready()
        await run.release_held()
        outages = seen + 1
        delay = background_delay(self.config.background_delays, outages - 1)
        if outage.retry_after is not None:
            delay = max(delay, outage.retry_after)
        if await store.set_pause(
            delay=delay, reason=outage.reason, outages=outages, expected_outages=seen
        ):
            log.warning("Engage unavailable (%s): all flushers pause %.1f s", outage.reason, delay)
