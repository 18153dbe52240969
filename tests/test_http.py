"""The sans-I/O layer: request builders, and answers turned into data or typed exceptions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from engage_async import (
    ContactNotFound,
    EngageAuthError,
    EngageConfigurationError,
    EngageConflict,
    EngageHTTPError,
    EngageServerError,
    EngageUnavailable,
    EngageValidationError,
    InvalidRequest,
    MultipleMatches,
    RateLimited,
    UnexpectedResponse,
    _http,
)
from engage_async._http import Call, error_for_status, read_response

V3 = "/api/v3"
V2 = "/api/v2"
GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
OTHER_GUID = "b16fd8f3-d0f5-aaaa-aa60-b00300f9aaaa"
JSON = {"Content-Type": "application/json; charset=utf-8"}
HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@pytest.fixture(name="contact_call")
def contact_call_fixture() -> Call:
    """A call about one contact, where a 404 means no such contact."""
    return _http.get_contact(V3, GUID)


@pytest.fixture(name="other_call")
def other_call_fixture() -> Call:
    """A call that is not about a contact (a 404 there is just "not found")."""
    return _http.bulk_status(V3, "batch-1")


def body(data: object) -> bytes:
    """`data` as a JSON body."""
    return json.dumps(data).encode()


# --- Call -----------------------------------------------------------------------------------------


def test_url_suffix_without_query() -> None:
    """A call without a query is just its path."""
    assert f"/api/v3/contacts/{GUID}" == _http.get_contact(V3, GUID).url_suffix()


def test_url_suffix_encodes_plus_as_2b() -> None:
    """A + in a phone number reaches the query as %2B, never as a + (which reads as a space)."""
    call = _http.contact_id_lookup(V3, {"mobilePhone": "+46735654321"})

    assert "/api/v3/contacts/id?mobilePhone=%2B46735654321" == call.url_suffix()


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("jane.doe@gmail.com", "jane.doe%40gmail.com"),
        ("anna+news@example.com", "anna%2Bnews%40example.com"),
        ("a b", "a%20b"),
        ("x&y=z", "x%26y%3Dz"),
        ("åsa/ö", "%C3%A5sa%2F%C3%B6"),
        ("50%", "50%25"),
    ],
)
def test_url_suffix_percent_encodes_every_reserved_character(value: str, encoded: str) -> None:
    """Query values are percent-encoded in full (UTF-8), so none can split or change the query."""
    call = _http.contact_overview(V3, {"email": value, "contactType": "Member"})

    assert f"/api/v3/contactoverview?email={encoded}&contactType=Member" == call.url_suffix()


def test_target_never_holds_the_query() -> None:
    """`target`, which names the call in messages, leaves the (personal) query out."""
    call = _http.contact_id_lookup(V3, {"email": "anna@example.com"})

    assert "GET /api/v3/contacts/id" == call.target


def test_call_repr_hides_body_and_headers() -> None:
    """The repr of a call shows neither the JSON body nor the headers."""
    call = _http.create_contact(
        V2,
        2,
        b'{"email":"anna@example.com"}',
        source="POS",
        store_external_id="600",
        create_as_unapproved=False,
    )

    assert "anna@example.com" not in repr(call)
    assert "600" not in repr(call)


def test_encode_json_is_compact_utf8() -> None:
    """Bodies are compact JSON with non-ASCII kept as UTF-8."""
    assert '{"firstName":"Åsa","age":3}'.encode() == _http.encode_json(
        {"firstName": "Åsa", "age": 3}
    )


# --- request builders -----------------------------------------------------------------------------


def test_contact_id_lookup() -> None:
    """GET /contacts/id with the identifiers, in order, as the query."""
    call = _http.contact_id_lookup(V3, {"email": "a@b.se", "contactType": "Member"})

    assert (
        Call("GET", "/api/v3/contacts/id", (("email", "a@b.se"), ("contactType", "Member"))) == call
    )


def test_contact_overview() -> None:
    """GET /contactoverview with the identifiers as the query."""
    call = _http.contact_overview(V3, {"contactId": GUID})

    assert Call("GET", "/api/v3/contactoverview", (("contactId", GUID),)) == call


def test_get_contact() -> None:
    """GET /contacts/{id}, idempotent, a contact call."""
    call = _http.get_contact(V3, GUID)

    assert ("GET", f"/api/v3/contacts/{GUID}", (), None, True, True) == (
        call.method,
        call.path,
        call.query,
        call.body,
        call.idempotent,
        call.contact_call,
    )


def test_create_contact_v3_sends_options_in_the_query() -> None:
    """v3 create: source, storeExternalId and createAsUnapproved go in the query, no headers."""
    call = _http.create_contact(
        V3, 3, b"{}", source="POS", store_external_id="600", create_as_unapproved=True
    )

    assert (
        "POST",
        "/api/v3/contacts",
        (("source", "POS"), ("storeExternalId", "600"), ("createAsUnapproved", "true")),
        (),
        b"{}",
    ) == (call.method, call.path, call.query, call.headers, call.body)


def test_create_contact_v2_sends_options_as_headers() -> None:
    """v2 create: the same options go as headers, and the query stays empty."""
    call = _http.create_contact(
        V2, 2, b"{}", source="POS", store_external_id="600", create_as_unapproved=True
    )

    assert (
        "POST",
        "/api/v2/contacts",
        (),
        (("source", "POS"), ("storeExternalId", "600"), ("createAsUnapproved", "true")),
    ) == (call.method, call.path, call.query, call.headers)


@pytest.mark.parametrize("version", [2, 3])
def test_create_contact_leaves_out_unset_options(version: int) -> None:
    """Options not given are not sent at all; createAsUnapproved=False is Engage's default."""
    call = _http.create_contact(
        f"/api/v{version}",
        version,
        b"{}",
        source=None,
        store_external_id=None,
        create_as_unapproved=False,
    )

    assert ((), ()) == (call.query, call.headers)


