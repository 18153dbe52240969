"""Engage's wire format: camelCase JSON to models, and payloads guarded before they are sent.

One cattrs converter, built by `make_converter`, maps every model field ``snake_case`` <->
``camelCase``. It is tolerant, as Engage asks clients to be: unknown keys are ignored, a
``null`` where an object or a list belongs reads as empty, and a date it cannot parse reads as
None (the original stays in `.raw`).

The payload guard (`prepare_payload`) enforces Engage's rule that an update carries only what
changes: a None or "" anywhere in a payload would overwrite data, so it raises
`EmptyValueError` naming the field; `CLEAR` clears a field on purpose. It also holds every
payload to `MAX_DEPTH`, `MAX_VALUE_BYTES` and `MAX_PAYLOAD_BYTES`, and to text that both JSON
and XML 1.0 can carry, so a payload it passes can be sent, queued and written to an import
file alike.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from typing import Any, Final, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ._errors import EmptyValueError, PayloadError, UnexpectedResponse

__all__ = [
    "CLEAR",
    "MAX_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "MAX_VALUE_BYTES",
    "Clear",
    "camel",
    "check_text",
    "contact_id_from_engage",
    "converter",
    "is_contact_id",
    "make_converter",
    "normalize_contact_id",
    "prepare_payload",
    "structure",
    "structure_part",
]

T = TypeVar("T")

_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_BIRTH_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")

# Engage's contacts are flat with a few nested parts (consents[i].id is three levels, counting
# the payload itself); 8 leaves room for tenants' own objects and keeps the guard's recursion,
# and every later json.dumps or copy, far from Python's recursion limit.
MAX_DEPTH: Final = 8
# Engage documents no field lengths; its fields are names, addresses, codes and short free
# text. 16 KiB (UTF-8) is dozens of times the longest of those, yet refuses a file or an image
# pasted into a field before it is queued and replayed 4000 to a bulk request.
MAX_VALUE_BYTES: Final = 16 * 1024
# A rich contact is about 2 KiB as JSON; 64 KiB is 30 times that, and keeps one contact a
# small part of a bulk request or an XML file (4000 and 20000 contacts), which hold them all.
MAX_PAYLOAD_BYTES: Final = 64 * 1024
# What XML 1.0 cannot carry: C0 controls but tab, LF and CR; lone surrogates (not text at all,
# UTF-8 cannot encode them); U+FFFE, U+FFFF. JSON could send the controls, but a queued change
# may go to an XML import file, so the call refuses them rather than the fallback, later.
_NOT_XML = "\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff"
_FORBIDDEN = re.compile(f"[{_NOT_XML}]")
# Compact JSON writes these as two characters (\" \\ \t \n \r); the other C0 controls it would
# escape are refused above. One search for both sets keeps plain text at one regex call.
_ESCAPED = re.compile(r'["\\\t\n\r]')
_SPECIAL = re.compile(f'["\\\\\t\n\r{_NOT_XML}]')


class Clear:
    """The type of `CLEAR`, the one value that clears a field on Engage."""

    _instance: Clear | None = None

    def __new__(cls) -> Clear:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CLEAR"

    def __reduce__(self) -> str:
        return "CLEAR"


CLEAR: Final = Clear()


def camel(name: str) -> str:
    """``reward_vouchers`` -> ``rewardVouchers``."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _parse_datetime(value: Any, _: type) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _parse_date(value: Any, _: type) -> date | None:
    if isinstance(value, date):
        return value
    if not isinstance(value, str):
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def _passthrough(value: Any, _: type) -> Any:
    return value


_TRUE_WORDS = frozenset({"true", "yes", "1"})
_FALSE_WORDS = frozenset({"false", "no", "0"})


def _lenient_bool(value: Any, _: type) -> bool | None:
    # bool("false") is True: read words as words, and give up (None) on anything else.
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def _lenient_int(value: Any, _: type) -> int | None:
    # One odd field (an "age" of "unknown") must not make a whole contact unreadable.
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _lenient_float(value: Any, _: type) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_homogeneous_tuple(kind: Any) -> bool:
    args = typing.get_args(kind)
    return typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis


def _is_scalar_union(kind: Any) -> bool:
    """``str | float | None`` and friends: Engage sends either, so keep what it sent."""
    if typing.get_origin(kind) not in {typing.Union, types.UnionType}:
        return False
    members = {a for a in typing.get_args(kind) if a is not type(None)}
    return len(members) > 1 and members <= {str, int, float, bool}


def _is_optional(kind: Any) -> bool:
    """``X | None`` for a single X."""
    if typing.get_origin(kind) not in {typing.Union, types.UnionType}:
        return False
    args = typing.get_args(kind)
    return len(args) == 2 and type(None) in args


