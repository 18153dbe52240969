"""``engage-async doctor``: which of the package's assumptions about Engage hold on a tenant.

Engage publishes no schema for several answers the package reads (error bodies, the
``/contacts/id`` answer, the bulk status, the v3 path of a contact's purchases), so the
package reads them leniently and this probe says, for a real tenant, whether each one is as
assumed. It only ever sends GETs: nothing is created, changed or deleted.

Each `Check` is pure: the GETs it needs (built with `_http`'s builders from what the run
knows) and a judge turning the answers into a `Verdict`. `run_doctor` is the one runner: it
sends each distinct GET once through the package's `Transport` and collects a `Report`.

Results: ``holds`` (as assumed), ``differs`` (not as assumed; ``seen`` says what came back),
``not_checked`` (needs something the run was not given, such as a known contact) and
``error`` (no usable answer: unreachable, refused, a 5xx or 429). Exit status: 0 when none
differs or errs, 1 when one differs, 2 when one errs (cannot reach Engage, or it refused the
API key or User-Agent).

JSON (``engage-async doctor --json``), schema 1::

    {
      "schema": 1,
      "base_url": "https://tenant.voyado.com",
      "api_version": 3,
      "outcome": "holds" | "differs" | "error",
      "checks": [
        {"name": "error_body",
         "assumption": "an error answer is a JSON object with errorCode and message",
         "result": "holds" | "differs" | "not_checked" | "error",
         "seen": "404 a JSON object with errorCode, message, statusCode"}
      ],
      "round_trip_ms": {"count": 9, "min": 21.3, "median": 25.0, "max": 60.2}
    }

``round_trip_ms`` values are null when nothing answered. ``seen`` never holds the API key
nor personal data: it names keys, codes and GUIDs, and passes through `_redact.scrub`.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

import attrs

from . import _http
from ._config import EngageConfig
from ._errors import EngageHTTPError, EngageUnavailable
from ._http import Call
from ._overview import read_overview
from ._redact import scrub
from ._transport import Transport

__all__ = ["CHECKS", "Check", "Known", "Report", "Verdict", "render_table", "run_doctor"]

Result = Literal["holds", "differs", "not_checked", "error"]
SCHEMA: Final = 1
_SEEN_LIMIT: Final = 400
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_OVERVIEW_PARTS: Final = (
    "id",
    "attributes",
    "meta",
    "preferences",
    "tiers",
    "consents",
    "audiences",
    "warnings",
    "rewardVouchers",
    "promotions",
)
_STATUS_PARTS: Final = ("status", "failures", "failedCount")


@attrs.frozen
class Answer:
    """What one GET brought back: status, headers, body and the time it took."""

    status: int
    headers: Mapping[str, str] = attrs.field(repr=False)
    body: bytes = attrs.field(repr=False)
    elapsed_ms: float


@attrs.frozen
class NoAnswer:
    """A GET that got no answer; `reason` names what failed (never the key)."""

    reason: str


Reply = Answer | NoAnswer


@attrs.frozen
class Known:
    """What a run knows before it starts: the tenant's API root and the probe's values.

    `probe_email` and `probe_guid` are made up per run, so that they match nothing; `email`,
    `contact_id` and `batch_id` are a known contact and bulk batch, when given.
    """

    root: str
    api_version: int
    default_contact_type: str
    deadline_ms: float
    probe_email: str
    probe_guid: str
    email: str | None = attrs.field(default=None, repr=False)
    contact_id: str | None = None
    batch_id: str | None = None


@attrs.frozen
class Verdict:
    """A check's judgement; `learned_contact_id` passes a GUID found on to later checks."""

    result: Result
    seen: str
    learned_contact_id: str | None = None


Probes = Callable[[Known], tuple[Call, ...]]
Judge = Callable[[Known, Sequence[Answer]], Verdict]


