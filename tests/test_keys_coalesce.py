"""Contact keys (which attribute identifies a contact, how keys are written) and merging changes."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from engage_async._coalesce import Fold, fold_into, merge_changes
from engage_async._keys import (
    LOOKUP_PARAMETERS,
    choose_key,
    contact_key,
    identity_key,
    is_ref,
    lookup_parameter,
    new_change_id,
    new_ref,
)

GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"

# --- choose_key -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"email": "a@b.se", "mobilePhone": "+4670"}, ("email", "a@b.se")),
        ({"mobilePhone": "+4670", "socialSecurityNumber": "1985"}, ("mobilePhone", "+4670")),
        ({"socialSecurityNumber": "1985", "externalId": "X1"}, ("socialSecurityNumber", "1985")),
        ({"externalId": "X1", "firstName": "Anna"}, ("externalId", "X1")),
        ({"email": "  ", "mobilePhone": "+4670"}, ("mobilePhone", "+4670")),
        ({"email": 42, "externalId": "X1"}, ("externalId", "X1")),
        ({"email": None, "externalId": "X1"}, ("externalId", "X1")),
    ],
)
def test_choose_key_guesses_in_order(attributes: dict[str, Any], expected: tuple[str, str]) -> None:
    """Without configuration: email, mobilePhone, socialSecurityNumber, then the custom key.

    Blank or non-text values are skipped.
    """
    assert expected == choose_key(attributes, None, "externalId")


def test_choose_key_custom_key_attribute() -> None:
    """The custom key is the tenant's attribute (memberNumber here), not externalId."""
    attributes = {"externalId": "X1", "memberNumber": "M1"}

    assert ("memberNumber", "M1") == choose_key(attributes, None, "memberNumber")


def test_choose_key_none_without_a_key() -> None:
    """No key attribute with a value: None."""
    assert choose_key({"firstName": "Anna", "externalId": "X1"}, None, "memberNumber") is None


def test_choose_key_configured_wins() -> None:
    """A configured key is used even when a key earlier in the guessing order is present."""
    attributes = {"email": "a@b.se", "mobilePhone": "+46701234567"}

    assert ("mobilePhone", "+46701234567") == choose_key(attributes, "mobilePhone", "externalId")


def test_choose_key_configured_but_missing_is_none() -> None:
    """If the configured key is absent, no other attribute is guessed: the create lacks its key."""
    assert choose_key({"email": "a@b.se"}, "mobilePhone", "externalId") is None


def test_choose_key_keeps_the_value_as_given() -> None:
    """The chosen value is returned untouched (normalising is identity_key's job)."""
    assert ("email", " Anna@Example.com ") == choose_key(
        {"email": " Anna@Example.com "}, None, "externalId"
    )


# --- identity_key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "one", "other"),
    [
        ("email", "Anna@Example.COM", "  anna@example.com "),
        ("any", "Anna@Example.com", "anna@example.com"),
        ("mobilePhone", "+46 70-123 45 67", "+46701234567"),
        ("socialSecurityNumber", "19850605-9738", "198506059738"),
        ("externalId", " X1 ", "X1"),
    ],
)
def test_identity_key_normalises(attribute: str, one: str, other: str) -> None:
    """Spellings of the same value give the same key: case for email, spaces and dashes for
    numbers, surrounding blanks for everything.
    """
    assert identity_key(attribute, one, "Member") == identity_key(attribute, other, "Member")


@pytest.mark.parametrize(("one", "other"), [("X1", "x1"), ("M-1", "M1")])
def test_identity_key_custom_keys_are_exact(one: str, other: str) -> None:
    """Custom keys keep their case and dashes: they may matter to the tenant."""
    assert identity_key("externalId", one, None) != identity_key("externalId", other, None)


def test_identity_key_format() -> None:
    """key:<attribute>:<type, lower-cased>:<normalised value>."""
    assert "key:email:member:anna@example.com" == identity_key(
        "email", "Anna@Example.com", "Member"
    )


def test_identity_key_type_scopes() -> None:
    """The contact type is part of the key, case-insensitively; no type is written *."""
    assert (
        identity_key("email", "a@b.se", "Member"),
        "key:email:*:a@b.se",
    ) == (identity_key("email", "a@b.se", "MEMBER"), identity_key("email", "a@b.se", None))


def test_identity_key_differs_by_type_and_attribute() -> None:
    """The same value under another type or attribute is another key."""
    keys = {
        identity_key("email", "a@b.se", "Member"),
        identity_key("email", "a@b.se", "Contact"),
        identity_key("any", "a@b.se", "Member"),
    }

    assert 3 == len(keys)


