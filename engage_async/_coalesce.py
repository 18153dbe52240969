"""How two queued changes to the same contact become one.

Updates carry absolute values, so the later value of a field wins. Nested objects (such as
``preferences``) merge key by key, and ``consents`` merge by their ``id``, since an update that
sets one consent must not undo another still waiting to be sent. Other lists are replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["merge_changes"]


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
