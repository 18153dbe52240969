"""The one place that touches aiohttp: send a `Call`, get (status, headers, body) back.

It sets the headers Engage requires on every request, keeps under the rate limit, and turns
aiohttp's exceptions into ours, telling "the request never left" (safe to send again) from
"it may have been applied". Everything above it (the session, the flusher) speaks only in
`Call`s and engage-async's exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from yarl import URL

from ._config import EngageConfig
from ._errors import EngageConnectionError, EngageTimeout
from ._http import Call
from ._ratelimit import RateLimiter

__all__ = ["Transport"]

Answer = tuple[int, Mapping[str, str], bytes]


class Transport:
    """Sends calls to one Engage tenant over an aiohttp session (its own, or one lent to it)."""

    def __init__(self, config: EngageConfig, http: aiohttp.ClientSession | None = None) -> None:
        self._http = http
        self._owns_http = http is None
        self._base = config.base_url
        self._limiter = RateLimiter(config.rate_limit)
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
        """Create the aiohttp session if none was lent (needs a running event loop)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        """Close the aiohttp session if this transport made it."""
        if self._owns_http and self._http is not None:
            await self._http.close()

    async def send(self, call: Call, timeout: float) -> Answer:
        """Send `call` and read the whole answer, within `timeout` seconds.

        Raises:
            EngageConnectionError: no connection (`request_sent` False) or lost before the
                answer (`request_sent` True).
            EngageTimeout: no answer in time; the request may have been applied.
            RuntimeError: the transport was never opened.
        """
        if self._http is None:
            raise RuntimeError("the transport is not open")
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            # Waiting for the client-side rate limit counts against the caller's time too
            # (the timer is only set up when there is a wait).
            if not self._limiter.try_acquire():
                async with asyncio.timeout_at(deadline):
                    await self._limiter.acquire()
        except TimeoutError:
            raise EngageTimeout(
                f"{call.target}: not sent, the rate limit ({self._limiter.capacity}/s) "
                f"left no room within {timeout:.2f} s",
                request_sent=False,
            ) from None
        try:
            return await self._send_admitted(call, deadline, timeout)
        finally:
            self._limiter.release()

    async def _send_admitted(self, call: Call, deadline: float, timeout: float) -> Answer:
        assert self._http is not None
        headers = {**self._headers, **dict(call.headers)} if call.headers else self._headers
        url = URL(self._base + call.url_suffix(), encoded=True)
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
                ) as response,
            ):
                return response.status, response.headers, await response.read()
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # The connection was never made, so Engage cannot have seen the request.
            raise EngageConnectionError(
                f"{call.target}: cannot connect to Engage ({type(exc).__name__})",
                request_sent=False,
            ) from exc
        except TimeoutError as exc:
            raise EngageTimeout(f"{call.target}: no answer within {timeout:.2f} s") from exc
        except aiohttp.ClientError as exc:
            raise EngageConnectionError(
                f"{call.target}: connection lost before the answer ({type(exc).__name__})",
                request_sent=True,
            ) from exc
