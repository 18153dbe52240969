"""The wire format: the camelCase converter, the payload guard, and contact id checks."""

from __future__ import annotations

import copy
import json
import math
import pickle
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest

from engage_async import (
    CLEAR,
    Consent,
    Contact,
    ContactAttributes,
    ContactOverview,
    EmptyValueError,
    Meta,
    Money,
    PayloadError,
    PointAccount,
    Preferences,
    Promotion,
    RedemptionChannel,
    RewardVoucher,
    Store,
    Tiers,
    Transaction,
    UnexpectedResponse,
)
from engage_async._wire import (
    MAX_DEPTH,
    MAX_PAYLOAD_BYTES,
    MAX_VALUE_BYTES,
    Clear,
    camel,
    check_text,
    converter,
    make_converter,
    normalize_contact_id,
    prepare_payload,
    structure,
)

DATA = Path(__file__).parent / "data"
GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
PLUS_ONE = timezone(timedelta(hours=1))
PLUS_TWO = timezone(timedelta(hours=2))


@pytest.fixture(name="overview_json")
def overview_json_fixture() -> dict[str, Any]:
    """The documented /contactoverview response (tests/data/contact_overview.json)."""
    data: dict[str, Any] = json.loads((DATA / "contact_overview.json").read_text("utf-8"))
    return data


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("id", "id"),
        ("first_name", "firstName"),
        ("social_security_number", "socialSecurityNumber"),
        ("reward_vouchers", "rewardVouchers"),
        ("image_url", "imageUrl"),
    ],
)
def test_camel(name: str, wire: str) -> None:
    """snake_case field names map to Engage's camelCase."""
    assert wire == camel(name)


def test_make_converter_builds_a_fresh_converter() -> None:
    """Each call gives a new converter, never the global cattrs one."""
    import cattrs

    first, second = make_converter(), make_converter()

    assert (False, False) == (first is second, first is cattrs.global_converter)


# --- structuring ----------------------------------------------------------------------------------


def test_structure_reads_camel_case() -> None:
    """camelCase keys fill the snake_case fields."""
    data = {"firstName": "Anna", "zipCode": "123 45", "countryCode": "SE", "secrecyMarked": True}

    assert ContactAttributes(
        first_name="Anna", zip_code="123 45", country_code="SE", secrecy_marked=True
    ) == structure(data, ContactAttributes)


def test_unstructure_writes_camel_case_and_omits_unset() -> None:
    """Models unstructure to camelCase, leaving out fields still at their default."""
    attributes = ContactAttributes(
        first_name="Anna",
        zip_code="123 45",
        birth_day=date(1990, 2, 28),
        current_store=Store(external_id="SE014"),
    )

    assert {
        "firstName": "Anna",
        "zipCode": "123 45",
        "birthDay": "1990-02-28",
        "currentStore": {"externalId": "SE014"},
    } == converter.unstructure(attributes)


def test_round_trip() -> None:
    """What is unstructured structures back to an equal model."""
    attributes = ContactAttributes(
        first_name="Anna",
        mobile_phone="+46701234567",
        registration_date=datetime(2019, 2, 5, 13, 21, 2, tzinfo=PLUS_ONE),
        children=("2007-11-28",),
    )

    assert attributes == structure(converter.unstructure(attributes), ContactAttributes)


def test_unknown_fields_ignored() -> None:
    """Fields Engage adds without notice are ignored, at the top and nested."""
    data = {
        "id": GUID,
        "brandNewField": {"x": 1},
        "attributes": {"firstName": "Anna", "favouriteColour": "blue"},
        "meta": {"approved": True, "newMetaField": 3},
    }

    contact = structure(data, Contact)

    assert (
        Contact(
            id=GUID,
            attributes=ContactAttributes(first_name="Anna"),
            meta=Meta(approved=True),
        )
        == contact
    )


def test_null_objects_and_lists_read_as_empty() -> None:
    """A null where an object or a list belongs reads as an empty model or ()."""
    data = {
        "id": GUID,
        "attributes": None,
        "meta": None,
        "preferences": None,
        "consents": None,
        "audiences": None,
        "rewardVouchers": None,
        "promotions": None,
        "tiers": None,
    }

    assert ContactOverview(id=GUID) == structure(data, ContactOverview)


