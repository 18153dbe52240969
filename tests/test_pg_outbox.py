"""What the PostgreSQL outbox adds to the promises every outbox keeps (those run on both
backends in the other suites): configuration and its secret, the versioned schema, one clock
for every host, a fleet of hosts on one outbox, an unreachable or restarted server, the wake-up
by NOTIFY, one rate budget across processes, and moving a SQLite outbox over.

Every test runs against the real PostgreSQL 15 of tests/servers.py, in a schema of its own.
Processes with their own ``ENGAGE_*`` settings and a wrong wall clock (tests/scripts/skewed.py)
stand in for hosts. Where a lease has to run out on the server's clock, which no test can move,
the test waits for it, with leases of a second or two.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import USER_AGENT, make_config, one_id, outbox_rows, outbox_sql
from servers import Postgres

import engage_async as ea
from engage_async._changes import NewChange, Operation
from engage_async._keys import contact_key
from engage_async._outboxes import open_outbox
from engage_async._pg_outbox import PgOutbox
from engage_async._pg_schema import MIGRATIONS
from engage_async.testing import FakeEngage

pytestmark = pytest.mark.parametrize("backend", ["postgres"], indirect=True)

SCRIPTS = Path(__file__).parent / "scripts"
DAY = 86400.0
# Generous limits so a broken child fails the test instead of hanging it; never asserted.
PATIENCE = 60.0


def update(number: int, body: Mapping[str, Any] | None = None) -> NewChange:
    """An update of a contact of its own."""
    guid = f"2e40b702-2767-4abe-ae99-{number:012x}"
    return NewChange(
        Operation.UPDATE,
        contact_key(contact_id=guid),
        body=dict(body or {"city": "Kiruna"}),
        contact_id=guid,
    )


def leaks(exc: BaseException, secret: str) -> bool:
    """Whether `secret` is anywhere in the exception: message, repr, args or chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(secret in text for text in (str(seen), repr(seen), repr(seen.args))):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def server_time(config: ea.EngageConfig) -> float:
    """The database server's clock, as the outbox reads it."""
    [row] = outbox_sql(config, "SELECT {s}.clock() AS now".replace("{s}", config.outbox_schema))
    return float(row["now"])


# --- configuration and its secret -----------------------------------------------------------


