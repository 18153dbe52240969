"""``engage-async doctor``: the read-only probe of a tenant, run against FakeEngage.

Against the default fake every assumption holds; against a fake set to answer one of the
alternative shapes Engage's unpublished schemas allow, the doctor says that check differs,
while the package's own readers still read the alternative.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import USER_AGENT, make_config

import engage_async as ea
from engage_async import _http
from engage_async._doctor import CHECKS, Answer, Known, Report, render_table, run_doctor
from engage_async.cli import main
from engage_async.testing import FakeEngage

KNOWN_EMAIL = "astrid.known@example.com"
KNOWN_PHONE = "+46701234567"
UNKNOWN_GUID = "2e40b702-2767-4abe-ae99-aa510108e22b"
CHECK_NAMES = [check.name for check in CHECKS]


def results(report: Report) -> dict[str, str]:
    """Check name -> result."""
    return {check.name: check.result for check in report.checks}


def seen(report: Report, name: str) -> str:
    """What the report says it saw for one check."""
    return next(check.seen for check in report.checks if check.name == name)


def seed(fake: FakeEngage) -> str:
    """Give the fake a known contact with a purchase; return its GUID."""
    guid = fake.add_contact({"email": KNOWN_EMAIL, "mobilePhone": KNOWN_PHONE})
    fake.add_transaction(guid)
    return guid


def config_for(fake: FakeEngage, tmp_path: Path, **overrides: Any) -> ea.EngageConfig:
    """A config on `fake` with the default interactive deadline (the doctor judges by it)."""
    return make_config(fake.url, fake.api_key, tmp_path, interactive_deadline=3.0, **overrides)


@pytest.fixture(name="served")
async def fixture_served() -> AsyncIterator[FakeEngage]:
    """A fake with the rate limit on (as Engage has one), seeded with the known contact."""
    async with FakeEngage() as fake:
        seed(fake)
        yield fake


def engage_headers(fake: FakeEngage) -> dict[str, str]:
    """The headers Engage asks for, with the fake's key."""
    return {"apikey": fake.api_key, "User-Agent": USER_AGENT, "Content-Type": "application/json"}


