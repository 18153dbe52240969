"""The one place that touches aiohttp: send a `Call`, get (status, headers, body) back.

It sets the headers Engage requires on every request, draws each request from the API key's
shared budget (`_budget`), reads answers up to `EngageConfig.max_answer_bytes`, and turns
aiohttp's exceptions into ours,
telling "the request never left" (safe to send again) from "it may have been applied".
Everything above it (the session, the flusher) speaks only in `Call`s and engage-async's
exceptions.

aiohttp's exceptions never leave this module, not even as ``__cause__`` or ``__context__``:
their text holds the URL with its query (an email) and their request info the API key. Ours
are raised outside the ``except`` blocks and keep only the network error's name.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from ._budget import Budget, Priority
from ._clock import SYSTEM_CLOCK, Clock
from ._config import EngageConfig
from ._errors import (
    EngageConnectionError,
    EngageTimeout,
    EngageUnavailable,
    OutboxError,
    UnexpectedResponse,
)
from ._http import Call, retry_after
from ._metrics import NO_METRICS, Metrics

if TYPE_CHECKING:
    from ._pg_budget import PgBudget

__all__ = ["Transport"]

Answer = tuple[int, Mapping[str, str], bytes]


class Transport:
    """Sends calls to one Engage tenant over an aiohttp session (its own, or one lent to it)."""

    def __init__(
        self,
        config: EngageConfig,
        http: aiohttp.ClientSession | None = None,
        *,
        priority: Priority = Priority.INTERACTIVE,
        clock: Clock = SYSTEM_CLOCK,
        shared_budget: bool = True,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._http = http
        self._metrics = metrics
        self._owns_http = http is None
        self._config = config
        self._base = config.base_url
        self._priority = priority
        self._clock = clock
        self._budget: Budget | PgBudget | None = None
        self._shared_budget = shared_budget
        self._max_answer = config.max_answer_bytes
        self._key = config.api_key.encode()
        self._headers = {
            "apikey": config.api_key,
            "User-Agent": config.user_agent,
            # Engage answers 500 "An error has occurred" to any request without it, GETs too.
            "Content-Type": "application/json",
            "Accept": "application/json",
        }

    def __repr__(self) -> str:
        return f"<Transport {self._base}>"

    def open(self) -> None:
        """Join the key's budget and create the aiohttp session if none was lent (needs a
        running event loop).

        Raises:
            OutboxError: the budget file beside the outbox cannot be opened.
        """
        if self._shared_budget and self._config.outbox_is_postgres:
            # --- the PostgreSQL outbox: one budget for every host (engage_async/_pg_budget.py)
            from ._pg_budget import PgBudget  # noqa: PLC0415 - needs the postgres extra

            assert self._config.outbox_url is not None
            self._budget = PgBudget.shared(
                url=self._config.outbox_url,
                schema=self._config.outbox_schema,
                base_url=self._base,
                api_key=self._config.api_key,
                rate=self._config.rate_limit,
                clock=self._clock,
            )
            if self._http is None:
                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
            return
        path = budget_path(self._config.outbox_path) if self._shared_budget else None
        try:
            self._budget = Budget.shared(
                base_url=self._base,
                api_key=self._config.api_key,
                rate=self._config.rate_limit,
                store_path=path,
                clock=self._clock,
            )
        except OSError as exc:
            raise OutboxError(
                f"cannot open the rate budget at {path}: {type(exc).__name__}"
            ) from None
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        """Leave the budget; close the aiohttp session if this transport made it."""
        if self._budget is not None:
            budget, self._budget = self._budget, None
            await budget.leave()
        if self._owns_http and self._http is not None:
            await self._http.close()

    async def send(self, call: Call, timeout: float) -> Answer:
        """Send `call` and read the whole answer, within `timeout` seconds.

        Raises:
            EngageConnectionError: no connection (`request_sent` False) or lost before the
                answer (`request_sent` True).
            EngageTimeout: no answer in time; the request may have been applied.
            UnexpectedResponse: the answer is larger than `max_answer_bytes` (compressed, by
                its Content-Length, or once decompressed); the request may have been applied.
            RuntimeError: the transport was never opened.
        """
        if self._http is None or self._budget is None:
            raise RuntimeError("the transport is not open")
        started = asyncio.get_running_loop().time()
        budget = self._budget
        # Waiting for the budget counts against the caller's time too.
        permit = budget.try_acquire(self._priority) or await budget.acquire(
            self._priority, within=timeout, metrics=self._metrics
        )
        if permit is None:
            raise EngageTimeout(
                f"{call.target}: not sent, the rate budget ({budget.rate:g}/s per API key) "
                f"left no room within {timeout:.2f} s",
                request_sent=False,
            )
        answer: Answer | None = None
        try:
            with self._metrics.request(call, self._priority) as sent:
                answer = await self._send_admitted(call, started + timeout, timeout)
                sent.status = answer[0]
        finally:
            # The slot is held until the answer (or failure): see _budget. A 429 slows every
            # process on the key down, and holds them all for its Retry-After.
            throttled = answer is not None and answer[0] == 429
            budget.release(
                permit,
                rate_limited=throttled,
                retry_after=(
                    retry_after(answer[1], self._clock.wall()) if throttled and answer else None
                ),
            )
        return answer

    async def _send_admitted(self, call: Call, deadline: float, timeout: float) -> Answer:
        assert self._http is not None
        headers = {**self._headers, **dict(call.headers)} if call.headers else self._headers
        url = URL(self._base + call.url_suffix(), encoded=True)
        failure: EngageUnavailable
        try:
            async with (
                asyncio.timeout_at(deadline),
                self._http.request(
                    call.method,
                    url,
                    data=call.body,
                    headers=headers,
                    allow_redirects=False,
                    raise_for_status=False,
                    # Even if a lent session turned it off: the size limit is on what we read.
                    auto_decompress=True,
                ) as response,
            ):
                return response.status, response.headers, await self._read(call, response)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # The connection was never made, so Engage cannot have seen the request.
            name = _network_error(exc)
            failure = EngageConnectionError(
                f"{call.target}: cannot connect to Engage ({name})",
                request_sent=False,
                network_error=name,
            )
        except TimeoutError as exc:
            failure = EngageTimeout(
                f"{call.target}: no answer within {timeout:.2f} s",
                network_error=_network_error(exc),
            )
        except aiohttp.ClientError as exc:
            name = _network_error(exc)
            failure = EngageConnectionError(
                f"{call.target}: connection lost before the answer ({name})",
                request_sent=True,
                network_error=name,
            )
        # Raised here, outside the handlers, so that aiohttp's exception is not its context.
        raise failure

    async def _read(self, call: Call, response: aiohttp.ClientResponse) -> bytes:
        """The answer's body, read as it arrives and given up once past the size limit.

        aiohttp inflates a compressed body a bounded piece at a time as it is read (3.14), so
        a small gzip stream that would inflate to gigabytes stops here at the limit too.
        """
        limit = self._max_answer
        length = response.content_length
        if length is not None and length > limit:
            raise self._too_large(call, response, f"{length:,} bytes announced")
        if length is not None and response.headers.get("Content-Encoding", "identity") in {
            "identity",
            "",
        }:
            # Not compressed, and its length is known and within the limit: read at once.
            whole = await response.read()
        else:
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise self._too_large(call, response, "more, once decompressed")
            whole = bytes(body)
        # A proxy's debug page may echo the request's headers; nothing keeps the key.
        return whole.replace(self._key, b"***") if self._key in whole else whole

    def _too_large(
        self, call: Call, response: aiohttp.ClientResponse, found: str
    ) -> UnexpectedResponse:
        # Drop the connection rather than drain what nobody will read.
        response.close()
        return UnexpectedResponse(
            f"{call.target} -> {response.status}: the answer is larger than "
            f"{self._max_answer:,} bytes ({found}); not an answer Engage gives",
            status=response.status,
        )


def _network_error(exc: BaseException) -> str:
    """The exception's class name, with the errno name when there is one (no text: aiohttp's
    messages hold the URL).
    """
    name = type(exc).__name__
    os_error = getattr(exc, "os_error", exc)
    number = os_error.errno if isinstance(os_error, OSError) else None
    code = errno.errorcode.get(number) if isinstance(number, int) else None
    return f"{name}, {code}" if code else name


def budget_path(outbox_path: Path) -> Path:
    """The rate budget's file, beside the outbox (every process on the outbox shares it)."""
    return outbox_path.with_name(outbox_path.name + ".budget")
