"""How engage-async reads Engage's answers.

Two halves. First, what an answer means for a write: only Engage's documented verdicts are
about the request (raised by the session, dead-lettered by the flusher); anything else, a
redirect or a proxy's page among them, leaves the outcome unknown, so the session queues the
write (a create marked to be looked up first) and the flusher keeps it pending and pauses.
These run against `FakeEngage` over real sockets; the outbox is read with plain SQL.

Second, the tolerant readers of `_http` fed with recorded bodies, one per shape the reference
(`shared/reference/engage-api.md`) names or real integrations show, for every behaviour of
Engage the package reads without a published schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import changes, flusher_config, query

import engage_async as ea
from engage_async import _http
from engage_async._http import BatchStatus, ItemFailure, error_for_status, read_response
from engage_async.testing import FakeEngage

GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
OTHER = "b16fd8f3-d0f5-aaaa-aa60-b00300f9aaaa"
MAINTENANCE = "<html><body><h1>Down for maintenance</h1></body></html>"

# Answers to a write that are not a verdict from Engage: (status, body, content type).
NOT_A_VERDICT = [
    pytest.param(302, None, None, id="302-maintenance-redirect"),
    pytest.param(307, b"", None, id="307-empty"),
    pytest.param(200, MAINTENANCE, "text/html", id="200-html-page"),
    pytest.param(404, MAINTENANCE, "text/html", id="404-html-page"),
    pytest.param(405, None, None, id="405"),
]


def rows(config: ea.EngageConfig) -> list[dict[str, Any]]:
    """(operation, state, attempts, lookup_first) of every outbox row, in order."""
    return [
        {k: row[k] for k in ("operation", "state", "attempts", "lookup_first")}
        for row in changes(config)
    ]


def paused_until(config: ea.EngageConfig) -> float | None:
    """When the flushers' shared pause ends, if one is recorded."""
    found = query(config, "SELECT value FROM control WHERE name = 'paused_until'")
    return float(found[0]["value"]) if found else None


# --- a write whose answer is not a verdict is queued ------------------------------------------


@pytest.mark.parametrize(("status", "body", "content_type"), NOT_A_VERDICT)
async def test_update_answered_without_a_verdict_is_queued(
    fake: FakeEngage,
    session: ea.EngageSession,
    config: ea.EngageConfig,
    status: int,
    body: object,
    content_type: str | None,
) -> None:
    """An update answered with a redirect, a proxy's page or an undocumented 4xx is
    "outcome unknown": `queued=True` and a pending row, not an exception.
    """
    guid = fake.add_contact({"email": "anna@example.com"})
    fake.inject("status", method="PATCH", status=status, body=body, content_type=content_type)

    delivery = await session.update_contact(guid, {"firstName": "Anna"})

    assert (True, guid) == (delivery.queued, delivery.contact_id)
    assert [{"operation": "update", "state": "pending", "attempts": 0, "lookup_first": 0}] == rows(
        config
    )


@pytest.mark.parametrize(("status", "body", "content_type"), NOT_A_VERDICT)
async def test_create_answered_without_a_verdict_is_queued_to_be_looked_up(
    fake: FakeEngage,
    session: ea.EngageSession,
    config: ea.EngageConfig,
    status: int,
    body: object,
    content_type: str | None,
) -> None:
    """A create whose POST got no verdict may have been applied: it is queued with a ref and
    marked to be looked up before it is sent again.
    """
    fake.inject("status", method="POST", status=status, body=body, content_type=content_type)

    delivery = await session.create_contact({"email": "anna@example.com"})

    assert (True, True) == (delivery.queued, delivery.ref is not None)
    assert [{"operation": "create", "state": "pending", "attempts": 0, "lookup_first": 1}] == rows(
        config
    )


