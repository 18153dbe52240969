"""Tests of the Engage simulator itself, over real sockets with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from engage_async.testing import FakeEngage, Fault, RecordedRequest

HEADERS = {
    "apikey": "fake-api-key",
    "User-Agent": "FakeEngageTests/1.0",
    "Content-Type": "application/json",
}
CONTACTS = "/api/v3/contacts"
SHORT = aiohttp.ClientTimeout(total=0.1)


@pytest.fixture(name="fake")
async def fixture_fake() -> AsyncIterator[FakeEngage]:
    """Serve a default FakeEngage for one test."""
    async with FakeEngage() as fake:
        yield fake


@pytest.fixture(name="http")
async def fixture_http(fake: FakeEngage) -> AsyncIterator[aiohttp.ClientSession]:
    """Open a plain aiohttp session on the fake, sending the headers Engage asks for."""
    async with aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as session:
        yield session


async def send(
    http: aiohttp.ClientSession,
    method: str,
    path: str | URL,
    *,
    params: dict[str, str] | None = None,
    body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: aiohttp.ClientTimeout | None = None,
) -> tuple[int, Any]:
    """Send one request; return the status and the body (JSON decoded if JSON, None if empty)."""
    raw_body = data if data is not None else None if body is None else json.dumps(body).encode()
    async with http.request(
        method, path, params=params, data=raw_body, headers=headers, timeout=timeout
    ) as response:
        raw = await response.read()
        if raw and response.content_type == "application/json":
            return response.status, json.loads(raw)
        return response.status, raw.decode() or None


async def until(condition: Callable[[], object]) -> None:
    """Wait (briefly, polling) until `condition()` is true."""
    async with asyncio.timeout(2):
        while not condition():
            await asyncio.sleep(0.005)


def error_code(body: Any) -> str:
    """Return the Engage error code of a JSON error body."""
    return str(body["errorCode"])


async def create(http: aiohttp.ClientSession, attributes: dict[str, Any], **params: str) -> str:
    """Create a contact over the API and return its id."""
    status, body = await send(http, "POST", CONTACTS, body=attributes, params=params or None)
    assert 201 == status, body
    return str(body["id"])


# Start-up and cross-cutting checks ---------------------------------------------------------


async def test_url_and_api_key(fake: FakeEngage) -> None:
    """The fake listens on loopback at a free port; the url has no trailing slash."""
    assert f"http://127.0.0.1:{fake.port}" == fake.url
    assert 0 != fake.port
    assert "fake-api-key" == fake.api_key
    assert not fake.is_down


async def test_start_and_close_without_context_manager() -> None:
    """start() serves, close() stops, a second close() is harmless, and restart is refused."""
    fake = FakeEngage(api_key="other-key")
    await fake.start()
    async with aiohttp.ClientSession(headers={**HEADERS, "apikey": "other-key"}) as http:
        status, _ = await send(http, "GET", f"{fake.url}{CONTACTS}/id?email=a@example.com")
    await fake.close()
    await fake.close()

    assert 404 == status
    with pytest.raises(RuntimeError):
        await fake.start()


async def test_start_twice_is_refused(fake: FakeEngage) -> None:
    """A running fake cannot be started again."""
    with pytest.raises(RuntimeError):
        await fake.start()


@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_api_key_missing_or_wrong_is_401(
    http: aiohttp.ClientSession, key: str | None
) -> None:
    """Without the right apikey header Engage answers 401 Unauthorized."""
    headers = {**HEADERS}
    if key is None:
        del headers["apikey"]
    else:
        headers["apikey"] = key
    async with aiohttp.ClientSession(base_url=http._base_url, headers=headers) as other:
        status, body = await send(other, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})

    assert (401, "Unauthorized", 401) == (status, error_code(body), body["statusCode"])


async def test_missing_content_type_is_500_even_on_get(fake: FakeEngage) -> None:
    """Engage answers a request without Content-Type with a bare 500 "An error has occurred"."""
    headers = {k: v for k, v in HEADERS.items() if k != "Content-Type"}
    async with aiohttp.ClientSession(base_url=fake.url, headers=headers) as http:
        status, body = await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})

    assert (500, {"message": "An error has occurred"}) == (status, body)


async def test_content_type_parameters_are_accepted(fake: FakeEngage) -> None:
    """`application/json; charset=utf-8` counts as JSON."""
    headers = {**HEADERS, "Content-Type": "application/json; charset=utf-8"}
    async with aiohttp.ClientSession(base_url=fake.url, headers=headers) as http:
        status, _ = await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})

    assert 404 == status


@pytest.mark.parametrize("agent", [None, "aiohttp-default", "NoSlashHere"])
async def test_user_agent_must_be_system_slash_version(fake: FakeEngage, agent: str | None) -> None:
    """A missing User-Agent, aiohttp's default, or one without "/" is 400 InvalidUserAgent."""
    headers = {k: v for k, v in HEADERS.items() if k != "User-Agent"}
    skip: list[str] = []
    if agent is None:
        skip = ["User-Agent"]
    elif agent != "aiohttp-default":
        headers["User-Agent"] = agent
    async with aiohttp.ClientSession(
        base_url=fake.url, headers=headers, skip_auto_headers=skip
    ) as http:
        status, body = await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})

    assert (400, "InvalidUserAgent") == (status, error_code(body))


async def test_api_key_is_checked_before_content_type(fake: FakeEngage) -> None:
    """The checks run in Engage's order: 401 wins over the missing Content-Type."""
    async with aiohttp.ClientSession(base_url=fake.url) as http:
        status, _ = await send(http, "GET", f"{CONTACTS}/id")

    assert 401 == status


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/v3/nothing"), ("DELETE", f"{CONTACTS}/id"), ("GET", "/api/v4/contacts/id")],
)
async def test_unknown_path_or_method_is_404(
    http: aiohttp.ClientSession, method: str, path: str
) -> None:
    """Anything that is no endpoint answers 404 NotFound as JSON."""
    status, body = await send(http, method, path)

    assert (404, "NotFound") == (status, error_code(body))


