"""`EngageSession`'s reads against `FakeEngage` over real sockets, while Engage answers.

Covers the lookups (`contact_overview`, `find_contact_id`, `get_contact`), the list reads
(`transactions`, `promotion_assignments`, `point_accounts`) in both list shapes Engage may use,
the input checks made before any request, and how Engage's answers and failures reach the
caller as typed results and exceptions.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config

import engage_async as ea
from engage_async.testing import FakeEngage

STORE_600 = ea.Store(
    id=str(uuid.uuid5(uuid.NAMESPACE_URL, "engage-store:600")),
    name="Store 600",
    external_id="600",
)
ANNA = {
    "firstName": "Anna",
    "lastName": "Arkberg",
    "email": "anna@example.com",
    "mobilePhone": "+46701234567",
    "socialSecurityNumber": "199001011234",
    "externalId": "ext-1",
    "city": "Examplecity",
    "birthDay": "1990-01-01",
    "shoeSize": 38,
}
ANNA_CONSENT = {
    "id": "newsletter",
    "value": True,
    "date": "2024-01-02T03:04:05+00:00",
    "comment": "asked at the till",
    "source": "POS",
}
MISSING = "0b3c8a9e-1111-4222-8333-444455556666"
LOOKUP = {"email": "email", "custom_key": "customKey"}


def seed_anna(fake: FakeEngage) -> str:
    """Store Anna, with preferences, a consent, a store and a promotion; return her id."""
    contact_id = fake.add_contact(
        ANNA,
        preferences={"acceptsEmail": True},
        consents=[ANNA_CONSENT],
    )
    fake.contacts[contact_id].store_external_id = "600"
    fake.add_promotion(
        contact_id,
        {
            "id": "a1a1a1a1-0000-4000-8000-000000000001",
            "promotionId": "b2b2b2b2-0000-4000-8000-000000000002",
            "name": "Spring sale",
            "expiresOn": "2031-05-01T00:00:00+00:00",
            "redemptionChannels": [
                {
                    "type": "ECOM",
                    "valueType": "EXTERNALOFFER",
                    "value": "SPRING10",
                    "instruction": "Use the code at checkout",
                    "redemptionChannels": [
                        {"type": "POS", "valueType": "PERCENT", "value": 10, "instruction": None}
                    ],
                }
            ],
        },
    )
    return contact_id


# --- contact_overview --------------------------------------------------------------------------


async def test_overview_by_contact_id_needs_no_contact_type(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """By contact id, the overview is asked for with `contactId` alone, no `contactType`."""
    contact_id = seed_anna(fake)

    overview = await session.contact_overview(contact_id=contact_id.upper())

    assert contact_id == overview.id
    [request] = fake.requests
    assert ("GET", "/api/v3/contactoverview") == (request.method, request.path)
    assert {"contactId": contact_id} == request.query


@pytest.mark.parametrize(
    ("keyword", "value", "parameter"),
    [
        ("email", "anna@example.com", "email"),
        ("mobile_phone", "+46701234567", "mobilePhone"),
        ("social_security_number", "199001011234", "socialSecurityNumber"),
        ("custom_key", "ext-1", "customKey"),
        ("any", "anna@example.com", "any"),
    ],
)
async def test_overview_by_identifier_sends_it_with_the_contact_type(
    fake: FakeEngage, session: ea.EngageSession, keyword: str, value: str, parameter: str
) -> None:
    """Each identifier is sent as Engage's query parameter, together with `contactType`."""
    contact_id = seed_anna(fake)

    overview = await session.contact_overview(contact_type="Member", **{keyword: value})

    assert contact_id == overview.id
    assert {parameter: value, "contactType": "Member"} == fake.requests[-1].query