@pytest.mark.parametrize("version", [2, 3])
def test_create_contact_is_not_idempotent(version: int) -> None:
    """A create must never be retried blindly."""
    call = _http.create_contact(
        f"/api/v{version}",
        version,
        b"{}",
        source=None,
        store_external_id=None,
        create_as_unapproved=False,
    )

    assert call.idempotent is False


@pytest.mark.parametrize(
    ("version", "method", "path"),
    [(3, "PATCH", f"/api/v3/contacts/{GUID}"), (2, "POST", f"/api/v2/contacts/{GUID}")],
)
def test_update_contact_method_per_version(version: int, method: str, path: str) -> None:
    """Update is PATCH in v3 and POST in v2, with the body as given; absolute, so idempotent."""
    call = _http.update_contact(f"/api/v{version}", version, GUID, b'{"city":"Lund"}')

    assert (method, path, (), b'{"city":"Lund"}', True) == (
        call.method,
        call.path,
        call.query,
        call.body,
        call.idempotent,
    )


def test_update_contact_type() -> None:
    """POST /contacts/{id}/updateContactType?contactTypeId=<type>."""
    call = _http.update_contact_type(V3, GUID, "Ecom")

    assert ("POST", f"/api/v3/contacts/{GUID}/updateContactType", (("contactTypeId", "Ecom"),)) == (
        call.method,
        call.path,
        call.query,
    )


def test_promote_to_member_v3_is_update_contact_type() -> None:
    """v3 promotes through updateContactType with Member."""
    assert _http.update_contact_type(V3, GUID, "Member") == _http.promote_to_member(V3, 3, GUID)


def test_promote_to_member_v2_uses_its_own_endpoint() -> None:
    """v2 promotes through POST /contacts/{id}/promoteToMember (updateContactType refuses it)."""
    call = _http.promote_to_member(V2, 2, GUID)

    assert ("POST", f"/api/v2/contacts/{GUID}/promoteToMember", ()) == (
        call.method,
        call.path,
        call.query,
    )


def test_transactions_v3_takes_the_contact_in_the_query() -> None:
    """v3: GET /contacts/transactions?contactId=&offset=&count=."""
    call = _http.transactions(V3, 3, GUID, 200, 100)

    assert (
        Call(
            "GET",
            "/api/v3/contacts/transactions",
            (("contactId", GUID), ("offset", "200"), ("count", "100")),
        )
        == call
    )


def test_transactions_v2_takes_the_contact_in_the_path() -> None:
    """v2: GET /contacts/{id}/transactions?offset=&count=."""
    call = _http.transactions(V2, 2, GUID, 0, 50)

    assert (
        Call("GET", f"/api/v2/contacts/{GUID}/transactions", (("offset", "0"), ("count", "50")))
        == call
    )


def test_promotion_assignments_v3() -> None:
    """v3: GET /promotion-assignments?contactId=, with the channel when given."""
    call = _http.promotion_assignments(V3, 3, GUID, "POS", 0, 100)

    assert (
        Call(
            "GET",
            "/api/v3/promotion-assignments",
            (
                ("contactId", GUID),
                ("redemptionChannelType", "POS"),
                ("offset", "0"),
                ("count", "100"),
            ),
        )
        == call
    )