def test_missing_parts_read_as_empty() -> None:
    """An answer with only an id still gives a complete model."""
    assert Contact(id=GUID) == structure({"id": GUID}, Contact)


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (Contact, {"id": GUID, "attributes": {"custom": 1}}),
        (ContactOverview, {"id": GUID, "extra": [1]}),
        (Promotion, {"id": "p", "extra": True}),
        (Transaction, {"id": "t", "lineItems": [{"sku": "1"}]}),
        (PointAccount, {"id": 7, "balance": 10}),
    ],
)
def test_raw_is_kept(kind: type, data: dict[str, Any]) -> None:
    """Top-level results keep the JSON they were read from in `.raw`."""
    assert data == structure(data, kind).raw


def test_raw_is_not_part_of_equality() -> None:
    """Two contacts equal in every field are equal whatever else their raw JSON held."""
    assert structure({"id": GUID, "x": 1}, Contact) == structure({"id": GUID, "y": 2}, Contact)


def test_nested_raw_kept_on_promotions(overview_json: dict[str, Any]) -> None:
    """Each promotion of an overview keeps its own JSON."""
    overview = structure(overview_json, ContactOverview)

    assert overview_json["promotions"][0] == overview.promotions[0].raw


def test_attribute_reads_tenant_specific_fields() -> None:
    """Contact.attribute reads any attribute by its Engage name, None when absent."""
    contact = structure({"id": GUID, "attributes": {"shoeSize": 42}}, Contact)

    assert (42, None) == (contact.attribute("shoeSize"), contact.attribute("hatSize"))


@pytest.mark.parametrize(
    "value", ["not a date", "2019-13-45T00:00:00", "31/12/2019", 20190101, True, [1]]
)
def test_unparseable_datetime_is_none(value: object) -> None:
    """A datetime Engage sends in a form that cannot be read becomes None; raw keeps it."""
    data = {"id": GUID, "meta": {"createdOn": value, "approved": True}}

    contact = structure(data, Contact)

    assert (None, True, value) == (
        contact.meta.created_on,
        contact.meta.approved,
        contact.raw["meta"]["createdOn"],
    )


@pytest.mark.parametrize("value", ["01/01/1981", "1981-02-30", "", 1981])
def test_unparseable_date_is_none(value: object) -> None:
    """A birthDay that cannot be read becomes None."""
    assert structure({"birthDay": value}, ContactAttributes).birth_day is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2019-02-05T13:21:02+01:00", datetime(2019, 2, 5, 13, 21, 2, tzinfo=PLUS_ONE)),
        ("2019-02-05T13:21:02Z", datetime(2019, 2, 5, 13, 21, 2, tzinfo=UTC)),
        ("2019-02-05T13:21:02", datetime(2019, 2, 5, 13, 21, 2)),
        (
            "2019-02-05T13:21:02.1234567+01:00",
            datetime(2019, 2, 5, 13, 21, 2, 123456, tzinfo=PLUS_ONE),
        ),
    ],
)
def test_datetimes_read(text: str, expected: datetime) -> None:
    """ISO 8601 datetimes read with their offset, .NET's seven fraction digits included."""
    assert expected == structure({"createdOn": text}, Meta).created_on


def test_date_read_from_a_datetime_string() -> None:
    """A date field given a full datetime keeps the date part."""
    assert (
        date(1981, 1, 1)
        == structure({"birthDay": "1981-01-01T00:00:00"}, ContactAttributes).birth_day
    )


def test_single_object_where_a_list_belongs() -> None:
    """An object where a list belongs reads as a one-item tuple."""
    contact = structure({"id": GUID, "consents": {"id": "c", "value": True}}, Contact)

    assert (Consent(id="c", value=True),) == contact.consents


@pytest.mark.parametrize(("value", "expected"), [(20, 20), ("VIP20", "VIP20"), (2.5, 2.5)])
def test_scalar_union_kept_as_sent(value: object, expected: object) -> None:
    """A field that is a number or a text (a channel's value) keeps what Engage sent."""
    assert expected == structure({"value": value}, RedemptionChannel).value


@pytest.mark.parametrize("data", [[], "text", 42])
def test_structure_non_object_is_unexpected_response(data: object) -> None:
    """A top-level answer that is not an object raises UnexpectedResponse, not a cattrs error."""
    with pytest.raises(UnexpectedResponse, match="ContactOverview"):
        structure(data, ContactOverview)


def test_structure_error_names_the_path_not_the_value() -> None:
    """A part of the wrong shape is reported by its path, never by the (personal) value."""
    data = {"id": GUID, "attributes": ["anna.svensson@example.com"]}

    with pytest.raises(UnexpectedResponse) as info:
        structure(data, Contact)

    assert "$.attributes" in str(info.value)
    assert "anna.svensson@example.com" not in str(info.value)


