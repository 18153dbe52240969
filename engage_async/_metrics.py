"""Metrics through the OpenTelemetry API: the instruments, and the small facade the package calls.

Everything OpenTelemetry-specific lives here. Without ``opentelemetry-api`` (the ``otel``
extra) every hook is a no-op. With it, an `EngageSession` or `OutboxFlusher` reports to the
meter provider it was given (``meter_provider=``) or to the global one, which records nothing
until the application configures the SDK. One meter, ``engage_async``, with the package's
version:

- ``engage_async.client.requests`` (counter, ``{request}``; R) and
  ``engage_async.client.request.duration`` (histogram, ``s``; R): every request to Engage.
- ``engage_async.rate_limit.wait.duration`` (histogram, ``s``; P, O): waits for the budget.
- ``engage_async.circuit_breaker.count`` (observable up-down counter, ``{breaker}``;
  ``engage_async.circuit_breaker.state``): sessions' breakers in each state.
- ``engage_async.outbox.change.count`` (observable up-down counter, ``{change}``;
  ``engage_async.outbox.state``): changes pending, inflight, waiting_guid and dead.
- ``engage_async.outbox.oldest_pending.age`` (observable gauge, ``s``).
- ``engage_async.outbox.paused`` (observable gauge, ``1``; ``engage_async.outbox.pause.reason``
  while paused).
- ``engage_async.bulk.batch.count`` (observable up-down counter, ``{batch}``).
- ``engage_async.flusher.changes`` (counter, ``{change}``; O, ``engage_async.operation``):
  changes delivered, dead-lettered or exported to XML.
- ``engage_async.flusher.step.duration`` (histogram, ``s``; O, ``error.type``).

R: ``http.request.method``, ``url.template`` (the path with ``{id}`` for a contact's GUID),
``engage_async.priority``, ``engage_async.outcome``, ``http.response.status_code`` (when
Engage answered), ``error.type`` (when the outcome is not ``ok``). P: ``engage_async.priority``
(``interactive``, ``background``). O: ``engage_async.outcome``. No attribute ever holds a
contact id, an email or any other value a caller passed: every one is drawn from a short
fixed list.

``http.client.*`` is left to the aiohttp client instrumentation, which an application may add
on its own. The observable instruments read a snapshot: a flusher refreshes it from
`OutboxStore.counts` between its steps (`Metrics.refresh_outbox`), and the callbacks, which
run on whichever thread collects, never touch the outbox or the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs
from aiohttp import web

from ._breaker import BreakerState, CircuitBreaker
from ._clock import SYSTEM_CLOCK, Clock
from ._errors import EngageConnectionError, EngageTimeout, OutboxError

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

    from ._http import Call
    from ._store import OutboxCounts, OutboxStore

__all__ = ["NO_METRICS", "Metrics", "pause_reason", "prometheus_endpoint", "route"]

log = logging.getLogger(__name__)

METER_NAME: Final = "engage_async"
# OpenTelemetry's advice for HTTP client durations (semantic conventions, http-metrics.md).
DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
# The states an operator watches; `done` rows only wait to be pruned.
STATES: Final = ("pending", "inflight", "waiting_guid", "dead")
OTHER: Final = "_OTHER"  # the semantic conventions' value for "none of the known ones"
# A snapshot is refreshed at most this often, and never taking more than 1/_QUERY_SHARE of
# the time: `counts()` scans the whole table (about 0.3 s with 300,000 delivered rows kept).
REFRESH_EVERY: Final = 5.0
_QUERY_SHARE: Final = 50.0

# Every path segment of the API's own; anything else (a GUID) becomes `{id}`.
_PATH_WORDS: Final = frozenset(
    {
        "",
        "api",
        "v2",
        "v3",
        "contacts",
        "id",
        "contactoverview",
        "updateContactType",
        "promoteToMember",
        "transactions",
        "promotion-assignments",
        "promotions",
        "point-accounts",
        "bulk",
        "status",
    }
)
_STATUS_IN_REASON: Final = re.compile(r" -> (\d{3})\b")


def route(path: str) -> str:
    """The call's path template, as ``url.template``: ``/api/v3/contacts/{id}``.

    Every segment that is not one of the API's own words becomes ``{id}``, so neither a
    GUID nor anything a caller passed reaches an attribute.
    """
    return "/".join(part if part in _PATH_WORDS else "{id}" for part in path.split("/"))


def pause_reason(reason: str) -> str:
    """What kind of outage paused the flushers, from the pause's stored reason (which names
    the call, with a GUID in its path): ``rate_limited``, ``server_error``, ``configuration``,
    ``auth``, ``timeout``, ``connection_error``, ``unexpected_response``, ``xml_directory``,
    or ``_OTHER``. The reasons are the package's own exception messages (``POST /api/v3/
    contacts -> 503 ...``); `tests/test_metrics.py` pins each kind against them.
    """
    found = _STATUS_IN_REASON.search(reason)
    if found is not None:
        status = int(found.group(1))
        if status == 429:
            return "rate_limited"
        if status in {401, 403}:
            return "auth"
        if status >= 500:
            return "configuration" if "InvalidSystemConfiguration" in reason else "server_error"
        return "unexpected_response"
    for words, kind in (
        ("no answer within", "timeout"),
        ("rate budget", "rate_limited"),
        ("cannot connect", "connection_error"),
        ("connection lost", "connection_error"),
        ("cannot write XML files", "xml_directory"),
    ):
        if words in reason:
            return kind
    return OTHER


def _request_outcome(status: int, error: type[BaseException] | None) -> tuple[str, str | None]:
    """(``engage_async.outcome``, ``error.type``) of one request."""
    if error is not None:
        if issubclass(error, EngageTimeout):
            outcome = "timeout"
        elif issubclass(error, EngageConnectionError):
            outcome = "connection_error"
        elif issubclass(error, asyncio.CancelledError):
            outcome = "cancelled"
        else:
            outcome = "unexpected_response"  # an answer too large to read
        return outcome, error.__name__
    if 200 <= status < 300:
        return "ok", None
    if status == 429:
        outcome = "rate_limited"
    elif 400 <= status < 500:
        outcome = "rejected"
    elif status >= 500:
        outcome = "server_error"
    else:
        outcome = "unexpected_response"
    # As the HTTP conventions have it: the status code is the error's type.
    return outcome, str(status)


# --- the instruments of one meter provider ----------------------------------------------------


@attrs.frozen
class _Snapshot:
    """An outbox's counts as a flusher last read them, and when (on `clock`)."""

    location: str
    counts: OutboxCounts
    taken_at: float
    clock: Clock

    def elapsed(self) -> float:
        return max(0.0, self.clock.monotonic() - self.taken_at)


