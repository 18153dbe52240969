"""What an answer to a create means, and what to do when the contact already exists.

Engage has no idempotency keys, and its docs ask to check with a GET before sending a POST
again. The session (creating live) and the flusher (replaying) both follow the rules here, so
they cannot drift apart:

* `create_outcome` reads what came back from ``POST /contacts`` (data or an exception) as one
  `CreateOutcome`;
* `must_look_up_first` says whether a create that is queued after some attempts has to be
  looked up by its key before it is sent again;
* `update_for_existing` says what a create whose contact already exists still has to apply.

Pure functions only: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

from ._errors import (
    EngageConflict,
    EngageError,
    EngageServerError,
    EngageUnavailable,
    RateLimited,
)
from ._http import read_contact_id
from ._wire import is_contact_id

__all__ = [
    "CreateOutcome",
    "create_outcome",
    "must_look_up_first",
    "update_for_existing",
    "without_type",
]


class CreateOutcome(StrEnum):
    """What one attempt at ``POST /contacts`` left behind."""

    CREATED = "created"  # Engage made the contact; its GUID is in the answer
    EXISTS = "exists"  # 409 ApprovedContactWithKeyExists: look it up, nothing to create
    BEING_CREATED = "being_created"  # 409 ContactWithKeyIsBeingCreated: wait, then look up
    ROLLED_BACK = "rolled_back"  # 504 RequestTimeOut: Engage documents nothing was created
    NOT_SENT = "not_sent"  # it never reached Engage, or Engage refused to process it (429)
    UNKNOWN = "unknown"  # it may have been applied: look up before sending it again
    REJECTED = "rejected"  # Engage said no for good (400, 422, another 409, ...)


# Outcomes after which the contact may exist on Engage although no GUID came back.
_MAY_EXIST = frozenset({CreateOutcome.UNKNOWN, CreateOutcome.BEING_CREATED, CreateOutcome.EXISTS})


def create_outcome(answer: Any = None, *, error: EngageError | None = None) -> CreateOutcome:
    """Read one attempt: the decoded answer of a 2xx, or the `error` it raised.

    A 2xx without a readable GUID (an empty 201) means the contact was made but Engage did
    not say which it is: UNKNOWN, so it is looked up.
    """
    if error is None:
        guid = contact_id_in(answer)
        return CreateOutcome.CREATED if guid is not None else CreateOutcome.UNKNOWN
    if isinstance(error, EngageConflict):
        if error.error_code == "ApprovedContactWithKeyExists":
            return CreateOutcome.EXISTS
        if error.error_code == "ContactWithKeyIsBeingCreated":
            return CreateOutcome.BEING_CREATED
        return CreateOutcome.REJECTED
    if isinstance(error, RateLimited):
        return CreateOutcome.NOT_SENT
    if (
        isinstance(error, EngageServerError)
        and error.status == 504
        and error.error_code == "RequestTimeOut"
    ):
        return CreateOutcome.ROLLED_BACK
    if isinstance(error, EngageUnavailable):
        return CreateOutcome.UNKNOWN if error.request_sent else CreateOutcome.NOT_SENT
    return CreateOutcome.REJECTED


def contact_id_in(answer: Any) -> str | None:
    """The GUID in a create's answer (an object with ``id``), if it holds a readable one."""
    if isinstance(answer, Mapping):
        value = read_contact_id(answer)
        if value is not None and is_contact_id(value):
            return value.lower()
    return None


def must_look_up_first(outcomes: Iterable[CreateOutcome]) -> bool:
    """Must a queued create be looked up by its key before it is sent again?

    Only when one of its attempts may have made the contact (no verdict came back, or Engage
    said it exists or is being created). A create whose attempts provably never left, were
    refused with 429 or were rolled back is sent as it is: should the contact exist by then
    (made elsewhere), Engage answers ``ApprovedContactWithKeyExists`` and the create policy
    takes it from there, at no extra request when it does not.
    """
    return any(outcome in _MAY_EXIST for outcome in outcomes)


def without_type(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """A create's attributes as an update: ``contactType`` is changed only by its own call."""
    return {name: value for name, value in attributes.items() if name != "contactType"}


def update_for_existing(
    if_exists: str | None,
    attributes: Mapping[str, Any] | None,
    folded: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """What a create whose contact already exists must still apply to it, or None.

    ``if_exists="update"`` applies the create's attributes as an update; otherwise only what
    later calls folded into the queued create (their updates were meant for this contact).
    """
    if if_exists == "update" and attributes:
        return without_type(attributes)
    if folded:
        return dict(folded)
    return None