@attrs.frozen
class Check:
    """One assumption: its name, what is assumed, the GETs that test it and its judge.

    `probes` returning nothing means the check cannot run with what is known; `needs` says
    why. A check whose `probes` is None is judged over every answer of the run.
    """

    name: str
    assumption: str
    probes: Probes | None
    judge: Judge
    needs: str = ""


@attrs.frozen
class CheckResult:
    """One line of the report."""

    name: str
    assumption: str
    result: Result
    seen: str


@attrs.frozen
class Report:
    """What the doctor found on one tenant."""

    base_url: str
    api_version: int
    checks: tuple[CheckResult, ...]
    round_trip_ms: Mapping[str, float | int | None]

    @property
    def outcome(self) -> Literal["holds", "differs", "error"]:
        """``error`` if a check erred, else ``differs`` if one differs, else ``holds``."""
        results = {check.result for check in self.checks}
        if "error" in results:
            return "error"
        return "differs" if "differs" in results else "holds"

    @property
    def exit_code(self) -> int:
        """0 all hold, 1 one differs, 2 cannot reach Engage or refused."""
        return {"holds": 0, "differs": 1, "error": 2}[self.outcome]

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape (see the module docstring)."""
        return {
            "schema": SCHEMA,
            "base_url": self.base_url,
            "api_version": self.api_version,
            "outcome": self.outcome,
            "checks": [attrs.asdict(check) for check in self.checks],
            "round_trip_ms": dict(self.round_trip_ms),
        }


# --- reading answers, for the judges -----------------------------------------------------------


_NOT_JSON: Final = object()


def _json(answer: Answer) -> Any:
    """The body decoded, or `_NOT_JSON`."""
    try:
        return json.loads(answer.body)
    except ValueError:
        return _NOT_JSON


def _describe(answer: Answer) -> str:
    """``404 a JSON object with code, detail``: the status and the body's shape, no values."""
    if not answer.body.strip():
        return f"{answer.status} with an empty body"
    data = _json(answer)
    if data is _NOT_JSON:
        content_type = next(
            (v for k, v in answer.headers.items() if k.lower() == "content-type"), "no type"
        )
        return f"{answer.status} a non-JSON body ({content_type.split(';')[0]})"
    if isinstance(data, Mapping):
        return f"{answer.status} a JSON object with {', '.join(map(str, data)) or 'no keys'}"
    if isinstance(data, list):
        return f"{answer.status} a JSON array of {len(data)}"
    if isinstance(data, str):
        return f"{answer.status} a bare JSON string"
    return f"{answer.status} a JSON {type(data).__name__}"


def _code(call: Call, answer: Answer) -> str | None:
    """The error code as the package reads it, whatever the body's wording."""
    if 200 <= answer.status < 300:
        return None
    error = _http.error_for_status(call, answer.status, answer.headers, answer.body)
    return error.error_code if isinstance(error, EngageHTTPError) else None


def _status_code(call: Call, answer: Answer) -> str:
    code = _code(call, answer)
    return f"{answer.status} {code}" if code else _describe(answer)


# --- the checks ----------------------------------------------------------------------------------


def _lookup_probe(known: Known) -> Call:
    return _http.contact_id_lookup(known.root, {"email": known.probe_email})


def _credentials(known: Known, answers: Sequence[Answer]) -> Verdict:
    answer = answers[0]
    code = _code(_lookup_probe(known), answer)
    if answer.status in {401, 403}:
        return Verdict("error", f"refused: {answer.status} {code or ''}; check ENGAGE_API_KEY")
    if answer.status == 400 and code and "useragent" in code.lower():
        return Verdict("error", f"refused: 400 {code}; check ENGAGE_USER_AGENT")
    return Verdict("holds", f"answered {_status_code(_lookup_probe(known), answer)}")


def _not_found(known: Known, answers: Sequence[Answer]) -> Verdict:
    answer = answers[0]
    seen = _status_code(_lookup_probe(known), answer)
    if answer.status == 404 and _code(_lookup_probe(known), answer) == "ContactNotFound":
        return Verdict("holds", seen)
    return Verdict("differs", seen)


