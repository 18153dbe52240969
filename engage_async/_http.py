"""Sans-I/O HTTP: what to send to Engage, and what its answers mean.

Pure functions only. A builder turns a method call into a `Call` (method, path, query,
body); `read_response` turns (status, headers, body) into JSON data or the typed exception of
`_errors`. The session is the one place that sends a `Call` over aiohttp, so everything here
is tested by feeding it recorded answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import quote, quote_plus

import attrs

from ._errors import (
    ContactNotFound,
    EngageAuthError,
    EngageConfigurationError,
    EngageConflict,
    EngageHTTPError,
    EngageServerError,
    EngageValidationError,
    InvalidRequest,
    MultipleMatches,
    RateLimited,
    UnexpectedResponse,
)
from ._keys import LOOKUP_PARAMETERS
from ._redact import SHORTEST_VALUE, scrub, sent_values

__all__ = [
    "Call",
    "error_for_status",
    "read_response",
]

MAX_BODY: Final = 2000
PAGE_SIZE: Final = 100
_GUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_.]{1,80}")


@attrs.frozen
class Call:
    """One request to Engage, ready to send.

    Attributes:
        method: the HTTP method.
        path: the path from the host on (``/api/v3/contacts/{id}``); holds no personal data.
        query: name/value pairs, percent-encoded by `url_suffix` (a ``+`` becomes ``%2B``).
        body: the JSON body, already encoded, or None.
        headers: extra headers (API v2 sends create options as headers).
        idempotent: sending it twice has the effect of sending it once, so it may be retried
            blindly. False for creates, which must be looked up before a second attempt.
        contact_call: a 404 means "no such contact" (rather than "no such endpoint").
    """

    method: str
    path: str
    query: tuple[tuple[str, str], ...] = ()
    body: bytes | None = attrs.field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    idempotent: bool = True
    contact_call: bool = True

    @property
    def target(self) -> str:
        """``POST /api/v3/contacts``: how messages name the call (never with the query)."""
        return f"{self.method} {self.path}"

    def url_suffix(self) -> str:
        """The path and the percent-encoded query string, to append to the base URL."""
        if not self.query:
            return self.path
        encoded = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in self.query)
        return f"{self.path}?{encoded}"


def encode_json(data: Any) -> bytes:
    """Compact UTF-8 JSON, as sent on the wire and stored in the outbox."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _query(**params: str | None) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in params.items() if value is not None)


# --- request builders ---------------------------------------------------------------------


def contact_id_lookup(root: str, identifiers: Mapping[str, str]) -> Call:
    """``GET /contacts/id``: the GUID for an email, phone, personal number or custom key."""
    return Call("GET", f"{root}/contacts/id", tuple(identifiers.items()))


def contact_overview(root: str, identifiers: Mapping[str, str]) -> Call:
    """``GET /contactoverview``: the enriched profile."""
    return Call("GET", f"{root}/contactoverview", tuple(identifiers.items()))


def get_contact(root: str, contact_id: str) -> Call:
    """``GET /contacts/{id}``."""
    return Call("GET", f"{root}/contacts/{contact_id}")


def create_contact(
    root: str,
    api_version: int,
    body: bytes,
    *,
    source: str | None,
    store_external_id: str | None,
    create_as_unapproved: bool,
) -> Call:
    """``POST /contacts``. v3 takes the options in the query string (as headers it would ignore
    them); v2 takes them as headers.
    """
    options = _query(
        source=source,
        storeExternalId=store_external_id,
        createAsUnapproved="true" if create_as_unapproved else None,
    )
    # A 404 here means the endpoint is missing, not a contact.
    if api_version >= 3:
        return Call("POST", f"{root}/contacts", options, body, idempotent=False, contact_call=False)
    return Call(
        "POST",
        f"{root}/contacts",
        (),
        body,
        headers=options,
        idempotent=False,
        contact_call=False,
    )


