"""``engage-async``: the demo, the sidecar flusher, the outbox admin and the simulator.

Configuration comes from the ``ENGAGE_*`` environment variables, with flags for the settings
an operator changes per run. The API key is only ever read from ``ENGAGE_API_KEY``: a flag
would show it in the process list.

Data goes to stdout, messages and progress to stderr, never in colour. Every command exits
with a status from one table, `Exit`, which ``--help`` shows; `_output` has the JSON shapes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import attrs

from . import __version__, _output
from ._clock import SYSTEM_CLOCK, Clock
from ._config import EngageConfig
from ._errors import ChangeNotFound, EngageAuthError, EngageConfigurationError, EngageError
from ._flusher import OutboxFlusher
from ._metrics import prometheus_endpoint
from ._migrate import migrate_outbox
from ._models import FlushReport
from ._outboxes import is_outbox_url
from ._xmlfiles import validate_file
from .admin import OutboxAdmin, OutboxEntry

__all__ = ["EXIT_MEANINGS", "Exit", "main"]

_DEFAULT_OUTBOX = "engage-outbox.sqlite3"
# Where the admin commands read the time; tests put a clock of their own here.
_CLOCK: Clock = SYSTEM_CLOCK


class Exit(enum.IntEnum):
    """The exit status of every command: the one table, shown by ``--help`` and the README."""

    OK = 0
    FAILED = 1
    # argparse's status for a usage error: a wrong setting is the same kind of mistake.
    REFUSED = 2
    NOT_FOUND = 3
    INTERRUPTED = 130


EXIT_MEANINGS: Final = {
    Exit.OK: "done (flush --once: it ran to the end; its counts say what still waits or died)",
    Exit.FAILED: "done, but something is wrong: an assumption differs (doctor), a file is "
    "invalid (validate-xml), rows could not be read (salvage), the story went wrong "
    "(demo); or an unexpected error, with a traceback",
    Exit.REFUSED: "not done: a usage error, a bad argument or ENGAGE_* setting, no usable "
    "outbox, Engage refused the API key or reports its tenant misconfigured, the SFTP "
    "server refused the host key, login or rights, Engage cannot be reached or a check "
    "failed (doctor), or the change's state does not allow the action",
    Exit.NOT_FOUND: "no change with that id (outbox show, requeue, discard)",
    Exit.INTERRUPTED: "interrupted by Ctrl-C (flush and simulate stop cleanly and exit 0)",
}


def _exit_help() -> str:
    lines = ["exit status (the same for every command):"]
    for code, meaning in EXIT_MEANINGS.items():
        lines += textwrap.wrap(
            meaning, width=78, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7
        )
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help ends with the exit-status table, its commands' too."""

    def format_help(self) -> str:
        return f"{super().format_help()}\n{_exit_help()}\n"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="engage-async",
        description="Voyado Engage client tools: demo, outbox flusher, outbox admin, simulator.",
    )
    parser.add_argument("--version", action="version", version=f"engage-async {__version__}")
    parser.add_argument(
        "--log-level", default="WARNING", help="logging level (default WARNING; INFO shows batches)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the whole story against a built-in simulator (no credentials needed)",
        description="Start a FakeEngage on loopback and a temporary outbox, make Engage go "
        "down, queue writes, bring it back, drain the outbox through the bulk API and "
        "reconcile the GUIDs, printing what happens.",
    )
    demo.add_argument("--quiet", action="store_true", help="print only the final summary")
    demo.add_argument("--keep", metavar="DIR", help="keep the outbox in DIR instead of a temp dir")

    flush = commands.add_parser(
        "flush",
        help="run the outbox flusher (the sidecar) until SIGTERM or SIGINT",
        description="Replay the outbox into Engage. Configured by ENGAGE_* variables "
        "(ENGAGE_BASE_URL, ENGAGE_API_KEY, ENGAGE_USER_AGENT, ENGAGE_OUTBOX, ...).",
    )
    flush.add_argument("--once", action="store_true", help="drain what is due, then exit")
    flush.add_argument("--outbox", help="outbox file (default: $ENGAGE_OUTBOX)")
    flush.add_argument(
        "--outbox-url",
        help="outbox URL, sqlite:///path or postgresql://user@host:port/db (default: "
        "$ENGAGE_OUTBOX_URL; the password from the URL, PGPASSWORD or ~/.pgpass)",
    )
    flush.add_argument(
        "--outbox-schema",
        help="the PostgreSQL outbox's schema (default: $ENGAGE_OUTBOX_SCHEMA or engage_outbox)",
    )
    flush.add_argument("--base-url", help="Engage base URL (default: $ENGAGE_BASE_URL)")
    flush.add_argument("--user-agent", help="System/version (default: $ENGAGE_USER_AGENT)")
    flush.add_argument("--fallback-mode", choices=("bulk", "xml"), help="bulk API or XML files")
    flush.add_argument("--xml-dir", help="where XML fallback files go (default: $ENGAGE_XML_DIR)")
    flush.add_argument(
        "--no-progress", action="store_true", help="with --once: no progress display"
    )
    flush.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve metrics for Prometheus at http://HOST:PORT/metrics (0: a free port, "
        "printed on start; needs the prometheus extra)",
    )
    flush.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics port listens on (default 127.0.0.1)",
    )

    outbox_file = _Parser(add_help=False)
    outbox_file.add_argument(
        "--outbox",
        # SUPPRESS: given after the action it must not reset one given before it.
        default=argparse.SUPPRESS,
        help="outbox file or URL "
        f"(default: $ENGAGE_OUTBOX_URL, $ENGAGE_OUTBOX or {_DEFAULT_OUTBOX})",
    )
    # --- the PostgreSQL outbox ---
    outbox_file.add_argument(
        "--outbox-url",
        default=argparse.SUPPRESS,
        help="outbox URL: sqlite:///path or postgresql://user@host:port/db "
        "(default: $ENGAGE_OUTBOX_URL)",
    )
    outbox_file.add_argument(
        "--outbox-schema",
        default=argparse.SUPPRESS,
        help="the PostgreSQL outbox's schema (default: $ENGAGE_OUTBOX_SCHEMA or engage_outbox)",
    )
    outbox = commands.add_parser(
        "outbox", help="inspect and manage the outbox", parents=[outbox_file]
    )
    # What the read commands share: JSON for scripts, times for people, unmasking on request.
    json_output = _Parser(add_help=False)
    json_output.add_argument(
        "--json", action="store_true", help="print JSON (documented shape, schema 1)"
    )
    json_output.add_argument(
        "--utc", action="store_true", help="times in UTC instead of '3 min ago'"
    )
    reveal = _Parser(add_help=False)
    reveal.add_argument("--reveal", action="store_true", help="show personal data unmasked")
    admin = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    admin.add_parser(
        "stats",
        help="counts per state, oldest waiting change, pause",
        description="Count the changes in each state and say how the flushers stand. "
        "--json prints one object.",
        parents=[outbox_file, json_output],
    )
    listing = admin.add_parser(
        "list",
        help="list changes (personal data masked)",
        description="List changes, oldest first, as a table with personal data masked; "
        "errors are cut to the terminal's width. --json prints one object a line (JSON "
        "Lines), uncut.",
        parents=[outbox_file, json_output, reveal],
    )
    listing.add_argument("--state", choices=("pending", "inflight", "waiting_guid", "done", "dead"))
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--key", help="only this contact: a GUID, a ref or a key value")
    show = admin.add_parser(
        "show",
        help="show one change with its body",
        description="Show one change with its body, personal data masked. --json prints "
        "one object.",
        parents=[outbox_file, json_output, reveal],
    )
    show.add_argument("change_id")
    requeue = admin.add_parser(
        "requeue", help="send a dead change again (or --all dead ones)", parents=[outbox_file]
    )
    requeue.add_argument("change_id", nargs="?")
    requeue.add_argument("--all", action="store_true", help="requeue every dead change")
    discard = admin.add_parser(
        "discard", help="give up on a change, with a reason", parents=[outbox_file]
    )
    discard.add_argument("change_id")
    discard.add_argument("--reason", required=True)
    export = admin.add_parser(
        "export", help="write changes not yet done as JSON lines", parents=[outbox_file]
    )
    export.add_argument("path")
    salvage = admin.add_parser(
        "salvage",
        help="copy what can be read from a damaged outbox into a new one",
        description="Copy every change (and identity, batch, pause) that can still be read "
        "from the outbox, which may be damaged, into a new outbox at NEW_PATH, and say what "
        "could not be read. Stop everything that uses the outbox first. Exit status: 0 all "
        "copied, 1 some rows could not be read (the new outbox holds the rest), 2 nothing done.",
        parents=[outbox_file],
    )
    salvage.add_argument("new_path", metavar="NEW_PATH", help="the new outbox (must not exist)")
    migrate = admin.add_parser(
        "migrate",
        help="move every open change, the refs and the identity map to another outbox",
        description="Copy every change not yet done (with the identity map, the contact types "
        "learned, and the pause) from this SQLite outbox into the outbox at --to (a "
        "postgresql:// URL), once: a change already there is not copied again, so an "
        "interrupted run is simply run again. The SQLite outbox is then marked as moved and "
        "refuses new changes. Stop the flushers of the old outbox first.",
        parents=[outbox_file],
    )
    migrate.add_argument("--to", required=True, metavar="URL", help="the outbox to move to")
    migrate.add_argument(
        "--to-schema",
        help="the schema at --to (default: $ENGAGE_OUTBOX_SCHEMA or engage_outbox)",
    )
    validate = admin.add_parser("validate-xml", help="check XML fallback files against the XSD")
    validate.add_argument("paths", nargs="+", metavar="FILE")

    doctor = commands.add_parser(
        "doctor",
        help="check, reading only, which of the package's assumptions hold on your tenant",
        description="Probe the Engage tenant configured by the ENGAGE_* variables with GETs "
        "only (nothing is created, changed or deleted) and say, for each assumption the "
        "package makes about Engage's answers, whether it holds. Exit status: 0 all hold, "
        "1 one differs, 2 Engage cannot be reached or refused the key.",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--email",
        help="email of a contact that exists, for the checks that need one "
        "(default: $ENGAGE_DOCTOR_EMAIL; the variable keeps it out of the process list)",
    )
    doctor.add_argument("--contact-id", help="GUID of a contact that exists")
    doctor.add_argument("--batch-id", help="id of a bulk batch sent earlier, to read its status")
    doctor.add_argument("--base-url", help="Engage base URL (default: $ENGAGE_BASE_URL)")
    doctor.add_argument("--user-agent", help="System/version (default: $ENGAGE_USER_AGENT)")
    doctor.add_argument("--api-version", type=int, choices=(2, 3), help="default: 3")
    doctor.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)"
    )

    simulate = commands.add_parser(
        "simulate",
        help="serve FakeEngage for your own integration tests",
        description="Serve the Engage simulator on loopback until interrupted, with a control "
        "API on a second port (go down, come up, inject faults, read the request log): see "
        "the README.",
    )
    simulate.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--api-key", default="fake-api-key", help="the key it accepts")
    simulate.add_argument("--bulk-delay", type=float, default=0.0, help="seconds per batch")
    simulate.add_argument(
        "--rate-limit", type=float, default=200.0, help="429 above this many requests/s"
    )
    simulate.add_argument(
        "--control-port", type=int, default=0, help="port of the control API (default: a free one)"
    )
    simulate.add_argument(
        "--control-host",
        default="127.0.0.1",
        help="address of the control API (default loopback; it has no authentication)",
    )
    simulate.add_argument(
        "--strict-bulk-types",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fail bulk update items whose contact is not of the request's contact type, as "
        "Engage does (default: on)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    commands: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
        "demo": _demo,
        "doctor": _doctor,
        "flush": _flush,
        "outbox": _outbox,
        "simulate": _simulate,
    }
    try:
        return asyncio.run(commands[args.command](args))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): not an error; keep Python from complaining at exit.
        sys.stdout = open(os.devnull, "w")  # noqa: PTH123, SIM115
        return Exit.OK
    except ChangeNotFound as exc:
        print(f"engage-async: {exc}", file=sys.stderr)
        return Exit.NOT_FOUND
    except EngageAuthError as exc:
        print(f"engage-async: {exc}; check ENGAGE_API_KEY", file=sys.stderr)
        return Exit.REFUSED
    except EngageConfigurationError as exc:
        print(
            f"engage-async: {exc}; Engage reports the tenant's configuration as invalid "
            "(InvalidSystemConfiguration): ask Voyado to check it; the queued changes wait",
            file=sys.stderr,
        )
        return Exit.REFUSED
    except (EngageError, ValueError, OSError) as exc:
        print(f"engage-async: {exc}", file=sys.stderr)
        return Exit.REFUSED


