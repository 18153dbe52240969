"""The control API of ``engage-async simulate``: drive a FakeEngage over HTTP, from any language.

It listens on its own port (loopback by default; it has no authentication), so that nothing a
client sends to the simulated Engage can reach it. JSON in, JSON out; a bad request is 400
``{"error": "<field>: <reason>"}``.

- ``POST /control/down``: stop listening and cut open connections (connection refused).
- ``POST /control/up``: listen again, on the same port.
- ``POST /control/faults``: inject a fault, ``{"kind", "method", "path", "times", "delay",
  "status", "retry_after", "body", "content_type"}``, all but ``kind`` optional; answers 201
  with the fault and its ``id``.
- ``GET /control/faults``: the armed faults, with their ``hits``.
- ``DELETE /control/faults``: remove every fault (requests a ``hang`` holds are cut);
  ``DELETE /control/faults/{id}``: remove one.
- ``GET /control/requests[?since=N]``: the request log, oldest first (from index N);
  ``DELETE /control/requests``: clear it.
- ``GET /control/contacts``: every contact's ``id`` and ``contactType``.
- ``GET /control/shapes``, ``PATCH /control/shapes``: read or change the answer shapes
  (`FakeEngage.shapes`); a bad entry changes nothing.

A logged request is ``{"index", "method", "path", "query", "headers", "body", "fault",
"time"}``: ``query`` as sent (decoded), ``headers`` without the API key (nor any
``Authorization``/``Cookie``), ``body`` as text (null when empty), ``fault`` the kind that hit
it or null, ``time`` seconds since the control API started. Fault kinds are those of
`FakeEngage.inject`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, get_args

import attrs
from aiohttp import web
from yarl import URL

from ._fake import FakeEngage
from ._fake_traffic import Fault, FaultKind, RecordedRequest

_HIDDEN_HEADERS: Final = frozenset({"apikey", "x-api-key", "authorization", "cookie"})
_FAULT_FIELDS: Final = frozenset(
    {"kind", "method", "path", "times", "delay", "status", "retry_after", "body", "content_type"}
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BadRequest(Exception):
    """A control request that cannot be carried out; the text names the field."""


def _json(payload: object, status: int = 200) -> web.Response:
    return web.json_response(payload, status=status)


def _fault_json(fault_id: int, fault: Fault) -> dict[str, Any]:
    return {
        "id": fault_id,
        "kind": fault.kind,
        "method": fault.method,
        "path": fault.path,
        "times": fault.times,
        "delay": fault.delay,
        "status": fault.status,
        "retry_after": fault.retry_after,
        "hits": fault.hits,
        "armed": fault.armed,
    }


def request_json(index: int, request: RecordedRequest, started: float) -> dict[str, Any]:
    """One logged request as the control API shows it: never the API key."""
    headers = {
        name: value
        for name, value in request.headers.items()
        if name.lower() not in _HIDDEN_HEADERS
    }
    return {
        "index": index,
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "headers": headers,
        "body": request.body.decode("utf-8", errors="replace") if request.body else None,
        "fault": request.fault,
        "time": round(request.time - started, 6),
    }


def _optional_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise _BadRequest(f"{name}: must be a string or null")
    return value


def _number(data: Mapping[str, Any], name: str, default: float | None) -> float | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _BadRequest(f"{name}: must be a number")
    return float(value)


def _whole(data: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(f"{name}: must be a whole number")
    return value


def fault_arguments(data: object) -> dict[str, Any]:
    """Check a ``POST /control/faults`` body; return `FakeEngage.inject`'s keyword arguments.

    Raises `_BadRequest` naming the field that is missing or malformed.
    """
    if not isinstance(data, Mapping):
        raise _BadRequest("body: must be a JSON object")
    unknown = sorted(set(data) - _FAULT_FIELDS)
    if unknown:
        raise _BadRequest(f"{unknown[0]}: unknown field; use {sorted(_FAULT_FIELDS)}")
    kind = data.get("kind")
    if kind not in get_args(FaultKind):
        raise _BadRequest(f"kind: must be one of {sorted(get_args(FaultKind))}")
    status = _whole(data, "status", 502)
    if status is None or not 100 <= status <= 599:
        raise _BadRequest("status: must be an HTTP status from 100 to 599")
    delay = _number(data, "delay", 1.0)
    return {
        "kind": kind,
        "method": _optional_str(data, "method"),
        "path": _optional_str(data, "path"),
        "times": _whole(data, "times", None),
        "delay": 1.0 if delay is None else delay,
        "status": status,
        "retry_after": _number(data, "retry_after", None),
        "body": data.get("body"),
        "content_type": _optional_str(data, "content_type"),
    }


@attrs.define(eq=False)
class ControlServer:
    """The control API for one `FakeEngage`, served by aiohttp on its own address.

    Use ``await control.start()`` and ``await control.close()``; `url` is its base URL.
    """

    fake: FakeEngage
    host: str = "127.0.0.1"
    port: int = 0
    _faults: dict[int, Fault] = attrs.field(factory=dict, init=False)
    _next_id: int = attrs.field(default=1, init=False)
    _started: float = attrs.field(factory=time.monotonic, init=False)
    _runner: web.AppRunner | None = attrs.field(default=None, init=False)

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the control API (no trailing slash)."""
        return str(URL.build(scheme="http", host=self.host, port=self.port))

    async def start(self) -> None:
        """Start listening; `port` then holds the bound port."""
        app = web.Application()
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/control/down", self._down),
            ("POST", "/control/up", self._up),
            ("POST", "/control/faults", self._add_fault),
            ("GET", "/control/faults", self._list_faults),
            ("DELETE", "/control/faults", self._clear_faults),
            ("DELETE", "/control/faults/{id}", self._remove_fault),
            ("GET", "/control/requests", self._requests),
            ("DELETE", "/control/requests", self._clear_requests),
            ("GET", "/control/contacts", self._contacts),
            ("GET", "/control/shapes", self._shapes),
            ("PATCH", "/control/shapes", self._set_shapes),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._guarded(handler))
        # No access log: the simulated traffic is the user's, and the log is here to read.
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site.port

    async def close(self) -> None:
        """Stop the control API (the fake is left as it is). Idempotent."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def _guarded(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except (_BadRequest, ValueError) as exc:
                return _json({"error": str(exc)}, status=400)

        return guarded

    @staticmethod
    async def _body(request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError:
            raise _BadRequest("body: must be JSON") from None

    async def _down(self, _: web.Request) -> web.Response:
        await self.fake.go_down()
        return _json({"down": True})

    async def _up(self, _: web.Request) -> web.Response:
        await self.fake.come_up()
        return _json({"down": False, "url": self.fake.url})

    async def _add_fault(self, request: web.Request) -> web.Response:
        fault = self.fake.inject(**fault_arguments(await self._body(request)))
        fault_id = self._next_id
        self._next_id += 1
        self._faults[fault_id] = fault
        return _json(_fault_json(fault_id, fault), status=201)

    async def _list_faults(self, _: web.Request) -> web.Response:
        # A fault that has hit its `times` is disarmed by the fake: forget it here too.
        for fault_id in [i for i, fault in self._faults.items() if not fault.armed]:
            del self._faults[fault_id]
        return _json([_fault_json(i, fault) for i, fault in self._faults.items()])

    async def _clear_faults(self, _: web.Request) -> web.Response:
        self.fake.clear_faults()
        self._faults.clear()
        return _json({"removed": "all"})

    async def _remove_fault(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        fault = self._faults.pop(int(raw), None) if raw.isdigit() else None
        if fault is None:
            return _json({"error": f"id: no fault {raw}"}, status=404)
        self.fake.remove(fault)
        return _json({"removed": int(raw)})

    async def _requests(self, request: web.Request) -> web.Response:
        raw = request.query.get("since", "0")
        if not raw.isdigit():
            raise _BadRequest("since: must be a non-negative whole number")
        since = int(raw)
        logged = self.fake.requests
        return _json([request_json(i, logged[i], self._started) for i in range(since, len(logged))])

    async def _clear_requests(self, _: web.Request) -> web.Response:
        self.fake.clear_requests()
        return _json({"cleared": True})

    async def _contacts(self, _: web.Request) -> web.Response:
        return _json(
            [
                {"id": contact.id, "contactType": contact.contact_type}
                for contact in self.fake.contacts.values()
            ]
        )

    async def _shapes(self, _: web.Request) -> web.Response:
        return _json(dict(self.fake.shapes))

    async def _set_shapes(self, request: web.Request) -> web.Response:
        data = await self._body(request)
        if not isinstance(data, Mapping) or not all(isinstance(v, str) for v in data.values()):
            raise _BadRequest("body: must be a JSON object of shape name -> choice")
        # Checked as a whole first, so a bad entry changes nothing.
        self.fake.shapes = {**self.fake.shapes, **data}
        return _json(dict(self.fake.shapes))