def test_one_odd_scalar_does_not_make_the_contact_unreadable() -> None:
    """A number or flag Engage sends in an unexpected form reads as None (or its meaning), and
    the rest of the contact is still read; `.raw` keeps what was sent.
    """
    data = {
        "id": GUID,
        "attributes": {"age": "unknown", "rfm": "46", "firstName": "Anna"},
        "meta": {"approved": "false"},
        "preferences": {"acceptsEmail": "yes", "acceptsSms": {"odd": 1}},
    }

    contact = structure(data, Contact)

    assert (None, 46, "Anna") == (
        contact.attributes.age,
        contact.attributes.rfm,
        contact.attributes.first_name,
    )
    assert (False, True, None) == (
        contact.meta.approved,
        contact.preferences.accepts_email,
        contact.preferences.accepts_sms,
    )
    assert "unknown" == contact.raw["attributes"]["age"]


def test_missing_id_is_unexpected_response() -> None:
    """An answer without the required id raises UnexpectedResponse."""
    with pytest.raises(UnexpectedResponse):
        structure({"attributes": {}}, Contact)


# --- the documented overview ----------------------------------------------------------------------


def test_documented_overview_fully_structured(overview_json: dict[str, Any]) -> None:
    """The /contactoverview example from Engage's docs reads into every typed field."""
    nested_channels = (
        RedemptionChannel(type="POS", value_type="PERCENT", value=20),
        RedemptionChannel(type="ECOM", value_type="EXTERNALOFFER", value="VIP20PERCENT"),
    )
    consent_date = datetime(2019, 5, 6, 14, 0, 51, tzinfo=PLUS_TWO)
    expected = ContactOverview(
        id="33ee9958-0e09-484f-b4c4-aa3e00e1e24c",
        attributes=ContactAttributes(
            first_name="Example",
            last_name="Examplesson",
            street="Examplegatan 12",
            zip_code="123 45",
            city="Examplestad",
            care_of=None,
            country="Sverige",
            country_code="SE",
            email="example@example.com",
            mobile_phone="+46739111111",
            social_security_number="198101010101",
            gender="Female",
            birth_day=date(1981, 1, 1),
            age=35,
            children=("2007-11-28T00:00:00+01:00",),
            external_id=None,
            member_number="999888777",
            rfm=46,
            registration_date=datetime(2019, 2, 5, 13, 21, 2, tzinfo=PLUS_ONE),
            secrecy_marked=False,
            current_store=Store(
                id="0b7037b4-b7f5-4c9d-97e6-aa3b00ccc140", name="Rotterdam", external_id="SE014"
            ),
        ),
        meta=Meta(
            created_on=datetime(2019, 4, 29, 15, 42, 25, tzinfo=PLUS_TWO),
            modified_on=datetime(2020, 5, 31, 4, 2, 27, tzinfo=PLUS_TWO),
            source_type="Import",
            approved=True,
            contact_type="Member",
            recruited_by_store=Store(
                id="a9573a5a-c9bb-4593-abee-aa3b00ccc141", name="Nice", external_id="SE019"
            ),
        ),
        preferences=Preferences(accepts_email=True, accepts_postal=True, accepts_sms=True),
        tiers=Tiers(
            tier_id="bas",
            tier_name="Bas",
            expires=None,
            remaining_to_upgrade=233.0,
            based_on_points=767.0,
        ),
        consents=tuple(
            Consent(id=name, value=True, date=consent_date, comment="", source="ContactForm")
            for name in (
                "consentIntelligentOffers",
                "consentSegmentation",
                "consentGeneralTerms",
            )
        ),
        audiences=(
            "Best Customers rolling 24 months",
            "My VIP Group",
            "Intergamma VIP",
            "Superbokare",
        ),
        warnings=("MissingMobileNumber",),
        reward_vouchers=(
            RewardVoucher(
                id="880adf9c-b70b-47a8-b746-aaf900528332",
                voucher_number="0000000000161",
                name="Generate reward vouchers 02/11/2019 08:00",
                value=Money(currency="EUR", amount=3.0),
                local_values=(Money(currency="SEK", amount=30.0), Money("NOK", 30.0)),
                points=100.0,
                expires_on=datetime(2020, 8, 31, 23, 59, 59, tzinfo=PLUS_TWO),
                redeemed=False,
                redeemed_on=None,
            ),
        ),
        promotions=(
            Promotion(
                id="27c03506-89d6-4023-a158-c0bb0dc09e58",
                external_id=None,
                type="Multichannel",
                name="Spring Campaign",
                expires_on=None,
                heading="Spring Campaign",
                description=(
                    "Dear customer, The spring is here, time for updating your wardrobe! "
                    "Please enjoy the following spring time promotion. With love"
                ),
                redeemed=False,
                redeemed_on=None,
                image_url=None,
                link=None,
                redemption_channels=(
                    RedemptionChannel(
                        id="75992b07-b287-4417-8cb8-adba010fdaf8",
                        type="Multichannel",
                        name="20% off VIP offer!",
                        redeemed=False,
                        redemption_channels=nested_channels,
                    ),
                ),
            ),
        ),
    )

    overview = structure(overview_json, ContactOverview)

    assert expected == overview
    assert overview_json == overview.raw