def _found_probes(known: Known) -> tuple[Call, ...]:
    if known.email is None:
        return ()
    return (_http.contact_id_lookup(known.root, {"email": known.email}),)


def _found(known: Known, answers: Sequence[Answer]) -> Verdict:
    answer = answers[0]
    if answer.status in {404, 409}:
        call = _found_probes(known)[0]
        why = "no contact" if answer.status == 404 else "several contacts"
        return Verdict("not_checked", f"{_status_code(call, answer)}: {why} with that email")
    data = _json(answer)
    guid = _http.read_contact_id(data) if answer.status == 200 else None
    if isinstance(data, str) and guid and _GUID.fullmatch(guid):
        return Verdict("holds", f"200 a bare JSON string, {guid}", learned_contact_id=guid)
    read = f"; the package reads {guid}" if guid else "; the package reads no GUID"
    return Verdict("differs", _describe(answer) + read, learned_contact_id=guid)


def _overview_probes(known: Known) -> tuple[Call, ...]:
    if known.contact_id is None:
        return ()
    identifiers = {"contactId": known.contact_id}
    if known.api_version == 2:
        identifiers["contactType"] = known.default_contact_type
    return (_http.contact_overview(known.root, identifiers),)


def _overview(known: Known, answers: Sequence[Answer]) -> Verdict:
    answer = answers[0]
    if answer.status != 200:
        return Verdict("differs", _status_code(_overview_probes(known)[0], answer))
    data = _json(answer)
    if not isinstance(data, Mapping):
        return Verdict("differs", _describe(answer))
    missing = [part for part in _OVERVIEW_PARTS if part not in data]
    try:
        overview = read_overview(data)
        for field in attrs.fields(type(overview)):
            getattr(overview, field.name)
    except Exception as exc:
        return Verdict("differs", f"200 the package cannot read it: {exc}")
    if missing:
        return Verdict("differs", f"200 a JSON object without {', '.join(missing)}")
    return Verdict("holds", f"200 a JSON object with all {len(_OVERVIEW_PARTS)} parts, read")


def _needs_type_probes(known: Known) -> tuple[Call, ...]:
    if known.api_version == 2:
        return (_http.contact_overview(known.root, {"contactId": known.probe_guid}),)
    return (_http.contact_overview(known.root, {"email": known.probe_email}),)


def _needs_type(known: Known, answers: Sequence[Answer]) -> Verdict:
    answer = answers[0]
    call = _needs_type_probes(known)[0]
    seen = _status_code(call, answer)
    if answer.status == 400 and _code(call, answer) == "InvalidContactType":
        return Verdict("holds", seen)
    return Verdict("differs", seen)


def _error_body_probes(known: Known) -> tuple[Call, ...]:
    return (_http.get_contact(known.root, known.probe_guid),)


def _error_body(known: Known, answers: Sequence[Answer]) -> Verdict:
    answer = answers[0]
    data = _json(answer)
    seen = _describe(answer)
    code = _code(_error_body_probes(known)[0], answer)
    if (
        isinstance(data, Mapping)
        and isinstance(data.get("errorCode"), str)
        and isinstance(data.get("message"), str)
    ):
        return Verdict("holds", seen)
    return Verdict("differs", f"{seen}; the package reads the code as {code}")


def _bulk_path_probes(known: Known) -> tuple[Call, ...]:
    return (_http.bulk_status(known.root, known.probe_guid),)


def _bulk_path(known: Known, answers: Sequence[Answer]) -> Verdict:
    answer = answers[0]
    code = _code(_bulk_path_probes(known)[0], answer)
    seen = _status_code(_bulk_path_probes(known)[0], answer)
    # A missing route answers 404/405 with no code of its own (or a generic one); the
    # endpoint itself names what it could not find, or validates the id.
    endpoint_answered = answer.status == 200 or (
        answer.status in {400, 404} and code is not None and code != "NotFound"
    )
    return Verdict("holds" if endpoint_answered else "differs", seen)