# --- flush -----------------------------------------------------------------------------------


def _flush_config(args: argparse.Namespace) -> EngageConfig:
    overrides = {
        name: value
        for name, value in (
            ("outbox_path", args.outbox),
            ("outbox_url", args.outbox_url),
            ("outbox_schema", args.outbox_schema),
            ("base_url", args.base_url),
            ("user_agent", args.user_agent),
            ("fallback_mode", args.fallback_mode),
            ("xml_dir", args.xml_dir),
        )
        if value is not None
    }
    return EngageConfig.from_env(**overrides)


async def _flush(args: argparse.Namespace) -> int:
    config = _flush_config(args)
    async with (
        _metrics_served(args) as meter_provider,
        OutboxFlusher(config, meter_provider=meter_provider) as flusher,
    ):
        if not args.once:
            await flusher.run(handle_signals=True)
            return 0
        show = _progress_printer() if not args.no_progress else None
        report = await flusher.flush_once(on_progress=show)
    if show is not None:
        show(None)
    print(_describe_report(report))
    return 0


@contextlib.asynccontextmanager
async def _metrics_served(args: argparse.Namespace) -> AsyncIterator[Any]:
    """With ``--metrics-port``: a meter provider served for Prometheus (its URL printed to
    stderr, so a port of 0 can be found); else None, the global provider.
    """
    if args.metrics_port is None:
        yield None
        return
    try:
        endpoint = prometheus_endpoint(args.metrics_host, args.metrics_port)
    except ImportError as exc:
        raise ValueError(f"--metrics-port: {exc}") from None
    async with endpoint as (meter_provider, port):
        host = f"[{args.metrics_host}]" if ":" in args.metrics_host else args.metrics_host
        print(f"engage-async: metrics on http://{host}:{port}/metrics", file=sys.stderr)
        yield meter_provider