class _Instruments:
    """The instruments of one meter provider, made once and shared by every session and
    flusher that reports to it (an SDK keeps only the first callbacks of a name).
    """

    def __init__(self, api: ModuleType, meter_provider: MeterProvider | None) -> None:
        meter = api.get_meter(METER_NAME, _package_version(), meter_provider=meter_provider)
        self._observation = api.Observation
        self._lock = threading.Lock()
        self._facades: weakref.WeakSet[Metrics] = weakref.WeakSet()
        self.requests = meter.create_counter(
            "engage_async.client.requests",
            unit="{request}",
            description="Requests sent to Engage, by endpoint and outcome.",
        )
        self.request_duration = meter.create_histogram(
            "engage_async.client.request.duration",
            unit="s",
            description="Time from a request leaving to its answer (or failure).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.rate_limit_wait = meter.create_histogram(
            "engage_async.rate_limit.wait.duration",
            unit="s",
            description="Time a request waited for room in the API key's rate budget.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.flushed = meter.create_counter(
            "engage_async.flusher.changes",
            unit="{change}",
            description="Changes the flusher delivered, dead-lettered or wrote to XML files.",
        )
        self.step_duration = meter.create_histogram(
            "engage_async.flusher.step.duration",
            unit="s",
            description="Time one flush step took (poll batches, reconcile, send).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        meter.create_observable_up_down_counter(
            "engage_async.circuit_breaker.count",
            callbacks=[self._observe_breakers],
            unit="{breaker}",
            description="Sessions' circuit breakers in each state.",
        )
        meter.create_observable_up_down_counter(
            "engage_async.outbox.change.count",
            callbacks=[self._observe_changes],
            unit="{change}",
            description="Outbox changes in each state, as the flusher last counted them.",
        )
        meter.create_observable_gauge(
            "engage_async.outbox.oldest_pending.age",
            callbacks=[self._observe_oldest],
            unit="s",
            description="Age of the oldest change not yet delivered (0 when there is none).",
        )
        meter.create_observable_gauge(
            "engage_async.outbox.paused",
            callbacks=[self._observe_pause],
            unit="1",
            description="1 while every flusher on the outbox holds off after an outage.",
        )
        meter.create_observable_up_down_counter(
            "engage_async.bulk.batch.count",
            callbacks=[self._observe_batches],
            unit="{batch}",
            description="Bulk batches Engage accepted and has not finished.",
        )

    def join(self, facade: Metrics) -> None:
        with self._lock:
            self._facades.add(facade)

    def _gather(self) -> tuple[list[CircuitBreaker], list[_Snapshot]]:
        """The live breakers, and the newest snapshot of each outbox (two flushers of one
        process on one file count it once).
        """
        with self._lock:
            facades = list(self._facades)
        breakers = [breaker for facade in facades for breaker in facade.breakers]
        newest: dict[str, _Snapshot] = {}
        for facade in facades:
            facade.read_since_refresh = True
            snapshot = facade.snapshot
            if snapshot is None:
                continue
            known = newest.get(snapshot.location)
            if known is None or snapshot.elapsed() < known.elapsed():
                newest[snapshot.location] = snapshot
        return breakers, list(newest.values())

    def _observe_breakers(self, _: CallbackOptions) -> Iterable[Observation]:
        breakers, _snapshots = self._gather()
        if not breakers:
            return  # a sidecar has none: nothing to say, rather than zeros
        states = Counter(_breaker_state(breaker) for breaker in breakers)
        for state in BreakerState:
            yield self._observation(
                states[state], {"engage_async.circuit_breaker.state": str(state)}
            )

    def _observe_changes(self, _: CallbackOptions) -> Iterable[Observation]:
        _breakers, snapshots = self._gather()
        if not snapshots:
            return
        for state in STATES:
            number = sum(s.counts.by_state.get(state, 0) for s in snapshots)
            yield self._observation(number, {"engage_async.outbox.state": state})

    def _observe_oldest(self, _: CallbackOptions) -> Iterable[Observation]:
        _breakers, snapshots = self._gather()
        if not snapshots:
            return
        # Aged since the snapshot: a flusher that stopped refreshing must not look healthy.
        ages = [
            s.counts.oldest_pending_age + s.elapsed()
            for s in snapshots
            if s.counts.oldest_pending_age is not None
        ]
        yield self._observation(max(ages, default=0.0))

    def _observe_pause(self, _: CallbackOptions) -> Iterable[Observation]:
        _breakers, snapshots = self._gather()
        if not snapshots:
            return
        reasons: Counter[str] = Counter()
        for snapshot in snapshots:
            pause = snapshot.counts.pause
            if pause is not None and pause.remaining > snapshot.elapsed():
                reasons[pause_reason(pause.reason)] += 1
        if not reasons:
            yield self._observation(0)
        for reason, number in reasons.items():
            yield self._observation(number, {"engage_async.outbox.pause.reason": reason})

    def _observe_batches(self, _: CallbackOptions) -> Iterable[Observation]:
        _breakers, snapshots = self._gather()
        if snapshots:
            yield self._observation(sum(s.counts.batches_in_flight for s in snapshots))


