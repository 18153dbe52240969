"""The XML fallback files: contact elements, their validation, and writing import files."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from engage_async._xmlfiles import (
    MAX_CONTACT_SIZE,
    MAX_CONTACTS_PER_FILE,
    MAX_FIELD_DEPTH,
    NAMESPACE,
    XmlContact,
    XmlContentError,
    build_contact,
    check_contact,
    digest,
    find_written,
    only_custom_fields,
    place,
    render,
    schema_path,
    validate_file,
    write_file,
)

GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
NOW = datetime(2024, 3, 5, 6, 7, 8, tzinfo=UTC)
STAMP = "20240305060708"


def local(element: etree._Element) -> str:
    """The tag of `element` without its namespace."""
    return etree.QName(element).localname


def child_names(element: etree._Element) -> list[str]:
    """The local names of the children of `element`, in order."""
    return [local(child) for child in element]


def child(element: etree._Element, name: str) -> etree._Element:
    """The one child of `element` called `name` (in the import namespace)."""
    found = element.findall(f"{{{NAMESPACE}}}{name}")
    assert 1 == len(found), f"{name}: {len(found)} elements"
    return found[0]


def member(seq: int = 1, **fields: Any) -> XmlContact:
    """A Member create with an email and `fields`."""
    return build_contact(seq, "Member", {"email": "anna@example.com", **fields})


def document(body: str) -> bytes:
    """An import document around `body` (the contents of <new>)."""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<contacts xmlns="{NAMESPACE}"><new>{body}</new></contacts>\n'
    ).encode()


# --- contact elements -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("contact_type", "element"),
    [("Member", "member"), ("Contact", "contact"), ("VipCustomer", "vipCustomer")],
)
def test_element_is_named_after_the_contact_type(contact_type: str, element: str) -> None:
    """A contact element is its contact type with the first letter lower-cased."""
    contact = build_contact(1, contact_type, {"email": "anna@example.com"})

    assert element == local(contact.element)
    assert NAMESPACE == etree.QName(contact.element).namespace


def test_contact_type_that_is_no_xml_name_is_refused() -> None:
    """A contact type that cannot be an element name is an XmlContentError."""
    with pytest.raises(XmlContentError, match="Store Staff"):
        build_contact(1, "Store Staff", {"email": "anna@example.com"})


def test_build_contact_keeps_the_outbox_seq() -> None:
    """The XmlContact remembers which outbox row it came from."""
    assert 42 == member(42).seq


def test_create_has_no_contact_id() -> None:
    """A create is written with its fields only: no contactId, no contactType."""
    contact = build_contact(
        1, "Member", {"email": "anna@example.com", "firstName": "Anna", "contactType": "Member"}
    )

    assert ["email", "firstName"] == child_names(contact.element)


def test_update_carries_contact_id_first() -> None:
    """An update starts with <contactId>, its key, and holds it once."""
    contact = build_contact(
        1, "Member", {"firstName": "Anna", "contactId": "ignored"}, contact_id=GUID
    )

    assert ["contactId", "firstName"] == child_names(contact.element)
    assert GUID == contact.element[0].text


def test_preferences_render_as_nested_elements() -> None:
    """A mapping such as preferences becomes an element with one child per entry."""
    contact = member(preferences={"acceptsEmail": True, "acceptsSms": False})

    preferences = child(contact.element, "preferences")
    assert ["acceptsEmail", "acceptsSms"] == child_names(preferences)
    check_contact(contact)


def test_consents_render_as_repeated_consent_elements() -> None:
    """A list of consents becomes <consents> holding one <consent> per item."""
    consents = [
        {"id": "memberConsent", "value": True, "source": "POS"},
        {"id": "smsConsent", "value": False, "comment": "asked at the till"},
    ]
    contact = member(consents=consents)

    element = child(contact.element, "consents")
    assert ["consent", "consent"] == child_names(element)
    assert ["id", "value", "source"] == child_names(element[0])
    assert ["memberConsent", "true", "POS"] == [item.text for item in element[0]]
    assert ["smsConsent", "false", "asked at the till"] == [item.text for item in element[1]]
    check_contact(contact)


def test_clear_renders_an_empty_element_that_validates() -> None:
    """A cleared field (None, what CLEAR sends) is an empty element, and the schema takes it."""
    contact = build_contact(1, "Member", {"birthDay": None, "lastName": None}, contact_id=GUID)

    for name in ("birthDay", "lastName"):
        element = child(contact.element, name)
        assert element.text is None
        assert 0 == len(element)
    check_contact(contact)


def test_booleans_render_as_true_and_false() -> None:
    """Python booleans are written as XML Schema's true and false."""
    contact = member(preferences={"acceptsEmail": True, "acceptsPostal": False})

    preferences = child(contact.element, "preferences")
    assert ["true", "false"] == [item.text for item in preferences]