def test_documented_overview_values_keep_json_types(overview_json: dict[str, Any]) -> None:
    """Numbers from the example keep their types: rfm and age int, amounts float."""
    overview = structure(overview_json, ContactOverview)

    assert (int, int, float, float) == (
        type(overview.attributes.rfm),
        type(overview.attributes.age),
        type(overview.reward_vouchers[0].points),
        type(overview.tiers.remaining_to_upgrade if overview.tiers else None),
    )


# --- the payload guard ----------------------------------------------------------------------------


def test_plain_payload_passes_through() -> None:
    """A valid mapping comes back as an equal new dict."""
    payload = {"firstName": "Anna", "age": 30, "staff": False, "score": 1.5}

    result = prepare_payload(payload, "attributes")

    assert payload == result
    assert result is not payload


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        ({"lastName": None}, "changes.lastName"),
        ({"lastName": ""}, "changes.lastName"),
        ({"preferences": {"acceptsEmail": None}}, "changes.preferences.acceptsEmail"),
        (
            {"consents": [{"id": "a", "value": True}, {"id": "b", "value": True, "comment": ""}]},
            "changes.consents[1].comment",
        ),
        ({"children": ["2007-11-28", None]}, "changes.children[1]"),
        (
            {"custom": {"deep": [{"deeper": {"deepest": ""}}]}},
            "changes.custom.deep[0].deeper.deepest",
        ),
    ],
)
def test_empty_values_raise_at_any_depth(payload: dict[str, Any], path: str) -> None:
    """None and "" anywhere raise EmptyValueError naming the exact path."""
    with pytest.raises(EmptyValueError) as info:
        prepare_payload(payload, "changes")

    assert path == info.value.field
    assert str(info.value).startswith(f"{path}: ")


def test_empty_value_error_is_a_value_error() -> None:
    """EmptyValueError is a ValueError and a PayloadError, so plain handlers catch it."""
    with pytest.raises(ValueError, match="CLEAR"):
        prepare_payload({"email": ""}, "attributes")


def test_clear_sends_null() -> None:
    """CLEAR is the one way to send null, at the top and nested."""
    payload = {"lastName": CLEAR, "preferences": {"acceptsSms": CLEAR}, "tags": ["a", CLEAR]}

    assert {
        "lastName": None,
        "preferences": {"acceptsSms": None},
        "tags": ["a", None],
    } == prepare_payload(payload, "changes")


def test_clear_is_a_singleton() -> None:
    """CLEAR is unique: Clear() is CLEAR, copies and pickles are CLEAR, repr is CLEAR."""
    assert (True, True, True, "CLEAR") == (
        Clear() is CLEAR,
        copy.deepcopy(CLEAR) is CLEAR,
        pickle.loads(pickle.dumps(CLEAR)) is CLEAR,
        repr(CLEAR),
    )