def _breaker_state(breaker: CircuitBreaker) -> BreakerState:
    """The state a call would find: open past its cool-down is half open (the breaker itself
    moves there only when the next call asks).
    """
    state = breaker.state
    if state is BreakerState.OPEN and breaker.remaining_cooldown <= 0:
        return BreakerState.HALF_OPEN
    return state


def _package_version() -> str:
    try:
        return version("engage-async")
    except PackageNotFoundError:
        return "0.0.0"


def _otel_api() -> ModuleType | None:
    """``opentelemetry.metrics``, or None when the ``otel`` extra is not installed.

    Imported when a session or flusher is made, not with the package: the package works,
    and reports nothing, without it.
    """
    try:
        return import_module("opentelemetry.metrics")
    except ImportError:
        return None


_registry_lock = threading.Lock()
_global_instruments: _Instruments | None = None
_instruments_by_provider: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()


def _instruments_for(api: ModuleType, meter_provider: Any) -> _Instruments:
    global _global_instruments  # noqa: PLW0603 - one set per provider, for the process
    with _registry_lock:
        if meter_provider is None:
            # On the global provider's proxy: re-pointed when the application sets one.
            if _global_instruments is None:
                _global_instruments = _Instruments(api, None)
            return _global_instruments
        found = _instruments_by_provider.get(meter_provider)
        if found is None:
            found = _instruments_by_provider[meter_provider] = _Instruments(api, meter_provider)
        return found