async def test_the_password_is_never_shown(
    postgres: Postgres, fake: FakeEngage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A password in outbox_url is used, and never appears in the config's repr, the outbox's
    location, the admin's repr, a log line, or the error when it is wrong.
    """
    caplog.set_level("DEBUG")
    config = make_config(fake.url, fake.api_key, tmp_path, outbox_url=postgres.password_url)
    async with ea.EngageSession(config) as session:
        await fake.go_down()
        delivery = await session.update_contact(str(uuid.uuid4()), {"city": "Umeå"})
    admin = ea.OutboxAdmin(postgres.password_url, schema=config.outbox_schema)
    stats = await admin.stats()
    wrong = postgres.password_url.replace(postgres.password, "not-the-password-at-all")
    with pytest.raises(ea.OutboxError) as refused:
        async with ea.EngageSession(attrs_evolve(config, outbox_url=wrong)):
            pass

    assert (True, 1) == (delivery.queued, stats.by_state["pending"])
    shown = [repr(config), config.outbox_location, repr(admin), admin.location, caplog.text]
    assert [] == [text for text in shown if postgres.password in text]
    assert "***" in repr(config)
    assert not leaks(refused.value, "not-the-password-at-all")
    assert "password authentication failed" in str(refused.value)


def attrs_evolve(config: ea.EngageConfig, **changes: Any) -> ea.EngageConfig:
    """`config` with `changes` (attrs.evolve, checked again)."""
    import attrs

    return attrs.evolve(config, **changes)


@pytest.mark.parametrize("source", ["PGPASSWORD", "PGPASSFILE"])
async def test_the_password_may_come_from_the_environment_or_a_pgpass_file(
    postgres: Postgres,
    fake: FakeEngage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    """A URL without a password logs in with PGPASSWORD, or with a .pgpass file."""
    url = postgres.password_url.replace(f":{postgres.password}@", "@")
    if source == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", postgres.password)
    else:
        passfile = tmp_path / "pgpass"
        passfile.write_text(
            f"{postgres.host}:{postgres.port}:*:{postgres.password_user}:{postgres.password}\n"
        )
        passfile.chmod(0o600)
        monkeypatch.setenv("PGPASSFILE", str(passfile))
    config = make_config(fake.url, fake.api_key, tmp_path, outbox_url=url)

    outbox = await open_outbox(config)
    try:
        queued = await outbox.enqueue(update(1))
    finally:
        await outbox.close()

    assert [queued.change_id] == [row["change_id"] for row in outbox_rows(config)]


def test_outbox_url_defaults_to_the_sqlite_file_and_is_read_from_the_environment(
    tmp_path: Path,
) -> None:
    """Without outbox_url the outbox is the SQLite file at outbox_path; ENGAGE_OUTBOX_URL and
    ENGAGE_OUTBOX_SCHEMA choose a PostgreSQL one; a sqlite:/// URL names the file.
    """
    env = {
        "ENGAGE_BASE_URL": "https://tenant.voyado.com",
        "ENGAGE_API_KEY": "key",
        "ENGAGE_USER_AGENT": USER_AGENT,
        "ENGAGE_OUTBOX": str(tmp_path / "o.sqlite3"),
    }
    plain = ea.EngageConfig.from_env(env)
    pg = ea.EngageConfig.from_env(
        {
            **env,
            "ENGAGE_OUTBOX_URL": "postgresql://app@db.internal:5432/engage",
            "ENGAGE_OUTBOX_SCHEMA": "shop_outbox",
        }
    )
    file = ea.EngageConfig.from_env({**env, "ENGAGE_OUTBOX_URL": f"sqlite:///{tmp_path}/x.db"})

    assert (False, f"sqlite:///{tmp_path / 'o.sqlite3'}") == (
        plain.outbox_is_postgres,
        plain.outbox_location,
    )
    assert (True, "shop_outbox") == (pg.outbox_is_postgres, pg.outbox_schema)
    assert (False, tmp_path / "x.db") == (file.outbox_is_postgres, file.outbox_path)


# --- the schema -------------------------------------------------------------------------------


async def test_the_outbox_lives_in_a_schema_of_its_own_made_on_first_use(
    postgres: Postgres, config: ea.EngageConfig
) -> None:
    """The first session creates the configured schema with its tables, at the current
    version; nothing goes into the database's public schema.
    """
    async with ea.EngageSession(config):
        pass

    tables = outbox_sql(
        config,
        "SELECT table_schema, table_name FROM information_schema.tables"
        " WHERE table_schema IN ($1, 'public') ORDER BY table_name",
        config.outbox_schema,
    )
    versions = outbox_sql(config, "SELECT version FROM schema_migrations")
    assert {config.outbox_schema} == {row["table_schema"] for row in tables}
    assert {"changes", "identities", "batches", "flushers", "budgets"} <= {
        row["table_name"] for row in tables
    }
    assert [{"version": len(MIGRATIONS)}] == versions


@pytest.mark.parametrize("breaking", [True, False])
async def test_a_schema_from_a_newer_version_is_refused_when_breaking(
    config: ea.EngageConfig, breaking: bool
) -> None:
    """A database migrated by a newer engage-async with a breaking step is refused, naming
    the versions; a newer step that only adds (not breaking) is accepted.
    """
    await (await open_outbox(config)).close()
    newer = len(MIGRATIONS) + 1
    outbox_sql(
        config, "INSERT INTO schema_migrations (version, breaking) VALUES ($1, $2)", newer, breaking
    )

    if breaking:
        with pytest.raises(ea.OutboxError, match=rf"version {newer}, newer .* upgrade"):
            await open_outbox(config)
    else:
        await (await open_outbox(config)).close()


async def test_processes_starting_at_once_migrate_once(config: ea.EngageConfig) -> None:
    """Several processes opening a new outbox at the same moment all succeed; the schema is
    made once (the migration runs under a transaction-scoped advisory lock).
    """
    outboxes = await asyncio.gather(*(open_outbox(config) for _ in range(4)))
    for outbox in outboxes:
        await outbox.close()

    assert [{"version": 1}] == outbox_sql(config, "SELECT version FROM schema_migrations")


async def test_a_flusher_and_the_admin_refuse_a_database_without_an_outbox(
    config: ea.EngageConfig,
) -> None:
    """Only a session creates the outbox: a flusher or the admin pointed at the wrong schema
    raises OutboxError and creates nothing.
    """
    assert config.outbox_url is not None
    with pytest.raises(ea.OutboxError, match="no outbox in schema"):
        async with ea.OutboxFlusher(config):
            pass
    with pytest.raises(ea.OutboxError, match="no outbox in schema"):
        await ea.OutboxAdmin(config.outbox_url, schema=config.outbox_schema).stats()

    schemas = outbox_sql(
        config,
        "SELECT schema_name FROM information_schema.schemata WHERE schema_name = $1",
        config.outbox_schema,
    )
    assert [] == schemas


# --- an unreachable, slow or restarted server ------------------------------------------------


async def test_an_unreachable_database_raises_outbox_error_within_the_deadline(
    postgres: Postgres, fake: FakeEngage, tmp_path: Path
) -> None:
    """The server stopped while Engage is down: a write raises OutboxError (never
    queued=True) within the interactive deadline, and nothing is kept.
    """
    config = make_config(fake.url, fake.api_key, tmp_path, outbox_timeout=None)
    await fake.go_down()
    async with ea.EngageSession(config) as session:
        await asyncio.to_thread(postgres.stop)
        try:
            started = time.monotonic()
            with pytest.raises(ea.OutboxError):
                await session.update_contact(str(uuid.uuid4()), {"city": "Lost"})
            elapsed = time.monotonic() - started
        finally:
            await asyncio.to_thread(postgres.start)

    assert elapsed < config.interactive_deadline
    assert [] == outbox_rows(config)


async def test_with_the_database_away_writes_raise_unsent_and_reads_go_on(
    postgres: Postgres, fake: FakeEngage, tmp_path: Path
) -> None:
    """Engage is up but the outbox is not: a write raises OutboxError without reaching Engage
    (the session cannot tell what waits ahead of it, nor keep it), and a read still answers.
    """
    config = make_config(fake.url, fake.api_key, tmp_path, outbox_timeout=None)
    async with ea.EngageSession(config) as session:
        created = await session.create_contact({"email": "anna@example.com"}, contact_type="Member")
        assert created.contact_id is not None
        fake.clear_requests()
        await asyncio.to_thread(postgres.stop)
        try:
            with pytest.raises(ea.OutboxError):
                await session.update_contact(created.contact_id, {"city": "Unsent"})
            with pytest.raises(ea.OutboxError):
                await session.create_contact({"email": "bo@example.com"}, contact_type="Member")
            writes = [r for r in fake.requests if r.method in ("POST", "PATCH", "PUT")]
            read = await session.get_contact(created.contact_id)
        finally:
            await asyncio.to_thread(postgres.start)

    assert [] == writes
    assert created.contact_id == read.id
    assert "city" not in fake.contact_json(created.contact_id)


async def test_a_database_that_does_not_answer_in_time_raises_and_keeps_nothing(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """A table locked by someone else makes the write wait: after the outbox's share of the
    interactive deadline it raises OutboxError, and the write is not kept once the lock goes.
    """
    config = make_config(fake.url, fake.api_key, tmp_path, outbox_timeout=None)
    assert config.outbox_url is not None
    await fake.go_down()
    async with ea.EngageSession(config) as session:
        blocker = await asyncpg.connect(config.outbox_url)
        try:
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute(f"LOCK TABLE {config.outbox_schema}.changes")
            started = time.monotonic()
            with pytest.raises(ea.OutboxError):
                await session.update_contact(str(uuid.uuid4()), {"city": "Late"})
            elapsed = time.monotonic() - started
            await transaction.rollback()
        finally:
            await blocker.close()
        kept = await session.update_contact(str(uuid.uuid4()), {"city": "Kept"})

    assert elapsed < config.interactive_deadline
    assert [kept.change_id] == [row["change_id"] for row in outbox_rows(config)]


def flusher_config(fake: FakeEngage, tmp_path: Path, **overrides: Any) -> ea.EngageConfig:
    """A config on `fake` whose flusher waits milliseconds on the real clock (the server's
    clock cannot be moved by a test).
    """
    values: dict[str, Any] = {
        "background_delays": (0.01,),
        "batch_poll_initial": 0.01,
        "batch_poll_max": 0.05,
        "poll_interval": 0.05,
        "lease_seconds": 5.0,
    }
    values.update(overrides)
    return make_config(fake.url, fake.api_key, tmp_path, **values)


async def test_the_pool_is_bounded(config: ea.EngageConfig) -> None:
    """200 writers at once share at most outbox_pool_size connections, and all commit."""
    assert config.outbox_url is not None
    outbox = await PgOutbox.open(
        config.outbox_url, schema=config.outbox_schema, pool_size=3, session_timeout=30.0
    )
    try:
        queued = await asyncio.gather(*(outbox.enqueue(update(n)) for n in range(200)))
        size = outbox._pool.get_size()
    finally:
        await outbox.close()

    assert 3 >= size
    assert sorted(q.change_id for q in queued) == sorted(
        row["change_id"] for row in outbox_rows(config)
    )


async def test_a_restart_of_postgresql_mid_flush_loses_and_doubles_nothing(
    postgres: Postgres, fake: FakeEngage, tmp_path: Path
) -> None:
    """PostgreSQL restarts while a running flusher is sending (each request slow): the
    flusher carries on once the server is back, taking back the rows it held when the
    database failed under it once their lease ran out; every create exists once, every
    update is applied, nothing is dead or left behind.
    """
    config = flusher_config(
        fake, tmp_path, lease_seconds=1.0, bulk_threshold=1000, rate_limit=1000.0
    )
    existing = [fake.add_contact({"email": f"r{i}@example.com"}) for i in range(10)]
    emails = [f"new{i}@example.com" for i in range(10)]
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        for email in emails:
            await engage.create_contact({"email": email, "firstName": "New"})
        for guid in existing:
            await engage.update_contact(guid, {"city": "Restart"})
        await fake.come_up()
    fake.inject("slow", method="PATCH", delay=0.1)
    fake.inject("slow", method="POST", delay=0.1)

    async with ea.OutboxFlusher(config) as flusher:
        flusher.start()
        async with asyncio.timeout(PATIENCE):
            while (
                len(fake.requests_to("PATCH", "/api/v3/contacts/*"))
                + len(fake.requests_to("POST", "/api/v3/contacts"))
                < 5
            ):
                await asyncio.sleep(0.02)
        await asyncio.to_thread(postgres.restart)
        async with asyncio.timeout(PATIENCE):
            while await unfinished(config):
                await asyncio.sleep(0.1)

    # Each create made one contact (a create whose answer the restart cut off was looked up
    # before it was sent again), every update applied, every change done and none dead.
    for email in emails:
        one_id(fake, email)
    assert ["Restart"] * 10 == [fake.contact_json(g)["attributes"]["city"] for g in existing]
    assert {"done": 20} == dict(collections.Counter(row["state"] for row in outbox_rows(config)))


@pytest.mark.parametrize("lost", ["after the commit", "before the statement"])
async def test_a_lost_answer_to_an_enqueue_is_told_truthfully(
    config: ea.EngageConfig, monkeypatch: pytest.MonkeyPatch, lost: str
) -> None:
    """The connection goes away around an enqueue: when the change was committed the caller
    gets queued=True (the outbox looked it up by its id), when it was not, OutboxError; never
    the other way round, and never a second copy.
    """
    from engage_async import _pg_rows

    real = _pg_rows.enqueue_at_once

    async def flaky(*args: Any) -> Any:
        if lost == "before the statement":
            raise asyncpg.ConnectionDoesNotExistError("connection was closed")
        await real(*args)
        raise asyncpg.ConnectionDoesNotExistError("connection was closed")

    outbox = await open_outbox(config)
    try:
        monkeypatch.setattr(_pg_rows, "enqueue_at_once", flaky)
        if lost == "after the commit":
            queued = await outbox.enqueue(update(7))
            expected = [queued.change_id]
        else:
            with pytest.raises(ea.OutboxError):
                await outbox.enqueue(update(7))
            expected = []
    finally:
        monkeypatch.undo()
        await outbox.close()

    assert expected == [row["change_id"] for row in outbox_rows(config)]


@pytest.mark.slow
async def test_a_flusher_still_wakes_on_notify_after_postgresql_restarted(
    postgres: Postgres, fake: FakeEngage, config: ea.EngageConfig
) -> None:
    """Notifications are lost while the listener's connection is down: after a restart it
    reconnects by itself, so a change queued afterwards by another process still wakes a
    flusher that polls only every minute.
    """
    slow_poll = attrs_evolve(config, poll_interval=60.0, background_delays=(0.05,))
    guid = fake.add_contact({"email": "after-restart@example.com"})
    await (await open_outbox(config)).close()
    async with ea.OutboxFlusher(slow_poll) as flusher:
        flusher.start()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(postgres.restart)
        # The server is back: the listener's first try comes within 0.75 s of losing it.
        await asyncio.sleep(2.0)
        fake.inject("server_error", method="PATCH", times=1)
        await host(
            host_env(fake, config, retry_attempts="1"),
            0.0,
            "queue",
            json.dumps([{"update": guid, "changes": {"city": "Again"}}]),
        )
        async with asyncio.timeout(20):
            while fake.contact_json(guid)["attributes"].get("city") != "Again":
                await asyncio.sleep(0.05)

    assert "Again" == fake.contact_json(guid)["attributes"]["city"]


async def unfinished(config: ea.EngageConfig) -> int:
    """How many changes are not done or dead yet (0 also while the server cannot say)."""
    try:
        rows = outbox_sql(
            config, "SELECT count(*) AS n FROM changes WHERE state NOT IN ('done', 'dead')"
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return 1
    return int(rows[0]["n"])


@pytest.mark.slow
async def test_two_hosts_writing_the_same_contacts_while_a_flusher_claims_keep_order(
    config: ea.EngageConfig,
) -> None:
    """Two handles with pools of their own (two hosts) queue updates to the same five contacts
    at once, one setting "a" to 0, 1, 2, ... and the other "b", while a third claims and
    applies what is due: no update is lost (a merge never lands in a row just claimed), and
    each contact sees each writer's values in the order they were written.
    """
    assert config.outbox_url is not None
    hosts = [await open_outbox(config) for _ in range(3)]
    one, two, flusher = hosts
    rounds, contacts = 40, 5
    applied: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    writing = True

    async def write(outbox: Any, field: str) -> None:
        for value in range(rounds):
            await asyncio.gather(
                *(outbox.enqueue(update(n, {field: value})) for n in range(contacts))
            )

    async def drain() -> None:
        while True:
            claimed = await flusher.claim("drain", limit=100, lease_seconds=30.0)
            for change in claimed:
                applied[change.contact_key].append(change.body or {})
            await flusher.finish([change.seq for change in claimed])
            if not claimed and not writing:
                return
            await asyncio.sleep(0.001)

    try:
        draining = asyncio.create_task(drain())
        await asyncio.gather(write(one, "a"), write(two, "b"))
        writing = False
        await draining
    finally:
        for outbox in hosts:
            await outbox.close()

    assert contacts == len(applied)
    for bodies in applied.values():
        final: dict[str, Any] = {}
        for body in bodies:
            final.update(body)
        assert {"a": rounds - 1, "b": rounds - 1} == final
        for field in ("a", "b"):
            seen = [body[field] for body in bodies if field in body]
            assert sorted(seen) == seen


# --- one clock ---------------------------------------------------------------------------------


async def test_pauses_and_leases_follow_the_servers_clock_whatever_the_hosts_say(
    config: ea.EngageConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process whose clock is a day ahead pauses every flusher for exactly the pause's
    length and takes a lease of exactly its length; one whose clock is a day behind sees the
    same pause and leaves the live lease alone. Each is measured on the server's clock.
    """
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + DAY)
    ahead = await open_outbox(config)
    try:
        await ahead.enqueue(update(1))
        await ahead.set_pause(delay=60.0, reason="outage", outages=1)
        [claimed] = await ahead.claim("ahead", limit=10, lease_seconds=30.0)
    finally:
        await ahead.close()
    monkeypatch.setattr(time, "time", lambda: real() - DAY)
    behind = await open_outbox(config)
    try:
        pause = await behind.pause()
        recovered = await behind.recover_expired("behind", lease_seconds=30.0)
    finally:
        await behind.close()
    monkeypatch.setattr(time, "time", real)
    now = await server_time(config)

    assert pause is not None
    assert 50.0 < pause.remaining <= 60.0
    assert abs(pause.until - (now + pause.remaining)) < 5.0
    assert claimed.lease_until is not None
    assert 20.0 < claimed.lease_until - now <= 30.0
    assert 0 == recovered