async def get_raw(fake: FakeEngage, path: str, **params: str) -> tuple[int, dict[str, str], bytes]:
    """GET a path of the fake with a plain aiohttp client; return status, headers and body."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{fake.url}{path}", params=params, headers=engage_headers(fake)) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def get_json(fake: FakeEngage, path: str, **params: str) -> Any:
    """GET a path of the fake with a plain aiohttp client; return the decoded body."""
    return json.loads((await get_raw(fake, path, **params))[2])


async def earlier_batch(fake: FakeEngage, items: list[dict[str, str]]) -> str:
    """Send a bulk create as an application did earlier; return its batch id. The request log
    is cleared after it, so that it holds only what the doctor sends.
    """
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{fake.url}/api/v3/contacts/bulk",
            params={"contactType": "Member"},
            json=items,
            headers=engage_headers(fake),
        ) as response,
    ):
        batch_id = _http.read_batch_id(await response.json())
    assert batch_id is not None
    fake.clear_requests()
    return batch_id


def methods(fake: FakeEngage) -> set[str]:
    """Every HTTP method that reached the fake."""
    return {request.method for request in fake.requests}


# Against the default fake ------------------------------------------------------------------


async def test_every_assumption_holds_against_the_default_fake(
    served: FakeEngage, tmp_path: Path
) -> None:
    """With a known contact and an earlier batch, every check holds and the exit status is 0;
    only GETs ever reach Engage.
    """
    batch_id = await earlier_batch(served, [{"email": "b@example.com"}])

    report = await run_doctor(config_for(served, tmp_path), email=KNOWN_EMAIL, batch_id=batch_id)

    assert dict.fromkeys(CHECK_NAMES, "holds") == results(report)
    assert (0, "holds") == (report.exit_code, report.outcome)
    assert {"GET"} == methods(served)


async def test_checks_needing_a_known_contact_are_not_checked_without_one(
    served: FakeEngage, tmp_path: Path
) -> None:
    """Without --email, --contact-id or --batch-id those checks are "not checked", which
    neither holds nor differs: the exit status stays 0.
    """
    report = await run_doctor(config_for(served, tmp_path))

    expected = dict.fromkeys(CHECK_NAMES, "holds")
    expected.update(
        contact_id_found="not_checked",
        contactoverview="not_checked",
        bulk_status_schema="not_checked",
    )
    assert expected == results(report)
    assert 0 == report.exit_code
    assert "needs the email of a known contact" in seen(report, "contact_id_found")


async def test_a_contact_id_alone_checks_the_overview(served: FakeEngage, tmp_path: Path) -> None:
    """--contact-id (any case) lets the overview and the transactions path use that contact."""
    guid = served.find("email", KNOWN_EMAIL)[0]

    report = await run_doctor(config_for(served, tmp_path), contact_id=guid.upper())

    assert ("not_checked", "holds") == (
        results(report)["contact_id_found"],
        results(report)["contactoverview"],
    )
    assert "200 a paged object of 1" in seen(report, "transactions_path")
    overviews = served.requests_to("GET", "*/contactoverview")
    assert [guid] == [r.query["contactId"] for r in overviews if "contactId" in r.query]


async def test_every_assumption_holds_in_api_v2(served: FakeEngage, tmp_path: Path) -> None:
    """In API v2 the overview is read with contactType, and without it even a contactId is
    refused, as the v2 page says; the v2 transactions path is under the contact.
    """
    report = await run_doctor(config_for(served, tmp_path, api_version=2), email=KNOWN_EMAIL)

    expected = dict.fromkeys(CHECK_NAMES, "holds")
    expected["bulk_status_schema"] = "not_checked"
    assert expected == results(report)
    overview_queries = [r.query for r in served.requests_to("GET", "/api/v2/contactoverview")]
    assert {"contactId", "contactType"} == set(overview_queries[0])
    assert 1 == len(served.requests_to("GET", "/api/v2/contacts/*/transactions"))


async def test_a_known_email_that_matches_no_one_is_not_checked(
    served: FakeEngage, tmp_path: Path
) -> None:
    """A --email Engage does not know makes the found check "not checked", not "differs"."""
    report = await run_doctor(config_for(served, tmp_path), email="nobody@example.com")

    assert "not_checked" == results(report)["contact_id_found"]
    assert 0 == report.exit_code


# Against each alternative shape ------------------------------------------------------------


async def doctor_on(shapes: dict[str, str], tmp_path: Path, **kwargs: Any) -> Report:
    """Run the doctor on a seeded fake answering in these shapes."""
    async with FakeEngage(shapes=shapes) as fake:
        seed(fake)
        report = await run_doctor(config_for(fake, tmp_path), email=KNOWN_EMAIL, **kwargs)
        assert {"GET"} == methods(fake)
    return report


@pytest.mark.parametrize("shape", ["code_detail", "error", "string"])
async def test_error_body_shapes_differ_and_are_still_read(shape: str, tmp_path: Path) -> None:
    """Each other error wording: the doctor says error_body differs (exit 1), and the package
    still reads the code: a missing contact is `ContactNotFound`, a lookup miss is None.
    """
    report = await doctor_on({"error_body": shape}, tmp_path)

    async with FakeEngage(shapes={"error_body": shape}, rate_limit=None) as fake:
        status, headers, body = await get_raw(fake, f"/api/v3/contacts/{UNKNOWN_GUID}")
        async with ea.EngageSession(config_for(fake, tmp_path)) as engage:
            missing = await engage.find_contact_id(email="nobody@example.com")
            with pytest.raises(ea.ContactNotFound) as raised:
                await engage.get_contact(UNKNOWN_GUID)

    assert "differs" == results(report)["error_body"]
    assert [] == [n for n, r in results(report).items() if r == "differs" and n != "error_body"]
    assert 1 == report.exit_code
    error = _http.error_for_status(
        _http.get_contact("/api/v3", UNKNOWN_GUID), status, headers, body
    )
    assert (ea.ContactNotFound, "ContactNotFound") == (type(error), error.error_code)
    assert "ContactNotFound" == raised.value.error_code
    assert missing is None


@pytest.mark.parametrize("shape", ["contactId", "id"])
async def test_contact_id_objects_differ_and_are_still_read(shape: str, tmp_path: Path) -> None:
    """A /contacts/id answer wrapped in an object: the doctor says contact_id_found differs
    (and still learns the GUID for the later checks); `find_contact_id` reads the GUID.
    """
    report = await doctor_on({"contact_id": shape}, tmp_path)

    async with FakeEngage(shapes={"contact_id": shape}, rate_limit=None) as fake:
        guid = seed(fake)
        async with ea.EngageSession(config_for(fake, tmp_path)) as engage:
            found = await engage.find_contact_id(email=KNOWN_EMAIL)

    assert ("differs", "holds") == (
        results(report)["contact_id_found"],
        results(report)["contactoverview"],
    )
    assert 1 == report.exit_code
    assert guid == found


async def test_batch_status_with_other_words_differs_and_is_still_read(tmp_path: Path) -> None:
    """A bulk status with `state`, `errors` and 1-based rows: the doctor, given an earlier
    batch, says bulk_status_schema differs; `read_batch_status` reads it as finished with the
    failed row.
    """
    async with FakeEngage(shapes={"batch_status": "state"}) as fake:
        seed(fake)
        batch_id = await earlier_batch(fake, [{"email": "ok@example.com"}, {"email": "broken"}])
        report = await run_doctor(config_for(fake, tmp_path), batch_id=batch_id)
        status = _http.read_batch_status(
            await get_json(fake, "/api/v3/contacts/bulk/status", batchId=batch_id)
        )

    assert ("differs", "holds") == (
        results(report)["bulk_status_schema"],
        results(report)["bulk_status_path"],
    )
    assert 1 == report.exit_code
    assert (True, [(1, "ValidationError")], 1) == (
        status.finished,
        [(f.index, f.error_code) for f in status.failures],
        status.failed_count,
    )


async def test_path_style_transactions_differ_and_the_page_is_still_read(tmp_path: Path) -> None:
    """v3 purchases under /contacts/{id}/transactions: the doctor says transactions_path
    differs and that the path-style URL serves them; `read_page` reads that page.
    """
    report = await doctor_on({"transactions_path": "path"}, tmp_path)

    async with FakeEngage(shapes={"transactions_path": "path"}) as fake:
        guid = seed(fake)
        items, total = _http.read_page(
            await get_json(fake, f"/api/v3/contacts/{guid}/transactions")
        )

    assert "differs" == results(report)["transactions_path"]
    assert "/contacts/{id}/transactions serves them" in seen(report, "transactions_path")
    assert 1 == report.exit_code
    assert (1, 1) == (len(items), total)


async def test_rate_limit_headers_differ_and_calls_still_work(tmp_path: Path) -> None:
    """X-RateLimit-* headers on every answer: the doctor says rate_limit_headers differs and
    shows them; the session's calls read as before.
    """
    report = await doctor_on({"rate_limit_headers": "present"}, tmp_path)

    async with FakeEngage(shapes={"rate_limit_headers": "present"}) as fake:
        guid = seed(fake)
        async with ea.EngageSession(config_for(fake, tmp_path)) as engage:
            found = await engage.find_contact_id(email=KNOWN_EMAIL)

    assert "differs" == results(report)["rate_limit_headers"]
    assert "X-RateLimit-Limit: 200" in seen(report, "rate_limit_headers")
    assert 1 == report.exit_code
    assert guid == found


async def test_the_flusher_drains_through_every_alternative_bulk_shape(tmp_path: Path) -> None:
    """The bulk answers the doctor cannot see without writing (the batch id as an object, the
    status in other words), with every other alternative too: queued creates are still
    delivered once through bulk and their GUIDs reconciled.
    """
    shapes = {
        "error_body": "code_detail",
        "contact_id": "contactId",
        "batch_id": "batchId",
        "batch_status": "state",
        "rate_limit_headers": "present",
    }
    emails = [f"queued{i}@example.com" for i in range(3)]
    async with FakeEngage(shapes=shapes, rate_limit=None) as fake:
        config = config_for(
            fake,
            tmp_path,
            bulk_threshold=1,
            background_delays=(0.01,),
            batch_poll_initial=0.01,
            batch_poll_max=0.05,
        )
        async with ea.EngageSession(config) as engage:
            await fake.go_down()
            refs = [(await engage.create_contact({"email": e})).ref for e in emails]
            await fake.come_up()
            async with ea.OutboxFlusher(config) as flusher:
                report = await flusher.flush_once()
            resolved = [await engage.resolve(ref or "") for ref in refs]

        assert 0 == report.pending
        assert 1 == len(fake.requests_to("POST", "/api/v3/contacts/bulk"))
        assert [fake.find("email", e) for e in emails] == [[guid] for guid in resolved]


# Cannot reach, refused, errors -------------------------------------------------------------


async def test_unreachable_engage_exits_2(served: FakeEngage, tmp_path: Path) -> None:
    """With Engage down the first GET fails: the credentials check errs, the rest are skipped,
    and the exit status is 2.
    """
    config = config_for(served, tmp_path)
    await served.go_down()

    report = await run_doctor(config, timeout=5.0)

    assert ["error"] + ["not_checked"] * (len(CHECKS) - 1) == [c.result for c in report.checks]
    assert (2, "error") == (report.exit_code, report.outcome)
    assert "cannot connect" in seen(report, "credentials")
    assert {"count": 0, "min": None, "median": None, "max": None} == report.round_trip_ms


async def test_a_refused_key_exits_2_and_is_never_printed(
    served: FakeEngage, tmp_path: Path
) -> None:
    """A wrong API key: the credentials check errs with the 401, nothing else is probed, the
    exit status is 2, and neither the table nor the JSON shows the key.
    """
    secret = "wrong-key-0123456789"
    config = make_config(served.url, secret, tmp_path)

    report = await run_doctor(config, email=KNOWN_EMAIL)

    assert "error" == results(report)["credentials"]
    assert "refused: 401 Unauthorized" in seen(report, "credentials")
    assert 2 == report.exit_code
    assert 1 == len(served.requests)
    assert secret not in render_table(report) + json.dumps(report.to_json())


async def test_a_server_error_on_one_probe_is_an_error_not_a_difference(
    served: FakeEngage, tmp_path: Path
) -> None:
    """A 503 tells nothing about Engage's wording: that check errs (exit 2), the others run."""
    served.inject("status", status=503, path="/api/v3/contacts/bulk/status")

    report = await run_doctor(config_for(served, tmp_path))

    assert "error" == results(report)["bulk_status_path"]
    assert "503 ServiceUnavailable" in seen(report, "bulk_status_path")
    assert "holds" == results(report)["transactions_path"]
    assert 2 == report.exit_code


