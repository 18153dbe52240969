"""Which attribute identifies a contact, and how keys are written in the outbox.

Engage looks contacts up by ``email``, ``mobilePhone``, ``socialSecurityNumber`` or
``customKey`` (which a tenant maps to ``externalId`` or ``memberNumber``). A contact type's key
attribute is tenant configuration; when the config does not name it, the first of these the
contact has is used.

Two kinds of key live in the outbox: a *contact key* orders the changes of one contact
(``id:<guid>``, or ``ref:<ref>`` while its create is queued), and an *identity key* names a
row of the identity map (``ref:<ref>``, or ``key:<attribute>:<type>:<value>``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "LOOKUP_PARAMETERS",
    "choose_key",
    "contact_key",
    "identity_key",
    "identity_matches",
    "is_change_id",
    "is_ref",
    "lookup_parameter",
    "new_change_id",
    "new_ref",
]

# find_contact_id's keyword -> Engage's query parameter.
LOOKUP_PARAMETERS: Final = {
    "email": "email",
    "mobile_phone": "mobilePhone",
    "social_security_number": "socialSecurityNumber",
    "custom_key": "customKey",
    "any": "any",
}

_REF = re.compile(r"ref_[0-9a-f]{32}")
_CHANGE_ID = re.compile(r"chg_[0-9a-f]{32}")
_KEY_ORDER: Final = ("email", "mobilePhone", "socialSecurityNumber")


def new_ref() -> str:
    """A fresh local reference for a create: ``ref_`` and 32 hex digits."""
    return f"ref_{uuid.uuid4().hex}"


def new_change_id() -> str:
    """A fresh outbox change id."""
    return f"chg_{uuid.uuid4().hex}"


def is_change_id(value: str) -> bool:
    """Is `value` shaped like a change id made by `new_change_id`?"""
    return bool(_CHANGE_ID.fullmatch(value))


def is_ref(value: str) -> bool:
    """Is `value` a ref made by `new_ref` (rather than a GUID)?"""
    return bool(_REF.fullmatch(value))


def contact_key(*, contact_id: str | None = None, ref: str | None = None) -> str:
    """The ordering key of a contact: its GUID when known, else the ref of its create."""
    if contact_id is not None:
        return f"id:{contact_id}"
    if ref is None:
        raise ValueError("a contact key needs a contact id or a ref")
    return f"ref:{ref}"


def lookup_parameter(attribute: str) -> str:
    """The ``/contacts/id`` query parameter that finds a contact by `attribute`."""
    return "customKey" if attribute in {"externalId", "memberNumber"} else attribute


def _normalize(attribute: str, value: str) -> str:
    value = value.strip()
    if attribute in {"email", "any"}:
        return value.lower()
    if attribute in {"mobilePhone", "socialSecurityNumber"}:
        return re.sub(r"[\s-]", "", value)
    return value


def identity_key(attribute: str, value: str, contact_type: str | None) -> str:
    """The identity-map key for a lookup of `value` by `attribute` within `contact_type`."""
    scope = contact_type.lower() if contact_type else "*"
    return f"key:{attribute}:{scope}:{_normalize(attribute, value)}"


def identity_matches(identity: str, value: str) -> bool:
    """Whether an identity-map key (``key:<attribute>:<type>:<value>``) is for `value`,
    normalised as that attribute is ("ANN@Example.com" matches an email key for ann@...).
    """
    parts = identity.split(":", 3)
    if len(parts) != 4 or parts[0] != "key":
        return False
    return _normalize(parts[1], value) == parts[3]


def choose_key(
    attributes: Mapping[str, Any],
    configured: str | None,
    custom_key_attribute: str,
) -> tuple[str, str] | None:
    """The (attribute, value) to look a contact up by before creating it, or None.

    `configured` is the contact type's key from the config, used when present in the data.
    """
    candidates = (configured,) if configured else (*_KEY_ORDER, custom_key_attribute)
    for attribute in candidates:
        value = attributes.get(attribute) if attribute else None
        if isinstance(value, str) and value.strip():
            return attribute, value
    return None
