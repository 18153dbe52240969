"""`EngageSession`: every Engage call of an application goes through one of these.

The session sends what `_http` builds through the `Transport`, reads the answers back through
`_http`, retries within the interactive deadline, and, for writes Engage cannot take right
now, commits the change to the outbox and answers ``Delivery(queued=True)`` instead of
failing the caller.

What is queued and what is raised:

* queued: no answer, a timeout, a connection error, a 5xx, a 429 after the retries, an open
  circuit; and any change to a contact that already has changes waiting, so nothing
  overtakes them.
* raised: 400, 401, 403, 404, 409 and 422, which are about the request itself, and bad input,
  before anything is sent.

A create is never sent twice blind: after an answer that leaves its outcome unknown (a timeout
or 5xx once the request went out), it is looked up by its key, and if Engage still cannot
say, queued marked "look up before sending again".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar

import aiohttp
import attrs

from . import _http
from ._breaker import CircuitBreaker
from ._changes import NewChange, Operation, Queued
from ._clock import SYSTEM_CLOCK, Clock
from ._config import EngageConfig
from ._create_policy import (
    CreateOutcome,
    contact_id_in,
    create_outcome,
    must_look_up_first,
    update_for_existing,
)
from ._errors import (
    CircuitOpen,
    ContactNotFound,
    EngageConflict,
    EngageError,
    EngageServerError,
    EngageTimeout,
    EngageUnavailable,
    PayloadError,
    RateLimited,
    UnexpectedResponse,
)
from ._keys import (
    LOOKUP_PARAMETERS,
    choose_key,
    contact_key,
    identity_key,
    is_ref,
    lookup_parameter,
    new_ref,
)
from ._lifecycle import Lifecycle
from ._metrics import Metrics
from ._models import Contact, ContactOverview, Delivery, PointAccount, Promotion, Transaction
from ._outboxes import open_outbox
from ._overview import read_overview
from ._redact import scrub
from ._retry import jittered_delays
from ._store import OutboxStore
from ._transport import Transport
from ._wire import (
    check_text,
    contact_id_from_engage,
    normalize_contact_id,
    prepare_payload,
    structure,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = ["EngageSession"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Of the interactive deadline, the share the network may use; the rest is kept for committing
# to the outbox, so that a queued write still answers within the deadline.
_NETWORK_SHARE: Final = 0.9
# How long a contact type this session gave the outbox is not given again, and for how many
# contacts at most (then it starts over).
_TYPE_TOLD_FOR: Final = 60.0
_TYPES_TOLD_MAX: Final = 10_000
_REDEMPTION_CHANNELS: Final = frozenset({"POS", "ECOM", "OTHER"})
_IF_EXISTS: Final = ("return", "update")
_UNKNOWN_REF: Final = (
    "no create with this ref is known to this outbox (a ref is known only to the outbox of "
    "the session that made it)"
)


@attrs.frozen
class _Target:
    """The contact a write is about: its GUID when known, else the ref of its queued create."""

    contact_key: str
    contact_id: str | None
    ref: str | None = None


class EngageSession:
    """An async session with Engage and the local outbox behind it.

    Use as ``async with EngageSession(config) as engage: ...`` (or `open` and `close`). It
    creates its own `aiohttp.ClientSession`, or uses the one passed as `http` (which it then
    never closes). A closed session cannot be opened again. Metrics go to `meter_provider`
    (an OpenTelemetry `MeterProvider`; default: the global one) when the ``otel`` extra is
    installed.
    """

    def __init__(
        self,
        config: EngageConfig,
        *,
        http: aiohttp.ClientSession | None = None,
        clock: Clock = SYSTEM_CLOCK,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if not isinstance(config, EngageConfig):
            raise TypeError("config: must be an EngageConfig")
        self.config = config
        self._clock = clock
        self._metrics = Metrics.for_provider(meter_provider, clock=clock)
        self._transport = Transport(config, http, clock=clock, metrics=self._metrics)
        self._outbox: OutboxStore | None = None
        self._lifecycle = Lifecycle("EngageSession")
        self._breaker = CircuitBreaker(
            config.breaker_threshold, config.breaker_cooldown, clock=clock.monotonic
        )
        self._metrics.watch_breaker(self._breaker)
        self._root = config.api_root
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        # contact id -> (type, monotonic time) this session last handed to the outbox.
        self._types_told: dict[str, tuple[str, float]] = {}

    def __repr__(self) -> str:
        return (
            f"<EngageSession {self.config.base_url} api v{self.config.api_version} "
            f"{self._lifecycle.state}>"
        )

    # --- lifecycle ---------------------------------------------------------------------------

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
            RuntimeError: the session was opened before.
            OutboxError: the outbox file cannot be used.
        """
        self._lifecycle.opening()
        self._outbox = await open_outbox(self.config, clock=self._clock)
        self._transport.open()
        self._lifecycle.opened()

    async def close(self) -> None:
        """Close the outbox and, if the session made it, the HTTP session. Idempotent."""
        if not self._lifecycle.closing():
            return
        self._metrics.close()
        try:
            if self._outbox is not None:
                await self._outbox.close()
        finally:
            await self._transport.close()

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._lifecycle.closed

    def _ready(self) -> OutboxStore:
        self._lifecycle.check_open()
        assert self._outbox is not None
        return self._outbox

    # --- sending -------------------------------------------------------------------------------

    def _deadline(self, share: float = 1.0) -> float:
        return self._clock.monotonic() + self.config.interactive_deadline * share

    async def _attempt(self, call: _http.Call, until: float) -> Any:
        remaining = until - self._clock.monotonic()
        if remaining <= 0:
            raise EngageTimeout(
                f"{call.target}: not sent, the interactive deadline has passed",
                request_sent=False,
            )
        if not self._breaker.allow():
            raise CircuitOpen(
                f"{call.target}: not sent, Engage failed {self._breaker.threshold} times in a "
                f"row (next try in {self._breaker.remaining_cooldown:.0f} s)"
            )
        try:
            status, headers, body = await self._transport.send(call, remaining)
        except EngageUnavailable as exc:
            if isinstance(exc, EngageTimeout) and not exc.request_sent:
                raise  # held back by our own rate limit: says nothing about Engage
            self._breaker.record_failure()
            raise
        try:
            answer = _http.read_response(call, status, headers, body)
        except (EngageServerError, UnexpectedResponse):
            # A 5xx, or an answer that is not Engage's (a proxy's page, a redirect): no use.
            self._breaker.record_failure()
            raise
        except EngageError:
            self._breaker.record_success()
            raise
        self._breaker.record_success()
        return answer

    async def _call(self, call: _http.Call, *, until: float) -> Any:
        """Send `call`, retrying what may be retried, until it succeeds or `until` (loop time).

        Only idempotent calls are retried here; creates have their own rules.
        """
        delays = jittered_delays(self.config.retry_initial_delay, self.config.retry_max_delay)
        for attempt in range(1, self.config.retry_attempts + 1):
            try:
                return await self._attempt(call, until)
            except (EngageUnavailable, RateLimited) as exc:
                last_try = attempt == self.config.retry_attempts
                if last_try or not call.idempotent or isinstance(exc, CircuitOpen):
                    raise
                wait = next(delays)
                if isinstance(exc, RateLimited):
                    wait = max(wait, exc.retry_after or 0.0)
                if self._clock.monotonic() + wait >= until:
                    raise
                log.debug("retrying %s in %.2f s after %s", call.target, wait, type(exc).__name__)
                await self._clock.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    # --- reads -------------------------------------------------------------------------------

    async def contact_overview(
        self,
        *,
        contact_id: str | None = None,
        email: str | None = None,
        mobile_phone: str | None = None,
        social_security_number: str | None = None,
        custom_key: str | None = None,
        any: str | None = None,
        contact_type: str | None = None,
    ) -> ContactOverview:
        """The enriched profile (``GET /contactoverview``); Engage may serve it from a cache.

        Exactly one identifier; `contact_type` is required unless it is `contact_id`.

        Raises:
            ValueError: no identifier, more than one, or a missing `contact_type`.
            ContactNotFound, MultipleMatches, InvalidRequest, EngageUnavailable.
        """
        self._ready()
        if contact_id is not None:
            if any_given(email, mobile_phone, social_security_number, custom_key, any):
                raise ValueError("give exactly one identifier: contact_id, or one other")
            identifiers = {"contactId": normalize_contact_id(contact_id)}
        else:
            name, value = _one_identifier(
                email=email,
                mobile_phone=mobile_phone,
                social_security_number=social_security_number,
                custom_key=custom_key,
                any=any,
                extra="contact_id, ",
            )
            if contact_type is None:
                raise ValueError(f"contact_type: required when looking up by {name}")
            identifiers = {LOOKUP_PARAMETERS[name]: value}
        if contact_type is not None:
            identifiers["contactType"] = _text(contact_type, "contact_type")
        elif self.config.api_version == 2:
            raise ValueError("contact_type: API v2's contactoverview needs it, even by contact_id")
        data = await self._call(
            _http.contact_overview(self._root, identifiers), until=self._deadline()
        )
        overview = read_overview(data)
        self._learn_type(overview.id, data)
        return overview

    async def find_contact_id(
        self,
        *,
        email: str | None = None,
        mobile_phone: str | None = None,
        social_security_number: str | None = None,
        custom_key: str | None = None,
        any: str | None = None,
        contact_type: str | None = None,
    ) -> str | None:
        """The contact's GUID (``GET /contacts/id``), or None when Engage has no such contact.

        Answers from the local identity map when it learned the GUID within
        `config.identity_ttl` seconds; otherwise asks Engage and remembers the answer.

        Raises:
            ValueError: no identifier, or more than one.
            MultipleMatches: several contacts match (`contact_ids` lists them).
            InvalidRequest, EngageUnavailable.
        """
        outbox = self._ready()
        name, value = _one_identifier(
            email=email,
            mobile_phone=mobile_phone,
            social_security_number=social_security_number,
            custom_key=custom_key,
            any=any,
        )
        if contact_type is not None:
            contact_type = _text(contact_type, "contact_type")
        attribute = (
            self.config.custom_key_attribute if name == "custom_key" else LOOKUP_PARAMETERS[name]
        )
        key = identity_key(attribute, value, contact_type)
        if self.config.identity_ttl > 0:
            known = await outbox.identity(key, max_age=self.config.identity_ttl)
            if known is not None:
                return known
        found = await self._lookup(LOOKUP_PARAMETERS[name], value, contact_type, self._deadline())
        if found is not None:
            outbox.remember_later(key, found)
            if contact_type is not None:
                # Found among contacts of that type: that is its type.
                outbox.remember_type_later(found, contact_type)
        return found

    async def _lookup(
        self, parameter: str, value: str, contact_type: str | None, until: float
    ) -> str | None:
        identifiers = {parameter: value}
        if contact_type is not None:
            identifiers["contactType"] = contact_type
        call = _http.contact_id_lookup(self._root, identifiers)
        try:
            data = await self._call(call, until=until)
        except ContactNotFound:
            return None
        return contact_id_from_engage(_http.read_contact_id(data))

    async def get_contact(self, contact_id: str) -> Contact:
        """The contact (``GET /contacts/{id}``).

        Raises:
            ValueError: `contact_id` is not a GUID.
            ContactNotFound, EngageUnavailable.
        """
        self._ready()
        guid = normalize_contact_id(contact_id)
        data = await self._call(_http.get_contact(self._root, guid), until=self._deadline())
        contact = structure(data, Contact)
        self._learn_type(guid, data)
        return contact

    def _learn_type(self, contact_id: str | None, data: Any) -> None:
        """Keep the contact type an answer shows: a queued update of the contact can then go
        in a bulk request of that type.
        """
        contact_type = _http.read_contact_type(data)
        if not (contact_id and contact_type and self._outbox is not None):
            return
        # A till reads the same contacts again and again: the same type told a moment ago
        # is not written again (another process may have changed it since, so not for long).
        now = self._clock.monotonic()
        told = self._types_told.get(contact_id)
        if told is not None and told[0] == contact_type and now - told[1] < _TYPE_TOLD_FOR:
            return
        with contextlib.suppress(ValueError):
            self._outbox.remember_type_later(normalize_contact_id(contact_id), contact_type)
            if len(self._types_told) >= _TYPES_TOLD_MAX:
                self._types_told.clear()
            self._types_told[contact_id] = (contact_type, now)

    async def transactions(self, contact_id: str, *, limit: int | None = None) -> list[Transaction]:
        """The contact's purchases and returns, every page fetched (up to `limit`)."""
        self._ready()
        guid = normalize_contact_id(contact_id)
        _check_limit(limit)
        version = self.config.api_version
        items = await self._pages(
            lambda offset, count: _http.transactions(self._root, version, guid, offset, count),
            limit,
        )
        return [structure(item, Transaction) for item in items]

    async def promotion_assignments(
        self, contact_id: str, *, redemption_channel: str | None = None
    ) -> list[Promotion]:
        """The contact's active promotions, optionally for one channel (POS, ECOM, OTHER)."""
        self._ready()
        guid = normalize_contact_id(contact_id)
        channel = None
        if redemption_channel is not None:
            channel = _text(redemption_channel, "redemption_channel").upper()
            if channel not in _REDEMPTION_CHANNELS:
                raise ValueError("redemption_channel: must be POS, ECOM or OTHER")
        version = self.config.api_version
        items = await self._pages(
            lambda offset, count: _http.promotion_assignments(
                self._root, version, guid, channel, offset, count
            ),
            None,
        )
        return [structure(item, Promotion) for item in items]

    async def point_accounts(self, contact_id: str) -> list[PointAccount]:
        """The contact's point accounts (active and pending points per definition)."""
        self._ready()
        guid = normalize_contact_id(contact_id)
        items = await self._pages(
            lambda offset, count: _http.point_accounts(self._root, guid, offset, count), None
        )
        return [structure(item, PointAccount) for item in items]

    async def _pages(
        self, page_call: Callable[[int, int], _http.Call], limit: int | None
    ) -> list[Any]:
        """Every item of a list endpoint, page by page.

        Follows ``totalCount`` when Engage gives one; otherwise a short page is the last. A
        page equal to the one before means the server ignores the offset: stop there.
        """
        items: list[Any] = []
        offset = 0
        previous: list[Any] | None = None
        while limit is None or len(items) < limit:
            count = _http.PAGE_SIZE if limit is None else min(_http.PAGE_SIZE, limit - len(items))
            data = await self._call(page_call(offset, count), until=self._deadline())
            page, total = _http.read_page(data)
            if not page or page == previous:
                break
            items.extend(page)
            offset += len(page)
            previous = page
            if total is not None:
                if offset >= total:
                    break
            elif len(page) < count:
                break
        return items if limit is None else items[:limit]

    # --- writes ------------------------------------------------------------------------------

    async def create_contact(
        self,
        attributes: Mapping[str, Any] | Any,
        *,
        contact_type: str | None = None,
        source: str | None = None,
        store_external_id: str | None = None,
        create_as_unapproved: bool = False,
        if_exists: Literal["return", "update"] = "return",
    ) -> Delivery:
        """Create a contact, unless one with its key exists; queue it if Engage cannot answer.

        Looks the contact up by its key first, as Engage asks. If it exists, `if_exists`
        decides: ``"return"`` gives its GUID (``existed=True``) and changes nothing;
        ``"update"`` also applies `attributes` as an update. The `Delivery` always has a `ref`
        that later calls may use in place of the GUID.

        Raises:
            EmptyValueError, PayloadError, TypeError, ValueError: bad input; nothing was sent.
            MultipleMatches: several contacts already have this key.
            InvalidRequest, EngageValidationError, EngageAuthError: Engage refused the data.
            OutboxError: Engage could not take it and the outbox could not keep it either.
        """
        outbox = self._ready()
        if if_exists not in _IF_EXISTS:
            raise ValueError('if_exists: must be "return" or "update"')
        if not isinstance(create_as_unapproved, bool):
            raise TypeError(
                f"create_as_unapproved: must be a bool, not {type(create_as_unapproved).__name__}"
            )
        body = prepare_payload(attributes, "attributes")
        if not body:
            raise ValueError("attributes: must not be empty")
        kind = self._contact_type_of(body, contact_type)
        body["contactType"] = kind
        key = choose_key(
            body, self.config.key_attribute_for(kind), self.config.custom_key_attribute
        )
        if key is None:
            raise PayloadError(
                "attributes",
                "the contact's key is missing (email, mobilePhone, socialSecurityNumber or "
                f"{self.config.custom_key_attribute})",
            )
        query = {
            name: _text(value, field)
            for name, field, value in (
                ("source", "source", source),
                ("storeExternalId", "store_external_id", store_external_id),
            )
            if value is not None
        }
        if create_as_unapproved:
            query["createAsUnapproved"] = "true"
        create = _Create(
            ref=new_ref(),
            body=body,
            contact_type=kind,
            key_name=key[0],
            key_value=key[1],
            query=query,
            if_exists=if_exists,
        )
        async with self._contact_lock(identity_key(key[0], key[1], kind)):
            if await outbox.queued_create(create.key_name, create.key_value, kind) is not None:
                # Its create is still queued: join it rather than race it.
                return await self._queue_create(create, lookup_first=True, reason="create queued")
            return await self._create_now(create)

    async def _create_now(self, create: _Create) -> Delivery:
        """Look the key up, then POST until Engage says what became of the contact; queue it
        (looked up first when `must_look_up_first` says so) if Engage cannot say in time.
        """
        until = self._deadline(_NETWORK_SHARE)
        outcomes: list[CreateOutcome] = []
        call = _http.create_contact(
            self._root,
            self.config.api_version,
            _http.encode_json(create.body),
            source=create.query.get("source"),
            store_external_id=create.query.get("storeExternalId"),
            create_as_unapproved="createAsUnapproved" in create.query,
        )
        delays = jittered_delays(self.config.retry_initial_delay, self.config.retry_max_delay)
        try:
            existing = await self._lookup_key(create, until)
            if existing is not None:
                return await self._existing(create, existing, until)
            for _ in range(self.config.retry_attempts):
                error: EngageError | None = None
                data: Any = None
                try:
                    data = await self._call(call, until=until)
                except (EngageConflict, EngageUnavailable, RateLimited) as exc:
                    error = exc
                outcome = create_outcome(data, error=error)
                outcomes.append(outcome)
                if outcome is CreateOutcome.CREATED:
                    return await self._created(create, data)
                if outcome is CreateOutcome.EXISTS:
                    assert error is not None
                    found = await self._lookup_key(create, until)
                    if found is None:
                        raise error
                    return await self._existing(create, found, until)
                if outcome is CreateOutcome.BEING_CREATED:
                    await self._pause(next(delays), until)
                    found = await self._lookup_key(create, until)
                    if found is not None:
                        return await self._existing(create, found, until)
                    continue
                if outcome is CreateOutcome.REJECTED:
                    assert error is not None
                    raise error
                if outcome is CreateOutcome.UNKNOWN or isinstance(error, CircuitOpen):
                    raise error or EngageUnavailable(
                        f"{call.target}: the answer named no contact", request_sent=True
                    )
                # Not applied (never sent, refused for now, or rolled back): try again.
                retry_after = error.retry_after if isinstance(error, RateLimited) else None
                await self._pause(max(next(delays), retry_after or 0.0), until)
            raise EngageUnavailable(f"POST {self._root}/contacts: no attempt succeeded")
        except (EngageUnavailable, RateLimited) as exc:
            if outcomes and outcomes[-1] is CreateOutcome.UNKNOWN:
                # The create may have been applied: one more look before queueing it.
                with contextlib.suppress(EngageError):
                    found = await self._lookup_key(create, until)
                    if found is not None:
                        return await self._remember_created(create, found, existed=False)
            lookup_first = must_look_up_first(outcomes)
            return await self._queue_create(create, lookup_first=lookup_first, reason=_reason(exc))

    async def _pause(self, wait: float, until: float) -> None:
        """Sleep before another attempt, or give up now if that would pass the deadline."""
        if self._clock.monotonic() + wait >= until:
            raise EngageTimeout(
                "the interactive deadline does not leave time for a retry", request_sent=False
            )
        await self._clock.sleep(wait)

    async def _lookup_key(self, create: _Create, until: float) -> str | None:
        return await self._lookup(
            lookup_parameter(create.key_name), create.key_value, create.contact_type, until
        )

    async def _created(self, create: _Create, data: Any) -> Delivery:
        contact = structure(data, Contact)
        guid = contact_id_in(data)
        assert guid is not None  # create_outcome said CREATED
        return await self._remember_created(create, guid, existed=False, contact=contact)

    async def _remember_created(
        self, create: _Create, guid: str, *, existed: bool, contact: Contact | None = None
    ) -> Delivery:
        outbox = self._ready()
        keys = [
            f"ref:{create.ref}",
            identity_key(create.key_name, create.key_value, create.contact_type),
        ]
        await outbox.remember(keys, guid)
        # Created as its type, or found by a lookup scoped to it.
        outbox.remember_type_later(guid, create.contact_type)
        return Delivery(
            queued=False, contact_id=guid, contact=contact, ref=create.ref, existed=existed
        )

    async def _existing(self, create: _Create, guid: str, until: float) -> Delivery:
        """The contact already exists: return it, or (``if_exists="update"``) update it too."""
        delivery = await self._remember_created(create, guid, existed=True)
        changes = update_for_existing(create.if_exists, create.body)
        if changes is None:
            return delivery
        target = _Target(contact_key(contact_id=guid), guid, create.ref)
        updated = await self._write_update(target, changes, until)
        return attrs.evolve(updated, ref=create.ref, existed=True, contact_id=guid)

    async def _queue_create(self, create: _Create, *, lookup_first: bool, reason: str) -> Delivery:
        queued = await self._enqueue(
            NewChange(
                Operation.CREATE,
                contact_key(ref=create.ref),
                body=create.body,
                ref=create.ref,
                contact_type=create.contact_type,
                key_name=create.key_name,
                key_value=create.key_value,
                query=create.query,
                lookup_first=lookup_first,
                if_exists=create.if_exists,
                reason=reason,
            )
        )
        return Delivery(
            queued=True,
            change_id=queued.change_id,
            ref=queued.ref or create.ref,
            existed=queued.duplicate,
        )

    async def update_contact(
        self,
        contact_id_or_ref: str,
        changes: Mapping[str, Any] | Any,
        *,
        avoid_triggering_export: bool | None = None,
    ) -> Delivery:
        """Change some of a contact's attributes (``PATCH /contacts/{id}``); queue if need be.

        `changes` holds only what changes. Queued, rather than sent, while earlier changes to
        the same contact wait in the outbox, so it never overtakes them.

        `avoid_triggering_export` (default: `config.avoid_triggering_export`) keeps the change
        out of Engage's BI and XML exports when it is replayed through ``PATCH
        /contacts/bulk``, the only call Engage takes it on; a change Engage takes at once, by
        the single PATCH, cannot carry it.

        Raises:
            EmptyValueError, PayloadError, TypeError, ValueError: bad input; nothing was sent.
            ContactNotFound: no such contact (never queued).
            InvalidRequest, EngageValidationError, EngageAuthError: Engage refused it.
            OutboxError: Engage could not take it and the outbox could not keep it either.
        """
        self._ready()
        if avoid_triggering_export is not None and not isinstance(avoid_triggering_export, bool):
            raise TypeError("avoid_triggering_export: must be a bool or None")
        body = prepare_payload(changes, "changes")
        if not body:
            raise ValueError("changes: must not be empty; give only what changes")
        if "contactType" in body:
            raise PayloadError(
                "changes.contactType", "a PATCH cannot change it; use update_contact_type()"
            )
        target = await self._target(contact_id_or_ref)
        query = (
            {}
            if avoid_triggering_export is None
            else {"avoidTriggeringExport": "true" if avoid_triggering_export else "false"}
        )
        async with self._contact_lock(target.contact_key):
            return await self._write_update(
                target, body, self._deadline(_NETWORK_SHARE), query=query
            )

    async def _write_update(
        self,
        target: _Target,
        body: dict[str, Any],
        until: float,
        *,
        query: Mapping[str, str] | None = None,
    ) -> Delivery:
        def send(guid: str) -> _http.Call:
            return _http.update_contact(
                self._root, self.config.api_version, guid, _http.encode_json(body)
            )

        return await self._write(
            NewChange(
                Operation.UPDATE,
                target.contact_key,
                body=body,
                contact_id=target.contact_id,
                ref=target.ref,
                query=query or None,
            ),
            send,
            until,
        )

    async def update_contact_type(self, contact_id_or_ref: str, contact_type_id: str) -> Delivery:
        """Change a contact's type (``POST /contacts/{id}/updateContactType``).

        With API v2, a change to ``Member`` goes through ``promoteToMember``, the only way
        v2 allows.
        """
        self._ready()
        kind = _text(contact_type_id, "contact_type_id")
        if self.config.api_version == 2 and kind.lower() == "member":
            return await self.promote_to_member(contact_id_or_ref)
        target = await self._target(contact_id_or_ref)
        async with self._contact_lock(target.contact_key):
            return await self._write(
                NewChange(
                    Operation.CONTACT_TYPE,
                    target.contact_key,
                    contact_id=target.contact_id,
                    ref=target.ref,
                    contact_type=kind,
                ),
                lambda guid: _http.update_contact_type(self._root, guid, kind),
                self._deadline(_NETWORK_SHARE),
            )

    async def promote_to_member(
        self,
        contact_id_or_ref: str,
        *,
        fields: Mapping[str, Any] | Any | None = None,
        source: str | None = None,
    ) -> Delivery:
        """Make the contact a Member (v3: updateContactType; v2: ``promoteToMember``).

        API v2's ``promoteToMember`` takes the fields a Member needs that the contact lacks
        (`fields`) and where the promotion comes from (`source`); v3's updateContactType takes
        neither (update the contact first).

        Raises:
            ValueError: `fields` or `source` with API v3.
        """
        self._ready()
        version = self.config.api_version
        body: dict[str, Any] | None = None
        query: dict[str, str] = {}
        if version >= 3 and (fields is not None or source is not None):
            raise ValueError(
                "fields, source: only API v2's promoteToMember takes them; with v3, "
                "update the contact first"
            )
        if fields is not None:
            body = prepare_payload(fields, "fields")
        if source is not None:
            query["source"] = _text(source, "source")
        target = await self._target(contact_id_or_ref)
        operation = Operation.CONTACT_TYPE if version >= 3 else Operation.PROMOTE
        encoded = None if body is None else _http.encode_json(body)
        async with self._contact_lock(target.contact_key):
            return await self._write(
                NewChange(
                    operation,
                    target.contact_key,
                    body=body,
                    contact_id=target.contact_id,
                    ref=target.ref,
                    contact_type="Member",
                    query=query or None,
                ),
                lambda guid: _http.promote_to_member(
                    self._root, version, guid, encoded, source=query.get("source")
                ),
                self._deadline(_NETWORK_SHARE),
            )

    async def _write(
        self, change: NewChange, send: Callable[[str], _http.Call], until: float
    ) -> Delivery:
        """Send a change now if nothing waits ahead of it, else (or on failure) queue it."""
        outbox = self._ready()
        if change.contact_id is None:
            return await self._queued(change, "waiting for the contact's create")
        if await outbox.has_active(change.contact_key):
            return await self._queued(change, "behind earlier changes to the same contact")
        try:
            data = await self._call(send(change.contact_id), until=until)
        except (EngageUnavailable, RateLimited) as exc:
            return await self._queued(change, _reason(exc))
        if change.operation is not Operation.UPDATE and change.contact_type:
            outbox.remember_type_later(change.contact_id, change.contact_type)
        else:
            self._learn_type(change.contact_id, data)
        contact = None
        if isinstance(data, Mapping) and data.get("id"):
            try:
                contact = structure(data, Contact)
            except UnexpectedResponse:
                # Engage applied the change; only its copy of the contact is unreadable.
                log.warning(
                    "%s: applied, but the contact in the answer could not be read", change.operation
                )
        return Delivery(queued=False, contact_id=change.contact_id, contact=contact, ref=change.ref)

    async def _queued(self, change: NewChange, reason: str) -> Delivery:
        queued = await self._enqueue(attrs.evolve(change, reason=reason))
        return Delivery(
            queued=True,
            contact_id=change.contact_id,
            change_id=queued.change_id,
            ref=change.ref,
        )

    async def _enqueue(self, change: NewChange) -> Queued:
        outbox = self._ready()
        queued = await outbox.enqueue(change)
        log.info(
            "queued %s %s for %s (%s)",
            change.operation,
            queued.change_id,
            change.contact_key,
            change.reason,
        )
        return queued

    # --- refs and targets --------------------------------------------------------------------

    async def resolve(self, ref: str) -> str | None:
        """The GUID a ref stands for, once known; else None.

        Answers from the identity map. For a create the flusher has sent but whose GUID is not
        yet known, asks Engage by the contact's key (and records the answer).

        Raises:
            ValueError: `ref` is not a ref (``ref_`` and 32 hex digits), or no create with
                it is known to this outbox (a ref made with another outbox, say).
        """
        outbox = self._ready()
        if not isinstance(ref, str) or not is_ref(ref):
            raise ValueError("ref: not a ref made by create_contact (ref_ and 32 hex digits)")
        known = await outbox.identity(f"ref:{ref}")
        if known is not None:
            return known
        create = await outbox.create_of(ref)
        if create is None:
            raise ValueError(f"ref: {_UNKNOWN_REF}")
        if create.state != "waiting_guid" or not create.key_name:
            return None
        found = await self._lookup(
            lookup_parameter(create.key_name),
            create.key_value or "",
            create.contact_type,
            self._deadline(),
        )
        if found is not None:
            await outbox.record_guid(create.seq, found)
        return found

    async def _target(self, contact_id_or_ref: str) -> _Target:
        outbox = self._ready()
        if isinstance(contact_id_or_ref, str) and is_ref(contact_id_or_ref):
            ref = contact_id_or_ref
            guid = await outbox.identity(f"ref:{ref}")
            if guid is not None:
                return _Target(contact_key(contact_id=guid), guid, ref)
            if await outbox.create_of(ref) is None:
                raise ValueError(f"contact_id_or_ref: {_UNKNOWN_REF}")
            return _Target(contact_key(ref=ref), None, ref)
        guid = normalize_contact_id(contact_id_or_ref, "contact_id_or_ref")
        return _Target(contact_key(contact_id=guid), guid)

    def _contact_type_of(self, body: Mapping[str, Any], given: str | None) -> str:
        in_body = body.get("contactType")
        if given is not None:
            given = _text(given, "contact_type")
            if in_body is not None and str(in_body).lower() != given.lower():
                raise ValueError("contact_type: differs from attributes['contactType']")
            return given
        if in_body is not None:
            return _text(in_body, "attributes.contactType")
        return self.config.default_contact_type

    @contextlib.asynccontextmanager
    async def _contact_lock(self, key: str) -> AsyncIterator[None]:
        """Serialise this session's writes to one contact, so their order is their call order."""
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@attrs.frozen
class _Create:
    """A create being attempted: what it sends and how it is looked up."""

    ref: str
    body: dict[str, Any] = attrs.field(repr=False)
    contact_type: str
    key_name: str
    key_value: str = attrs.field(repr=False)
    query: dict[str, str] = attrs.field(repr=False)
    if_exists: Literal["return", "update"]


def any_given(*values: object) -> bool:
    """Is any of `values` not None?"""
    return any(value is not None for value in values)


def _one_identifier(*, extra: str = "", **given: str | None) -> tuple[str, str]:
    named = [(name, value) for name, value in given.items() if value is not None]
    if len(named) != 1:
        choices = extra + ", ".join(given)
        raise ValueError(f"give exactly one identifier ({choices}); got {len(named)}")
    name, value = named[0]
    return name, _text(value, name)


def _text(value: object, field: str) -> str:
    """A text argument (an identifier, a contact type, a source), held to the payload's
    rules for text: it goes into a query string, a body or an XML element name.
    """
    if not isinstance(value, str):
        raise TypeError(f"{field}: must be a str, not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{field}: must not be empty")
    return check_text(value, field)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError("limit: must be a whole number of at least 1, or None")


def _reason(exc: BaseException) -> str:
    """Why a change was queued, for the outbox row: the error's summary, scrubbed."""
    return scrub(f"{type(exc).__name__}: {exc}")