def _bulk_schema_probes(known: Known) -> tuple[Call, ...]:
    if known.batch_id is None:
        return ()
    return (_http.bulk_status(known.root, known.batch_id),)


def _bulk_schema(known: Known, answers: Sequence[Answer]) -> Verdict:
    answer = answers[0]
    if answer.status == 404:
        seen = _status_code(_bulk_schema_probes(known)[0], answer)
        return Verdict("not_checked", f"{seen}: no batch has the given id")
    data = _json(answer)
    if answer.status != 200 or not isinstance(data, Mapping):
        return Verdict("differs", _describe(answer))
    status = _http.read_batch_status(data)
    read = (
        f"; the package reads it as {'finished' if status.finished else 'not finished'}, "
        f"{len(status.failures)} failure(s) listed"
    )
    state_word = data.get("status")
    if (
        all(part in data for part in _STATUS_PARTS)
        and isinstance(state_word, str)
        and state_word in {"Pending", "Finished"}
        and isinstance(data.get("failures"), list)
    ):
        return Verdict("holds", _describe(answer) + read)
    return Verdict("differs", _describe(answer) + read)


def _transactions_probes(known: Known) -> tuple[Call, ...]:
    contact_id = known.contact_id or known.probe_guid
    if known.api_version == 2:
        return (_http.transactions(known.root, 2, contact_id, 0, 1),)
    # The v2 builder with the v3 root gives the path-style alternative.
    return (
        _http.transactions(known.root, 3, contact_id, 0, 1),
        _http.transactions(known.root, 2, contact_id, 0, 1),
    )


def _transactions_read(call: Call, answer: Answer) -> tuple[bool, str]:
    """Whether the path served the contact's purchases (or said it has no such contact)."""
    if answer.status == 200:
        data = _json(answer)
        items, total = _http.read_page(data)
        shape = "a paged object" if isinstance(data, Mapping) else "an array"
        return True, f"200 {shape} of {len(items)}" + (f" (of {total})" if total else "")
    code = _code(call, answer)
    return code == "ContactNotFound", _status_code(call, answer)


def _transactions(known: Known, answers: Sequence[Answer]) -> Verdict:
    calls = _transactions_probes(known)
    works, seen = _transactions_read(calls[0], answers[0])
    if works:
        return Verdict("holds", seen)
    if len(calls) > 1:
        alternative, alt_seen = _transactions_read(calls[1], answers[1])
        verdict = "serves" if alternative else "does not serve"
        seen += f"; /contacts/{{id}}/transactions {verdict} them ({alt_seen})"
    return Verdict("differs", seen)


def _rate_headers(_: Known, answers: Sequence[Answer]) -> Verdict:
    names: dict[str, str] = {}
    carrying = 0
    for answer in answers:
        found = {
            name: value
            for name, value in answer.headers.items()
            if name.lower().startswith(("x-ratelimit", "ratelimit"))
        }
        carrying += bool(found)
        names.update(found)
    if not names:
        return Verdict("holds", f"none on {len(answers)} answer(s)")
    listed = ", ".join(f"{name}: {value}" for name, value in sorted(names.items()))
    return Verdict("differs", f"{listed} (on {carrying} of {len(answers)} answers)")


def round_trip(answers: Sequence[Answer]) -> dict[str, float | int | None]:
    """Count, min, median and max of the answers' round-trip times in ms (None if none)."""
    times = [answer.elapsed_ms for answer in answers]
    if not times:
        return {"count": 0, "min": None, "median": None, "max": None}
    return {
        "count": len(times),
        "min": round(min(times), 1),
        "median": round(statistics.median(times), 1),
        "max": round(max(times), 1),
    }