async def test_a_lease_that_ran_out_on_the_servers_clock_is_taken_back_at_once(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """A row whose owner's lease ended by the server's clock is delivered by the next
    flusher that looks (no watching a heartbeat for a lease first); a row under a lease
    still running is left alone.
    """
    config = flusher_config(fake, tmp_path)
    stale, live = (fake.add_contact({"email": f"{n}@example.com"}) for n in ("stale", "live"))
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        gone = await engage.update_contact(stale, {"firstName": "Back"})
        held = await engage.update_contact(live, {"firstName": "Held"})
        await fake.come_up()
    outbox_sql(
        config,
        "UPDATE changes SET state = 'inflight', lease_owner = 'crashed:1',"
        " lease_until = {s}.clock() - 1 WHERE change_id = $1".replace("{s}", config.outbox_schema),
        gone.change_id,
    )
    outbox_sql(
        config,
        "UPDATE changes SET state = 'inflight', lease_owner = 'alive:1',"
        " lease_until = {s}.clock() + 60 WHERE change_id = $1".replace("{s}", config.outbox_schema),
        held.change_id,
    )
    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    rows = {row["change_id"]: row for row in outbox_rows(config)}
    assert (1, 1) == (report.updated, report.pending)
    assert "done" == rows[gone.change_id]["state"]
    assert ("inflight", "alive:1") == (
        rows[held.change_id]["state"],
        rows[held.change_id]["lease_owner"],
    )
    assert "Back" == fake.contact_json(stale)["attributes"]["firstName"]


# --- a fleet: several hosts on one outbox ------------------------------------------------------


def host_env(fake: FakeEngage, config: ea.EngageConfig, **settings: str) -> dict[str, str]:
    """The environment of one host: the same outbox and Engage, its own ENGAGE_* settings."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGAGE_")}
    assert config.outbox_url is not None
    env |= {
        "ENGAGE_BASE_URL": fake.url,
        "ENGAGE_API_KEY": fake.api_key,
        "ENGAGE_USER_AGENT": USER_AGENT,
        "ENGAGE_OUTBOX_URL": config.outbox_url,
        "ENGAGE_OUTBOX_SCHEMA": config.outbox_schema,
        "ENGAGE_XML_DIR": str(config.xml_dir),
        "ENGAGE_INTERACTIVE_DEADLINE": "2",
        "ENGAGE_RETRY_INITIAL_DELAY": "0.01",
        "ENGAGE_RETRY_MAX_DELAY": "0.02",
        "ENGAGE_BACKGROUND_DELAYS": "0.05",
        "ENGAGE_BATCH_POLL_INITIAL": "0.05",
        "ENGAGE_BATCH_POLL_MAX": "0.1",
        "ENGAGE_POLL_INTERVAL": "0.1",
        "ENGAGE_IDENTITY_TTL": "0",
    }
    env |= {f"ENGAGE_{name.upper()}": value for name, value in settings.items()}
    return env


async def run_host(env: Mapping[str, str], skew: float, *argv: str) -> str:
    """Run a command as a host whose wall clock is `skew` seconds off; its stdout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPTS / "skewed.py"),
        repr(skew),
        *argv,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
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
    assert 0 == process.returncode, err.decode()[-3000:]
    return out.decode()


