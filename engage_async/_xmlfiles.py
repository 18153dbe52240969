"""Contact XML import files: Engage's file-based fallback when the API cannot take writes.

Files follow Voyado's contact import: UTF-8, named ``YYYYMMDDHHmmss_<seq>_contacts.xml``
(UTC timestamp; the sequence keeps several writers apart), at most 20,000 contacts each. Every
contact, create or update, sits under ``<new>`` in an element named after its contact type
with the first letter lower-cased (``Member`` -> ``<member>``); an update carries
``<contactId>`` as its key. Each contact is checked against the XSD in ``fallback_schemas/``
on its own, so one bad contact is set aside instead of spoiling a file, and the whole file is
checked again before it is written: atomically, through a temporary file, fsync and a link
that never overwrites an existing file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final

import attrs
from lxml import etree

__all__ = [
    "MAX_CONTACTS_PER_FILE",
    "NAMESPACE",
    "XmlContact",
    "build_contact",
    "check_contact",
    "schema_path",
    "validate_file",
    "write_file",
]

NAMESPACE: Final = "http://eClub.Schemas.ImportContact"
MAX_CONTACTS_PER_FILE: Final = 20_000
SCHEMA_FILE: Final = "contacts-import.xsd"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_DATETIME_FIELDS: Final = frozenset({"date"})


class XmlContentError(ValueError):
    """A change cannot be written as a valid import contact; the message says why."""


@attrs.frozen
class XmlContact:
    """One contact element, ready to go into a file, and the outbox row it came from."""

    seq: int
    element: etree._Element = attrs.field(repr=False)


def schema_path() -> Path:
    """Where the XSD is: inside the installed package, else in the source tree's top level."""
    packaged = resources.files("engage_async") / "fallback_schemas" / SCHEMA_FILE
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "fallback_schemas" / SCHEMA_FILE


@functools.cache
def _schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(schema_path())))


def _tag(name: str) -> str:
    return f"{{{NAMESPACE}}}{name}"


def element_name(contact_type: str) -> str:
    """``Member`` -> ``member``: the element a contact of that type is written as."""
    name = contact_type[:1].lower() + contact_type[1:]
    if not _NAME.fullmatch(name):
        raise XmlContentError(f"contact type {contact_type!r} is not a valid XML element name")
    return name


def _singular(name: str) -> str:
    return name[:-1] if name.endswith("s") and len(name) > 1 else "item"


def _text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if name in _DATETIME_FIELDS and isinstance(value, str):
        # Engage's own examples write offsets as +0100; XML Schema wants +01:00.
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value).isoformat()
    return str(value)


def _append(parent: etree._Element, name: str, value: Any, path: str) -> None:
    if not _NAME.fullmatch(name):
        raise XmlContentError(f"{path}: not a valid XML element name")
    child = etree.SubElement(parent, _tag(name))
    if value is None:
        return  # an empty element: the field is cleared
    if isinstance(value, Mapping):
        for key, item in value.items():
            _append(child, str(key), item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        item_name = _singular(name)
        for index, item in enumerate(value):
            _append(child, item_name, item, f"{path}[{index}]")
    else:
        try:
            child.text = _text(name, value)
        except ValueError as exc:  # lxml refuses control characters and NUL
            raise XmlContentError(f"{path}: holds a character XML cannot carry") from exc


def build_contact(
    seq: int, contact_type: str, fields: Mapping[str, Any], *, contact_id: str | None = None
) -> XmlContact:
    """The element for one create (no `contact_id`) or update (keyed by `contact_id`).

    Raises:
        XmlContentError: a field name or value cannot be written as valid import XML.
    """
    element = etree.Element(
        _tag(element_name(contact_type)),
        nsmap={None: NAMESPACE},  # type: ignore[dict-item]
    )
    if contact_id is not None:
        _append(element, "contactId", contact_id, "contactId")
    for name, value in fields.items():
        if name in {"contactType", "contactId"}:
            continue
        _append(element, name, value, name)
    return XmlContact(seq, element)


def check_contact(contact: XmlContact) -> None:
    """Validate one contact alone, in a document of its own.

    Raises:
        XmlContentError: the schema's first complaint about it (names no values).
    """
    problems = _problems(_document([contact]))
    if problems:
        raise XmlContentError(problems[0])


def _problems(document: etree._Element | etree._ElementTree) -> list[str]:
    """What the schema finds wrong with `document`, values left out."""
    schema = _schema()
    if schema.validate(document):
        return []
    # lxml-stubs do not describe the error log's entries.
    log: Any = schema.error_log
    return [f"line {entry.line}: {_without_values(entry.message)}" for entry in log]


def _without_values(message: str) -> str:
    """Drop the quoted value from an lxml message: it may be personal data.

    The value may hold quotes itself (O'Neill), so everything up to the last "' is not" goes.
    """
    return re.sub(
        r"(The value |: )'.*' is not", r"\1[value hidden] is not", message, flags=re.DOTALL
    )


def _document(contacts: Iterable[XmlContact]) -> etree._Element:
    root = etree.Element(_tag("contacts"), nsmap={None: NAMESPACE})  # type: ignore[dict-item]
    new = etree.SubElement(root, _tag("new"))
    for contact in contacts:
        new.append(_copy(contact.element))
    return root


def _copy(element: etree._Element) -> etree._Element:
    # lxml moves an element appended elsewhere; a copy keeps XmlContact reusable.
    return etree.fromstring(etree.tostring(element))


def write_file(
    directory: Path, contacts: Sequence[XmlContact], *, now: datetime | None = None
) -> Path:
    """Write `contacts` (at most 20,000) to a new import file in `directory`; its path.

    The file appears complete or not at all, and never replaces another file.

    Raises:
        ValueError: no contacts, or too many.
        XmlContentError: the document does not validate (a bug: contacts are checked first).
        OSError: the directory cannot be written.
    """
    if not contacts or len(contacts) > MAX_CONTACTS_PER_FILE:
        raise ValueError(f"a file holds 1 to {MAX_CONTACTS_PER_FILE} contacts")
    document = _document(contacts)
    problems = _problems(document)
    if problems:
        raise XmlContentError("; ".join(problems[:5]))
    data = etree.tostring(document, xml_declaration=True, encoding="utf-8", pretty_print=True)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M%S")
    temporary = directory / f".{stamp}_{os.getpid()}_{id(document)}.tmp"
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        sequence = 1
        while True:
            final = directory / f"{stamp}_{sequence}_contacts.xml"
            try:
                os.link(temporary, final)  # fails if the name is taken, unlike a rename
            except FileExistsError:
                sequence += 1
                continue
            break
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(directory)
    return final


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def validate_file(path: Path) -> list[str]:
    """The schema's complaints about an import file (empty when it is valid)."""
    try:
        document = etree.parse(str(path))
    except (OSError, etree.XMLSyntaxError) as exc:
        return [f"{path.name}: cannot be read as XML ({type(exc).__name__})"]
    return _problems(document)