def test_values_converted_to_json() -> None:
    """Dates, datetimes and tuples become their JSON forms."""
    payload = {
        "birthDay": date(1990, 2, 28),
        "registered": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        "children": ("2010-01-01", "2012-01-01"),
    }

    assert {
        "birthDay": "1990-02-28",
        "registered": "2024-05-01T12:00:00+00:00",
        "children": ["2010-01-01", "2012-01-01"],
    } == prepare_payload(payload, "attributes")


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, {1, 2}, b"bytes", object(), 1 + 2j]
)
def test_values_that_cannot_be_json(value: object) -> None:
    """Non-finite floats and types JSON cannot hold raise PayloadError naming the field."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"custom": {"x": value}}, "changes")

    assert "changes.custom.x" == info.value.field


@pytest.mark.parametrize(
    ("birth_day", "sent"),
    [
        ("1990-02-28", "1990-02-28"),
        (date(1990, 2, 28), "1990-02-28"),
        ("2000-02-29", "2000-02-29"),
        (CLEAR, None),
    ],
)
def test_birth_day_accepted(birth_day: object, sent: str | None) -> None:
    """birthDay as YYYY-MM-DD (text or date) of a real date, or CLEAR, is accepted."""
    assert {"birthDay": sent} == prepare_payload({"birthDay": birth_day}, "changes")


@pytest.mark.parametrize(
    ("birth_day", "reason"),
    [
        ("1990-2-28", "YYYY-MM-DD"),
        ("19900228", "YYYY-MM-DD"),
        ("28/02/1990", "YYYY-MM-DD"),
        ("1990-02-28T00:00:00", "YYYY-MM-DD"),
        (datetime(1990, 2, 28, tzinfo=UTC), "YYYY-MM-DD"),
        (19900228, "YYYY-MM-DD"),
        ("1990-02-30", "not a real date"),
        ("1991-02-29", "not a real date"),
        ("1990-13-01", "not a real date"),
    ],
)
def test_birth_day_rejected(birth_day: object, reason: str) -> None:
    """A birthDay not written YYYY-MM-DD, or not a real date, raises PayloadError."""
    with pytest.raises(PayloadError, match=reason) as info:
        prepare_payload({"birthDay": birth_day}, "attributes")

    assert "attributes.birthDay" == info.value.field


def test_birth_day_value_not_in_message() -> None:
    """The rejected birthDay (personal data) is not repeated in the message."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"birthDay": "1985-06-31"}, "attributes")

    assert "1985-06-31" not in str(info.value)


@pytest.mark.parametrize(
    ("consents", "field"),
    [
        ([{"value": True}], "changes.consents[0].id"),
        ([{"id": "consentSms"}], "changes.consents[0].value"),
        ([{"id": "a", "value": True}, {"id": "b"}], "changes.consents[1].value"),
        ([{"id": "a", "value": CLEAR}], "changes.consents[0].value"),
        (["consentSms"], "changes.consents[0]"),
        ({"id": "a", "value": True}, "changes.consents"),
    ],
)
def test_consents_need_id_and_value(consents: object, field: str) -> None:
    """Each consent must be an object with id and value; the message names the place."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"consents": consents}, "changes")

    assert field == info.value.field


def test_consent_value_false_is_fine() -> None:
    """A consent withdrawn (value False) is valid."""
    payload = {"consents": [{"id": "consentSms", "value": False}]}

    assert payload == prepare_payload(payload, "changes")


def test_preferences_must_be_an_object() -> None:
    """preferences must be an object of booleans, not a list or a scalar."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"preferences": ["acceptsEmail"]}, "changes")

    assert "changes.preferences" == info.value.field


def test_typed_attributes_as_input() -> None:
    """A ContactAttributes model serialises to Engage's names; None fields are not sent."""
    attributes = ContactAttributes(
        first_name="Anna",
        email="anna@example.com",
        mobile_phone="+46701234567",
        birth_day=date(1990, 2, 28),
        current_store=Store(external_id="SE014"),
    )

    assert {
        "firstName": "Anna",
        "email": "anna@example.com",
        "mobilePhone": "+46701234567",
        "birthDay": "1990-02-28",
        "currentStore": {"externalId": "SE014"},
    } == prepare_payload(attributes, "attributes")


def test_typed_models_inside_a_mapping() -> None:
    """Preferences and Consent models nested in a mapping serialise too."""
    payload = {
        "city": "Lund",
        "preferences": Preferences(accepts_email=True, accepts_sms=False),
        "consents": [Consent(id="consentSms", value=False, source="POS")],
    }

    assert {
        "city": "Lund",
        "preferences": {"acceptsEmail": True, "acceptsSms": False},
        "consents": [{"id": "consentSms", "value": False, "source": "POS"}],
    } == prepare_payload(payload, "changes")


def test_typed_consent_without_value_rejected() -> None:
    """A Consent model without a value is refused like a mapping would be."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"consents": [Consent(id="consentSms")]}, "changes")

    assert "changes.consents[0].value" == info.value.field


def test_typed_attributes_with_empty_text_rejected() -> None:
    """An "" in a typed model is as dangerous as in a mapping: EmptyValueError."""
    with pytest.raises(EmptyValueError) as info:
        prepare_payload(ContactAttributes(first_name="Anna", last_name=""), "attributes")

    assert "attributes.lastName" == info.value.field


@pytest.mark.parametrize("payload", [None, "firstName=Anna", 42, [("firstName", "Anna")]])
def test_non_mapping_payload_is_type_error(payload: object) -> None:
    """A payload that is neither a mapping nor a model raises TypeError naming the argument."""
    with pytest.raises(TypeError, match=r"^attributes: "):
        prepare_payload(payload, "attributes")


@pytest.mark.parametrize("key", [1, "", None])
def test_keys_must_be_non_empty_text(key: object) -> None:
    """Attribute names must be non-empty str."""
    with pytest.raises(TypeError, match=r"changes\.custom"):
        prepare_payload({"custom": {key: "x"}}, "changes")


def test_input_never_mutated() -> None:
    """The guard returns new containers and leaves the caller's payload as it was."""
    payload: dict[str, Any] = {
        "lastName": CLEAR,
        "birthDay": date(1990, 2, 28),
        "preferences": {"acceptsEmail": True},
        "consents": [{"id": "a", "value": True}],
        "children": ("2010-01-01",),
    }
    before = copy.deepcopy(payload)

    result = prepare_payload(payload, "changes")

    assert before == payload
    assert (False, False) == (
        result["preferences"] is payload["preferences"],
        result["consents"][0] is payload["consents"][0],
    )