async def test_personal_data_never_reaches_the_report(served: FakeEngage, tmp_path: Path) -> None:
    """An overview the package cannot read, with the contact's email and phone in the wrong
    place: the check differs, and the report holds neither the email nor the phone.
    """
    guid = served.find("email", KNOWN_EMAIL)[0]
    odd = {"id": guid, "attributes": [KNOWN_EMAIL, KNOWN_PHONE], "meta": {}}
    served.inject("status", status=200, path="/api/v3/contactoverview", body=odd)

    report = await run_doctor(config_for(served, tmp_path), email=KNOWN_EMAIL)
    printed = render_table(report) + json.dumps(report.to_json())

    assert "differs" == results(report)["contactoverview"]
    assert (False, False) == (KNOWN_EMAIL in printed, KNOWN_PHONE in printed)


# The command line --------------------------------------------------------------------------


async def test_the_command_prints_the_documented_json(
    served: FakeEngage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`engage-async doctor --json` reads ENGAGE_* (and ENGAGE_DOCTOR_EMAIL), prints the
    documented shape, exits 0, and prints neither the key nor the email.
    """
    for name in list(os.environ):
        if name.startswith("ENGAGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ENGAGE_BASE_URL", served.url)
    monkeypatch.setenv("ENGAGE_API_KEY", served.api_key)
    monkeypatch.setenv("ENGAGE_USER_AGENT", USER_AGENT)
    monkeypatch.setenv("ENGAGE_DOCTOR_EMAIL", KNOWN_EMAIL)

    status = await asyncio.to_thread(main, ["doctor", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)

    assert 0 == status
    assert ["schema", "base_url", "api_version", "outcome", "checks", "round_trip_ms"] == list(
        report
    )
    assert (1, served.url, 3, "holds") == (
        report["schema"],
        report["base_url"],
        report["api_version"],
        report["outcome"],
    )
    assert CHECK_NAMES == [check["name"] for check in report["checks"]]
    assert all(["name", "assumption", "result", "seen"] == list(c) for c in report["checks"])
    assert {"holds"} == {check["result"] for check in report["checks"]} - {"not_checked"}
    assert ["count", "min", "median", "max"] == list(report["round_trip_ms"])
    assert (False, False) == (served.api_key in out, KNOWN_EMAIL in out)
    assert {"GET"} == methods(served)


async def test_the_command_exits_1_with_a_table_when_one_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --json the command prints the table, marking what differs, and exits 1."""
    async with FakeEngage(shapes={"error_body": "string"}) as fake:
        monkeypatch.setenv("ENGAGE_API_KEY", fake.api_key)
        status = await asyncio.to_thread(
            main, ["doctor", "--base-url", fake.url, "--user-agent", USER_AGENT]
        )
    out = capsys.readouterr().out

    assert 1 == status
    assert any(line.startswith("DIFFERS") and "error_body" in line for line in out.splitlines())
    assert "some assumptions differ" in out


async def test_the_command_exits_2_when_engage_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening at the base URL: exit 2."""
    async with FakeEngage() as fake:
        url = fake.url
    monkeypatch.setenv("ENGAGE_API_KEY", "some-key")

    status = await asyncio.to_thread(
        main, ["doctor", "--base-url", url, "--user-agent", USER_AGENT, "--timeout", "5"]
    )

    assert 2 == status
    assert "could not reach Engage" in capsys.readouterr().out


def test_a_malformed_contact_id_is_refused(tmp_path: Path) -> None:
    """--contact-id must be a GUID: a clear error naming it, before any request."""
    config = make_config("http://127.0.0.1:9", "key", tmp_path)

    with pytest.raises(ValueError, match="contact_id"):
        asyncio.run(run_doctor(config, contact_id="not-a-guid"))


# The pure judges ---------------------------------------------------------------------------


def known(**overrides: Any) -> Known:
    """What a v3 run knows, with fixed probe values."""
    values: dict[str, Any] = {
        "root": "/api/v3",
        "api_version": 3,
        "default_contact_type": "Member",
        "deadline_ms": 3000.0,
        "probe_email": "probe@example.com",
        "probe_guid": UNKNOWN_GUID,
    }
    values.update(overrides)
    return Known(**values)


def answer(
    status: int, body: Any, *, ms: float = 10.0, headers: dict[str, str] | None = None
) -> Answer:
    """An answer with a JSON body."""
    return Answer(
        status, headers or {"Content-Type": "application/json"}, json.dumps(body).encode(), ms
    )


def check(name: str) -> Any:
    """The check with that name."""
    return next(c for c in CHECKS if c.name == name)


@pytest.mark.parametrize(
    ("times", "result"), [([10.0, 20.0, 4000.0], "holds"), ([3500.0, 10.0, 3100.0], "differs")]
)
def test_round_trip_is_judged_by_the_median_against_the_deadline(
    times: list[float], result: str
) -> None:
    """The round trip differs when the median GET takes longer than interactive_deadline."""
    verdict = check("round_trip").judge(known(), [answer(404, {}, ms=t) for t in times])

    assert result == verdict.result


def test_a_refused_user_agent_is_an_error() -> None:
    """A 400 naming the User-Agent means Engage refused the caller: an error (exit 2)."""
    body = {"errorCode": "InvalidUserAgent", "message": "Send System/version."}

    verdict = check("credentials").judge(known(), [answer(400, body)])

    assert ("error", True) == (verdict.result, "ENGAGE_USER_AGENT" in verdict.seen)


@pytest.mark.parametrize(
    ("status", "body", "result"),
    [
        (404, {"errorCode": "BatchNotFound", "message": "No batch."}, "holds"),
        (400, {"errorCode": "InvalidBatchId", "message": "Bad id."}, "holds"),
        (404, {"errorCode": "NotFound", "message": "No such endpoint."}, "differs"),
        (404, "", "differs"),
        (405, {"message": "The requested resource does not support GET."}, "differs"),
    ],
)
def test_bulk_status_path_tells_a_missing_route_from_a_missing_batch(
    status: int, body: Any, result: str
) -> None:
    """The bulk status endpoint exists when it names the unknown batch or validates its id;
    a 404 without a code of its own (or a 405) is a missing route.
    """
    verdict = check("bulk_status_path").judge(known(), [answer(status, body)])

    assert result == verdict.result


async def test_the_runner_refuses_anything_but_get(tmp_path: Path) -> None:
    """The one place that sends refuses a non-GET call outright (a guard for future checks)."""
    from engage_async._doctor import _get
    from engage_async._transport import Transport

    transport = Transport(make_config("http://127.0.0.1:9", "key", tmp_path))

    with pytest.raises(RuntimeError, match="only reads"):
        await _get(transport, _http.Call("POST", "/api/v3/contacts"), 1.0)