async def host(env: Mapping[str, str], skew: float, action: str, *args: str) -> Any:
    """One pg_host.py action on a host; its JSON answer."""
    out = await run_host(env, skew, str(SCRIPTS / "pg_host.py"), action, *args)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
async def test_two_hosts_with_skewed_clocks_share_one_outbox(
    fake: FakeEngage, config: ea.EngageConfig
) -> None:
    """Two "hosts" share one PostgreSQL outbox and keep every promise together.

    The hosts are processes with their own ENGAGE_* settings, one clock a day ahead, one a
    day behind:

    * refs made on one host resolve on the other, and the other queues updates by them;
    * both write the same contacts; each contact's changes reach Engage in the order they
      were made, across hosts (the last write wins);
    * a pause one host sets lasts its length on the other; a lease one host holds is not
      taken by the other until it ran out on the server's clock;
    * both flush at once: every create made once, every change done, none sent twice.
    """
    ahead = host_env(fake, config, lease_seconds="2", bulk_max_items="3", bulk_threshold="2")
    behind = host_env(fake, config, lease_seconds="3", bulk_threshold="1000", rate_limit="500")
    existing = [fake.add_contact({"email": f"old{i}@example.com"}) for i in range(4)]
    emails = [f"fleet{i}@example.com" for i in range(6)]
    await fake.go_down()

    made = await host(
        ahead,
        DAY,
        "queue",
        json.dumps([{"create": {"email": e, "firstName": "A"}} for e in emails]),
    )
    refs = [delivery["ref"] for delivery in made]
    await host(
        behind,
        -DAY,
        "queue",
        json.dumps(
            [{"update": ref, "changes": {"firstName": "B", "city": "B"}} for ref in refs]
            + [{"update": guid, "changes": {"city": "B1"}} for guid in existing]
        ),
    )
    await host(
        ahead,
        DAY,
        "queue",
        json.dumps(
            [{"update": guid, "changes": {"city": "A2"}} for guid in existing]
            + [{"update": ref, "changes": {"lastName": "A"}} for ref in refs]
        ),
    )

    await host(ahead, DAY, "pause", "60")
    seen = await host(behind, -DAY, "see-pause")
    await host(behind, -DAY, "clear-pause")
    held = await host(behind, -DAY, "claim", "behind:1", "2")
    early = await host(ahead, DAY, "recover", "ahead:1")
    await asyncio.sleep(2.5)  # the lease runs out on the server's clock, which no test moves
    late = await host(ahead, DAY, "recover", "ahead:1")

    await fake.come_up()
    flush = ("-m", "engage_async.cli", "flush", "--once", "--no-progress")
    for _ in range(3):
        await asyncio.gather(run_host(ahead, DAY, *flush), run_host(behind, -DAY, *flush))
        if not await unfinished(config):
            break
    resolved = await host(behind, -DAY, "resolve", *refs)

    assert [True] * 6 == [delivery["queued"] for delivery in made]
    assert 55.0 < seen["remaining"] <= 60.0
    heads = len(emails) + len(existing)  # one claimable change per contact
    assert (heads, 0, heads) == (held["claimed"], early["recovered"], late["recovered"])
    guids = [one_id(fake, email) for email in emails]
    assert dict(zip(refs, guids, strict=True)) == resolved
    assert [("B", "A", "B")] * 6 == [
        tuple(fake.contact_json(g)["attributes"].get(n) for n in ("firstName", "lastName", "city"))
        for g in guids
    ]
    assert ["A2"] * 4 == [fake.contact_json(g)["attributes"]["city"] for g in existing]
    assert {"done"} == {row["state"] for row in outbox_rows(config)}
    creates = collections.Counter(
        item["email"]
        for request in fake.requests_to("POST", "/api/v3/contacts*")
        for item in (request.json() if isinstance(request.json(), list) else [request.json()])
        if isinstance(item, dict) and "email" in item
    )
    assert dict.fromkeys(emails, 1) == dict(creates)