def update_contact(root: str, api_version: int, contact_id: str, body: bytes) -> Call:
    """v3 ``PATCH /contacts/{id}``; v2 ``POST /contacts/{id}`` (same semantics).

    Absolute values only, so sending it twice is harmless: idempotent.
    """
    method = "PATCH" if api_version >= 3 else "POST"
    return Call(method, f"{root}/contacts/{contact_id}", (), body)


def update_contact_type(root: str, contact_id: str, contact_type: str) -> Call:
    """``POST /contacts/{id}/updateContactType?contactTypeId=``: the only way to change a type."""
    return Call(
        "POST",
        f"{root}/contacts/{contact_id}/updateContactType",
        _query(contactTypeId=contact_type),
    )


def promote_to_member(
    root: str,
    api_version: int,
    contact_id: str,
    body: bytes | None = None,
    *,
    source: str | None = None,
) -> Call:
    """v3: updateContactType to Member; v2: ``POST /contacts/{id}/promoteToMember`` with a body
    of the fields a Member needs (`body`, an empty object when none) and an optional
    ``source`` header.
    """
    if api_version >= 3:
        return update_contact_type(root, contact_id, "Member")
    return Call(
        "POST",
        f"{root}/contacts/{contact_id}/promoteToMember",
        (),
        body if body is not None else b"{}",
        headers=_query(source=source),
    )


def transactions(root: str, api_version: int, contact_id: str, offset: int, count: int) -> Call:
    """A page of a contact's purchases and returns.

    v3 takes the contact in the query (``/contacts/transactions?contactId=``, as the contacts
    flow documents it); v2 in the path.
    """
    page = _query(offset=str(offset), count=str(count))
    if api_version >= 3:
        return Call("GET", f"{root}/contacts/transactions", (("contactId", contact_id), *page))
    return Call("GET", f"{root}/contacts/{contact_id}/transactions", page)


def promotion_assignments(
    root: str, api_version: int, contact_id: str, channel: str | None, offset: int, count: int
) -> Call:
    """A contact's active promotions, optionally for one redemption channel."""
    page = _query(redemptionChannelType=channel, offset=str(offset), count=str(count))
    if api_version >= 3:
        return Call("GET", f"{root}/promotion-assignments", (("contactId", contact_id), *page))
    return Call("GET", f"{root}/contacts/{contact_id}/promotions", page)


def point_accounts(root: str, contact_id: str, offset: int, count: int) -> Call:
    """A page of a contact's point accounts."""
    return Call(
        "GET",
        f"{root}/point-accounts",
        _query(contactId=contact_id, offset=str(offset), count=str(count)),
    )


def bulk_create(root: str, contact_type: str, body: bytes) -> Call:
    """``POST /contacts/bulk?contactType=``: up to 4000 creates of one type, as a batch."""
    return Call(
        "POST",
        f"{root}/contacts/bulk",
        _query(contactType=contact_type),
        body,
        idempotent=False,
        contact_call=False,
    )


def bulk_update(
    root: str, contact_type: str, body: bytes, *, avoid_triggering_export: bool = False
) -> Call:
    """``PATCH /contacts/bulk?contactType=``: up to 4000 updates of contacts of that type, each
    naming its contactId. Engage applies a bulk request under its ``contactType`` (the
    tenant's default when none is given), so every item must be of that type.
    ``avoidTriggeringExport`` keeps the change out of Engage's BI and XML exports.
    """
    query = _query(
        contactType=contact_type,
        avoidTriggeringExport="true" if avoid_triggering_export else None,
    )
    return Call("PATCH", f"{root}/contacts/bulk", query, body, idempotent=False, contact_call=False)


def bulk_status(root: str, batch_id: str) -> Call:
    """``GET /contacts/bulk/status?batchId=``."""
    return Call("GET", f"{root}/contacts/bulk/status", _query(batchId=batch_id), contact_call=False)


# --- reading answers ----------------------------------------------------------------------