def _port(text: str) -> int:
    """A TCP port number from the command line (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return port


def _progress_printer() -> Callable[[FlushReport | None], None]:
    """A progress display for a long drain: a live line on a terminal, else a line every 5 s."""
    live = sys.stderr.isatty()
    last = [0.0]

    def show(report: FlushReport | None) -> None:
        if report is None:
            if live and last[0]:
                print(file=sys.stderr)
            return
        now = time.monotonic()
        if not live and now - last[0] < 5:
            return
        last[0] = now
        line = _describe_report(report)
        print(f"\r{line}" if live else line, end="" if live else "\n", file=sys.stderr)

    return show


def _describe_report(report: FlushReport) -> str:
    return ", ".join(
        f"{field.name} {getattr(report, field.name)}" for field in attrs.fields(FlushReport)
    )


# --- outbox admin ------------------------------------------------------------------------------


def _outbox_path(args: argparse.Namespace) -> str | Path:
    """The outbox the admin commands work on: a flag, else the environment (a URL first)."""
    given = getattr(args, "outbox_url", None) or getattr(args, "outbox", None)
    if given:
        return str(given) if is_outbox_url(str(given)) else Path(given)
    url = os.environ.get("ENGAGE_OUTBOX_URL")
    return url or Path(os.environ.get("ENGAGE_OUTBOX") or _DEFAULT_OUTBOX)


def _outbox_schema(args: argparse.Namespace) -> str:
    return (
        getattr(args, "outbox_schema", None)
        or os.environ.get("ENGAGE_OUTBOX_SCHEMA")
        or "engage_outbox"
    )


def _admin(args: argparse.Namespace) -> OutboxAdmin:
    return OutboxAdmin(_outbox_path(args), schema=_outbox_schema(args), clock=_CLOCK)


def _now() -> datetime:
    return datetime.fromtimestamp(_CLOCK.wall(), UTC)


async def _outbox(args: argparse.Namespace) -> int:
    if args.action == "validate-xml":
        return _validate_xml(args.paths)
    if args.action == "salvage":
        # Not inside `async with`: a damaged outbox cannot be opened, only read for salvage.
        return await _salvage(_admin(args), args.new_path)
    if args.action == "migrate":
        return await _migrate(args)
    async with _admin(args) as admin:
        if args.action == "stats":
            stats = await admin.stats()
            if args.json:
                where = admin.path if admin.path is not None else admin.location
                print(_output.document(_output.stats_json(stats, where)))
            else:
                print(_output.stats_text(stats, now=_now(), in_utc=args.utc))
        elif args.action == "list":
            entries = await admin.list(args.state, args.limit, args.key, reveal=args.reveal)
            if args.json:
                for entry in entries:
                    print(_output.json_line(_output.entry_json(entry)))
            elif entries:
                lines = _output.entries_table(
                    entries, now=_now(), in_utc=args.utc, width=_output.terminal_width()
                )
                print("\n".join(lines))
            else:
                print("engage-async: no changes", file=sys.stderr)
        elif args.action == "show":
            entry = await admin.show(args.change_id, reveal=args.reveal)
            if args.json:
                print(_output.document(_output.entry_json(entry, body=True)))
            else:
                print(_output.entry_text(entry, now=_now(), in_utc=args.utc))
        elif args.action == "requeue":
            if args.all == bool(args.change_id):
                print("engage-async: give a change id, or --all", file=sys.stderr)
                return Exit.REFUSED
            if args.all:
                print(f"requeued {await admin.requeue_dead()} dead change(s)")
            else:
                _print_entry(await admin.requeue(args.change_id))
        elif args.action == "discard":
            _print_entry(await admin.discard(args.change_id, args.reason))
        elif args.action == "export":
            print(f"exported {await admin.export(args.path)} change(s) to {args.path}")
    return Exit.OK


def _print_entry(entry: OutboxEntry) -> None:
    """A changed row, as `outbox list` would show it."""
    lines = _output.entries_table([entry], now=_now(), width=_output.terminal_width())
    print("\n".join(lines))


async def _salvage(admin: OutboxAdmin, new_path: str) -> int:
    report = await admin.salvage(new_path)
    copied = ", ".join(f"{table} {count}" for table, count in report.copied.items())
    print(f"salvaged into {report.path.resolve()}: {copied}")
    for problem in report.unreadable:
        print(f"could not read: {problem}")
    for change_id in report.lost_change_ids:
        print(f"lost: {change_id}")
    return Exit.OK if report.complete else Exit.FAILED


async def _migrate(args: argparse.Namespace) -> int:
    source = _outbox_path(args)
    schema = args.to_schema or os.environ.get("ENGAGE_OUTBOX_SCHEMA") or "engage_outbox"
    report = await migrate_outbox(source, args.to, schema=schema)
    print(report.describe())
    return 0


def _validate_xml(paths: Sequence[str]) -> int:
    failed = False
    for name in paths:
        problems = validate_file(Path(name))
        print(f"{name}: {'valid' if not problems else 'INVALID'}")
        for problem in problems:
            print(f"  {problem}")
        failed = failed or bool(problems)
    return Exit.FAILED if failed else Exit.OK


# --- doctor ------------------------------------------------------------------------------------


async def _doctor(args: argparse.Namespace) -> int:
    from ._doctor import render_table, run_doctor  # noqa: PLC0415 - only this command needs it

    overrides = {
        name: value
        for name, value in (
            ("base_url", args.base_url),
            ("user_agent", args.user_agent),
            ("api_version", args.api_version),
        )
        if value is not None
    }
    config = EngageConfig.from_env(**overrides)
    report = await run_doctor(
        config,
        email=args.email or os.environ.get("ENGAGE_DOCTOR_EMAIL") or None,
        contact_id=args.contact_id,
        batch_id=args.batch_id,
        timeout=args.timeout,
    )
    if args.json:
        print(_output.document(report.to_json()))
    else:
        print(render_table(report))
    # The doctor's own 0/1/2 (hold, differ, unreachable or refused) are the table's.
    return Exit(report.exit_code)


# --- simulator ---------------------------------------------------------------------------------


async def _simulate(args: argparse.Namespace) -> int:
    # The simulator is optional at run time.
    from .testing import FakeEngage  # noqa: PLC0415
    from .testing._control import ControlServer  # noqa: PLC0415

    rate_limit = args.rate_limit if args.rate_limit > 0 else None
    async with FakeEngage(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        bulk_delay=args.bulk_delay,
        rate_limit=rate_limit,
        strict_bulk_types=args.strict_bulk_types,
    ) as fake:
        control = ControlServer(fake, host=args.control_host, port=args.control_port)
        await control.start()
        try:
            print(f"FakeEngage listening on {fake.url} (api key: {fake.api_key})", flush=True)
            print(f"Control API on {control.url}/control", flush=True)
            print("Press Ctrl+C to stop.", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for number in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(number, stop.set)
            await stop.wait()
        finally:
            await control.close()
    return 0


# --- demo --------------------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo  # noqa: PLC0415 - the demo's story lives in its own module

    return await run_demo(quiet=args.quiet, keep=Path(args.keep) if args.keep else None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