# --- waking on NOTIFY ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_waiting_flusher_wakes_on_a_change_queued_by_another_process(
    fake: FakeEngage, config: ea.EngageConfig
) -> None:
    """A flusher polling only every minute delivers within seconds a change another process
    (another host) queued: it is woken by NOTIFY, not by its poll.
    """
    slow_poll = attrs_evolve(config, poll_interval=60.0)
    guid = fake.add_contact({"email": "woken@example.com"})
    await (await open_outbox(config)).close()
    other = host_env(fake, config, retry_attempts="1")
    async with ea.OutboxFlusher(slow_poll) as flusher:
        flusher.start()
        await asyncio.sleep(0.5)  # the flusher has looked once and now waits
        # Engage fails the other process's one attempt, so it queues; then Engage is fine.
        fake.inject("server_error", method="PATCH", times=1)
        queued = await host(
            other, 0.0, "queue", json.dumps([{"update": guid, "changes": {"city": "Woken"}}])
        )
        started = time.monotonic()
        async with asyncio.timeout(20):
            while fake.contact_json(guid)["attributes"].get("city") != "Woken":
                await asyncio.sleep(0.05)
        waited = time.monotonic() - started

    assert queued[0]["queued"]
    assert waited < 20.0


# --- one rate budget across processes ------------------------------------------------------------