async def test_overview_is_typed(fake: FakeEngage, session: ea.EngageSession) -> None:
    """The overview comes back typed: attributes, meta, preferences, tiers, consents, vouchers,
    promotions with their nested redemption channels, and the JSON it was read from in `.raw`.
    """
    contact_id = seed_anna(fake)

    overview = await session.contact_overview(contact_id=contact_id)

    attributes = overview.attributes
    assert ("Anna", "Arkberg", "anna@example.com") == (
        attributes.first_name,
        attributes.last_name,
        attributes.email,
    )
    assert ("+46701234567", "199001011234", "ext-1") == (
        attributes.mobile_phone,
        attributes.social_security_number,
        attributes.external_id,
    )
    assert datetime(1990, 1, 1).date() == attributes.birth_day
    assert STORE_600 == attributes.current_store
    assert STORE_600 == overview.meta.recruited_by_store
    assert ("Member", True) == (overview.meta.contact_type, overview.meta.approved)
    assert ea.Preferences(accepts_email=True, accepts_postal=False, accepts_sms=False) == (
        overview.preferences
    )
    assert (
        ea.Tiers(
            tier_id="base",
            tier_name="Base",
            expires=None,
            remaining_to_upgrade=500,
            based_on_points=0,
        )
        == overview.tiers
    )
    assert (
        ea.Consent(
            id="newsletter",
            value=True,
            date=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
            comment="asked at the till",
            source="POS",
        ),
    ) == overview.consents
    [voucher] = overview.reward_vouchers
    assert ea.Money(currency="EUR", amount=5) == voucher.value
    assert (ea.Money(currency="SEK", amount=50),) == voucher.local_values
    assert ("0000000000001", 100, False) == (
        voucher.voucher_number,
        voucher.points,
        voucher.redeemed,
    )
    [promotion] = overview.promotions
    assert ("a1a1a1a1-0000-4000-8000-000000000001", "b2b2b2b2-0000-4000-8000-000000000002") == (
        promotion.id,
        promotion.promotion_id,
    )
    [channel] = promotion.redemption_channels
    assert ("ECOM", "EXTERNALOFFER", "SPRING10") == (
        channel.type,
        channel.value_type,
        channel.value,
    )
    assert (ea.RedemptionChannel(type="POS", value_type="PERCENT", value=10),) == (
        channel.redemption_channels
    )
    assert () == overview.audiences
    assert () == overview.warnings
    assert contact_id == overview.raw["id"]
    assert 38 == overview.raw["attributes"]["shoeSize"]
    assert 38 == overview.attribute("shoeSize")


async def test_overview_warnings(fake: FakeEngage, session: ea.EngageSession) -> None:
    """Engage's warnings reach the caller (a contact without a mobile number has one)."""
    contact_id = fake.add_contact({"email": "nophone@example.com"})

    overview = await session.contact_overview(contact_id=contact_id)

    assert ("MissingMobileNumber",) == overview.warnings


async def test_overview_of_an_unknown_contact(fake: FakeEngage, session: ea.EngageSession) -> None:
    """An overview of a contact Engage does not have raises `ContactNotFound`."""
    with pytest.raises(ea.ContactNotFound) as caught:
        await session.contact_overview(email="nobody@example.com", contact_type="Member")

    assert (404, "ContactNotFound") == (caught.value.status, caught.value.error_code)


async def test_overview_of_several_matches(fake: FakeEngage, session: ea.EngageSession) -> None:
    """An overview by an identifier several contacts share raises `MultipleMatches`."""
    first = fake.add_contact({"email": "twin@example.com"})
    second = fake.add_contact({"email": "twin@example.com"})

    with pytest.raises(ea.MultipleMatches) as caught:
        await session.contact_overview(email="twin@example.com", contact_type="Member")

    assert (first, second) == caught.value.contact_ids


# --- find_contact_id ---------------------------------------------------------------------------