async def test_paths_and_parameter_names_ignore_case(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """Engage's routing ignores case in paths and query parameter names."""
    contact_id = fake.add_contact({"email": "case@example.com"})

    status, body = await send(
        http, "GET", "/API/V3/Contacts/ID", params={"EMAIL": "case@example.com"}
    )

    assert (200, contact_id) == (status, body)


# Recording ---------------------------------------------------------------------------------


async def test_query_plus_is_decoded_and_raw_query_kept(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """A `+` sent as %2B reads back as `+` in `query`; `raw_query` keeps the encoding."""
    contact_id = fake.add_contact({"email": "p@example.com", "mobilePhone": "+46701234567"})

    status, body = await send(http, "GET", f"{CONTACTS}/id", params={"mobilePhone": "+46701234567"})

    request = fake.requests[-1]
    assert (200, contact_id) == (status, body)
    assert "+46701234567" == request.query["mobilePhone"]
    assert "mobilePhone=%2B46701234567" == request.raw_query


async def test_unencoded_plus_becomes_a_space(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """An unencoded `+` is a space on the server side, so the phone number is invalid."""
    url = URL(f"{fake.url}{CONTACTS}/id?mobilePhone=+46701234567", encoded=True)

    status, body = await send(http, "GET", url)

    assert (400, "InvalidPhoneNumber") == (status, error_code(body))
    assert " 46701234567" == fake.requests[-1].query["mobilePhone"]


async def test_recorded_request_fields(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """Each request is recorded with method, path, headers (any case), body and json()."""
    await send(http, "POST", CONTACTS, body={"email": "r@example.com"}, params={"source": "POS"})

    request = fake.requests[-1]
    assert ("POST", CONTACTS, {"source": "POS"}) == (request.method, request.path, request.query)
    assert "fake-api-key" == request.headers["APIKEY"]
    assert {"email": "r@example.com"} == request.json()
    assert request.fault is None
    assert request.time > 0


async def test_recorded_request_repr_hides_secrets(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """The repr of a recorded request shows neither the api key nor personal data."""
    await send(http, "POST", CONTACTS, body={"email": "secret@example.com"})

    text = repr(fake.requests[-1])
    assert "fake-api-key" not in text
    assert "secret@example.com" not in text
    assert "secret@example.com" not in repr(fake)
    assert "fake-api-key" not in repr(fake)


async def test_requests_to_and_clear_requests(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """requests_to filters by method and fnmatch path; clear_requests forgets everything."""
    contact_id = await create(http, {"email": "f@example.com"})
    await send(http, "GET", f"{CONTACTS}/{contact_id}")
    await send(http, "PATCH", f"{CONTACTS}/{contact_id}", body={"firstName": "F"})

    assert 1 == len(fake.requests_to("get", f"{CONTACTS}/*"))
    assert [CONTACTS] == [r.path for r in fake.requests_to("POST", CONTACTS)]
    fake.clear_requests()
    assert ([], 0) == (fake.requests, fake.peak_rate())


async def test_recording_can_be_turned_off() -> None:
    """With record_requests=False nothing is kept, but peak_rate still counts arrivals."""
    async with (
        FakeEngage(record_requests=False) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})

        assert ([], 1) == (fake.requests, fake.peak_rate())


# GET /contacts/id --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("email", "MiXeD@Example.COM"),
        ("mobilePhone", "+46701234567"),
        ("socialSecurityNumber", "198506059738"),
        ("socialSecurityNumber", "19850605-9738"),
        ("customKey", "EXT-1"),
    ],
)
async def test_lookup_by_each_identifier(
    fake: FakeEngage, http: aiohttp.ClientSession, param: str, value: str
) -> None:
    """Each identifier finds the contact and the answer is a bare JSON string GUID."""
    contact_id = fake.add_contact(
        {
            "email": "mixed@example.com",
            "mobilePhone": "+46701234567",
            "socialSecurityNumber": "198506059738",
            "externalId": "EXT-1",
        }
    )

    async with http.get(f"{CONTACTS}/id", params={param: value}) as response:
        text = await response.text()

    assert (200, f'"{contact_id}"') == (response.status, text)


async def test_custom_key_can_mean_member_number() -> None:
    """A tenant with custom_key="memberNumber" resolves customKey against member numbers."""
    async with (
        FakeEngage(custom_key="memberNumber") as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        contact_id = fake.add_contact({"email": "m@example.com", "memberNumber": "999888777"})
        status, body = await send(http, "GET", f"{CONTACTS}/id", params={"customKey": "999888777"})

    assert (200, contact_id) == (status, body)


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({}, 400, "InvalidSearchQuery"),
        ({"email": ""}, 400, "InvalidSearchQuery"),
        ({"email": "not-an-email"}, 400, "InvalidEmailAddress"),
        ({"mobilePhone": "0701234567"}, 400, "InvalidPhoneNumber"),
        ({"socialSecurityNumber": "12345"}, 400, "InvalidSocialSecurityNumber"),
        ({"email": "a@b.se", "contactType": "Nope"}, 400, "InvalidContactType"),
        ({"email": "nobody@example.com"}, 404, "ContactNotFound"),
    ],
)
async def test_lookup_errors(
    http: aiohttp.ClientSession, params: dict[str, str], status: int, code: str
) -> None:
    """Lookups refuse what Engage refuses, with its error codes."""
    actual_status, body = await send(http, "GET", f"{CONTACTS}/id", params=params)

    assert (status, code) == (actual_status, error_code(body))


async def test_lookup_error_does_not_echo_the_value(http: aiohttp.ClientSession) -> None:
    """Error messages name the parameter, never the personal value sent."""
    _, body = await send(http, "GET", f"{CONTACTS}/id", params={"email": "bad-secret-value"})

    assert "bad-secret-value" not in json.dumps(body)


async def test_multiple_matches_lists_the_ids(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """Several matches give 409 MultipleMatches with the ids in messageDetails."""
    first = fake.add_contact({"email": "twin@example.com"})
    second = fake.add_contact({"email": "TWIN@example.com"}, contact_type="Contact")

    status, body = await send(http, "GET", f"{CONTACTS}/id", params={"email": "twin@example.com"})

    assert (409, "MultipleMatches") == (status, error_code(body))
    assert {"multipleMatchesFound": [first, second]} == body["messageDetails"]


async def test_contact_type_narrows_a_lookup(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """A contactType (in any case) restricts the lookup to that type."""
    fake.add_contact({"email": "twin@example.com"})
    contact = fake.add_contact({"email": "twin@example.com"}, contact_type="Contact")

    status, body = await send(
        http,
        "GET",
        f"{CONTACTS}/id",
        params={"email": "twin@example.com", "contactType": "contact"},
    )

    assert (200, contact) == (status, body)


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("any@example.com", "by_email"),
        ("198506059738", "by_ssn"),
        ("+46709999999", "by_phone"),
        ("KEY-42", "by_key"),
        # Valid as a phone number, so the scan stops there and never tries customKey.
        ("+46700000042", None),
    ],
)
async def test_any_scans_email_ssn_phone_then_custom_key(
    fake: FakeEngage, http: aiohttp.ClientSession, value: str, found: str | None
) -> None:
    """`any` stops at the first attribute the value is valid for, even without a match."""
    ids = {
        "by_email": fake.add_contact({"email": "any@example.com"}),
        "by_ssn": fake.add_contact({"email": "s@example.com", "socialSecurityNumber": value}),
        "by_phone": fake.add_contact({"email": "p@example.com", "mobilePhone": "+46709999999"}),
        "by_key": fake.add_contact({"email": "k@example.com", "externalId": "KEY-42"}),
        "key_like_phone": fake.add_contact(
            {"email": "x@example.com", "externalId": "+46700000042"}
        ),
    }

    status, body = await send(http, "GET", f"{CONTACTS}/id", params={"any": value})

    if found is None:
        assert (404, "ContactNotFound") == (status, error_code(body))
    else:
        assert (200, ids[found]) == (status, body)


# GET /contacts/{id} and /contactoverview ---------------------------------------------------


async def test_get_contact_shape_and_case_insensitive_id(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """GET /contacts/{id} answers the stored contact (id in any case), as contact_json says."""
    contact_id = fake.add_contact(
        {"email": "g@example.com", "firstName": "Gun"}, preferences={"acceptsEmail": True}
    )

    status, body = await send(http, "GET", f"{CONTACTS}/{contact_id.upper()}")

    assert 200 == status
    assert fake.contact_json(contact_id) == body
    assert ["id", "attributes", "meta", "preferences", "consents"] == list(body)
    assert ("Gun", None) == (body["attributes"]["firstName"], body["attributes"]["lastName"])
    assert body["preferences"]["acceptsEmail"] is True
    assert "Member" == body["meta"]["contactType"]


@pytest.mark.parametrize(
    ("contact_id", "status", "code"),
    [
        ("2e40b702-2767-4abe-ae99-aa510108e22b", 404, "ContactNotFound"),
        ("not-a-guid", 400, "InvalidContactId"),
        ("33ee9958-0e09-484f-b4c4-aa3e00e1e24", 400, "InvalidContactId"),
    ],
)
async def test_get_contact_errors(
    http: aiohttp.ClientSession, contact_id: str, status: int, code: str
) -> None:
    """An unknown id is 404 ContactNotFound; a malformed one 400 InvalidContactId."""
    actual_status, body = await send(http, "GET", f"{CONTACTS}/{contact_id}")

    assert (status, code) == (actual_status, error_code(body))


async def test_overview_by_contact_id(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """The overview holds every section, nulls for unset attributes, and seeded promotions."""
    contact_id = fake.add_contact({"email": "o@example.com"})
    promotion = fake.add_promotion(contact_id, {"name": "Spring"})

    status, body = await send(
        http, "GET", "/api/v3/contactoverview", params={"contactId": contact_id}
    )

    assert 200 == status
    expected_keys = [
        "id",
        "attributes",
        "meta",
        "preferences",
        "tiers",
        "consents",
        "audiences",
        "warnings",
        "rewardVouchers",
        "promotions",
    ]
    assert expected_keys == list(body)
    assert [promotion] == body["promotions"]
    assert body["attributes"]["currentStore"] is None
    assert body["attributes"]["street"] is None
    assert "recruitedByStore" in body["meta"]


async def test_overview_by_identifier_needs_contact_type(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """Without contactId the overview needs contactType (400 InvalidContactType otherwise)."""
    contact_id = fake.add_contact({"email": "o@example.com"})
    path = "/api/v3/contactoverview"

    missing_status, missing = await send(http, "GET", path, params={"email": "o@example.com"})
    status, body = await send(
        http, "GET", path, params={"email": "o@example.com", "contactType": "member"}
    )

    assert (400, "InvalidContactType") == (missing_status, error_code(missing))
    assert (200, contact_id) == (status, body["id"])


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"email": "twin@example.com", "contactType": "Member"}, 409, "MultipleMatches"),
        ({"email": "none@example.com", "contactType": "Member"}, 404, "ContactNotFound"),
        ({"contactId": "nope"}, 400, "InvalidContactId"),
        ({"contactType": "Member"}, 400, "InvalidSearchQuery"),
        ({"email": "bad", "contactType": "Member"}, 400, "InvalidEmailAddress"),
    ],
)
async def test_overview_errors(
    fake: FakeEngage,
    http: aiohttp.ClientSession,
    params: dict[str, str],
    status: int,
    code: str,
) -> None:
    """The overview reports lookup problems with the same codes as /contacts/id."""
    fake.add_contact({"email": "twin@example.com"})
    fake.add_contact({"email": "twin@example.com"})

    actual_status, body = await send(http, "GET", "/api/v3/contactoverview", params=params)

    assert (status, code) == (actual_status, error_code(body))


# POST /contacts ----------------------------------------------------------------------------


async def test_create_v3(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """A v3 create answers 201 with the contact; query parameters land in meta and source."""
    status, body = await send(
        http,
        "POST",
        CONTACTS,
        body={"email": "new@example.com", "firstName": "New", "birthDay": "1966-06-26"},
        params={"source": "POS", "storeExternalId": "600"},
    )

    assert 201 == status
    meta = body["meta"]
    assert ("API", True, "Member") == (meta["sourceType"], meta["approved"], meta["contactType"])
    assert "600" == meta["recruitedByStore"]["externalId"]
    assert body["attributes"]["memberNumber"]
    assert isinstance(body["attributes"]["age"], int)
    stored = fake.contacts[body["id"]]
    assert ("POS", "600") == (stored.source, stored.store_external_id)
    assert [body["id"]] == fake.find("email", "NEW@example.com")


async def test_create_v3_ignores_header_parameters(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """In v3, source/storeExternalId/createAsUnapproved as headers are ignored."""
    headers = {"source": "POS", "storeExternalId": "600", "createAsUnapproved": "true"}

    status, body = await send(
        http, "POST", CONTACTS, body={"email": "h@example.com"}, headers=headers
    )

    stored = fake.contacts[body["id"]]
    assert (201, True) == (status, body["meta"]["approved"])
    assert (None, None) == (stored.source, stored.store_external_id)


async def test_create_as_unapproved(http: aiohttp.ClientSession) -> None:
    """createAsUnapproved=true in the query creates an unapproved contact."""
    status, body = await send(
        http,
        "POST",
        CONTACTS,
        body={"email": "u@example.com"},
        params={"createAsUnapproved": "true"},
    )

    assert (201, False) == (status, body["meta"]["approved"])


async def test_create_v2_reads_headers(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """v2 takes the three create parameters as headers, not from the query."""
    status, body = await send(
        http,
        "POST",
        "/api/v2/contacts",
        body={"email": "v2@example.com"},
        headers={"source": "POS", "storeExternalId": "700", "createAsUnapproved": "true"},
        params={"source": "ignored"},
    )

    stored = fake.contacts[body["id"]]
    assert (201, False) == (status, body["meta"]["approved"])
    assert ("POS", "700") == (stored.source, stored.store_external_id)


async def test_create_contact_type_is_case_insensitive(http: aiohttp.ClientSession) -> None:
    """The body's contactType matches in any case and is stored in its configured spelling."""
    status, body = await send(
        http, "POST", CONTACTS, body={"email": "c@example.com", "contactType": "contact"}
    )

    assert (201, "Contact") == (status, body["meta"]["contactType"])
    assert body["attributes"]["memberNumber"] is None


@pytest.mark.parametrize(
    ("data", "status", "code", "fields"),
    [
        (b"", 400, "NoData", None),
        (b"{}", 400, "NoData", None),
        (b"[1]", 400, "InvalidData", None),
        (b"{not json", 400, "InvalidData", None),
        (b'{"email": "a@b.se", "contactType": "Ghost"}', 400, "InvalidContactType", None),
        (b'{"firstName": "No key"}', 422, "ValidationError", ["email"]),
        (b'{"email": ""}', 422, "ValidationError", ["email"]),
        (b'{"email": "no-at-sign"}', 422, "ValidationError", ["email"]),
        (b'{"email": "a@b.se", "mobilePhone": "0701"}', 422, "ValidationError", ["mobilePhone"]),
        (b'{"email": "a@b.se", "birthDay": "1985-02-30"}', 422, "ValidationError", ["birthDay"]),
        (
            b'{"email": "a@b.se", "socialSecurityNumber": "85-0605"}',
            422,
            "ValidationError",
            ["socialSecurityNumber"],
        ),
        (
            b'{"email": "a@b.se", "consents": [{"value": true}]}',
            422,
            "ValidationError",
            ["consents[0].id"],
        ),
        (
            b'{"email": "a@b.se", "consents": [{"id": "c"}]}',
            422,
            "ValidationError",
            ["consents[0].value"],
        ),
    ],
)
async def test_create_errors(
    fake: FakeEngage,
    http: aiohttp.ClientSession,
    data: bytes,
    status: int,
    code: str,
    fields: list[str] | None,
) -> None:
    """Creates refuse empty, malformed and invalid bodies; 422s name the fields."""
    actual_status, body = await send(http, "POST", CONTACTS, data=data)

    assert (status, code) == (actual_status, error_code(body))
    if fields is not None:
        assert {"fields": fields} == body["messageDetails"]
    assert {} == fake.contacts


async def test_create_allows_null_and_empty_values(http: aiohttp.ClientSession) -> None:
    """A null or "" in a non-key field passes: guarding against it is the client's job."""
    status, body = await send(
        http, "POST", CONTACTS, body={"email": "n@example.com", "firstName": "", "city": None}
    )

    assert (201, None, None) == (
        status,
        body["attributes"]["firstName"],
        body["attributes"]["city"],
    )


async def test_create_with_approved_key_taken_is_409(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """An approved contact of the type holding the key blocks a create (409)."""
    fake.add_contact({"email": "taken@example.com"})

    status, body = await send(http, "POST", CONTACTS, body={"email": "TAKEN@example.com"})

    assert (409, "ApprovedContactWithKeyExists") == (status, error_code(body))
    assert 1 == len(fake.contacts)


async def test_create_key_is_unique_per_type_and_among_approved(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """An unapproved holder, or one of another type, does not block a create."""
    fake.add_contact({"email": "k@example.com"}, approved=False)
    fake.add_contact({"email": "k@example.com"}, contact_type="Contact")

    status, _ = await send(http, "POST", CONTACTS, body={"email": "k@example.com"})

    assert 201 == status


async def test_unknown_attributes_are_dropped(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """Like Engage, the fake ignores attribute names the tenant lacks, unless declared."""
    fake.attribute_names.add("shoeSize")

    status, body = await send(
        http, "POST", CONTACTS, body={"email": "a@example.com", "firstNam": "Typo", "shoeSize": 42}
    )

    assert 201 == status
    assert "firstNam" not in body["attributes"]
    assert 42 == body["attributes"]["shoeSize"]


async def test_create_preferences_and_consents(http: aiohttp.ClientSession) -> None:
    """Preferences and consents given on create are returned as stored."""
    consent = {"id": "memberConsent", "value": True, "source": "ECOM"}

    status, body = await send(
        http,
        "POST",
        CONTACTS,
        body={
            "email": "pc@example.com",
            "preferences": {"acceptsSms": True},
            "consents": [consent],
        },
    )

    assert 201 == status
    assert {"acceptsEmail": False, "acceptsPostal": False, "acceptsSms": True} == body[
        "preferences"
    ]
    assert [consent] == body["consents"]


# Updates -----------------------------------------------------------------------------------


async def test_patch_applies_only_given_fields(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """PATCH changes what is sent, clears on null/"", ignores contactType, merges the rest."""
    contact_id = fake.add_contact(
        {"email": "p@example.com", "firstName": "Ann", "lastName": "Old", "city": "Town"},
        preferences={"acceptsEmail": True},
        consents=[{"id": "a", "value": True}, {"id": "b", "value": False}],
    )

    status, body = await send(
        http,
        "PATCH",
        f"{CONTACTS}/{contact_id}",
        body={
            "lastName": "New",
            "city": "",
            "firstName": None,
            "contactType": "Contact",
            "preferences": {"acceptsSms": True},
            "consents": [{"id": "b", "value": True}, {"id": "c", "value": True}],
        },
    )

    assert 200 == status
    attributes = body["attributes"]
    assert ("New", None, None) == (
        attributes["lastName"],
        attributes["city"],
        attributes["firstName"],
    )
    assert "Member" == body["meta"]["contactType"]
    assert {"acceptsEmail": True, "acceptsPostal": False, "acceptsSms": True} == body["preferences"]
    assert [("a", True), ("b", True), ("c", True)] == [
        (c["id"], c["value"]) for c in body["consents"]
    ]


@pytest.mark.parametrize(
    ("contact_id", "data", "status", "code"),
    [
        ("{seeded}", b"", 400, "NoData"),
        ("{seeded}", b"{}", 400, "NoData"),
        ("2e40b702-2767-4abe-ae99-aa510108e22b", b'{"firstName": "X"}', 404, "ContactNotFound"),
        ("bad-id", b'{"firstName": "X"}', 400, "InvalidContactId"),
        ("{seeded}", b'{"email": "broken"}', 422, "ValidationError"),
        ("{seeded}", b'{"email": null}', 422, "ValidationError"),
    ],
)
async def test_patch_errors(
    fake: FakeEngage,
    http: aiohttp.ClientSession,
    contact_id: str,
    data: bytes,
    status: int,
    code: str,
) -> None:
    """PATCH refuses empty bodies, unknown ids, invalid fields, and clearing the key."""
    seeded = fake.add_contact({"email": "s@example.com"})
    contact_id = contact_id.replace("{seeded}", seeded)

    actual_status, body = await send(http, "PATCH", f"{CONTACTS}/{contact_id}", data=data)

    assert (status, code) == (actual_status, error_code(body))
    assert "s@example.com" == fake.contacts[seeded].attributes["email"]


async def test_patch_to_a_taken_key_is_409(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """An update may not give an approved contact another approved contact's key."""
    fake.add_contact({"email": "one@example.com"})
    other = fake.add_contact({"email": "two@example.com"})

    status, body = await send(
        http, "PATCH", f"{CONTACTS}/{other}", body={"email": "ONE@example.com"}
    )

    assert (409, "ApprovedContactWithKeyExists") == (status, error_code(body))
    assert [other] == fake.find("email", "two@example.com")


async def test_patch_keeps_lookups_current(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """After a key change the old value no longer finds the contact and the new one does."""
    contact_id = fake.add_contact({"email": "before@example.com"})

    await send(http, "PATCH", f"{CONTACTS}/{contact_id}", body={"email": "after@example.com"})

    assert ([], [contact_id]) == (
        fake.find("email", "before@example.com"),
        fake.find("email", "after@example.com"),
    )


async def test_v2_update_is_post(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """v2 updates with POST /contacts/{id}; v3 has no such route."""
    contact_id = fake.add_contact({"email": "v2@example.com"})

    v2_status, v2_body = await send(
        http, "POST", f"/api/v2/contacts/{contact_id}", body={"firstName": "Two"}
    )
    v3_status, _ = await send(http, "POST", f"{CONTACTS}/{contact_id}", body={"firstName": "X"})
    v2_patch_status, _ = await send(
        http, "PATCH", f"/api/v2/contacts/{contact_id}", body={"firstName": "X"}
    )

    assert (200, "Two") == (v2_status, v2_body["attributes"]["firstName"])
    assert (404, 404) == (v3_status, v2_patch_status)


# Contact type changes ----------------------------------------------------------------------


@pytest.fixture(name="typed")
async def fixture_typed() -> AsyncIterator[tuple[FakeEngage, aiohttp.ClientSession]]:
    """Serve a tenant with a phone-keyed type beside Member and Contact, plus a session."""
    types = {"Member": "email", "Contact": "email", "SmsClub": "mobilePhone"}
    async with (
        FakeEngage(contact_types=types) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        yield fake, http


async def test_update_contact_type(typed: tuple[FakeEngage, aiohttp.ClientSession]) -> None:
    """The updateContactType call moves a contact; a new Member gets a member number."""
    fake, http = typed
    contact_id = fake.add_contact({"email": "t@example.com"}, contact_type="Contact")

    status, body = await send(
        http,
        "POST",
        f"{CONTACTS}/{contact_id}/updateContactType",
        params={"contactTypeId": "member"},
    )

    assert (200, "Member") == (status, body["meta"]["contactType"])
    assert body["attributes"]["memberNumber"]


@pytest.mark.parametrize(
    ("type_id", "contact_id", "status", "code"),
    [
        ("Ghost", "{seeded}", 400, "InvalidContactType"),
        (None, "{seeded}", 400, "InvalidContactType"),
        ("SmsClub", "{seeded}", 422, "ValidationError"),
        ("Member", "2e40b702-2767-4abe-ae99-aa510108e22b", 404, "ContactNotFound"),
        ("Member", "{taken}", 409, "ApprovedContactWithKeyExists"),
    ],
)
async def test_update_contact_type_errors(
    typed: tuple[FakeEngage, aiohttp.ClientSession],
    type_id: str | None,
    contact_id: str,
    status: int,
    code: str,
) -> None:
    """Unknown types, a missing target key, unknown ids and a taken key are refused."""
    fake, http = typed
    seeded = fake.add_contact({"email": "s@example.com"}, contact_type="Contact")
    fake.add_contact({"email": "dup@example.com"})
    taken = fake.add_contact({"email": "dup@example.com"}, contact_type="Contact")
    contact_id = contact_id.replace("{seeded}", seeded).replace("{taken}", taken)
    params = {"contactTypeId": type_id} if type_id else None

    actual_status, body = await send(
        http, "POST", f"{CONTACTS}/{contact_id}/updateContactType", params=params
    )

    assert (status, code) == (actual_status, error_code(body))
    assert "Contact" == fake.contacts[seeded].contact_type


async def test_v2_update_contact_type_refuses_member(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """v2 updateContactType cannot make a Member: that takes promoteToMember."""
    contact_id = fake.add_contact({"email": "c@example.com"}, contact_type="Contact")

    status, body = await send(
        http,
        "POST",
        f"/api/v2/contacts/{contact_id}/updateContactType",
        params={"contactTypeId": "Member"},
    )

    assert (400, "InvalidContactType") == (status, error_code(body))


async def test_v2_promote_to_member(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """v2 promoteToMember makes a Member, applying the optional body first."""
    contact_id = fake.add_contact({"email": "c@example.com"}, contact_type="Contact")

    status, body = await send(
        http, "POST", f"/api/v2/contacts/{contact_id}/promoteToMember", body={"firstName": "Pro"}
    )
    v3_status, _ = await send(http, "POST", f"{CONTACTS}/{contact_id}/promoteToMember")

    assert (200, "Member", "Pro") == (
        status,
        body["meta"]["contactType"],
        body["attributes"]["firstName"],
    )
    assert 404 == v3_status


async def test_v2_promote_to_member_is_all_or_nothing(
    typed: tuple[FakeEngage, aiohttp.ClientSession],
) -> None:
    """A refused promotion applies none of its body."""
    fake, http = typed
    fake.add_contact({"email": "m@example.com"})
    contact_id = fake.add_contact({"email": "c@example.com"}, contact_type="Contact")

    status, body = await send(
        http,
        "POST",
        f"/api/v2/contacts/{contact_id}/promoteToMember",
        body={"firstName": "Nope", "email": "m@example.com"},
    )

    assert (409, "ApprovedContactWithKeyExists") == (status, error_code(body))
    assert None is fake.contacts[contact_id].attributes.get("firstName")


# Lists -------------------------------------------------------------------------------------


async def test_transactions_paged_with_offset_and_capped_count(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """Transactions page with offset/count; count is capped at 100."""
    contact_id = fake.add_contact({"email": "t@example.com"})
    for number in range(150):
        fake.add_transaction(contact_id, transactionNumber=str(number))
    path = f"{CONTACTS}/transactions"

    _, first = await send(http, "GET", path, params={"contactId": contact_id, "count": "500"})
    _, rest = await send(http, "GET", path, params={"contactId": contact_id, "offset": "100"})

    assert (150, 0, 100, 100) == (
        first["totalCount"],
        first["offset"],
        first["count"],
        len(first["items"]),
    )
    assert [str(n) for n in range(100, 150)] == [t["transactionNumber"] for t in rest["items"]]


async def test_transaction_defaults(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """add_transaction fills in every field Engage returns and stores the dict it returns."""
    contact_id = fake.add_contact({"email": "t@example.com"})
    stored = fake.add_transaction(contact_id, netPriceSum=42.0)

    _, body = await send(http, "GET", f"{CONTACTS}/transactions", params={"contactId": contact_id})

    expected_fields = {
        "id",
        "transactionNumber",
        "createdDate",
        "storeName",
        "numberOfItems",
        "netPriceSum",
        "localNetPriceSum",
        "localCurrency",
        "groupCurrency",
        "storeType",
        "lineItems",
        "externalId",
    }
    assert expected_fields == set(stored)
    assert [stored] == body["items"]
    assert 42.0 == stored["netPriceSum"]


async def test_transactions_array_shape_and_v2_path(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """list_shapes switches to a bare array; v2 reads transactions under the contact path."""
    contact_id = fake.add_contact({"email": "t@example.com"})
    stored = fake.add_transaction(contact_id)
    fake.list_shapes["transactions"] = "array"

    v3_status, v3_body = await send(
        http, "GET", f"{CONTACTS}/transactions", params={"contactId": contact_id}
    )
    v2_status, v2_body = await send(http, "GET", f"/api/v2/contacts/{contact_id}/transactions")

    assert (200, [stored]) == (v3_status, v3_body)
    assert (200, [stored]) == (v2_status, v2_body)


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        (f"{CONTACTS}/transactions", {}, 400, "InvalidContactId"),
        (
            f"{CONTACTS}/transactions",
            {"contactId": "2e40b702-2767-4abe-ae99-aa510108e22b"},
            404,
            "ContactNotFound",
        ),
        (f"{CONTACTS}/transactions", {"contactId": "{seeded}", "count": "-1"}, 400, "InvalidData"),
        ("/api/v3/point-accounts", {"contactId": "nope"}, 400, "InvalidContactId"),
        (
            "/api/v3/promotion-assignments",
            {"contactId": "{seeded}", "redemptionChannelType": "SHOP"},
            400,
            "NotAValidRedemptionChannel",
        ),
    ],
)
async def test_list_errors(
    fake: FakeEngage,
    http: aiohttp.ClientSession,
    path: str,
    params: dict[str, str],
    status: int,
    code: str,
) -> None:
    """List endpoints validate the contact id, paging and the channel type."""
    seeded = fake.add_contact({"email": "l@example.com"})
    params = {k: v.replace("{seeded}", seeded) for k, v in params.items()}

    actual_status, body = await send(http, "GET", path, params=params)

    assert (status, code) == (actual_status, error_code(body))


async def test_promotion_assignments(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """Promotions come as an array by default, filtered by channel type in any case."""
    contact_id = fake.add_contact({"email": "p@example.com"})
    pos = fake.add_promotion(contact_id, {"name": "POS only"})
    ecom = fake.add_promotion(
        contact_id,
        {"redemptionChannels": [{"type": "ECOM", "valueType": "PERCENT", "value": 5}]},
    )
    path = "/api/v3/promotion-assignments"

    _, everything = await send(http, "GET", path, params={"contactId": contact_id})
    _, only_ecom = await send(
        http, "GET", path, params={"contactId": contact_id, "redemptionChannelType": "ecom"}
    )
    _, v2 = await send(
        http,
        "GET",
        f"/api/v2/contacts/{contact_id}/promotions",
        params={"redemptionChannelType": "POS"},
    )

    assert [pos, ecom] == everything
    assert [ecom] == only_ecom
    assert [pos] == v2
    assert {"id", "promotionId", "redemptionChannels", "redeemed", "expiresOn"} <= set(pos)


async def test_promotion_assignments_paged(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """list_shapes can make promotion assignments paged."""
    contact_id = fake.add_contact({"email": "p@example.com"})
    promotion = fake.add_promotion(contact_id, {})
    fake.list_shapes["promotion_assignments"] = "paged"

    _, body = await send(
        http, "GET", "/api/v3/promotion-assignments", params={"contactId": contact_id}
    )

    assert {"items": [promotion], "totalCount": 1, "offset": 0, "count": 100} == body


@pytest.mark.parametrize("version", ["v2", "v3"])
async def test_point_accounts(fake: FakeEngage, http: aiohttp.ClientSession, version: str) -> None:
    """Point accounts are paged with links by default, or a bare array."""
    contact_id = fake.add_contact({"email": "p@example.com"})
    account = fake.add_point_account(contact_id, balance=120.0)
    path = f"/api/{version}/point-accounts"

    _, paged = await send(http, "GET", path, params={"contactId": contact_id})
    fake.list_shapes["point_accounts"] = "array"
    _, array = await send(http, "GET", path, params={"contactId": contact_id})

    expected = {"links": [], "items": [account], "totalCount": 1, "offset": 0, "count": 100}
    assert expected == paged
    assert [account] == array
    assert (contact_id, 1, 120.0) == (
        account["contactId"],
        account["definitionId"],
        account["balance"],
    )
    assert isinstance(account["id"], int)


# Bulk --------------------------------------------------------------------------------------


async def bulk(
    http: aiohttp.ClientSession, method: str, items: Any, **params: str
) -> tuple[int, Any]:
    """Send a bulk request (contactType Member unless given); return status and body."""
    return await send(
        http, method, f"{CONTACTS}/bulk", params={"contactType": "Member", **params}, body=items
    )


async def batch_status(http: aiohttp.ClientSession, batch_id: str) -> dict[str, Any]:
    """Poll a batch once over the API and return the status body."""
    status, body = await send(http, "GET", f"{CONTACTS}/bulk/status", params={"batchId": batch_id})
    assert 200 == status
    assert isinstance(body, dict)
    return body


async def test_bulk_create_with_per_item_failures(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """Bulk create answers 202 with the batch id; items succeed or fail on their own."""
    fake.add_contact({"email": "taken@example.com"})
    items = [
        {"email": "one@example.com", "firstName": "One"},
        {"email": "broken"},
        {"email": "taken@example.com"},
        "not an object",
        {"email": "ONE@example.com"},
    ]

    status, batch_id = await bulk(http, "POST", items)
    report = await batch_status(http, batch_id)

    assert 202 == status
    assert ("Finished", 5, 1, 4) == (
        report["status"],
        report["totalCount"],
        report["successCount"],
        report["failedCount"],
    )
    assert [
        (1, "ValidationError"),
        (2, "ApprovedContactWithKeyExists"),
        (3, "InvalidData"),
        (4, "ApprovedContactWithKeyExists"),
    ] == [(f["index"], f["errorCode"]) for f in report["failures"]]
    assert all(f["contactId"] is None for f in report["failures"])
    assert report["createdOn"]
    assert report["finishedOn"]
    batch = fake.batches[batch_id]
    assert ("create", "Member") == (batch.kind, batch.contact_type)
    assert fake.find("email", "one@example.com") == [batch.contact_ids[0]]


async def test_bulk_update_with_per_item_failures(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """Bulk update names contacts by contactId (or id); failures carry the contact id."""
    first = fake.add_contact({"email": "a@example.com"})
    second = fake.add_contact({"email": "b@example.com"})
    unknown = "2e40b702-2767-4abe-ae99-aa510108e22b"
    items = [
        {"contactId": first, "firstName": "A"},
        {"id": second.upper(), "firstName": "B"},
        {"contactId": unknown, "firstName": "C"},
        {"contactId": first, "birthDay": "yesterday"},
        {"contactId": "nope", "firstName": "D"},
        {"firstName": "E"},
    ]

    status, batch_id = await bulk(http, "PATCH", items, avoidTriggeringExport="true")
    report = await batch_status(http, batch_id)

    assert 202 == status
    assert [
        (2, unknown, "ContactNotFound"),
        (3, first, "ValidationError"),
        (4, None, "InvalidContactId"),
        (5, None, "InvalidContactId"),
    ] == [(f["index"], f["contactId"], f["errorCode"]) for f in report["failures"]]
    assert ("A", "B") == (
        fake.contacts[first].attributes["firstName"],
        fake.contacts[second].attributes["firstName"],
    )
    assert fake.batches[batch_id].avoid_triggering_export


@pytest.mark.parametrize(
    ("method", "items", "params", "code"),
    [
        ("POST", {"email": "a@b.se"}, {}, "InvalidData"),
        ("POST", [], {}, "NoData"),
        ("PATCH", None, {}, "NoData"),
        ("POST", [{"email": f"u{i}@example.com"} for i in range(4001)], {}, "TooManyContacts"),
        ("POST", [{"email": "a@b.se"}], {"contactType": "Ghost"}, "InvalidContactType"),
    ],
)
async def test_bulk_request_errors(
    fake: FakeEngage,
    http: aiohttp.ClientSession,
    method: str,
    items: Any,
    params: dict[str, str],
    code: str,
) -> None:
    """Bulk refuses non-arrays, empty arrays, over 4000 items and unknown contact types."""
    status, body = await bulk(http, method, items, **params)

    assert (400, code) == (status, error_code(body))
    assert {} == fake.batches


async def test_bulk_accepts_4000_items(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """Exactly 4000 items is within the limit."""
    status, batch_id = await bulk(http, "POST", [{"email": f"u{i}@x.se"} for i in range(4000)])

    assert (202, 4000) == (status, len(fake.batches[batch_id].contact_ids))


async def test_bulk_status_unknown_batch_is_404(http: aiohttp.ClientSession) -> None:
    """Polling a batch id the fake never issued is 404 BatchNotFound."""
    status, body = await send(
        http,
        "GET",
        "/api/v2/contacts/bulk/status",
        params={"batchId": "2e40b702-2767-4abe-ae99-aa510108e22b"},
    )

    assert (404, "BatchNotFound") == (status, error_code(body))


async def test_held_batches_wait_for_release(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """hold_batches keeps batches Pending until release_batches() (or until unheld)."""
    fake.hold_batches = True

    _, first = await bulk(http, "POST", [{"email": "one@example.com"}])
    pending = await batch_status(http, first)
    fake.release_batches()
    released = await batch_status(http, first)
    _, second = await bulk(http, "POST", [{"email": "two@example.com"}])
    still_held = fake.batches[second].status
    fake.hold_batches = False

    assert ("Pending", 0, None) == (
        pending["status"],
        pending["successCount"],
        pending["finishedOn"],
    )
    assert ("Finished", 1) == (released["status"], released["successCount"])
    assert ("Pending", "Finished") == (still_held, fake.batches[second].status)
    assert 2 == len(fake.contacts)


async def test_bulk_delay_processes_later() -> None:
    """With bulk_delay a batch is processed that long after submission, not at once."""
    async with (
        FakeEngage(bulk_delay=0.05) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        _, batch_id = await bulk(http, "POST", [{"email": "later@example.com"}])
        batch = fake.batches[batch_id]

        await until(lambda: batch.status == "Finished")

        assert batch.processed_at is not None
        # A little under the delay: the wall clock may be slewed against the loop's clock.
        assert batch.processed_at - batch.submitted_at >= dt.timedelta(seconds=0.04)
        assert 1 == len(fake.find("email", "later@example.com"))


async def test_close_cancels_delayed_batches() -> None:
    """A batch still waiting for its delay is simply never processed after close()."""
    async with (
        FakeEngage(bulk_delay=30) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        _, batch_id = await bulk(http, "POST", [{"email": "never@example.com"}])

    assert "Pending" == fake.batches[batch_id].status


# Faults ------------------------------------------------------------------------------------


async def test_hang_never_answers_and_applies_nothing(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """A hung request times out on the client; once released it is dropped, not applied."""
    contact_id = fake.add_contact({"email": "h@example.com", "firstName": "Before"})
    fault = fake.inject("hang", method="PATCH")

    with pytest.raises(TimeoutError):
        await send(
            http, "PATCH", f"{CONTACTS}/{contact_id}", body={"firstName": "After"}, timeout=SHORT
        )
    fake.remove(fault)
    status, body = await send(http, "GET", f"{CONTACTS}/{contact_id}")

    assert (200, "Before") == (status, body["attributes"]["firstName"])
    assert (1, "hang") == (fault.hits, fake.requests_to("PATCH", "*")[0].fault)


async def test_removing_a_hang_cuts_the_waiting_request(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """A client still waiting when the hang is removed sees a disconnect, nothing applied."""
    fault = fake.inject("hang", method="POST")
    task = asyncio.create_task(send(http, "POST", CONTACTS, body={"email": "h@example.com"}))
    await until(lambda: fault.hits == 1)

    fake.remove(fault)
    fake.remove(fault)

    with pytest.raises(aiohttp.ClientConnectionError):
        await task
    status, _ = await send(http, "POST", CONTACTS, body={"email": "h@example.com"})
    assert (201, 1) == (status, len(fake.contacts))


async def test_slow_answers_after_the_delay(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """A slow request answers normally after its delay."""
    fault = fake.inject("slow", delay=0.01)

    status, _ = await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})

    assert (404, 1, "slow") == (status, fault.hits, fake.requests[-1].fault)


async def test_slow_applies_even_when_the_client_gave_up(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """A client that times out on a slow create still finds the contact created later."""
    fake.inject("slow", delay=0.2, times=1)

    with pytest.raises(TimeoutError):
        await send(http, "POST", CONTACTS, body={"email": "late@example.com"}, timeout=SHORT)
    await until(lambda: fake.find("email", "late@example.com"))

    assert 1 == len(fake.contacts)


@pytest.mark.parametrize("status", [502, 503])
async def test_server_error_is_a_proxy_html_page(
    fake: FakeEngage, http: aiohttp.ClientSession, status: int
) -> None:
    """server_error answers the status with an HTML body, as a proxy in front would."""
    fake.inject("server_error", status=status)

    async with http.get(f"{CONTACTS}/id", params={"email": "a@b.se"}) as response:
        text = await response.text()

    assert (status, "text/html") == (response.status, response.content_type)
    phrase = "Bad Gateway" if status == 502 else "Service Unavailable"
    assert f"<html><body><h1>{status} {phrase}</h1></body></html>" == text


async def test_server_error_default_is_502_before_auth(fake: FakeEngage) -> None:
    """Faults apply before the api key check: a proxy does not know the key."""
    fake.inject("server_error")
    async with (
        aiohttp.ClientSession(base_url=fake.url) as http,
        http.get(f"{CONTACTS}/id") as response,
    ):
        assert 502 == response.status


async def test_status_fault_default_body(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """A status fault answers an Engage-style JSON error for the status by default."""
    fake.inject("status", status=403, method="POST", path=f"{CONTACTS}/bulk")

    status, body = await bulk(http, "POST", [{"email": "a@b.se"}])

    assert (403, "Forbidden", 403) == (status, error_code(body), body["statusCode"])
    assert {} == fake.batches


@pytest.mark.parametrize(
    ("body", "content_type", "raw"),
    [
        ("plain words", "text/plain", b"plain words"),
        (b"\x00\x01", "application/octet-stream", b"\x00\x01"),
        ({"detail": "busy"}, None, b'{"detail": "busy"}'),
    ],
)
async def test_status_fault_custom_body(
    fake: FakeEngage,
    http: aiohttp.ClientSession,
    body: object,
    content_type: str | None,
    raw: bytes,
) -> None:
    """A status fault sends the given body (str, bytes or JSON) and content type."""
    fake.inject("status", status=503, body=body, content_type=content_type)

    async with http.get(f"{CONTACTS}/id") as response:
        received = await response.read()

    assert (503, raw) == (response.status, received)
    assert (content_type or "application/json") == response.content_type


@pytest.mark.parametrize(("retry_after", "header"), [(None, None), (2, "2"), (1.5, "1.5")])
async def test_rate_limited_fault(
    fake: FakeEngage,
    http: aiohttp.ClientSession,
    retry_after: float | None,
    header: str | None,
) -> None:
    """rate_limited answers 429 TooManyRequests, with Retry-After only when asked."""
    fake.inject("rate_limited", retry_after=retry_after)

    async with http.get(f"{CONTACTS}/id") as response:
        body = await response.json()

    assert (429, "TooManyRequests") == (response.status, error_code(body))
    assert header == response.headers.get("Retry-After")


async def test_create_timeout_creates_nothing(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """create_timeout answers 504 RequestTimeOut and rolls back: no contact exists."""
    fault = fake.inject("create_timeout")

    lookup_status, _ = await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})
    status, body = await send(http, "POST", CONTACTS, body={"email": "t@example.com"})

    assert (504, "RequestTimeOut") == (status, error_code(body))
    assert (404, 1) == (lookup_status, fault.hits)
    assert {} == fake.contacts


async def test_lost_reply_applies_then_disconnects(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """lost_reply creates the contact, then cuts the connection without an answer."""
    fake.inject("lost_reply", method="POST")

    with pytest.raises(aiohttp.ClientConnectionError):
        await send(http, "POST", CONTACTS, body={"email": "lost@example.com"})

    assert 1 == len(fake.find("email", "lost@example.com"))


async def test_lost_reply_on_bulk_accepts_the_batch(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """A bulk request whose answer is lost was still accepted and processed."""
    fake.inject("lost_reply", path=f"{CONTACTS}/bulk")

    with pytest.raises(aiohttp.ClientConnectionError):
        await bulk(http, "POST", [{"email": "bulk@example.com"}])

    assert ["Finished"] == [batch.status for batch in fake.batches.values()]
    assert 1 == len(fake.find("email", "bulk@example.com"))


async def test_drop_applies_nothing(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """A drop cuts the connection before the request does anything."""
    fake.inject("drop", method="POST")

    with pytest.raises(aiohttp.ClientConnectionError):
        await send(http, "POST", CONTACTS, body={"email": "dropped@example.com"})

    assert ({}, "drop") == (fake.contacts, fake.requests[-1].fault)


async def test_being_created_creates_and_answers_409(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """being_created stores the contact yet answers 409 ContactWithKeyIsBeingCreated."""
    fake.inject("being_created")

    status, body = await send(http, "POST", CONTACTS, body={"email": "race@example.com"})

    assert (409, "ContactWithKeyIsBeingCreated") == (status, error_code(body))
    assert 1 == len(fake.find("email", "race@example.com"))


async def test_times_disarms_the_fault(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """A fault with times=N hits N matching requests, then lets the rest through."""
    fault = fake.inject("server_error", times=2)

    statuses = [
        (await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"}))[0] for _ in range(3)
    ]

    assert ([502, 502, 404], 2) == (statuses, fault.hits)
    assert not fault.armed


async def test_earliest_fault_wins_and_filters_apply(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """Of several matching faults the earliest injected applies; method/path narrow matches."""
    post_only = fake.inject("status", status=418, method="post")
    first = fake.inject("server_error", status=502, path="/api/v3/contacts/*")
    second = fake.inject("server_error", status=503, path="/api/v3/contacts/*")

    status, _ = await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})
    other_status, _ = await send(http, "GET", "/api/v3/contactoverview")

    assert (502, 400) == (status, other_status)
    assert (0, 1, 0) == (post_only.hits, first.hits, second.hits)


async def test_clear_faults(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """clear_faults removes every fault at once."""
    fake.inject("server_error")
    fake.inject("drop")

    fake.clear_faults()
    status, _ = await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})

    assert 404 == status


@pytest.mark.parametrize(
    "kwargs", [{"kind": "explode"}, {"kind": "drop", "times": 0}, {"kind": "slow", "delay": -1}]
)
async def test_inject_refuses_nonsense(fake: FakeEngage, kwargs: dict[str, Any]) -> None:
    """Unknown kinds, times below 1 and negative delays are programming errors."""
    with pytest.raises(ValueError):
        fake.inject(**kwargs)


async def test_go_down_refuses_connections_and_come_up_restores(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """go_down refuses new connections and cuts open ones; come_up listens on the same port."""
    url = fake.url
    await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})
    fake.inject("hang", method="POST")
    in_flight = asyncio.create_task(send(http, "POST", CONTACTS, body={"email": "a@b.se"}))
    await until(lambda: fake.requests_to("POST", CONTACTS))

    await fake.go_down()

    assert fake.is_down
    with pytest.raises(aiohttp.ClientConnectionError):
        await in_flight
    with pytest.raises(aiohttp.ClientConnectorError):
        await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})

    await fake.come_up()
    status, _ = await send(http, "GET", f"{CONTACTS}/id", params={"email": "a@b.se"})

    assert (url, 404, False) == (fake.url, status, fake.is_down)


async def test_close_with_a_hanging_request_leaks_nothing() -> None:
    """close() releases held requests: the client sees a disconnect and nothing warns."""
    fake = FakeEngage()
    await fake.start()
    fake.inject("hang")
    async with aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http:
        task = asyncio.create_task(send(http, "POST", CONTACTS, body={"email": "a@b.se"}))
        await until(lambda: fake.requests)

        await fake.close()

        with pytest.raises(aiohttp.ClientConnectionError):
            await task
    assert {} == fake.contacts


# Rate limit --------------------------------------------------------------------------------


async def test_rate_limit_answers_429_and_peak_rate_counts() -> None:
    """Over rate_limit requests in a second get 429 TooManyRequests; None lifts the limit."""
    async with (
        FakeEngage(rate_limit=3) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        path = f"{CONTACTS}/id"
        statuses = [
            (await send(http, "GET", path, params={"email": "a@b.se"}))[0] for _ in range(5)
        ]
        _, body = await send(http, "GET", path, params={"email": "a@b.se"})
        fake.rate_limit = None
        lifted, _ = await send(http, "GET", path, params={"email": "a@b.se"})

        assert [404, 404, 404, 429, 429] == statuses
        assert "TooManyRequests" == error_code(body)
        assert 404 == lifted
        assert 7 == fake.peak_rate()
        with pytest.raises(ValueError):
            fake.peak_rate(window=0)
        assert [None] * 7 == [r.fault for r in fake.requests]


# Seeding and inspection --------------------------------------------------------------------


async def test_add_contact_bypasses_validation_and_uniqueness(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """Seeding stores odd states as given: duplicates, invalid values, custom types."""
    first = fake.add_contact({"email": "dup@example.com"})
    second = fake.add_contact({"email": "dup@example.com"})
    odd = fake.add_contact(
        {"email": "broken", "memberNumber": None},
        contact_type="member",
        contact_id="2E40B702-2767-4ABE-AE99-AA510108E22B",
        approved=False,
    )
    custom = fake.add_contact({"externalId": "X"}, contact_type="Partner")

    assert [first, second] == fake.find("email", "DUP@example.com")
    assert "2e40b702-2767-4abe-ae99-aa510108e22b" == odd
    assert ("Member", False, None) == (
        fake.contacts[odd].contact_type,
        fake.contacts[odd].approved,
        fake.contacts[odd].attributes["memberNumber"],
    )
    assert "Partner" == fake.contacts[custom].contact_type
    assert [custom] == fake.find("externalId", "X", contact_type="Partner")
    assert [first] == fake.find("email", "dup@example.com", contact_type="member")[:1]
    with pytest.raises(ValueError):
        fake.add_contact({}, contact_id=odd)


async def test_stored_attributes_are_read_only(fake: FakeEngage) -> None:
    """Stored attributes cannot be changed behind the indexes' back."""
    contact_id = fake.add_contact({"email": "ro@example.com"})

    with pytest.raises(TypeError):
        fake.contacts[contact_id].attributes["email"] = "x@example.com"  # type: ignore[index]


async def test_find_unindexed_attribute(fake: FakeEngage) -> None:
    """The find helper works on any attribute, indexed or not."""
    contact_id = fake.add_contact({"email": "f@example.com", "city": "Town"})

    assert [contact_id] == fake.find("city", "Town")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"contact_types": {"Member": "firstName"}},
        {"custom_key": "email"},
    ],
)
def test_configuration_is_checked(kwargs: dict[str, Any]) -> None:
    """A key attribute or custom key Engage does not offer is refused up front."""
    with pytest.raises(ValueError):
        FakeEngage(**kwargs)


def test_public_names() -> None:
    """The package exports exactly its three public names, sorted."""
    from engage_async import testing

    assert ["FakeEngage", "Fault", "RecordedRequest"] == testing.__all__
    assert (Fault, RecordedRequest) == (testing.Fault, testing.RecordedRequest)


# Bulk contact types ------------------------------------------------------------------------


async def send_bulk(
    http: aiohttp.ClientSession, method: str, items: Any, **params: str
) -> tuple[int, Any]:
    """Send a bulk request with exactly these query parameters (no contactType added)."""
    return await send(http, method, f"{CONTACTS}/bulk", params=params or None, body=items)


async def test_bulk_without_contact_type_goes_under_the_tenant_default() -> None:
    """A bulk create without contactType creates contacts of the tenant's default type."""
    async with (
        FakeEngage(default_contact_type="contact") as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        status, batch_id = await send_bulk(http, "POST", [{"email": "d@example.com"}])

        assert 202 == status
        assert "Contact" == fake.batches[batch_id].contact_type
        assert "Contact" == fake.contacts[fake.find("email", "d@example.com")[0]].contact_type


def test_default_contact_type_must_be_a_tenant_type() -> None:
    """A default contact type the tenant lacks is refused up front, naming the field."""
    with pytest.raises(ValueError, match="default_contact_type"):
        FakeEngage(default_contact_type="Ghost")


async def test_strict_bulk_update_fails_contacts_of_another_type() -> None:
    """Strictly, a bulk update applies only to contacts of its type (the default when not
    given); an item for another type fails `ContactTypeMismatch`, naming no personal data,
    and is not applied.
    """
    async with (
        FakeEngage(strict_bulk_types=True) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        member = fake.add_contact({"email": "m@example.com"})
        other = fake.add_contact({"email": "c@example.com"}, contact_type="Contact")
        items = [{"contactId": member, "city": "Visby"}, {"contactId": other, "city": "Visby"}]

        _, untyped = await send_bulk(http, "PATCH", items)
        untyped_report = await batch_status(http, untyped)
        _, typed_id = await send_bulk(http, "PATCH", items, contactType="Contact")
        typed_report = await batch_status(http, typed_id)

        assert [(1, other, "ContactTypeMismatch")] == [
            (f["index"], f["contactId"], f["errorCode"]) for f in untyped_report["failures"]
        ]
        assert "c@example.com" not in json.dumps(untyped_report)
        assert [(0, member, "ContactTypeMismatch")] == [
            (f["index"], f["contactId"], f["errorCode"]) for f in typed_report["failures"]
        ]
        assert ("Member", "Contact") == (
            fake.batches[untyped].contact_type,
            fake.batches[typed_id].contact_type,
        )
        assert ("Visby", "Visby") == (
            fake.contacts[member].attributes["city"],
            fake.contacts[other].attributes["city"],
        )
        assert [None, other] == fake.batches[typed_id].contact_ids


async def test_lenient_bulk_update_applies_whatever_the_type(
    fake: FakeEngage, http: aiohttp.ClientSession
) -> None:
    """With strict_bulk_types off, a bulk update is applied to contacts of any type."""
    fake.strict_bulk_types = False
    other = fake.add_contact({"email": "c@example.com"}, contact_type="Contact")

    _, batch_id = await send_bulk(http, "PATCH", [{"contactId": other, "city": "Kiruna"}])

    assert [] == (await batch_status(http, batch_id))["failures"]
    assert "Kiruna" == fake.contacts[other].attributes["city"]


@pytest.mark.parametrize(
    ("method", "value", "status", "recorded"),
    [
        ("PATCH", "true", 202, True),
        ("PATCH", "false", 202, False),
        ("POST", "true", 202, False),
        ("POST", "maybe", 400, None),
        ("PATCH", "yes", 400, None),
    ],
)
async def test_avoid_triggering_export(
    fake: FakeEngage,
    http: aiohttp.ClientSession,
    method: str,
    value: str,
    status: int,
    recorded: bool | None,
) -> None:
    """avoidTriggeringExport takes true/false; it is recorded on updates and, as Engage says
    it only has an effect there, taken and ignored on creates.
    """
    member = fake.add_contact({"email": "m@example.com"})
    items = [{"contactId": member, "city": "X"}] if method == "PATCH" else [{"email": "n@x.se"}]

    actual, body = await bulk(http, method, items, avoidTriggeringExport=value)

    assert status == actual
    if recorded is None:
        assert "InvalidData" == error_code(body)
    else:
        assert recorded == fake.batches[body].avoid_triggering_export


async def test_the_flusher_delivers_updates_to_a_strict_tenant(tmp_path: Any) -> None:
    """Queued updates to a Member and a Contact reach a tenant that applies bulk requests
    under their contact type only (here the types are unknown to the outbox: each update
    goes through the single endpoint).
    """
    from helpers import make_config

    import engage_async as ea

    async with FakeEngage(strict_bulk_types=True, rate_limit=None) as fake:
        member = fake.add_contact({"email": "m@example.com"})
        other = fake.add_contact({"email": "c@example.com"}, contact_type="Contact")
        config = make_config(
            fake.url,
            fake.api_key,
            tmp_path,
            bulk_threshold=1,
            background_delays=(0.01,),
            batch_poll_initial=0.01,
            batch_poll_max=0.05,
        )
        async with ea.EngageSession(config) as engage:
            await fake.go_down()
            await engage.update_contact(member, {"city": "Visby"})
            await engage.update_contact(other, {"city": "Visby"})
            await fake.come_up()
        async with ea.OutboxFlusher(config) as flusher:
            await flusher.flush_once()

        assert ("Visby", "Visby") == (
            fake.contacts[member].attributes.get("city"),
            fake.contacts[other].attributes.get("city"),
        )


# API v2 rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("identifier", ["contactId", "email"])
async def test_v2_overview_always_needs_contact_type(
    fake: FakeEngage, http: aiohttp.ClientSession, identifier: str
) -> None:
    """In v2 the overview without contactType is 400 InvalidContactType, contactId or not."""
    contact_id = fake.add_contact({"email": "o@example.com"})
    params = {"contactId": contact_id} if identifier == "contactId" else {"email": "o@example.com"}
    path = "/api/v2/contactoverview"

    missing_status, missing = await send(http, "GET", path, params=params)
    status, body = await send(http, "GET", path, params={**params, "contactType": "Member"})

    assert (400, "InvalidContactType") == (missing_status, error_code(missing))
    assert (200, contact_id) == (status, body["id"])


async def test_v2_promote_to_member_sets_required_fields_and_records_the_source(
    typed: tuple[FakeEngage, aiohttp.ClientSession],
) -> None:
    """v2 promoteToMember takes the fields a Member requires in its body, and an optional
    `source` header, which the fake records on the contact.
    """
    fake, http = typed
    sms = fake.add_contact({"mobilePhone": "+46701234567"}, contact_type="SmsClub")
    plain = fake.add_contact({"email": "p@example.com"}, contact_type="Contact")
    path = "/api/v2/contacts/{}/promoteToMember"

    refused, refusal = await send(http, "POST", path.format(sms))
    status, body = await send(
        http, "POST", path.format(sms), body={"email": "sms@example.com"}, headers={"source": "POS"}
    )
    quiet, _ = await send(http, "POST", path.format(plain), body={})

    assert (422, "ValidationError") == (refused, error_code(refusal))
    assert (200, "Member", "sms@example.com") == (
        status,
        body["meta"]["contactType"],
        body["attributes"]["email"],
    )
    assert ("POS", None) == (
        fake.contacts[sms].promotion_source,
        fake.contacts[plain].promotion_source,
    )
    assert 200 == quiet


# Answer shapes -----------------------------------------------------------------------------


UNKNOWN_ID = "2e40b702-2767-4abe-ae99-aa510108e22b"


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (
            "error_code",
            {
                "errorCode": "ContactNotFound",
                "message": "No contact has that id.",
                "statusCode": 404,
            },
        ),
        ("code_detail", {"code": "ContactNotFound", "detail": "No contact has that id."}),
        ("error", {"error": "ContactNotFound", "statusCode": 404}),
        ("string", "ContactNotFound"),
    ],
)
async def test_error_body_shapes(shape: str, expected: Any) -> None:
    """shapes["error_body"] words every error answer, the header checks' ones too."""
    async with (
        FakeEngage(shapes={"error_body": shape}) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        status, body = await send(http, "GET", f"{CONTACTS}/{UNKNOWN_ID}")
        refused_status, refused = await send(
            http, "GET", f"{CONTACTS}/{UNKNOWN_ID}", headers={"apikey": "wrong"}
        )

    assert (404, expected) == (status, body)
    unauthorized = json.dumps(refused)
    assert (401, True) == (refused_status, "Unauthorized" in unauthorized)


async def test_error_body_shape_applies_to_default_status_faults(fake: FakeEngage) -> None:
    """An injected status fault without a body is worded in the chosen error shape."""
    fake.shapes["error_body"] = "code_detail"
    fake.inject("status", status=503, times=1)
    async with aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http:
        status, body = await send(http, "GET", f"{CONTACTS}/{UNKNOWN_ID}")

    assert (503, {"code": "ServiceUnavailable", "detail": "Service Unavailable"}) == (status, body)


@pytest.mark.parametrize(
    ("shape", "wrap"),
    [
        ("string", lambda guid: guid),
        ("contactId", lambda guid: {"contactId": guid}),
        ("id", lambda guid: {"id": guid}),
    ],
)
async def test_contact_id_shapes(shape: str, wrap: Callable[[str], Any]) -> None:
    """shapes["contact_id"] words the /contacts/id answer; a 404 stays an error."""
    async with (
        FakeEngage(shapes={"contact_id": shape}) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        guid = fake.add_contact({"email": "s@example.com"})
        status, body = await send(http, "GET", f"{CONTACTS}/id", params={"email": "s@example.com"})
        missing, _ = await send(http, "GET", f"{CONTACTS}/id", params={"email": "n@example.com"})

    assert (200, wrap(guid), 404) == (status, body, missing)


async def test_batch_id_and_status_shapes() -> None:
    """shapes["batch_id"] and ["batch_status"] word the bulk answers: an object with batchId,
    and a status with state words, 1-based rows and other field names.
    """
    shapes = {"batch_id": "batchId", "batch_status": "state"}
    async with (
        FakeEngage(shapes=shapes) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        fake.hold_batches = True
        items = [{"email": "ok@example.com"}, {"email": "broken"}]
        status, answer = await bulk(http, "POST", items)
        batch_id = answer["batchId"]
        pending = await batch_status(http, batch_id)
        fake.release_batches()
        done = await batch_status(http, batch_id)

    assert 202 == status
    assert {"state": "Processing", "errors": [], "failedCount": 0} == pending
    assert {
        "state": "Completed",
        "errors": [
            {"row": 2, "code": "ValidationError", "detail": "Invalid or missing value for: email."}
        ],
        "failedCount": 1,
    } == done


async def test_transactions_path_shape(fake: FakeEngage, http: aiohttp.ClientSession) -> None:
    """shapes["transactions_path"] = "path" moves v3 transactions under the contact's path;
    the query-style path then reads "transactions" as a malformed contact id.
    """
    contact_id = fake.add_contact({"email": "t@example.com"})
    fake.add_transaction(contact_id)
    query_style = f"{CONTACTS}/transactions"
    path_style = f"{CONTACTS}/{contact_id}/transactions"

    before = [
        (await send(http, "GET", query_style, params={"contactId": contact_id}))[0],
        (await send(http, "GET", path_style))[0],
    ]
    fake.shapes["transactions_path"] = "path"
    after_query_status, after_query = await send(
        http, "GET", query_style, params={"contactId": contact_id}
    )
    after_path_status, after_path = await send(http, "GET", path_style)

    assert [200, 404] == before
    assert (400, "InvalidContactId") == (after_query_status, error_code(after_query))
    assert (200, 1) == (after_path_status, after_path["totalCount"])


async def test_rate_limit_headers_shape() -> None:
    """shapes["rate_limit_headers"] = "present" puts X-RateLimit-Limit/Remaining on every
    answer (errors included); absent by default.
    """
    async with (
        FakeEngage(rate_limit=50) as fake,
        aiohttp.ClientSession(base_url=fake.url, headers=HEADERS) as http,
    ):
        async with http.get(f"{CONTACTS}/{UNKNOWN_ID}") as response:
            default = {name for name in response.headers if name.startswith("X-RateLimit")}
        fake.shapes["rate_limit_headers"] = "present"
        seen = []
        for _ in range(2):
            async with http.get(f"{CONTACTS}/{UNKNOWN_ID}") as response:
                seen.append(
                    (
                        response.status,
                        response.headers["X-RateLimit-Limit"],
                        response.headers["X-RateLimit-Remaining"],
                    )
                )

    assert set() == default
    assert [(404, "50", "48"), (404, "50", "47")] == seen


@pytest.mark.parametrize(
    "shapes", [{"error_body": "xml"}, {"colour": "blue"}, {"contact_id": "string", "batch_id": ""}]
)
def test_unknown_shapes_are_refused(shapes: dict[str, str]) -> None:
    """An unknown shape name or choice is refused up front, naming the shape."""
    with pytest.raises(ValueError, match="shapes"):
        FakeEngage(shapes=shapes)


def test_shapes_default_to_todays_answers() -> None:
    """Every shape defaults to what the fake answered before shapes existed."""
    assert {
        "error_body": "error_code",
        "contact_id": "string",
        "batch_id": "string",
        "batch_status": "status",
        "transactions_path": "query",
        "rate_limit_headers": "absent",
    } == FakeEngage().shapes