@pytest.mark.slow
async def test_processes_on_one_outbox_share_one_rate_budget(
    fake: FakeEngage, config: ea.EngageConfig
) -> None:
    """Two processes reading as fast as they can, each configured with rate_limit 20, reach
    Engage at no more than 20 requests in any one-second window together.
    """
    guid = fake.add_contact({"email": "budget@example.com"})
    await (await open_outbox(config)).close()
    env = host_env(fake, config, rate_limit="20")
    reads = [{"update": guid, "changes": {"city": f"C{i}"}} for i in range(25)]
    fake.clear_requests()

    await asyncio.gather(
        host(env, 0.0, "queue", json.dumps(reads)), host(env, 0.0, "queue", json.dumps(reads))
    )

    times = sorted(request.time for request in fake.requests)
    busiest = max(sum(1 for other in times if start <= other < start + 1.0) for start in times)
    assert 50 <= len(times)
    assert busiest <= 20


# --- moving a SQLite outbox over ---------------------------------------------------------------


@pytest.fixture(name="sqlite_config")
def sqlite_config_fixture(fake: FakeEngage, tmp_path: Path) -> ea.EngageConfig:
    """A config of the same app with the SQLite outbox it used before."""
    return make_config(fake.url, fake.api_key, tmp_path, outbox_url=None)