def test_promotion_assignments_v2_without_channel() -> None:
    """v2: GET /contacts/{id}/promotions; no channel means no redemptionChannelType."""
    call = _http.promotion_assignments(V2, 2, GUID, None, 0, 100)

    assert (
        Call("GET", f"/api/v2/contacts/{GUID}/promotions", (("offset", "0"), ("count", "100")))
        == call
    )


def test_point_accounts() -> None:
    """GET /point-accounts?contactId=&offset=&count=."""
    call = _http.point_accounts(V3, GUID, 100, 100)

    assert (
        Call(
            "GET",
            "/api/v3/point-accounts",
            (("contactId", GUID), ("offset", "100"), ("count", "100")),
        )
        == call
    )


def test_bulk_calls() -> None:
    """Bulk create (POST) and update (PATCH), each with its contactType in the query (and the
    update with avoidTriggeringExport when asked), and status (batchId).

    None of them is a contact call, and the writes are not retried blindly.
    """
    create = _http.bulk_create(V3, "Member", b"[]")
    update = _http.bulk_update(V3, "Contact", b"[]")
    quiet = _http.bulk_update(V3, "Member", b"[]", avoid_triggering_export=True)
    status = _http.bulk_status(V3, "abc")

    assert (("contactType", "Member"), ("avoidTriggeringExport", "true")) == quiet.query
    assert [
        ("POST", "/api/v3/contacts/bulk", (("contactType", "Member"),), False, False),
        ("PATCH", "/api/v3/contacts/bulk", (("contactType", "Contact"),), False, False),
        ("GET", "/api/v3/contacts/bulk/status", (("batchId", "abc"),), True, False),
    ] == [
        (c.method, c.path, c.query, c.idempotent, c.contact_call) for c in (create, update, status)
    ]


# --- read_response: success -----------------------------------------------------------------------


def test_read_response_returns_json(contact_call: Call) -> None:
    """A 2xx JSON body is returned decoded."""
    assert {"id": GUID} == read_response(contact_call, 200, JSON, body({"id": GUID}))


def test_read_response_bare_json_string(contact_call: Call) -> None:
    """A bare JSON string (what /contacts/id answers) is returned as a str."""
    assert GUID == read_response(contact_call, 200, JSON, f'"{GUID}"'.encode())


@pytest.mark.parametrize(("status", "raw"), [(200, b""), (202, b"  \n"), (204, b"")])
def test_read_response_empty_is_none(contact_call: Call, status: int, raw: bytes) -> None:
    """An empty 2xx body reads as None."""
    assert read_response(contact_call, status, {}, raw) is None


def test_read_response_2xx_not_json(contact_call: Call) -> None:
    """A 2xx that is not JSON is an UnexpectedResponse naming the call and the content type."""
    with pytest.raises(UnexpectedResponse) as info:
        read_response(contact_call, 200, {"content-type": "text/html"}, b"<html>ok</html>")

    assert f"GET /api/v3/contacts/{GUID} -> 200: the answer is not JSON (text/html)" == str(
        info.value
    )


@pytest.mark.parametrize("status", [400, 404, 500])
def test_read_response_raises_for_non_2xx(contact_call: Call, status: int) -> None:
    """An error status with Engage's body raises an EngageHTTPError carrying the status."""
    with pytest.raises(EngageHTTPError) as info:
        read_response(contact_call, status, {}, b"")

    assert status == info.value.status


# --- error_for_status: status -> class ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "InvalidEmailAddress", InvalidRequest),
        (400, "NoData", InvalidRequest),
        (401, None, EngageAuthError),
        (403, None, EngageAuthError),
        (404, "ContactNotFound", ContactNotFound),
        (409, "ApprovedContactWithKeyExists", EngageConflict),
        (409, "ContactWithKeyIsBeingCreated", EngageConflict),
        (409, "MultipleMatches", MultipleMatches),
        (422, "ValidationError", EngageValidationError),
        (429, None, RateLimited),
        (500, "InvalidSystemConfiguration", EngageConfigurationError),
        (502, None, EngageServerError),
        (503, None, EngageServerError),
        (504, "RequestTimeOut", EngageServerError),
    ],
)
def test_status_maps_to_class(contact_call: Call, status: int, code: str | None, cls: type) -> None:
    """Each documented status (and error code) gives its exception class, exactly."""
    raw = body({"errorCode": code}) if code else b""

    exc = error_for_status(contact_call, status, JSON, raw)

    assert (cls, status, code) == (type(exc), exc.status, exc.error_code)