def test_numbers_render_as_text() -> None:
    """Numbers are written as their decimal text."""
    contact = member(points=120, ratio=0.5)

    assert "120" == child(contact.element, "points").text
    assert "0.5" == child(contact.element, "ratio").text


def test_consent_date_offset_is_normalised() -> None:
    """A consent date written with +0100 (Engage's examples) becomes +01:00 and validates."""
    contact = member(
        consents=[{"id": "memberConsent", "value": True, "date": "2021-01-26T15:10:17+0100"}]
    )

    consent = child(child(contact.element, "consents"), "consent")
    assert "2021-01-26T15:10:17+01:00" == child(consent, "date").text
    check_contact(contact)


def test_non_ascii_text_is_kept() -> None:
    """Text such as Swedish names goes into the element unchanged."""
    contact = member(firstName="Åsa", city="Malmö")

    assert "Åsa" == child(contact.element, "firstName").text
    assert "Malmö" == child(contact.element, "city").text


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"first name": "SecretValue"}, "first name"),
        ({"1stName": "SecretValue"}, "1stName"),
        ({"preferences": {"accepts<Email": "SecretValue"}}, "accepts<Email"),
        ({"consents": [{"id": "c1", "bad key": "SecretValue"}]}, "bad key"),
    ],
)
def test_field_name_that_is_no_xml_name_raises(fields: dict[str, Any], named: str) -> None:
    """A field name that is not a valid XML name is an XmlContentError naming the field,
    never its value.
    """
    with pytest.raises(XmlContentError) as info:
        build_contact(1, "Member", fields)

    assert named in str(info.value)
    assert "SecretValue" not in str(info.value)


def test_control_character_in_a_value_raises_xml_content_error() -> None:
    """A value XML cannot hold (a control character) is an XmlContentError naming the field,
    not lxml's bare ValueError: the flusher sets aside contacts on XmlContentError only.
    """
    with pytest.raises(XmlContentError) as info:
        build_contact(1, "Member", {"email": "anna@example.com", "lastName": "Lind\x0bgren"})

    assert "lastName" in str(info.value)
    assert "Lind" not in str(info.value)


def problems_of(contact: XmlContact) -> list[str]:
    """check_contact's verdict as a list: empty when it passes, its message when it does not."""
    try:
        check_contact(contact)
    except XmlContentError as exc:
        return [str(exc)]
    return []


VALID_FIELDS: dict[str, Any] = {
    "email": "anna@example.com",
    "mobilePhone": "+46701234567",
    "countryCode": "SE",
    "birthDay": "1985-06-05",
    "preferences": {"acceptsEmail": True},
}
BROKEN_FIELDS: dict[str, Any] = {
    "email": "anna-at-example.com",
    "mobilePhone": "call me",
    "countryCode": "SWE",
    "birthDay": "05/06/1985",
    "preferences": {"acceptsEmail": "yes"},
}