async def fill_sqlite(fake: FakeEngage, config: ea.EngageConfig) -> dict[str, Any]:
    """Queue creates, updates by their refs, updates of known contacts; one create delivered
    (its ref in the identity map only), one change dead.
    """
    known = fake.add_contact({"email": "known@example.com"})
    async with ea.EngageSession(config) as engage:
        delivered = await engage.create_contact({"email": "early@example.com"})
        await fake.go_down()
        creates = [
            await engage.create_contact({"email": f"m{i}@example.com", "firstName": "M"})
            for i in range(3)
        ]
        by_ref = [await engage.update_contact(c.ref or "", {"lastName": "Moved"}) for c in creates]
        plain = await engage.update_contact(known, {"city": "Moved"})
        doomed = await engage.update_contact(str(uuid.uuid4()), {"city": "Nowhere"})
        await fake.come_up()
    outbox = await open_outbox(config)
    try:
        change = await outbox.get_change(doomed.change_id or "")
        assert change is not None
        await outbox.bury({change.seq: ("ValidationError", "422 ValidationError: city")})
    finally:
        await outbox.close()
    return {
        "known": known,
        "delivered": delivered,
        "creates": creates,
        # An update by a ref folds into its queued create: one change.
        "open": list(dict.fromkeys(c.change_id for c in [*creates, *by_ref, plain, doomed])),
    }