@pytest.mark.parametrize(
    "status", [100, 199, 204, 301, 302, 303, 307, 308, 402, 405, 407, 408, 410, 413, 418, 499]
)
def test_undocumented_statuses_are_unexpected(contact_call: Call, status: int) -> None:
    """A 1xx, a 3xx or a 4xx Engage does not document is no verdict on the request: an
    `UnexpectedResponse` (outcome unknown, so an `EngageUnavailable`) with its status, whose
    request may have been applied.
    """
    exc = error_for_status(contact_call, status, JSON, body({"errorCode": "Whatever"}))

    assert (UnexpectedResponse, status, True, True) == (
        type(exc),
        exc.status,
        isinstance(exc, EngageUnavailable),
        exc.request_sent,
    )


@pytest.mark.parametrize("status", [301, 302, 307])
def test_read_response_raises_for_a_redirect(contact_call: Call, status: int) -> None:
    """A redirect (a maintenance page, say) is raised as `UnexpectedResponse`, saying it was
    not followed; the target's query and the Location are not in the message.
    """
    headers = {"Location": "https://maintenance.example.com/?from=anna@example.com"}

    with pytest.raises(UnexpectedResponse) as info:
        read_response(contact_call, status, headers, b"")

    assert f"GET /api/v3/contacts/{GUID} -> {status}: a redirect, not followed" == str(info.value)


@pytest.mark.parametrize("status", [400, 404, 409, 422])
@pytest.mark.parametrize(
    ("content_type", "raw"),
    [
        ("text/html", HTML_502),
        ("text/html; charset=utf-8", b"   <!DOCTYPE html><html>Not Found</html>"),
        (None, b"<html><body>Bad Request</body></html>"),
        ("application/xml", b"<Error><Code>NoSuchKey</Code></Error>"),
    ],
)
def test_verdict_status_under_a_web_page_is_unexpected(
    contact_call: Call, status: int, content_type: str | None, raw: bytes
) -> None:
    """A 400, 404, 409 or 422 whose body is a web page came from a proxy, not Engage: it is
    `UnexpectedResponse`, never a rejection (nor, for a 404, "no such contact").
    """
    headers = {} if content_type is None else {"Content-Type": content_type}

    exc = error_for_status(contact_call, status, headers, raw)

    assert (UnexpectedResponse, status) == (type(exc), exc.status)


def test_html_404_on_any_call_is_unexpected(other_call: Call) -> None:
    """On a call not about a contact too (bulk status), an HTML 404 is a proxy's page."""
    exc = error_for_status(other_call, 404, {"Content-Type": "text/html"}, b"<html>404</html>")

    assert UnexpectedResponse is type(exc)


def test_json_verdict_labelled_html_is_still_a_verdict(contact_call: Call) -> None:
    """What decides is the body: Engage's JSON stays a verdict whatever its content type."""
    raw = body({"errorCode": "ValidationError", "message": "Bad zip code"})

    exc = error_for_status(contact_call, 422, {"Content-Type": "text/html"}, raw)

    assert (EngageValidationError, "ValidationError") == (type(exc), exc.error_code)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, EngageAuthError), (403, EngageAuthError), (429, RateLimited), (503, EngageServerError)],
)
def test_auth_rate_limit_and_server_errors_keep_their_class_under_html(
    contact_call: Call, status: int, cls: type
) -> None:
    """401, 403, 429 and 5xx mean the same whoever sent them, so a page keeps their class."""
    exc = error_for_status(contact_call, status, {"Content-Type": "text/html"}, HTML_502)

    assert cls is type(exc)


@pytest.mark.parametrize(
    "raw",
    [
        body({"errorCode": "InvalidSystemConfiguration", "message": "Misconfigured."}),
        body({"code": "invalidSystemConfiguration"}),
        b'"InvalidSystemConfiguration"',
    ],
)
def test_invalid_system_configuration_is_a_configuration_error(
    contact_call: Call, raw: bytes
) -> None:
    """A 5xx ``InvalidSystemConfiguration`` is an `EngageConfigurationError`: a tenant fault
    waiting does not fix, still a server error (so a write is kept, not lost).
    """
    exc = error_for_status(contact_call, 500, JSON, raw)

    assert (EngageConfigurationError, True, True) == (
        type(exc),
        isinstance(exc, EngageServerError),
        isinstance(exc, EngageUnavailable),
    )