async def test_find_contact_id_returns_the_bare_guid(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """Engage's bare JSON string answer comes back as the GUID, a plain `str`."""
    contact_id = seed_anna(fake)

    found = await session.find_contact_id(email="anna@example.com")

    assert contact_id == found
    assert str is type(found)
    [request] = fake.requests
    assert ("GET", "/api/v3/contacts/id") == (request.method, request.path)
    assert {"email": "anna@example.com"} == request.query


@pytest.mark.parametrize(
    ("keyword", "value", "parameter"),
    [
        ("mobile_phone", "+46701234567", "mobilePhone"),
        ("social_security_number", "199001011234", "socialSecurityNumber"),
        ("custom_key", "ext-1", "customKey"),
        ("any", "199001011234", "any"),
    ],
)
async def test_find_contact_id_by_each_identifier(
    fake: FakeEngage, session: ea.EngageSession, keyword: str, value: str, parameter: str
) -> None:
    """Each identifier finds the contact, sent under Engage's own parameter name."""
    contact_id = seed_anna(fake)

    assert contact_id == await session.find_contact_id(**{keyword: value})
    assert {parameter: value} == fake.requests[-1].query


async def test_find_contact_id_is_none_when_engage_has_no_such_contact(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 404 from the lookup is an answer, not an error: None."""
    assert None is await session.find_contact_id(email="nobody@example.com")
    assert 1 == len(fake.requests)


async def test_find_contact_id_multiple_matches(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """Several contacts with the key raise `MultipleMatches` listing their ids, oldest first."""
    first = fake.add_contact({"email": "twin@example.com"})
    second = fake.add_contact({"email": "twin@example.com"}, contact_type="Contact")

    with pytest.raises(ea.MultipleMatches) as caught:
        await session.find_contact_id(email="twin@example.com")

    assert (first, second) == caught.value.contact_ids
    assert (409, "MultipleMatches") == (caught.value.status, caught.value.error_code)


async def test_find_contact_id_contact_type_narrows(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """`contact_type` is sent along and picks the contact of that type."""
    fake.add_contact({"email": "twin@example.com"})
    contact = fake.add_contact({"email": "twin@example.com"}, contact_type="Contact")

    found = await session.find_contact_id(email="twin@example.com", contact_type="Contact")

    assert contact == found
    assert {"email": "twin@example.com", "contactType": "Contact"} == fake.requests[-1].query


async def test_find_contact_id_plus_in_a_phone_number_reaches_engage(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A ``+`` in a phone number is sent as ``%2B``, so Engage reads a plus, not a space."""
    contact_id = seed_anna(fake)

    assert contact_id == await session.find_contact_id(mobile_phone="+46701234567")
    request = fake.requests[-1]
    assert {"mobilePhone": "+46701234567"} == request.query
    assert "mobilePhone=%2B46701234567" == request.raw_query


@pytest.mark.parametrize(
    ("attribute", "value", "keyword"),
    [
        ("email", "anna+news@example.com", "email"),
        ("email", "åsa.öberg@exämple.se", "email"),
        ("externalId", "a&b=c#d?e/f g", "custom_key"),
        ("externalId", "100%;+", "custom_key"),
    ],
)
async def test_lookup_values_reach_engage_verbatim(
    fake: FakeEngage, session: ea.EngageSession, attribute: str, value: str, keyword: str
) -> None:
    """Reserved and non-ASCII characters in a looked-up value are percent-encoded, so Engage
    reads exactly the value given and finds the contact.
    """
    contact_id = fake.add_contact({attribute: value})

    found = await session.find_contact_id(**{keyword: value})
    overview = await session.contact_overview(contact_type="Member", **{keyword: value})

    assert (contact_id, contact_id) == (found, overview.id)
    assert [value, value] == [r.query[LOOKUP[keyword]] for r in fake.requests]


async def test_find_contact_id_normalises_engage_s_answer(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A GUID Engage writes in upper case (as its XML examples do) comes back lower-cased."""
    fake.inject("status", status=200, body='"2E40B702-2767-4ABE-AE99-AA510108E22B"')

    assert "2e40b702-2767-4abe-ae99-aa510108e22b" == await session.find_contact_id(
        email="anna@example.com"
    )


async def test_find_contact_id_answer_that_is_not_a_guid(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 200 whose body is not a contact id is `UnexpectedResponse` (an `EngageError`), not a
    bare `ValueError` a caller catching `EngageError` would miss.
    """
    fake.inject("status", status=200, body='"not-a-guid"')

    with pytest.raises(ea.UnexpectedResponse):
        await session.find_contact_id(email="anna@example.com")


async def test_find_contact_id_uses_the_identity_map(fake: FakeEngage, tmp_path: Path) -> None:
    """With an identity TTL, a GUID once found is answered again without asking Engage."""
    contact_id = seed_anna(fake)
    config = make_config(fake.url, fake.api_key, tmp_path, identity_ttl=3600.0)

    async with ea.EngageSession(config) as session:
        first = await session.find_contact_id(email="anna@example.com")
        second = await session.find_contact_id(email="ANNA@example.com")

    assert (contact_id, contact_id) == (first, second)
    assert 1 == len(fake.requests)


# --- get_contact -------------------------------------------------------------------------------


async def test_get_contact(fake: FakeEngage, session: ea.EngageSession) -> None:
    """`get_contact` reads ``GET /contacts/{id}`` into a typed `Contact` with `.raw`."""
    contact_id = seed_anna(fake)

    contact = await session.get_contact(contact_id.upper())

    assert contact_id == contact.id
    assert ("Anna", "anna@example.com") == (contact.attributes.first_name, contact.attributes.email)
    assert STORE_600 == contact.meta.recruited_by_store
    assert ea.Preferences(accepts_email=True, accepts_postal=False, accepts_sms=False) == (
        contact.preferences
    )
    assert ("newsletter",) == tuple(consent.id for consent in contact.consents)
    assert fake.contact_json(contact_id) == contact.raw
    assert 38 == contact.attribute("shoeSize")
    [request] = fake.requests
    assert ("GET", f"/api/v3/contacts/{contact_id}") == (request.method, request.path)


async def test_get_contact_not_found(fake: FakeEngage, session: ea.EngageSession) -> None:
    """An unknown contact id raises `ContactNotFound` with Engage's status and code."""
    with pytest.raises(ea.ContactNotFound) as caught:
        await session.get_contact(MISSING)

    assert (404, "ContactNotFound") == (caught.value.status, caught.value.error_code)
    assert ("GET", f"/api/v3/contacts/{MISSING}") == (caught.value.method, caught.value.path)


# --- list reads --------------------------------------------------------------------------------


@pytest.fixture(name="shape", params=["paged", "array"])
def shape_fixture(request: pytest.FixtureRequest, fake: FakeEngage) -> str:
    """Serve every list endpoint in one of the two shapes Engage may use."""
    shape: str = request.param
    for name in ("transactions", "promotion_assignments", "point_accounts"):
        fake.list_shapes[name] = shape
    return shape


async def test_transactions_every_page(
    fake: FakeEngage, session: ea.EngageSession, shape: str
) -> None:
    """All of a contact's transactions are fetched, page after page of 100, in either shape."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})
    stored = [fake.add_transaction(contact_id) for _ in range(250)]

    transactions = await session.transactions(contact_id)

    assert [t["transactionNumber"] for t in stored] == [t.transaction_number for t in transactions]
    pages = fake.requests_to("GET", "/api/v3/contacts/transactions")
    assert [
        {"contactId": contact_id, "offset": "0", "count": "100"},
        {"contactId": contact_id, "offset": "100", "count": "100"},
        {"contactId": contact_id, "offset": "200", "count": "100"},
    ] == [request.query for request in pages]


async def test_transactions_are_typed(fake: FakeEngage, session: ea.EngageSession) -> None:
    """A transaction's fields are read into `Transaction`, its JSON kept in `.raw`."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})
    stored = fake.add_transaction(
        contact_id,
        createdDate="2024-03-04T10:20:30+01:00",
        lineItems=[{"sku": "A1", "quantity": 2}],
        externalId="R-1",
    )

    [transaction] = await session.transactions(contact_id)

    assert (
        ea.Transaction(
            id=stored["id"],
            transaction_number=stored["transactionNumber"],
            external_id="R-1",
            created_date=datetime.fromisoformat("2024-03-04T10:20:30+01:00"),
            store_name="Web shop",
            store_type="ECOM",
            number_of_items=1,
            net_price_sum=100.0,
            local_net_price_sum=1000.0,
            local_currency="SEK",
            group_currency="EUR",
            line_items=({"sku": "A1", "quantity": 2},),
        )
        == transaction
    )
    assert stored == transaction.raw


async def test_transactions_of_a_contact_without_any(
    fake: FakeEngage, session: ea.EngageSession, shape: str
) -> None:
    """No transactions is an empty list after one request."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})

    assert [] == await session.transactions(contact_id)
    assert 1 == len(fake.requests)


@pytest.mark.parametrize(
    ("limit", "counts"),
    [(5, ["5"]), (100, ["100"]), (150, ["100", "50"]), (1000, ["100", "100", "100"])],
)
async def test_transactions_limit(
    fake: FakeEngage, session: ea.EngageSession, limit: int, counts: list[str]
) -> None:
    """`limit` caps what is returned and what is asked for, page by page."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})
    stored = [fake.add_transaction(contact_id) for _ in range(250)]

    transactions = await session.transactions(contact_id, limit=limit)

    assert [t["id"] for t in stored[:limit]] == [t.id for t in transactions]
    assert counts == [request.query["count"] for request in fake.requests]


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "10"])
async def test_transactions_bad_limit(
    fake: FakeEngage, session: ea.EngageSession, limit: Any
) -> None:
    """A `limit` that is not a whole number of at least one raises before any request."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})

    with pytest.raises(ValueError, match="limit"):
        await session.transactions(contact_id, limit=limit)
    assert [] == fake.requests


async def test_transactions_of_an_unknown_contact(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """Transactions of a contact Engage does not have raise `ContactNotFound`."""
    with pytest.raises(ea.ContactNotFound):
        await session.transactions(MISSING)


async def test_promotion_assignments_every_page(
    fake: FakeEngage, session: ea.EngageSession, shape: str
) -> None:
    """All of a contact's promotions are fetched, page after page of 100, in either shape."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})
    stored = [fake.add_promotion(contact_id, {"name": f"P{i}"}) for i in range(120)]

    promotions = await session.promotion_assignments(contact_id)

    assert [p["id"] for p in stored] == [p.id for p in promotions]
    pages = fake.requests_to("GET", "/api/v3/promotion-assignments")
    assert [
        {"contactId": contact_id, "offset": "0", "count": "100"},
        {"contactId": contact_id, "offset": "100", "count": "100"},
    ] == [request.query for request in pages]


async def test_promotion_assignments_are_typed(fake: FakeEngage, session: ea.EngageSession) -> None:
    """A promotion keeps its assignment id, template id and nested redemption channels."""
    contact_id = seed_anna(fake)

    [promotion] = await session.promotion_assignments(contact_id)

    assert "a1a1a1a1-0000-4000-8000-000000000001" == promotion.id
    assert "b2b2b2b2-0000-4000-8000-000000000002" == promotion.promotion_id
    assert ("Spring sale", "Multichannel", False) == (
        promotion.name,
        promotion.type,
        promotion.redeemed,
    )
    assert datetime(2031, 5, 1, tzinfo=UTC) == promotion.expires_on
    [channel] = promotion.redemption_channels
    assert ("ECOM", "SPRING10", "Use the code at checkout") == (
        channel.type,
        channel.value,
        channel.instruction,
    )
    assert (ea.RedemptionChannel(type="POS", value_type="PERCENT", value=10),) == (
        channel.redemption_channels
    )
    assert "Spring sale" == promotion.raw["name"]


@pytest.mark.parametrize("channel", ["POS", "pos", "Ecom", "OTHER"])
async def test_promotion_assignments_by_redemption_channel(
    fake: FakeEngage, session: ea.EngageSession, channel: str
) -> None:
    """A redemption channel is sent upper-cased, and Engage's filtered answer is returned."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})
    by_type = {
        kind: fake.add_promotion(
            contact_id, {"redemptionChannels": [{"type": kind, "valueType": "PERCENT"}]}
        )
        for kind in ("POS", "ECOM", "OTHER")
    }

    promotions = await session.promotion_assignments(contact_id, redemption_channel=channel)

    assert [by_type[channel.upper()]["id"]] == [p.id for p in promotions]
    assert channel.upper() == fake.requests[-1].query["redemptionChannelType"]


@pytest.mark.parametrize("channel", ["WEB", "", "   ", 3])
async def test_promotion_assignments_bad_channel(
    fake: FakeEngage, session: ea.EngageSession, channel: Any
) -> None:
    """A redemption channel other than POS, ECOM or OTHER raises before any request."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})

    with pytest.raises((ValueError, TypeError), match="redemption_channel"):
        await session.promotion_assignments(contact_id, redemption_channel=channel)
    assert [] == fake.requests


async def test_point_accounts_every_page(
    fake: FakeEngage, session: ea.EngageSession, shape: str
) -> None:
    """All of a contact's point accounts are fetched, page after page of 100, in either shape."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})
    stored = [fake.add_point_account(contact_id, definitionId=i) for i in range(130)]

    accounts = await session.point_accounts(contact_id)

    assert [a["id"] for a in stored] == [a.id for a in accounts]
    pages = fake.requests_to("GET", "/api/v3/point-accounts")
    assert ["0", "100"] == [request.query["offset"] for request in pages]


async def test_point_accounts_are_typed(fake: FakeEngage, session: ea.EngageSession) -> None:
    """A point account reads into `PointAccount`: balance, pending points, expiry."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})
    stored = fake.add_point_account(
        contact_id,
        definitionId=7,
        balance=120.5,
        pendingPoints=30.0,
        balanceExpires="2030-12-31T23:59:59+00:00",
    )

    [account] = await session.point_accounts(contact_id)

    assert (
        ea.PointAccount(
            id=stored["id"],
            contact_id=contact_id,
            definition_id=7,
            balance=120.5,
            pending_points=30.0,
            balance_expires=datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC),
        )
        == account
    )
    assert {"contactId": contact_id, "offset": "0", "count": "100"} == fake.requests[-1].query


