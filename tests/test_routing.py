"""The flusher's pure decisions: which way each claimed change goes (`route`), how bulk
items are split into requests (`bulk_chunks`), and which rows of a finished bulk batch failed
(`attribute_failures`).
"""

from __future__ import annotations

from typing import Any

from engage_async._batches import attribute_failures
from engage_async._changes import Change, Operation, State
from engage_async._http import BatchStatus, ItemFailure
from engage_async._sender import MAX_BULK_BYTES, bulk_chunks, route


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


def test_a_failure_repeating_what_its_item_sent_keeps_none_of_it() -> None:
    """Engage's reason for a failed item may quote the item's own values (a name, a street,
    a number): the reason kept as the change's last error has none of them, nor emails.
    """
    body = {"lastName": "Ålandersson", "street": "Storgatan 12", "memberNumber": 19121212}
    rows = [change(10, batch_index=0, body=body)]
    reason = "lastName Ålandersson at Storgatan 12 (19121212, anna@example.com) is refused"
    status = BatchStatus(
        finished=True, failures=(ItemFailure(index=0, error_code="Invalid", message=reason),)
    )

    failed, _ = attribute_failures(rows, status)

    assert {10: ("Invalid", "lastName *** at *** (***, ***) is refused")} == failed


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


# --- bulk_chunks ------------------------------------------------------------------------------


def _array_bytes(sizes: list[int]) -> int:
    return 2 + sum(sizes) + max(0, len(sizes) - 1)


def test_bulk_chunks_keep_every_item_once_in_order_under_both_limits() -> None:
    """Ranges cover the items in order, none longer than max_items nor heavier than
    max_bytes as a JSON array.
    """
    sizes = [100, 300, 50, 900, 20, 20, 20, 400, 10, 700]
    ranges = bulk_chunks(sizes, max_items=3, max_bytes=1000)

    assert [index for start, end in ranges for index in range(start, end)] == list(range(10))
    assert all(end - start <= 3 for start, end in ranges)
    assert all(_array_bytes(sizes[start:end]) <= 1000 for start, end in ranges)
    # Greedy: a range ends only when the next item would break a limit.
    for start, end in ranges[:-1]:
        assert end - start == 3 or _array_bytes(sizes[start : end + 1]) > 1000


def test_bulk_chunks_count_brackets_and_commas() -> None:
    """Two items of 4 bytes make ``[aaaa,bbbb]``, 11 bytes: they fit 11, not 10."""
    assert [(0, 2)] == bulk_chunks([4, 4], max_items=10, max_bytes=11)
    assert [(0, 1), (1, 2)] == bulk_chunks([4, 4], max_items=10, max_bytes=10)


def test_an_item_over_the_byte_limit_goes_alone() -> None:
    """It cannot be split; sent alone, Engage gives it its own answer."""
    assert [(0, 1), (1, 2), (2, 3)] == bulk_chunks([5, 50, 5], max_items=10, max_bytes=20)
    assert [] == bulk_chunks([], max_items=10, max_bytes=20)


def test_4000_items_of_the_largest_payload_are_split_under_the_byte_limit() -> None:
    """The payload limit (64 KiB) times Engage's 4000 items would be 256 MiB in one body."""
    ranges = bulk_chunks([64 * 1024] * 4000, max_items=4000, max_bytes=MAX_BULK_BYTES)

    assert len(ranges) > 1
    assert all(_array_bytes([64 * 1024] * (end - start)) <= MAX_BULK_BYTES for start, end in ranges)
