"""What ``engage-async`` prints, from the pure formatting functions of `engage_async._output`:
the JSON shapes (public API), tables, cutting to a width, and relative or UTC times.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import attrs
import pytest

from engage_async import _output
from engage_async.admin import OutboxEntry, OutboxStats

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
STATS = OutboxStats(
    by_state={"pending": 2, "inflight": 1, "waiting_guid": 0, "done": 7, "dead": 3},
    oldest_pending_age=181.25,
    paused_until=NOW + timedelta(minutes=10),
    pause_reason="EngageUnavailable: outage",
    batches_in_flight=1,
    waiting_for_api=4,
)
ENTRY = OutboxEntry(
    change_id="chg_" + "a" * 32,
    operation="create",
    state="dead",
    contact_key="ref:ref_" + "b" * 32,
    contact_type="Member",
    attempts=2,
    last_error="422 ValidationError: email",
    created_at=NOW - timedelta(minutes=3, seconds=5),
    ref="ref_" + "b" * 32,
    error_code="ValidationError",
    key="email=a***@e***.com",
    body={"email": "a***@e***.com", "firstName": "A***"},
)
ENTRY_KEYS = {
    "schema": int,
    "change_id": str,
    "operation": str,
    "state": str,
    "contact_key": str,
    "contact_type": (str, type(None)),
    "attempts": int,
    "last_error": (str, type(None)),
    "created_at": str,
    "contact_id": (str, type(None)),
    "ref": (str, type(None)),
    "error_code": (str, type(None)),
    "key": (str, type(None)),
    "exported_to": (str, type(None)),
    "batch_id": (str, type(None)),
}


# --- times -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0 s"),
        (59.9, "59 s"),
        (60, "1 min"),
        (3 * 60 + 59, "3 min"),
        (3599, "59 min"),
        (3600, "1 h"),
        (2 * 3600 + 1800, "2 h"),
        (86399, "23 h"),
        (86400, "1 d"),
        (5 * 86400 + 7, "5 d"),
        (-190, "3 min"),
    ],
)
def test_duration_is_in_its_largest_whole_unit(seconds: float, expected: str) -> None:
    """A duration reads in its largest whole unit (s, min, h, d), rounded down."""
    assert expected == _output.duration(seconds)


def test_relative_times_say_ago_or_in() -> None:
    """A past time reads "N unit ago", a time to come "in N unit", both from the given now."""
    assert "3 min ago" == _output.relative(NOW - timedelta(minutes=3, seconds=5), NOW)
    assert "2 h ago" == _output.relative(NOW - timedelta(hours=2, minutes=59), NOW)
    assert "0 s ago" == _output.relative(NOW, NOW)
    assert "in 10 min" == _output.relative(NOW + timedelta(minutes=10), NOW)


def test_rfc3339_is_utc_with_z() -> None:
    """JSON times are RFC 3339 in UTC with milliseconds and Z, whatever zone they came in."""
    stockholm = datetime(2026, 12, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))

    assert "2026-12-01T13:00:00.123Z" == _output.rfc3339(stockholm)
    assert _output.rfc3339(None) is None


def test_utc_for_people() -> None:
    """The --utc form is the date and time to the second in UTC, marked Z."""
    assert "2026-12-01 11:56:55Z" == _output.utc(ENTRY.created_at)


# --- JSON shapes -----------------------------------------------------------------------------


def test_stats_json_shape(tmp_path: Path) -> None:
    """`outbox stats --json` is one object with the documented keys, types and values."""
    outbox = tmp_path / "outbox.sqlite3"

    record = _output.stats_json(STATS, outbox)

    assert {
        "schema": 1,
        "outbox": str(outbox.resolve()),
        "by_state": {"pending": 2, "inflight": 1, "waiting_guid": 0, "done": 7, "dead": 3},
        "oldest_pending_age_s": 181.25,
        "paused_until": "2026-12-01T12:10:00.000Z",
        "pause_reason": "EngageUnavailable: outage",
        "batches_in_flight": 1,
        "waiting_for_api": 4,
    } == record
    assert record == json.loads(_output.document(record))


def test_stats_json_of_an_idle_outbox(tmp_path: Path) -> None:
    """Nothing waiting and no pause are nulls, not missing keys."""
    idle = OutboxStats(
        by_state=dict.fromkeys(("pending", "inflight", "waiting_guid", "done", "dead"), 0),
        oldest_pending_age=None,
        paused_until=None,
    )

    record = _output.stats_json(idle, tmp_path / "o.sqlite3")

    assert (None, None, None) == (
        record["oldest_pending_age_s"],
        record["paused_until"],
        record["pause_reason"],
    )
    assert (0, 0) == (record["batches_in_flight"], record["waiting_for_api"])


def test_entry_json_shape() -> None:
    """An `outbox list --json` line has exactly the documented keys with their types, and
    no body.
    """
    record = _output.entry_json(ENTRY)

    assert list(ENTRY_KEYS) == list(record)
    for key, kind in ENTRY_KEYS.items():
        assert isinstance(record[key], kind), key
    assert 1 == record["schema"]
    assert "2026-12-01T11:56:55.000Z" == record["created_at"]
    assert "email=a***@e***.com" == record["key"]


def test_entry_json_with_body() -> None:
    """`outbox show --json` is the list object plus the body, as given (masked by the admin)."""
    record = _output.entry_json(ENTRY, body=True)

    assert [*ENTRY_KEYS, "body"] == list(record)
    assert {"email": "a***@e***.com", "firstName": "A***"} == record["body"]
    assert _output.entry_json(attrs.evolve(ENTRY, body=None), body=True)["body"] is None


def test_entry_json_carries_every_entry_field() -> None:
    """Every `OutboxEntry` attribute has its JSON key: a new field must be added to the shape
    on purpose, not forgotten.
    """
    names = {field.name for field in attrs.fields(OutboxEntry)}

    assert names == set(_output.entry_json(ENTRY, body=True)) - {"schema"}


def test_json_line_is_one_line() -> None:
    """A JSON Lines record holds no newline, even when a value does, and reads back equal."""
    record = _output.entry_json(attrs.evolve(ENTRY, last_error="first\nsecond"))

    line = _output.json_line(record)

    assert "\n" not in line
    assert record == json.loads(line)


# --- tables ----------------------------------------------------------------------------------


def test_table_aligns_columns_under_the_header() -> None:
    """Every column starts at the same offset on every line, the header's included, and
    lines carry no trailing spaces.
    """
    lines = _output.table(("A", "LONGER", "LAST"), [("xxxx", "y", ""), ("z", "yyyyyyyy", "end")])

    assert [
        "A     LONGER    LAST",
        "xxxx  y",
        "z     yyyyyyyy  end",
    ] == lines


def test_table_cuts_the_last_column_to_the_width() -> None:
    """With a width, the last column is cut with "..." so that the line fits exactly."""
    lines = _output.table(("ID", "ERROR"), [("1", "x" * 100)], width=40)

    assert "1   " + "x" * 33 + "..." == lines[1]
    assert 40 == len(lines[1])


def test_table_leaves_short_text_and_no_width_alone() -> None:
    """Text that fits is not cut, and without a width (piped output) nothing is."""
    assert "1   short" == _output.table(("ID", "ERROR"), [("1", "short")], width=40)[1]
    assert "1   " + "x" * 100 == _output.table(("ID", "ERROR"), [("1", "x" * 100)])[1]


def test_table_keeps_some_of_the_last_column_on_a_narrow_terminal() -> None:
    """However narrow the terminal, a cut error keeps MIN_LAST_COLUMN characters."""
    lines = _output.table(("ID", "ERROR"), [("1" * 50, "x" * 100)], width=30)

    assert _output.MIN_LAST_COLUMN == len(lines[1]) - len("1" * 50 + "  ")


def test_entries_table_header_relative_times_and_cut_errors() -> None:
    """`outbox list` for people: the header row, one row per change with its time relative
    to now and its error (code first) cut to the width.
    """
    lines = _output.entries_table([ENTRY], now=NOW, width=170)

    assert [
        "CHANGE_ID",
        "STATE",
        "OPERATION",
        "CONTACT",
        "KEY",
        "TRIES",
        "CREATED",
        "ERROR",
    ] == lines[0].split()
    assert 170 == len(lines[1])
    assert [ENTRY.change_id, "dead", "create", ENTRY.contact_key, ENTRY.key, "2"] == (
        lines[1].split()[:6]
    )
    assert lines[1].endswith("3 min ago  [ValidationError] 422 Validati...")
    assert lines[0].index("ERROR") == lines[1].index("[ValidationError]")


def test_entries_table_in_utc() -> None:
    """With in_utc the CREATED column is the UTC time, not a relative one."""
    lines = _output.entries_table([ENTRY], now=NOW, in_utc=True, width=None)

    assert "2026-12-01 11:56:55Z  [ValidationError] 422 ValidationError: email" in lines[1]
    assert "ago" not in lines[1]


def test_entries_table_shows_errors_of_waiting_and_dead_changes_only() -> None:
    """A done change's last error is history: its ERROR cell is empty; empty cells before it
    read "-".
    """
    done = attrs.evolve(ENTRY, state="done", key=None)

    line = _output.entries_table([done], now=NOW, width=None)[1]

    assert "ValidationError" not in line
    assert line.endswith("3 min ago")
    assert ["-"] == [cell for cell in line.split() if cell == "-"]


def test_entry_text_for_people() -> None:
    """`outbox show` for people: one field a line with the time relative, then the body."""
    text = _output.entry_text(ENTRY, now=NOW)

    lines = text.splitlines()
    assert f"change_id     {ENTRY.change_id}" == lines[0]
    assert "created       3 min ago" in lines
    assert "error         [ValidationError] 422 ValidationError: email" in lines
    assert "contact_id    -" in lines
    assert "body:" in lines
    assert ENTRY.body == json.loads(text[text.index("body:") + len("body:") :])
    assert "created       2026-12-01 11:56:55Z" in _output.entry_text(ENTRY, now=NOW, in_utc=True)


def test_stats_text_relative_and_utc() -> None:
    """`outbox stats` for people: aligned counts, the oldest age, and the pause relative to
    now (or its end in UTC).
    """
    lines = _output.stats_text(STATS, now=NOW).splitlines()
    utc_lines = _output.stats_text(STATS, now=NOW, in_utc=True).splitlines()

    assert [
        "pending       2",
        "inflight      1",
        "waiting_guid  0",
        "done          7",
        "dead          3",
        "oldest waiting: 3 min",
        "batches in flight: 1",
        "waiting for the API (options XML cannot carry): 4",
        "paused for 10 min more: EngageUnavailable: outage",
    ] == lines
    assert "paused until 2026-12-01 12:10:00Z: EngageUnavailable: outage" == utc_lines[-1]