def test_check_contact_accepts_a_valid_contact() -> None:
    """A contact with known fields in their formats (and an upper-case GUID) passes
    check_contact, while the same contact with any one of those fields malformed does not:
    the pass is the schema's verdict on each field, not a check that looks at nothing.
    """
    valid = build_contact(1, "Member", VALID_FIELDS, contact_id=GUID.upper())
    refused = [
        name
        for name, broken in BROKEN_FIELDS.items()
        if problems_of(
            build_contact(1, "Member", {**VALID_FIELDS, name: broken}, contact_id=GUID.upper())
        )
    ]

    assert [] == problems_of(valid)
    assert list(BROKEN_FIELDS) == refused


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({"birthDay": "1985-13-45"}, "birthDay", "1985-13-45"),
        ({"birthDay": "05/06/1985"}, "birthDay", "05/06/1985"),
        ({"email": "anna-at-example.com"}, "email", "anna-at-example.com"),
        ({"mobilePhone": "call me maybe"}, "mobilePhone", "call me maybe"),
    ],
)
def test_check_contact_reports_a_bad_value_without_echoing_it(
    fields: dict[str, Any], field: str, value: str
) -> None:
    """An invalid known field is reported by name; the value itself is not in the message."""
    with pytest.raises(XmlContentError) as info:
        check_contact(build_contact(1, "Member", fields))

    assert field in str(info.value)
    assert value not in str(info.value)


def test_check_contact_does_not_echo_a_value_holding_an_apostrophe() -> None:
    """A rejected value with an apostrophe in it (O'Neill) leaves no part of it in the
    message either.
    """
    with pytest.raises(XmlContentError) as info:
        check_contact(build_contact(1, "Member", {"email": "anna.o'neill@nowhere"}))

    message = str(info.value)
    assert "email" in message
    assert "anna" not in message
    assert "neill" not in message


def test_check_contact_reports_a_bad_consent() -> None:
    """A consent whose value is not a boolean does not pass."""
    contact = member(consents=[{"id": "memberConsent", "value": "maybe"}])

    with pytest.raises(XmlContentError, match="value"):
        check_contact(contact)


def test_check_contact_rejects_an_update_with_a_malformed_contact_id() -> None:
    """The contactId of an update must be a GUID."""
    contact = build_contact(1, "Member", {"firstName": "Anna"}, contact_id="not-a-guid")

    with pytest.raises(XmlContentError, match="contactId"):
        check_contact(contact)


def test_check_contact_accepts_a_custom_contact_type() -> None:
    """A tenant's own contact type is accepted, with fields the schema does not know, and
    keeps them all; its known fields are still checked (a bad email in it is refused).
    """
    contact = build_contact(1, "VipCustomer", {"email": "anna@example.com", "vipLevel": "gold"})
    bad_email = build_contact(1, "VipCustomer", {"email": "anna-at-example", "vipLevel": "gold"})

    assert [] == problems_of(contact)
    assert ("vipCustomer", ["email", "vipLevel"], "gold") == (
        local(contact.element),
        child_names(contact.element),
        child(contact.element, "vipLevel").text,
    )
    with pytest.raises(XmlContentError, match="email"):
        check_contact(bad_email)


# --- writing files -------------------------------------------------------------------------


def test_write_file_names_the_file_with_utc_time_and_sequence(tmp_path: Path) -> None:
    """The file is YYYYMMDDHHmmss_<seq>_contacts.xml, in the directory given."""
    path = write_file(tmp_path, [member()], now=NOW)

    assert tmp_path / f"{STAMP}_1_contacts.xml" == path
    assert path.is_file()


def test_write_file_stamps_utc_even_for_another_time_zone(tmp_path: Path) -> None:
    """A `now` in another time zone is converted: the name holds UTC time."""
    stockholm = NOW.astimezone(timezone(timedelta(hours=1)))

    path = write_file(tmp_path, [member()], now=stockholm)

    assert f"{STAMP}_1_contacts.xml" == path.name


def test_write_file_defaults_to_the_current_utc_time(tmp_path: Path) -> None:
    """Without `now`, the stamp is the current UTC time (to the second)."""
    before = datetime.now(UTC).replace(microsecond=0)
    path = write_file(tmp_path, [member()])
    after = datetime.now(UTC)

    stamp, sequence, tail = path.name.split("_")
    written = datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    assert before <= written <= after
    assert ("1", "contacts.xml") == (sequence, tail)


