"""The ``engage-async`` command line: help, demo, outbox admin, flush and simulate.

Commands run in-process through `engage_async.cli.main`, in a worker thread when a FakeEngage
in the test's event loop must keep serving meanwhile, and as real subprocesses of the console
script where the process itself matters (signals, logging to stderr). The outbox commands
and the flusher run on both outbox backends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import attrs
import pytest
from helpers import BACKEND, BACKENDS, USER_AGENT, Backend, FakeClock, make_config

import engage_async as ea
from engage_async import cli as cli_module
from engage_async._config import url_without_password
from engage_async._outboxes import open_location, open_outbox
from engage_async._xmlfiles import build_contact, write_file
from engage_async.cli import Exit, main
from engage_async.testing import FakeEngage

SCRIPT = Path(sys.executable).with_name("engage-async")
STATES = ("pending", "inflight", "waiting_guid", "done", "dead")
PERSON = {
    "firstName": "Astrid",
    "lastName": "Lindgren",
    "email": "astrid.lindgren@example.com",
    "mobilePhone": "+46701234567",
    "socialSecurityNumber": "198506059738",
    "street": "Storgatan 12",
}
UNKNOWN = "chg_feedfacefeedfacefeedfacefeedface"
# Generous limits so a broken command fails the test instead of hanging it; never asserted.
PATIENCE = 60.0

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture(name="outbox_schema", autouse=True)
def outbox_schema_fixture(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin commands find this test's PostgreSQL outbox in its schema."""
    if backend.schema is not None:
        monkeypatch.setenv("ENGAGE_OUTBOX_SCHEMA", backend.schema)


def where(config: ea.EngageConfig) -> Path | str:
    """What --outbox names for this test's outbox: its file, or its PostgreSQL URL."""
    return config.outbox_url or config.outbox_path


async def cli(*argv: str | os.PathLike[str]) -> int:
    """Run `main` in a worker thread, so this test's event loop (and FakeEngage) keeps going."""
    return await asyncio.to_thread(main, [os.fspath(arg) for arg in argv])


def counts(line: str) -> dict[str, int]:
    """``sent 2, created 2, ...`` -> {"sent": 2, "created": 2, ...}."""
    return {name: int(number) for name, number in re.findall(r"(\w+) (\d+)", line)}


def state_counts(stdout: str) -> dict[str, int]:
    """The per-state lines of ``outbox stats``."""
    found = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(\w+)\s+(\d+)", line)
        if match:
            found[match[1]] = int(match[2])
    return found