# --- refs, ids, contact keys ----------------------------------------------------------------------


def test_new_ref_is_a_ref() -> None:
    """new_ref makes ref_ + 32 hex digits, fresh each time."""
    refs = {new_ref() for _ in range(100)}

    assert (100, True) == (len(refs), all(is_ref(ref) for ref in refs))


@pytest.mark.parametrize(
    "value",
    [
        GUID,
        "ref_",
        "ref_" + "0" * 31,
        "ref_" + "0" * 33,
        "ref_" + "A" * 32,
        "REF_" + "0" * 32,
        " ref_" + "0" * 32,
    ],
)
def test_is_ref_rejects(value: str) -> None:
    """Only ref_ and exactly 32 lower-case hex digits is a ref (a GUID is not)."""
    assert not is_ref(value)


def test_new_change_id() -> None:
    """Change ids are chg_ + 32 hex digits, fresh each time, and never refs."""
    ids = {new_change_id() for _ in range(100)}

    assert (100, [], []) == (
        len(ids),
        [i for i in ids if not (i.startswith("chg_") and len(i) == 36)],
        [i for i in ids if is_ref(i)],
    )


def test_contact_key() -> None:
    """A contact's ordering key is id:<guid> when known, else ref:<ref>; the GUID wins."""
    ref = "ref_" + "1" * 32

    assert (f"id:{GUID}", f"ref:{ref}", f"id:{GUID}") == (
        contact_key(contact_id=GUID),
        contact_key(ref=ref),
        contact_key(contact_id=GUID, ref=ref),
    )


def test_contact_key_needs_something() -> None:
    """Neither id nor ref: ValueError."""
    with pytest.raises(ValueError, match="contact id or a ref"):
        contact_key()


@pytest.mark.parametrize(
    ("attribute", "parameter"),
    [
        ("email", "email"),
        ("mobilePhone", "mobilePhone"),
        ("socialSecurityNumber", "socialSecurityNumber"),
        ("externalId", "customKey"),
        ("memberNumber", "customKey"),
    ],
)
def test_lookup_parameter(attribute: str, parameter: str) -> None:
    """externalId and memberNumber are looked up as customKey; the rest by their own name."""
    assert parameter == lookup_parameter(attribute)


def test_lookup_parameters_are_engages() -> None:
    """find_contact_id's keywords map to exactly Engage's /contacts/id parameters."""
    assert {
        "email": "email",
        "mobile_phone": "mobilePhone",
        "social_security_number": "socialSecurityNumber",
        "custom_key": "customKey",
        "any": "any",
    } == LOOKUP_PARAMETERS


# --- merge_changes --------------------------------------------------------------------------------


def test_merge_later_value_wins() -> None:
    """A field in both takes the later value; fields in only one are kept."""
    assert {"firstName": "Anna", "city": "Malmö", "street": "Ny 1"} == merge_changes(
        {"firstName": "Anna", "city": "Lund"}, {"city": "Malmö", "street": "Ny 1"}
    )


def test_merge_later_clear_wins() -> None:
    """A later null (from CLEAR) replaces an earlier value, and the other way round."""
    assert {"city": None, "street": "Ny 1"} == merge_changes(
        {"city": "Lund", "street": None}, {"city": None, "street": "Ny 1"}
    )


def test_merge_preferences_per_key() -> None:
    """preferences are merged key by key: one update's acceptsSms survives another's email."""
    assert {
        "preferences": {"acceptsEmail": False, "acceptsSms": True, "acceptsPostal": True}
    } == merge_changes(
        {"preferences": {"acceptsEmail": True, "acceptsSms": True}},
        {"preferences": {"acceptsEmail": False, "acceptsPostal": True}},
    )


def test_merge_preferences_cleared_then_set() -> None:
    """preferences set after being cleared take the later object."""
    assert {"preferences": {"acceptsSms": True}} == merge_changes(
        {"preferences": None}, {"preferences": {"acceptsSms": True}}
    )


def test_merge_consents_by_id() -> None:
    """consents are merged by id: later wins per id, others kept, first-seen order."""
    earlier = {
        "consents": [
            {"id": "consentSms", "value": True},
            {"id": "consentEmail", "value": True},
        ]
    }
    later = {
        "consents": [
            {"id": "consentEmail", "value": False, "source": "Web"},
            {"id": "consentPostal", "value": True},
        ]
    }

    assert {
        "consents": [
            {"id": "consentSms", "value": True},
            {"id": "consentEmail", "value": False, "source": "Web"},
            {"id": "consentPostal", "value": True},
        ]
    } == merge_changes(earlier, later)