def test_write_file_creates_the_directory(tmp_path: Path) -> None:
    """A directory that does not exist yet is created."""
    directory = tmp_path / "spool" / "xml"

    path = write_file(directory, [member()], now=NOW)

    assert directory == path.parent


def test_write_file_takes_the_next_sequence_when_the_name_is_taken(tmp_path: Path) -> None:
    """Files written in the same second get sequence 1, 2, 3."""
    paths = [write_file(tmp_path, [member(seq)], now=NOW) for seq in range(3)]

    assert [f"{STAMP}_{n}_contacts.xml" for n in (1, 2, 3)] == [p.name for p in paths]


def test_write_file_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    """A file already at the name (another writer's) is left as it was."""
    taken = tmp_path / f"{STAMP}_1_contacts.xml"
    taken.write_bytes(b"another writer's file")

    path = write_file(tmp_path, [member()], now=NOW)

    assert f"{STAMP}_2_contacts.xml" == path.name
    assert b"another writer's file" == taken.read_bytes()


def test_write_file_leaves_no_temporary_files(tmp_path: Path) -> None:
    """After writing, the directory holds the import files and nothing else."""
    (tmp_path / f"{STAMP}_1_contacts.xml").write_bytes(b"taken")

    first = write_file(tmp_path, [member()], now=NOW)
    second = write_file(tmp_path, [member()], now=NOW + timedelta(seconds=1))

    assert sorted([f"{STAMP}_1_contacts.xml", first.name, second.name]) == sorted(
        path.name for path in tmp_path.iterdir()
    )


def test_write_file_writes_utf8_with_an_xml_declaration(tmp_path: Path) -> None:
    """The file starts with an XML declaration naming UTF-8, and text is UTF-8 bytes."""
    path = write_file(tmp_path, [member(firstName="Åsa", city="Malmö")], now=NOW)

    data = path.read_bytes()
    declaration = data.split(b"?>", 1)[0]
    assert data.startswith(b"<?xml ")
    assert b"encoding='utf-8'" in declaration.lower() or b'encoding="utf-8"' in declaration.lower()
    assert "Malmö".encode() in data
    assert "Åsa".encode() in data


def test_write_file_structure(tmp_path: Path) -> None:
    """The document is <contacts> holding <new> holding the contacts, in the order given."""
    contacts = [
        build_contact(1, "Member", {"firstName": "Anna"}, contact_id=GUID),
        build_contact(2, "Contact", {"firstName": "Bo"}, contact_id=GUID.upper()),
    ]

    path = write_file(tmp_path, contacts, now=NOW)

    root = etree.parse(str(path)).getroot()
    assert f"{{{NAMESPACE}}}contacts" == root.tag
    assert ["new"] == child_names(root)
    new = root[0]
    assert ["member", "contact"] == child_names(new)
    assert ["contactId", "firstName"] == child_names(new[1])


def test_write_file_can_reuse_a_contact(tmp_path: Path) -> None:
    """Writing a contact does not consume it: it can go into another file."""
    contact = member()

    first = write_file(tmp_path, [contact], now=NOW)
    second = write_file(tmp_path, [contact], now=NOW)

    assert first.read_bytes() == second.read_bytes()
    assert ["email"] == child_names(contact.element)


def test_write_file_refuses_no_contacts(tmp_path: Path) -> None:
    """An empty list is a ValueError and writes nothing."""
    directory = tmp_path / "xml"

    with pytest.raises(ValueError, match="20000"):
        write_file(directory, [], now=NOW)

    assert not directory.exists()


def test_write_file_refuses_more_than_20000_contacts(tmp_path: Path) -> None:
    """More than 20,000 contacts is a ValueError and writes nothing."""
    directory = tmp_path / "xml"

    with pytest.raises(ValueError, match="20000"):
        write_file(directory, [member()] * (MAX_CONTACTS_PER_FILE + 1), now=NOW)

    assert not directory.exists()