async def test_create_whose_lookup_is_redirected_is_queued(
    fake: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """When even the lookup before the create is redirected, nothing is POSTed and the create
    is queued; its POST never left, so it is not marked to be looked up first.
    """
    fake.inject("status", method="GET", status=302)

    delivery = await session.create_contact({"email": "anna@example.com"})

    assert (True, []) == (delivery.queued, fake.requests_to("POST", "/api/v3/contacts"))
    assert [0] == [row["lookup_first"] for row in rows(config)]


async def test_a_json_verdict_is_still_raised(
    fake: FakeEngage, session: ea.EngageSession, config: ea.EngageConfig
) -> None:
    """The boundary: Engage's own JSON 404 on an update is still `ContactNotFound`, raised and
    never queued.
    """
    with pytest.raises(ea.ContactNotFound):
        await session.update_contact(GUID, {"firstName": "Anna"})

    assert [] == rows(config)


# --- the flusher keeps such a change and pauses -----------------------------------------------


@pytest.mark.parametrize(("status", "body", "content_type"), NOT_A_VERDICT)
async def test_flusher_keeps_an_update_answered_without_a_verdict(
    fake: FakeEngage,
    tmp_path: Path,
    status: int,
    body: object,
    content_type: str | None,
) -> None:
    """The flusher neither dead-letters nor counts an update answered without a verdict: the
    row stays pending with no attempt counted, and every flusher pauses.
    """
    config = flusher_config(fake, tmp_path, background_delays=(60.0,))
    guid = fake.add_contact({"email": "anna@example.com"})
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        assert (await engage.update_contact(guid, {"firstName": "Anna"})).queued
        await fake.come_up()
    fake.inject("status", method="PATCH", status=status, body=body, content_type=content_type)
    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert (0, 1) == (report.dead, report.pending)
    assert [{"operation": "update", "state": "pending", "attempts": 0, "lookup_first": 0}] == rows(
        config
    )
    assert paused_until(config) is not None


@pytest.mark.parametrize(("status", "body", "content_type"), NOT_A_VERDICT)
async def test_flusher_keeps_a_create_answered_without_a_verdict(
    fake: FakeEngage,
    tmp_path: Path,
    status: int,
    body: object,
    content_type: str | None,
) -> None:
    """A create the flusher POSTs and gets no verdict for stays pending, to be looked up
    before it is sent again, and every flusher pauses.
    """
    config = flusher_config(fake, tmp_path, background_delays=(60.0,))
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        assert (await engage.create_contact({"email": "anna@example.com"})).queued
        await fake.come_up()
    fake.inject("status", method="POST", status=status, body=body, content_type=content_type)
    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert (0, 1) == (report.dead, report.pending)
    assert [{"operation": "create", "state": "pending", "attempts": 0, "lookup_first": 1}] == rows(
        config
    )
    assert paused_until(config) is not None


# --- recorded bodies: error answers -----------------------------------------------------------

LOOKUP = _http.contact_id_lookup("/api/v3", {"email": "anna@example.com"})
JSON = {"Content-Type": "application/json; charset=utf-8"}


@pytest.mark.parametrize(
    ("raw", "code", "message", "details"),
    [
        pytest.param(
            b'{"errorCode":"InvalidEmailAddress","message":"Invalid email.","statusCode":400}',
            "InvalidEmailAddress",
            "Invalid email.",
            {},
            id="errorCode-message",
        ),
        pytest.param(
            b'{"ErrorCode":"InvalidEmailAddress","Message":"Invalid email."}',
            "InvalidEmailAddress",
            "Invalid email.",
            {},
            id="PascalCase",
        ),
        pytest.param(b'{"code":"InvalidPhoneNumber"}', "InvalidPhoneNumber", None, {}, id="code"),
        pytest.param(b'{"error":"InvalidContactType"}', "InvalidContactType", None, {}, id="error"),
        pytest.param(
            b'{"message":"InvalidSearchQuery"}',
            "InvalidSearchQuery",
            "InvalidSearchQuery",
            {},
            id="name-under-message",
        ),
        pytest.param(
            b'{"code":"NoData","detail":"No data was sent"}',
            "NoData",
            "No data was sent",
            {},
            id="detail-kradyy",
        ),
        pytest.param(
            b'"InvalidSocialSecurityNumber"',
            "InvalidSocialSecurityNumber",
            "InvalidSocialSecurityNumber",
            {},
            id="bare-string",
        ),
        pytest.param(
            b'{"Message":"The request is invalid.","ModelState":{"email":["Not an email."]}}',
            None,
            "The request is invalid.",
            {"email": ["Not an email."]},
            id="aspnet-modelstate",
        ),
        pytest.param(
            b'{"title":"One or more validation errors occurred.","status":400,'
            b'"errors":{"Email":["The Email field is required."]}}',
            None,
            "One or more validation errors occurred.",
            {"Email": ["The Email field is required."]},
            id="problem-details",
        ),
        pytest.param(
            b'[{"errorCode":"InvalidEmailAddress","message":"Invalid email."}]',
            "InvalidEmailAddress",
            "Invalid email.",
            {},
            id="list-of-errors",
        ),
        pytest.param(b"", None, None, {}, id="empty"),
        pytest.param(b"Bad Request", None, None, {}, id="plain-text"),
    ],
)
def test_error_body_shapes(
    raw: bytes, code: str | None, message: str | None, details: dict[str, Any]
) -> None:
    """`_error_fields` reads Engage's unpublished error body in every shape seen: the code
    from errorCode, code, error or an identifier-like text; the message from message,
    detail or title; details from messageDetails, ModelState or errors; any letter case.
    """
    exc = error_for_status(LOOKUP, 400, JSON, raw)

    assert (ea.InvalidRequest, code, message, details) == (
        type(exc),
        exc.error_code,
        exc.message,
        exc.details,
    )


@pytest.mark.parametrize(
    "raw",
    [
        b'{"errorCode":"MultipleMatches","messageDetails":{"multipleMatchesFound":["%s","%s"]}}',
        b'{"ErrorCode":"MultipleMatches","MessageDetails":{"multipleMatchesFound":["%s","%s"]}}',
        b'{"code":"MultipleMatches","messagedetails":{"multipleMatchesFound":["%s","%s"]}}',
    ],
    ids=["stape", "PascalCase", "lowercase"],
)
def test_multiple_matches_shapes(raw: bytes) -> None:
    """409 MultipleMatches lists the matches under messageDetails.multipleMatchesFound
    (stape-io/voyado-tag reads it so), whatever the letter case of the outer names.
    """
    body = raw % (GUID.upper().encode(), OTHER.encode())

    exc = error_for_status(LOOKUP, 409, JSON, body)

    assert (ea.MultipleMatches, (GUID, OTHER)) == (type(exc), exc.contact_ids)


# --- recorded bodies: /contacts/id --------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(f'"{GUID}"'.encode(), id="json-string-documented"),
        pytest.param(json.dumps(f'"{GUID}"').encode(), id="string-quoted-twice"),
        pytest.param(f'  "{GUID}"\n'.encode(), id="padded"),
        pytest.param(json.dumps({"contactId": GUID}).encode(), id="object-contactId"),
        pytest.param(json.dumps({"ContactId": GUID}).encode(), id="object-ContactId"),
        pytest.param(json.dumps({"id": GUID}).encode(), id="object-id"),
    ],
)
def test_contact_id_shapes(raw: bytes) -> None:
    """``GET /contacts/id`` answers a bare JSON string (docs, Dixa, stape, the v2 swagger);
    an object holding contactId or id is read too.
    """
    data = read_response(LOOKUP, 200, JSON, raw)

    assert GUID == _http.read_contact_id(data)


