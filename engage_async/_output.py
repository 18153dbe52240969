"""What ``engage-async`` prints: JSON documents for scripts, tables and relative times for people.

Everything here is pure: the command passes in what it read, the time it calls now and the
terminal's width, and prints what comes back. Personal data is masked before it gets here
(`OutboxAdmin` masks unless asked to reveal); nothing here unmasks or logs.

JSON is public API. Every object carries ``"schema": 1``; keys are snake_case; times are
RFC 3339 in UTC (``2026-12-01T21:50:46.311Z``) or null. A later version may add keys, never
rename or remove one nor change its type without raising ``schema``.

``outbox stats --json`` prints one object::

    {
      "schema": 1,
      "outbox": "/abs/path/engage-outbox.sqlite3",
      "by_state": {"pending": 1, "inflight": 0, "waiting_guid": 0, "done": 7, "dead": 2},
      "oldest_pending_age_s": 181.2,        # seconds, or null when nothing waits
      "paused_until": "2026-12-01T22:50:46.000Z",   # or null when the flushers run
      "pause_reason": "EngageUnavailable: ...",     # or null
      "batches_in_flight": 0,
      "waiting_for_api": 0
    }

``outbox list --json`` prints JSON Lines, one object per change, oldest first (nothing for
no change)::

    {"schema": 1, "change_id": "chg_...",
     "operation": "create" | "update" | "contact_type" | "promote",
     "state": "pending" | "inflight" | "waiting_guid" | "done" | "dead",
     "contact_key": "ref:ref_..." | "id:<guid>", "contact_type": "Member" | null,
     "attempts": 0, "last_error": str | null, "created_at": RFC 3339,
     "contact_id": "<guid>" | null, "ref": "ref_..." | null, "error_code": str | null,
     "key": "email=a***@e***.com" | null, "exported_to": str | null, "batch_id": str | null}

``outbox show --json`` prints one such object with ``"body"`` added: the change's JSON as
it goes to Engage (an object, or null for a contact-type change). ``key`` and ``body`` are
masked unless ``--reveal``; ``last_error`` is scrubbed of personal data when it is stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from .admin import OutboxEntry, OutboxStats

__all__ = [
    "MIN_LAST_COLUMN",
    "SCHEMA",
    "document",
    "duration",
    "entries_table",
    "entry_json",
    "entry_text",
    "json_line",
    "relative",
    "rfc3339",
    "stats_json",
    "stats_text",
    "table",
    "terminal_width",
    "utc",
]

SCHEMA: Final = 1
# A cut error still says what kind of failure it was, however narrow the terminal.
MIN_LAST_COLUMN: Final = 24
_ELLIPSIS: Final = "..."
# The last error matters while a change waits or is dead; once done it is history.
_ERROR_STATES: Final = frozenset({"pending", "dead"})


# --- times -------------------------------------------------------------------------------------


def rfc3339(moment: datetime | None) -> str | None:
    """`moment` in UTC as RFC 3339 with milliseconds and ``Z``; None stays None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc(moment: datetime) -> str:
    """`moment` in UTC for people: ``2026-12-01 21:50:46Z``."""
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"


def duration(seconds: float) -> str:
    """A length of time in its largest whole unit: ``12 s``, ``3 min``, ``2 h``, ``5 d``."""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def relative(moment: datetime, now: datetime) -> str:
    """`moment` as seen from `now`: ``3 min ago``, or ``in 2 h`` for a time to come."""
    delta = (now - moment).total_seconds()
    return f"{duration(delta)} ago" if delta >= 0 else f"in {duration(delta)}"


def _when(moment: datetime, now: datetime, *, in_utc: bool) -> str:
    return utc(moment) if in_utc else relative(moment, now)


# --- JSON --------------------------------------------------------------------------------------


def stats_json(stats: OutboxStats, outbox: Path | str) -> dict[str, Any]:
    """The ``outbox stats --json`` object (the module docstring has the shape); `outbox` is
    the SQLite file (shown resolved) or a PostgreSQL outbox's location without its password.
    """
    age = stats.oldest_pending_age
    return {
        "schema": SCHEMA,
        "outbox": str(outbox.resolve()) if isinstance(outbox, Path) else outbox,
        "by_state": dict(stats.by_state),
        "oldest_pending_age_s": None if age is None else round(age, 3),
        "paused_until": rfc3339(stats.paused_until),
        "pause_reason": stats.pause_reason,
        "batches_in_flight": stats.batches_in_flight,
        "waiting_for_api": stats.waiting_for_api,
    }


def entry_json(entry: OutboxEntry, *, body: bool = False) -> dict[str, Any]:
    """One change as ``outbox list --json`` prints it; with `body`, as ``outbox show --json``.

    Spelled out key by key: the shape is public and must not follow `OutboxEntry` silently.
    """
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "change_id": entry.change_id,
        "operation": entry.operation,
        "state": entry.state,
        "contact_key": entry.contact_key,
        "contact_type": entry.contact_type,
        "attempts": entry.attempts,
        "last_error": entry.last_error,
        "created_at": rfc3339(entry.created_at),
        "contact_id": entry.contact_id,
        "ref": entry.ref,
        "error_code": entry.error_code,
        "key": entry.key,
        "exported_to": entry.exported_to,
        "batch_id": entry.batch_id,
    }
    if body:
        record["body"] = None if entry.body is None else dict(entry.body)
    return record