def test_write_file_takes_exactly_20000_contacts(tmp_path: Path) -> None:
    """20,000 contacts, the limit, fit in one valid file."""
    path = write_file(tmp_path, [member()] * MAX_CONTACTS_PER_FILE, now=NOW)

    root = etree.parse(str(path)).getroot()
    assert MAX_CONTACTS_PER_FILE == len(root[0])
    assert [] == validate_file(path)


def test_write_file_refuses_an_invalid_document(tmp_path: Path) -> None:
    """Contacts that do not validate are an XmlContentError (without their values), and no
    file appears.
    """
    with pytest.raises(XmlContentError) as info:
        write_file(tmp_path, [member(birthDay="1985-13-45")], now=NOW)

    assert "birthDay" in str(info.value)
    assert "1985-13-45" not in str(info.value)
    assert [] == list(tmp_path.iterdir())


# --- validating files ----------------------------------------------------------------------


def test_validate_file_accepts_a_written_file(tmp_path: Path) -> None:
    """Files write_file wrote, one of creates and one of updates, validate with no problems."""
    creates = [
        member(1, preferences={"acceptsEmail": True}, birthDay=None),
        build_contact(3, "VipCustomer", {"email": "vip@example.com"}),
    ]
    updates = [
        build_contact(
            2,
            "Member",
            {"consents": [{"id": "c1", "value": True, "date": "2021-01-26T15:10:17+0100"}]},
            contact_id=GUID,
        ),
    ]

    assert [] == validate_file(write_file(tmp_path, creates, now=NOW))
    assert [] == validate_file(write_file(tmp_path, updates, now=NOW))


@pytest.mark.parametrize(
    "content",
    [
        document("<member><birthDay>1985-13-45</birthDay></member>"),
        document("<member><contactId>not-a-guid</contactId></member>"),
        document("<member/>"),
        b'<?xml version="1.0"?><contacts><new/></contacts>',
        document("<member><email>anna@example.com</email>").replace(b"</new>", b""),
        b"this is not xml",
    ],
    ids=[
        "bad-birthday",
        "bad-contact-id",
        "member-without-fields",
        "no-namespace",
        "not-well-formed",
        "not-xml",
    ],
)
def test_validate_file_reports_a_broken_file(tmp_path: Path, content: bytes) -> None:
    """A file that breaks the schema, or is no XML, gives a list of problems."""
    path = tmp_path / f"{STAMP}_1_contacts.xml"
    path.write_bytes(content)

    problems = validate_file(path)

    assert problems
    assert all(isinstance(problem, str) for problem in problems)


def test_validate_file_problems_leave_values_out(tmp_path: Path) -> None:
    """The problems name the element, not the personal data that failed."""
    path = tmp_path / "contacts.xml"
    path.write_bytes(document("<member><email>anna-at-example.com</email></member>"))

    problems = validate_file(path)

    assert problems
    assert any("email" in problem for problem in problems)
    assert not any("anna" in problem for problem in problems)


def test_validate_file_reports_a_missing_file(tmp_path: Path) -> None:
    """A file that is not there is a problem, not an exception."""
    assert validate_file(tmp_path / "nowhere.xml")


def test_schema_accepts_a_custom_contact_type_element(tmp_path: Path) -> None:
    """The contact element's name is open (lax): a tenant's own type and fields validate."""
    path = tmp_path / "contacts.xml"
    path.write_bytes(
        document(
            "<vipCustomer><email>vip@example.com</email><vipLevel>gold</vipLevel>"
            "<birthDay>1985-06-05</birthDay></vipCustomer>"
        )
    )

    assert [] == validate_file(path)


@pytest.mark.parametrize(
    "field",
    [
        "<birthDay>05/06/1985</birthDay>",
        "<email>not an email</email>",
        "<contactId>123</contactId>",
        "<preferences><acceptsEmail>yes</acceptsEmail></preferences>",
    ],
)
def test_schema_checks_known_fields_inside_a_custom_type(tmp_path: Path, field: str) -> None:
    """Known fields are checked wherever they appear, inside a custom type too."""
    path = tmp_path / "contacts.xml"
    path.write_bytes(document(f"<vipCustomer>{field}</vipCustomer>"))

    assert validate_file(path)