def test_other_500_codes_are_plain_server_errors(contact_call: Call) -> None:
    """Only that code is a configuration fault; "An error has occurred" is an outage."""
    exc = error_for_status(contact_call, 500, JSON, body({"message": "An error has occurred."}))

    assert EngageServerError is type(exc)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_server_errors_are_also_unavailable(contact_call: Call, status: int) -> None:
    """A 5xx is both an EngageHTTPError and an EngageUnavailable (so it is queued)."""
    exc = error_for_status(contact_call, status, {}, b"")

    assert (True, True) == (isinstance(exc, EngageHTTPError), isinstance(exc, EngageUnavailable))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429])
def test_client_errors_are_not_unavailable(contact_call: Call, status: int) -> None:
    """A 4xx is about the request, never "Engage is unavailable"."""
    assert not isinstance(error_for_status(contact_call, status, {}, b""), EngageUnavailable)


# --- 404 ------------------------------------------------------------------------------------------


def test_404_without_code_on_a_contact_call_is_contact_not_found(contact_call: Call) -> None:
    """A bare 404 on a call about a contact means no such contact."""
    assert ContactNotFound is type(error_for_status(contact_call, 404, {}, b""))


def test_404_without_code_on_other_calls_is_plain(other_call: Call) -> None:
    """A bare 404 elsewhere (bulk status) is a plain EngageHTTPError, not ContactNotFound."""
    assert EngageHTTPError is type(error_for_status(other_call, 404, {}, b""))


def test_404_contact_not_found_code_wins_everywhere(other_call: Call) -> None:
    """An explicit ContactNotFound code is ContactNotFound whatever the call."""
    exc = error_for_status(other_call, 404, JSON, body({"errorCode": "ContactNotFound"}))

    assert ContactNotFound is type(exc)


def test_404_with_another_code_is_plain(contact_call: Call) -> None:
    """A 404 naming something else (PromotionNotFound) is not ContactNotFound."""
    exc = error_for_status(contact_call, 404, JSON, body({"errorCode": "PromotionNotFound"}))

    assert (EngageHTTPError, "PromotionNotFound") == (type(exc), exc.error_code)


# --- 409 ------------------------------------------------------------------------------------------


def test_multiple_matches_lists_the_contact_ids(contact_call: Call) -> None:
    """409 MultipleMatches carries messageDetails.multipleMatchesFound as contact_ids."""
    raw = body(
        {
            "errorCode": "MultipleMatches",
            "message": "MultipleMatches",
            "messageDetails": {"multipleMatchesFound": [GUID, OTHER_GUID]},
        }
    )

    exc = error_for_status(contact_call, 409, JSON, raw)

    assert isinstance(exc, MultipleMatches)
    assert ((GUID, OTHER_GUID), {"multipleMatchesFound": [GUID, OTHER_GUID]}) == (
        exc.contact_ids,
        exc.details,
    )


def test_multiple_matches_without_details_has_no_ids(contact_call: Call) -> None:
    """MultipleMatches with no messageDetails still raises MultipleMatches, with no ids."""
    exc = error_for_status(contact_call, 409, JSON, body({"errorCode": "MultipleMatches"}))

    assert isinstance(exc, MultipleMatches)
    assert () == exc.contact_ids


def test_multiple_matches_with_malformed_ids_has_no_ids(contact_call: Call) -> None:
    """A multipleMatchesFound that is not a list gives no ids rather than a crash."""
    raw = body({"errorCode": "MultipleMatches", "messageDetails": {"multipleMatchesFound": GUID}})

    exc = error_for_status(contact_call, 409, JSON, raw)

    assert isinstance(exc, MultipleMatches)
    assert () == exc.contact_ids


def test_other_409_is_a_plain_conflict(contact_call: Call) -> None:
    """A 409 other than MultipleMatches is an EngageConflict, not MultipleMatches."""
    exc = error_for_status(
        contact_call, 409, JSON, body({"errorCode": "ApprovedContactWithKeyExists"})
    )

    assert (EngageConflict, "ApprovedContactWithKeyExists") == (type(exc), exc.error_code)


# --- 429 ------------------------------------------------------------------------------------------


class FrozenDatetime(datetime):
    """A datetime whose now() is fixed, so Retry-After dates are read without a wall clock."""

    @classmethod
    def now(cls, tz: object = None) -> FrozenDatetime:  # type: ignore[override]
        """2024-05-01 12:00:00 UTC, always."""
        return cls(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(name="frozen_now")
def frozen_now_fixture(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """Freeze the clock `_http` reads Retry-After dates against."""
    monkeypatch.setattr(_http, "datetime", FrozenDatetime)
    return FrozenDatetime.now()


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("0.5", 0.5), ("0", 0.0), ("-3", 0.0), ("soon", None)],
)
def test_retry_after_in_seconds(contact_call: Call, header: str, seconds: float | None) -> None:
    """Retry-After in seconds is read as a float; negative is 0; garbage is None."""
    exc = error_for_status(contact_call, 429, {"Retry-After": header}, b"")

    assert isinstance(exc, RateLimited)
    assert seconds == exc.retry_after