# Engage's documented verdicts on a request: these statuses are about the request itself.
# Any other 4xx comes from something between us and Engage, and says nothing about the request.
_VERDICTS: Final = frozenset({400, 401, 403, 404, 409, 422, 429})
# Engage gives these with its JSON error body; under an HTML page they are a proxy's.
_JSON_VERDICTS: Final = frozenset({400, 404, 409, 422})
_NOT_JSON: Final = object()
# No email, phone or personal number runs across these (they end `_redact`'s patterns).
_BREAK = re.compile(r"[\s\"'<>(),;:\[\]{}]")
# A run that long between breaks is no value worth reading (base64, minified code); dropping
# it keeps the scrubber linear, whose email pattern costs the square of a run's length.
_LONG_RUN = re.compile(r"[^\s\"'<>(),;:\[\]{}]{80,}")
# A URL's query string (``?email=...``) and a percent-encoded email, as a page may echo them.
_QUERY_OR_ENCODED = re.compile(
    r"\?[^\s\"'<>#?=]*=[^\s\"'<>#]*|[^\s\"'<>(),;:\[\]{}%]+%40[^\s\"'<>(),;:\[\]{}]+"
)
_PERSONAL_PARAMETERS: Final = frozenset(LOOKUP_PARAMETERS.values())
# Printable ASCII without a quote or backslash: JSON writes it unchanged.
_PLAIN_JSON = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
# Details are kept from error bodies up to this size; Engage's are a few hundred bytes.
_MAX_DETAILS_BODY: Final = 256 * 1024
_DETAILS_DEPTH: Final = 32
_BLANK = re.compile(rb"\s*\Z")
_MARKUP = re.compile(rb"\s*<")


def read_response(call: Call, status: int, headers: Mapping[str, str], body: bytes) -> Any:
    """The JSON of a 2xx answer (None when empty), or raise what the answer means.

    Raises:
        EngageHTTPError: Engage's verdict; a subclass chosen by `error_for_status`.
        UnexpectedResponse: not a usable answer from Engage (see `error_for_status`), or a
            2xx whose body is not JSON.
    """
    if not 200 <= status < 300:
        raise error_for_status(call, status, headers, body)
    if _BLANK.match(body):
        return None
    data = _json(body)
    if data is _NOT_JSON:
        raise UnexpectedResponse(
            f"{call.target} -> {status}: the answer is not JSON ({_content_type(headers)})",
            status=status,
        )
    return data


def _json(body: bytes) -> Any:
    """The decoded JSON, or `_NOT_JSON`."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than json reads
        return _NOT_JSON


def _content_type(headers: Mapping[str, str]) -> str:
    value = (_header(headers, "content-type") or "").split(";")[0].strip()
    return scrub(value, limit=80) if value else "no content type"


def _header(headers: Mapping[str, str], wanted: str) -> str | None:
    for name, value in headers.items():
        if name.lower() == wanted:
            return value
    return None


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (seconds or an HTTP date, counted from
    `now`, epoch seconds, by default the system's clock), if any.
    """
    return _parse_retry_after(_header(headers, "retry-after"), now)


def _parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" means "UTC, source unknown" in RFC 5322
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC) if now is None else datetime.fromtimestamp(now, UTC)
    return max(0.0, (when - current).total_seconds())


def _echoes(call: Call, answer: str) -> tuple[str, ...]:
    """The personal values `call` sent that `answer` (its raw text) repeats, in every form an
    answer may give them, longest first: those of its query (raw and percent-encoded), and
    every text of its JSON body (raw and JSON-escaped). Scrubbing alone would miss a custom
    key, a name or a street.

    Only the values the answer repeats are kept: a bulk body sends thousands, and each kept
    one is replaced in every text taken from the answer.
    """
    groups: list[tuple[str, ...]] = [
        (value, quote(value, safe=""), quote_plus(value))
        for name, value in call.query
        if name in _PERSONAL_PARAMETERS and len(value) >= SHORTEST_VALUE
    ]
    if call.body and answer.strip():
        groups += [_json_forms(text) for text in _sent_texts(call.body)]
    forms = {form for group in groups if any(form in answer for form in group) for form in group}
    return tuple(sorted(forms, key=len, reverse=True))


