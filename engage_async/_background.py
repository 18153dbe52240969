"""The flusher's calls to Engage: one attempt each, with the long timeout, failures typed.

Background work follows Engage's retry policy through the shared pause rather than retrying
in place: a call that gets no usable answer, or one that says "not now", raises `Outage`,
and every flusher on the outbox holds off. The exception is a 429, which Engage answers
before doing anything: it is tried again a few times at the slower pace it set. An answer
that is about the change itself (a 400, a 422, a conflict) is raised as Engage's error for
the caller to settle the change.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import _http
from ._changes import Change
from ._clock import Clock
from ._config import EngageConfig
from ._errors import (
    ContactNotFound,
    EngageAuthError,
    EngageConfigurationError,
    EngageHTTPError,
    EngageServerError,
    EngageUnavailable,
    MultipleMatches,
    RateLimited,
    UnexpectedResponse,
)
from ._flush_run import FlushRun, Stopped
from ._keys import lookup_parameter
from ._retry import half_jittered_delays
from ._transport import Transport
from ._wire import contact_id_from_engage

__all__ = ["BackgroundCalls", "Outage", "multiple_matches"]

# Tries of a call Engage answers 429: each goes at the pace the 429 lowered.
_THROTTLED_TRIES = 4
# The backoff between them when Engage gives no Retry-After (doubling, jittered): the three
# waits add up to 1.75-3.5 s, past the one-second window Engage counts in.
_THROTTLED_FIRST_WAIT = 0.5
_THROTTLED_LONGEST_WAIT = 4.0


class Outage(Exception):
    """Engage cannot take work right now; every flusher pauses."""

    def __init__(
        self,
        reason: str,
        retry_after: float | None = None,
        *,
        config_problem: EngageAuthError | EngageConfigurationError | None = None,
        request_sent: bool = True,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        # Whether the request that met the outage may have reached Engage.
        self.request_sent = request_sent
        # Engage refused the API key, or reports its tenant misconfigured: no waiting fixes
        # that, so flush_once says so.
        self.config_problem = config_problem


class BackgroundCalls:
    """Sends the flusher's calls and tells an outage from an answer about the change."""

    def __init__(self, config: EngageConfig, transport: Transport, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self.root = config.api_root
        self._transport = transport

    async def request(self, call: _http.Call, run: FlushRun, *, write: bool = False) -> Any:
        """One call, with the long timeout. A 429 (which Engage answers before doing
        anything) is sent again, up to `_THROTTLED_TRIES` times: it has already slowed the
        key's budget down for every process, so the next try goes at the lower pace. One that
        asks to wait longer than `request_timeout` is raised at once, for a pause.

        Raises:
            Stopped: the flusher is stopping (nothing was sent), or it abandoned the request
                once the stop's grace was over.
            Outage: nothing came back, or an answer that is not Engage's verdict.
            RateLimited: still 429 after `_THROTTLED_TRIES` tries.
            EngageHTTPError: Engage answered with an error status.
        """
        backoffs = half_jittered_delays(_THROTTLED_FIRST_WAIT, _THROTTLED_LONGEST_WAIT)
        for attempt in range(1, _THROTTLED_TRIES + 1):
            status, headers, body = await self._send(call, run)
            try:
                answer = _http.read_response(call, status, headers, body)
            except UnexpectedResponse as exc:
                # Not Engage's verdict (a redirect, a proxy's page): the outcome is unknown.
                raise Outage(str(exc)) from exc
            except RateLimited as exc:
                # A Retry-After longer than a request may wait for the budget pauses instead:
                # the budget would refuse the next try anyway, and the pause keeps the wait.
                waits_long = (exc.retry_after or 0.0) > self.config.request_timeout
                if attempt >= _THROTTLED_TRIES or waits_long:
                    raise
                if exc.retry_after is None:
                    # Engage documents no Retry-After: back off, so that the key's other
                    # processes (slowed down by the same 429) get the tenant's window back.
                    await self._wait_throttled(next(backoffs), run)
                continue
            # An error answer propagates as Engage's error: whether it proves Engage is up is
            # for the caller to say (a 5xx does not; a rejection of the change does).
            await run.engage_answered(write=write)
            return answer
        raise AssertionError("unreachable: the last try returns or raises")

    async def _wait_throttled(self, seconds: float, run: FlushRun) -> None:
        try:
            async with asyncio.timeout(None) as bound:
                run.going_out(bound)  # a stop ends the wait within its grace
                await self._clock.sleep(seconds)
        except TimeoutError:
            raise Stopped from None
        finally:
            run.came_back()

    async def _send(self, call: _http.Call, run: FlushRun) -> tuple[int, Any, bytes]:
        try:
            async with asyncio.timeout(None) as bound:
                run.going_out(bound)
                return await self._transport.send(call, self.config.request_timeout)
        except TimeoutError:
            # Only a stop reschedules this timeout: the request was abandoned, its fate
            # unknown.
            raise Stopped(abandoned=True) from None
        except EngageUnavailable as exc:
            raise Outage(str(exc), request_sent=exc.request_sent) from exc
        finally:
            run.came_back()

    def outage_for(self, exc: EngageHTTPError) -> Outage:
        """An error answer that says "not now" rather than "not this"."""
        if isinstance(exc, RateLimited):
            return Outage(str(exc), exc.retry_after)
        if isinstance(exc, EngageAuthError | EngageConfigurationError):
            # A configuration problem: wait long, someone has to fix the key or the tenant.
            return Outage(str(exc), self.config.background_delays[-1], config_problem=exc)
        return Outage(str(exc))

    async def lookup(self, change: Change, run: FlushRun) -> str | None:
        """The GUID of the contact a create is about, by its key; None if not on Engage.

        Raises:
            Outage: Engage cannot answer now.
            EngageHTTPError: Engage refused the lookup (MultipleMatches, a bad key, ...).
        """
        if not change.key_name or not change.key_value:
            return None
        identifiers = {lookup_parameter(change.key_name): change.key_value}
        if change.contact_type:
            identifiers["contactType"] = change.contact_type
        call = _http.contact_id_lookup(self.root, identifiers)
        try:
            data = await self.request(call, run)
        except ContactNotFound:
            await run.engage_answered(write=False)
            return None
        except (EngageServerError, RateLimited, EngageAuthError) as exc:
            raise self.outage_for(exc) from exc
        return contact_id_from_engage(_http.read_contact_id(data))


def multiple_matches(exc: MultipleMatches) -> tuple[str, str]:
    """The dead-letter reason for a key several contacts share."""
    ids = ", ".join(exc.contact_ids) or "not given"
    return "MultipleMatches", f"several contacts have this key: {ids}"
