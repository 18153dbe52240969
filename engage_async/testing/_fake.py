"""`FakeEngage`: a Voyado Engage simulator served by aiohttp on loopback, with fault injection.

Every request goes through one pipeline, in this order: it is recorded, an injected fault may
take it over, then the header checks Engage makes (api key, Content-Type, User-Agent), the rate
limit, and finally the endpoint (`_fake_routes`) over the contact store (`_fake_store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import http
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self

import attrs
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._fake_routes import LIST_SHAPES, Router, is_single_create
from ._fake_shapes import DEFAULT_SHAPES, check_shape, checked_shapes, error_body
from ._fake_store import Batch, ContactStore, EngageFailure, StoredContact, now
from ._fake_traffic import FAULT_KINDS, Fault, FaultKind, RateWindow, RecordedRequest, peak_rate

_log = logging.getLogger(__name__)

DEFAULT_CONTACT_TYPES: Final = MappingProxyType({"Member": "email", "Contact": "email"})
_DEFAULT_SHAPES: Final = MappingProxyType(
    {"transactions": "paged", "promotion_assignments": "array", "point_accounts": "paged"}
)
# Bulk bodies of 4000 contacts run to a few megabytes; aiohttp's default cap is 1 MiB.
_MAX_BODY: Final = 32 * 1024 * 1024
# Engage asks for "System/version"; aiohttp's own default says nothing about the caller.
_AIOHTTP_DEFAULT_AGENT = re.compile(r"Python/\S+ aiohttp/\S+")
_GENERIC_ERROR: Final = MappingProxyType({"message": "An error has occurred"})


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _error_code(status: int) -> str:
    """Return an Engage-style code for a bare status: 503 -> "ServiceUnavailable"."""
    return "".join(word[:1].upper() + word[1:] for word in re.split(r"\W+", _phrase(status)))


def _json_response(
    status: int, payload: object, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _abort(request: web.BaseRequest) -> web.Response:
    """Cut the connection without a byte of response; aiohttp then drops what is returned."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response()


def _is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == "application/json"


def _is_system_version(user_agent: str | None) -> bool:
    if not user_agent or "/" not in user_agent:
        return False
    return _AIOHTTP_DEFAULT_AGENT.fullmatch(user_agent) is None


def _case_insensitive_query(request: web.BaseRequest) -> CIMultiDictProxy[str]:
    query: CIMultiDict[str] = CIMultiDict()
    for name, value in request.rel_url.query.items():
        if name not in query:
            query[name] = value
    return CIMultiDictProxy(query)


