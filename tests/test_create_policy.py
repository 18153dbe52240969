"""The create policy: what an answer to a create means, when a queued create is looked up
first, and what a create whose contact exists still applies. Pure functions, fed answers.
"""

from __future__ import annotations

import pytest

import engage_async as ea
from engage_async._create_policy import (
    CreateOutcome,
    create_outcome,
    must_look_up_first,
    update_for_existing,
    without_type,
)

GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"


def conflict(code: str) -> ea.EngageConflict:
    """A 409 with Engage's `code`."""
    return ea.EngageConflict(f"POST /api/v3/contacts -> 409 {code}", status=409, error_code=code)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"id": GUID, "attributes": {}}, CreateOutcome.CREATED),
        ({"id": GUID.upper()}, CreateOutcome.CREATED),
        ({"id": "not-a-guid"}, CreateOutcome.UNKNOWN),
        (None, CreateOutcome.UNKNOWN),
        ({}, CreateOutcome.UNKNOWN),
        ("just text", CreateOutcome.UNKNOWN),
    ],
    ids=["guid", "upper-case", "malformed", "empty-body", "no-id", "not-an-object"],
)
def test_a_2xx_is_created_only_with_a_readable_guid(
    answer: object, expected: CreateOutcome
) -> None:
    """A 2xx names the new contact; one that names none readably leaves it to a lookup."""
    assert expected == create_outcome(answer)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (conflict("ApprovedContactWithKeyExists"), CreateOutcome.EXISTS),
        (conflict("ContactWithKeyIsBeingCreated"), CreateOutcome.BEING_CREATED),
        (conflict("SomethingElse"), CreateOutcome.REJECTED),
        (ea.RateLimited("429", status=429), CreateOutcome.NOT_SENT),
        (
            ea.EngageServerError("504", status=504, error_code="RequestTimeOut"),
            CreateOutcome.ROLLED_BACK,
        ),
        (ea.EngageServerError("504", status=504), CreateOutcome.UNKNOWN),
        (ea.EngageServerError("502", status=502), CreateOutcome.UNKNOWN),
        (ea.EngageTimeout("no answer"), CreateOutcome.UNKNOWN),
        (ea.EngageConnectionError("refused", request_sent=False), CreateOutcome.NOT_SENT),
        (ea.EngageConnectionError("lost", request_sent=True), CreateOutcome.UNKNOWN),
        (ea.CircuitOpen("open"), CreateOutcome.NOT_SENT),
        (ea.InvalidRequest("400", status=400), CreateOutcome.REJECTED),
        (ea.EngageValidationError("422", status=422), CreateOutcome.REJECTED),
    ],
    ids=[
        "exists",
        "being-created",
        "other-409",
        "429",
        "504-rolled-back",
        "504-without-code",
        "502",
        "timeout",
        "refused",
        "lost",
        "circuit-open",
        "400",
        "422",
    ],
)
def test_errors_read_as_outcomes(error: ea.EngageError, expected: CreateOutcome) -> None:
    """Only a documented rollback, a refusal before processing and a request that never left
    say nothing was created; a lost answer or a 5xx may have created it.
    """
    assert expected == create_outcome(error=error)


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ([], False),
        ([CreateOutcome.NOT_SENT, CreateOutcome.ROLLED_BACK], False),
        ([CreateOutcome.ROLLED_BACK, CreateOutcome.UNKNOWN], True),
        ([CreateOutcome.BEING_CREATED], True),
        ([CreateOutcome.EXISTS], True),
        ([CreateOutcome.NOT_SENT], False),
    ],
)
def test_a_queued_create_is_looked_up_only_if_an_attempt_may_have_made_it(
    outcomes: list[CreateOutcome], expected: bool
) -> None:
    """Look up first only when an attempt may have made the contact; a create that never
    reached Engage goes as it is (a contact made elsewhere meets Engage's 409).
    """
    assert expected == must_look_up_first(outcomes)


def test_an_existing_contact_gets_the_create_as_an_update_only_when_asked() -> None:
    """``if_exists="update"`` applies the attributes (without the type); ``"return"`` applies
    only what later calls folded into the create; nothing otherwise.
    """
    attributes = {"email": "a@example.com", "firstName": "A", "contactType": "Member"}
    folded = {"lastName": "B"}

    assert {"email": "a@example.com", "firstName": "A"} == update_for_existing(
        "update", attributes, folded
    )
    assert {"lastName": "B"} == update_for_existing("return", attributes, folded)
    assert None is update_for_existing("return", attributes, None)
    assert None is update_for_existing(None, None, {})


def test_without_type_drops_only_the_contact_type() -> None:
    """The contact type changes only through its own call, never in an update body."""
    assert {"a": 1} == without_type({"a": 1, "contactType": "Member"})