# --- the facade -----------------------------------------------------------------------------


class Metrics:
    """What one session or flusher reports; every method is a no-op when `enabled` is False.

    Made with `Metrics.for_provider`; `NO_METRICS` is the one that never reports.
    """

    def __init__(self, instruments: _Instruments | None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._instruments = instruments
        self._clock = clock
        self.breakers: list[CircuitBreaker] = []
        self.snapshot: _Snapshot | None = None
        # Whether a reader collected since the last snapshot: with no reader (the API's no-op
        # provider, an app that never exports), the outbox is counted once, not every 5 s.
        self.read_since_refresh = False
        self._next_refresh = 0.0
        if instruments is not None:
            instruments.join(self)

    @classmethod
    def for_provider(
        cls, meter_provider: MeterProvider | None = None, *, clock: Clock = SYSTEM_CLOCK
    ) -> Metrics:
        """The facade reporting to `meter_provider` (None: the global one).

        Raises:
            TypeError: `meter_provider` is not an OpenTelemetry `MeterProvider`.
        """
        api = _otel_api()
        if api is None:
            return cls(None, clock)
        if meter_provider is not None and not isinstance(meter_provider, api.MeterProvider):
            raise TypeError("meter_provider: must be an OpenTelemetry MeterProvider")
        return cls(_instruments_for(api, meter_provider), clock)

    @property
    def enabled(self) -> bool:
        """True when the OpenTelemetry API is installed (the provider may still be a no-op)."""
        return self._instruments is not None

    def close(self) -> None:
        """The session or flusher closed: its breaker and outbox are no longer reported."""
        self.breakers = []
        self.snapshot = None

    # --- the transport and the budget ----------------------------------------------------

    def request(self, call: Call, priority: int) -> _RequestTimer | _NoTimer:
        """Time one request (``with``); set `.status` on the timer once Engage answered."""
        if self._instruments is None:
            return _NO_TIMER
        return _RequestTimer(self._instruments, self._clock, call, priority)

    def rate_limit_wait(self, priority: int, seconds: float, *, admitted: bool) -> None:
        """A request waited `seconds` for the rate budget; `admitted` False if it gave up."""
        if self._instruments is None:
            return
        self._instruments.rate_limit_wait.record(
            seconds,
            {
                "engage_async.priority": _priority(priority),
                "engage_async.outcome": "admitted" if admitted else "timed_out",
            },
        )

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        """Report `breaker`'s state until `close`."""
        if self._instruments is not None:
            self.breakers = [*self.breakers, breaker]

    # --- the flusher -------------------------------------------------------------------------

    def flushed(self, name: str, number: int, operation: str | None) -> None:
        """A `FlushReport` count grew: delivered (``created``, ``updated``), ``dead`` or
        ``exported`` changes are counted, by operation (``_OTHER`` where unknown).
        """
        if self._instruments is None or number <= 0:
            return
        if name == "created":
            outcome, operation = "delivered", "create"
        elif name == "updated":
            outcome = "delivered"
            operation = operation or "update"
        elif name in {"dead", "exported"}:
            outcome = name
        else:
            return
        self._instruments.flushed.add(
            number,
            {"engage_async.outcome": outcome, "engage_async.operation": str(operation or OTHER)},
        )

    async def step(self, step: Awaitable[bool]) -> bool:
        """Await one flush step (True if it did anything), timing it."""
        if self._instruments is None:
            return await step
        started = self._clock.monotonic()
        attributes: dict[str, str] = {"engage_async.outcome": "error"}
        try:
            worked = await step
        except BaseException as exc:
            attributes["error.type"] = type(exc).__name__
            raise
        else:
            attributes["engage_async.outcome"] = "worked" if worked else "idle"
            return worked
        finally:
            self._instruments.step_duration.record(self._clock.monotonic() - started, attributes)

    async def refresh_outbox(self, store: OutboxStore) -> None:
        """Read the outbox's counts for the observable instruments, now and then.

        At most every `REFRESH_EVERY` seconds, and less often when counting is slow. A
        failure is logged and skipped: metrics never stop a flush.
        """
        if self._instruments is None:
            return
        if self.snapshot is not None and not self.read_since_refresh:
            return
        started = self._clock.monotonic()
        if started < self._next_refresh:
            return
        try:
            counts = await store.counts()
        except OutboxError as exc:
            log.debug("outbox counts for metrics not read: %s", exc)
            return
        taken = self._clock.monotonic()
        self.snapshot = _Snapshot(store.location, counts, taken, self._clock)
        self.read_since_refresh = False
        self._next_refresh = taken + max(REFRESH_EVERY, (taken - started) * _QUERY_SHARE)


def _priority(priority: int) -> str:
    return "interactive" if priority == 0 else "background"


class _RequestTimer:
    """Times one request and records it on leaving the ``with`` block."""

    __slots__ = ("_call", "_clock", "_instruments", "_priority", "_started", "status")

    def __init__(self, instruments: _Instruments, clock: Clock, call: Call, priority: int) -> None:
        self._instruments = instruments
        self._clock = clock
        self._call = call
        self._priority = priority
        self._started = 0.0
        self.status = 0

    def __enter__(self) -> _RequestTimer:
        self._started = self._clock.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds = self._clock.monotonic() - self._started
        outcome, error = _request_outcome(self.status, exc_type)
        attributes: dict[str, str | int] = {
            "http.request.method": self._call.method,
            "url.template": route(self._call.path),
            "engage_async.priority": _priority(self._priority),
            "engage_async.outcome": outcome,
        }
        if self.status:
            attributes["http.response.status_code"] = self.status
        if error is not None:
            attributes["error.type"] = error
        self._instruments.requests.add(1, attributes)
        self._instruments.request_duration.record(seconds, attributes)


class _NoTimer:
    """The request timer when nothing is reported."""

    __slots__ = ()

    status: int

    def __enter__(self) -> _NoTimer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def __setattr__(self, name: str, value: object) -> None:
        pass  # `.status = ...` is dropped


_NO_TIMER: Final = _NoTimer()
NO_METRICS: Final = Metrics(None)


# --- the scrape port -----------------------------------------------------------------------


def prometheus_endpoint(
    host: str, port: int
) -> contextlib.AbstractAsyncContextManager[tuple[MeterProvider, int]]:
    """A meter provider whose instruments Prometheus scrapes at ``http://host:port/metrics``
    while the returned context is entered (``async with``).

    It yields the provider (pass it as ``meter_provider=``) and the port bound (`port` 0
    picks a free one). The OpenTelemetry SDK's `PrometheusMetricReader` turns the instruments
    into Prometheus' names (``engage_async_outbox_change_count``, ``..._seconds``,
    ``..._total``); prometheus-client's aiohttp handler serves them on the running event
    loop, so a scrape runs the observable callbacks on the loop's own thread. The process's
    own metrics (``process_*``, ``python_*``) come along, as prometheus-client collects them
    by default.

    Raises:
        ImportError: at once, the ``prometheus`` extra is not installed.
        OSError: on entering, the address cannot be bound.
    """
    try:
        from opentelemetry.exporter.prometheus import (  # noqa: PLC0415 - an optional extra
            PrometheusMetricReader,
        )
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider  # noqa: PLC0415
        from prometheus_client.aiohttp import make_aiohttp_handler  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            "serving metrics needs the prometheus extra: pip install 'engage-async[prometheus]'"
            f" ({exc.name or exc} is missing)"
        ) from None

    @contextlib.asynccontextmanager
    async def served() -> AsyncIterator[tuple[MeterProvider, int]]:
        provider = SdkMeterProvider(metric_readers=[PrometheusMetricReader()], resource=_resource())
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            yield provider, int(runner.addresses[0][1])
        finally:
            await runner.cleanup()
            provider.shutdown()

    return served()


def _resource() -> Any:
    """The SDK's resource from ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, with
    ``service.name`` ``engage-async`` unless those name one.
    """
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - an optional extra

    resource = Resource.create()
    named = os.environ.get("OTEL_SERVICE_NAME") or str(resource.attributes.get("service.name", ""))
    if not named or named.startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "engage-async"}))
    return resource