def _renames(cls: type, **hooks: Any) -> dict[str, Any]:
    """cattrs overrides for a model: camelCase names, and `raw` never written back."""
    return {
        f.name: override(omit=True) if f.name == "raw" else override(rename=camel(f.name), **hooks)
        for f in attrs.fields(cls)
    }


def make_converter(*, detailed_validation: bool = False) -> cattrs.Converter:
    """Build the converter for Engage's JSON (never the global cattrs one).

    Without `detailed_validation` (the default, for speed: it is most of a read's cost) an
    error says less about where it is; `structure` then reads the answer again with a
    detailed converter to say where.
    """
    conv = cattrs.Converter(detailed_validation=detailed_validation)
    conv.register_structure_hook(datetime, _parse_datetime)
    conv.register_structure_hook(date, _parse_date)
    conv.register_structure_hook(bool, _lenient_bool)
    conv.register_structure_hook(int, _lenient_int)
    conv.register_structure_hook(float, _lenient_float)
    conv.register_unstructure_hook(datetime, datetime.isoformat)
    conv.register_unstructure_hook(date, date.isoformat)
    conv.register_structure_hook_func(_is_scalar_union, _passthrough)
    conv.register_structure_hook_func(lambda kind: kind == Mapping[str, Any], _passthrough)

    def tuple_hook(kind: Any) -> Callable[[Any, Any], tuple[Any, ...]]:
        item = typing.get_args(kind)[0]
        handler = conv.get_structure_hook(item)

        def structure_tuple(value: Any, _: Any) -> tuple[Any, ...]:
            if value is None:
                return ()
            if type(value) is not list and isinstance(value, str | bytes | Mapping):
                value = [value]
            return tuple(handler(element, item) for element in value)

        return structure_tuple

    conv.register_structure_hook_factory(_is_homogeneous_tuple, tuple_hook)

    def optional_hook(kind: Any) -> Callable[[Any, Any], Any]:
        # cattrs' own Optional handling dispatches on every value; resolving the inner hook
        # once is a large share of a ContactOverview's reading time.
        inner = next(a for a in typing.get_args(kind) if a is not type(None))
        handler = conv.get_structure_hook(inner)

        def structure_optional(value: Any, _: Any) -> Any:
            return None if value is None else handler(value, inner)

        return structure_optional

    conv.register_structure_hook_factory(_is_optional, optional_hook)

    def structure_hook(cls: type) -> Callable[[Any, Any], Any]:
        build: Callable[[Any, Any], Any] = make_dict_structure_fn(cls, conv, **_renames(cls))
        keeps_raw = any(f.name == "raw" for f in attrs.fields(cls))

        def structure_model(value: Any, kind: Any) -> Any:
            if value is None:
                value = {}
            # `type(...) is dict` first: JSON gives dicts, and the ABC check costs more.
            if type(value) is not dict and not isinstance(value, Mapping):
                raise TypeError(f"expected a JSON object, got {type(value).__name__}")
            model = build(value, kind)
            if keeps_raw:
                object.__setattr__(model, "raw", value)
            return model

        return structure_model

    def unstructure_hook(cls: type) -> Callable[[Any], dict[str, Any]]:
        return make_dict_unstructure_fn(
            cls,
            conv,
            _cattrs_omit_if_default=True,
            **_renames(cls),
        )

    conv.register_structure_hook_factory(attrs.has, structure_hook)
    conv.register_unstructure_hook_factory(attrs.has, unstructure_hook)
    return conv


converter: Final = make_converter()
_detailed_converter: cattrs.Converter | None = None


def structure(data: Any, kind: type[T]) -> T:
    """Read Engage JSON into a model, turning cattrs' errors into `UnexpectedResponse`."""
    result: T = structure_part(data, kind, kind.__name__)
    return result


def structure_part(data: Any, kind: Any, what: str) -> Any:
    """Read Engage JSON into `kind` (a model, a tuple of them, ...); `what` names it in the
    `UnexpectedResponse` raised when it cannot be read.
    """
    try:
        return converter.structure(data, kind)
    except Exception:
        problems = _problems_reading(data, kind)
    raise UnexpectedResponse(f"could not read {what} from Engage's answer: {problems}")


def _problems_reading(data: Any, kind: Any) -> str:
    """Read `data` again with detailed validation, for a message that says where it failed."""
    global _detailed_converter  # noqa: PLW0603 - built on the first unreadable answer only
    if _detailed_converter is None:
        _detailed_converter = make_converter(detailed_validation=True)
    try:
        _detailed_converter.structure(data, kind)
    except Exception as exc:
        return "; ".join(cattrs.transform_error(exc)) or str(exc)
    return "an inconsistent answer"