@pytest.mark.parametrize(
    "raw", [b"null", b"42", b"{}", b'{"contactIds":[]}', b"[]", b'""'], ids=str
)
def test_contact_id_absent(raw: bytes) -> None:
    """Shapes holding no id read as None (the caller then reports the answer unreadable)."""
    assert _http.read_contact_id(read_response(LOOKUP, 200, JSON, raw)) is None


# --- recorded bodies: list pages ----------------------------------------------------------------

ITEM = {"id": "t1", "transactionNumber": "1001"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            {"items": [ITEM], "totalCount": 3, "offset": 0, "count": 1},
            ([ITEM], 3),
            id="v2-paged-result",
        ),
        pytest.param(
            {"links": [], "items": [ITEM], "totalCount": 1, "offset": 0, "count": 100},
            ([ITEM], 1),
            id="point-accounts-result",
        ),
        pytest.param({"Items": [ITEM], "TotalCount": 3}, ([ITEM], 3), id="PascalCase"),
        pytest.param([ITEM], ([ITEM], None), id="bare-array-dixa"),
        pytest.param({"items": [ITEM]}, ([ITEM], None), id="no-total"),
        pytest.param({"items": [], "totalCount": True}, ([], None), id="boolean-total"),
    ],
)
def test_page_shapes(raw: object, expected: tuple[list[Any], int | None]) -> None:
    """List endpoints answer a paged object (the v2 swagger's PagedResult and
    PointAccountModelsResult) or a bare array (Dixa's point-accounts code); both are read.
    """
    call = _http.transactions("/api/v3", 3, GUID, 0, 100)

    assert expected == _http.read_page(read_response(call, 200, JSON, json.dumps(raw).encode()))


