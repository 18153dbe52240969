"""What replaying costs Engage, in requests per change.

A create is looked up before it is sent again only when its earlier attempt may have reached
Engage: it was recorded as about to be sent and its flusher vanished, or its request got no
verdict. Creates that provably never left are sent without a lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config, outbox_rows

import engage_async as ea
from engage_async import _sender
from engage_async._outbox import SqliteOutbox
from engage_async.testing import FakeEngage

CONTACTS = "/api/v3/contacts"
LOOKUP = "/api/v3/contacts/id"
BULK = "/api/v3/contacts/bulk"


def config_for(fake: FakeEngage, tmp_path: Path, **overrides: Any) -> ea.EngageConfig:
    """Flusher waits in milliseconds, bulk from two changes on."""
    values: dict[str, Any] = {
        "bulk_threshold": 2,
        "background_delays": (60.0,),
        "batch_poll_initial": 0.01,
        "batch_poll_max": 0.05,
    }
    values.update(overrides)
    return make_config(fake.url, fake.api_key, tmp_path, **values)


async def queue_creates(
    config: ea.EngageConfig, fake: FakeEngage, count: int, **options: Any
) -> list[ea.Delivery]:
    """`count` creates queued while Engage refuses connections (provably never sent)."""
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        try:
            return [
                await engage.create_contact({"email": f"c{i}@example.com"}, **options)
                for i in range(count)
            ]
        finally:
            await fake.come_up()


async def test_creates_with_options_cost_one_request_each(fake: FakeEngage, tmp_path: Path) -> None:
    """Creates that go singly (they carry a store) and never reached Engage cost one POST each
    and no lookup.
    """
    config = config_for(fake, tmp_path)
    await queue_creates(config, fake, 5, store_external_id="600")
    fake.clear_requests()

    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert (5, 0) == (report.created, report.pending)
    assert (5, 0) == (
        len(fake.requests_to("POST", CONTACTS)),
        len(fake.requests_to("GET", LOOKUP)),
    )


async def test_plain_creates_in_bulk_cost_one_lookup_each_for_their_guid(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """Plain creates go in one bulk request, with no lookup before; after the batch, one
    lookup each finds the GUID (the default status names none).
    """
    config = config_for(fake, tmp_path)
    await queue_creates(config, fake, 6)
    fake.clear_requests()

    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert (6, 6, 0) == (report.created, report.reconciled, report.pending)
    assert (1, 6) == (len(fake.requests_to("POST", BULK)), len(fake.requests_to("GET", LOOKUP)))


async def test_no_lookup_when_the_batch_status_tells_the_guids(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """When the batch status names each created contact's id, the creates are done with their
    GUIDs and no lookup is made at all; the refs resolve.
    """
    fake.shapes["batch_status"] = "items"
    config = config_for(fake, tmp_path)
    deliveries = await queue_creates(config, fake, 4)
    fake.clear_requests()

    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    assert (4, 0, 0) == (report.created, report.reconciled, report.pending)
    assert [] == fake.requests_to("GET", LOOKUP)
    async with ea.EngageSession(config) as engage:
        for number, delivery in enumerate(deliveries):
            assert fake.find("email", f"c{number}@example.com") == [
                await engage.resolve(delivery.ref or "")
            ]


async def test_a_create_whose_flusher_vanished_before_sending_is_not_looked_up(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """A create a dead flusher claimed but never recorded as about to be sent provably never
    left: the next flusher sends it without a lookup.
    """
    config = config_for(fake, tmp_path, bulk_threshold=100)
    await queue_creates(config, fake, 1)
    outbox = await SqliteOutbox.open(config.outbox_path)
    try:
        await outbox.claim("vanished:1", limit=10, lease_seconds=30.0)
    finally:
        await outbox.close()
    fake.clear_requests()

    async with ea.OutboxFlusher(config) as flusher:
        await flusher.flush_once()  # sees the dead flusher; its row is not claimable yet
        await outbox_owner_gone(config, "vanished:1")
        report = await flusher.flush_once()

    assert (1, 0) == (report.created, report.pending)
    assert [] == fake.requests_to("GET", LOOKUP)


async def outbox_owner_gone(config: ea.EngageConfig, owner: str) -> None:
    """Let a flusher seen holding rows be judged gone (as after a lease of silence)."""
    outbox = await SqliteOutbox.open(config.outbox_path)
    try:
        await outbox._write(
            lambda conn: conn.execute(
                "UPDATE changes SET state = 'pending', lease_owner = NULL, "
                "lookup_first = max(lookup_first, sending), sending = 0 WHERE lease_owner = ?",
                (owner,),
            )
        )
    finally:
        await outbox.close()


async def test_a_create_abandoned_on_shutdown_is_looked_up_one_never_sent_is_not(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """A flusher stopping mid-step abandons the request in flight after its grace: that create
    may exist and is looked up before it goes again; the creates after it, never sent, are
    not.
    """
    config = config_for(fake, tmp_path, bulk_threshold=100, shutdown_timeout=0.2)
    await queue_creates(config, fake, 3, store_external_id="600")
    hang = fake.inject("hang", method="POST", path=CONTACTS, times=1)
    async with ea.OutboxFlusher(config) as flusher:
        flushing = asyncio.create_task(flusher.flush_once())
        for _ in range(200):
            if hang.hits:
                break
            await asyncio.sleep(0.01)
        flusher.stop()
        await asyncio.wait_for(flushing, 5)
    fake.remove(hang)

    rows = outbox_rows(config.outbox_path)
    assert [("pending", 1), ("pending", 0), ("pending", 0)] == [
        (row["state"], row["lookup_first"]) for row in rows
    ]


async def _stop_once_held(flusher: ea.OutboxFlusher, fault: Any) -> None:
    """Run flush_once until `fault` holds one of its requests, then stop the flusher."""
    flushing = asyncio.create_task(flusher.flush_once())
    for _ in range(500):
        if fault.hits or flushing.done():
            break
        await asyncio.sleep(0.01)
    assert fault.hits, "the flusher never reached the held request"
    flusher.stop()
    await asyncio.wait_for(flushing, 5)


async def test_a_flusher_stopped_mid_reconciliation_leaves_no_create_leased(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """Stopped while a GUID lookup hangs, a flusher gives back every create it claimed for
    lookups: the next `flush_once` (another process's, say) reconciles them at once instead
    of waiting for the stopped flusher's lease to be judged gone.
    """
    config = config_for(fake, tmp_path, shutdown_timeout=0.2)
    await queue_creates(config, fake, 4)
    hang = fake.inject("hang", method="GET", path=LOOKUP, times=1)
    async with ea.OutboxFlusher(config) as flusher:
        await _stop_once_held(flusher, hang)
    fake.remove(hang)

    rows = outbox_rows(config.outbox_path)
    assert ["waiting_guid"] * 4 == [row["state"] for row in rows]
    assert [None] * 4 == [row["lease_owner"] for row in rows]
    async with ea.OutboxFlusher(config) as other:
        report = await other.flush_once()
    assert (4, 0) == (report.reconciled, report.pending)


async def test_a_flusher_stopped_mid_poll_leaves_no_batch_leased(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """Stopped while a batch status poll hangs, a flusher gives the batch back: the next
    `flush_once` polls and settles it at once.
    """
    config = config_for(fake, tmp_path, shutdown_timeout=0.2)
    await queue_creates(config, fake, 4)
    hang = fake.inject("hang", method="GET", path=f"{BULK}/status", times=1)
    async with ea.OutboxFlusher(config) as flusher:
        await _stop_once_held(flusher, hang)
    fake.remove(hang)

    with contextlib.closing(sqlite3.connect(config.outbox_path)) as conn:
        batches = conn.execute("SELECT state, lease_owner FROM batches").fetchall()
    assert [("submitted", None)] == batches
    async with ea.OutboxFlusher(config) as other:
        report = await other.flush_once()
    assert (4, 0) == (report.created, report.pending)


async def test_bulk_bodies_over_the_byte_limit_are_split_and_all_applied(
    fake: FakeEngage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of updates whose JSON is over the byte limit goes as several bulk requests,
    each within it, and every update lands once.

    The limit is lowered here: the real 16 MiB takes 4000 near-maximal payloads.
    """
    monkeypatch.setattr(_sender, "MAX_BULK_BYTES", 2_000)
    config = config_for(fake, tmp_path, assume_default_contact_type=True)
    guids = [fake.add_contact({"email": f"big{i}@example.com"}) for i in range(30)]
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        for guid in guids:
            assert (await engage.update_contact(guid, {"city": "x" * 150})).queued
        await fake.come_up()
    fake.clear_requests()
    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    patches = fake.requests_to("PATCH", BULK)
    assert (30, 0) == (report.updated, report.pending)
    assert len(patches) > 1
    assert all(len(request.body) <= 2_000 for request in patches)
    assert sorted(guids) == sorted(item["contactId"] for r in patches for item in r.json())
    assert ["x" * 150] * 30 == [fake.contacts[g].attributes.get("city") for g in guids]