def is_contact_id(value: object) -> bool:
    """Is `value` shaped like an Engage contact id (a GUID, any letter case)?"""
    return isinstance(value, str) and bool(_GUID.fullmatch(value))


def normalize_contact_id(value: object, field: str = "contact_id") -> str:
    """Check that `value` is a contact GUID and return it in lower case.

    Engage's ids are 8-4-4-4-12 hex strings; the version bits are not checked because real ids
    are not RFC 4122 version 4.

    Raises:
        TypeError: not a string.
        ValueError: not shaped like a GUID (the value is not repeated; it may be personal data).
    """
    if not isinstance(value, str):
        raise TypeError(f"{field}: must be a str, not {type(value).__name__}")
    if not is_contact_id(value):
        raise ValueError(f"{field}: not a contact id (expected a GUID such as 2e40b702-...)")
    return value.lower()


def contact_id_from_engage(value: object) -> str:
    """A GUID Engage sent, normalised; anything else is Engage's answer being unreadable.

    Raises:
        UnexpectedResponse: `value` is not a GUID.
    """
    if not isinstance(value, str) or not _GUID.fullmatch(value.strip().strip('"')):
        raise UnexpectedResponse("Engage's answer holds no contact id (a GUID) where one belongs")
    return value.strip().strip('"').lower()


def prepare_payload(payload: object, field: str) -> dict[str, Any]:
    """Check a create or update payload and return its wire form (a new dict).

    `payload` is a mapping of Engage attribute names, or an attrs model such as
    `ContactAttributes` (whose None fields are simply not sent). Nothing is sent or queued
    unless this passes, so every check here happens before any request.

    Raises:
        TypeError: `payload` is neither a mapping nor a model, or a key is not a str.
        EmptyValueError: a None or "" value, at any depth.
        PayloadError: nested deeper than `MAX_DEPTH`; a name or value longer than
            `MAX_VALUE_BYTES` or holding a character XML cannot carry (a control character
            but tab, LF and CR; a lone surrogate; U+FFFE, U+FFFF); the whole larger than
            `MAX_PAYLOAD_BYTES` as JSON; ``birthDay`` not YYYY-MM-DD; a consent without
            ``id`` or ``value``; a value that cannot be sent as JSON. The field is named by
            its path (``attributes.consents[1].value``); the value is never repeated.
    """
    if attrs.has(type(payload)):
        payload = _model_fields(payload)
    if not isinstance(payload, Mapping):
        raise TypeError(f"{field}: must be a mapping of Engage attribute names")
    wire = _Walk(field).mapping(payload, field, 1)
    _check_known_fields(wire, field)
    return wire


def check_text(value: str, field: str) -> str:
    """Hold one text argument (a contact type, a source) to the payload's rules for text.

    Raises:
        PayloadError: longer than `MAX_VALUE_BYTES` or holding a character XML cannot carry.
    """
    _text_size(value, field, "")
    return value


def _shallow_unstructure_hook(cls: type) -> Callable[[Any], dict[str, Any]]:
    # The converter's own renames and omit-if-default, but field values left as they are, so
    # the guard walks them itself under its depth limit (cattrs would recurse without one).
    return make_dict_unstructure_fn(
        cls,
        _shallow,
        _cattrs_omit_if_default=True,
        **_renames(cls, unstruct_hook=_same),
    )


def _same(value: Any) -> Any:
    return value


_shallow: Final = cattrs.Converter()
_shallow.register_unstructure_hook_factory(attrs.has, _shallow_unstructure_hook)


def _model_fields(model: Any) -> dict[str, Any]:
    """A model's wire names and unconverted values, one level only."""
    fields: dict[str, Any] = _shallow.unstructure(model)
    return fields


def _why_not(character: str) -> str:
    if "\ud800" <= character <= "\udfff":
        return "holds a lone surrogate, which is not text (undecoded bytes?)"
    return f"holds U+{ord(character):04X}, a character XML cannot carry"


def _text_size(text: str, path: str, what: str) -> int:
    """The bytes `text` takes as a JSON string, once checked (`what` prefixes the reason)."""
    if len(text) > MAX_VALUE_BYTES:  # checked first: the scans below would read all of it
        raise PayloadError(path, f"{what}is longer than {MAX_VALUE_BYTES // 1024} KiB")
    escapes = 0
    if _SPECIAL.search(text) is not None:
        bad = _FORBIDDEN.search(text)
        if bad is not None:
            raise PayloadError(path, what + _why_not(bad.group()))
        escapes = len(_ESCAPED.findall(text))
    size = len(text) if text.isascii() else len(text.encode())
    if size > MAX_VALUE_BYTES:
        raise PayloadError(path, f"{what}is longer than {MAX_VALUE_BYTES // 1024} KiB")
    return size + escapes + 2