async def test_list_reads_with_api_v2(fake: FakeEngage, tmp_path: Path) -> None:
    """With API v2, transactions and promotions are read from the contact's own paths."""
    contact_id = fake.add_contact({"email": "buyer@example.com"})
    fake.add_transaction(contact_id)
    fake.add_promotion(contact_id, {"name": "P"})
    fake.add_point_account(contact_id)
    config = make_config(fake.url, fake.api_key, tmp_path, api_version=2)

    async with ea.EngageSession(config) as session:
        transactions = await session.transactions(contact_id)
        promotions = await session.promotion_assignments(contact_id, redemption_channel="POS")
        accounts = await session.point_accounts(contact_id)

    assert (1, 1, 1) == (len(transactions), len(promotions), len(accounts))
    assert [
        ("GET", f"/api/v2/contacts/{contact_id}/transactions"),
        ("GET", f"/api/v2/contacts/{contact_id}/promotions"),
        ("GET", "/api/v2/point-accounts"),
    ] == [(r.method, r.path) for r in fake.requests]
    assert "POS" == fake.requests[1].query["redemptionChannelType"]


# --- bad input ---------------------------------------------------------------------------------

Read = Callable[[ea.EngageSession], Awaitable[object]]
GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"

BAD_READS: list[tuple[str, Read, type[Exception]]] = [
    ("overview without identifier", lambda s: s.contact_overview(), ValueError),
    (
        "overview with two identifiers",
        lambda s: s.contact_overview(
            email="a@example.com", mobile_phone="+46701234567", contact_type="Member"
        ),
        ValueError,
    ),
    (
        "overview with contact id and email",
        lambda s: s.contact_overview(contact_id=GUID, email="a@example.com"),
        ValueError,
    ),
    (
        "overview by email without contact type",
        lambda s: s.contact_overview(email="a@example.com"),
        ValueError,
    ),
    (
        "overview by custom key without contact type",
        lambda s: s.contact_overview(custom_key="ext-1"),
        ValueError,
    ),
    (
        "overview with a malformed contact id",
        lambda s: s.contact_overview(contact_id="not-a-guid"),
        ValueError,
    ),
    (
        "overview with a truncated contact id",
        lambda s: s.contact_overview(contact_id="33ee9958-0e09-484f-b4c4-aa3e00e1e24"),
        ValueError,
    ),
    (
        "overview with an empty contact type",
        lambda s: s.contact_overview(email="a@example.com", contact_type=" "),
        ValueError,
    ),
    (
        "overview with an empty identifier",
        lambda s: s.contact_overview(email="", contact_type="Member"),
        ValueError,
    ),
    ("find without identifier", lambda s: s.find_contact_id(), ValueError),
    (
        "find with two identifiers",
        lambda s: s.find_contact_id(email="a@example.com", custom_key="ext-1"),
        ValueError,
    ),
    ("find with a non-string", lambda s: s.find_contact_id(email=42), TypeError),  # type: ignore[arg-type]
    ("get with a malformed id", lambda s: s.get_contact(GUID + "id"), ValueError),
    ("get with a non-string", lambda s: s.get_contact(None), TypeError),  # type: ignore[arg-type]
    ("transactions with a malformed id", lambda s: s.transactions("42"), ValueError),
    ("promotions with a malformed id", lambda s: s.promotion_assignments("x"), ValueError),
    ("point accounts with a malformed id", lambda s: s.point_accounts(""), ValueError),
]


