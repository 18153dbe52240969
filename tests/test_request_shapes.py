"""What a real `EngageSession` puts on the wire, checked with aioresponses (no simulator).

Each test opens a session on a config from `make_config` (outbox under `tmp_path`) and
answers its requests from aioresponses, so nothing leaves the process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aioresponses import aioresponses
from helpers import USER_AGENT, make_config
from yarl import URL

import engage_async as ea

BASE = "https://tenant.voyado.test"
API_KEY = "test-api-key-0123456789"
GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
OTHER_GUID = "b16fd8f3-d0f5-aaaa-aa60-b00300f9aaaa"
HTML_502 = "<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
QUICK = {"retry_initial_delay": 0.001, "retry_max_delay": 0.002}

Sent = tuple[str, URL, dict[str, Any]]


@pytest.fixture(name="mocked")
def mocked_fixture() -> Iterator[aioresponses]:
    """aioresponses intercepting every aiohttp request of the test."""
    with aioresponses() as mocked:
        yield mocked


@pytest.fixture(name="engage")
async def engage_fixture(tmp_path: Path) -> AsyncIterator[ea.EngageSession]:
    """An open API v3 session on the mocked tenant, with quick retries."""
    async with ea.EngageSession(make_config(BASE, API_KEY, tmp_path, **QUICK)) as engage:
        yield engage


@pytest.fixture(name="engage_v2")
async def engage_v2_fixture(tmp_path: Path) -> AsyncIterator[ea.EngageSession]:
    """An open API v2 session on the mocked tenant."""
    config = make_config(BASE, API_KEY, tmp_path, api_version=2, **QUICK)
    async with ea.EngageSession(config) as engage:
        yield engage


def sent(mocked: aioresponses) -> list[Sent]:
    """Every request made, as (method, URL, keyword arguments), in order of first sending."""
    return [
        (method, url, call.kwargs)
        for (method, url), calls in mocked.requests.items()
        for call in calls
    ]


def url(path: str, **query: str | int) -> str:
    """A URL on the mocked tenant."""
    return str(URL(BASE + path).with_query({k: str(v) for k, v in query.items()}))


def contact_json(guid: str = GUID, **attributes: Any) -> dict[str, Any]:
    """A contact as Engage returns it."""
    return {"id": guid, "attributes": attributes, "meta": {"contactType": "Member"}}


def items(count: int, start: int = 0) -> list[dict[str, Any]]:
    """`count` list items with ids start, start + 1, ..."""
    return [{"id": str(i), "transactionNumber": f"T{i}"} for i in range(start, start + count)]


def page(count: int, start: int, total: int) -> dict[str, Any]:
    """A paged answer holding `count` items from `start`, of `total`."""
    return {"items": items(count, start), "totalCount": total, "offset": start, "count": count}


# --- headers --------------------------------------------------------------------------------------


async def test_headers_on_every_request(mocked: aioresponses, engage: ea.EngageSession) -> None:
    """apikey, User-Agent and Content-Type: application/json go on every request, GETs too."""
    mocked.get(
        url("/api/v3/contacts/id", email="anna@example.com", contactType="Member"), status=404
    )
    mocked.post(url("/api/v3/contacts"), status=201, payload=contact_json())
    mocked.get(url(f"/api/v3/contacts/{GUID}"), payload=contact_json())
    mocked.patch(url(f"/api/v3/contacts/{GUID}"), payload=contact_json())
    mocked.get(url("/api/v3/contactoverview", contactId=GUID), payload={"id": GUID})
    mocked.get(url("/api/v3/point-accounts", contactId=GUID, offset=0, count=100), payload=[])

    await engage.create_contact({"email": "anna@example.com"})
    await engage.get_contact(GUID)
    await engage.update_contact(GUID, {"city": "Lund"})
    await engage.contact_overview(contact_id=GUID)
    await engage.point_accounts(GUID)

    requests = sent(mocked)
    expected = {"apikey": API_KEY, "User-Agent": USER_AGENT, "Content-Type": "application/json"}
    assert ["GET", "POST", "GET", "PATCH", "GET", "GET"] == [method for method, _, _ in requests]
    assert [] == [
        (method, str(where))
        for method, where, kwargs in requests
        if {name: kwargs["headers"].get(name) for name in expected} != expected
    ]


async def test_api_key_never_in_the_url(mocked: aioresponses, engage: ea.EngageSession) -> None:
    """The key travels only as a header, never in the path or query."""
    mocked.get(url(f"/api/v3/contacts/{GUID}"), payload=contact_json())

    await engage.get_contact(GUID)

    assert [] == [str(where) for _, where, _ in sent(mocked) if API_KEY in str(where)]


# --- query encoding -------------------------------------------------------------------------------


async def test_plus_in_phone_reaches_the_query_as_2b(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """A + in a phone number is sent as %2B, so Engage reads a plus and not a space."""
    mocked.get(url("/api/v3/contacts/id", mobilePhone="+46701234567"), body=f'"{GUID}"')

    await engage.find_contact_id(mobile_phone="+46701234567")

    [(_, where, _)] = sent(mocked)
    assert ("%2B46701234567", "+46701234567") == (
        where.raw_query_string.partition("mobilePhone=")[2],
        where.query["mobilePhone"],
    )


async def test_email_with_plus_in_overview_query(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """An email alias with + keeps its plus; contactType goes along as Engage requires."""
    email = "jane.doe+vip@gmail.com"
    mocked.get(
        url("/api/v3/contactoverview", email=email, contactType="Member"), payload={"id": GUID}
    )

    await engage.contact_overview(email=email, contact_type="Member")

    [(_, where, _)] = sent(mocked)
    assert {"email": email, "contactType": "Member"} == dict(where.query)


# --- /contacts/id ---------------------------------------------------------------------------------


async def test_find_contact_id_reads_a_bare_json_string(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """/contacts/id answers a bare JSON string; the GUID comes back lower-cased."""
    mocked.get(
        url("/api/v3/contacts/id", email="anna@example.com", contactType="Member"),
        body=json.dumps(GUID.upper()),
        content_type="application/json",
    )

    found = await engage.find_contact_id(email="anna@example.com", contact_type="Member")

    assert GUID == found


@pytest.mark.parametrize(
    "answer", ["", '{"errorCode": "ContactNotFound"}', '{"code": "ContactNotFound"}']
)
async def test_find_contact_id_none_on_404(
    mocked: aioresponses, engage: ea.EngageSession, answer: str
) -> None:
    """A 404 from /contacts/id means no such contact: None, not an exception, asked once."""
    mocked.get(url("/api/v3/contacts/id", email="nobody@example.com"), status=404, body=answer)

    found = await engage.find_contact_id(email="nobody@example.com")

    assert (None, 1) == (found, len(sent(mocked)))


async def test_find_contact_id_multiple_matches(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """409 MultipleMatches raises with the matching ids from messageDetails."""
    mocked.get(
        url("/api/v3/contacts/id", email="shared@example.com"),
        status=409,
        payload={
            "errorCode": "MultipleMatches",
            "messageDetails": {"multipleMatchesFound": [GUID, OTHER_GUID]},
        },
    )

    with pytest.raises(ea.MultipleMatches) as info:
        await engage.find_contact_id(email="shared@example.com")

    assert (GUID, OTHER_GUID) == info.value.contact_ids


# --- error bodies in other shapes -----------------------------------------------------------------


async def test_code_body_on_get_contact(mocked: aioresponses, engage: ea.EngageSession) -> None:
    """A 404 body of the form {"code": ...} gives ContactNotFound with that code."""
    mocked.get(url(f"/api/v3/contacts/{GUID}"), status=404, payload={"code": "ContactNotFound"})

    with pytest.raises(ea.ContactNotFound) as info:
        await engage.get_contact(GUID)

    assert ("ContactNotFound", 404) == (info.value.error_code, info.value.status)


async def test_detail_body_is_an_invalid_request(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """A 400 body of the form {"detail": ...} gives InvalidRequest with that code; no retry."""
    mocked.get(
        url("/api/v3/contacts/id", mobilePhone="12"),
        status=400,
        payload={"detail": "InvalidPhoneNumber"},
    )

    with pytest.raises(ea.InvalidRequest) as info:
        await engage.find_contact_id(mobile_phone="12")

    assert ("InvalidPhoneNumber", 1) == (info.value.error_code, len(sent(mocked)))


async def test_validation_error_on_update_is_raised_not_queued(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """A 422 {"code": "ValidationError"} on update is the caller's fault: raised, sent once."""
    mocked.patch(
        url(f"/api/v3/contacts/{GUID}"),
        status=422,
        payload={"code": "ValidationError", "message": "zipCode"},
    )

    with pytest.raises(ea.EngageValidationError) as info:
        await engage.update_contact(GUID, {"zipCode": "x"})

    assert ("ValidationError", 1) == (info.value.error_code, len(sent(mocked)))