async def test_migrate_moves_open_changes_refs_and_identities_once(
    fake: FakeEngage, config: ea.EngageConfig, sqlite_config: ea.EngageConfig
) -> None:
    """`outbox migrate --to URL` copies every open change in order, the refs and the
    identity map; a second run copies nothing; the SQLite outbox then refuses sessions and
    flushers; a flusher on PostgreSQL delivers everything, and refs made before the move
    still resolve.
    """
    assert config.outbox_url is not None
    filled = await fill_sqlite(fake, sqlite_config)
    argv = [
        "outbox",
        "--outbox",
        str(sqlite_config.outbox_path),
        "migrate",
        "--to",
        config.outbox_url,
    ]
    argv += ["--to-schema", config.outbox_schema]

    first = await asyncio.to_thread(ea_main, argv)
    second = await asyncio.to_thread(ea_main, argv)
    moved = [row["change_id"] for row in outbox_rows(config)]
    with pytest.raises(ea.OutboxError, match="was moved to"):
        async with ea.EngageSession(sqlite_config):
            pass
    async with ea.OutboxFlusher(flusher_like(config)) as flusher:
        report = await flusher.flush_once()
    async with ea.EngageSession(config) as engage:
        early = await engage.resolve(filled["delivered"].ref or "")
        refs = [await engage.resolve(c.ref or "") for c in filled["creates"]]

    assert (0, 0) == (first, second)
    assert filled["open"] == moved
    assert (0, 0) == (report.pending, report.dead)
    assert ["dead"] == [row["state"] for row in outbox_rows(config) if row["state"] != "done"]
    assert filled["delivered"].contact_id == early
    assert [one_id(fake, f"m{i}@example.com") for i in range(3)] == refs
    assert ["Moved"] * 3 == [fake.contact_json(g)["attributes"]["lastName"] for g in refs]
    assert "Moved" == fake.contact_json(filled["known"])["attributes"]["city"]


def ea_main(argv: list[str]) -> int:
    """The command line, in-process."""
    from engage_async.cli import main

    return main(argv)


def flusher_like(config: ea.EngageConfig) -> ea.EngageConfig:
    """`config` with the flusher's waits shrunk."""
    return attrs_evolve(
        config, background_delays=(0.01,), batch_poll_initial=0.01, batch_poll_max=0.05
    )


async def test_an_interrupted_migration_run_again_moves_each_change_once(
    fake: FakeEngage,
    config: ea.EngageConfig,
    sqlite_config: ea.EngageConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A migration that fails half-way (after the changes, before the rest) keeps nothing;
    one interrupted after PostgreSQL committed but before the SQLite file was marked finds
    everything there. Run again, each change is in PostgreSQL once.
    """
    from engage_async import _migrate

    assert config.outbox_url is not None
    filled = await fill_sqlite(fake, sqlite_config)
    real_insert = _migrate._insert

    async def failing(conn: Any, table: str, *args: Any) -> int:
        if table.endswith(".identities"):
            raise OSError("connection reset")
        return await real_insert(conn, table, *args)

    monkeypatch.setattr(_migrate, "_insert", failing)
    with pytest.raises(ea.OutboxError, match="nothing was kept"):
        await _migrate.migrate_outbox(
            sqlite_config.outbox_path, config.outbox_url, schema=config.outbox_schema
        )
    after_failure = outbox_rows(config)
    monkeypatch.setattr(_migrate, "_insert", real_insert)

    async def unmarked(self: Any, location: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_migrate.SqliteOutbox, "mark_moved", unmarked)
    with pytest.raises(KeyboardInterrupt):
        await _migrate.migrate_outbox(
            sqlite_config.outbox_path, config.outbox_url, schema=config.outbox_schema
        )
    monkeypatch.undo()
    report = await _migrate.migrate_outbox(
        sqlite_config.outbox_path, config.outbox_url, schema=config.outbox_schema
    )

    assert [] == after_failure
    assert (0, len(filled["open"])) == (report.copied["changes"], report.already_there)
    assert filled["open"] == [row["change_id"] for row in outbox_rows(config)]