@pytest.mark.parametrize(
    ("read", "error"),
    [pytest.param(read, error, id=name) for name, read, error in BAD_READS],
)
async def test_bad_read_input_raises_before_any_request(
    fake: FakeEngage, session: ea.EngageSession, read: Read, error: type[Exception]
) -> None:
    """Missing, doubled or malformed identifiers raise at once, and nothing is sent."""
    with pytest.raises(error):
        await read(session)
    assert [] == fake.requests


# --- Engage's errors over the wire ------------------------------------------------------------


@pytest.fixture(name="anna")
def anna_fixture(fake: FakeEngage) -> str:
    """Anna, stored in the simulator; her contact id."""
    return seed_anna(fake)


ERRORS: list[tuple[str, Read, type[ea.EngageHTTPError], int, str]] = [
    (
        "invalid email",
        lambda s: s.find_contact_id(email="not-an-email"),
        ea.InvalidRequest,
        400,
        "InvalidEmailAddress",
    ),
    (
        "invalid phone number",
        lambda s: s.find_contact_id(mobile_phone="0701234567"),
        ea.InvalidRequest,
        400,
        "InvalidPhoneNumber",
    ),
    (
        "invalid personal number",
        lambda s: s.find_contact_id(social_security_number="12"),
        ea.InvalidRequest,
        400,
        "InvalidSocialSecurityNumber",
    ),
    (
        "unknown contact type",
        lambda s: s.find_contact_id(email="anna@example.com", contact_type="Alien"),
        ea.InvalidRequest,
        400,
        "InvalidContactType",
    ),
    (
        "overview of an unknown contact type",
        lambda s: s.contact_overview(email="anna@example.com", contact_type="Alien"),
        ea.InvalidRequest,
        400,
        "InvalidContactType",
    ),
    (
        "no such contact",
        lambda s: s.get_contact(MISSING),
        ea.ContactNotFound,
        404,
        "ContactNotFound",
    ),
    (
        "overview by a missing id",
        lambda s: s.contact_overview(contact_id=MISSING),
        ea.ContactNotFound,
        404,
        "ContactNotFound",
    ),
    (
        "overview of the wrong type",
        lambda s: s.contact_overview(email="anna@example.com", contact_type="Contact"),
        ea.ContactNotFound,
        404,
        "ContactNotFound",
    ),
    (
        "points of a missing contact",
        lambda s: s.point_accounts(MISSING),
        ea.ContactNotFound,
        404,
        "ContactNotFound",
    ),
    (
        "promotions of a missing contact",
        lambda s: s.promotion_assignments(MISSING),
        ea.ContactNotFound,
        404,
        "ContactNotFound",
    ),
]