@attrs.define(kw_only=True, eq=False, repr=False)
class FakeEngage:
    """An in-process Voyado Engage: a real aiohttp server on loopback holding contacts in memory.

    Use as ``async with FakeEngage() as fake:`` (or `start()` / `close()`), then point a client
    at `fake.url` with `fake.api_key`. It answers the contact endpoints the way Engage does and
    refuses what Engage would refuse; see `inject` for misbehaving on purpose.

    Args:
        api_key: the only key it accepts (the `apikey` header).
        host: the address to listen on.
        port: the port; 0 picks a free one. Once started, `port` holds the bound port, which
            `come_up()` listens on again.
        contact_types: contact type name -> its key attribute (`email`, `mobilePhone`,
            `socialSecurityNumber` or `externalId`). Names match case-insensitively.
        custom_key: what a `customKey` lookup means: `externalId` or `memberNumber`.
        bulk_delay: seconds between a bulk submission and its processing (0: at once).
        rate_limit: requests admitted per second per api key, in a sliding one-second window;
            more are answered 429. None turns the limit off. May be changed at any time.
        record_requests: whether to keep every request in `requests`.
        default_contact_type: the tenant's default contact type, one of `contact_types`: a
            bulk request without `contactType` is applied under it.
        strict_bulk_types: as Engage does, fail each bulk update item whose contact is not of
            the request's contact type (`ContactTypeMismatch` in the batch status, nothing
            applied). On by default; off takes every item whatever its type. May be changed
            at any time; it applies to batches processed after the change.
        shapes: how to word the answers Engage publishes no schema for, by shape name; see
            `shapes` below. Unnamed shapes keep their defaults.
    """

    api_key: str = "fake-api-key"
    host: str = "127.0.0.1"
    port: int = 0
    contact_types: Mapping[str, str] = DEFAULT_CONTACT_TYPES
    custom_key: str = "externalId"
    bulk_delay: float = 0.0
    rate_limit: float | None = 200.0
    record_requests: bool = True
    default_contact_type: str = "Member"
    strict_bulk_types: bool = True
    shapes: dict[str, str] = attrs.field(factory=dict, converter=checked_shapes)
    """The chosen answer shapes, by name: ``error_body`` (``error_code``, ``code_detail``,
    ``error``, ``string``), ``contact_id`` (``string``, ``contactId``, ``id``), ``batch_id``
    (``string``, ``batchId``), ``batch_status`` (``status``, ``state``, ``items``),
    ``transactions_path`` (``query``, ``path``) and ``rate_limit_headers`` (``absent``,
    ``present``); the first of each is the default. May be changed at any time. The
    `engage_async.testing._fake_shapes` docstring shows each shape."""

    requests: list[RecordedRequest] = attrs.field(factory=list, init=False)
    """Every request that reached the server, in order (faulted ones included)."""
    list_shapes: dict[str, str] = attrs.field(factory=lambda: dict(_DEFAULT_SHAPES), init=False)
    """Per list endpoint (`transactions`, `promotion_assignments`, `point_accounts`):
    `"paged"` (an object with `items`) or `"array"` (a bare JSON array)."""

    _store: ContactStore = attrs.field(init=False)
    _router: Router = attrs.field(init=False)
    _faults: list[Fault] = attrs.field(factory=list, init=False)
    _held_by: set[Fault] = attrs.field(factory=set, init=False)
    _arrivals: list[float] = attrs.field(factory=list, init=False)
    _rates: RateWindow = attrs.field(factory=RateWindow, init=False)
    _hold: bool = attrs.field(default=False, init=False)
    _timers: dict[str, asyncio.TimerHandle] = attrs.field(factory=dict, init=False)
    _server: web.Server | None = attrs.field(default=None, init=False)
    _runner: web.ServerRunner | None = attrs.field(default=None, init=False)
    _site: web.TCPSite | None = attrs.field(default=None, init=False)
    _closing: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        self._store = ContactStore(dict(self.contact_types), self.custom_key)
        try:
            default_type = self._store.canonical_type(self.default_contact_type)
        except EngageFailure:
            raise ValueError(
                f"default_contact_type: {self.default_contact_type!r} is not one of "
                f"contact_types {sorted(self.contact_types)}"
            ) from None
        self._router = Router(self._store, self._schedule_batch, self._shape_of, default_type)

    def __repr__(self) -> str:
        state = "closed" if self._closing.is_set() else "down" if self.is_down else "up"
        where = self.url if self._runner is not None else "not started"
        return f"<FakeEngage {where} {state}, {len(self._store.contacts)} contacts>"

    # Lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start listening. Raises `RuntimeError` if already started or closed."""
        if self._runner is not None or self._closing.is_set():
            raise RuntimeError("FakeEngage can be started once")
        self._server = web.Server(
            self._serve,
            request_factory=self._make_request,
            # The access log would print query strings, which hold emails and phone numbers.
            access_log=None,
        )
        self._runner = web.ServerRunner(self._server, shutdown_timeout=2.0)
        await self._runner.setup()
        await self._listen(self.port)

    async def close(self) -> None:
        """Stop serving and drop every connection, held requests included. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for fault in (*self._faults, *self._held_by):
            fault.released.set()
        if self._runner is None:
            return
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._abort_connections()
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT`` (no trailing slash)."""
        if self._runner is None:
            raise RuntimeError("FakeEngage is not started")
        return str(URL.build(scheme="http", host=self.host, port=self.port))

    @property
    def is_down(self) -> bool:
        """Whether the fake is started but not listening (after `go_down()`)."""
        return self._runner is not None and self._site is None

    async def go_down(self) -> None:
        """Stop listening and cut every open connection: new ones are refused."""
        if self._runner is None:
            raise RuntimeError("FakeEngage is not started")
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._abort_connections()

    async def come_up(self) -> None:
        """Listen again, on the same port as before."""
        if self._runner is None or self._closing.is_set():
            raise RuntimeError("FakeEngage is not started")
        if self._site is None:
            await self._listen(self.port)

    async def _listen(self, port: int) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        self._site = site
        self.port = site.port

    def _abort_connections(self) -> None:
        if self._server is None:
            return
        for connection in self._server.connections:
            if connection.transport is not None:
                connection.transport.abort()

    @staticmethod
    def _make_request(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        loop = asyncio.get_running_loop()
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=_MAX_BODY
        )

    # Inspection ------------------------------------------------------------------------------

    @property
    def contacts(self) -> dict[str, StoredContact]:
        """Contact id -> stored contact. Change contacts through the API or `add_contact`."""
        return self._store.contacts

    @property
    def batches(self) -> dict[str, Batch]:
        """Batch id -> bulk batch (kind, contact type, items, status, failures, times)."""
        return self._store.batches

    @property
    def attribute_names(self) -> set[str]:
        """The attributes the fake tenant knows; writes to other names are silently dropped.

        Add a tenant's custom attributes here before writing them over the API.
        """
        return self._store.attribute_names

    def contact_json(self, contact_id: str) -> dict[str, Any]:
        """Return the contact exactly as `GET /api/v3/contacts/{id}` would (KeyError if none)."""
        return self._store.contact_json(self._store.contacts[contact_id.lower()])

    def find(self, attr: str, value: object, contact_type: str | None = None) -> list[str]:
        """Return the ids whose attribute `attr` equals `value` (emails ignore case)."""
        return self._store.find(attr, value, contact_type)

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """Return the recorded requests with this method whose path matches the fnmatch `path`."""
        method = method.upper()
        return [
            r for r in self.requests if r.method == method and fnmatch.fnmatchcase(r.path, path)
        ]

    def clear_requests(self) -> None:
        """Forget the recorded requests (and the arrival times `peak_rate` counts)."""
        self.requests.clear()
        self._arrivals.clear()

    def peak_rate(self, window: float = 1.0) -> int:
        """Return the most requests that arrived within any `window` seconds.

        Counts every request that reached the server, recorded or not.
        """
        return peak_rate(self._arrivals, window)

    # Seeding ---------------------------------------------------------------------------------

    def add_contact(
        self,
        attributes: Mapping[str, Any],
        *,
        contact_type: str = "Member",
        contact_id: str | None = None,
        approved: bool = True,
        preferences: Mapping[str, Any] | None = None,
        consents: list[Mapping[str, Any]] | None = None,
    ) -> str:
        """Store a contact as given, skipping validation and key uniqueness; return its id.

        A Member gets a member number unless `attributes` holds `memberNumber` (even None).
        Raises `ValueError` if `contact_id` is taken.
        """
        contact_id = (contact_id or str(uuid.uuid4())).lower()
        stamp = now()
        if contact_id in self._store.contacts:
            raise ValueError("a contact with that id exists already")
        # Seeding may use a type the tenant lacks, on purpose: keep such a name as given.
        with contextlib.suppress(EngageFailure):
            contact_type = self._store.canonical_type(contact_type)
        contact = StoredContact(
            id=contact_id,
            contact_type=contact_type,
            attributes=dict(attributes),
            approved=approved,
            preferences=dict(preferences or {}),
            consents=[dict(consent) for consent in consents or ()],
            source_type="Import",
            created_on=stamp,
            modified_on=stamp,
        )
        self._store.assign_member_number(contact)
        self._store.insert(contact)
        return contact_id

    def add_transaction(self, contact_id: str, **fields: Any) -> dict[str, Any]:
        """Give a contact a purchase; missing fields get defaults. Returns the stored dict."""
        number = self._store.next_sequence()
        transaction = {
            "id": str(uuid.uuid4()),
            "transactionNumber": f"T{number:08d}",
            "createdDate": now().isoformat(),
            "storeName": "Web shop",
            "numberOfItems": 1,
            "netPriceSum": 100.0,
            "localNetPriceSum": 1000.0,
            "localCurrency": "SEK",
            "groupCurrency": "EUR",
            "storeType": "ECOM",
            "lineItems": [],
            "externalId": None,
            **fields,
        }
        self._seeded(contact_id).transactions.append(transaction)
        return transaction

    def add_promotion(self, contact_id: str, promotion: Mapping[str, Any]) -> dict[str, Any]:
        """Assign a promotion to a contact; missing fields get defaults. Returns the stored dict."""
        stored = {
            "id": str(uuid.uuid4()),
            "promotionId": str(uuid.uuid4()),
            "externalId": None,
            "type": "Multichannel",
            "name": "Sample promotion",
            "expiresOn": None,
            "heading": None,
            "description": None,
            "redeemed": False,
            "redeemedOn": None,
            "imageUrl": None,
            "link": None,
            "redemptionChannels": [
                {"type": "POS", "valueType": "PERCENT", "value": 10, "instruction": None}
            ],
            **promotion,
        }
        self._seeded(contact_id).promotions.append(stored)
        return stored

    def add_point_account(self, contact_id: str, **fields: Any) -> dict[str, Any]:
        """Give a contact a point account; missing fields get defaults. Returns the stored dict."""
        contact = self._seeded(contact_id)
        account = {
            "id": self._store.next_sequence(),
            "contactId": contact.id,
            "definitionId": 1,
            "balance": 0.0,
            "pendingPoints": 0.0,
            "balanceExpires": None,
            **fields,
        }
        contact.point_accounts.append(account)
        return account

    def _seeded(self, contact_id: str) -> StoredContact:
        return self._store.contacts[contact_id.lower()]

    def _shape_of(self, name: str) -> str:
        if name not in _DEFAULT_SHAPES:
            shape = self.shapes.get(name, DEFAULT_SHAPES[name])
            check_shape(name, shape)
            return shape
        shape = self.list_shapes.get(name, _DEFAULT_SHAPES[name])
        if shape not in LIST_SHAPES:
            raise ValueError(f"list_shapes[{name!r}] must be one of {sorted(LIST_SHAPES)}")
        return shape

    def _failure_response(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        body = error_body(EngageFailure(status, code, message), self._shape_of("error_body"))
        return _json_response(status, body, headers)

    # Faults ----------------------------------------------------------------------------------

    def inject(
        self,
        kind: FaultKind,
        *,
        method: str | None = None,
        path: str | None = None,
        times: int | None = None,
        delay: float = 1.0,
        status: int = 502,
        retry_after: float | None = None,
        body: object = None,
        content_type: str | None = None,
    ) -> Fault:
        """Make matching requests misbehave; return the `Fault` (for `remove` and `hits`).

        `method` and `path` (an fnmatch pattern on the URL path) narrow which requests match;
        `times` disarms the fault after that many hits (None: until removed). When several
        faults match, the earliest injected wins. Kinds:

        - ``"hang"``: no answer, nothing applied; the connection is held open until the fault
          is removed or the fake closes, and then cut.
        - ``"slow"``: wait `delay` seconds, then handle and answer normally (the request is
          applied even if its client gave up meanwhile).
        - ``"server_error"``: `status` with a proxy's HTML page.
        - ``"status"``: `status` with `body` (bytes, str or JSON-able; default an Engage-style
          JSON error) and `content_type` (default JSON).
        - ``"rate_limited"``: 429, with ``Retry-After`` when `retry_after` is given.
        - ``"create_timeout"``: single creates only: 504 ``RequestTimeOut``, nothing created.
        - ``"lost_reply"``: apply the request in full, then cut the connection unanswered.
        - ``"drop"``: cut the connection before anything is applied.
        - ``"being_created"``: single creates only: create the contact, answer 409
          ``ContactWithKeyIsBeingCreated``.

        Raises `ValueError` for an unknown kind, `times` below 1 or a negative `delay`.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; use one of {sorted(FAULT_KINDS)}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None)")
        if delay < 0:
            raise ValueError("delay must not be negative")
        fault = Fault(
            kind=kind,
            method=method.upper() if method else None,
            path=path,
            times=times,
            delay=delay,
            status=status,
            retry_after=retry_after,
            body=body,
            content_type=content_type,
        )
        self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        """Disarm a fault and cut the requests it holds. Removing twice is harmless."""
        if fault in self._faults:
            self._faults.remove(fault)
        fault.released.set()

    def clear_faults(self) -> None:
        """Remove every fault (see `remove`)."""
        for fault in (*self._faults, *self._held_by):
            fault.released.set()
        self._faults.clear()
        self._held_by.clear()

    def _strike(self, method: str, path: str) -> Fault | None:
        single_create = is_single_create(method, path)
        for fault in self._faults:
            if fault.matches(method, path, single_create=single_create):
                fault.hits += 1
                if not fault.armed:
                    self._faults.remove(fault)
                _log.debug("fake engage: %s fault on %s %s", fault.kind, method, path)
                return fault
        return None

    async def _fault_first(self, fault: Fault, request: web.BaseRequest) -> web.Response | None:
        """Apply what a fault does before the request is handled; None lets it go on."""
        kind = fault.kind
        if kind == "hang":
            self._held_by.add(fault)
            await fault.released.wait()
            # Never answered nor applied: whether its client still waits is a race, and a
            # request landing late would make tests depend on it. "slow" answers late.
            return _abort(request)
        if kind == "slow":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fault.delay):
                    await self._closing.wait()
            # Like a real server, go on even if the client gave up meanwhile.
            return _abort(request) if self._closing.is_set() else None
        if kind == "drop":
            return _abort(request)
        if kind == "server_error":
            page = f"<html><body><h1>{fault.status} {_phrase(fault.status)}</h1></body></html>"
            return web.Response(status=fault.status, text=page, content_type="text/html")
        if kind == "status":
            return self._status_fault(fault)
        if kind == "rate_limited":
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            return self._failure_response(429, "TooManyRequests", "Rate limit exceeded.", headers)
        if kind == "create_timeout":
            return self._failure_response(504, "RequestTimeOut", "The request timed out.")
        return None  # lost_reply and being_created act on the answer

    def _status_fault(self, fault: Fault) -> web.Response:
        body = fault.body
        if body is None:
            failure = EngageFailure(fault.status, _error_code(fault.status), _phrase(fault.status))
            body = error_body(failure, self._shape_of("error_body"))
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            body = json.dumps(body).encode()
        content_type = fault.content_type or "application/json; charset=utf-8"
        return web.Response(status=fault.status, body=body, headers={"Content-Type": content_type})

    # The pipeline ----------------------------------------------------------------------------

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        arrived = time.monotonic()
        method = request.method.upper()
        path = request.path
        fault = self._strike(method, path)
        self._arrivals.append(arrived)
        if self.record_requests:
            self.requests.append(
                RecordedRequest(
                    method=method,
                    path=path,
                    query={name: request.rel_url.query[name] for name in request.rel_url.query},
                    raw_query=request.rel_url.raw_query_string,
                    headers=request.headers,
                    body=body,
                    fault=fault.kind if fault else None,
                    time=arrived,
                )
            )
        if fault is not None:
            early = await self._fault_first(fault, request)
            if early is not None:
                return self._with_rate_headers(early)
        response = self._answer(request, method, path, body)
        if fault is not None and fault.kind == "lost_reply":
            return _abort(request)
        if fault is not None and fault.kind == "being_created" and response.status == 201:
            response = self._failure_response(
                409, "ContactWithKeyIsBeingCreated", "A contact with that key is being created."
            )
        return self._with_rate_headers(response)

    def _with_rate_headers(self, response: web.Response) -> web.Response:
        """Add ``X-RateLimit-*`` headers when that shape is chosen and a limit is set."""
        limit = self.rate_limit
        if self._shape_of("rate_limit_headers") != "present" or limit is None:
            return response
        used = self._rates.used(self.api_key, time.monotonic())
        response.headers["X-RateLimit-Limit"] = f"{limit:g}"
        response.headers["X-RateLimit-Remaining"] = str(max(0, int(limit) - used))
        return response

    def _answer(
        self, request: web.BaseRequest, method: str, path: str, body: bytes
    ) -> web.Response:
        headers = request.headers
        if headers.get("apikey") != self.api_key:
            return self._failure_response(401, "Unauthorized", "The api key is missing or wrong.")
        if not _is_json(headers.get("Content-Type")):
            return _json_response(500, dict(_GENERIC_ERROR))
        if not _is_system_version(headers.get("User-Agent")):
            return self._failure_response(
                400, "InvalidUserAgent", "Send a User-Agent of the form System/version."
            )
        if self.rate_limit is not None and not self._rates.admit(
            self.api_key, time.monotonic(), self.rate_limit
        ):
            return self._failure_response(429, "TooManyRequests", "Rate limit exceeded.")
        query = _case_insensitive_query(request)
        reply = self._router.dispatch(method, path, query, headers, body)
        if reply is None:
            return self._failure_response(404, "NotFound", "No such endpoint.")
        return _json_response(reply.status, reply.body)

    # Bulk processing -------------------------------------------------------------------------

    @property
    def hold_batches(self) -> bool:
        """While True, bulk batches stay Pending until `release_batches()`.

        Setting it back to False processes the held batches that are due.
        """
        return self._hold

    @hold_batches.setter
    def hold_batches(self, hold: bool) -> None:
        self._hold = hold
        if not hold:
            for batch in list(self._store.batches.values()):
                if batch.status == "Pending" and batch.id not in self._timers:
                    self._process(batch)

    def release_batches(self) -> None:
        """Process every pending batch now, in the order they were submitted."""
        for batch in list(self._store.batches.values()):
            self._process(batch)

    def _schedule_batch(self, batch: Batch) -> None:
        if self.bulk_delay > 0:
            loop = asyncio.get_running_loop()
            self._timers[batch.id] = loop.call_later(self.bulk_delay, self._batch_due, batch)
        elif not self._hold:
            self._process(batch)

    def _batch_due(self, batch: Batch) -> None:
        self._timers.pop(batch.id, None)
        if not self._hold:
            self._process(batch)

    def _process(self, batch: Batch) -> None:
        timer = self._timers.pop(batch.id, None)
        if timer is not None:
            timer.cancel()
        self._store.process_batch(batch, strict_types=self.strict_bulk_types)