async def test_html_502_after_retries_is_a_server_error(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """An HTML 502 from a proxy is retried, then raised as EngageServerError (no JSON crash)."""
    mocked.get(
        url(f"/api/v3/contacts/{GUID}"),
        status=502,
        body=HTML_502,
        content_type="text/html",
        repeat=True,
    )

    with pytest.raises(ea.EngageServerError) as info:
        await engage.get_contact(GUID)

    assert (502, None, engage.config.retry_attempts) == (
        info.value.status,
        info.value.error_code,
        len(sent(mocked)),
    )
    assert "text/html" in str(info.value)
    assert isinstance(info.value, ea.EngageUnavailable)


async def test_502_then_success(mocked: aioresponses, engage: ea.EngageSession) -> None:
    """A read that fails once with a 502 succeeds on the retry."""
    mocked.get(url(f"/api/v3/contacts/{GUID}"), status=502, body=HTML_502, content_type="text/html")
    mocked.get(url(f"/api/v3/contacts/{GUID}"), payload=contact_json(firstName="Anna"))

    contact = await engage.get_contact(GUID)

    assert (GUID, "Anna", 2) == (contact.id, contact.attributes.first_name, len(sent(mocked)))


# --- list endpoints: array and paged shapes -------------------------------------------------------


async def test_transactions_bare_array(mocked: aioresponses, engage: ea.EngageSession) -> None:
    """A bare array answer is the whole list: one request, contactId in the query (v3)."""
    mocked.get(
        url("/api/v3/contacts/transactions", contactId=GUID, offset=0, count=100),
        payload=items(3),
    )

    found = await engage.transactions(GUID)

    assert (["0", "1", "2"], 1) == ([t.id for t in found], len(sent(mocked)))


async def test_transactions_bare_array_with_limit(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """`limit` asks for that many and cuts a longer array answer to it."""
    mocked.get(
        url("/api/v3/contacts/transactions", contactId=GUID, offset=0, count=2),
        payload=items(5),
    )

    found = await engage.transactions(GUID, limit=2)

    assert ["0", "1"] == [t.id for t in found]


async def test_transactions_paged_across_pages(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """A paged answer is followed page by page (offset grows) until totalCount."""
    path = "/api/v3/contacts/transactions"
    mocked.get(url(path, contactId=GUID, offset=0, count=100), payload=page(100, 0, 150))
    mocked.get(url(path, contactId=GUID, offset=100, count=100), payload=page(50, 100, 150))

    found = await engage.transactions(GUID)

    assert ([str(i) for i in range(150)], [0, 100]) == (
        [t.id for t in found],
        [int(where.query["offset"]) for _, where, _ in sent(mocked)],
    )


async def test_paging_stops_at_total_count(mocked: aioresponses, engage: ea.EngageSession) -> None:
    """When the pages add up to totalCount, no further page is asked for."""
    path = "/api/v3/contacts/transactions"
    mocked.get(url(path, contactId=GUID, offset=0, count=100), payload=page(100, 0, 200))
    mocked.get(url(path, contactId=GUID, offset=100, count=100), payload=page(100, 100, 200))

    found = await engage.transactions(GUID)

    assert (200, 2) == (len(found), len(sent(mocked)))


async def test_transactions_limit_across_pages(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """With a limit, the last page asks only for what is still missing."""
    path = "/api/v3/contacts/transactions"
    mocked.get(url(path, contactId=GUID, offset=0, count=100), payload=page(100, 0, 500))
    mocked.get(url(path, contactId=GUID, offset=100, count=50), payload=page(50, 100, 500))

    found = await engage.transactions(GUID, limit=150)

    assert (150, [100, 50]) == (
        len(found),
        [int(where.query["count"]) for _, where, _ in sent(mocked)],
    )


async def test_paging_follows_total_when_pages_are_smaller_than_asked(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """A server that caps its pages below the requested count is still read to totalCount.

    Engage documents count's default (100) but not its maximum. When it answers 50 of 120,
    the list is not complete: stopping at the first short page would silently drop 70.
    """
    path = "/api/v3/contacts/transactions"
    mocked.get(url(path, contactId=GUID, offset=0, count=100), payload=page(50, 0, 120))
    mocked.get(url(path, contactId=GUID, offset=50, count=100), payload=page(50, 50, 120))
    mocked.get(url(path, contactId=GUID, offset=100, count=100), payload=page(20, 100, 120))

    found = await engage.transactions(GUID)

    assert 120 == len(found)


async def test_transactions_v2_path(mocked: aioresponses, engage_v2: ea.EngageSession) -> None:
    """v2 reads transactions from /contacts/{id}/transactions."""
    mocked.get(
        url(f"/api/v2/contacts/{GUID}/transactions", offset=0, count=100),
        payload=page(1, 0, 1),
    )

    found = await engage_v2.transactions(GUID)

    assert ["0"] == [t.id for t in found]


@pytest.mark.parametrize(
    "answer",
    [
        [{"id": 1, "contactId": GUID, "definitionId": 7, "balance": 120, "pendingPoints": 5}],
        {
            "items": [
                {"id": 1, "contactId": GUID, "definitionId": 7, "balance": 120, "pendingPoints": 5}
            ],
            "totalCount": 1,
            "offset": 0,
            "count": 100,
            "links": [],
        },
    ],
    ids=["array", "paged"],
)
async def test_point_accounts_both_shapes(
    mocked: aioresponses, engage: ea.EngageSession, answer: object
) -> None:
    """/point-accounts is read whether Engage answers a bare array or a paged object."""
    mocked.get(url("/api/v3/point-accounts", contactId=GUID, offset=0, count=100), payload=answer)

    [account] = await engage.point_accounts(GUID)

    assert (1, GUID, 7, 120.0, 5.0) == (
        account.id,
        account.contact_id,
        account.definition_id,
        account.balance,
        account.pending_points,
    )


async def test_point_accounts_paged_across_pages(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """Point accounts are paged like transactions."""
    path = "/api/v3/point-accounts"
    mocked.get(url(path, contactId=GUID, offset=0, count=100), payload=page(100, 0, 101))
    mocked.get(url(path, contactId=GUID, offset=100, count=100), payload=page(1, 100, 101))

    assert 101 == len(await engage.point_accounts(GUID))


@pytest.mark.parametrize(
    "answer",
    [
        [{"id": "a1", "promotionId": "p1", "type": "Multichannel"}],
        {"items": [{"id": "a1", "promotionId": "p1", "type": "Multichannel"}], "totalCount": 1},
    ],
    ids=["array", "paged"],
)
async def test_promotion_assignments_both_shapes(
    mocked: aioresponses, engage: ea.EngageSession, answer: object
) -> None:
    """Promotion assignments read both shapes; the channel is sent upper-cased."""
    mocked.get(
        url(
            "/api/v3/promotion-assignments",
            contactId=GUID,
            redemptionChannelType="POS",
            offset=0,
            count=100,
        ),
        payload=answer,
    )

    [promotion] = await engage.promotion_assignments(GUID, redemption_channel="pos")

    assert ("a1", "p1") == (promotion.id, promotion.promotion_id)


async def test_promotion_assignments_paged_across_pages(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """Promotion assignments follow pages too."""
    path = "/api/v3/promotion-assignments"
    mocked.get(url(path, contactId=GUID, offset=0, count=100), payload=page(100, 0, 130))
    mocked.get(url(path, contactId=GUID, offset=100, count=100), payload=page(30, 100, 130))

    assert 130 == len(await engage.promotion_assignments(GUID))


async def test_promotion_assignments_v2_path(
    mocked: aioresponses, engage_v2: ea.EngageSession
) -> None:
    """v2 lists promotions at /contacts/{id}/promotions."""
    mocked.get(
        url(
            f"/api/v2/contacts/{GUID}/promotions", redemptionChannelType="ECOM", offset=0, count=100
        ),
        payload=[{"id": "a1"}],
    )

    [promotion] = await engage_v2.promotion_assignments(GUID, redemption_channel="ECOM")

    assert "a1" == promotion.id


# --- writes: v3 and v2 shapes ---------------------------------------------------------------------


async def test_create_v3_looks_up_then_posts_options_in_the_query(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """v3 create: a lookup by key first, then POST with source/store/unapproved as query."""
    mocked.get(
        url("/api/v3/contacts/id", email="anna@example.com", contactType="Member"), status=404
    )
    mocked.post(
        url(
            "/api/v3/contacts",
            source="POS",
            storeExternalId="600",
            createAsUnapproved="true",
        ),
        status=201,
        payload=contact_json(GUID.upper(), email="anna@example.com"),
    )

    delivery = await engage.create_contact(
        {"email": "anna@example.com", "firstName": "Anna"},
        source="POS",
        store_external_id="600",
        create_as_unapproved=True,
    )

    (_, _, lookup), (_, _, post) = sent(mocked)
    assert (False, GUID, False) == (delivery.queued, delivery.contact_id, delivery.existed)
    assert {"email": "anna@example.com", "firstName": "Anna", "contactType": "Member"} == (
        json.loads(post["data"])
    )
    assert [] == [name for name in ("source", "storeExternalId") if name in post["headers"]]
    assert lookup["data"] is None


async def test_create_v2_sends_options_as_headers(
    mocked: aioresponses, engage_v2: ea.EngageSession
) -> None:
    """v2 create: the same options travel as headers; the URL has no query."""
    mocked.get(
        url("/api/v2/contacts/id", email="anna@example.com", contactType="Member"), status=404
    )
    mocked.post(url("/api/v2/contacts"), status=201, payload=contact_json())

    await engage_v2.create_contact(
        {"email": "anna@example.com"}, source="POS", store_external_id="600"
    )

    (_, _, _), (_, where, post) = sent(mocked)
    assert ("", "POS", "600") == (
        where.query_string,
        post["headers"]["source"],
        post["headers"]["storeExternalId"],
    )


async def test_create_existing_contact_sends_no_post(
    mocked: aioresponses, engage: ea.EngageSession
) -> None:
    """When the lookup finds the contact, nothing is posted and the Delivery says it existed."""
    mocked.get(
        url("/api/v3/contacts/id", email="anna@example.com", contactType="Member"),
        body=f'"{GUID}"',
    )

    delivery = await engage.create_contact({"email": "anna@example.com"})

    assert (GUID, True, ["GET"]) == (
        delivery.contact_id,
        delivery.existed,
        [method for method, _, _ in sent(mocked)],
    )


@pytest.mark.parametrize(("version", "method"), [(3, "PATCH"), (2, "POST")])
async def test_update_method_per_version(
    mocked: aioresponses, tmp_path: Path, version: int, method: str
) -> None:
    """Update is PATCH /api/v3/contacts/{id}, or POST /api/v2/contacts/{id}, with only the
    changes as the body.
    """
    mocked.add(url(f"/api/v{version}/contacts/{GUID}"), method, payload=contact_json())
    config = make_config(BASE, API_KEY, tmp_path, api_version=version, **QUICK)

    async with ea.EngageSession(config) as engage:
        delivery = await engage.update_contact(GUID, {"city": "Lund", "acceptsSms": False})

    [(sent_method, _, kwargs)] = sent(mocked)
    assert (method, {"city": "Lund", "acceptsSms": False}, False) == (
        sent_method,
        json.loads(kwargs["data"]),
        delivery.queued,
    )


async def test_promote_to_member_v3(mocked: aioresponses, engage: ea.EngageSession) -> None:
    """v3 promotes with POST updateContactType?contactTypeId=Member."""
    mocked.post(
        url(f"/api/v3/contacts/{GUID}/updateContactType", contactTypeId="Member"),
        payload=contact_json(),
    )

    delivery = await engage.promote_to_member(GUID)

    assert (False, 1) == (delivery.queued, len(sent(mocked)))


async def test_promote_to_member_v2(mocked: aioresponses, engage_v2: ea.EngageSession) -> None:
    """v2 promotes with POST /contacts/{id}/promoteToMember, and update_contact_type to
    Member takes the same road.
    """
    mocked.post(
        url(f"/api/v2/contacts/{GUID}/promoteToMember"), payload=contact_json(), repeat=True
    )

    await engage_v2.promote_to_member(GUID)
    await engage_v2.update_contact_type(GUID, "Member")

    assert [("POST", f"/api/v2/contacts/{GUID}/promoteToMember")] * 2 == [
        (method, where.path) for method, where, _ in sent(mocked)
    ]