def test_schema_accepts_avoid_triggering_export(tmp_path: Path) -> None:
    """The root may carry avoidTriggeringExport, as Engage documents."""
    path = tmp_path / "contacts.xml"
    path.write_bytes(
        document(
            f"<member><contactId>{GUID}</contactId><bonusLevel>2</bonusLevel></member>"
        ).replace(b"<contacts ", b'<contacts avoidTriggeringExport="true" ')
    )

    assert [] == validate_file(path)


def test_schema_path_points_at_the_xsd() -> None:
    """schema_path() names an existing file that lxml reads as an XML Schema."""
    path = schema_path()

    assert path.is_file()
    assert "contacts-import.xsd" == path.name
    etree.XMLSchema(etree.parse(str(path)))


# --- whatever a row holds: bounded building -----------------------------------------------------


def nested(levels: int) -> Any:
    """A value nested `levels` mappings deep (built without recursion)."""
    value: Any = "bottom"
    for _ in range(levels):
        value = {"level": value}
    return value


def refusal(fields: Any, **kwargs: Any) -> str:
    """The message of the XmlContentError building and checking `fields` raises."""
    with pytest.raises(XmlContentError) as info:
        check_contact(build_contact(1, "Member", fields, **kwargs))
    message = str(info.value)
    message.encode()  # storable and printable: no lone surrogate
    return message


@pytest.mark.parametrize("levels", [MAX_FIELD_DEPTH, 250, 5000])
def test_a_contact_nested_too_deep_is_refused_without_recursion(levels: int) -> None:
    """Nesting beyond MAX_FIELD_DEPTH is an XmlContentError naming the field, even 5000
    levels deep (far past Python's recursion limit): building never recurses.
    """
    message = refusal({"email": "anna@example.com", "deep": nested(levels)})

    assert "deep.level" in message
    assert f"nested more than {MAX_FIELD_DEPTH} levels deep" in message
    assert "bottom" not in message
    assert len(message) < 300


def test_nesting_up_to_the_limit_is_written() -> None:
    """A field nested exactly MAX_FIELD_DEPTH levels (counting itself) is built and valid."""
    contact = build_contact(1, "Member", {"email": "a@example.com", "deep": nested(15)})

    check_contact(contact)
    assert ["email", "deep"] == child_names(contact.element)


@pytest.mark.parametrize(
    "fields",
    [
        {"email": "anna@example.com", "note": "SecretValue" * 1_000_000},
        {"email": "anna@example.com", "notes": ["SecretValue"] * 1_000_000},
        {"email": "anna@example.com", "notes": {f"n{i}": "SecretValue" for i in range(200_000)}},
    ],
    ids=["11-MB-value", "million-items", "huge-mapping"],
)
def test_a_contact_larger_than_the_bound_is_refused(fields: dict[str, Any]) -> None:
    """A contact holding more than MAX_CONTACT_SIZE of text, or so many fields that their
    elements would, is an XmlContentError that names no value.
    """
    message = refusal(fields)

    assert f"larger than {MAX_CONTACT_SIZE // 1024} KiB" in message
    assert "SecretValue" not in message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"email": "anna@example.com", "note": "Secret\ud800Value"}, "note"),
        ({"email": "anna@example.com", "note": "Secret\x00Value"}, "note"),
        ({"email": "anna@example.com", "note\ud800": "SecretValue"}, "note\\ud800"),
        ({"email": "anna@example.com", "bad\x00name": "SecretValue"}, "bad\\x00name"),
        ({"email": "anna@example.com", "k" * 10_000 + " x": "SecretValue"}, "k" * 80 + "..."),
    ],
    ids=["lone-surrogate", "nul", "surrogate-in-name", "nul-in-name", "10k-name"],
)
def test_a_value_or_name_xml_cannot_carry_is_refused_with_a_storable_reason(
    fields: dict[str, Any], named: str
) -> None:
    """A lone surrogate or NUL, in a value or a name, is an XmlContentError whose message
    shows the field escaped and cut short (it must be storable as UTF-8 in the dead letter),
    never the value.
    """
    message = refusal(fields)

    assert named in message
    assert "Secret" not in message


