"""The flusher's calls to Engage: one attempt each, with the long timeout, failures typed.

Background work follows Engage's retry policy through the shared pause rather than retrying
in place: a call that gets no usable answer, or one that says "not now", raises `Outage`,
and every flusher on the outbox holds off. An answer that is about the change itself (a
400, a 422, a conflict) is raised as Engage's error for the caller to settle the change.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import _http
from ._changes import Change
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
from ._transport import Transport
from ._wire import contact_id_from_engage

__all__ = ["BackgroundCalls", "Outage", "multiple_matches"]


class Outage(Exception):
    """Engage cannot take work right now; every flusher pauses."""

    def __init__(
        self,
        reason: str,
        retry_after: float | None = None,
        *,
        config_problem: EngageAuthError | EngageConfigurationError | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        # Engage refused the API key, or reports its tenant misconfigured: no waiting fixes
        # that, so flush_once says so.
        self.config_problem = config_problem


class BackgroundCalls:
    """Sends the flusher's calls and tells an outage from an answer about the change."""

    def __init__(self, config: EngageConfig, transport: Transport) -> None:
        self.config = config
        self.root = config.api_root
        self._transport = transport

    async def request(self, call: _http.Call, run: FlushRun, *, write: bool = False) -> Any:
        """One call: a single attempt with the long timeout.

        Raises:
            Stopped: the flusher is stopping (nothing was sent), or it abandoned the request
                once the stop's grace was over.
            Outage: nothing came back, or an answer that is not Engage's verdict.
            EngageHTTPError: Engage answered with an error status.
        """
        try:
            async with asyncio.timeout(None) as bound:
                run.going_out(bound)
                status, headers, body = await self._transport.send(
                    call, self.config.request_timeout
                )
        except TimeoutError:
            # Only a stop reschedules this timeout: the request was abandoned, its fate
            # unknown (the claim marked a create to be looked up first).
            raise Stopped from None
        except EngageUnavailable as exc:
            raise Outage(str(exc)) from exc
        finally:
            run.came_back()
        try:
            answer = _http.read_response(call, status, headers, body)
        except UnexpectedResponse as exc:
            # Not Engage's verdict (a redirect, a proxy's page): the outcome is unknown.
            raise Outage(str(exc)) from exc
        # An error answer propagates as Engage's error: whether it proves Engage is up is for
        # the caller to say (a 5xx does not; a rejection of the change does).
        await run.engage_answered(write=write)
        return answer

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
