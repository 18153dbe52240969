"""Tests of the metrics: the OpenTelemetry instruments read through an `InMemoryMetricReader`
on a private `MeterProvider`, the package without OpenTelemetry, and ``engage-async flush
--metrics-port`` scraped over HTTP.

Sessions and flushers run on a `FakeClock`, so the snapshot the outbox gauges read is
refreshed exactly when a test moves time past `REFRESH_EVERY`, and waits cost nothing.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    PROCESS_TIMEOUT,
    FakeClock,
    flusher_config,
    one_id,
    sidecar_env,
    start_flush,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric

import engage_async as ea
from engage_async import _http, _metrics, cli
from engage_async._metrics import DURATION_BUCKETS, REFRESH_EVERY, Metrics, pause_reason, route
from engage_async.testing import FakeEngage

Points = dict[frozenset[tuple[str, Any]], Any]

CONTACT = "/api/v3/contacts/{id}"


@pytest.fixture(name="reader")
def reader_fixture() -> InMemoryMetricReader:
    """A reader that collects on demand."""
    return InMemoryMetricReader()


@pytest.fixture(name="provider")
def provider_fixture(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    """A meter provider of the test's own (never the global one), read by `reader`."""
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


class SteppedClock(FakeClock):
    """A clock only the test moves: its sleeps take real time and leave it as it was.

    (A `FakeClock` moves on by every sleep, so a flusher's lease keeper, which sleeps in a
    loop, would carry it on by an unknown amount during every flush.)
    """

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` for real; the clock stands still."""
        self.slept.append(seconds)
        await asyncio.sleep(seconds)


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    """A clock only the test moves, with a wall time near now (rows are stamped with it)."""
    return SteppedClock(wall=time.time())


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    """Every engage_async instrument's metric, by name (the callbacks run now)."""
    data = reader.get_metrics_data()
    found: dict[str, Metric] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            assert "engage_async" == scope.scope.name
            assert ea.__version__ == scope.scope.version
            found.update((metric.name, metric) for metric in scope.metrics)
    return found


def key(**attributes: Any) -> frozenset[tuple[str, Any]]:
    """A data point's attributes as `points` keys them; ``__`` in a name stands for a dot
    (``http__request__method`` is ``http.request.method``).
    """
    return frozenset((name.replace("__", "."), value) for name, value in attributes.items())


def points(metric: Metric) -> Points:
    """A sum's or gauge's values, by attributes."""
    return {frozenset(p.attributes.items()): p.value for p in metric.data.data_points}


def histogram_counts(metric: Metric) -> Points:
    """A histogram's number of recordings, by attributes."""
    return {frozenset(p.attributes.items()): p.count for p in metric.data.data_points}


def request_points(metric: Metric, **wanted: Any) -> Points:
    """The points whose attributes include `wanted` (written as for `key`)."""
    return {
        attributes: value
        for attributes, value in points(metric).items()
        if key(**wanted) <= attributes
    }


def flushed(metrics: Mapping[str, Metric]) -> dict[tuple[str, str], int]:
    """``engage_async.flusher.changes`` as (outcome, operation) -> count."""
    return {
        (dict(a)["engage_async.outcome"], dict(a)["engage_async.operation"]): value
        for a, value in points(metrics["engage_async.flusher.changes"]).items()
    }


# --- requests ----------------------------------------------------------------------------------


async def test_requests_are_counted_and_timed_by_endpoint_template_and_outcome(
    fake: FakeEngage, tmp_path: Path, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Every request is counted and timed under its path template (the GUID is ``{id}``),
    method, priority and outcome, with the status code when Engage answered and
    ``error.type`` when it did not answer well.
    """
    config = flusher_config(fake, tmp_path)
    existing = fake.add_contact({"email": "seen@example.com"})
    async with ea.EngageSession(config, meter_provider=provider) as engage:
        await engage.get_contact(existing)
        assert None is await engage.find_contact_id(email="nobody@example.com")
        await fake.go_down()
        delivery = await engage.update_contact(existing, {"city": "Lund"})
        assert delivery.queued

    metrics = collect(reader)
    requests = metrics["engage_async.client.requests"]
    assert "{request}" == requests.unit
    assert requests.data.is_monotonic
    ok = key(
        http__request__method="GET",
        url__template=CONTACT,
        engage_async__priority="interactive",
        engage_async__outcome="ok",
        http__response__status_code=200,
    )
    not_found = key(
        http__request__method="GET",
        url__template="/api/v3/contacts/id",
        engage_async__priority="interactive",
        engage_async__outcome="rejected",
        http__response__status_code=404,
        error__type="404",
    )
    refused = key(
        http__request__method="PATCH",
        url__template=CONTACT,
        engage_async__priority="interactive",
        engage_async__outcome="connection_error",
        error__type="EngageConnectionError",
    )
    counted = points(requests)
    assert 1 == counted[ok]
    assert 1 == counted[not_found]
    assert counted[refused] >= 1  # retried within the deadline, then queued

    duration = metrics["engage_async.client.request.duration"]
    assert "s" == duration.unit
    timed = histogram_counts(duration)
    assert {ok: 1, not_found: 1, refused: counted[refused]} == timed
    assert list(DURATION_BUCKETS) == list(duration.data.data_points[0].explicit_bounds)


async def test_a_429_is_counted_and_slows_the_budget_so_requests_wait(
    fake: FakeEngage, tmp_path: Path, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """A 429 is a ``rate_limited`` request; it halves the key's budget, so with 4 requests a
    second two reads in a row no longer both fit and the second waits for a slot, which
    ``engage_async.rate_limit.wait.duration`` records (about a second, by the clock).
    """
    config = flusher_config(fake, tmp_path, rate_limit=4.0, interactive_deadline=5.0)
    existing = fake.add_contact({"email": "busy@example.com"})
    fake.inject("rate_limited", method="GET", path=f"/api/v3/contacts/{existing}", times=1)
    clock = FakeClock()  # waiting for the budget moves it on
    async with ea.EngageSession(config, clock=clock, meter_provider=provider) as engage:
        await engage.get_contact(existing)  # 429, then answered on a retry
        for _ in range(3):
            await engage.get_contact(existing)

    metrics = collect(reader)
    limited = request_points(
        metrics["engage_async.client.requests"],
        engage_async__outcome="rate_limited",
        http__response__status_code=429,
    )
    assert [1] == list(limited.values())
    waits = metrics["engage_async.rate_limit.wait.duration"]
    assert "s" == waits.unit
    (point,) = waits.data.data_points
    assert key(engage_async__priority="interactive", engage_async__outcome="admitted") == set(
        point.attributes.items()
    )
    assert point.count >= 1
    assert 0.5 < point.max <= 1.1  # a slot frees one window after the answer before it


# --- the outbox gauges and the breaker -----------------------------------------------------------


async def test_an_outage_shows_in_the_outbox_gauges_and_the_breaker(
    fake: FakeEngage,
    tmp_path: Path,
    provider: MeterProvider,
    reader: InMemoryMetricReader,
    clock: FakeClock,
) -> None:
    """While Engage is down, writes are queued and the session's breaker opens; a flusher's
    snapshot then shows the queued changes, the oldest one's age (growing with the clock
    between snapshots), and the outbox paused for a connection error.
    """
    config = flusher_config(
        fake, tmp_path, breaker_threshold=2, background_delays=(60.0,), bulk_threshold=2
    )
    async with ea.EngageSession(config, clock=clock, meter_provider=provider) as engage:
        await fake.go_down()
        for number in range(3):
            await engage.create_contact({"email": f"queued{number}@example.com"})
        breakers = points(collect(reader)["engage_async.circuit_breaker.count"])
        assert {
            key(**{"engage_async.circuit_breaker.state": "closed"}): 0,
            key(**{"engage_async.circuit_breaker.state": "open"}): 1,
            key(**{"engage_async.circuit_breaker.state": "half_open"}): 0,
        } == breakers

        clock.advance(40.0)
        async with ea.OutboxFlusher(config, clock=clock, meter_provider=provider) as flusher:
            await flusher.flush_once()  # the snapshot first, then the outage pauses
            metrics = collect(reader)
            assert {
                key(**{"engage_async.outbox.state": "pending"}): 3,
                key(**{"engage_async.outbox.state": "inflight"}): 0,
                key(**{"engage_async.outbox.state": "waiting_guid"}): 0,
                key(**{"engage_async.outbox.state": "dead"}): 0,
            } == points(metrics["engage_async.outbox.change.count"])
            assert "{change}" == metrics["engage_async.outbox.change.count"].unit
            assert not metrics["engage_async.outbox.change.count"].data.is_monotonic
            age = metrics["engage_async.outbox.oldest_pending.age"]
            assert "s" == age.unit
            assert [pytest.approx(40.0)] == list(points(age).values())
            assert {key(): 0} == points(metrics["engage_async.outbox.paused"])
            assert {key(): 0} == points(metrics["engage_async.bulk.batch.count"])
            # Cool-down over: the next call may probe.
            breakers = points(metrics["engage_async.circuit_breaker.count"])
            assert 1 == breakers[key(**{"engage_async.circuit_breaker.state": "half_open"})]

            clock.advance(REFRESH_EVERY)
            await flusher.flush_once()  # paused: counted again, and nothing sent
            metrics = collect(reader)
            paused = {key(**{"engage_async.outbox.pause.reason": "connection_error"}): 1}
            assert paused == points(metrics["engage_async.outbox.paused"])
            assert "1" == metrics["engage_async.outbox.paused"].unit
            clock.advance(2.0)  # no new snapshot: the age grows with the clock all the same
            age = points(collect(reader)["engage_async.outbox.oldest_pending.age"])
            assert [pytest.approx(40.0 + REFRESH_EVERY + 2.0)] == list(age.values())


async def test_the_flusher_counts_deliveries_dead_letters_and_batches_by_operation(
    fake: FakeEngage,
    tmp_path: Path,
    provider: MeterProvider,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backlog drained through bulk counts each delivered change under its operation; the
    bulk batch shows in ``engage_async.bulk.batch.count`` while Engage holds it; a change
    Engage rejects for good is counted dead under its operation; every step is timed.
    """
    # Real time here (batches are polled by it): a snapshot at every step instead.
    monkeypatch.setattr(_metrics, "REFRESH_EVERY", 0.0)
    monkeypatch.setattr(_metrics, "_QUERY_SHARE", 0.0)
    config = flusher_config(fake, tmp_path, bulk_threshold=3)
    existing = fake.add_contact({"email": "old@example.com"})
    async with ea.EngageSession(config, meter_provider=provider) as engage:
        await fake.go_down()
        for number in range(3):
            await engage.create_contact({"email": f"bulk{number}@example.com"})
        await engage.update_contact(existing, {"city": "Visby"})
        await fake.come_up()

        fake.hold_batches = True
        async with ea.OutboxFlusher(config, meter_provider=provider) as flusher:
            await flusher.flush_once(wait_for_batches=False)
            collect(reader)  # a reader asked: the next step counts the outbox again
            await flusher.flush_once(wait_for_batches=False)  # counts the batches held
            metrics = collect(reader)
            assert {key(): 1} == points(metrics["engage_async.bulk.batch.count"])
            assert "{batch}" == metrics["engage_async.bulk.batch.count"].unit
            fake.release_batches()
            fake.hold_batches = False
            await flusher.flush_once()

            await fake.go_down()
            await engage.update_contact(existing, {"city": "Ystad"})
            await fake.come_up()
            fake.inject("status", method="PATCH", path=f"/api/v3/contacts/{existing}", status=422)
            report = await flusher.flush_once()
            assert 1 == report.dead

    metrics = collect(reader)
    assert {
        ("delivered", "create"): 3,
        ("delivered", "update"): 1,
        ("dead", "update"): 1,
    } == flushed(metrics)
    assert "{change}" == metrics["engage_async.flusher.changes"].unit
    steps = histogram_counts(metrics["engage_async.flusher.step.duration"])
    assert {"worked", "idle"} <= {dict(a)["engage_async.outcome"] for a in steps}
    assert "s" == metrics["engage_async.flusher.step.duration"].unit
    bulk = request_points(
        metrics["engage_async.client.requests"],
        url__template="/api/v3/contacts/bulk",
        engage_async__priority="background",
    )
    assert {"POST"} == {dict(a)["http.request.method"] for a in bulk}


async def test_changes_written_to_xml_files_are_counted_as_exported(
    fake: FakeEngage,
    tmp_path: Path,
    provider: MeterProvider,
    reader: InMemoryMetricReader,
    clock: FakeClock,
) -> None:
    """In ``"xml"`` mode the flusher's changes are counted ``exported``, by operation."""
    config = flusher_config(fake, tmp_path, fallback_mode="xml")
    existing = fake.add_contact({"email": "filed@example.com"})
    async with ea.EngageSession(config, clock=clock, meter_provider=provider) as engage:
        await fake.go_down()
        await engage.create_contact({"email": "new@example.com"})
        await engage.update_contact(existing, {"city": "Kiruna"})
        await fake.come_up()
    async with ea.OutboxFlusher(config, clock=clock, meter_provider=provider) as flusher:
        report = await flusher.flush_once()
    assert 2 == report.exported
    assert {("exported", "create"): 1, ("exported", "update"): 1} == flushed(collect(reader))


# --- what attributes may hold ----------------------------------------------------------------


async def test_no_attribute_holds_an_email_a_guid_or_the_api_key(
    fake: FakeEngage, tmp_path: Path, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """After reads, writes, an outage, a replay and a dead letter, every attribute value of
    every instrument is a word from a fixed list: no email, GUID, API key or path with a GUID.
    """
    config = flusher_config(fake, tmp_path, bulk_threshold=2)
    existing = fake.add_contact({"email": "private.person@example.com"})
    async with ea.EngageSession(config, meter_provider=provider) as engage:
        await engage.contact_overview(email="private.person@example.com", contact_type="Member")
        await engage.update_contact(existing, {"firstName": "Private"})
        await fake.go_down()
        await engage.create_contact({"email": "secret.one@example.com"})
        await engage.create_contact({"email": "secret.two@example.com"})
        await engage.update_contact(existing, {"city": "Malmö"})
        await fake.come_up()
        fake.inject("status", method="POST", path="/api/v3/contacts/bulk", status=422, times=1)
        async with ea.OutboxFlusher(config, meter_provider=provider) as flusher:
            await flusher.flush_once()
            await flusher.flush_once()
    guids = set(fake.contacts) | {one_id(fake, "secret.one@example.com")}

    values: set[str] = set()
    for metric in collect(reader).values():
        for point in metric.data.data_points:
            values.update(str(value) for value in point.attributes.values())
    assert values
    for value in values:
        assert "@" not in value
        assert fake.api_key not in value
        assert not any(guid in value for guid in guids), value
        assert re.fullmatch(r"[A-Za-z0-9_./{}]+", value), value


# --- pure parts ----------------------------------------------------------------------------------


def test_route_keeps_the_apis_own_words_and_hides_everything_else() -> None:
    """``url.template`` is the call's path with ``{id}`` for every segment that is not one of
    the API's words: GUIDs, and anything else, never reach an attribute.
    """
    guid = "8d1a4a2c-1234-4cde-9f00-0123456789ab"
    assert CONTACT == route(_http.get_contact("/api/v3", guid).path)
    assert "/api/v3/contacts/{id}/updateContactType" == route(
        _http.update_contact_type("/api/v3", guid, "Member").path
    )
    assert "/api/v2/contacts/{id}/promoteToMember" == route(
        _http.promote_to_member("/api/v2", 2, guid, b"{}").path
    )
    assert "/api/v3/contacts/bulk/status" == route(_http.bulk_status("/api/v3", "batch-1").path)
    assert "/api/v3/contacts/id" == route(_http.contact_id_lookup("/api/v3", {"email": "a"}).path)
    assert "/api/v3/{id}/{id}" == route("/api/v3/anna@example.com/0701234567")


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, b'{"errorCode": "TooManyRequests"}', "rate_limited"),
        (503, b"", "server_error"),
        (500, b'{"errorCode": "InvalidSystemConfiguration"}', "configuration"),
        (401, b'{"errorCode": "Unauthorized"}', "auth"),
        (302, b"", "unexpected_response"),
    ],
)
def test_pause_reason_names_the_kind_of_an_answer_outage(
    status: int, body: bytes, expected: str
) -> None:
    """The pause's stored reason is an exception's message; its kind comes from the status
    in it, as the package words it (the message itself holds the path with a GUID).
    """
    call = _http.get_contact("/api/v3", "8d1a4a2c-1234-4cde-9f00-0123456789ab")
    error = _http.error_for_status(call, status, {"Content-Type": "application/json"}, body)
    assert expected == pause_reason(str(error))


def test_pause_reason_names_outages_without_an_answer() -> None:
    """Timeouts, refused or lost connections and an unwritable XML directory have kinds of
    their own; anything else is ``_OTHER``.
    """
    assert "timeout" == pause_reason("GET /api/v3/contacts/x: no answer within 30.00 s")
    assert "connection_error" == pause_reason(
        "GET /api/v3/contacts/x: cannot connect to Engage (ClientConnectorError, ECONNREFUSED)"
    )
    assert "connection_error" == pause_reason(
        "POST /api/v3/contacts: connection lost before the answer (ServerDisconnectedError)"
    )
    assert "xml_directory" == pause_reason("cannot write XML files to /x: PermissionError")
    assert "_OTHER" == pause_reason("something new")


# --- without OpenTelemetry, and the provider argument --------------------------------------------


async def test_the_package_works_without_opentelemetry(
    fake: FakeEngage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: MeterProvider,
    reader: InMemoryMetricReader,
) -> None:
    """With ``opentelemetry`` not importable, sessions and flushers deliver, queue and replay
    as before, and report nothing.
    """
    for name in [n for n in sys.modules if n == "opentelemetry" or n.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    assert not Metrics.for_provider().enabled

    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, meter_provider=provider) as engage:
        await engage.create_contact({"email": "plain@example.com"})
        await fake.go_down()
        queued = await engage.create_contact({"email": "later@example.com"})
        assert queued.queued
        await fake.come_up()
        async with ea.OutboxFlusher(config, meter_provider=provider) as flusher:
            report = await flusher.flush_once()
    assert (1, 0) == (report.created, report.pending)
    monkeypatch.undo()
    assert {} == collect(reader)


async def test_meter_provider_must_be_a_meter_provider(config: ea.EngageConfig) -> None:
    """A `meter_provider` that is not one is refused when the session or flusher is made."""
    with pytest.raises(TypeError, match="meter_provider: must be an OpenTelemetry"):
        ea.EngageSession(config, meter_provider="prometheus")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="meter_provider: must be an OpenTelemetry"):
        ea.OutboxFlusher(config, meter_provider=object())  # type: ignore[arg-type]


async def test_closed_sessions_and_flushers_are_no_longer_reported(
    fake: FakeEngage,
    tmp_path: Path,
    provider: MeterProvider,
    reader: InMemoryMetricReader,
    clock: FakeClock,
) -> None:
    """Once closed, a session's breaker and a flusher's outbox leave the gauges: an old
    snapshot would otherwise show an age that grows for ever.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config, clock=clock, meter_provider=provider) as engage:
        await fake.go_down()
        await engage.create_contact({"email": "stays@example.com"})
        flusher = ea.OutboxFlusher(config, clock=clock, meter_provider=provider)
        async with flusher:
            await flusher.flush_once()
            assert "engage_async.outbox.change.count" in collect(reader)
    metrics = collect(reader)
    assert "engage_async.outbox.change.count" not in metrics
    assert "engage_async.outbox.oldest_pending.age" not in metrics
    assert "engage_async.circuit_breaker.count" not in metrics


# --- the sidecar's scrape port -------------------------------------------------------------------


@pytest.mark.slow
async def test_flush_serves_its_metrics_for_prometheus(fake: FakeEngage, tmp_path: Path) -> None:
    """``engage-async flush --metrics-port 0`` prints the port it bound; scraping it over HTTP
    finds the outbox's changes by state, the requests and the flusher's counts in
    Prometheus' names.
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        await engage.create_contact({"email": "scraped@example.com"})
        await fake.come_up()
    log = tmp_path / "sidecar.log"
    process = await start_flush(
        sidecar_env(fake, config), log, "--metrics-port", "0", "--metrics-host", "127.0.0.1"
    )
    try:
        url = await _printed_url(log, process)
        assert url.startswith("http://127.0.0.1:")
        text = await _scrape_until(url, "engage_async_flusher_changes_total{")
    finally:
        process.terminate()
        status = await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT)
    assert 0 == status, log.read_text()
    assert re.search(
        r'^engage_async_outbox_change_count\{.*state="pending".*\} ', text, re.MULTILINE
    )
    assert re.search(
        r'^engage_async_flusher_changes_total\{.*engage_async_operation="create".*'
        r'engage_async_outcome="delivered".*\} 1\.0$',
        text,
        re.MULTILINE,
    )
    assert re.search(r"^engage_async_client_request_duration_seconds_bucket\{", text, re.MULTILINE)
    assert "# TYPE engage_async_outbox_oldest_pending_age_seconds gauge" in text


async def _printed_url(log: Path, process: asyncio.subprocess.Process) -> str:
    """The metrics URL the sidecar printed on start."""
    async with asyncio.timeout(PROCESS_TIMEOUT):
        while True:
            found = re.search(r"metrics on (http://\S+/metrics)", log.read_text())
            if found:
                return found.group(1)
            assert process.returncode is None, log.read_text()
            await asyncio.sleep(0.05)


async def _scrape_until(url: str, needle: str) -> str:
    """Scrape `url` until the text holds `needle` (the flusher drains meanwhile)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(PROCESS_TIMEOUT):
        while True:
            async with http.get(url) as response:
                assert 200 == response.status
                assert response.content_type == "text/plain"
                text = await response.text()
            if needle in text:
                return text
            await asyncio.sleep(0.1)


def test_metrics_port_without_the_prometheus_extra_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Without the ``prometheus`` extra, ``--metrics-port`` exits 2 naming the extra."""
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.prometheus", None)
    monkeypatch.setenv("ENGAGE_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ENGAGE_API_KEY", "key")
    monkeypatch.setenv("ENGAGE_USER_AGENT", "Tests/1.0")
    monkeypatch.setenv("ENGAGE_OUTBOX", str(tmp_path / "outbox.sqlite3"))

    assert 2 == cli.main(["flush", "--once", "--metrics-port", "0"])
    assert "pip install 'engage-async[prometheus]'" in capsys.readouterr().err
    assert not (tmp_path / "outbox.sqlite3").exists()


def test_metrics_port_must_be_a_port_number(capsys: pytest.CaptureFixture[str]) -> None:
    """A ``--metrics-port`` outside 0-65535 is a usage error naming the value."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["flush", "--metrics-port", "70000"])
    assert 2 == exited.value.code
    assert "'70000' is not a port number" in capsys.readouterr().err


async def test_without_a_reader_the_flusher_counts_the_outbox_once(
    fake: FakeEngage,
    tmp_path: Path,
    provider: MeterProvider,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting the outbox scans it: a flusher counts it again only after a reader collected
    the last count, so with no reader (a no-op provider) it costs one count, not one every
    few seconds.
    """
    monkeypatch.setattr(_metrics, "REFRESH_EVERY", 0.0)
    monkeypatch.setattr(_metrics, "_QUERY_SHARE", 0.0)
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config):
        pass
    async with ea.OutboxFlusher(config, meter_provider=provider) as flusher:
        store = flusher._ready()
        counted = 0
        counts = store.counts

        async def counting() -> Any:
            nonlocal counted
            counted += 1
            return await counts()

        monkeypatch.setattr(store, "counts", counting)
        for _ in range(3):
            await flusher.flush_once()
        unread = counted
        collect(reader)
        await flusher.flush_once()

    assert (1, 2) == (unread, counted)