@pytest.mark.parametrize("body", [["a", "list"], "text", 42])
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    """A row whose body is not an object of fields is an XmlContentError, not a TypeError."""
    message = refusal(body)

    assert "not an object of fields" in message


def test_an_integer_too_long_to_print_is_refused() -> None:
    """An integer Python refuses to turn into text (over 4300 digits) is an XmlContentError
    naming the field.
    """
    message = refusal({"email": "anna@example.com", "points": 10**5000})

    assert "points" in message


def test_a_contact_type_with_a_lone_surrogate_is_refused_storably() -> None:
    """A contact type that is no XML name is refused with a message that can be stored."""
    with pytest.raises(XmlContentError) as info:
        build_contact(1, "Vip\ud800", {"email": "anna@example.com"})

    assert "Vip\\ud800" in str(info.value)
    str(info.value).encode()


# --- creates and updates apart ------------------------------------------------------------------


def test_render_refuses_a_file_mixing_creates_and_updates() -> None:
    """Creates and updates never share a file: render refuses a mix (contactId on some)."""
    mixed = [member(1), build_contact(2, "Member", {"firstName": "Bo"}, contact_id=GUID)]

    with pytest.raises(XmlContentError, match="contactId is on 1 of 2 contacts"):
        render(mixed)


def test_validate_file_reports_a_file_mixing_creates_and_updates(tmp_path: Path) -> None:
    """A file where some contacts carry contactId and others do not is reported: the XSD
    cannot say it (XSD 1.0), validate_file does. A file of creates only, or of updates only,
    passes.
    """
    mixed = tmp_path / "mixed.xml"
    mixed.write_bytes(
        document(
            "<member><email>anna@example.com</email></member>"
            f"<member><contactId>{GUID}</contactId><firstName>Bo</firstName></member>"
        )
    )
    creates = tmp_path / "creates.xml"
    creates.write_bytes(document("<member><email>anna@example.com</email></member>" * 2))
    updates = tmp_path / "updates.xml"
    updates.write_bytes(
        document(f"<member><contactId>{GUID}</contactId><firstName>Bo</firstName></member>" * 2)
    )

    problems = validate_file(mixed)

    assert 1 == len(problems)
    assert "never both" in problems[0]
    assert ([], []) == (validate_file(creates), validate_file(updates))


# --- avoidTriggeringExport --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("contact", "qualifies"),
    [
        (build_contact(1, "Member", {"bonusLevel": 2, "vip": True}, contact_id=GUID), True),
        (build_contact(1, "Member", {"bonusLevel": 2, "firstName": "A"}, contact_id=GUID), False),
        (
            build_contact(1, "Member", {"preferences": {"acceptsSms": True}}, contact_id=GUID),
            False,
        ),
        (build_contact(1, "Member", {"bonusLevel": 2, "email": "a@example.com"}), False),
        (build_contact(1, "Member", {"bonusLevel": 2}), False),
    ],
    ids=["custom-only", "first-name", "preferences", "create-with-email", "create-custom"],
)
def test_only_custom_fields(contact: XmlContact, qualifies: bool) -> None:
    """A contact qualifies for avoidTriggeringExport only with a contactId and non-standard
    fields: a standard field (firstName, preferences) or no contactId (a create) spoils it.
    """
    assert qualifies == only_custom_fields(contact)


def test_render_sets_avoid_triggering_export_on_the_root() -> None:
    """render(avoid_triggering_export=True) writes avoidTriggeringExport="true" on the root."""
    contact = build_contact(1, "Member", {"bonusLevel": 2}, contact_id=GUID)

    with_flag = etree.fromstring(render([contact], avoid_triggering_export=True))
    without = etree.fromstring(render([contact]))

    assert ("true", None) == (
        with_flag.get("avoidTriggeringExport"),
        without.get("avoidTriggeringExport"),
    )


