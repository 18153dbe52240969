"""Contact XML import files: Engage's file-based fallback when the API cannot take writes.

Files follow Voyado's contact import: UTF-8, named ``YYYYMMDDHHmmss_<seq>_contacts.xml``
(UTC timestamp; the sequence keeps several writers apart), at most 20,000 contacts each. Every
contact sits under ``<new>`` in an element named after its contact type with the first letter
lower-cased (``Member`` -> ``<member>``). A file holds creates or updates, never both: once
one contact of a file carries ``<contactId>``, Engage keys the whole file by it, so creates
(keyed by their key attribute) and updates (keyed by ``<contactId>``) go into files of their
own.

A contact is built from whatever a queued row holds, so building is bounded (nesting depth and
size, without recursion) and every problem is an `XmlContentError` naming a field, never a
value. Each contact is checked against the XSD in ``fallback_schemas/`` on its own, so one bad
contact is set aside instead of spoiling a file, and the whole file is checked again before it
is written: through a temporary file (0600 whatever the umask), fsync, and a link that never
overwrites an existing file, in a directory created 0700. A name already used in ``sent/``
(where the SFTP uploader moves what it uploaded) is never used again.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
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
    "MAX_CONTACT_SIZE",
    "MAX_FIELD_DEPTH",
    "NAMESPACE",
    "SENT_DIR",
    "STANDARD_FIELDS",
    "XmlContact",
    "XmlContentError",
    "build_contact",
    "check_contact",
    "digest",
    "file_name",
    "find_written",
    "free_name",
    "fsync_directory",
    "make_directory",
    "only_custom_fields",
    "place",
    "render",
    "schema_path",
    "sequence_of",
    "stamp",
    "validate_file",
    "write_file",
]

NAMESPACE: Final = "http://eClub.Schemas.ImportContact"
MAX_CONTACTS_PER_FILE: Final = 20_000
SCHEMA_FILE: Final = "contacts-import.xsd"
# Where the SFTP uploader (`_sftp`) moves the files it uploaded.
SENT_DIR: Final = "sent"

# Engage's deepest field is consents[i].id (three levels); the payload guard allows 8. A row
# queued by an older version may hold anything, and libxml2 refuses documents nested deeper
# than 256 levels, so a contact nested deeper than this is set aside.
MAX_FIELD_DEPTH: Final = 16
# Characters of names and text in one contact (each element counts a few more). The payload
# guard keeps new changes to 64 KiB; this is 16 times that, and far below the 10 MB text node
# that libxml2 refuses to read back, so one contact can never make a file unreadable.
MAX_CONTACT_SIZE: Final = 1024 * 1024
_ELEMENT_COST: Final = 8

# Engage's standard contact fields: a file with `avoidTriggeringExport` may hold only a key
# and fields *not* on this list. Voyado publishes the list only as the attributes of a
# contact: these are the attributes of the contact and contact overview examples in
# /work/shared/seeds (000, 001, 003) and FakeEngage's STANDARD_ATTRIBUTES and flags
# (engage_async/testing/_fake_store.py), with the consent and preference parts, which are
# standard too. Listing a field here that Engage does not count as standard only costs the
# flag on a file; leaving one out would make Engage fail the whole import.
STANDARD_FIELDS: Final = frozenset(
    {
        "firstName",
        "lastName",
        "street",
        "zipCode",
        "city",
        "careOf",
        "country",
        "countryCode",
        "email",
        "mobilePhone",
        "socialSecurityNumber",
        "gender",
        "birthDay",
        "externalId",
        "memberNumber",
        "lang",
        "staff",
        "secrecyMarked",
        "children",
        "age",
        "rfm",
        "registrationDate",
        "currentStore",
        "preferences",
        "acceptsEmail",
        "acceptsSms",
        "acceptsPostal",
        "consents",
    }
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_FILE_NAME = re.compile(r"(?P<stamp>\d{14})_(?P<seq>\d+)_contacts(?:~\d+)?\.xml")
_DATETIME_FIELDS: Final = frozenset({"date"})
_SHOWN: Final = 80  # characters of a field path or contact type a message shows at most


class XmlContentError(ValueError):
    """A change cannot be written as a valid import contact; the message says why."""


@attrs.frozen
class XmlContact:
    """One contact element, ready to go into a file, and the outbox row it came from."""

    seq: int
    element: etree._Element = attrs.field(repr=False)

    @property
    def is_update(self) -> bool:
        """Keyed by ``<contactId>``: it belongs in an update file."""
        return self.element.find(_tag("contactId")) is not None


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


def _shown(text: str) -> str:
    """`text` (a field path, a contact type) safe for a message: control characters and
    lone surrogates escaped (a message must be storable and printable), long ones cut.
    """
    cut = text[:_SHOWN]
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return shown + "..." if len(text) > _SHOWN else shown


def element_name(contact_type: str) -> str:
    """``Member`` -> ``member``: the element a contact of that type is written as."""
    name = contact_type[:1].lower() + contact_type[1:]
    if not _NAME.fullmatch(name):
        raise XmlContentError(
            f"contact type '{_shown(contact_type)}' is not a valid XML element name"
        )
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


# Where a field is, kept as (parent, key) links and spelled out only for a message: most
# contacts never need it, and formatting every path was a third of building one.
_Where = tuple[Any, Any, bool] | None  # (parent's _Where, name or index, is an index)


def _path(where: _Where) -> str:
    parts: list[str] = []
    while where is not None:
        where, key, index = where
        parts.append(f"[{key}]" if index else f".{key}")
    return "".join(reversed(parts)).removeprefix(".")


def _fill(contact: etree._Element, fields: Sequence[tuple[str, Any]]) -> None:
    """Add `fields` under `contact`, depth first, without recursion and within the bounds.

    Raises:
        XmlContentError: a name that is no XML name, a value XML cannot carry, nesting deeper
            than `MAX_FIELD_DEPTH`, or more than `MAX_CONTACT_SIZE`.
    """
    size = 0
    too_big = f"the contact is larger than {MAX_CONTACT_SIZE // 1024} KiB of text"
    # (parent, name, value, where, depth), reversed so that popping keeps the fields' order.
    stack: list[tuple[etree._Element, Any, Any, _Where, int]] = [
        (contact, name, value, (None, name, False), 1) for name, value in reversed(fields)
    ]
    while stack:
        parent, name, value, where, depth = stack.pop()
        if depth > MAX_FIELD_DEPTH:
            raise XmlContentError(
                f"{_shown(_path(where))}: nested more than {MAX_FIELD_DEPTH} levels deep"
            )
        if type(name) is not str or not _NAME.fullmatch(name):
            raise XmlContentError(f"{_shown(_path(where))}: not a valid XML element name")
        size += len(name) + _ELEMENT_COST
        if size > MAX_CONTACT_SIZE:
            raise XmlContentError(too_big)
        child = etree.SubElement(parent, _tag(name))
        if value is None:
            continue  # an empty element: the field is cleared
        kind = type(value)
        if kind is dict or kind is list or kind is tuple or isinstance(value, Mapping):
            # Checked before the items are listed: each costs at least an element.
            if size + len(value) * _ELEMENT_COST > MAX_CONTACT_SIZE:
                raise XmlContentError(too_big)
            if kind is list or kind is tuple:
                singular = _singular(name)
                items = [(singular, item, (where, i, True)) for i, item in enumerate(value)]
            else:
                items = [(key, item, (where, key, False)) for key, item in value.items()]
            stack.extend((child, k, item, at, depth + 1) for k, item, at in reversed(items))
            continue
        if kind is str and size + len(value) > MAX_CONTACT_SIZE:
            raise XmlContentError(too_big)
        try:
            text = value if kind is str and name not in _DATETIME_FIELDS else _text(name, value)
        except ValueError as exc:  # an int too long to print, say
            raise XmlContentError(f"{_shown(_path(where))}: cannot be written as text") from exc
        size += len(text)
        if size > MAX_CONTACT_SIZE:
            raise XmlContentError(too_big)
        try:
            child.text = text
        except ValueError as exc:  # lxml refuses control characters, NUL, lone surrogates
            raise XmlContentError(
                f"{_shown(_path(where))}: holds a character XML cannot carry"
            ) from exc


def build_contact(
    seq: int, contact_type: str, fields: Mapping[str, Any], *, contact_id: str | None = None
) -> XmlContact:
    """The element for one create (no `contact_id`) or update (keyed by `contact_id`).

    Raises:
        XmlContentError: the fields are not a mapping, or a field name or value cannot be
            written as valid import XML, or the contact is nested or sized beyond the bounds.
    """
    if not isinstance(fields, Mapping):
        raise XmlContentError("the change's body is not an object of fields")
    element = etree.Element(
        _tag(element_name(contact_type)),
        nsmap={None: NAMESPACE},  # type: ignore[dict-item]
    )
    items: list[tuple[str, Any]] = []
    if contact_id is not None:
        items.append(("contactId", contact_id))
    items += [(k, v) for k, v in fields.items() if k not in {"contactType", "contactId"}]
    _fill(element, items)
    return XmlContact(seq, element)


def check_contact(contact: XmlContact) -> None:
    """Validate one contact alone, in a document of its own.

    Raises:
        XmlContentError: the schema's first complaint about it (names no values).
    """
    # The schema alone: the file rules cannot be broken by one contact.
    problems = _schema_problems(_document([contact]))
    if problems:
        raise XmlContentError(problems[0])


def only_custom_fields(contact: XmlContact) -> bool:
    """Does `contact` carry only its ``<contactId>`` and fields not on `STANDARD_FIELDS`?

    Only a file of such contacts may carry ``avoidTriggeringExport``; a create never does
    (it needs a key attribute, and Engage's ``InsertNewContacts`` cannot be combined with it).
    """
    names = [etree.QName(child).localname for child in contact.element]
    return names.count("contactId") == 1 and not any(name in STANDARD_FIELDS for name in names)


def _problems(document: etree._Element | etree._ElementTree) -> list[str]:
    """What the schema, and the file rules XSD 1.0 cannot say, find wrong with `document`,
    values left out.
    """
    return _schema_problems(document) or _file_rules(document)


def _schema_problems(document: etree._Element | etree._ElementTree) -> list[str]:
    schema = _schema()
    if schema.validate(document):
        return []
    # lxml-stubs do not describe the error log's entries.
    log: Any = schema.error_log
    return [f"line {entry.line}: {_without_values(entry.message)}" for entry in log]


def _file_rules(document: etree._Element | etree._ElementTree) -> list[str]:
    """The rules on a whole file that XSD 1.0 cannot express (its wildcards cannot look at
    their neighbours): creates and updates are never mixed, and ``avoidTriggeringExport``
    goes only on a file of contacts holding a contactId and non-standard fields.
    """
    root = document.getroot() if isinstance(document, etree._ElementTree) else document
    contacts = [XmlContact(0, element) for element in root.iterfind(f"{_tag('new')}/*")]
    keyed = sum(contact.is_update for contact in contacts)
    problems = []
    if 0 < keyed < len(contacts):
        problems.append(
            f"contactId is on {keyed} of {len(contacts)} contacts: a file holds creates "
            "(no contactId) or updates (each with contactId), never both"
        )
    if root.get("avoidTriggeringExport") in {"true", "1"} and not all(
        only_custom_fields(contact) for contact in contacts
    ):
        problems.append(
            "avoidTriggeringExport is set, but not every contact holds only a contactId "
            "and non-standard fields"
        )
    return problems


def _without_values(message: str) -> str:
    """Drop the quoted value from an lxml message: it may be personal data.

    The value may hold quotes itself (O'Neill), so everything up to the last "' is not" goes.
    """
    return re.sub(
        r"(The value |: )'.*' is not", r"\1[value hidden] is not", message, flags=re.DOTALL
    )


def _document(
    contacts: Iterable[XmlContact], *, avoid_triggering_export: bool = False
) -> etree._Element:
    root = etree.Element(_tag("contacts"), nsmap={None: NAMESPACE})  # type: ignore[dict-item]
    if avoid_triggering_export:
        root.set("avoidTriggeringExport", "true")
    new = etree.SubElement(root, _tag("new"))
    for contact in contacts:
        # A copy: lxml moves an element appended elsewhere, and an XmlContact stays reusable.
        new.append(copy.deepcopy(contact.element))
    return root


def render(contacts: Sequence[XmlContact], *, avoid_triggering_export: bool = False) -> bytes:
    """The bytes of an import file holding `contacts` (1 to 20,000), validated.

    Raises:
        ValueError: no contacts, or too many.
        XmlContentError: the document does not validate, or breaks a file rule (a bug:
            contacts are checked first, and creates and updates are kept apart).
    """
    if not contacts or len(contacts) > MAX_CONTACTS_PER_FILE:
        raise ValueError(f"a file holds 1 to {MAX_CONTACTS_PER_FILE} contacts")
    document = _document(contacts, avoid_triggering_export=avoid_triggering_export)
    problems = _problems(document)
    if problems:
        raise XmlContentError("; ".join(problems[:5]))
    return etree.tostring(document, xml_declaration=True, encoding="utf-8", pretty_print=True)


def digest(data: bytes) -> str:
    """What identifies a file's contents: the SHA-256 of its bytes, in hex."""
    return hashlib.sha256(data).hexdigest()


def stamp(now: datetime | None = None) -> str:
    """The timestamp part of a file name: `now` (default: the current time) in UTC."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M%S")


def file_name(stamp: str, sequence: int) -> str:
    """``<stamp>_<sequence>_contacts.xml``."""
    return f"{stamp}_{sequence}_contacts.xml"


def _taken(directory: Path, name: str) -> bool:
    # xml_dir first: the uploader moves a file from there to sent/, never back.
    return (directory / name).exists() or (directory / SENT_DIR / name).exists()


def free_name(directory: Path, stamp: str, *, after: int = 0) -> str:
    """The first name of `stamp` with a sequence above `after` used neither in `directory`
    nor in its ``sent/``, so two files never share a name on Engage's server.
    """
    sequence = after + 1
    while _taken(directory, file_name(stamp, sequence)):
        sequence += 1
    return file_name(stamp, sequence)


def sequence_of(name: str) -> int:
    """The sequence number in a file name (0 if it is not one of ours)."""
    match = _FILE_NAME.fullmatch(name)
    return int(match["seq"]) if match else 0


def make_directory(directory: Path) -> None:
    """Create `directory` and its missing parents 0700, whatever the umask; one that exists
    is left as it is (its owner chose its mode).
    """
    missing: list[Path] = []
    current = directory
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another writer made it meanwhile: theirs to set
        path.chmod(0o700)  # mkdir's mode is masked by the umask


def place(directory: Path, name: str, data: bytes) -> Path | None:
    """Write `data` as `directory/name` (0600); its path, or None when a different file has
    that name already (here or in ``sent/``).

    The file appears complete or not at all and never replaces another; one already there
    with the same bytes (this very file, written before a crash) counts as written.

    Raises:
        OSError: the directory cannot be written.
    """
    make_directory(directory)
    final = directory / name
    sent = directory / SENT_DIR / name
    if sent.exists():
        return sent if _holds(sent, data) else None
    temporary = directory / f".{name}.{os.getpid()}.{id(data)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # the mode given to open is masked by the umask
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, final)  # fails if the name is taken, unlike a rename
        except FileExistsError:
            return final if _holds(final, data) else None
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(directory)
    return final


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def find_written(directory: Path, name: str, file_digest: str) -> Path | None:
    """A file with the contents `file_digest` names, written under `name` or under a later
    sequence of its timestamp (the uploader renames a file whose name is taken on the server
    to the next free one), in `directory` or its ``sent/``; None if there is none.

    An earlier sequence is never taken for it: identical bytes there are an earlier change
    with the same contents (the same update made twice), which later changes to that contact
    may have overtaken since.
    """
    match = _FILE_NAME.fullmatch(name)
    if match is None:
        return None
    sequence = int(match["seq"])
    candidates = [directory / name, directory / SENT_DIR / name]
    for folder in (directory, directory / SENT_DIR):
        if folder.is_dir():
            candidates += sorted(
                path
                for path in folder.glob(f"{match['stamp']}_*_contacts*.xml")
                if sequence_of(path.name) >= sequence
            )
    for path in candidates:
        with contextlib.suppress(OSError):
            if path.is_file() and digest(path.read_bytes()) == file_digest:
                return path
    return None


def write_file(
    directory: Path,
    contacts: Sequence[XmlContact],
    *,
    now: datetime | None = None,
    avoid_triggering_export: bool = False,
) -> Path:
    """Write `contacts` (at most 20,000) to a new import file in `directory`; its path.

    The file appears complete or not at all, and never replaces another file nor takes a
    name used in ``sent/``.

    Raises:
        ValueError: no contacts, or too many.
        XmlContentError: the document does not validate (a bug: contacts are checked first).
        OSError: the directory cannot be written.
    """
    data = render(contacts, avoid_triggering_export=avoid_triggering_export)
    when = stamp(now)
    name = free_name(directory, when)
    while (path := place(directory, name, data)) is None:
        name = free_name(directory, when, after=sequence_of(name))
    return path


def fsync_directory(directory: Path) -> None:
    """Make a name created, renamed or removed in `directory` survive a power cut (best
    effort: a file system that cannot sync a directory is left to its own journal).
    """
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def validate_file(path: Path) -> list[str]:
    """The schema's complaints about an import file, and the file rules it breaks (a mix of
    creates and updates; avoidTriggeringExport on contacts that do not qualify); empty when
    it is valid.
    """
    try:
        document = etree.parse(str(path))
    except (OSError, etree.XMLSyntaxError) as exc:
        return [f"{path.name}: cannot be read as XML ({type(exc).__name__})"]
    return _problems(document)
