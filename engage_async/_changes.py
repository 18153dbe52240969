"""What a queued change is: its operation, its state, and the row that holds it."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final, Literal

import attrs

__all__ = [
    "Batch",
    "Change",
    "NewChange",
    "Operation",
    "Queued",
    "State",
    "dumps",
    "loads",
    "row_factory",
]


class Operation(StrEnum):
    """What a queued change does."""

    CREATE = "create"
    UPDATE = "update"
    CONTACT_TYPE = "contact_type"
    PROMOTE = "promote"  # API v2's promoteToMember


class State(StrEnum):
    """Where a queued change stands."""

    PENDING = "pending"
    INFLIGHT = "inflight"
    WAITING_GUID = "waiting_guid"
    DONE = "done"
    DEAD = "dead"


@attrs.frozen
class NewChange:
    """A change to put in the outbox.

    `body` is the wire JSON (already guarded); `reason` says why it was queued (no personal
    data).
    """

    operation: Operation
    contact_key: str
    body: Mapping[str, Any] | None = attrs.field(default=None, repr=False)
    contact_id: str | None = None
    ref: str | None = None
    contact_type: str | None = None
    key_name: str | None = None
    key_value: str | None = attrs.field(default=None, repr=False)
    query: Mapping[str, str] | None = attrs.field(default=None, repr=False)
    lookup_first: bool = False
    if_exists: Literal["return", "update"] | None = None
    reason: str | None = None


@attrs.frozen
class Queued:
    """The answer to an enqueue: the row that now holds the change.

    `merged` when it was folded into a change already waiting; `duplicate` when it was a
    create for a key whose create is already queued (whose `ref` it then is).
    """

    change_id: str
    ref: str | None = None
    merged: bool = False
    duplicate: bool = False


@attrs.frozen
class Change:
    """A row of the outbox, as a flusher or the admin sees it."""

    seq: int
    change_id: str
    operation: Operation
    state: State
    contact_key: str
    contact_id: str | None
    ref: str | None
    contact_type: str | None
    key_name: str | None
    key_value: str | None = attrs.field(repr=False)
    body: dict[str, Any] | None = attrs.field(repr=False)
    folded: dict[str, Any] | None = attrs.field(repr=False)
    query: dict[str, str] = attrs.field(repr=False)
    lookup_first: bool
    if_exists: str | None
    attempts: int
    lookups: int
    send_alone: bool
    created_at: float
    updated_at: float
    next_attempt_at: float
    lease_owner: str | None
    lease_until: float | None
    batch_id: str | None
    batch_index: int | None
    error_code: str | None
    last_error: str | None
    exported_to: str | None

    @classmethod
    def from_row(cls, sqlite_row: sqlite3.Row) -> Change:
        """Read a ``SELECT *`` row of ``changes``."""
        # sqlite3.Row finds a column by name with a linear scan; a dict is three times faster
        # over a whole row, which a flusher claiming thousands of rows notices.
        row = dict(zip(sqlite_row.keys(), sqlite_row, strict=True))
        return cls(
            seq=row["seq"],
            change_id=row["change_id"],
            operation=_OPERATIONS[row["operation"]],
            state=_STATES[row["state"]],
            contact_key=row["contact_key"],
            contact_id=row["contact_id"],
            ref=row["ref"],
            contact_type=row["contact_type"],
            key_name=row["key_name"],
            key_value=row["key_value"],
            body=loads(row["body"]),
            folded=loads(row["folded"]),
            query=_query(row["query"]),
            lookup_first=bool(row["lookup_first"]),
            if_exists=row["if_exists"],
            attempts=row["attempts"],
            lookups=row["lookups"],
            send_alone=bool(row["send_alone"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            next_attempt_at=row["next_attempt_at"],
            lease_owner=row["lease_owner"],
            lease_until=row["lease_until"],
            batch_id=row["batch_id"],
            batch_index=row["batch_index"],
            error_code=row["error_code"],
            last_error=row["last_error"],
            exported_to=row["exported_to"],
        )

    def avoids_export(self, configured: bool) -> bool:
        """Whether this change stays out of Engage's exports: an update's own choice
        (``update_contact(..., avoid_triggering_export=...)``), else `configured`.
        """
        if self.operation is not Operation.UPDATE:
            return False
        chosen = self.query.get("avoidTriggeringExport")
        return configured if chosen is None else chosen == "true"


_OPERATIONS: Final = {str(operation): operation for operation in Operation}
_STATES: Final = {str(state): state for state in State}


def _query(text: str | None) -> dict[str, str]:
    # Most changes have no query parameters: skip the JSON parser for them.
    if text is None or text == "{}":
        return {}
    parsed: dict[str, str] = json.loads(text)
    return parsed


def dumps(value: Mapping[str, Any] | None) -> str | None:
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def row_factory(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> sqlite3.Row:
    return sqlite3.Row(cursor, row)


@attrs.frozen
class Batch:
    """A bulk request Engage accepted, followed until it finishes."""

    batch_id: str
    kind: Operation
    contact_type: str | None
    submitted_at: float
    polls: int
    age: float = 0.0  # seconds since it was submitted, by the outbox's clock