def test_avoid_triggering_export_on_a_standard_field_is_refused(tmp_path: Path) -> None:
    """A file carrying avoidTriggeringExport with a standard field in it, which Engage fails
    whole, is refused by render and reported by validate_file.
    """
    contact = build_contact(1, "Member", {"firstName": "Anna"}, contact_id=GUID)
    path = tmp_path / "contacts.xml"
    path.write_bytes(
        document(
            f"<member><contactId>{GUID}</contactId><firstName>Anna</firstName></member>"
        ).replace(b"<contacts ", b'<contacts avoidTriggeringExport="true" ')
    )

    with pytest.raises(XmlContentError, match="avoidTriggeringExport"):
        render([contact], avoid_triggering_export=True)
    assert any("avoidTriggeringExport" in problem for problem in validate_file(path))


# --- permissions --------------------------------------------------------------------------------


@pytest.fixture(name="umask", params=[0o000, 0o022, 0o077])
def umask_fixture(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process umask set to each value for the test, and restored after it."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_0600_and_directories_0700_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Import files hold personal data: each is 0600 and the xml_dir (and any parent it had
    to create) 0700, whatever the umask.
    """
    directory = tmp_path / "spool" / "xml"

    path = write_file(directory, [member()], now=NOW)

    assert (0o600, 0o700, 0o700) == (mode(path), mode(directory), mode(directory.parent))


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    """An xml_dir that exists is its owner's: its mode is left as it was."""
    directory = tmp_path / "xml"
    directory.mkdir()
    directory.chmod(0o750)

    path = write_file(directory, [member()], now=NOW)

    assert (0o600, 0o750) == (mode(path), mode(directory))


# --- names: never one used in sent/ -------------------------------------------------------------


def test_write_file_skips_names_already_used_in_sent(tmp_path: Path) -> None:
    """A name the uploader already sent (in sent/) is never used again, so two files never
    share a name on Engage's server.
    """
    sent = tmp_path / "sent"
    sent.mkdir()
    (sent / f"{STAMP}_1_contacts.xml").write_bytes(b"uploaded before")
    (sent / f"{STAMP}_2_contacts.xml").write_bytes(b"uploaded before")

    path = write_file(tmp_path, [member()], now=NOW)

    assert f"{STAMP}_3_contacts.xml" == path.name


def test_place_counts_the_same_bytes_as_written_and_refuses_others(tmp_path: Path) -> None:
    """place() links new bytes into place; the same bytes already there (the file written
    before a crash) count as written, and a different file under the name is left alone.
    """
    name = f"{STAMP}_1_contacts.xml"
    data = render([member()])

    first = place(tmp_path, name, data)
    again = place(tmp_path, name, data)
    other = place(tmp_path, name, render([member(2, firstName="Bo")]))

    assert (tmp_path / name, tmp_path / name, None) == (first, again, other)
    assert data == (tmp_path / name).read_bytes()


def test_find_written_finds_a_file_the_uploader_moved_or_renamed(tmp_path: Path) -> None:
    """A planned file is found by its bytes where the uploader put it: in sent/, even under
    a later sequence of its timestamp; another file's bytes are not taken for it, nor the
    same bytes under an earlier sequence (an earlier, identical change).
    """
    data = render([member()])
    (tmp_path / "sent").mkdir()
    (tmp_path / "sent" / f"{STAMP}_3_contacts.xml").write_bytes(data)
    (tmp_path / f"{STAMP}_2_contacts.xml").write_bytes(b"another file")
    (tmp_path / "sent" / f"{STAMP}_1_contacts.xml").write_bytes(data)

    found = find_written(tmp_path, f"{STAMP}_2_contacts.xml", digest(data))
    missing = find_written(tmp_path, f"{STAMP}_2_contacts.xml", digest(b"not written"))
    not_earlier = find_written(tmp_path, f"{STAMP}_4_contacts.xml", digest(data))

    assert (tmp_path / "sent" / f"{STAMP}_3_contacts.xml", None, None) == (
        found,
        missing,
        not_earlier,
    )
