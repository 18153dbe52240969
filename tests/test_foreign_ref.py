"""A ref from another outbox: `resolve` and `update_contact` agree that it is unknown here.

A ref names a create in the outbox of the session that made it; another outbox has never seen
it, so it can neither answer its GUID nor queue a change behind it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_config

import engage_async as ea
from engage_async._keys import new_ref
from engage_async.testing import FakeEngage

UNKNOWN = "no create with this ref is known to this outbox"


@pytest.fixture(name="foreign_ref")
async def foreign_ref_fixture(fake: FakeEngage, tmp_path: Path) -> str:
    """The ref of a create delivered through another outbox."""
    config = make_config(fake.url, fake.api_key, tmp_path, outbox_path=tmp_path / "other.sqlite3")
    async with ea.EngageSession(config) as other:
        created = await other.create_contact({"email": "ann@example.com"})
    assert created.ref is not None
    assert not created.queued
    return created.ref


async def test_resolve_refuses_a_ref_of_another_outbox(
    session: ea.EngageSession, foreign_ref: str
) -> None:
    """`resolve` of a ref this outbox never saw is a ValueError naming `ref`, not None (None
    means "known, GUID not known yet").
    """
    with pytest.raises(ValueError, match=f"^ref: {UNKNOWN}"):
        await session.resolve(foreign_ref)


async def test_update_contact_refuses_a_ref_of_another_outbox(
    session: ea.EngageSession, foreign_ref: str, fake: FakeEngage
) -> None:
    """`update_contact` refuses the same ref with the same reason, naming its argument, and
    sends nothing.
    """
    fake.clear_requests()

    with pytest.raises(ValueError, match=f"^contact_id_or_ref: {UNKNOWN}"):
        await session.update_contact(foreign_ref, {"firstName": "Ann"})

    assert [] == fake.requests


async def test_a_ref_never_made_is_refused_by_both(session: ea.EngageSession) -> None:
    """A well-formed ref no create ever had is refused by both calls alike."""
    ref = new_ref()

    with pytest.raises(ValueError, match=UNKNOWN):
        await session.resolve(ref)
    with pytest.raises(ValueError, match=UNKNOWN):
        await session.update_contact(ref, {"firstName": "Ann"})


async def test_resolve_of_a_known_ref_without_a_guid_is_still_none(
    fake: FakeEngage, session: ea.EngageSession
) -> None:
    """A ref whose create is queued here is known: resolve answers None until the GUID is."""
    await fake.go_down()
    created = await session.create_contact({"email": "bo@example.com"})
    assert created.ref is not None

    assert await session.resolve(created.ref) is None
