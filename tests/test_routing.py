"""The flusher's two pure decisions: which way each claimed change goes (`route`), and which
rows of a finished bulk batch failed (`attribute_failures`).
"""

from __future__ import annotations

from typing import Any

from engage_async._batches import attribute_failures
from engage_async._changes import Change, Operation, State
from engage_async._http import BatchStatus, ItemFailure
from engage_async._sender import route


def change(seq: int, operation: Operation = Operation.UPDATE, **fields: Any) -> Change:
    """A claimed row with the fields a decision reads."""
    values: dict[str, Any] = {
        "seq": seq,
        "change_id": f"chg_{seq:032x}",
        "operation": operation,
        "state": State.INFLIGHT,
        "contact_key": f"id:{seq}",
        "contact_id": None,
        "ref": None,
        "contact_type": "Member",
        "key_name": "email",
        "key_value": f"c{seq}@example.com",
        "body": {"firstName": "X"},
        "folded": None,
        "query": {},
        "lookup_first": False,
        "if_exists": None,
        "attempts": 0,
        "lookups": 0,
        "send_alone": False,
        "created_at": 0.0,
        "updated_at": 0.0,
        "next_attempt_at": 0.0,
        "lease_owner": None,
        "lease_until": None,
        "batch_id": None,
        "batch_index": None,
        "error_code": None,
        "last_error": None,
        "exported_to": None,
    }
    values.update(fields)
    return Change(**values)


def seqs(changes: tuple[Change, ...]) -> list[int]:
    """The seqs of `changes`, in order."""
    return [c.seq for c in changes]


def test_a_big_backlog_goes_in_bulk_but_options_and_doubts_go_alone() -> None:
    """In bulk mode, plain creates and updates go in bulk; a create with options, a change a
    batch could not settle, and every contact-type change go through the single endpoints.
    """
    plain = change(1, Operation.CREATE)
    with_source = change(2, Operation.CREATE, query={"source": "POS"})
    update = change(3)
    doubtful = change(4, send_alone=True)
    retype = change(5, Operation.CONTACT_TYPE)

    routes = route([plain, with_source], [update, doubtful], [retype], xml=False, bulk=True)

    assert [2, 4, 5] == seqs(routes.singles)
    assert ([1], [3]) == (seqs(routes.bulk_creates), seqs(routes.bulk_updates))
    assert ((), (), ()) == (routes.xml_creates, routes.xml_updates, routes.not_in_xml)


def test_a_small_backlog_goes_one_by_one() -> None:
    """Below the bulk threshold every change goes through the single endpoints."""
    routes = route([change(1, Operation.CREATE)], [change(2)], [], xml=False, bulk=False)

    assert ([1, 2], (), ()) == (seqs(routes.singles), routes.bulk_creates, routes.bulk_updates)


def test_xml_mode_writes_files_and_sets_contact_type_changes_aside() -> None:
    """In XML mode nothing goes through the API: creates and updates to files, contact-type
    changes (which have no XML form) to the dead letters.
    """
    routes = route(
        [change(1, Operation.CREATE, query={"source": "POS"})],
        [change(2)],
        [change(3, Operation.PROMOTE)],
        xml=True,
        bulk=True,
    )

    assert ([1], [2], [3]) == (
        seqs(routes.xml_creates),
        seqs(routes.xml_updates),
        seqs(routes.not_in_xml),
    )
    assert ((), (), ()) == (routes.singles, routes.bulk_creates, routes.bulk_updates)


def test_failures_are_matched_by_index_then_id_then_key() -> None:
    """A failure names its row by index, contact id or key; each is dead with its reason."""
    rows = [
        change(10, batch_index=0),
        change(11, batch_index=1, contact_id="aaaaaaaa-0000-0000-0000-000000000001"),
        change(12, batch_index=2),
    ]
    status = BatchStatus(
        finished=True,
        failures=(
            ItemFailure(index=0, error_code="InvalidEmail", message="bad email"),
            ItemFailure(contact_id="AAAAAAAA-0000-0000-0000-000000000001", error_code="X"),
            ItemFailure(key="C12@EXAMPLE.COM", error_code="Y", message="no"),
        ),
    )

    failed, resend = attribute_failures(rows, status)

    assert {
        10: ("InvalidEmail", "bad email"),
        11: ("X", "rejected in a bulk batch"),
        12: ("Y", "no"),
    } == failed
    assert set() == resend


def test_unclear_failures_send_the_rest_again() -> None:
    """A failure naming no row, or more failures counted than listed, sends every row not
    known to have failed again, one by one.
    """
    rows = [change(1, batch_index=0), change(2, batch_index=1), change(3, batch_index=2)]

    named_none = BatchStatus(finished=True, failures=(ItemFailure(error_code="Z"),))
    counted_more = BatchStatus(
        finished=True, failures=(ItemFailure(index=1, error_code="Z"),), failed_count=2
    )
    whole = BatchStatus(finished=True, failed_entirely=True)

    assert ({}, {1, 2, 3}) == attribute_failures(rows, named_none)
    assert ({2: ("Z", "rejected in a bulk batch")}, {1, 3}) == attribute_failures(
        rows, counted_more
    )
    assert ({}, {1, 2, 3}) == attribute_failures(rows, whole)


def test_a_create_whose_key_exists_is_sent_again_not_buried() -> None:
    """A bulk create that failed because its key exists is sent again (its lookup finds the
    contact), never dead-lettered.
    """
    rows = [change(1, Operation.CREATE, batch_index=0)]
    status = BatchStatus(
        finished=True,
        failures=(ItemFailure(index=0, error_code="ApprovedContactWithKeyExists"),),
    )

    assert ({}, {1}) == attribute_failures(rows, status)
