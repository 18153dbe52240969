"""Reading a contact overview on demand: each part is typed when it is first used.

A full overview (attributes, consents, vouchers, promotions ...) costs about 100 µs to turn
into models, as much as the rest of a `contact_overview` call's own work; most callers use a
part or two. `read_overview` checks the answer's shape at once, so a malformed answer still
fails in the call, and builds a `ContactOverview` whose parts are read from `.raw` on first
access (then kept). It is a `ContactOverview` in every way a caller can tell: isinstance,
equality with an eagerly built one, repr, hash, evolve and pickle.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ._models import ContactOverview
from ._wire import camel, structure, structure_part

__all__ = ["read_overview"]

# part name -> (its key in the JSON, its type, the JSON shape that types without surprises)
_PARTS: Final[dict[str, tuple[str, Any, str]]] = {}


def _shape(kind: Any) -> str:
    """The JSON shape a part of this type takes: object, objects, list or any."""
    args = [a for a in typing.get_args(kind) if a is not type(None) and a is not Ellipsis]
    origin = typing.get_origin(kind)
    if attrs.has(kind):
        return "object"
    if origin is tuple and args:
        return "objects" if attrs.has(args[0]) else "list"
    if len(args) == 1 and attrs.has(args[0]):  # X | None
        return "object"
    return "any"


def _fits(value: Any, shape: str) -> bool:
    if value is None or shape == "any":
        return True
    if shape == "object":
        return type(value) is dict
    if type(value) is not list:
        return False
    return shape == "list" or all(type(item) is dict for item in value)


class _OnDemandOverview(ContactOverview):
    """A ContactOverview whose unset parts are typed from `raw` when first read."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails: for a part not read yet.
        part = _PARTS.get(name)
        if part is None:
            raise AttributeError(name)
        key, kind, _ = part
        value = structure_part(self.raw.get(key), kind, f"ContactOverview.{name}")
        object.__setattr__(self, name, value)
        return value

    def __eq__(self, other: object) -> bool:
        # attrs' __eq__ wants the very same class; this one equals any ContactOverview with
        # the same parts.
        if not isinstance(other, ContactOverview):
            return NotImplemented
        return all(
            getattr(self, field.name) == getattr(other, field.name)
            for field in attrs.fields(ContactOverview)
            if field.eq
        )

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = ContactOverview.__hash__

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickled as a plain ContactOverview, every part typed.
        return (
            ContactOverview,
            tuple(getattr(self, f.name) for f in attrs.fields(ContactOverview)),
        )


# attrs' repr prints the class's name: the caller sees a ContactOverview.
_OnDemandOverview.__name__ = _OnDemandOverview.__qualname__ = "ContactOverview"

attrs.resolve_types(ContactOverview)  # the fields' types, not their annotation strings
for _field in attrs.fields(ContactOverview):
    if _field.name not in {"id", "raw"}:
        _PARTS[_field.name] = (camel(_field.name), _field.type, _shape(_field.type))


def read_overview(data: Any) -> ContactOverview:
    """A `ContactOverview` from Engage's JSON, its parts typed on first use.

    Raises:
        UnexpectedResponse: the answer is not an overview (no object, no id, a part of the
            wrong kind).
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("id"), str):
        return structure(data, ContactOverview)  # raises, saying what is wrong
    if not all(_fits(data.get(key), shape) for key, _, shape in _PARTS.values()):
        return structure(data, ContactOverview)  # typed now: an odd shape fails in the call
    overview = object.__new__(_OnDemandOverview)
    object.__setattr__(overview, "id", data["id"])
    object.__setattr__(overview, "raw", data)
    return overview
