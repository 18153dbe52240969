"""Engage's contact endpoints over the simulator's store, without any I/O.

`Router.dispatch` takes what arrived (method, path, query, headers, body) and returns the
`Reply` Engage would give, or None when no endpoint has that method and path. Paths are matched
case-insensitively and query parameter names too, as Engage (an ASP.NET service) does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from ._fake_shapes import batch_id_body, batch_status_body, contact_id_body, error_body
from ._fake_store import (
    LOOKUP_PARAMETERS,
    Batch,
    BatchKind,
    ContactStore,
    EngageFailure,
    StoredContact,
    parse_contact_id,
)

MAX_BULK_ITEMS: Final = 4000
MAX_PAGE: Final = 100
LIST_SHAPES: Final = frozenset({"paged", "array"})
_CHANNELS: Final = frozenset({"POS", "ECOM", "OTHER"})

_PREFIX = re.compile(r"/api/v(?P<version>[23])(?P<rest>/.*)", re.IGNORECASE)
_SINGLE_CREATE = re.compile(r"/api/v[23]/contacts", re.IGNORECASE)
_ID = r"(?P<id>[^/]+)"


def is_single_create(method: str, path: str) -> bool:
    """Tell whether the request is a single contact create (`POST /api/v{2,3}/contacts`)."""
    return method == "POST" and _SINGLE_CREATE.fullmatch(path) is not None


@attrs.frozen
class Reply:
    """An answer to send: HTTP status and a JSON-able body."""

    status: int
    body: Any


@attrs.frozen
class Call:
    """One request as a handler sees it.

    `query` and `headers` are case-insensitive mappings; `path_id` is the `{id}` path segment.
    """

    version: int
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    path_id: str | None


Handler = Callable[[Call], Reply]


@attrs.frozen
class _Route:
    method: str
    pattern: re.Pattern[str]
    versions: frozenset[int]
    handler: Handler
    # (shape, choice): the route exists only while that answer shape is chosen.
    only_if: tuple[str, str] | None = None


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile(path.replace("{id}", _ID), re.IGNORECASE)


def _decode(body: bytes) -> Any:
    """Return the JSON body, or None when it is blank; raise 400 `InvalidData` if malformed."""
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise EngageFailure(400, "InvalidData", "The body is not valid JSON.") from None


def _json_object(body: bytes) -> dict[str, Any]:
    data = _decode(body)
    if data is None or data == {}:
        raise EngageFailure(400, "NoData", "The request body is empty.")
    if not isinstance(data, dict):
        raise EngageFailure(400, "InvalidData", "The body must be a JSON object.")
    return data


def _flag(params: Mapping[str, str], name: str) -> bool:
    raw = params.get(name)
    if raw is None or raw.lower() == "false":
        return False
    if raw.lower() == "true":
        return True
    raise EngageFailure(400, "InvalidData", f"{name} must be true or false.")


def _number(params: Mapping[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise EngageFailure(400, "InvalidData", f"{name} must be a non-negative integer.")
    return int(raw)


def _single(ids: list[str]) -> str:
    if not ids:
        raise EngageFailure(404, "ContactNotFound", "No contact matches the identifier.")
    if len(ids) > 1:
        raise EngageFailure(
            409,
            "MultipleMatches",
            "More than one contact matches the identifier.",
            {"multipleMatchesFound": ids},
        )
    return ids[0]


@attrs.define
class Router:
    """The endpoint table, bound to a store.

    Args:
        store: the contacts.
        on_batch: called with each accepted bulk batch; decides when it is processed.
        shape_of: returns the chosen answer shape by name: `"paged"` or `"array"` for a list
            endpoint, one of `_fake_shapes.SHAPES` for the others.
        default_contact_type: the tenant's default contact type (canonical spelling), which
            a bulk request without `contactType` is applied under.
    """

    store: ContactStore
    on_batch: Callable[[Batch], None]
    shape_of: Callable[[str], str]
    default_contact_type: str = "Member"
    _routes: list[_Route] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        both, v2, v3 = frozenset({2, 3}), frozenset({2}), frozenset({3})
        query_style, path_style = ("transactions_path", "query"), ("transactions_path", "path")
        # Fixed segments first: `/contacts/bulk` must not be read as a contact id.
        table: list[tuple[str, str, frozenset[int], Handler, tuple[str, str] | None]] = [
            ("GET", "/contacts/id", both, self._find_id, None),
            ("GET", "/contactoverview", both, self._overview, None),
            ("GET", "/contacts/bulk/status", both, self._bulk_status, None),
            ("POST", "/contacts/bulk", both, self._bulk_create, None),
            ("PATCH", "/contacts/bulk", both, self._bulk_update, None),
            ("GET", "/contacts/transactions", v3, self._transactions, query_style),
            ("GET", "/promotion-assignments", v3, self._promotions, None),
            ("GET", "/point-accounts", both, self._point_accounts, None),
            ("POST", "/contacts", both, self._create, None),
            ("GET", "/contacts/{id}", both, self._get_contact, None),
            ("PATCH", "/contacts/{id}", v3, self._update, None),
            ("POST", "/contacts/{id}", v2, self._update, None),
            ("POST", "/contacts/{id}/updateContactType", both, self._update_type, None),
            ("POST", "/contacts/{id}/promoteToMember", v2, self._promote, None),
            ("GET", "/contacts/{id}/transactions", v2, self._transactions, None),
            ("GET", "/contacts/{id}/transactions", v3, self._transactions, path_style),
            ("GET", "/contacts/{id}/promotions", v2, self._promotions, None),
        ]
        self._routes = [_Route(m, _pattern(p), v, h, only) for m, p, v, h, only in table]

    def dispatch(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Reply | None:
        """Answer a request that passed the header checks; None if no endpoint matches."""
        prefix = _PREFIX.fullmatch(path)
        if prefix is None:
            return None
        version, rest = int(prefix["version"]), prefix["rest"]
        for route in self._routes:
            if route.method != method or version not in route.versions:
                continue
            if route.only_if is not None and self.shape_of(route.only_if[0]) != route.only_if[1]:
                continue
            match = route.pattern.fullmatch(rest)
            if match is None:
                continue
            call = Call(version, query, headers, body, match.groupdict().get("id"))
            try:
                return route.handler(call)
            except EngageFailure as failure:
                return Reply(failure.status, error_body(failure, self.shape_of("error_body")))
        return None

    # Finding contacts ------------------------------------------------------------------------

    def _identifiers(self, call: Call) -> dict[str, str]:
        # An empty parameter counts as not sent.
        return {name: call.query[name] for name in LOOKUP_PARAMETERS if call.query.get(name)}

    def _optional_type(self, call: Call) -> str | None:
        raw = call.query.get("contactType")
        return self.store.canonical_type(raw) if raw else None

    def _find_id(self, call: Call) -> Reply:
        contact_type = self._optional_type(call)
        contact_id = _single(self.store.lookup(self._identifiers(call), contact_type))
        return Reply(200, contact_id_body(contact_id, self.shape_of("contact_id")))

    def _overview(self, call: Call) -> Reply:
        contact_type = self._optional_type(call)
        if call.version == 2 and contact_type is None:
            # The v2 page asks for contactType on every call, contactId or not.
            raise EngageFailure(400, "InvalidContactType", "contactType is required in API v2.")
        raw_id = call.query.get("contactId")
        if raw_id:
            contact = self.store.get(parse_contact_id(raw_id))
            if contact_type is not None and contact.contact_type != contact_type:
                raise EngageFailure(404, "ContactNotFound", "No contact of that type has that id.")
        else:
            identifiers = self._identifiers(call)
            if identifiers and contact_type is None:
                raise EngageFailure(
                    400, "InvalidContactType", "contactType is required unless contactId is given."
                )
            contact = self.store.get(_single(self.store.lookup(identifiers, contact_type)))
        return Reply(200, self.store.overview_json(contact))

    def _path_contact(self, call: Call) -> StoredContact:
        return self.store.get(parse_contact_id(call.path_id))

    def _get_contact(self, call: Call) -> Reply:
        return Reply(200, self.store.contact_json(self._path_contact(call)))

    # Writing contacts ------------------------------------------------------------------------

    def _create(self, call: Call) -> Reply:
        body = _json_object(call.body)
        contact_type = self.store.canonical_type(body.get("contactType") or "Member")
        # v3 moved these from headers to the query string, and ignores them as headers.
        params = call.query if call.version == 3 else call.headers
        contact = self.store.create(
            body,
            contact_type=contact_type,
            approved=not _flag(params, "createAsUnapproved"),
            source=params.get("source"),
            store_external_id=params.get("storeExternalId"),
        )
        return Reply(201, self.store.contact_json(contact))

    def _update(self, call: Call) -> Reply:
        contact_id = parse_contact_id(call.path_id)
        body = _json_object(call.body)
        contact = self.store.get(contact_id)
        self.store.update(contact, body)
        return Reply(200, self.store.contact_json(contact))

    def _update_type(self, call: Call) -> Reply:
        contact_id = parse_contact_id(call.path_id)
        contact_type = self.store.canonical_type(call.query.get("contactTypeId"))
        if call.version == 2 and contact_type.lower() == "member":
            raise EngageFailure(
                400, "InvalidContactType", "Use promoteToMember to make a contact a Member."
            )
        contact = self.store.get(contact_id)
        self.store.change_type(contact, contact_type)
        return Reply(200, self.store.contact_json(contact))

    def _promote(self, call: Call) -> Reply:
        """v2 promoteToMember: the body holds fields to set (the ones a Member requires and
        the contact lacks); an optional `source` header says where the promotion came from.
        """
        contact_id = parse_contact_id(call.path_id)
        changes = _decode(call.body) or {}
        if not isinstance(changes, dict):
            raise EngageFailure(400, "InvalidData", "The body must be a JSON object.")
        member = self.store.canonical_type("Member")
        contact = self.store.get(contact_id)
        self.store.change_type(contact, member, changes)
        contact.promotion_source = call.headers.get("source") or None
        return Reply(200, self.store.contact_json(contact))

    # Lists -----------------------------------------------------------------------------------

    def _list_contact(self, call: Call) -> StoredContact:
        raw = call.path_id if call.path_id is not None else call.query.get("contactId")
        return self.store.get(parse_contact_id(raw))

    def _page(self, call: Call, name: str, items: list[Any], *, links: bool = False) -> Reply:
        offset = _number(call.query, "offset", 0)
        count = min(_number(call.query, "count", MAX_PAGE), MAX_PAGE)
        page = items[offset : offset + count]
        if self.shape_of(name) == "array":
            return Reply(200, page)
        body: dict[str, Any] = {"links": []} if links else {}
        body.update({"items": page, "totalCount": len(items), "offset": offset, "count": count})
        return Reply(200, body)

    def _transactions(self, call: Call) -> Reply:
        contact = self._list_contact(call)
        return self._page(call, "transactions", contact.transactions)

    def _promotions(self, call: Call) -> Reply:
        contact = self._list_contact(call)
        channel = call.query.get("redemptionChannelType")
        promotions = contact.promotions
        if channel:
            if channel.upper() not in _CHANNELS:
                raise EngageFailure(
                    400, "NotAValidRedemptionChannel", "Use POS, ECOM or OTHER as channel type."
                )
            promotions = [
                promotion
                for promotion in promotions
                if any(
                    str(ch.get("type", "")).upper() == channel.upper()
                    for ch in promotion.get("redemptionChannels") or ()
                )
            ]
        return self._page(call, "promotion_assignments", promotions)

    def _point_accounts(self, call: Call) -> Reply:
        contact = self._list_contact(call)
        return self._page(call, "point_accounts", contact.point_accounts, links=True)

    # Bulk ------------------------------------------------------------------------------------

    def _bulk(self, call: Call, kind: BatchKind) -> Reply:
        items = _decode(call.body)
        if items is None or items == []:
            raise EngageFailure(400, "NoData", "The request body is empty.")
        if not isinstance(items, list):
            raise EngageFailure(400, "InvalidData", "The body must be a JSON array.")
        if len(items) > MAX_BULK_ITEMS:
            raise EngageFailure(
                400, "TooManyContacts", f"At most {MAX_BULK_ITEMS} contacts per request."
            )
        # Engage applies the whole request under one type: the tenant's default unless given.
        contact_type = self.store.canonical_type(
            call.query.get("contactType") or self.default_contact_type
        )
        # Engage documents avoidTriggeringExport as having an effect on updates only: a
        # create takes it (a malformed value is still refused) and ignores it.
        avoid_export = _flag(call.query, "avoidTriggeringExport") and kind == "update"
        batch = self.store.submit_batch(
            kind, contact_type, items, avoid_triggering_export=avoid_export
        )
        self.on_batch(batch)
        return Reply(202, batch_id_body(batch.id, self.shape_of("batch_id")))

    def _bulk_create(self, call: Call) -> Reply:
        return self._bulk(call, "create")

    def _bulk_update(self, call: Call) -> Reply:
        return self._bulk(call, "update")

    def _bulk_status(self, call: Call) -> Reply:
        raw = call.query.get("batchId")
        if not raw:
            raise EngageFailure(400, "InvalidData", "batchId is required.")
        batch = self.store.batches.get(raw.lower())
        if batch is None:
            raise EngageFailure(404, "BatchNotFound", "No batch has that id.")
        return Reply(200, batch_status_body(batch, self.shape_of("batch_status")))