@pytest.mark.parametrize(
    ("read", "error", "status", "code"),
    [
        pytest.param(read, error, status, code, id=name)
        for name, read, error, status, code in ERRORS
    ],
)
async def test_engage_error_codes_map_to_exceptions(
    fake: FakeEngage,
    session: ea.EngageSession,
    anna: str,
    read: Read,
    error: type[ea.EngageHTTPError],
    status: int,
    code: str,
) -> None:
    """Each error Engage answers with raises its class, carrying status and error code."""
    with pytest.raises(error) as caught:
        await read(session)

    assert (type(caught.value), status, code) == (
        error,
        caught.value.status,
        caught.value.error_code,
    )
    assert not isinstance(caught.value, ea.EngageUnavailable)
    assert 1 == len(fake.requests), "a refusal is not retried"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("<html><body>maintenance</body></html>", "text/html"),
        ([1, 2], None),
        ({"attributes": {"firstName": "Anna"}}, None),
    ],
    ids=["html", "array", "without-id"],
)
async def test_unreadable_2xx_is_unexpected_response(
    fake: FakeEngage,
    session: ea.EngageSession,
    anna: str,
    body: object,
    content_type: str | None,
) -> None:
    """A 200 whose body is not JSON, or not a contact, raises `UnexpectedResponse`."""
    fake.inject("status", status=200, body=body, content_type=content_type)

    with pytest.raises(ea.UnexpectedResponse):
        await session.get_contact(anna)