class _Walk:
    """One walk over a payload: builds the wire form and counts its compact JSON size.

    Recursion is bounded by `MAX_DEPTH`, and the size is checked after every item, so neither
    a deep nor a huge payload is walked to its end.
    """

    __slots__ = ("field", "size")

    def __init__(self, field: str) -> None:
        self.field = field
        self.size = 0

    def check_size(self) -> None:
        if self.size > MAX_PAYLOAD_BYTES:
            raise PayloadError(
                self.field, f"is larger than {MAX_PAYLOAD_BYTES // 1024} KiB as JSON"
            )

    def enter(self, path: str, depth: int, items: int) -> None:
        if depth > MAX_DEPTH:
            raise PayloadError(path, f"is nested more than {MAX_DEPTH} levels deep")
        self.size += max(items, 1) + 1  # brackets, and commas between items

    def mapping(self, payload: Mapping[Any, Any], path: str, depth: int) -> dict[str, Any]:
        self.enter(path, depth, len(payload))
        result: dict[str, Any] = {}
        for key, value in payload.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"{path}: keys must be non-empty str, got {type(key).__name__}")
            self.size += _text_size(key, path, "an attribute name ") + 1
            result[key] = self.value(value, f"{path}.{key}", depth)
            self.check_size()
        return result

    def sequence(self, items: Sequence[Any], path: str, depth: int) -> list[Any]:
        self.enter(path, depth, len(items))
        result: list[Any] = []
        for index, item in enumerate(items):
            result.append(self.value(item, f"{path}[{index}]", depth))
            self.check_size()
        return result

    def value(self, value: Any, path: str, depth: int) -> Any:
        # Most common types first: this runs for every value of every write.
        if isinstance(value, str):
            if not value.strip():
                raise _empty(path)
            self.size += _text_size(value, path, "")
            return value
        if isinstance(value, bool):
            self.size += 4 if value else 5
            return value
        if value is CLEAR:
            self.size += 4
            return None
        if value is None:
            raise _empty(path)
        if isinstance(value, int):
            try:
                digits = len(int.__repr__(value))
            except ValueError:  # more digits than Python will write (sys.int_info)
                digits = MAX_VALUE_BYTES + 1
            if digits > MAX_VALUE_BYTES:
                raise PayloadError(path, "is too large a number")
            self.size += digits
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise PayloadError(path, "must be a finite number")
            self.size += len(float.__repr__(value))
            return value
        return self.composite(value, path, depth)

    def composite(self, value: Any, path: str, depth: int) -> Any:
        if isinstance(value, datetime | date):
            text = value.isoformat()
            self.size += len(text) + 2
            return text
        if attrs.has(type(value)):
            return self.mapping(_model_fields(value), path, depth + 1)
        if isinstance(value, Mapping):
            if not value:
                raise _empty(path)
            return self.mapping(value, path, depth + 1)
        if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
            if not value:
                raise _empty(path)
            return self.sequence(value, path, depth + 1)
        raise PayloadError(path, f"cannot be sent as JSON ({type(value).__name__})")


def _empty(path: str) -> EmptyValueError:
    return EmptyValueError(
        path, "empty values overwrite data on Engage; leave the field out, or send CLEAR"
    )


def _check_known_fields(wire: Mapping[str, Any], field: str) -> None:
    birth_day = wire.get("birthDay")
    if birth_day is not None:
        if not isinstance(birth_day, str) or not _BIRTH_DAY.fullmatch(birth_day):
            raise PayloadError(f"{field}.birthDay", "must be a date written YYYY-MM-DD")
        try:
            date.fromisoformat(birth_day)
        except ValueError:
            raise PayloadError(f"{field}.birthDay", "is not a real date") from None
    consents = wire.get("consents")
    if consents is not None:
        if not isinstance(consents, list):
            raise PayloadError(f"{field}.consents", "must be a list of consents")
        for i, consent in enumerate(consents):
            where = f"{field}.consents[{i}]"
            if not isinstance(consent, Mapping):
                raise PayloadError(where, "must be an object with id and value")
            for required in ("id", "value"):
                if consent.get(required) is None:
                    raise PayloadError(f"{where}.{required}", "is required")
    preferences = wire.get("preferences")
    if preferences is not None and not isinstance(preferences, Mapping):
        raise PayloadError(f"{field}.preferences", "must be an object")