# --- recorded bodies: bulk batch id and status --------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'"b-1"', id="bare-string-swagger"),
        pytest.param(b'{"batchId":"b-1"}', id="object-batchId"),
        pytest.param(b'{"BatchId":"b-1"}', id="object-BatchId"),
        pytest.param(b'{"id":"b-1"}', id="object-id"),
    ],
)
def test_batch_id_shapes(raw: bytes) -> None:
    """A bulk POST/PATCH answers "BatchId", a string in the v2 swagger; objects are read too."""
    call = _http.bulk_update("/api/v3", "Member", b"[]")

    assert "b-1" == _http.read_batch_id(read_response(call, 202, JSON, raw))


def test_numeric_batch_id_is_read_as_text() -> None:
    """A number where the id belongs is kept as its text."""
    assert "42" == _http.read_batch_id({"batchId": 42})


FAILURE = {"index": 1, "contactId": GUID, "errorCode": "ValidationError", "message": "Bad zip"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            {
                "batchId": "b-1",
                "status": "Finished",
                "totalCount": 2,
                "successCount": 1,
                "failedCount": 1,
                "failures": [FAILURE],
            },
            BatchStatus(
                finished=True,
                failures=(ItemFailure(1, GUID, None, "ValidationError", "Bad zip"),),
                failed_count=1,
            ),
            id="simulator",
        ),
        pytest.param({"status": "Pending"}, BatchStatus(finished=False), id="pending"),
        pytest.param({"Status": "InProgress"}, BatchStatus(finished=False), id="in-progress"),
        pytest.param({"status": "Queued"}, BatchStatus(finished=False), id="unknown-state"),
        pytest.param({"state": "Completed"}, BatchStatus(finished=True), id="state-completed"),
        pytest.param({"finished": True}, BatchStatus(finished=True), id="finished-flag"),
        pytest.param(
            {"batchStatus": "Failed"},
            BatchStatus(finished=True, failed_entirely=True),
            id="failed-as-a-whole",
        ),
        pytest.param(
            {
                "Status": "FinishedWithErrors",
                "Errors": [{"RowNumber": 2, "Email": "anna@example.com", "Code": "Invalid"}],
                "ErrorCount": 1,
            },
            BatchStatus(
                finished=True,
                failures=(ItemFailure(1, None, "anna@example.com", "Invalid", None),),
                failed_count=1,
            ),
            id="row-number-and-key",
        ),
        pytest.param(
            {"status": "Completed with errors", "failedItems": [{"id": OTHER, "reason": "x"}]},
            BatchStatus(finished=True, failures=(ItemFailure(None, OTHER, None, None, "x"),)),
            id="spaced-state-id-reason",
        ),
        pytest.param("Finished", BatchStatus(finished=False), id="not-an-object"),
    ],
)
def test_batch_status_shapes(data: object, expected: BatchStatus) -> None:
    """Engage's bulk status schema is not published: the state under status, state or
    batchStatus (any case and spacing), per-item failures under failures, errors, failedItems
    tied by index, row number, contact id or key; an unknown state is "not finished".
    """
    call = _http.bulk_status("/api/v3", "b-1")

    assert expected == _http.read_batch_status(
        read_response(call, 200, JSON, json.dumps(data).encode())
    )