def test_input_not_mutated_when_rejected() -> None:
    """A rejected payload is left untouched too."""
    payload: dict[str, Any] = {"email": "a@b.se", "preferences": {"acceptsSms": None}}
    before = copy.deepcopy(payload)

    with pytest.raises(EmptyValueError):
        prepare_payload(payload, "changes")

    assert before == payload


# --- payload limits ------------------------------------------------------------------------------

DEEP = 1000  # deeper than Python's default recursion limit allows a recursive walk to go


def nested_dicts(levels: int) -> dict[str, Any]:
    """``{"a": {"a": ... {"a": "x"}}}`` with `levels` objects, built without recursion."""
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    result: dict[str, Any] = value
    return result


def nested_lists(levels: int) -> list[Any]:
    """``[[...["x"]...]]`` with `levels` lists, built without recursion."""
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    result: list[Any] = value
    return result


@attrs.frozen
class Node:
    """A caller's own attrs model that can nest without end."""

    child: Node | None = None
    label: str = "x"


def test_limits_are_what_the_docs_say() -> None:
    """The limits are module constants with the documented values."""
    assert (8, 16 * 1024, 64 * 1024) == (MAX_DEPTH, MAX_VALUE_BYTES, MAX_PAYLOAD_BYTES)


def test_deepest_allowed_nesting_passes() -> None:
    """A payload nested exactly MAX_DEPTH levels (the payload itself is the first) is sent."""
    payload = nested_dicts(MAX_DEPTH)

    assert payload == prepare_payload(payload, "changes")


def test_one_level_too_deep_names_the_object() -> None:
    """One object more than MAX_DEPTH is a PayloadError naming that object's path."""
    with pytest.raises(PayloadError) as info:
        prepare_payload(nested_dicts(MAX_DEPTH + 1), "changes")

    assert "changes" + ".a" * MAX_DEPTH == info.value.field
    assert "nested more than 8 levels" in info.value.reason


def test_thousand_nested_objects_raise_payload_error() -> None:
    """1,000 nested objects raise PayloadError naming the path down to the limit, not
    RecursionError.
    """
    with pytest.raises(PayloadError) as info:
        prepare_payload({"custom": nested_dicts(DEEP)}, "changes")

    assert "changes.custom" + ".a" * (MAX_DEPTH - 1) == info.value.field


