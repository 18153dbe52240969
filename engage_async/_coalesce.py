"""How two queued changes to the same contact become one.

Updates carry absolute values, so the later value of a field wins. Nested objects (such as
``preferences``) merge key by key, and ``consents`` merge by their ``id``, since an update that
sets one consent must not undo another still waiting to be sent. Other lists are replaced.

`fold_into` decides whether new values may join the contact's last waiting change, and what
that change becomes; each outbox backend only reads the tail and writes the `Fold`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from ._changes import Operation, State, loads
from ._keys import identity_key

__all__ = ["Fold", "fold_into", "identity_of", "merge_changes"]


class Row(Protocol):
    """A database row read by column name (a ``sqlite3.Row``, an ``asyncpg.Record``)."""

    def __getitem__(self, name: str, /) -> Any: ...


@attrs.frozen
class Fold:
    """What the waiting change becomes: its body, and for a create also its folded
    attributes, its key value and the identity it is matched by.
    """

    body: dict[str, Any]
    create: bool = False
    folded: dict[str, Any] | None = None
    key_value: str | None = None
    identity: str | None = None


def identity_of(
    operation: Operation, key_name: str | None, key_value: str | None, contact_type: str | None
) -> str | None:
    """The identity-map key a create is matched by; None for other changes and keyless ones."""
    if operation is not Operation.CREATE or not key_name or not key_value:
        return None
    return identity_key(key_name, key_value, contact_type)


def fold_into(
    tail: Row, changes: Mapping[str, Any], query: Mapping[str, str] | None = None
) -> Fold | None:
    """`changes` (an update's values, with its `query`) folded into `tail`, the contact's last
    waiting row (``state``, ``operation``, ``body``, ``folded``, ``query``, ``key_name``,
    ``key_value``, ``contact_type``); None when they may not join it.

    Only a pending create or update takes them: a row in flight may already be on the wire,
    and a contact-type change is a barrier. Two updates that chose differently about Engage's
    exports stay apart.
    """
    if tail["state"] != State.PENDING:
        return None
    if tail["operation"] == Operation.UPDATE:
        if loads(tail["query"]) != (dict(query) if query else None):
            return None
        return Fold(merge_changes(loads(tail["body"]) or {}, changes))
    if tail["operation"] != Operation.CREATE:
        return None
    key_value = tail["key_value"]
    corrected = changes.get(tail["key_name"]) if tail["key_name"] else None
    if isinstance(corrected, str) and corrected.strip():
        # The contact will be created with the corrected key, so that is what its GUID is
        # looked up by and what a second create for it must match.
        key_value = corrected
    return Fold(
        merge_changes(loads(tail["body"]) or {}, changes),
        create=True,
        folded=merge_changes(loads(tail["folded"]) or {}, changes),
        key_value=key_value,
        identity=identity_of(Operation.CREATE, tail["key_name"], key_value, tail["contact_type"]),
    )


def merge_changes(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """`earlier` with `later` applied on top (neither is modified)."""
    merged = dict(earlier)
    for name, value in later.items():
        previous = merged.get(name)
        if name == "consents" and isinstance(previous, list) and isinstance(value, list):
            merged[name] = _merge_consents(previous, value)
        elif isinstance(previous, Mapping) and isinstance(value, Mapping):
            merged[name] = merge_changes(previous, value)
        else:
            merged[name] = value
    return merged


def _merge_consents(earlier: list[Any], later: list[Any]) -> list[Any]:
    by_id: dict[Any, Any] = {}
    anonymous: list[Any] = []
    for consent in (*earlier, *later):
        if isinstance(consent, Mapping) and consent.get("id") is not None:
            by_id[consent["id"]] = consent
        else:
            anonymous.append(consent)
    return [*by_id.values(), *anonymous]