def _json_forms(text: str) -> tuple[str, ...]:
    """`text` as it is, and as JSON writes it (escaped to ASCII or not). Most texts are
    plain ASCII, which JSON writes as they are: a bulk body holds thousands.
    """
    if _PLAIN_JSON.fullmatch(text):
        return (text,)
    return (text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1])


def _sent_texts(body: bytes) -> set[str]:
    """The values of a JSON body we sent (`sent_values`). Only asked on an error, so a bulk
    body's cost is paid only then.
    """
    try:
        return sent_values(json.loads(body))
    except ValueError:
        return set()


def _safe_text(text: str, echoes: tuple[str, ...] = (), limit: int = MAX_BODY) -> str:
    """`text` cut to at most `limit` characters and cleaned of personal data: the call's own
    query values (`echoes`), query strings of URLs, percent-encoded emails, and whatever
    `scrub` recognises.

    A long text is cut where no email, phone or personal number can run across (and trailing
    digits are dropped), so no readable piece of one survives. Runs of 80 characters or more
    without a break become ``...``. Both keep the scrubber's cost linear in `limit`.
    """
    text = text[: limit * 4]
    for echo in echoes:
        text = text.replace(echo, "***")
    text = _QUERY_OR_ENCODED.sub("***", _LONG_RUN.sub("...", text))
    if len(text) > limit:
        head = text[: limit + 1]
        breaks = [match.start() for match in _BREAK.finditer(head)]
        text = head[: breaks[-1]].rstrip("0123456789+- ") + "..." if breaks else "..."
    return scrub(text, limit=limit + 3)


