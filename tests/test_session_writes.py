"""`EngageSession`'s writes against `FakeEngage` over real sockets, while Engage answers.

Creates (lookup first, then POST, and what each 409, 504 or lost answer leads to), updates,
contact-type changes, API v2's variants, Engage's refusals (raised, never queued), and the
input checks made before anything is sent. What happens to writes Engage cannot take (the
outbox) is tested elsewhere.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config, outbox_rows

import engage_async as ea
from engage_async.testing import FakeEngage, RecordedRequest

MISSING = "0b3c8a9e-1111-4222-8333-444455556666"
CREATE_OPTIONS = ("source", "storeExternalId", "createAsUnapproved")


def pending_rows(config: ea.EngageConfig) -> int:
    """How many changes the outbox file holds, in any state."""
    with contextlib.closing(sqlite3.connect(config.outbox_path)) as db:
        (count,) = db.execute("SELECT count(*) FROM changes").fetchone()
    return int(count)


def calls(fake: FakeEngage) -> list[tuple[str, str]]:
    """(method, path) of every request the simulator saw, in order."""
    return [(request.method, request.path) for request in fake.requests]


def option_headers(request: RecordedRequest) -> dict[str, str]:
    """The create options that arrived as headers."""
    return {name: request.headers[name] for name in CREATE_OPTIONS if name in request.headers}


def seed(fake: FakeEngage, contact_type: str = "Member", **attributes: Any) -> str:
    """Store a contact with `attributes` (default: Anna's); return its id."""
    values = attributes or {"firstName": "Anna", "email": "anna@example.com", "city": "Lund"}
    return fake.add_contact(values, contact_type=contact_type)


# --- create_contact ----------------------------------------------------------------------------


async def test_create_looks_up_then_posts_with_options_in_the_query(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A create asks ``GET /contacts/id`` first, then POSTs with source, storeExternalId and
    createAsUnapproved in the query string (never as headers) and contactType in the body.
    """
    delivery = await session.create_contact(
        {"firstName": "Anna", "email": "anna@example.com"},
        source="POS",
        store_external_id="600",
        create_as_unapproved=True,
    )

    assert [("GET", "/api/v3/contacts/id"), ("POST", "/api/v3/contacts")] == calls(fake)
    lookup, post = fake.requests
    assert {"email": "anna@example.com", "contactType": "Member"} == lookup.query
    assert {"source": "POS", "storeExternalId": "600", "createAsUnapproved": "true"} == post.query
    assert {} == option_headers(post)
    assert {"firstName": "Anna", "email": "anna@example.com", "contactType": "Member"} == (
        post.json()
    )
    [contact_id] = fake.find("email", "anna@example.com")
    stored = fake.contacts[contact_id]
    assert ("POS", "600", False) == (stored.source, stored.store_external_id, stored.approved)
    assert (False, contact_id, False, None) == (
        delivery.queued,
        delivery.contact_id,
        delivery.existed,
        delivery.change_id,
    )


async def test_create_delivery_holds_the_typed_contact_and_a_ref(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """The `Delivery` of a create carries Engage's contact, typed, and a ref that resolves to
    the new GUID.
    """
    delivery = await session.create_contact(
        {"firstName": "Anna", "email": "anna@example.com"}, store_external_id="600"
    )

    [contact_id] = fake.find("email", "anna@example.com")
    assert delivery.contact is not None
    assert contact_id == delivery.contact.id
    assert ("Anna", "anna@example.com") == (
        delivery.contact.attributes.first_name,
        delivery.contact.attributes.email,
    )
    assert ("Member", True) == (delivery.contact.meta.contact_type, delivery.contact.meta.approved)
    assert "600" == delivery.contact.attributes.current_store.external_id  # type: ignore[union-attr]
    assert fake.contact_json(contact_id) == delivery.contact.raw
    assert delivery.ref is not None
    assert delivery.ref.startswith("ref_")
    assert contact_id == await session.resolve(delivery.ref)


async def test_create_without_options_sends_an_empty_query(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """Without options the POST has no query string, and the type defaults to Member."""
    await session.create_contact({"email": "anna@example.com"})

    post = fake.requests[-1]
    assert ("", {}) == (post.raw_query, option_headers(post))
    assert {"email": "anna@example.com", "contactType": "Member"} == post.json()


@pytest.mark.parametrize(
    ("attributes", "contact_type"),
    [
        ({"email": "anna@example.com"}, "Contact"),
        ({"email": "anna@example.com", "contactType": "Contact"}, None),
    ],
    ids=["argument", "attribute"],
)
async def test_create_of_another_contact_type(
    fake: FakeEngage,
    session: ea.EngageSession,
    attributes: dict[str, str],
    contact_type: str | None,
) -> None:
    """The contact type, given as an argument or in the attributes, is looked up and sent in
    the body.
    """
    delivery = await session.create_contact(attributes, contact_type=contact_type)

    lookup, post = fake.requests
    assert "Contact" == lookup.query["contactType"]
    assert "Contact" == post.json()["contactType"]
    assert delivery.contact is not None
    assert "Contact" == delivery.contact.meta.contact_type
    assert "Contact" == fake.contacts[delivery.contact_id or ""].contact_type


async def test_create_with_non_ascii_values(fake: FakeEngage, session: ea.EngageSession) -> None:
    """Non-ASCII attributes travel as UTF-8 JSON and are stored as given."""
    delivery = await session.create_contact(
        {"firstName": "Åsa", "lastName": "Öberg-Nāgele", "email": "åsa@exämple.se"}
    )

    stored = fake.contacts[delivery.contact_id or ""].attributes
    assert ("Åsa", "Öberg-Nāgele", "åsa@exämple.se") == (
        stored["firstName"],
        stored["lastName"],
        stored["email"],
    )
    assert "åsa@exämple.se" == fake.requests[0].query["email"]


async def test_create_from_typed_models(fake: FakeEngage, session: ea.EngageSession) -> None:
    """Typed attributes, preferences and consents are sent in Engage's camelCase, without
    the fields left unset.
    """
    attributes = ea.ContactAttributes(
        first_name="Anna", email="anna@example.com", birth_day=date(1990, 1, 31)
    )
    await session.create_contact(attributes)
    await session.create_contact(
        {
            "email": "bo@example.com",
            "preferences": ea.Preferences(accepts_email=True),
            "consents": [ea.Consent(id="newsletter", value=False)],
        }
    )

    first, second = fake.requests_to("POST", "/api/v3/contacts")
    assert {
        "firstName": "Anna",
        "email": "anna@example.com",
        "birthDay": "1990-01-31",
        "contactType": "Member",
    } == first.json()
    assert {
        "email": "bo@example.com",
        "preferences": {"acceptsEmail": True},
        "consents": [{"id": "newsletter", "value": False}],
        "contactType": "Member",
    } == second.json()
    [bo] = fake.find("email", "bo@example.com")
    assert [{"id": "newsletter", "value": False}] == fake.contacts[bo].consents


@pytest.mark.parametrize(
    ("key", "attributes", "lookup"),
    [
        ("mobilePhone", {"mobilePhone": "+46701234567"}, {"mobilePhone": "+46701234567"}),
        ("externalId", {"externalId": "X-1"}, {"customKey": "X-1"}),
    ],
)
async def test_create_looks_up_by_the_configured_key(
    tmp_path: Path, key: str, attributes: dict[str, str], lookup: dict[str, str]
) -> None:
    """A contact type whose key is configured is looked up by that key (an external id as
    ``customKey``), and a repeated create finds the first contact instead of making another.
    """
    async with FakeEngage(rate_limit=None, contact_types={"Member": key}) as fake:
        config = make_config(fake.url, fake.api_key, tmp_path, contact_keys={"Member": key})
        async with ea.EngageSession(config) as session:
            first = await session.create_contact({"email": "anna@example.com", **attributes})
            again = await session.create_contact({"email": "anna@example.com", **attributes})

        assert {**lookup, "contactType": "Member"} == fake.requests[0].query
        assert [first.contact_id] == list(fake.contacts)
        assert (False, True, first.contact_id) == (first.existed, again.existed, again.contact_id)
        assert 1 == len(fake.requests_to("POST", "/api/v3/contacts"))


async def test_create_existing_contact_returns_it_unchanged(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """With ``if_exists="return"`` (the default), an existing contact's GUID comes back with
    `existed`, no POST is sent and the contact is left as it was.
    """
    contact_id = seed(fake)
    before = fake.contact_json(contact_id)

    delivery = await session.create_contact({"firstName": "Annie", "email": "ANNA@example.com"})

    assert [("GET", "/api/v3/contacts/id")] == calls(fake)
    assert (False, contact_id, True) == (delivery.queued, delivery.contact_id, delivery.existed)
    assert before == fake.contact_json(contact_id)
    assert delivery.ref is not None
    assert contact_id == await session.resolve(delivery.ref)


async def test_create_existing_contact_with_update(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """With ``if_exists="update"``, an existing contact is PATCHed with the attributes (not
    the contact type) and comes back with `existed`.
    """
    contact_id = seed(fake)

    delivery = await session.create_contact(
        {"firstName": "Annie", "email": "anna@example.com"}, if_exists="update"
    )

    assert [
        ("GET", "/api/v3/contacts/id"),
        ("PATCH", f"/api/v3/contacts/{contact_id}"),
    ] == calls(fake)
    assert {"firstName": "Annie", "email": "anna@example.com"} == fake.requests[-1].json()
    assert (False, contact_id, True) == (delivery.queued, delivery.contact_id, delivery.existed)
    assert ("Annie", "Lund") == (
        fake.contacts[contact_id].attributes["firstName"],
        fake.contacts[contact_id].attributes["city"],
    )
    assert delivery.contact is not None
    assert "Annie" == delivery.contact.attributes.first_name
    assert delivery.ref is not None


async def test_create_existing_with_update_refused_is_raised(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """With ``if_exists="update"``, Engage refusing the update (422) raises
    `EngageValidationError`; nothing is POSTed or queued.
    """
    contact_id = seed(fake)

    with pytest.raises(ea.EngageValidationError):
        await session.create_contact(
            {"email": "anna@example.com", "mobilePhone": "0701"}, if_exists="update"
        )

    assert [
        ("GET", "/api/v3/contacts/id"),
        ("PATCH", f"/api/v3/contacts/{contact_id}"),
    ] == calls(fake)
    assert 0 == pending_rows(session.config)


async def test_create_when_several_contacts_have_the_key(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A key several contacts share raises `MultipleMatches` from the lookup; nothing is
    POSTed or queued.
    """
    first = seed(fake)
    second = seed(fake)

    with pytest.raises(ea.MultipleMatches) as caught:
        await session.create_contact({"email": "anna@example.com"})

    assert (first, second) == caught.value.contact_ids
    assert [("GET", "/api/v3/contacts/id")] == calls(fake)
    assert 0 == pending_rows(session.config)


async def test_create_conflict_when_the_contact_appeared_after_the_lookup(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 409 ``ApprovedContactWithKeyExists`` at POST time (the contact was created between
    the lookup and the POST) is resolved by a second lookup: its GUID, `existed`, no
    second POST.
    """
    contact_id = seed(fake)
    # The first lookup misses it, as if another till created it a moment later.
    fake.inject(
        "status",
        method="GET",
        path="/api/v3/contacts/id",
        status=404,
        body={"errorCode": "ContactNotFound", "message": "No contact matches.", "statusCode": 404},
        times=1,
    )

    delivery = await session.create_contact({"email": "anna@example.com"})

    assert [
        ("GET", "/api/v3/contacts/id"),
        ("POST", "/api/v3/contacts"),
        ("GET", "/api/v3/contacts/id"),
    ] == calls(fake)
    assert (False, contact_id, True) == (delivery.queued, delivery.contact_id, delivery.existed)
    assert [contact_id] == fake.find("email", "anna@example.com")


async def test_create_conflict_that_cannot_be_resolved_is_raised(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 409 on create whose contact the lookup still cannot find is raised as
    `EngageConflict` with Engage's code, and nothing is queued.
    """
    fake.inject(
        "status",
        method="POST",
        path="/api/v3/contacts",
        status=409,
        body={
            "errorCode": "ApprovedContactWithKeyExists",
            "message": "An approved Member with that email already exists.",
            "statusCode": 409,
        },
    )

    with pytest.raises(ea.EngageConflict) as caught:
        await session.create_contact({"email": "anna@example.com"})

    assert (409, "ApprovedContactWithKeyExists") == (
        caught.value.status,
        caught.value.error_code,
    )
    assert 1 == len(fake.requests_to("POST", "/api/v3/contacts"))
    assert 0 == pending_rows(session.config)


async def test_create_while_being_created_waits_and_looks_up(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 409 ``ContactWithKeyIsBeingCreated`` is waited out and answered by a lookup: the
    GUID comes back without a second POST.
    """
    fake.inject("being_created", times=1)

    delivery = await session.create_contact({"email": "anna@example.com"})

    [contact_id] = fake.find("email", "anna@example.com")
    assert [
        ("GET", "/api/v3/contacts/id"),
        ("POST", "/api/v3/contacts"),
        ("GET", "/api/v3/contacts/id"),
    ] == calls(fake)
    assert (False, contact_id) == (delivery.queued, delivery.contact_id)
    assert delivery.ref is not None
    assert contact_id == await session.resolve(delivery.ref)


async def test_create_timeout_is_rolled_back_and_sent_again(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """Engage's 504 ``RequestTimeOut`` on create means nothing was created, so the POST is
    sent again and succeeds within the deadline.
    """
    fake.inject("create_timeout", times=1)

    delivery = await session.create_contact({"email": "anna@example.com"})

    [contact_id] = fake.find("email", "anna@example.com")
    assert [
        ("GET", "/api/v3/contacts/id"),
        ("POST", "/api/v3/contacts"),
        ("POST", "/api/v3/contacts"),
    ] == calls(fake)
    assert ["create_timeout", None] == [
        r.fault for r in fake.requests_to("POST", "/api/v3/contacts")
    ]
    assert (False, contact_id, False) == (delivery.queued, delivery.contact_id, delivery.existed)
    assert delivery.contact is not None


async def test_create_whose_answer_was_lost_is_looked_up_not_sent_again(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """When the connection is cut after Engage created the contact, the session looks the
    contact up instead of POSTing again: one contact, its GUID delivered.
    """
    fake.inject("lost_reply", method="POST", path="/api/v3/contacts", times=1)

    delivery = await session.create_contact({"firstName": "Anna", "email": "anna@example.com"})

    [contact_id] = fake.find("email", "anna@example.com")
    assert [
        ("GET", "/api/v3/contacts/id"),
        ("POST", "/api/v3/contacts"),
        ("GET", "/api/v3/contacts/id"),
    ] == calls(fake)
    assert "lost_reply" == fake.requests[1].fault
    assert (False, contact_id, False) == (delivery.queued, delivery.contact_id, delivery.existed)
    assert delivery.ref is not None
    assert contact_id == await session.resolve(delivery.ref)


async def test_create_rate_limited_with_retry_after_is_sent_again(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 429 on create means nothing was done: after the short ``Retry-After`` the POST is
    sent again and succeeds.
    """
    fake.inject("rate_limited", method="POST", retry_after=0.05, times=1)

    delivery = await session.create_contact({"email": "anna@example.com"})

    assert ["rate_limited", None] == [r.fault for r in fake.requests_to("POST", "/api/v3/contacts")]
    assert [delivery.contact_id] == fake.find("email", "anna@example.com")
    assert False is delivery.queued


@pytest.mark.parametrize("body", [{"id": "not-a-guid"}, None], ids=["malformed-id", "empty"])
async def test_create_answer_without_a_readable_id_is_resolved_by_lookup(
    fake: FakeEngage, session: ea.EngageSession, body: object
) -> None:
    """A 201 whose body names no readable contact id (a malformed id, or no body at all) says
    the contact was made but not which it is: the session looks it up by its key instead of
    raising, and queues the create, marked to be looked up first, when the lookup finds
    nothing.
    """
    fake.inject("status", method="POST", status=201, body=b"" if body is None else body, times=1)

    delivery = await session.create_contact({"email": "anna@example.com"})

    lookups = fake.requests_to("GET", "/api/v3/contacts/id")
    assert (True, 2) == (delivery.queued, len(lookups))
    assert [1] == [row["lookup_first"] for row in outbox_rows(session.config.outbox_path)]


@pytest.mark.parametrize("body", [{"id": "not-a-guid"}, None], ids=["malformed-id", "empty"])
async def test_create_answer_without_a_readable_id_finds_the_contact_it_made(
    fake: FakeEngage, session: ea.EngageSession, body: object
) -> None:
    """The same 201 when the contact is there by the time the session looks: the lookup's
    GUID is the answer, delivered (not queued), and nothing waits in the outbox.
    """
    guid = fake.add_contact({"email": "anna@example.com"})
    not_yet = {"errorCode": "ContactNotFound", "message": "no contact with that key"}
    fake.inject(
        "status", method="GET", path="/api/v3/contacts/id", status=404, body=not_yet, times=1
    )
    fake.inject("status", method="POST", status=201, body=b"" if body is None else body, times=1)

    delivery = await session.create_contact({"email": "anna@example.com"})

    assert (False, guid) == (delivery.queued, delivery.contact_id)
    assert [] == outbox_rows(session.config.outbox_path)


async def test_create_refused_with_422_is_raised_not_queued(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """Engage's 422 ``ValidationError`` on create is the caller's fault: raised, with the
    fields Engage named, and never queued.
    """
    with pytest.raises(ea.EngageValidationError) as caught:
        await session.create_contact({"email": "anna@example.com", "mobilePhone": "0701"})

    assert (422, "ValidationError", {"fields": ["mobilePhone"]}) == (
        caught.value.status,
        caught.value.error_code,
        caught.value.details,
    )
    assert 1 == len(fake.requests_to("POST", "/api/v3/contacts"))
    assert {} == fake.contacts
    assert 0 == pending_rows(session.config)


async def test_create_of_an_unknown_contact_type_is_raised_not_queued(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """Engage's 400 ``InvalidContactType`` is raised as `InvalidRequest` and never queued."""
    with pytest.raises(ea.InvalidRequest) as caught:
        await session.create_contact({"email": "anna@example.com"}, contact_type="Alien")

    assert (400, "InvalidContactType") == (caught.value.status, caught.value.error_code)
    assert [] == fake.requests_to("POST", "/api/v3/contacts")
    assert 0 == pending_rows(session.config)


async def test_create_refused_with_400_at_post_is_raised_not_queued(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 400 answer to the POST itself is raised as `InvalidRequest` and never queued."""
    fake.inject("status", method="POST", status=400, body={"errorCode": "NoData"})

    with pytest.raises(ea.InvalidRequest) as caught:
        await session.create_contact({"email": "anna@example.com"})

    assert (400, "NoData") == (caught.value.status, caught.value.error_code)
    assert 0 == pending_rows(session.config)


# --- updates -----------------------------------------------------------------------------------


async def test_update_by_guid_sends_only_the_changes(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """An update PATCHes ``/contacts/{id}`` with only the given fields; the rest of the
    contact stays as it was.
    """
    contact_id = seed(fake)

    delivery = await session.update_contact(contact_id.upper(), {"lastName": "Arkberg"})

    [request] = fake.requests
    assert ("PATCH", f"/api/v3/contacts/{contact_id}") == (request.method, request.path)
    assert {"lastName": "Arkberg"} == request.json()
    assert "application/json" == request.headers["Content-Type"]
    stored = fake.contacts[contact_id].attributes
    assert ("Anna", "Arkberg", "Lund") == (stored["firstName"], stored["lastName"], stored["city"])
    assert (False, contact_id, None, None) == (
        delivery.queued,
        delivery.contact_id,
        delivery.ref,
        delivery.change_id,
    )
    assert delivery.contact is not None
    assert "Arkberg" == delivery.contact.attributes.last_name


async def test_update_clear_sends_null(fake: FakeEngage, session: ea.EngageSession) -> None:
    """`CLEAR` is the one way to empty a field: it is sent as null and Engage clears it."""
    contact_id = seed(fake)

    await session.update_contact(contact_id, {"city": ea.CLEAR, "firstName": "Annie"})

    assert {"city": None, "firstName": "Annie"} == fake.requests[-1].json()
    assert None is fake.contacts[contact_id].attributes["city"]


async def test_update_from_typed_models(fake: FakeEngage, session: ea.EngageSession) -> None:
    """A typed model as changes sends only its set fields, in camelCase; nested models too."""
    contact_id = seed(fake)

    await session.update_contact(contact_id, ea.ContactAttributes(zip_code="22100"))
    await session.update_contact(
        contact_id,
        {
            "preferences": ea.Preferences(accepts_sms=True),
            "consents": [ea.Consent(id="newsletter", value=True, source="POS")],
        },
    )

    first, second = fake.requests
    assert {"zipCode": "22100"} == first.json()
    assert {
        "preferences": {"acceptsSms": True},
        "consents": [{"id": "newsletter", "value": True, "source": "POS"}],
    } == second.json()
    stored = fake.contacts[contact_id]
    assert ("22100", True) == (stored.attributes["zipCode"], stored.preferences["acceptsSms"])


async def test_update_by_ref(fake: FakeEngage, session: ea.EngageSession) -> None:
    """A ref from `create_contact` may stand for the contact: the update goes to its GUID."""
    created = await session.create_contact({"email": "anna@example.com"})
    assert created.ref is not None

    delivery = await session.update_contact(created.ref, {"firstName": "Anna"})

    assert ("PATCH", f"/api/v3/contacts/{created.contact_id}") == calls(fake)[-1]
    assert {"firstName": "Anna"} == fake.requests[-1].json()
    assert (False, created.contact_id, created.ref) == (
        delivery.queued,
        delivery.contact_id,
        delivery.ref,
    )
    assert "Anna" == fake.contacts[created.contact_id or ""].attributes["firstName"]


async def test_update_of_a_missing_contact_is_raised_not_queued(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 404 on update raises `ContactNotFound` and is never queued."""
    with pytest.raises(ea.ContactNotFound) as caught:
        await session.update_contact(MISSING, {"firstName": "Anna"})

    assert (404, "ContactNotFound") == (caught.value.status, caught.value.error_code)
    assert 1 == len(fake.requests)
    assert 0 == pending_rows(session.config)


async def test_update_refused_with_422_is_raised_not_queued(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 422 on update raises `EngageValidationError` naming the field, never queued, and the
    contact is unchanged.
    """
    contact_id = seed(fake)

    with pytest.raises(ea.EngageValidationError) as caught:
        await session.update_contact(contact_id, {"email": "not-an-email", "city": "Malmo"})

    assert (422, "ValidationError", {"fields": ["email"]}) == (
        caught.value.status,
        caught.value.error_code,
        caught.value.details,
    )
    assert "Lund" == fake.contacts[contact_id].attributes["city"]
    assert 0 == pending_rows(session.config)


async def test_update_refused_with_400_is_raised_not_queued(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A 400 on update raises `InvalidRequest`, never queued."""
    contact_id = seed(fake)
    fake.inject("status", method="PATCH", status=400, body={"errorCode": "InvalidData"})

    with pytest.raises(ea.InvalidRequest) as caught:
        await session.update_contact(contact_id, {"firstName": "Annie"})

    assert (400, "InvalidData") == (caught.value.status, caught.value.error_code)
    assert 1 == len(fake.requests)
    assert 0 == pending_rows(session.config)


async def test_update_to_a_taken_key_is_a_conflict(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """Changing the key to another approved contact's raises `EngageConflict`
    (``ApprovedContactWithKeyExists``), never queued.
    """
    contact_id = seed(fake)
    seed(fake, email="bo@example.com")

    with pytest.raises(ea.EngageConflict) as caught:
        await session.update_contact(contact_id, {"email": "bo@example.com"})

    assert (409, "ApprovedContactWithKeyExists") == (
        caught.value.status,
        caught.value.error_code,
    )
    assert 0 == pending_rows(session.config)


async def test_update_with_wrong_api_key_is_raised_not_queued(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """A 401 is a configuration problem: `EngageAuthError`, never queued."""
    contact_id = seed(fake)
    config = make_config(fake.url, "wrong-key", tmp_path)

    async with ea.EngageSession(config) as session:
        with pytest.raises(ea.EngageAuthError):
            await session.update_contact(contact_id, {"firstName": "Annie"})
        assert 0 == pending_rows(config)


async def test_update_after_a_server_error_is_retried(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """An update that meets one 503 is sent again (it is idempotent) and delivered."""
    contact_id = seed(fake)
    fake.inject("status", method="PATCH", status=503, times=1)

    delivery = await session.update_contact(contact_id, {"firstName": "Annie"})

    assert (False, contact_id) == (delivery.queued, delivery.contact_id)
    assert ["status", None] == [r.fault for r in fake.requests]
    assert "Annie" == fake.contacts[contact_id].attributes["firstName"]


# --- contact types -----------------------------------------------------------------------------


async def test_update_contact_type(fake: FakeEngage, session: ea.EngageSession) -> None:
    """`update_contact_type` POSTs ``updateContactType?contactTypeId=`` and Engage changes it."""
    contact_id = seed(fake, contact_type="Member")

    delivery = await session.update_contact_type(contact_id, "Contact")

    [request] = fake.requests
    assert ("POST", f"/api/v3/contacts/{contact_id}/updateContactType") == (
        request.method,
        request.path,
    )
    assert {"contactTypeId": "Contact"} == request.query
    assert "Contact" == fake.contacts[contact_id].contact_type
    assert (False, contact_id) == (delivery.queued, delivery.contact_id)
    assert delivery.contact is not None
    assert "Contact" == delivery.contact.meta.contact_type


async def test_update_contact_type_by_ref(fake: FakeEngage, session: ea.EngageSession) -> None:
    """A ref from `create_contact` stands for the contact in a contact-type change too."""
    created = await session.create_contact({"email": "anna@example.com"}, contact_type="Contact")
    assert created.ref is not None

    await session.update_contact_type(created.ref, "Member")

    assert ("POST", f"/api/v3/contacts/{created.contact_id}/updateContactType") == calls(fake)[-1]
    assert "Member" == fake.contacts[created.contact_id or ""].contact_type


async def test_promote_to_member_v3(fake: FakeEngage, session: ea.EngageSession) -> None:
    """In API v3, `promote_to_member` is ``updateContactType?contactTypeId=Member``."""
    contact_id = seed(fake, contact_type="Contact")

    delivery = await session.promote_to_member(contact_id)

    [request] = fake.requests
    assert ("POST", f"/api/v3/contacts/{contact_id}/updateContactType") == (
        request.method,
        request.path,
    )
    assert {"contactTypeId": "Member"} == request.query
    assert "Member" == fake.contacts[contact_id].contact_type
    assert (False, contact_id) == (delivery.queued, delivery.contact_id)


async def test_contact_type_change_refused_is_raised_not_queued(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """Engage refusing a type change (400 unknown type, 422 missing key, 404 no contact)
    raises the matching exception and queues nothing.
    """
    without_email = seed(fake, contact_type="Contact", mobilePhone="+46701234567")

    with pytest.raises(ea.InvalidRequest) as invalid:
        await session.update_contact_type(without_email, "Alien")
    with pytest.raises(ea.EngageValidationError) as missing_key:
        await session.promote_to_member(without_email)
    with pytest.raises(ea.ContactNotFound):
        await session.update_contact_type(MISSING, "Member")

    assert "InvalidContactType" == invalid.value.error_code
    assert {"fields": ["email"]} == missing_key.value.details
    assert "Contact" == fake.contacts[without_email].contact_type
    assert 0 == pending_rows(session.config)


# --- API v2 ------------------------------------------------------------------------------------


@pytest.fixture(name="session_v2")
async def session_v2_fixture(fake: FakeEngage, tmp_path: Path) -> AsyncIterator[ea.EngageSession]:
    """An open session that speaks API v2."""
    config = make_config(fake.url, fake.api_key, tmp_path, api_version=2)
    async with ea.EngageSession(config) as session:
        yield session


async def test_v2_create_sends_options_as_headers(
    fake: FakeEngage, session_v2: ea.EngageSession
) -> None:
    """API v2 creates take source, storeExternalId and createAsUnapproved as headers."""
    delivery = await session_v2.create_contact(
        {"email": "anna@example.com"},
        source="POS",
        store_external_id="600",
        create_as_unapproved=True,
    )

    assert [("GET", "/api/v2/contacts/id"), ("POST", "/api/v2/contacts")] == calls(fake)
    post = fake.requests[-1]
    assert {} == post.query
    assert {"source": "POS", "storeExternalId": "600", "createAsUnapproved": "true"} == (
        option_headers(post)
    )
    assert {"email": "anna@example.com", "contactType": "Member"} == post.json()
    stored = fake.contacts[delivery.contact_id or ""]
    assert ("POS", "600", False) == (stored.source, stored.store_external_id, stored.approved)


async def test_v2_update_is_a_post(fake: FakeEngage, session_v2: ea.EngageSession) -> None:
    """API v2 updates are ``POST /api/v2/contacts/{id}`` with only the changes."""
    contact_id = seed(fake)

    delivery = await session_v2.update_contact(contact_id, {"lastName": "Arkberg"})

    assert [("POST", f"/api/v2/contacts/{contact_id}")] == calls(fake)
    assert {"lastName": "Arkberg"} == fake.requests[-1].json()
    assert "Arkberg" == fake.contacts[contact_id].attributes["lastName"]
    assert (False, contact_id) == (delivery.queued, delivery.contact_id)


async def test_v2_promote_to_member(fake: FakeEngage, session_v2: ea.EngageSession) -> None:
    """API v2 promotes through ``POST /api/v2/contacts/{id}/promoteToMember``."""
    contact_id = seed(fake, contact_type="Contact")

    delivery = await session_v2.promote_to_member(contact_id)

    assert [("POST", f"/api/v2/contacts/{contact_id}/promoteToMember")] == calls(fake)
    assert "Member" == fake.contacts[contact_id].contact_type
    assert (False, contact_id) == (delivery.queued, delivery.contact_id)


async def test_v2_contact_type_change_to_member_is_a_promotion(
    fake: FakeEngage, session_v2: ea.EngageSession
) -> None:
    """In API v2, updateContactType cannot make a Member, so a change to Member goes through
    promoteToMember; other types still use updateContactType.
    """
    to_member = seed(fake, contact_type="Contact")
    to_contact = seed(fake, contact_type="Member", email="bo@example.com")

    await session_v2.update_contact_type(to_member, "member")
    await session_v2.update_contact_type(to_contact, "Contact")

    assert [
        ("POST", f"/api/v2/contacts/{to_member}/promoteToMember"),
        ("POST", f"/api/v2/contacts/{to_contact}/updateContactType"),
    ] == calls(fake)
    assert {"contactTypeId": "Contact"} == fake.requests[-1].query
    assert ("Member", "Contact") == (
        fake.contacts[to_member].contact_type,
        fake.contacts[to_contact].contact_type,
    )


# --- bad input ---------------------------------------------------------------------------------

Write = Callable[[ea.EngageSession], Awaitable[object]]
GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
UNKNOWN_REF = "ref_" + "0" * 32

BAD_WRITES: list[tuple[str, Write, type[Exception], str | None]] = [
    ("create from a list", lambda s: s.create_contact([("email", "a@b.se")]), TypeError, None),
    ("create from a string", lambda s: s.create_contact("a@b.se"), TypeError, None),
    ("create from nothing", lambda s: s.create_contact({}), ValueError, None),
    (
        "create with None",
        lambda s: s.create_contact({"email": "a@b.se", "firstName": None}),
        ea.EmptyValueError,
        "attributes.firstName",
    ),
    (
        "create with an empty string",
        lambda s: s.create_contact({"email": "a@b.se", "city": ""}),
        ea.EmptyValueError,
        "attributes.city",
    ),
    (
        "create with a nested None",
        lambda s: s.create_contact({"email": "a@b.se", "preferences": {"acceptsSms": None}}),
        ea.EmptyValueError,
        "attributes.preferences.acceptsSms",
    ),
    (
        "create with a bad birthDay",
        lambda s: s.create_contact({"email": "a@b.se", "birthDay": "31/01/1990"}),
        ea.PayloadError,
        "attributes.birthDay",
    ),
    (
        "create with an impossible birthDay",
        lambda s: s.create_contact({"email": "a@b.se", "birthDay": "1990-02-30"}),
        ea.PayloadError,
        "attributes.birthDay",
    ),
    (
        "create with a consent without value",
        lambda s: s.create_contact({"email": "a@b.se", "consents": [{"id": "newsletter"}]}),
        ea.PayloadError,
        "attributes.consents[0].value",
    ),
    (
        "create with a consent without id",
        lambda s: s.create_contact(
            {"email": "a@b.se", "consents": [{"id": "x", "value": True}, {"value": False}]}
        ),
        ea.PayloadError,
        "attributes.consents[1].id",
    ),
    (
        "create without a key",
        lambda s: s.create_contact({"firstName": "Anna"}),
        ea.PayloadError,
        "attributes",
    ),
    (
        "create with two contact types",
        lambda s: s.create_contact(
            {"email": "a@b.se", "contactType": "Member"}, contact_type="Contact"
        ),
        ValueError,
        None,
    ),
    (
        "create with a bad if_exists",
        lambda s: s.create_contact({"email": "a@b.se"}, if_exists="replace"),  # type: ignore[arg-type]
        ValueError,
        None,
    ),
    (
        "create with an empty source",
        lambda s: s.create_contact({"email": "a@b.se"}, source=" "),
        ValueError,
        None,
    ),
    ("update with no changes", lambda s: s.update_contact(GUID, {}), ValueError, None),
    (
        "update with contactType",
        lambda s: s.update_contact(GUID, {"contactType": "Contact"}),
        ea.PayloadError,
        "changes.contactType",
    ),
    (
        "update with None",
        lambda s: s.update_contact(GUID, {"lastName": None}),
        ea.EmptyValueError,
        "changes.lastName",
    ),
    (
        "update with an empty string in a list",
        lambda s: s.update_contact(GUID, {"consents": [{"id": "x", "value": True, "comment": ""}]}),
        ea.EmptyValueError,
        "changes.consents[0].comment",
    ),
    (
        "update with a bad birthDay",
        lambda s: s.update_contact(GUID, {"birthDay": "19900131"}),
        ea.PayloadError,
        "changes.birthDay",
    ),
    (
        "update from a non-mapping",
        lambda s: s.update_contact(GUID, ["firstName"]),
        TypeError,
        None,
    ),
    (
        "update a malformed id",
        lambda s: s.update_contact("not-a-guid", {"firstName": "A"}),
        ValueError,
        None,
    ),
    (
        "update an unknown ref",
        lambda s: s.update_contact(UNKNOWN_REF, {"firstName": "A"}),
        ValueError,
        None,
    ),
    ("type change to nothing", lambda s: s.update_contact_type(GUID, ""), ValueError, None),
    (
        "type change of an unknown ref",
        lambda s: s.update_contact_type(UNKNOWN_REF, "Member"),
        ValueError,
        None,
    ),
    ("promote a malformed id", lambda s: s.promote_to_member("42"), ValueError, None),
    ("promote an unknown ref", lambda s: s.promote_to_member(UNKNOWN_REF), ValueError, None),
    ("resolve a non-ref", lambda s: s.resolve(GUID), ValueError, None),
]


@pytest.mark.parametrize(
    ("write", "error", "field"),
    [pytest.param(write, error, field, id=name) for name, write, error, field in BAD_WRITES],
)
async def test_bad_write_input_raises_before_any_request(
    fake: FakeEngage,
    session: ea.EngageSession,
    write: Write,
    error: type[Exception],
    field: str | None,
) -> None:
    """Bad input raises at once (payload errors naming the field path), nothing is sent and
    nothing is queued.
    """
    with pytest.raises(error) as caught:
        await write(session)

    if field is not None:
        assert isinstance(caught.value, ea.PayloadError)
        assert field == caught.value.field
    assert [] == fake.requests
    assert 0 == pending_rows(session.config)


async def test_empty_value_error_does_not_repeat_the_payload(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """An `EmptyValueError` names the field, never the other values of the payload."""
    with pytest.raises(ea.EmptyValueError) as caught:
        await session.create_contact({"email": "anna@example.com", "lastName": ""})

    assert "attributes.lastName" in str(caught.value)
    assert "anna@example.com" not in str(caught.value)