async def test_wrong_api_key_is_an_auth_error(fake: FakeEngage, tmp_path: Path) -> None:
    """Engage's 401 for a wrong api key raises `EngageAuthError`, at once, not retried."""
    config = make_config(fake.url, "not-the-key", tmp_path)

    async with ea.EngageSession(config) as session:
        with pytest.raises(ea.EngageAuthError) as caught:
            await session.get_contact(GUID)

    assert (401, "Unauthorized") == (caught.value.status, caught.value.error_code)
    assert 1 == len(fake.requests)


async def test_forbidden_is_an_auth_error(fake: FakeEngage, session: ea.EngageSession) -> None:
    """A 403 raises `EngageAuthError` too."""
    fake.inject("status", status=403)

    with pytest.raises(ea.EngageAuthError) as caught:
        await session.find_contact_id(email="anna@example.com")

    assert (403, "Forbidden") == (caught.value.status, caught.value.error_code)


async def test_messages_name_the_call_without_personal_data(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """An error's message names the call and the code, never the looked-up value."""
    with pytest.raises(ea.InvalidRequest) as caught:
        await session.find_contact_id(email="anna.at.example.com")

    assert str(caught.value).startswith("GET /api/v3/contacts/id -> 400 InvalidEmailAddress")
    assert "anna.at.example.com" not in str(caught.value)


async def test_html_502_after_the_retries_is_a_server_error(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """A proxy's HTML 502 on every attempt raises `EngageServerError` (an `EngageUnavailable`)
    once the configured attempts are spent.
    """
    fake.inject("server_error", status=502)

    with pytest.raises(ea.EngageServerError) as caught:
        await session.get_contact(anna)

    assert isinstance(caught.value, ea.EngageUnavailable)
    assert (502, None) == (caught.value.status, caught.value.error_code)
    assert session.config.retry_attempts == len(fake.requests)


async def test_server_error_then_success(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """A read that meets one 503 is retried and succeeds."""
    fake.inject("status", status=503, times=1)

    contact = await session.get_contact(anna)

    assert anna == contact.id
    assert ["status", None] == [request.fault for request in fake.requests]


async def test_json_503_is_a_server_error(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """A JSON 503 from Engage raises `EngageServerError` with Engage's error code."""
    fake.inject("status", status=503)

    with pytest.raises(ea.EngageServerError) as caught:
        await session.contact_overview(contact_id=anna)

    assert (503, "ServiceUnavailable") == (caught.value.status, caught.value.error_code)


async def test_rate_limited_with_retry_after_waits_then_succeeds(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """A 429 with a short ``Retry-After`` is waited out and the read then succeeds."""
    fake.inject("rate_limited", retry_after=0.05, times=1)

    found = await session.find_contact_id(email="anna@example.com")

    assert anna == found
    assert ["rate_limited", None] == [request.fault for request in fake.requests]


async def test_retry_after_beyond_the_deadline_is_not_waited(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """A ``Retry-After`` longer than the deadline allows raises `RateLimited` at once, with
    Engage's hint, rather than retrying early.
    """
    fake.inject("rate_limited", retry_after=30)

    with pytest.raises(ea.RateLimited) as caught:
        await session.find_contact_id(email="anna@example.com")

    assert (429, 30.0) == (caught.value.status, caught.value.retry_after)
    assert 1 == len(fake.requests)


async def test_rate_limited_on_every_attempt(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """429 on every attempt raises `RateLimited` once the attempts are spent."""
    fake.inject("rate_limited")

    with pytest.raises(ea.RateLimited) as caught:
        await session.get_contact(anna)

    assert (429, "TooManyRequests") == (caught.value.status, caught.value.error_code)
    assert session.config.retry_attempts == len(fake.requests)


async def test_rate_limited_without_retry_after_is_retried(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """A 429 without ``Retry-After`` is backed off and retried, and the read then succeeds."""
    fake.inject("rate_limited", times=2)

    contact = await session.get_contact(anna)

    assert anna == contact.id
    assert ["rate_limited", "rate_limited", None] == [request.fault for request in fake.requests]


async def test_hang_raises_engage_timeout(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """A read Engage never answers raises `EngageTimeout` (an `EngageUnavailable`)."""
    fake.inject("hang")

    with pytest.raises(ea.EngageTimeout) as caught:
        await session.get_contact(anna)

    assert isinstance(caught.value, ea.EngageUnavailable)
    assert True is caught.value.request_sent
    assert "hang" == fake.requests[0].fault


async def test_slow_answer_within_the_deadline(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """An answer that is slow but within the deadline is read normally."""
    fake.inject("slow", delay=0.2)

    overview = await session.contact_overview(contact_id=anna)

    assert anna == overview.id
    assert ["slow"] == [request.fault for request in fake.requests]


async def test_dropped_connection_is_retried(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """A read whose connection is cut is retried and succeeds."""
    fake.inject("drop", times=2)

    contact = await session.get_contact(anna)

    assert anna == contact.id
    assert "drop" == fake.requests[0].fault
    assert None is fake.requests[-1].fault


async def test_dropped_every_time_is_a_connection_error(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """A read whose connection is cut on every attempt raises `EngageConnectionError`."""
    fake.inject("drop")

    with pytest.raises(ea.EngageConnectionError) as caught:
        await session.get_contact(anna)

    assert True is caught.value.request_sent


async def test_engage_down_is_a_connection_error(
    fake: FakeEngage, session: ea.EngageSession, anna: str
) -> None:
    """With Engage refusing connections, a read raises `EngageConnectionError`, marked as
    never sent.
    """
    await fake.go_down()

    with pytest.raises(ea.EngageConnectionError) as caught:
        await session.find_contact_id(email="anna@example.com")

    assert False is caught.value.request_sent
    assert [] == fake.requests


async def test_engage_back_up(fake: FakeEngage, session: ea.EngageSession, anna: str) -> None:
    """After Engage comes back, the same session reads again."""
    await fake.go_down()
    with pytest.raises(ea.EngageConnectionError):
        await session.get_contact(anna)
    await fake.come_up()

    assert anna == (await session.get_contact(anna)).id


@pytest.fixture(name="breaker_session")
async def breaker_session_fixture(
    fake: FakeEngage, tmp_path: Path
) -> AsyncIterator[ea.EngageSession]:
    """A session whose breaker opens after three failures, one attempt per call."""
    config = make_config(fake.url, fake.api_key, tmp_path, breaker_threshold=3, retry_attempts=1)
    async with ea.EngageSession(config) as session:
        yield session


async def test_circuit_opens_after_the_threshold(
    fake: FakeEngage, breaker_session: ea.EngageSession, anna: str
) -> None:
    """After `breaker_threshold` failures in a row, a read raises `CircuitOpen` without a
    request reaching Engage, even once Engage would answer again.
    """
    fault = fake.inject("server_error")
    for _ in range(3):
        with pytest.raises(ea.EngageServerError):
            await breaker_session.get_contact(anna)
    fake.remove(fault)

    with pytest.raises(ea.CircuitOpen) as caught:
        await breaker_session.get_contact(anna)

    assert isinstance(caught.value, ea.EngageUnavailable)
    assert False is caught.value.request_sent
    assert 3 == len(fake.requests)


async def test_circuit_counts_failures_in_a_row(
    fake: FakeEngage, breaker_session: ea.EngageSession, anna: str
) -> None:
    """An answer between failures resets the count, so the circuit stays closed."""
    for _ in range(2):
        fake.inject("server_error", times=2)
        for _ in range(2):
            with pytest.raises(ea.EngageServerError):
                await breaker_session.get_contact(anna)
        await breaker_session.get_contact(anna)

    assert anna == (await breaker_session.get_contact(anna)).id
    assert 7 == len(fake.requests)


async def test_circuit_ignores_refusals(
    fake: FakeEngage, breaker_session: ea.EngageSession
) -> None:
    """Engage answering "no" (404, 400) is an answer: it never opens the circuit."""
    for _ in range(4):
        with pytest.raises(ea.ContactNotFound):
            await breaker_session.get_contact(MISSING)
        with pytest.raises(ea.InvalidRequest):
            await breaker_session.find_contact_id(email="not-an-email")

    assert None is await breaker_session.find_contact_id(email="nobody@example.com")
    assert 9 == len(fake.requests)
