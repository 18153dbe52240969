"""The result models: frozen values whose reprs never show personal data."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import attrs
import pytest

from engage_async import (
    Consent,
    Contact,
    ContactAttributes,
    ContactOverview,
    Delivery,
    Preferences,
    Store,
)
from engage_async._wire import structure

DATA = Path(__file__).parent / "data"
GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"

# Values of every personal field, each distinctive enough to be found in a repr.
PERSONAL = {
    "first_name": "Annabelle",
    "last_name": "Svenssonberg",
    "street": "Hemligagatan 12",
    "zip_code": "987 65",
    "city": "Hemligstad",
    "care_of": "Privat Person",
    "email": "annabelle.svenssonberg@example.com",
    "mobile_phone": "+46701234567",
    "social_security_number": "198506059738",
    "gender": "Female",
}


@pytest.fixture(name="attributes")
def attributes_fixture() -> ContactAttributes:
    """Attributes with every personal field set, plus some that are not personal."""
    return ContactAttributes(
        **PERSONAL,
        birth_day=date(1985, 6, 5),
        age=38,
        children=("2011-04-01",),
        country_code="SE",
        member_number="M-1",
        current_store=Store(name="Rotterdam"),
    )


@pytest.fixture(name="contact")
def contact_fixture(attributes: ContactAttributes) -> Contact:
    """A contact holding `attributes`, with its raw JSON holding them too."""
    raw = {"id": GUID, "attributes": {"firstName": PERSONAL["first_name"]}}
    return Contact(
        id=GUID,
        attributes=attributes,
        preferences=Preferences(accepts_email=True),
        consents=(Consent(id="consentSms", value=True),),
        raw=raw,
    )


@pytest.fixture(name="overview_json")
def overview_json_fixture() -> dict[str, Any]:
    """The documented /contactoverview response."""
    data: dict[str, Any] = json.loads((DATA / "contact_overview.json").read_text("utf-8"))
    return data


def leaked(text: str, values: list[str]) -> list[str]:
    """The `values` found in `text`."""
    return [value for value in values if value in text]


def test_attributes_repr_hides_personal_data(attributes: ContactAttributes) -> None:
    """Names, address, email, phone, personal number, gender, birthday are not in the repr."""
    text = repr(attributes)

    assert [] == leaked(text, [*PERSONAL.values(), "1985", "2011-04-01"])
    assert "country_code='SE'" in text


def test_contact_repr_hides_personal_data(contact: Contact) -> None:
    """A contact's repr shows its id and bookkeeping, never personal data (raw included)."""
    text = repr(contact)

    assert [] == leaked(text, list(PERSONAL.values()))
    assert GUID in text


def test_contact_str_hides_personal_data(contact: Contact) -> None:
    """str() (used by f-strings and logging) is as safe as repr()."""
    assert [] == leaked(f"{contact}", list(PERSONAL.values()))


def test_overview_repr_hides_personal_data(overview_json: dict[str, Any]) -> None:
    """The documented overview's repr holds none of its personal values."""
    attributes = overview_json["attributes"]
    personal = [
        attributes[name]
        for name in (
            "firstName",
            "lastName",
            "street",
            "zipCode",
            "city",
            "email",
            "mobilePhone",
            "socialSecurityNumber",
            "birthDay",
        )
    ]

    text = repr(structure(overview_json, ContactOverview))

    assert [] == leaked(text, personal)


def test_delivery_repr_hides_the_contact(contact: Contact) -> None:
    """A Delivery's repr shows the outcome, not the contact Engage returned."""
    delivery = Delivery(queued=False, contact_id=GUID, contact=contact, ref="ref_" + "0" * 32)

    text = repr(delivery)

    assert [] == leaked(text, list(PERSONAL.values()))
    assert (
        f"Delivery(queued=False, contact_id='{GUID}', change_id=None, "
        f"ref='ref_{'0' * 32}', existed=False)"
    ) == text


def test_personal_fields_still_compare(attributes: ContactAttributes) -> None:
    """Hiding from repr does not hide from equality: a changed email makes a different value."""
    assert attributes != attrs.evolve(attributes, email="other@example.com")


@pytest.mark.parametrize(
    "model",
    [
        ContactAttributes(),
        Contact(id=GUID),
        ContactOverview(id=GUID),
        Delivery(queued=True),
    ],
)
def test_models_are_frozen(model: object) -> None:
    """Results cannot be changed after they are made."""
    field = attrs.fields(type(model))[0].name

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(model, field, None)


def test_delivery_defaults() -> None:
    """A Delivery needs only `queued`; the rest defaults to unknown / not existed."""
    assert (None, None, None, None, False) == (
        Delivery(queued=True).contact_id,
        Delivery(queued=True).contact,
        Delivery(queued=True).change_id,
        Delivery(queued=True).ref,
        Delivery(queued=True).existed,
    )