def _round_trip(known: Known, answers: Sequence[Answer]) -> Verdict:
    stats = round_trip(answers)
    median = stats["median"]
    if median is None:
        return Verdict("not_checked", "nothing answered")
    seen = (
        f"median {median:g} ms, max {stats['max']:g} ms over {stats['count']} GET(s); "
        f"interactive_deadline {known.deadline_ms:g} ms"
    )
    return Verdict("holds" if median < known.deadline_ms else "differs", seen)


CHECKS: Final[tuple[Check, ...]] = (
    Check(
        "credentials",
        "the API key and User-Agent are accepted",
        lambda known: (_lookup_probe(known),),
        _credentials,
    ),
    Check(
        "contact_id_not_found",
        "/contacts/id of an unknown email answers 404 ContactNotFound",
        lambda known: (_lookup_probe(known),),
        _not_found,
    ),
    Check(
        "contact_id_found",
        "/contacts/id of a known contact answers its GUID as a bare JSON string",
        _found_probes,
        _found,
        needs="the email of a known contact (--email or ENGAGE_DOCTOR_EMAIL)",
    ),
    Check(
        "contactoverview",
        "/contactoverview by contactId answers an object with every part the package types",
        _overview_probes,
        _overview,
        needs="a known contact (--contact-id, or --email)",
    ),
    Check(
        "contactoverview_needs_type",
        "/contactoverview without contactType answers 400 InvalidContactType "
        "(v3: for identifiers other than contactId; v2: always)",
        _needs_type_probes,
        _needs_type,
    ),
    Check(
        "error_body",
        "an error answer is a JSON object with errorCode and message",
        _error_body_probes,
        _error_body,
    ),
    Check(
        "bulk_status_path",
        "/contacts/bulk/status?batchId= exists (an unknown batch is named, not a missing route)",
        _bulk_path_probes,
        _bulk_path,
    ),
    Check(
        "bulk_status_schema",
        "a batch status is an object with status (Pending/Finished), failures and failedCount",
        _bulk_schema_probes,
        _bulk_schema,
        needs="the id of a bulk batch sent earlier (--batch-id)",
    ),
    Check(
        "transactions_path",
        "a contact's purchases are at v3 /contacts/transactions?contactId= "
        "(v2 /contacts/{id}/transactions)",
        _transactions_probes,
        _transactions,
    ),
    Check(
        "rate_limit_headers",
        "Engage sends no X-RateLimit-* headers (the package paces itself at rate_limit)",
        None,
        _rate_headers,
    ),
    Check(
        "round_trip",
        "a read answers within interactive_deadline (median round trip)",
        None,
        _round_trip,
    ),
)


# --- the runner ----------------------------------------------------------------------------------


def known_for(
    config: EngageConfig,
    *,
    email: str | None = None,
    contact_id: str | None = None,
    batch_id: str | None = None,
) -> Known:
    """What a run starts from: the config, the given contact and batch, fresh probe values."""
    # example.com is reserved: a probe address can belong to no one.
    probe = uuid.uuid4().hex[:12]
    return Known(
        root=config.api_root,
        api_version=config.api_version,
        default_contact_type=config.default_contact_type,
        deadline_ms=config.interactive_deadline * 1000,
        probe_email=f"engage-async-doctor-{probe}@example.com",
        probe_guid=str(uuid.uuid4()),
        email=email or None,
        contact_id=contact_id.lower() if contact_id else None,
        batch_id=batch_id or None,
    )


def _seen(text: str) -> str:
    return scrub(text, limit=_SEEN_LIMIT)