def test_thousand_nested_lists_raise_payload_error() -> None:
    """1,000 nested lists raise PayloadError with an indexed path, not RecursionError."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"tags": nested_lists(DEEP)}, "attributes")

    assert "attributes.tags" + "[0]" * (MAX_DEPTH - 1) == info.value.field


def test_thousand_nested_models_raise_payload_error() -> None:
    """A caller's attrs model nested 1,000 deep is refused the same way, not by a
    RecursionError from serialising it.
    """
    node = Node()
    for _ in range(DEEP):
        node = Node(child=node)

    with pytest.raises(PayloadError) as info:
        prepare_payload(node, "attributes")

    assert "attributes" + ".child" * MAX_DEPTH == info.value.field


def test_a_payload_that_contains_itself_is_refused() -> None:
    """A mapping that holds itself is too deep, not an endless walk."""
    payload: dict[str, Any] = {"firstName": "Anna"}
    payload["self"] = payload

    with pytest.raises(PayloadError) as info:
        prepare_payload(payload, "changes")

    assert "changes" + ".self" * MAX_DEPTH == info.value.field


def test_models_are_sent_as_the_converter_writes_them() -> None:
    """Walking a model field by field gives what the converter's unstructure gives: camelCase
    names, defaults left out, nested models, dates and tuples in their JSON forms.
    """
    attributes = ContactAttributes(
        first_name="Anna",
        email="anna@example.com",
        birth_day=date(1990, 2, 28),
        registration_date=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        children=("2010-01-01",),
        staff=False,
        current_store=Store(external_id="SE014"),
    )

    assert converter.unstructure(attributes) == prepare_payload(attributes, "attributes")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"lastName": "Lind\ud800gren"}, "changes.lastName"),
        ({"preferences": {"note": "\udfff"}}, "changes.preferences.note"),
        (
            {"consents": [{"id": "a", "value": True, "comment": "x\udc80"}]},
            "changes.consents[0].comment",
        ),
        ({"children": ("2010-01-01", "\ud83d")}, "changes.children[1]"),
    ],
    ids=["top", "nested", "in-a-list", "in-a-tuple"],
)
def test_lone_surrogate_in_a_value_is_refused(payload: dict[str, Any], field: str) -> None:
    """A lone surrogate (text that is not Unicode, cannot be sent as UTF-8) is a PayloadError
    naming the field, not a UnicodeEncodeError when the body is encoded.
    """
    with pytest.raises(PayloadError) as info:
        prepare_payload(payload, "changes")

    assert (field, True) == (info.value.field, "surrogate" in info.value.reason)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"last\ud800Name": "Lind"}, "changes"),
        ({"preferences": {"accepts\udfffSms": True}}, "changes.preferences"),
    ],
    ids=["top", "nested"],
)
def test_lone_surrogate_in_a_name_is_refused(payload: dict[str, Any], field: str) -> None:
    """A lone surrogate in an attribute name is refused, naming the object that holds it
    (the name itself cannot be printed).
    """
    with pytest.raises(PayloadError) as info:
        prepare_payload(payload, "changes")

    assert (field, True) == (info.value.field, "attribute name" in info.value.reason)


@pytest.mark.parametrize(
    "character",
    ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x0e", "\x1b", "\x1f", "\ufffe", "\uffff"],
)
def test_characters_xml_cannot_carry_are_refused_in_values(character: str) -> None:
    """NUL, the other C0 controls but tab, LF and CR, and U+FFFE/U+FFFF are refused in a
    value: a queued change may be written to an XML import file, which cannot hold them.
    """
    with pytest.raises(PayloadError) as info:
        prepare_payload({"custom": {"note": f"Lind{character}gren"}}, "changes")

    assert "changes.custom.note" == info.value.field
    assert f"U+{ord(character):04X}" in info.value.reason
    assert "Lind" not in str(info.value)


@pytest.mark.parametrize("character", ["\x00", "\x1f"])
def test_control_characters_are_refused_in_names(character: str) -> None:
    """NUL or another control character in an attribute name is refused, naming its object."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"preferences": {f"accepts{character}Sms": True}}, "changes")

    assert "changes.preferences" == info.value.field
    assert "attribute name" in info.value.reason


def test_text_that_xml_and_json_carry_is_kept() -> None:
    """Tab, line feed, carriage return, quotes, backslashes, DEL, non-BMP characters and other
    languages' letters pass unchanged.
    """
    payload = {
        "street": 'c/o "Lind"\tBox 12\r\nS-211 20',
        "note": "back\\slash \x7f \x85 \U0001f600 Åsa Ødegård 李",
    }

    assert payload == prepare_payload(payload, "changes")


def test_longest_value_passes_and_one_byte_more_is_refused() -> None:
    """A value of MAX_VALUE_BYTES (counted in UTF-8 bytes) passes; one byte more is refused,
    naming the field and not repeating the value.
    """
    longest = "å" * (MAX_VALUE_BYTES // 2)  # two bytes each in UTF-8
    assert {"note": longest} == prepare_payload({"note": longest}, "changes")

    with pytest.raises(PayloadError) as info:
        prepare_payload({"custom": {"note": longest + "x"}}, "changes")

    assert "changes.custom.note" == info.value.field
    assert "16 KiB" in info.value.reason
    assert "å" not in str(info.value)


def test_oversize_value_in_a_list_is_refused() -> None:
    """An oversize value inside a list is named by its index."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"children": ["2010-01-01", "x" * 10**7]}, "changes")

    assert "changes.children[1]" == info.value.field


def test_oversize_name_is_refused() -> None:
    """An attribute name longer than MAX_VALUE_BYTES is refused, naming its object."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"custom": {"n" * (MAX_VALUE_BYTES + 1): True}}, "changes")

    assert "changes.custom" == info.value.field


def wire_size(payload: dict[str, Any]) -> int:
    """The size of `payload` as compact UTF-8 JSON, as the session sends and stores it."""

    def default(value: Any) -> Any:
        return None if value is CLEAR else value.isoformat()

    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=default)
    return len(text.encode())


