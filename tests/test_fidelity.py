"""Engage fidelity: bulk updates under their contacts' type, the tenant configuration fault,
API v2's rules, and avoidTriggeringExport.

FakeEngage applies a bulk request under its `contactType` (the tenant's default when none is
given) and fails an update item whose contact is of another type, as Engage does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config, outbox_rows

import engage_async as ea
from engage_async.cli import main
from engage_async.testing import FakeEngage

BULK = "/api/v3/contacts/bulk"


def flusher_config(fake: FakeEngage, tmp_path: Path, **overrides: Any) -> ea.EngageConfig:
    """A config whose backlogs of two or more changes go through the bulk endpoints."""
    values: dict[str, Any] = {
        "bulk_threshold": 2,
        "background_delays": (30.0,),
        "batch_poll_initial": 0.01,
        "batch_poll_max": 0.05,
    }
    values.update(overrides)
    return make_config(fake.url, fake.api_key, tmp_path, **values)


@contextlib.asynccontextmanager
async def outage(fake: FakeEngage) -> AsyncIterator[None]:
    """Engage down inside the block, up again after it."""
    await fake.go_down()
    try:
        yield
    finally:
        await fake.come_up()


def patches(fake: FakeEngage) -> list[tuple[str | None, list[str]]]:
    """Each bulk PATCH: its contactType and the contact ids it carried."""
    return [
        (r.query.get("contactType"), sorted(item["contactId"] for item in r.json()))
        for r in fake.requests_to("PATCH", BULK)
    ]


# --- bulk updates under their contacts' type ---------------------------------------------------


async def test_bulk_updates_go_under_the_type_the_outbox_learned(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """Queued updates reach Engage in bulk requests of one contact type each, the type being
    the one the session learned: from a lookup scoped to a type, from a contact it read, and
    from a contact-type change it made; an update of a contact whose type is unknown goes
    through the single endpoint. Every update lands (none is refused for its type).
    """
    config = flusher_config(fake, tmp_path)
    looked_up = fake.add_contact({"email": "l@example.com"}, contact_type="Contact")
    read = fake.add_contact({"email": "r@example.com"})
    retyped = fake.add_contact({"email": "t@example.com"})
    unknown = fake.add_contact({"email": "u@example.com"}, contact_type="Contact")
    async with ea.EngageSession(config) as engage:
        assert looked_up == await engage.find_contact_id(
            email="l@example.com", contact_type="Contact"
        )
        await engage.get_contact(read)
        assert not (await engage.update_contact_type(retyped, "Contact")).queued
        async with outage(fake):
            for guid in (looked_up, read, retyped, unknown):
                assert (await engage.update_contact(guid, {"city": "Mora"})).queued
    fake.clear_requests()
    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert (4, 0, 0) == (report.updated, report.dead, report.pending)
    assert sorted([("Contact", sorted([looked_up, retyped])), ("Member", [read])]) == sorted(
        patches(fake)
    )
    assert [f"/api/v3/contacts/{unknown}"] == [r.path for r in fake.requests_to("PATCH", "*-*")]
    assert ["Mora"] * 4 == [
        fake.contacts[g].attributes.get("city") for g in (looked_up, read, retyped, unknown)
    ]


async def test_updates_to_a_queued_create_go_under_its_type(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """Updates queued on the ref of a create follow it in a bulk request of the create's type
    (the create told the outbox the type).
    """
    config = flusher_config(fake, tmp_path)
    async with ea.EngageSession(config) as engage, outage(fake):
        refs = [
            (
                await engage.create_contact({"email": f"c{i}@example.com"}, contact_type="Contact")
            ).ref
            for i in range(2)
        ]
    async with ea.OutboxFlusher(config) as flusher:
        await flusher.flush_once()
    async with ea.EngageSession(config) as engage, outage(fake):
        for ref in refs:
            assert (await engage.update_contact(ref or "", {"city": "Ystad"})).queued
    fake.clear_requests()
    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert (2, 0) == (report.updated, report.dead)
    assert ["Contact"] == [contact_type for contact_type, _ in patches(fake)]


# --- avoidTriggeringExport ------------------------------------------------------------------


async def test_avoid_triggering_export_rides_on_bulk_updates(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """`avoid_triggering_export` in the config sends ``avoidTriggeringExport=true`` on bulk
    PATCH; a call's own choice overrides it, and updates that chose differently are sent in
    separate requests (never merged into one that says one thing for both).
    """
    config = flusher_config(fake, tmp_path, avoid_triggering_export=True)
    guids = [fake.add_contact({"email": f"a{i}@example.com"}) for i in range(3)]
    async with ea.EngageSession(config) as engage:
        for guid in guids:
            await engage.get_contact(guid)
        async with outage(fake):
            await engage.update_contact(guids[0], {"city": "A"})
            await engage.update_contact(guids[1], {"city": "B"})
            await engage.update_contact(guids[2], {"city": "C"}, avoid_triggering_export=False)
            # A second update of the same contact that chose otherwise is not merged into it.
            await engage.update_contact(
                guids[0], {"zipCode": "12345"}, avoid_triggering_export=False
            )
    assert 4 == len(outbox_rows(config.outbox_path))
    fake.clear_requests()
    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    sent = [
        (r.query.get("avoidTriggeringExport"), sorted(i["contactId"] for i in r.json()))
        for r in fake.requests_to("PATCH", BULK)
    ]
    assert (4, 0) == (report.updated, report.dead)
    assert [("true", sorted(guids[:2]))] == [s for s in sent if s[0] == "true"]
    assert {guids[2], guids[0]} == {g for flag, ids in sent if flag is None for g in ids} | {
        r.path.rsplit("/", 1)[-1] for r in fake.requests_to("PATCH", "/api/v3/contacts/*-*")
    }
    assert "12345" == fake.contacts[guids[0]].attributes.get("zipCode")


async def test_avoid_triggering_export_must_be_a_bool(session: ea.EngageSession) -> None:
    """The per-call choice is True, False or None (the config's); nothing else."""
    with pytest.raises(TypeError, match="avoid_triggering_export"):
        await session.update_contact(
            "2e40b702-2767-4abe-ae99-aa510108e22b",
            {"city": "X"},
            avoid_triggering_export="yes",  # type: ignore[arg-type]
        )


# --- InvalidSystemConfiguration ------------------------------------------------------------


INVALID_CONFIGURATION = {"errorCode": "InvalidSystemConfiguration", "message": "Bad setup."}


async def test_a_misconfigured_tenant_pauses_the_flushers_and_is_raised(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """``500 InvalidSystemConfiguration`` is a configuration problem, not an outage to wait
    out: `flush_once` raises `EngageConfigurationError` after recording a long pause whose
    reason names it, and every queued change is kept, none counted against.
    """
    config = flusher_config(fake, tmp_path, background_delays=(1.0, 600.0))
    guid = fake.add_contact({"email": "x@example.com"})
    async with ea.EngageSession(config) as engage, outage(fake):
        assert (await engage.update_contact(guid, {"city": "Lund"})).queued
    fake.inject("status", status=500, body=INVALID_CONFIGURATION)
    async with ea.OutboxFlusher(config) as flusher:
        with pytest.raises(ea.EngageConfigurationError):
            await flusher.flush_once()
    async with ea.OutboxAdmin(config.outbox_path) as admin:
        stats = await admin.stats()

    assert stats.paused_until is not None
    assert "InvalidSystemConfiguration" in (stats.pause_reason or "")
    assert [("pending", 0)] == [
        (r["state"], r["attempts"]) for r in outbox_rows(config.outbox_path)
    ]


async def test_flush_once_exits_2_naming_a_misconfigured_tenant(
    fake: FakeEngage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`engage-async flush --once` exits 2 and says the tenant's configuration is invalid."""
    config = flusher_config(fake, tmp_path)
    guid = fake.add_contact({"email": "x@example.com"})
    async with ea.EngageSession(config) as engage, outage(fake):
        await engage.update_contact(guid, {"city": "Lund"})
    fake.inject("status", status=500, body=INVALID_CONFIGURATION)
    for name, value in {
        "ENGAGE_BASE_URL": fake.url,
        "ENGAGE_API_KEY": fake.api_key,
        "ENGAGE_USER_AGENT": "Tests/1.0",
        "ENGAGE_OUTBOX": str(config.outbox_path),
    }.items():
        monkeypatch.setenv(name, value)

    code = await _run_cli("flush", "--once", "--no-progress")

    assert 2 == code
    assert "InvalidSystemConfiguration" in capsys.readouterr().err


async def _run_cli(*argv: str) -> int:
    """The CLI in a thread of its own (it runs its own event loop)."""
    import asyncio

    return await asyncio.to_thread(main, list(argv))


# --- API v2 ---------------------------------------------------------------------------------


async def test_v2_contact_overview_needs_the_contact_type(fake: FakeEngage, tmp_path: Path) -> None:
    """API v2's contactoverview needs contactType even by contact id: asked without it, the
    session says so before sending anything; with it, the type is sent.
    """
    guid = fake.add_contact({"email": "v2@example.com"})
    config = make_config(fake.url, fake.api_key, tmp_path, api_version=2)
    async with ea.EngageSession(config) as engage:
        with pytest.raises(ValueError, match="contact_type"):
            await engage.contact_overview(contact_id=guid)
        assert [] == fake.requests
        overview = await engage.contact_overview(contact_id=guid, contact_type="Member")

    assert guid == overview.id
    assert "Member" == fake.requests[-1].query["contactType"]


async def test_v2_promote_to_member_sends_its_fields_and_source(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """v2's promoteToMember takes the fields a Member needs as its body and the promotion's
    source as a header, live and when replayed from the outbox alike.
    """
    config = make_config(fake.url, fake.api_key, tmp_path, api_version=2, bulk_threshold=100)
    live = fake.add_contact({"email": "p1@example.com"}, contact_type="Contact")
    later = fake.add_contact({"email": "p2@example.com"}, contact_type="Contact")
    async with ea.EngageSession(config) as engage:
        done = await engage.promote_to_member(live, fields={"firstName": "Ada"}, source="POS")
        async with outage(fake):
            queued = await engage.promote_to_member(later, fields={"firstName": "Bo"}, source="Web")
    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    promotions = fake.requests_to("POST", "/api/v2/contacts/*/promoteToMember")
    assert (False, True, 1) == (done.queued, queued.queued, report.updated)
    assert [({"firstName": "Ada"}, "POS"), ({"firstName": "Bo"}, "Web")] == [
        (r.json(), r.headers.get("source")) for r in promotions
    ]
    assert ["Member", "Member"] == [fake.contacts[g].contact_type for g in (live, later)]


async def test_v3_promote_to_member_takes_no_fields(session: ea.EngageSession) -> None:
    """v3's updateContactType takes neither fields nor a source: asked for them, the session
    says so instead of dropping them.
    """
    with pytest.raises(ValueError, match="fields"):
        await session.promote_to_member(
            "2e40b702-2767-4abe-ae99-aa510108e22b", fields={"firstName": "X"}
        )