def _scrubbed(value: Any, echoes: tuple[str, ...], depth: int = 0) -> Any:
    """`value` (decoded JSON) with every text cleaned by `_safe_text`; its shape kept, its
    depth bounded.
    """
    if isinstance(value, str):
        return _safe_text(value, echoes)
    if depth >= _DETAILS_DEPTH:
        return "..."
    if isinstance(value, Mapping):
        return {
            _safe_text(str(k), echoes, 200): _scrubbed(v, echoes, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrubbed(item, echoes, depth + 1) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool) and str(value) in echoes:
        return "***"  # a number the call sent (a personal or member number), repeated
    return value


def _lowered(data: Mapping[Any, Any]) -> dict[str, Any]:
    """The object's members by lower-cased name (Engage's casing is not documented)."""
    return {str(key).lower(): value for key, value in data.items()}


def _error_fields(data: Any) -> tuple[str | None, str | None, dict[str, Any]]:
    """Error code, message and details of a decoded error body, read leniently.

    Engage's error schema is not published. The code is the first identifier-like text under
    ``errorCode``, ``code`` or ``error`` (any letter case), else an identifier-like message;
    the message is under ``message``, ``detail``, ``title`` or ``errorMessage``, else a free
    text found under a code's name; a bare JSON string is both. The details are
    ``messageDetails`` (else ASP.NET's ``errors`` or ``modelState``), as a dict; anything
    other than an object is kept under ``"value"``. An array takes its first object (a list
    of errors). Texts come back unscrubbed; the caller scrubs them.
    """
    if isinstance(data, list):
        data = next((item for item in data if isinstance(item, Mapping | str)), None)
    if isinstance(data, str):
        return (data if _IDENTIFIER.fullmatch(data) else None), data, {}
    if not isinstance(data, Mapping):
        return None, None, {}
    lowered = _lowered(data)
    texts = {key: value for key, value in lowered.items() if isinstance(value, str)}
    # Only an identifier is a code; free text under "error" or "code" is a message, and goes
    # through the scrubber like one.
    candidates = [texts[key] for key in ("errorcode", "code", "error") if texts.get(key)]
    code = next((text for text in candidates if _IDENTIFIER.fullmatch(text)), None)
    message = next(
        (texts[key] for key in ("message", "detail", "title", "errormessage") if texts.get(key)),
        next((text for text in candidates if text != code), None),
    )
    if code is None and message is not None and _IDENTIFIER.fullmatch(message):
        code = message
    details = next(
        (lowered[key] for key in ("messagedetails", "errors", "modelstate") if key in lowered),
        None,
    )
    if details is None:
        details = {}
    elif not isinstance(details, Mapping):
        details = {"value": details}
    return code, message, dict(details)


def _is_page(headers: Mapping[str, str], body: bytes, data: Any) -> bool:
    """Is the body a web page (a proxy's, a load balancer's) rather than Engage's JSON?"""
    if data is not _NOT_JSON:
        return False
    kind = _content_type(headers).lower()
    return "html" in kind or "xml" in kind or _MARKUP.match(body) is not None


_STATUS_CLASSES: Final[dict[int, type[EngageHTTPError]]] = {
    400: InvalidRequest,
    401: EngageAuthError,
    403: EngageAuthError,
    409: EngageConflict,
    422: EngageValidationError,
    429: RateLimited,
}


def error_for_status(
    call: Call, status: int, headers: Mapping[str, str], body: bytes
) -> EngageHTTPError | UnexpectedResponse:
    """The exception for an answer that is not a 2xx: one pure function from status and body
    to class.

    Only Engage's verdicts are `EngageHTTPError`s that are not `EngageUnavailable`: 400, 404,
    409 and 422 with Engage's body (JSON, or none), 401 and 403, 429. Every 5xx is an
    `EngageServerError` (``InvalidSystemConfiguration`` an `EngageConfigurationError`),
    whatever its body. Everything else is `UnexpectedResponse`, "outcome unknown": a 1xx or
    3xx (redirects are never followed), any other 4xx, and an HTML page under 400, 404, 409
    or 422, which a proxy sent, not Engage.

    Text taken from the body (`message`, `details`, `body`) is truncated and scrubbed.
    """
    blank = _BLANK.match(body) is not None
    data = None if blank else _json(body)
    page = _is_page(headers, body, data)
    if (
        status < 400
        or (status < 500 and status not in _VERDICTS)
        or (status in _JSON_VERDICTS and page)
    ):
        return _not_a_verdict(call, status, headers, body, page=page)
    code, raw_message, raw_details = _error_fields(None if data is _NOT_JSON else data)
    echoes = _echoes(call, body.decode("utf-8", errors="replace"))
    message = _safe_text(raw_message, echoes) if raw_message is not None else None
    details = _scrubbed(raw_details, echoes) if len(body) <= _MAX_DETAILS_BODY else {}
    summary = f"{call.target} -> {status}"
    if code:
        summary += f" {code}"
    if message and raw_message != code:
        summary += f": {scrub(message)}"
    elif not code and not blank:
        summary += f" ({_content_type(headers)} body)"
    common: dict[str, Any] = {
        "status": status,
        "error_code": code,
        "message": message,
        "details": details,
        "body": _safe_text(body[: MAX_BODY * 4].decode("utf-8", errors="replace"), echoes),
        "method": call.method,
        "path": call.path,
    }
    if status == 404:
        # Without Engage's code, a 404 means "no such contact" only on a contact call.
        is_contact = code == "ContactNotFound" or (code is None and call.contact_call)
        cls: type[EngageHTTPError] = ContactNotFound if is_contact else EngageHTTPError
        return cls(summary, **common)
    if status == 409 and code == "MultipleMatches":
        found = details.get("multipleMatchesFound") or ()
        ids = [str(item).lower() for item in found] if isinstance(found, list) else []
        return MultipleMatches(summary, contact_ids=ids, **common)
    if status == 429:
        retry_after = _parse_retry_after(_header(headers, "retry-after"))
        return RateLimited(summary, retry_after=retry_after, **common)
    if status >= 500:
        if code is not None and code.lower() == "invalidsystemconfiguration":
            return EngageConfigurationError(summary, **common)
        return EngageServerError(summary, **common)
    return _STATUS_CLASSES[status](summary, **common)


def _not_a_verdict(
    call: Call, status: int, headers: Mapping[str, str], body: bytes, *, page: bool
) -> UnexpectedResponse:
    if 300 <= status < 400:
        what = "a redirect, not followed"
    elif page:
        what = "a web page, not Engage's answer"
    else:
        what = "not an answer Engage gives"
    if not _BLANK.match(body):
        what += f" ({_content_type(headers)} body)"
    return UnexpectedResponse(f"{call.target} -> {status}: {what}", status=status)


def read_contact_id(data: Any) -> str | None:
    """The GUID in a ``/contacts/id`` answer.

    Engage answers a bare JSON string (sometimes quoted once more); an object with
    ``contactId`` or ``id`` (any letter case) is read too. Whether it is a GUID is the
    caller's check.
    """
    if isinstance(data, Mapping):
        lowered = _lowered(data)
        data = lowered.get("contactid", lowered.get("id"))
    return data.strip().strip('"') or None if isinstance(data, str) else None


def read_contact_type(data: Any) -> str | None:
    """The contact type in a contact's JSON (``meta.contactType``, or top level), if any."""
    if not isinstance(data, Mapping):
        return None
    # The documented spelling first: lower-casing a whole contact costs more than the read.
    meta = data.get("meta")
    if isinstance(meta, Mapping) and isinstance(meta.get("contactType"), str):
        value: Any = meta["contactType"]
        if value.strip():
            return str(value.strip())
    top = _lowered(data)
    meta = top.get("meta")
    for holder in (_lowered(meta) if isinstance(meta, Mapping) else {}, top):
        value = holder.get("contacttype")
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def read_page(data: Any) -> tuple[list[Any], int | None]:
    """Items and total of a list answer, which Engage gives either as a bare array or as a
    paged object ``{"items": [...], "totalCount": n, ...}`` (any letter case); the total is
    None for arrays and when it is not a whole number.
    """
    if isinstance(data, list):
        return data, None
    if isinstance(data, Mapping):
        lowered = _lowered(data)
        items = lowered.get("items")
        total = lowered.get("totalcount")
        return (
            list(items) if isinstance(items, list) else [],
            total if isinstance(total, int) and not isinstance(total, bool) else None,
        )
    return [], None


def read_batch_id(data: Any) -> str | None:
    """The batch id from a bulk answer: a bare JSON string (what the v2 swagger describes),
    or an object with ``batchId`` or ``id`` (any letter case); a number is read as text.
    """
    if isinstance(data, Mapping):
        lowered = _lowered(data)
        data = lowered.get("batchid", lowered.get("id"))
    if isinstance(data, int) and not isinstance(data, bool):
        data = str(data)
    return data.strip() or None if isinstance(data, str) else None


_FINISHED = frozenset(
    {
        "finished", "completed", "complete", "done", "processed", "succeeded", "success",
        "successful", "failed", "failure", "error", "errored", "partiallyfailed",
        "partiallysucceeded", "finishedwitherrors", "completedwitherrors", "aborted",
    }
)  # fmt: skip
_FAILED = frozenset({"failed", "failure", "error", "errored", "aborted"})


@attrs.frozen
class ItemFailure:
    """One item of a bulk batch that Engage reports as failed; any field may be missing."""

    index: int | None = None
    contact_id: str | None = None
    key: str | None = attrs.field(default=None, repr=False)
    error_code: str | None = None
    message: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class BatchStatus:
    """What a bulk status answer says, read leniently (Engage's schema is not published).

    Attributes:
        finished: the batch will not change any more.
        failed_entirely: Engage reports the batch as a whole failed.
        failures: the items it names as failed.
        failed_count: how many failed by its count, when it gives one.
        contact_ids: (index in the request, GUID) of the items it names as done with their
            contact's id, when it gives them (a created contact then needs no lookup).
    """

    finished: bool
    failed_entirely: bool = False
    failures: tuple[ItemFailure, ...] = ()
    failed_count: int | None = None
    contact_ids: tuple[tuple[int, str], ...] = ()


def _word(value: Any) -> str:
    return "".join(ch for ch in str(value).lower() if ch.isalnum())


def read_batch_status(data: Any) -> BatchStatus:
    """Read a ``/contacts/bulk/status`` answer; an unknown state counts as not finished."""
    if not isinstance(data, Mapping):
        return BatchStatus(finished=False)
    lowered = {str(key).lower(): value for key, value in data.items()}
    state = next(
        (_word(lowered[k]) for k in ("status", "state", "batchstatus") if k in lowered), ""
    )
    finished = state in _FINISHED or lowered.get("finished") is True
    failures: list[ItemFailure] = []
    for name in ("failures", "errors", "faileditems", "failed", "failedrows"):
        items = lowered.get(name)
        if isinstance(items, list):
            failures.extend(_item_failure(item) for item in items if isinstance(item, Mapping))
            break
    count = next(
        (lowered[k] for k in ("failedcount", "failurecount", "errorcount", "numberoffailed")
         if isinstance(lowered.get(k), int)),
        None,
    )  # fmt: skip
    return BatchStatus(
        finished=finished,
        failed_entirely=state in _FAILED,
        failures=tuple(failures),
        failed_count=count,
        contact_ids=_item_contact_ids(lowered),
    )


def _item_contact_ids(lowered: Mapping[str, Any]) -> tuple[tuple[int, str], ...]:
    """The GUIDs a status gives per item: a list aligned with the request (``contactIds``), or
    per-item results (``items``/``results``) naming an index (or a row from 1) and a
    ``contactId`` without an error. Anything else gives none (the creates are then looked up).
    """
    aligned = lowered.get("contactids")
    if isinstance(aligned, list):
        return tuple(
            (index, value.lower())
            for index, value in enumerate(aligned)
            if isinstance(value, str) and _GUID_TEXT.fullmatch(value)
        )
    for name in ("items", "results", "itemresults"):
        items = lowered.get(name)
        if isinstance(items, list):
            found: list[tuple[int, str]] = []
            for item in items:
                if not isinstance(item, Mapping):
                    continue
                result = _item_failure(item)
                contact_id = result.contact_id
                if result.error_code or result.index is None or contact_id is None:
                    continue
                if _GUID_TEXT.fullmatch(contact_id):
                    found.append((result.index, contact_id.lower()))
            return tuple(found)
    return ()


def _item_failure(item: Mapping[str, Any]) -> ItemFailure:
    lowered = {str(key).lower(): value for key, value in item.items()}
    index: int | None = None
    if isinstance(lowered.get("index"), int):
        index = lowered["index"]
    else:
        # Row numbers are counted from one, as people count rows.
        for name in ("rownumber", "row", "position", "line"):
            if isinstance(lowered.get(name), int):
                index = lowered[name] - 1
                break
    contact_id = lowered.get("contactid") or lowered.get("id")
    key = next(
        (str(lowered[k]) for k in ("key", "keyvalue", "email", "mobilephone",
                                     "socialsecuritynumber", "externalid")
         if isinstance(lowered.get(k), str)),
        None,
    )  # fmt: skip
    code = next((str(lowered[k]) for k in ("errorcode", "code", "error") if lowered.get(k)), None)
    message = next(
        (str(lowered[k]) for k in ("message", "detail", "reason") if lowered.get(k)), None
    )
    return ItemFailure(
        index=index,
        contact_id=str(contact_id) if isinstance(contact_id, str) else None,
        key=key,
        error_code=code,
        message=message,
    )