def test_merge_consents_without_id_are_kept() -> None:
    """Consents without an id are never dropped or merged."""
    anonymous = {"value": True}

    assert {"consents": [{"id": "a", "value": False}, anonymous, anonymous]} == merge_changes(
        {"consents": [{"id": "a", "value": True}, anonymous]},
        {"consents": [{"id": "a", "value": False}, anonymous]},
    )


def test_merge_consents_replaces_non_list() -> None:
    """If either side is not a list (cleared), the later value wins outright."""
    assert {"consents": [{"id": "a", "value": True}]} == merge_changes(
        {"consents": None}, {"consents": [{"id": "a", "value": True}]}
    )


def test_merge_of_three_is_the_same_either_way() -> None:
    """Merging A, B then C gives the same as A then (B with C): queued order is what counts."""
    a = {"city": "Lund", "preferences": {"acceptsSms": True}, "consents": [{"id": "x", "value": 1}]}
    b = {"city": "Malmö", "preferences": {"acceptsEmail": True}}
    c = {"consents": [{"id": "x", "value": 2}], "preferences": {"acceptsSms": False}}

    assert merge_changes(merge_changes(a, b), c) == merge_changes(a, merge_changes(b, c))


def test_merge_modifies_neither_input() -> None:
    """Both inputs, nested parts included, are left as they were."""
    earlier: dict[str, Any] = {
        "preferences": {"acceptsSms": True},
        "consents": [{"id": "a", "value": True}],
    }
    later: dict[str, Any] = {
        "preferences": {"acceptsEmail": True},
        "consents": [{"id": "a", "value": False}],
    }
    before = copy.deepcopy((earlier, later))

    merge_changes(earlier, later)

    assert before == (earlier, later)


# --- fold_into: what a new update does to the contact's last waiting row ---------------------


def tail(**fields: Any) -> dict[str, Any]:
    """A waiting row as the outboxes read it (JSON columns as text)."""
    row: dict[str, Any] = {
        "state": "pending",
        "operation": "update",
        "body": '{"city":"Kiruna"}',
        "folded": None,
        "query": None,
        "key_name": None,
        "key_value": None,
        "contact_type": None,
    }
    row.update(fields)
    return row


def test_an_update_joins_a_pending_update_with_the_later_values() -> None:
    """A pending update takes the new values on top of its own."""
    fold = fold_into(tail(), {"city": "Lund", "zip": "22100"})

    assert Fold({"city": "Lund", "zip": "22100"}) == fold


@pytest.mark.parametrize(
    "row",
    [
        tail(state="inflight"),
        tail(state="waiting_guid"),
        tail(operation="contact_type", body=None),
        tail(operation="promote", body="{}"),
        tail(query='{"avoidTriggeringExport":"true"}'),
    ],
    ids=["in-flight", "waiting-guid", "type-change", "promote", "other-export-choice"],
)
def test_an_update_never_joins_a_row_it_must_not_change(row: dict[str, Any]) -> None:
    """Rows in flight, waiting for a GUID, barriers, and updates that chose otherwise about
    Engage's exports are left alone: the update is queued behind them.
    """
    assert fold_into(row, {"city": "Lund"}) is None


def test_updates_with_the_same_export_choice_join() -> None:
    """Two updates that both keep out of Engage's exports become one."""
    row = tail(query='{"avoidTriggeringExport":"true"}')

    fold = fold_into(row, {"city": "Lund"}, {"avoidTriggeringExport": "true"})

    assert fold is not None
    assert {"city": "Lund"} == fold.body


def test_an_update_folded_into_a_create_corrects_its_key_and_identity() -> None:
    """A corrected email folded into a queued create becomes the key it is created and
    matched by.
    """
    create = tail(
        operation="create",
        body='{"email":"anna@exampel.com","firstName":"Anna"}',
        folded=None,
        key_name="email",
        key_value="anna@exampel.com",
        contact_type="Member",
    )

    fold = fold_into(create, {"email": "anna@example.com"})

    assert fold is not None
    assert (True, "anna@example.com") == (fold.create, fold.key_value)
    assert identity_key("email", "anna@example.com", "Member") == fold.identity
    assert {"email": "anna@example.com"} == fold.folded
    assert {"email": "anna@example.com", "firstName": "Anna"} == fold.body


def test_a_blank_key_in_the_update_leaves_the_creates_key_alone() -> None:
    """A blank key value is no correction: the create keeps its key."""
    create = tail(
        operation="create",
        body='{"email":"anna@example.com"}',
        key_name="email",
        key_value="anna@example.com",
        contact_type="Member",
    )

    fold = fold_into(create, {"email": "  ", "city": "Lund"})

    assert fold is not None
    assert "anna@example.com" == fold.key_value