async def run_doctor(
    config: EngageConfig,
    *,
    email: str | None = None,
    contact_id: str | None = None,
    batch_id: str | None = None,
    timeout: float = 10.0,
    known: Known | None = None,
) -> Report:
    """Probe the tenant `config` points at with GETs only, and judge every check.

    `email` / `contact_id` name a known contact and `batch_id` an earlier bulk batch; checks
    that need them are ``not_checked`` without. Once the first GET gets no answer or is
    refused, the remaining checks are skipped (``not_checked``). Never raises for what Engage
    answers; raises `ValueError` only for a malformed `contact_id`.
    """
    if contact_id is not None and not _GUID.fullmatch(contact_id):
        raise ValueError("contact_id: must be a GUID (8-4-4-4-12 hex digits)")
    known = known or known_for(config, email=email, contact_id=contact_id, batch_id=batch_id)
    # The key's budget is shared with the outbox's processes when there is one; a probe never
    # creates files of its own.
    transport = Transport(config, shared_budget=config.outbox_path.exists())
    transport.open()
    replies: dict[Call, Reply] = {}
    results: list[CheckResult] = []
    stop: str | None = None
    try:
        for check in CHECKS:
            if stop is not None:
                results.append(
                    CheckResult(check.name, check.assumption, "not_checked", f"skipped: {stop}")
                )
                continue
            if check.probes is None:
                answers = [reply for reply in replies.values() if isinstance(reply, Answer)]
                verdict = check.judge(known, answers)
            else:
                calls = check.probes(known)
                verdict = (
                    await _probe(transport, check, known, calls, replies, timeout)
                    if calls
                    else Verdict("not_checked", f"needs {check.needs}")
                )
            if verdict.learned_contact_id and known.contact_id is None:
                known = attrs.evolve(known, contact_id=verdict.learned_contact_id)
            results.append(
                CheckResult(check.name, check.assumption, verdict.result, _seen(verdict.seen))
            )
            if verdict.result == "error" and check is CHECKS[0]:
                stop = "the first request failed"
    finally:
        await transport.close()
    answered = [reply for reply in replies.values() if isinstance(reply, Answer)]
    return Report(config.base_url, config.api_version, tuple(results), round_trip(answered))


async def _probe(
    transport: Transport,
    check: Check,
    known: Known,
    calls: tuple[Call, ...],
    replies: dict[Call, Reply],
    timeout: float,
) -> Verdict:
    answers: list[Answer] = []
    for call in calls:
        if call not in replies:
            replies[call] = await _get(transport, call, timeout)
        reply = replies[call]
        if isinstance(reply, NoAnswer):
            return Verdict("error", reply.reason)
        answers.append(reply)
    for call, answer in zip(calls, answers, strict=True):
        # No verdict about Engage's wording can be drawn from a refusal or an outage.
        if answer.status in {401, 403} and check is not CHECKS[0]:
            return Verdict("error", f"refused: {_status_code(call, answer)}")
        if answer.status == 429 or answer.status >= 500:
            return Verdict("error", f"no usable answer: {_status_code(call, answer)}")
    return check.judge(known, answers)


async def _get(transport: Transport, call: Call, timeout: float) -> Reply:
    """Send one GET; the doctor must never send anything else."""
    if call.method != "GET":
        raise RuntimeError(f"the doctor only reads; refusing {call.target}")
    started = time.perf_counter()
    try:
        status, headers, body = await transport.send(call, timeout)
    except EngageUnavailable as exc:
        return NoAnswer(f"no answer: {exc}")
    elapsed = (time.perf_counter() - started) * 1000
    return Answer(status, dict(headers), body, elapsed)


# --- output --------------------------------------------------------------------------------------

_MARK: Final = {
    "holds": "holds",
    "differs": "DIFFERS",
    "not_checked": "not checked",
    "error": "ERROR",
}


def render_table(report: Report) -> str:
    """The report as a plain-text table, one check a line with what was seen below it."""
    width = max(len(check.name) for check in report.checks)
    lines = [f"engage-async doctor: {report.base_url} (API v{report.api_version})", ""]
    for check in report.checks:
        lines.append(f"{_MARK[check.result]:<12} {check.name:<{width}}  {check.assumption}")
        lines.append(f"{'':<12} {'':<{width}}  seen: {check.seen}")
    verdict = {
        "holds": "every checked assumption holds",
        "differs": "some assumptions differ: see DIFFERS above",
        "error": "could not reach Engage, or it refused: see ERROR above",
    }[report.outcome]
    lines += ["", verdict]
    return "\n".join(lines)