def test_retry_after_header_name_is_case_insensitive(contact_call: Call) -> None:
    """The header is found whatever its case."""
    exc = error_for_status(contact_call, 429, {"retry-after": "12"}, b"")

    assert 12.0 == exc.retry_after


def test_retry_after_absent_is_none(contact_call: Call) -> None:
    """No Retry-After header: retry_after is None."""
    assert error_for_status(contact_call, 429, {}, b"").retry_after is None


def test_retry_after_http_date(contact_call: Call, frozen_now: datetime) -> None:
    """Retry-After as an HTTP date is the seconds from now until then."""
    when = format_datetime(frozen_now.replace(minute=2), usegmt=True)

    exc = error_for_status(contact_call, 429, {"Retry-After": when}, b"")

    assert 120.0 == exc.retry_after


def test_retry_after_http_date_is_counted_from_the_clock_given() -> None:
    """The transport passes its (injected) wall clock: a date is counted from it, not from
    the system's time.
    """
    headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    then = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()

    assert 90.0 == _http.retry_after(headers, now=then - 90)


def test_retry_after_http_date_in_the_past_is_zero(
    contact_call: Call, frozen_now: datetime
) -> None:
    """A date already passed means retry now: 0, never negative."""
    exc = error_for_status(contact_call, 429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, b"")

    assert 0.0 == exc.retry_after


def test_retry_after_date_with_unknown_zone_does_not_crash(
    contact_call: Call, frozen_now: datetime
) -> None:
    """A date with the RFC 2822 "-0000" zone is read as UTC instead of raising TypeError.

    parsedate_to_datetime returns a naive datetime for "-0000"; subtracting an aware "now"
    from it must not escape as a TypeError from the pure layer.
    """
    exc = error_for_status(
        contact_call, 429, {"Retry-After": "Wed, 01 May 2024 12:01:00 -0000"}, b""
    )

    assert 60.0 == exc.retry_after


# --- HTML and other bodies ------------------------------------------------------------------------


def test_html_502_from_a_proxy(contact_call: Call) -> None:
    """An HTML 502 is an EngageServerError with no code; the page is kept but not printed."""
    exc = error_for_status(contact_call, 502, {"Content-Type": "text/html"}, HTML_502)

    assert (EngageServerError, None, None, {}, HTML_502.decode()) == (
        type(exc),
        exc.error_code,
        exc.message,
        exc.details,
        exc.body,
    )
    assert f"GET /api/v3/contacts/{GUID} -> 502 (text/html body)" == str(exc)


def test_error_without_body(contact_call: Call) -> None:
    """An empty error body gives just the call and the status."""
    assert f"GET /api/v3/contacts/{GUID} -> 503" == str(
        error_for_status(contact_call, 503, {}, b"")
    )


def test_error_keeps_the_call(contact_call: Call) -> None:
    """The exception records the method and path (without query) of the failed call."""
    exc = error_for_status(contact_call, 400, {}, b"")

    assert ("GET", f"/api/v3/contacts/{GUID}") == (exc.method, exc.path)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"errorCode": "InvalidEmailAddress"}, "InvalidEmailAddress"),
        ({"ErrorCode": "InvalidEmailAddress"}, "InvalidEmailAddress"),
        ({"code": "InvalidPhoneNumber"}, "InvalidPhoneNumber"),
        ({"error": "InvalidContactType"}, "InvalidContactType"),
        ({"message": "InvalidSearchQuery"}, "InvalidSearchQuery"),
        ({"detail": "NoData"}, "NoData"),
        ({"title": "NoData"}, "NoData"),
        ("InvalidSocialSecurityNumber", "InvalidSocialSecurityNumber"),
        ({"errorCode": "ValidationError", "message": "Email is invalid"}, "ValidationError"),
        ({"code": "", "error": "NoData"}, "NoData"),
    ],
)
def test_error_code_read_leniently(contact_call: Call, data: object, code: str) -> None:
    """The code comes from errorCode, code, error, or an identifier-like message/detail."""
    assert code == error_for_status(contact_call, 400, JSON, body(data)).error_code