def clear_engage_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every ENGAGE_* variable, so only what the test sets counts (and the schema of
    this test's PostgreSQL outbox, which the admin commands take from the environment).
    """
    for name in list(os.environ):
        if name.startswith("ENGAGE_"):
            monkeypatch.delenv(name)
    if BACKEND.schema is not None:
        monkeypatch.setenv("ENGAGE_OUTBOX_SCHEMA", BACKEND.schema)


def engage_environment(
    monkeypatch: pytest.MonkeyPatch, config: ea.EngageConfig, *, api_key: str | None = None
) -> None:
    """Point the ENGAGE_* variables at `config` (with `api_key` instead, when given)."""
    clear_engage_environment(monkeypatch)
    monkeypatch.setenv("ENGAGE_BASE_URL", config.base_url)
    monkeypatch.setenv("ENGAGE_API_KEY", api_key or config.api_key)
    monkeypatch.setenv("ENGAGE_USER_AGENT", USER_AGENT)
    monkeypatch.setenv("ENGAGE_OUTBOX", str(config.outbox_path))
    for name, value in BACKEND.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ENGAGE_XML_DIR", str(config.xml_dir))
    monkeypatch.setenv("ENGAGE_RATE_LIMIT", "1000")


def rows_of(stdout: str) -> list[list[str]]:
    """The rows of a table printed by `outbox list`, split into words, after its header."""
    lines = stdout.splitlines()
    assert lines[0].split() == [*HEADER]
    return [line.split() for line in lines[1:]]


HEADER = ("CHANGE_ID", "STATE", "OPERATION", "CONTACT", "KEY", "TRIES", "CREATED", "ERROR")


@pytest.fixture(autouse=True)
def _no_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see the output a pipe gets (no cutting) unless they set COLUMNS themselves."""
    monkeypatch.delenv("COLUMNS", raising=False)


def free_port() -> int:
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- help and version ----------------------------------------------------------------------


@pytest.mark.sqlite_only  # not about the outbox's backend
@pytest.mark.parametrize(
    "command",
    [
        [],
        ["demo"],
        ["flush"],
        ["simulate"],
        ["outbox"],
        ["outbox", "stats"],
        ["outbox", "list"],
        ["outbox", "show"],
        ["outbox", "requeue"],
        ["outbox", "discard"],
        ["outbox", "export"],
        ["outbox", "validate-xml"],
        ["outbox", "salvage"],
        ["doctor"],
    ],
    ids=lambda command: " ".join(command) or "top",
)
def test_help_exits_zero(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Every command answers --help with its usage and exit status 0, ending with the one
    exit-status table.
    """
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])

    out = capsys.readouterr().out
    assert 0 == info.value.code
    assert out.startswith("usage: engage-async")
    table = out[out.index("exit status (the same for every command):") :]
    assert [int(code) for code in Exit] == [
        int(line.split()[0]) for line in table.splitlines()[1:] if line[:3].strip().isdigit()
    ]


def test_the_exit_table() -> None:
    """The documented exit statuses: scripts rely on these numbers."""
    assert {"OK": 0, "FAILED": 1, "REFUSED": 2, "NOT_FOUND": 3, "INTERRUPTED": 130} == {
        code.name: int(code) for code in Exit
    }
    assert set(Exit) == set(cli_module.EXIT_MEANINGS)


@pytest.mark.sqlite_only  # not about the outbox's backend
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])

    assert 0 == info.value.code
    assert f"engage-async {ea.__version__}" == capsys.readouterr().out.strip()


@pytest.mark.sqlite_only  # not about the outbox's backend
def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command, the usage goes to stderr and the exit status is 2."""
    with pytest.raises(SystemExit) as info:
        main([])

    assert 2 == info.value.code
    assert "usage: engage-async" in capsys.readouterr().err


# --- demo ------------------------------------------------------------------------------------


@pytest.mark.sqlite_only  # not about the outbox's backend
def test_demo_quiet_prints_the_ok_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --quiet` runs the whole story against its own FakeEngage, prints only the
    verdict, and exits 0.
    """
    code = main(["demo", "--quiet"])

    lines = capsys.readouterr().out.splitlines()
    assert 0 == code
    assert 1 == len(lines)
    assert lines[0].startswith("demo: OK")


@pytest.mark.sqlite_only  # not about the outbox's backend
def test_demo_tells_the_story_without_plain_emails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`demo` prints the story (queued calls, the flush, resolved refs) with emails masked,
    and `--keep` leaves the outbox where asked.
    """
    code = main(["demo", "--keep", str(tmp_path / "kept")])

    out = capsys.readouterr().out
    assert 0 == code
    assert out.rstrip().splitlines()[-1].startswith("demo: OK")
    assert "queued as chg_" in out
    for email in ("astrid@example.com", "bertil@example.com", "cecilia@example.com"):
        assert email not in out
    assert (tmp_path / "kept" / "demo-outbox.sqlite3").is_file()


# --- outbox admin ----------------------------------------------------------------------------


@attrs.frozen
class Rows:
    """An outbox a real session filled while Engage was down, with a dead create in it."""

    path: Path | str
    queued: str
    ref: str
    dead: str
    dependent: str
    done: str


@pytest.fixture(name="rows")
async def rows_fixture(fake: FakeEngage, config: ea.EngageConfig) -> Rows:
    """PERSON's create queued (pending); a second create dead with the contact-type change
    that died with it; a third create done.
    """
    await fake.go_down()
    async with ea.EngageSession(config) as session:
        queued = await session.create_contact(dict(PERSON))
        doomed = await session.create_contact({"email": "dora@example.com", "firstName": "Dora"})
        dependent = await session.promote_to_member(doomed.ref or "")
        finished = await session.create_contact({"email": "elsa@example.com", "firstName": "Elsa"})
    ids = [d.change_id for d in (queued, doomed, dependent, finished)]
    assert all(d.queued for d in (queued, doomed, dependent, finished))
    changes = [change_id for change_id in ids if change_id is not None]
    assert queued.ref is not None
    assert 4 == len(changes)
    outbox = await open_outbox(config)
    try:
        seq = {change_id: (await outbox.get_change(change_id)).seq for change_id in changes}  # type: ignore[union-attr]
        await outbox.bury({seq[changes[1]]: ("ValidationError", "422 ValidationError: email")})
        await outbox.finish([seq[changes[3]]])
    finally:
        await outbox.close()
    return Rows(
        where(config),
        queued=changes[0],
        ref=queued.ref,
        dead=changes[1],
        dependent=changes[2],
        done=changes[3],
    )


async def stats_of(path: Path | str) -> dict[str, int]:
    """The outbox's counts per state, through the admin."""
    async with ea.OutboxAdmin(path, schema=BACKEND.schema or "engage_outbox") as admin:
        return dict((await admin.stats()).by_state)


async def test_outbox_stats(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox stats` prints the count of every state, the oldest waiting change's age and
    the batches in flight.
    """
    code = await cli("outbox", "--outbox", rows.path, "stats")

    out = capsys.readouterr().out
    assert 0 == code
    assert {"pending": 1, "inflight": 0, "waiting_guid": 0, "done": 1, "dead": 2} == (
        state_counts(out)
    )
    assert re.search(r"^oldest waiting: \d+ (s|min)$", out, re.MULTILINE)
    assert "batches in flight: 0" in out.splitlines()
    assert "paused" not in out


async def test_outbox_stats_reads_engage_outbox(
    rows: Rows, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --outbox, the admin commands use $ENGAGE_OUTBOX."""
    clear_engage_environment(monkeypatch)
    variable = "ENGAGE_OUTBOX_URL" if BACKEND.postgres else "ENGAGE_OUTBOX"
    monkeypatch.setenv(variable, str(rows.path))

    code = await cli("outbox", "stats")

    assert 0 == code
    assert 1 == state_counts(capsys.readouterr().out)["pending"]


async def test_outbox_stats_shows_a_pause(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """A flushers' pause in force is printed with its end (UTC, with --utc) and reason."""
    clock = FakeClock(wall=time.time())
    until = clock.wall() + 3600
    outbox = await open_location(
        rows.path, schema=BACKEND.schema or "engage_outbox", clock=clock, create=False
    )
    try:
        await outbox.set_pause(delay=3600, reason="EngageUnavailable: outage", outages=3)
    finally:
        await outbox.close()

    code = await cli("outbox", "--outbox", rows.path, "stats", "--utc")

    expected = f"paused until {datetime.fromtimestamp(until, UTC):%Y-%m-%d %H:%M:%S}Z"
    assert 0 == code
    assert f"{expected}: EngageUnavailable: outage" in capsys.readouterr().out.splitlines()


@pytest.mark.sqlite_only  # not about the outbox's backend
async def test_outbox_stats_without_an_outbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The admin on a path with no outbox exits 2 with a message and creates no file."""
    missing = tmp_path / "missing.sqlite3"

    code = await cli("outbox", "--outbox", missing, "stats")

    captured = capsys.readouterr()
    assert 2 == code
    assert "no outbox" in captured.err
    assert "" == captured.out
    assert [] == list(tmp_path.iterdir())


async def test_outbox_list_masks_personal_data(
    rows: Rows, capsys: pytest.CaptureFixture[str]
) -> None:
    """`outbox list` prints a header row and one row per change, oldest first, with personal
    data masked.
    """
    code = await cli("outbox", "--outbox", rows.path, "list")

    out = capsys.readouterr().out
    table = rows_of(out)
    assert 0 == code
    assert [rows.queued, rows.dead, rows.dependent, rows.done] == [row[0] for row in table]
    assert table[0][4].startswith("email=")
    for name, value in PERSON.items():
        assert value not in out, name
    assert "dora@example.com" not in out


async def test_outbox_list_reveal(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox list --reveal` shows the key values in plain."""
    code = await cli("outbox", "--outbox", rows.path, "list", "--reveal")

    out = capsys.readouterr().out
    assert 0 == code
    assert f"email={PERSON['email']}" in out
    assert "email=dora@example.com" in out


async def test_outbox_list_dead_shows_why(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox list --state dead` lists the dead changes with their error code and reason."""
    code = await cli("outbox", "--outbox", rows.path, "list", "--state", "dead")

    lines = capsys.readouterr().out.splitlines()[1:]
    assert 0 == code
    assert [rows.dead, rows.dependent] == [line.split()[0] for line in lines]
    assert lines[0].endswith("[ValidationError] 422 ValidationError: email")
    assert "[CreateDead]" in lines[1]


async def test_outbox_list_by_key_and_limit(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox list --key REF` lists that contact only; --limit caps the lines."""
    assert 0 == await cli("outbox", "--outbox", rows.path, "list", "--key", rows.ref)
    by_key = rows_of(capsys.readouterr().out)
    assert 0 == await cli("outbox", "--outbox", rows.path, "list", "--limit", "2")
    limited = rows_of(capsys.readouterr().out)

    assert [rows.queued] == [row[0] for row in by_key]
    assert [rows.queued, rows.dead] == [row[0] for row in limited]


async def test_outbox_list_refuses_a_bad_limit(
    rows: Rows, capsys: pytest.CaptureFixture[str]
) -> None:
    """A limit below 1 exits 2 with a message naming it."""
    code = await cli("outbox", "--outbox", rows.path, "list", "--limit", "0")

    assert 2 == code
    assert "limit" in capsys.readouterr().err


async def test_outbox_show_masks_personal_data(
    rows: Rows, capsys: pytest.CaptureFixture[str]
) -> None:
    """`outbox show ID --json` prints the change as JSON, body included, with personal data
    masked.
    """
    code = await cli("outbox", "--outbox", rows.path, "show", rows.queued, "--json")

    out = capsys.readouterr().out
    record = json.loads(out)
    assert 0 == code
    assert rows.queued == record["change_id"]
    assert "pending" == record["state"]
    assert set(PERSON) <= set(record["body"])
    for name, value in PERSON.items():
        assert value not in out, name


async def test_outbox_show_reveal(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox show ID --json --reveal` prints the personal data in plain."""
    code = await cli("outbox", "--outbox", rows.path, "show", rows.queued, "--json", "--reveal")

    record = json.loads(capsys.readouterr().out)
    assert 0 == code
    for name, value in PERSON.items():
        assert value == record["body"][name]


async def test_outbox_show_unknown_change(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox show` of an unknown id exits 3 (not found) with a message, printing nothing
    else.
    """
    code = await cli("outbox", "--outbox", rows.path, "show", UNKNOWN)

    captured = capsys.readouterr()
    assert Exit.NOT_FOUND == code
    assert UNKNOWN in captured.err
    assert "" == captured.out


async def test_outbox_requeue_one(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox requeue ID` makes that dead change pending again (with what died with it)."""
    code = await cli("outbox", "--outbox", rows.path, "requeue", rows.dead)

    (row,) = rows_of(capsys.readouterr().out)
    assert 0 == code
    assert [rows.dead, "pending"] == row[:2]
    assert {"pending": 3, "inflight": 0, "waiting_guid": 0, "done": 1, "dead": 0} == (
        await stats_of(rows.path)
    )


async def test_outbox_requeue_all(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox requeue --all` requeues every dead change and says how many."""
    code = await cli("outbox", "--outbox", rows.path, "requeue", "--all")

    assert 0 == code
    assert "requeued 2 dead change(s)" == capsys.readouterr().out.strip()
    assert 0 == (await stats_of(rows.path))["dead"]


@pytest.mark.parametrize("arguments", [[], ["--all", "chg_x"]], ids=["neither", "both"])
async def test_outbox_requeue_needs_an_id_or_all(
    rows: Rows, arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`outbox requeue` with neither an id nor --all (or with both) exits 2 and changes
    nothing.
    """
    code = await cli("outbox", "--outbox", rows.path, "requeue", *arguments)

    assert 2 == code
    assert "--all" in capsys.readouterr().err
    assert 2 == (await stats_of(rows.path))["dead"]


async def test_outbox_requeue_of_a_done_change_fails(
    rows: Rows, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requeueing a done change exits 2 with a message saying it is done."""
    code = await cli("outbox", "--outbox", rows.path, "requeue", rows.done)

    assert 2 == code
    assert "done" in capsys.readouterr().err


async def test_outbox_discard(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox discard ID --reason R` dead-letters the change as Discarded with the reason."""
    code = await cli(
        "outbox", "--outbox", rows.path, "discard", rows.queued, "--reason", "duplicate signup"
    )

    out = capsys.readouterr().out
    (row,) = rows_of(out)
    assert 0 == code
    assert [rows.queued, "dead"] == row[:2]
    assert "[Discarded] discarded: duplicate signup" in out
    assert PERSON["email"] not in out
    assert 3 == (await stats_of(rows.path))["dead"]


@pytest.mark.sqlite_only  # not about the outbox's backend
def test_outbox_discard_needs_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox discard ID` without --reason is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as info:
        main(["outbox", "discard", "chg_x"])

    assert 2 == info.value.code
    assert "--reason" in capsys.readouterr().err


async def test_outbox_export(
    rows: Rows, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`outbox export PATH` writes the changes not done as JSON lines (mode 0600) and says how
    many; the personal data goes to the file, not to the terminal.
    """
    target = tmp_path / "export.jsonl"

    code = await cli("outbox", "--outbox", rows.path, "export", target)

    out = capsys.readouterr().out
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert 0 == code
    assert f"exported 3 change(s) to {target}" == out.strip()
    assert [rows.queued, rows.dead, rows.dependent] == [r["change_id"] for r in records]
    assert PERSON["email"] == records[0]["body"]["email"]
    assert PERSON["email"] not in out
    assert 0o600 == stat.S_IMODE(target.stat().st_mode)


@pytest.mark.sqlite_only  # not about the outbox's backend
async def test_outbox_validate_xml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox validate-xml` exits 0 for a valid file, 1 when any file is invalid, and says
    which is which.
    """
    valid = write_file(tmp_path, [build_contact(1, "Member", {"email": "anna@example.com"})])
    invalid = tmp_path / "broken_contacts.xml"
    invalid.write_text(
        '<contacts xmlns="http://eClub.Schemas.ImportContact"><new><member>'
        "<birthDay>1985-13-45</birthDay></member></new></contacts>"
    )

    assert 0 == await cli("outbox", "validate-xml", valid)
    valid_out = capsys.readouterr().out
    assert 1 == await cli("outbox", "validate-xml", invalid)
    invalid_out = capsys.readouterr().out
    assert 1 == await cli("outbox", "validate-xml", valid, invalid)
    both_out = capsys.readouterr().out

    assert f"{valid}: valid" == valid_out.strip()
    assert invalid_out.startswith(f"{invalid}: INVALID")
    assert "birthDay" in invalid_out
    assert "1985-13-45" not in invalid_out
    assert f"{valid}: valid" in both_out.splitlines()
    assert f"{invalid}: INVALID" in both_out.splitlines()


@pytest.mark.sqlite_only  # not about the outbox's backend
def test_outbox_validate_xml_needs_no_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """validate-xml works without any outbox or Engage configuration."""
    clear_engage_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    valid = write_file(tmp_path, [build_contact(1, "Contact", {"email": "bo@example.com"})])

    assert 0 == main(["outbox", "validate-xml", str(valid)])
    assert [valid.name] == [p.name for p in tmp_path.iterdir()]
    capsys.readouterr()


# --- JSON for scripts, tables and times for people -----------------------------------------

STATS_KEYS = {
    "schema": int,
    "outbox": str,
    "by_state": dict,
    "oldest_pending_age_s": float,
    "paused_until": type(None),
    "pause_reason": type(None),
    "batches_in_flight": int,
    "waiting_for_api": int,
}
ENTRY_KEYS = (
    "schema",
    "change_id",
    "operation",
    "state",
    "contact_key",
    "contact_type",
    "attempts",
    "last_error",
    "created_at",
    "contact_id",
    "ref",
    "error_code",
    "key",
    "exported_to",
    "batch_id",
)
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def created_at(path: Path | str, change_id: str) -> datetime:
    """When the outbox accepted `change_id`."""
    admin = ea.OutboxAdmin(path, schema=BACKEND.schema or "engage_outbox")
    return (await admin.show(change_id)).created_at


async def test_outbox_stats_json(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox stats --json` prints one object of the documented keys and types (schema 1),
    with the counts of every state and the outbox's absolute path.
    """
    code = await cli("outbox", "--outbox", rows.path, "stats", "--json")

    record = json.loads(capsys.readouterr().out)
    assert 0 == code
    assert list(STATS_KEYS) == list(record)
    for key, kind in STATS_KEYS.items():
        assert isinstance(record[key], kind), key
    assert 1 == record["schema"]
    where = rows.path
    expected = str(where.resolve()) if isinstance(where, Path) else url_without_password(where)
    assert expected == record["outbox"]
    assert {"pending": 1, "inflight": 0, "waiting_guid": 0, "done": 1, "dead": 2} == (
        record["by_state"]
    )
    assert record["oldest_pending_age_s"] >= 0


async def test_outbox_stats_json_with_a_pause(
    rows: Rows, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pause in force is in the JSON as its end (RFC 3339, UTC) and its reason."""
    clock = FakeClock(wall=time.time())
    until = datetime.fromtimestamp(clock.wall() + 3600, UTC)
    outbox = await open_location(
        rows.path, schema=BACKEND.schema or "engage_outbox", clock=clock, create=False
    )
    try:
        await outbox.set_pause(delay=3600, reason="EngageUnavailable: outage", outages=3)
    finally:
        await outbox.close()

    code = await cli("outbox", "--outbox", rows.path, "stats", "--json")

    record = json.loads(capsys.readouterr().out)
    assert 0 == code
    assert RFC3339_UTC.fullmatch(record["paused_until"])
    expected = until.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert expected == record["paused_until"]
    assert "EngageUnavailable: outage" == record["pause_reason"]


async def test_outbox_stats_relative_pause(
    rows: Rows, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --utc the pause reads as the time it has left, from the command's clock."""
    clock = FakeClock(wall=time.time())
    outbox = await open_location(
        rows.path, schema=BACKEND.schema or "engage_outbox", clock=clock, create=False
    )
    try:
        await outbox.set_pause(delay=3600, reason="EngageUnavailable: outage", outages=3)
    finally:
        await outbox.close()
    clock.advance(50 * 60 + 30)
    monkeypatch.setattr(cli_module, "_CLOCK", clock)

    code = await cli("outbox", "--outbox", rows.path, "stats")

    assert 0 == code
    assert "paused for 9 min more: EngageUnavailable: outage" in (
        capsys.readouterr().out.splitlines()
    )


async def test_outbox_list_json_lines(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox list --json` prints JSON Lines: one object per change, oldest first, with the
    documented keys, RFC 3339 times and personal data masked.
    """
    code = await cli("outbox", "--outbox", rows.path, "list", "--json")

    out = capsys.readouterr().out
    records = [json.loads(line) for line in out.splitlines()]
    assert 0 == code
    assert [rows.queued, rows.dead, rows.dependent, rows.done] == [r["change_id"] for r in records]
    assert [list(ENTRY_KEYS)] * 4 == [list(r) for r in records]
    assert all(RFC3339_UTC.fullmatch(r["created_at"]) for r in records)
    assert ["create", "create", "contact_type", "create"] == [r["operation"] for r in records]
    assert ("ValidationError", "422 ValidationError: email") == (
        records[1]["error_code"],
        records[1]["last_error"],
    )
    assert records[0]["key"].startswith("email=")
    assert rows.ref == records[0]["ref"]
    for name, value in PERSON.items():
        assert value not in out, name
    assert "dora@example.com" not in out


async def test_outbox_list_json_reveal(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox list --json --reveal` carries the key values in plain."""
    code = await cli("outbox", "--outbox", rows.path, "list", "--json", "--reveal")

    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert 0 == code
    assert f"email={PERSON['email']}" == records[0]["key"]
    assert "email=dora@example.com" == records[1]["key"]


async def test_outbox_list_of_nothing(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """No change to list: nothing on stdout (no header, no JSON line), a word on stderr for a
    person, and exit 0.
    """
    assert 0 == await cli("outbox", "--outbox", rows.path, "list", "--state", "inflight")
    people = capsys.readouterr()
    assert 0 == await cli("outbox", "--outbox", rows.path, "list", "--state", "inflight", "--json")
    scripts = capsys.readouterr()

    assert ("", "engage-async: no changes\n") == (people.out, people.err)
    assert ("", "") == (scripts.out, scripts.err)


async def test_outbox_show_json_shape(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox show --json` is one object: the list keys plus the body."""
    code = await cli("outbox", "--outbox", rows.path, "show", rows.dependent, "--json")

    record = json.loads(capsys.readouterr().out)
    assert 0 == code
    assert [*ENTRY_KEYS, "body"] == list(record)
    assert ("contact_type", "dead", "CreateDead") == (
        record["operation"],
        record["state"],
        record["error_code"],
    )


async def test_outbox_show_for_people(rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox show ID` prints one field a line and the body, personal data masked."""
    code = await cli("outbox", "--outbox", rows.path, "show", rows.queued)

    out = capsys.readouterr().out
    fields = dict(line.split(maxsplit=1) for line in out.split("body:")[0].splitlines())
    assert 0 == code
    assert (rows.queued, "pending", "create", rows.ref) == (
        fields["change_id"],
        fields["state"],
        fields["operation"],
        fields["ref"],
    )
    assert set(PERSON) <= set(json.loads(out.split("body:")[1]))
    for name, value in PERSON.items():
        assert value not in out, name


async def test_outbox_list_aligns_columns_under_the_header(
    rows: Rows, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every column of `outbox list` starts where its header does, on every row."""
    code = await cli("outbox", "--outbox", rows.path, "list")

    header, *lines = capsys.readouterr().out.splitlines()
    starts = [header.index(name) for name in HEADER[:-1]]
    assert 0 == code
    for line in lines:
        assert all(line[start - 2 : start] == "  " for start in starts[1:]), line
        assert all(line[start] != " " for start in starts), line


async def test_outbox_list_cuts_errors_to_the_terminal_width(
    rows: Rows, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With COLUMNS set (a terminal), a long error is cut with "..." so its line fits; the
    JSON keeps it whole.
    """
    full = "[ValidationError] 422 ValidationError: email"
    assert 0 == await cli("outbox", "--outbox", rows.path, "list", "--state", "dead")
    lead = capsys.readouterr().out.splitlines()[0].index("ERROR")
    width = lead + 30
    monkeypatch.setenv("COLUMNS", str(width))

    code = await cli("outbox", "--outbox", rows.path, "list", "--state", "dead")
    lines = capsys.readouterr().out.splitlines()
    assert 0 == await cli("outbox", "--outbox", rows.path, "list", "--state", "dead", "--json")
    first = json.loads(capsys.readouterr().out.splitlines()[0])

    assert 0 == code
    assert [True] * 3 == [len(line) <= width for line in lines]
    assert width == len(lines[1])
    assert lines[1].endswith(full[:27] + "...")
    assert full == f"[{first['error_code']}] {first['last_error']}"


async def test_outbox_list_times_relative_or_utc(
    rows: Rows, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CREATED reads "3 min ago" from the command's clock, or the UTC time with --utc."""
    created = await created_at(rows.path, rows.queued)
    monkeypatch.setattr(cli_module, "_CLOCK", FakeClock(wall=created.timestamp() + 185))

    assert 0 == await cli("outbox", "--outbox", rows.path, "list", "--limit", "1")
    header, relative = capsys.readouterr().out.splitlines()
    assert 0 == await cli("outbox", "--outbox", rows.path, "list", "--limit", "1", "--utc")
    utc_header, in_utc = capsys.readouterr().out.splitlines()

    column = slice(header.index("CREATED"), header.index("ERROR"))
    utc_column = slice(utc_header.index("CREATED"), utc_header.index("ERROR"))
    assert "3 min ago" == relative[column].strip()
    assert f"{created:%Y-%m-%d %H:%M:%S}Z" == in_utc[utc_column].strip()


# --- exit statuses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["stats"], Exit.OK),
        (["list", "--limit", "0"], Exit.REFUSED),
        (["show", UNKNOWN], Exit.NOT_FOUND),
        (["show", "anna@example.com"], Exit.REFUSED),
        (["requeue", UNKNOWN], Exit.NOT_FOUND),
        (["discard", UNKNOWN, "--reason", "gone"], Exit.NOT_FOUND),
        (["requeue", "DONE"], Exit.REFUSED),
        (["discard", "DONE", "--reason", "too late"], Exit.REFUSED),
        (["requeue"], Exit.REFUSED),
        (["export", "OUTBOX"], Exit.REFUSED),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value.name,
)
async def test_outbox_exit_statuses(
    rows: Rows, arguments: list[str], expected: Exit, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each outbox action exits with the table's status for its situation; anything but 0
    says why on stderr and prints nothing on stdout.
    """
    given = [
        {"DONE": rows.done, "OUTBOX": str(rows.path)}.get(argument, argument)
        for argument in arguments
    ]

    code = await cli("outbox", "--outbox", rows.path, *given)

    captured = capsys.readouterr()
    assert expected == code
    if expected != Exit.OK:
        assert ("", True) == (captured.out, captured.err.startswith("engage-async: "))


@pytest.mark.parametrize(
    "arguments",
    [
        ["outbox", "list", "--state", "lost"],
        ["outbox", "show"],
        ["outbox", "shred"],
        ["flush", "--fallback-mode", "soap"],
        ["simulate", "--port", "eighty"],
        ["doctor", "--api-version", "4"],
        ["demo", "--loud"],
    ],
    ids=" ".join,
)
def test_usage_errors_exit_2(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error in any command exits 2 (argparse's status, the table's REFUSED) with
    the usage on stderr.
    """
    with pytest.raises(SystemExit) as info:
        main(arguments)

    assert Exit.REFUSED == info.value.code
    assert "usage: engage-async" in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command interrupted by Ctrl-C (KeyboardInterrupt) exits 130, without a traceback."""

    async def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_demo", interrupted)

    assert Exit.INTERRUPTED == main(["demo"])


# --- flush -----------------------------------------------------------------------------------


async def queue_two_creates(fake: FakeEngage, config: ea.EngageConfig) -> None:
    """Queue two creates while Engage is down, then bring it back."""
    await fake.go_down()
    async with ea.EngageSession(config) as session:
        for email in ("anna@example.com", "bo@example.com"):
            delivery = await session.create_contact({"email": email, "firstName": "Anna"})
            assert delivery.queued
    await fake.come_up()


async def test_flush_once_drains_the_outbox(
    fake: FakeEngage,
    config: ea.EngageConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`flush --once`, configured by ENGAGE_* variables, sends what is queued and prints the
    counts.
    """
    await queue_two_creates(fake, config)
    engage_environment(monkeypatch, config)

    code = await cli("flush", "--once", "--no-progress")

    report = counts(capsys.readouterr().out)
    assert 0 == code
    assert {
        "sent",
        "created",
        "updated",
        "reconciled",
        "dead",
        "exported",
        "uploaded",
        "pending",
    } == set(report)
    assert (2, 2, 0, 0) == (report["sent"], report["created"], report["dead"], report["pending"])
    assert 1 == len(fake.find("email", "anna@example.com"))
    assert 1 == len(fake.find("email", "bo@example.com"))
    assert 2 == (await stats_of(where(config)))["done"]


async def test_flush_once_flags_override_the_environment(
    fake: FakeEngage,
    config: ea.EngageConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--outbox (--outbox-url, --outbox-schema) and --base-url win over ENGAGE_OUTBOX
    (ENGAGE_OUTBOX_URL, ENGAGE_OUTBOX_SCHEMA) and ENGAGE_BASE_URL.
    """
    await queue_two_creates(fake, config)
    engage_environment(monkeypatch, config)
    monkeypatch.setenv("ENGAGE_OUTBOX", str(config.outbox_path.with_name("elsewhere.sqlite3")))
    monkeypatch.setenv("ENGAGE_BASE_URL", "https://tenant.example.invalid")
    flag: tuple[str | Path, ...] = ("--outbox", config.outbox_path)
    if config.outbox_url is not None:
        monkeypatch.setenv("ENGAGE_OUTBOX_URL", "postgresql://nobody@127.0.0.1:9/elsewhere")
        monkeypatch.setenv("ENGAGE_OUTBOX_SCHEMA", "elsewhere")
        flag = ("--outbox-url", config.outbox_url, "--outbox-schema", config.outbox_schema)

    code = await cli("flush", "--once", "--no-progress", *flag, "--base-url", fake.url)

    assert 0 == code
    assert 0 == counts(capsys.readouterr().out)["pending"]
    assert not config.outbox_path.with_name("elsewhere.sqlite3").exists()


@pytest.mark.sqlite_only  # not about the outbox's backend
def test_flush_without_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing ENGAGE_API_KEY exits 2 with a message naming the variable, before any
    outbox is made.
    """
    clear_engage_environment(monkeypatch)
    monkeypatch.setenv("ENGAGE_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ENGAGE_USER_AGENT", USER_AGENT)
    monkeypatch.setenv("ENGAGE_OUTBOX", str(tmp_path / "outbox.sqlite3"))

    code = main(["flush", "--once"])

    captured = capsys.readouterr()
    assert 2 == code
    assert "ENGAGE_API_KEY" in captured.err
    assert "" == captured.out
    assert [] == list(tmp_path.iterdir())


SECRET = "s3cr3t-Key-never-printed"
WRONG_SECRET = "wr0ng-Key-never-printed-either"


@pytest.fixture(name="secret_fake")
async def secret_fake_fixture() -> AsyncIterator[FakeEngage]:
    """A FakeEngage that only takes SECRET."""
    async with FakeEngage(api_key=SECRET, rate_limit=None) as fake:
        yield fake


@pytest.mark.parametrize("key", [SECRET, WRONG_SECRET, f"{SECRET} with spaces"])
async def test_flush_never_prints_the_api_key(
    secret_fake: FakeEngage,
    tmp_path: Path,
    key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whether the key is right, wrong or malformed, it appears in no output nor log line."""
    caplog.set_level(logging.DEBUG)
    config = make_config(secret_fake.url, SECRET, tmp_path)
    await queue_two_creates(secret_fake, config)
    engage_environment(monkeypatch, config, api_key=key)

    code = await cli("--log-level", "DEBUG", "flush", "--once")

    captured = capsys.readouterr()
    said = captured.out + captured.err + caplog.text
    if key == SECRET:
        assert 0 == code
    for secret in (SECRET, WRONG_SECRET, "s3cr3t", "wr0ng"):
        assert secret not in said


async def test_flush_once_with_a_refused_api_key_fails(
    secret_fake: FakeEngage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A key Engage refuses (401) is a configuration problem: `flush --once` exits 2 and
    says so on stderr, instead of reporting a normal run with everything still pending.
    """
    config = make_config(secret_fake.url, SECRET, tmp_path)
    await queue_two_creates(secret_fake, config)
    engage_environment(monkeypatch, config, api_key=WRONG_SECRET)

    code = await cli("flush", "--once", "--no-progress")

    captured = capsys.readouterr()
    assert Exit.REFUSED == code
    assert "401" in captured.err
    assert WRONG_SECRET not in captured.out + captured.err


async def test_flush_subprocess_never_prints_the_api_key(
    secret_fake: FakeEngage, tmp_path: Path
) -> None:
    """The console script, logging at DEBUG to stderr, drains the outbox without printing
    the key.
    """
    config = make_config(secret_fake.url, SECRET, tmp_path)
    await queue_two_creates(secret_fake, config)
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGAGE_")}
    env |= {
        "ENGAGE_BASE_URL": secret_fake.url,
        "ENGAGE_API_KEY": SECRET,
        "ENGAGE_USER_AGENT": USER_AGENT,
        "ENGAGE_OUTBOX": str(config.outbox_path),
        "ENGAGE_RATE_LIMIT": "1000",
        **BACKEND.env(),
    }
    process = await asyncio.create_subprocess_exec(
        SCRIPT,
        "--log-level",
        "DEBUG",
        "flush",
        "--once",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(PATIENCE):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert 0 == process.returncode, err.decode()
    assert 0 == counts(out.decode().strip().splitlines()[-1])["pending"]
    assert SECRET.encode() not in out + err
    assert 2 == len(secret_fake.contacts)


# --- simulate --------------------------------------------------------------------------------


async def post_contact(url: str, key: str, body: dict[str, str]) -> tuple[int, dict[str, object]]:
    """POST a create to the simulator at `url` the way Engage wants it."""
    headers = {"apikey": key, "User-Agent": USER_AGENT, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/api/v3/contacts", json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def stop(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """SIGTERM the process and collect the rest of its output."""
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(PATIENCE):
        return await process.communicate()


async def start_simulator(*arguments: str) -> tuple[asyncio.subprocess.Process, str, str]:
    """Start `engage-async simulate` and read its URL and key from its first line."""
    process = await asyncio.create_subprocess_exec(
        SCRIPT,
        "simulate",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(PATIENCE):
            first = (await process.stdout.readline()).decode()
    except BaseException:
        process.kill()
        await process.communicate()
        raise
    match = re.fullmatch(r"FakeEngage listening on (\S+) \(api key: (\S+)\)\n", first)
    if match is None:
        process.kill()
        _, err = await process.communicate()
        pytest.fail(f"unexpected first line {first!r}; stderr: {err.decode()}")
    return process, match[1], match[2]


@pytest.mark.sqlite_only  # not about the outbox's backend
async def test_simulate_serves_fake_engage() -> None:
    """`simulate --port N` serves FakeEngage on that port with the printed key, and exits 0
    on SIGTERM.
    """
    port = free_port()
    process, url, key = await start_simulator("--port", str(port))
    try:
        status, contact = await post_contact(url, key, {"email": "sim@example.com"})
        refused, _ = await post_contact(url, "not-the-key", {"email": "other@example.com"})
    finally:
        out, err = await stop(process)

    assert f"http://127.0.0.1:{port}" == url
    assert "fake-api-key" == key
    assert 201 == status
    assert re.fullmatch(r"[0-9a-f-]{36}", str(contact["id"]))
    assert 401 == refused
    assert 0 == process.returncode, err.decode()
    assert b"Ctrl+C" in out


@pytest.mark.sqlite_only  # not about the outbox's backend
async def test_simulate_takes_the_api_key_flag() -> None:
    """`simulate --api-key K` accepts K (and prints it: it is the simulator's, not Engage's)."""
    process, url, key = await start_simulator("--port", "0", "--api-key", "my-test-key")
    try:
        status, _ = await post_contact(url, "my-test-key", {"email": "sim@example.com"})
    finally:
        await stop(process)

    assert "my-test-key" == key
    assert 201 == status
    assert 0 == process.returncode