def payload_of_size(size: int) -> dict[str, Any]:
    """A payload of values under MAX_VALUE_BYTES whose compact UTF-8 JSON is `size` bytes.

    It holds characters JSON escapes, multi-byte ones, numbers, booleans, CLEAR and a date,
    so the way each is counted is tested too.
    """
    payload: dict[str, Any] = {
        "mixed": 'a"b\\c\nd\tå 李 \U0001f600 ' * 40,
        "x": [1.5, True, CLEAR, date(2020, 1, 2), -12],
    }
    filler = "z" * (MAX_VALUE_BYTES - 100)
    while size - wire_size(payload) > MAX_VALUE_BYTES:
        payload[f"k{len(payload)}"] = filler
    payload["last"] = "z"
    payload["last"] = "z" * (1 + size - wire_size(payload))
    assert size == wire_size(payload)
    return payload


def test_largest_payload_passes_and_one_byte_more_is_refused() -> None:
    """A payload of MAX_PAYLOAD_BYTES as compact UTF-8 JSON passes; one byte more is a
    PayloadError naming the payload, not any value in it.
    """
    largest = payload_of_size(MAX_PAYLOAD_BYTES)
    too_large = payload_of_size(MAX_PAYLOAD_BYTES + 1)

    assert largest["last"] == prepare_payload(largest, "attributes")["last"]
    with pytest.raises(PayloadError) as info:
        prepare_payload(too_large, "attributes")

    assert "attributes" == info.value.field
    assert "64 KiB" in info.value.reason


def test_a_huge_list_is_refused_without_walking_all_of_it() -> None:
    """A list of ten million numbers is refused as too large (the walk stops at the limit)."""
    with pytest.raises(PayloadError) as info:
        prepare_payload({"scores": range(10**7)}, "changes")

    assert "changes" == info.value.field


def test_number_too_large_to_write_is_refused() -> None:
    """An int with more digits than a value may have bytes is a PayloadError naming the field
    (whether or not Python's own limit on writing long ints is set).
    """
    with pytest.raises(PayloadError) as info:
        prepare_payload({"points": 10**20000}, "changes")

    assert "changes.points" == info.value.field


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Member\x00", r"U\+0000"),
        ("Mem\udfffber", "surrogate"),
        ("M" * (MAX_VALUE_BYTES + 1), "KiB"),
    ],
)
def test_check_text_holds_one_argument_to_the_payload_rules(text: str, reason: str) -> None:
    """check_text refuses what a payload value may not hold, naming the argument."""
    with pytest.raises(PayloadError, match=reason) as info:
        check_text(text, "contact_type")

    assert "contact_type" == info.value.field


def test_check_text_returns_good_text() -> None:
    """check_text gives back text it accepts, unchanged."""
    assert "Store staff\tPOS" == check_text("Store staff\tPOS", "source")


# --- contact ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (GUID, GUID),
        (GUID.upper(), GUID),
        ("65D152A2-1C12-4E6B-93DC-1D2120000000", "65d152a2-1c12-4e6b-93dc-1d2120000000"),
        ("b16fd8f3-d0f5-aaaa-aa60-b00300f9aaaa", "b16fd8f3-d0f5-aaaa-aa60-b00300f9aaaa"),
    ],
)
def test_normalize_contact_id(value: str, expected: str) -> None:
    """Any 8-4-4-4-12 hex id is accepted (version bits unchecked) and lower-cased."""
    assert expected == normalize_contact_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "33ee9958-0e09-484f-b4c4-aa3e00e1e24",
        "430d3329-7eef-45c0-37f9-ae9300a0daceid",
        "{2e40b702-2767-4abe-ae99-aa510108e22b}",
        "2e40b70227674abeae99aa510108e22b",
        f"{GUID}\n",
        " " + GUID,
        "anna@example.com",
        "",
        "ref_0123456789abcdef0123456789abcdef",
    ],
)
def test_normalize_contact_id_rejects(value: str) -> None:
    """Malformed ids (doc typos included) raise ValueError without repeating the value."""
    with pytest.raises(ValueError, match=r"^contact_id: ") as info:
        normalize_contact_id(value)

    if value.strip():
        assert value.strip() not in str(info.value)


@pytest.mark.parametrize("value", [None, 42, b"2e40b702-2767-4abe-ae99-aa510108e22b"])
def test_normalize_contact_id_type_error(value: object) -> None:
    """A non-str id is a TypeError naming the field given."""
    with pytest.raises(TypeError, match=r"^contact_id_or_ref: "):
        normalize_contact_id(value, "contact_id_or_ref")