@pytest.mark.parametrize(
    "data",
    [
        {"message": "An error has occurred."},
        {"detail": "The email address is not valid"},
        {"code": 400},
        [1, 2, 3],
        "An error has occurred.",
        None,
    ],
)
def test_no_error_code_when_there_is_none(contact_call: Call, data: object) -> None:
    """Free text, numbers and other shapes give no error code (and no crash)."""
    assert error_for_status(contact_call, 400, JSON, body(data)).error_code is None


def test_error_code_takes_precedence_over_message(contact_call: Call) -> None:
    """errorCode is the code and message the message when both are present."""
    exc = error_for_status(
        contact_call,
        422,
        JSON,
        body({"errorCode": "ValidationError", "message": "Bad zip code"}),
    )

    assert ("ValidationError", "Bad zip code") == (exc.error_code, exc.message)
    assert f"GET /api/v3/contacts/{GUID} -> 422 ValidationError: Bad zip code" == str(exc)


def test_detail_is_the_message(contact_call: Call) -> None:
    """A `detail` text (older v2 bodies) is kept as the message."""
    exc = error_for_status(
        contact_call, 400, JSON, body({"code": "NoData", "detail": "No data was sent"})
    )

    assert ("NoData", "No data was sent") == (exc.error_code, exc.message)


def test_message_details_kept(contact_call: Call) -> None:
    """messageDetails is exposed as a dict on `.details`."""
    details = {"field": "zipCode", "reason": "format"}

    exc = error_for_status(
        contact_call,
        422,
        JSON,
        body({"errorCode": "ValidationError", "messageDetails": details}),
    )

    assert details == exc.details


def test_message_details_not_an_object_is_wrapped(contact_call: Call) -> None:
    """messageDetails that is not an object is kept under "value"."""
    exc = error_for_status(
        contact_call, 422, JSON, body({"errorCode": "ValidationError", "messageDetails": ["x"]})
    )

    assert {"value": ["x"]} == exc.details


def test_body_truncated(contact_call: Call) -> None:
    """`.body` holds the start of what Engage sent, cut at a word to at most MAX_BODY
    characters and marked as cut.
    """
    raw = b"word " * _http.MAX_BODY

    exc = error_for_status(contact_call, 500, {"Content-Type": "text/plain"}, raw)

    assert exc.body.endswith("word...")
    assert raw.decode().startswith(exc.body.removesuffix("..."))
    assert _http.MAX_BODY - 5 <= len(exc.body) - 3 <= _http.MAX_BODY


def test_body_cut_through_personal_data_leaves_no_piece_of_it(contact_call: Call) -> None:
    """Where the cut at MAX_BODY falls inside an email or a phone number, no piece of it is
    kept.
    """
    for value in ("anna.svensson@example.com", "+46 70 123 45 67", "198506059738"):
        for shift in range(len(value) + 2):
            raw = ("x" * (_http.MAX_BODY - shift) + f" {value} more text").encode()

            exc = error_for_status(contact_call, 500, {}, raw)

            assert [] == [p for p in ("anna", "svensson", "46", "1985") if p in exc.body]


def test_body_without_word_breaks_is_dropped_when_too_long(contact_call: Call) -> None:
    """A long body with nowhere safe to cut (one long token) is not kept at all."""
    exc = error_for_status(contact_call, 500, {}, b"x" * (_http.MAX_BODY * 3))

    assert "..." == exc.body


def test_body_with_bad_utf8_does_not_crash(contact_call: Call) -> None:
    """A body that is not UTF-8 is kept with replacement characters."""
    exc = error_for_status(contact_call, 500, {}, b"bad \xff byte")

    assert "bad \ufffd byte" == exc.body


# --- personal data in messages --------------------------------------------------------------------

PERSONAL = ["anna.svensson@example.com", "+46701234567", "198506059738"]


def test_message_text_is_scrubbed(contact_call: Call) -> None:
    """Personal data echoed in Engage's message reaches neither str() nor any attribute;
    the rest of the text is kept.
    """
    text = "Invalid: anna.svensson@example.com, +46701234567, 198506059738"
    raw = body(
        {
            "errorCode": "ValidationError",
            "message": text,
            "messageDetails": {"email": [f"{PERSONAL[0]} is taken"], "count": 2, "ok": None},
        }
    )

    exc = error_for_status(contact_call, 422, JSON, raw)

    assert "Invalid: ***, ***, ***" == exc.message
    assert {"email": ["*** is taken"], "count": 2, "ok": None} == exc.details
    assert [] == [value for value in PERSONAL if value in f"{exc} {exc.body} {exc.message}"]