def document(record: dict[str, Any]) -> str:
    """One JSON document, indented for a person who reads it before a script does."""
    return json.dumps(record, indent=2, ensure_ascii=False)


def json_line(record: dict[str, Any]) -> str:
    """One JSON Lines record: compact, no newline inside."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


# --- tables ------------------------------------------------------------------------------------


def terminal_width() -> int | None:
    """Columns to fit lines to: ``COLUMNS``, else the terminal's; None when stdout is no terminal.

    Piped output is not cut, so ``| grep`` sees whole errors (``--json`` is for scripts).
    """
    with contextlib.suppress(KeyError, ValueError):
        columns = int(os.environ["COLUMNS"])
        if columns > 0:
            return columns
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def _cut(text: str, room: int) -> str:
    if len(text) <= room:
        return text
    return text[: max(room - len(_ELLIPSIS), 0)] + _ELLIPSIS


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, width: int | None = None
) -> list[str]:
    """Lines of a table: the header row, then `rows`, columns padded to their widest cell.

    With `width`, the last column (the free text) is cut with ``...`` so that a line fits
    `width` characters, leaving it at least `MIN_LAST_COLUMN` characters.
    """
    rows = [list(row) for row in rows]
    widths = [max(len(row[i]) for row in [list(headers), *rows]) for i in range(len(headers))]
    lead = sum(widths[:-1]) + 2 * (len(headers) - 1)
    room = None if width is None else max(width - lead, MIN_LAST_COLUMN)
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(size) for cell, size in zip(row[:-1], widths, strict=False)]
        last = row[-1] if room is None else _cut(row[-1], room)
        lines.append("  ".join([*cells, last]).rstrip())
    return lines


_ENTRY_HEADERS: Final = ("CHANGE_ID", "STATE", "OPERATION", "CONTACT", "KEY", "TRIES", "CREATED")


def _error(entry: OutboxEntry) -> str:
    if not entry.last_error:
        return ""
    code = f"[{entry.error_code}] " if entry.error_code else ""
    return f"{code}{entry.last_error}"


def entries_table(
    entries: Sequence[OutboxEntry], *, now: datetime, in_utc: bool = False, width: int | None
) -> list[str]:
    """``outbox list`` for people: a header row, one change a line, the error cut to `width`.

    Errors show for pending and dead changes only; times are relative to `now` unless
    `in_utc`.
    """
    rows = [
        (
            entry.change_id,
            entry.state,
            entry.operation,
            entry.contact_key,
            entry.key or "-",
            str(entry.attempts),
            _when(entry.created_at, now, in_utc=in_utc),
            _error(entry) if entry.state in _ERROR_STATES else "",
        )
        for entry in entries
    ]
    return table((*_ENTRY_HEADERS, "ERROR"), rows, width=width)


def entry_text(entry: OutboxEntry, *, now: datetime, in_utc: bool = False) -> str:
    """``outbox show`` for people: one field a line, then the body as indented JSON."""
    fields = (
        ("change_id", entry.change_id),
        ("state", entry.state),
        ("operation", entry.operation),
        ("contact", entry.contact_key),
        ("contact_type", entry.contact_type),
        ("contact_id", entry.contact_id),
        ("ref", entry.ref),
        ("key", entry.key),
        ("attempts", str(entry.attempts)),
        ("created", _when(entry.created_at, now, in_utc=in_utc)),
        ("error", _error(entry) or None),
        ("batch_id", entry.batch_id),
        ("exported_to", entry.exported_to),
    )
    size = max(len(name) for name, _ in fields)
    lines = [f"{name:<{size}}  {value or '-'}" for name, value in fields]
    if entry.body is None:
        lines.append(f"{'body':<{size}}  -")
    else:
        body = json.dumps(dict(entry.body), indent=2, ensure_ascii=False)
        lines += ["body:", *(f"  {line}" for line in body.splitlines())]
    return "\n".join(lines)


def stats_text(stats: OutboxStats, *, now: datetime, in_utc: bool = False) -> str:
    """``outbox stats`` for people: the count of every state, then how the flushers stand."""
    size = max(len(state) for state in stats.by_state)
    lines = [f"{state:<{size}}  {count}" for state, count in stats.by_state.items()]
    age = stats.oldest_pending_age
    lines.append(f"oldest waiting: {'-' if age is None else duration(age)}")
    lines.append(f"batches in flight: {stats.batches_in_flight}")
    if stats.waiting_for_api:
        lines.append(f"waiting for the API (options XML cannot carry): {stats.waiting_for_api}")
    if stats.paused_until is not None:
        until = (
            f"until {utc(stats.paused_until)}"
            if in_utc
            else f"for {duration((stats.paused_until - now).total_seconds())} more"
        )
        lines.append(f"paused {until}: {stats.pause_reason}")
    return "\n".join(lines)