def test_multiple_matches_ids_survive_the_scrubbing(contact_call: Call) -> None:
    """Contact ids are not personal data: scrubbing keeps them in `.details`."""
    raw = body(
        {
            "errorCode": "MultipleMatches",
            "messageDetails": {"multipleMatchesFound": [GUID, OTHER_GUID]},
        }
    )

    exc = error_for_status(contact_call, 409, JSON, raw)

    assert [GUID, OTHER_GUID] == exc.details["multipleMatchesFound"]


def test_long_message_is_truncated_in_str(contact_call: Call) -> None:
    """A long message is cut short in str(exc)."""
    exc = error_for_status(contact_call, 400, JSON, body({"message": "word " * 1000}))

    assert len(str(exc)) < 300


def test_query_never_in_str() -> None:
    """The lookup's query (an email) is never part of the message."""
    call = _http.contact_id_lookup(V3, {"email": "anna.svensson@example.com"})

    exc = error_for_status(call, 409, JSON, body({"errorCode": "MultipleMatches"}))

    assert "anna.svensson@example.com" not in str(exc)


def test_html_body_never_in_str(contact_call: Call) -> None:
    """An HTML page that happens to echo personal data is not put in the message."""
    raw = b"<html><body>No contact anna.svensson@example.com</body></html>"

    exc = error_for_status(contact_call, 502, {"Content-Type": "text/html"}, raw)

    assert "anna.svensson@example.com" not in str(exc)


@pytest.mark.parametrize("key", ["error", "code", "errorCode"])
def test_free_text_error_field_is_scrubbed_in_str(contact_call: Call, key: str) -> None:
    """Free text under error/code is not trusted as an error code: no personal data in str().

    Bodies such as ``{"error": "No contact with email ..."}`` are common; the text must be
    scrubbed (and truncated) like any other text from Engage.
    """
    raw = body({key: "No contact with email anna.svensson@example.com or +46701234567"})

    exc = error_for_status(contact_call, 404, JSON, raw)

    assert [] == [value for value in PERSONAL if value in str(exc)]


# --- reading list, id and batch answers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (GUID, GUID),
        (f'"{GUID}"', GUID),
        (f"  {GUID}\n", GUID),
        ({"contactId": GUID}, GUID),
        ({"id": GUID}, GUID),
        ("", None),
        (None, None),
        (42, None),
        ({"other": GUID}, None),
    ],
)
def test_read_contact_id(data: object, expected: str | None) -> None:
    """/contacts/id answers a bare string (maybe quoted twice), tolerantly an object."""
    assert expected == _http.read_contact_id(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([{"id": 1}], ([{"id": 1}], None)),
        ({"items": [{"id": 1}], "totalCount": 7, "offset": 0, "count": 1}, ([{"id": 1}], 7)),
        ({"Items": [{"id": 1}], "TotalCount": 7}, ([{"id": 1}], 7)),
        ({"items": None, "totalCount": "7"}, ([], None)),
        ({}, ([], None)),
        (None, ([], None)),
        ("text", ([], None)),
    ],
)
def test_read_page(data: object, expected: tuple[list[object], int | None]) -> None:
    """Lists come as a bare array (no total) or a paged object; anything else is empty."""
    assert expected == _http.read_page(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("batch-1", "batch-1"),
        ({"batchId": "batch-1"}, "batch-1"),
        ({"BatchId": "batch-1"}, "batch-1"),
        ({"id": "batch-1"}, "batch-1"),
        ("  ", None),
        (None, None),
        ([], None),
    ],
)
def test_read_batch_id(data: object, expected: str | None) -> None:
    """The bulk batch id is a bare string, tolerantly an object."""
    assert expected == _http.read_batch_id(data)


def test_error_text_loses_the_calls_lookup_values_and_query_strings() -> None:
    """A page echoing the request keeps none of the lookup's values (a custom key scrubbing
    alone would miss, in raw and percent-encoded form), no URL query string and no
    percent-encoded email; the rest of the text stays.
    """
    call = _http.contact_id_lookup(V3, {"customKey": "M 12345", "contactType": "Member"})
    raw = (
        b"<html>Error at https://t.voyado.com/api/v3/contacts/id?customKey=M%2012345 "
        b"for M 12345 / M+12345 (mail anna.svensson%40example.com) in Member</html>"
    )

    exc = error_for_status(call, 500, {"Content-Type": "text/html"}, raw)

    assert (
        "<html>Error at https://t.voyado.com/api/v3/contacts/id*** for *** / *** "
        "(mail ***) in Member</html>"
    ) == exc.body
