"""The story ``engage-async demo`` tells, end to end, on this machine and with no credentials.

A FakeEngage on loopback stands in for Engage, the outbox lives in a temporary directory.
Engage answers; then goes down while the shop keeps signing customers up and updating them;
the calls return at once, queued; Engage comes back; the flusher drains the outbox through the
bulk API, follows the batches, reconciles the new contacts' GUIDs and releases the changes
that waited on them. The demo checks the end state itself and exits non-zero if it is wrong.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from ._config import EngageConfig
from ._flusher import OutboxFlusher
from ._models import Delivery
from ._redact import mask
from ._session import EngageSession
from .admin import OutboxAdmin
from .testing import FakeEngage

__all__ = ["run_demo"]

_SIGNUPS = (
    {"firstName": "Astrid", "email": "astrid@example.com", "countryCode": "SE"},
    {"firstName": "Bertil", "email": "bertil@example.com", "countryCode": "SE"},
    {"firstName": "Cecilia", "email": "cecilia@example.com", "countryCode": "FI"},
)


class _Printer:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started = time.monotonic()

    def __call__(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def step(self, text: str) -> None:
        self(f"\n[{time.monotonic() - self.started:5.2f} s] {text}")


def _delivery(delivery: Delivery) -> str:
    if delivery.queued:
        return f"queued as {delivery.change_id} (ref {delivery.ref})"
    existed = ", existed" if delivery.existed else ""
    return f"delivered: contact {delivery.contact_id}{existed}"


async def run_demo(*, quiet: bool = False, keep: Path | None = None) -> int:
    """Run the demo; 0 when Engage ends up exactly as the story says, 1 otherwise."""
    say = _Printer(quiet)
    with tempfile.TemporaryDirectory(prefix="engage-demo-") as scratch:
        directory = keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        async with FakeEngage(rate_limit=None) as fake:
            config = EngageConfig(
                base_url=fake.url,
                api_key=fake.api_key,
                user_agent="EngageAsyncDemo/1.0",
                outbox_path=directory / "demo-outbox.sqlite3",
                xml_dir=directory / "xml",
                interactive_deadline=1.0,
                background_delays=(0.2, 0.5),
                batch_poll_initial=0.1,
                breaker_cooldown=60.0,
                bulk_threshold=2,
            )
            say(f"FakeEngage is listening on {fake.url}; the outbox is {config.outbox_path}")
            ok = await _story(config, fake, say)
    say()
    print("demo: OK, Engage ended up exactly as expected" if ok else "demo: FAILED")
    return 0 if ok else 1


async def _story(config: EngageConfig, fake: FakeEngage, say: _Printer) -> bool:
    async with EngageSession(config) as engage:
        say.step("Engage is up. A customer signs up at the till.")
        regular = await engage.create_contact(
            {"firstName": "Dagny", "email": "dagny@example.com"}, source="POS"
        )
        say(f"  create_contact -> {_delivery(regular)}")

        say.step("Engage goes down. The shop keeps working.")
        await fake.go_down()
        started = time.monotonic()
        signups = [await engage.create_contact(dict(person)) for person in _SIGNUPS]
        for person, delivery in zip(_SIGNUPS, signups, strict=True):
            say(f"  create_contact({mask(person['email'])}) -> {_delivery(delivery)}")
        follow_up = await engage.update_contact(signups[0].ref or "", {"lastName": "Andersson"})
        say(f"  update_contact(ref of the first signup) -> {_delivery(follow_up)}")
        promotion = await engage.promote_to_member(signups[1].ref or "")
        say(f"  promote_to_member(ref of the second) -> {_delivery(promotion)}")
        moved = await engage.update_contact(regular.contact_id or "", {"city": "Malmö"})
        say(f"  update_contact(GUID of the till customer) -> {_delivery(moved)}")
        elapsed = time.monotonic() - started
        say(f"  {len(signups) + 3} calls answered in {elapsed:.2f} s, none failed")

        async with OutboxAdmin(config.outbox_path) as admin:
            stats = await admin.stats()
        waiting = {state: n for state, n in stats.by_state.items() if n}
        say(f"  the outbox holds: {waiting}")

        say.step("Engage comes back. The flusher drains the outbox.")
        await fake.come_up()
        await asyncio.sleep(0.3)  # let the flushers' pause after the outage run out
        async with OutboxFlusher(config) as flusher:
            report = await flusher.flush_once()
        say(
            f"  sent {report.sent}, created {report.created}, updated {report.updated}, "
            f"reconciled {report.reconciled}, dead {report.dead}, pending {report.pending}"
        )
        for request in fake.requests:
            if request.method != "GET" or "bulk" in request.path:
                say(f"    Engage saw {request.method} {request.path}")

        say.step("Every ref now resolves to its GUID.")
        guids = [await engage.resolve(delivery.ref or "") for delivery in signups]
        for person, guid in zip(_SIGNUPS, guids, strict=True):
            say(f"  {mask(person['email'])} -> {guid}")

    return _check(fake, regular, guids, report.pending)


def _check(fake: FakeEngage, regular: Delivery, guids: list[str | None], pending: int) -> bool:
    """Is Engage's state exactly what the story did?"""
    if pending or None in guids or regular.contact_id is None:
        return False
    contacts = [fake.contact_json(guid) for guid in guids if guid is not None]
    emails = [c["attributes"]["email"] for c in contacts]
    first, second, _ = contacts
    expected_emails = [person["email"] for person in _SIGNUPS]
    return (
        emails == expected_emails
        and len(fake.contacts) == len(_SIGNUPS) + 1
        and first["attributes"]["lastName"] == "Andersson"
        and second["meta"]["contactType"] == "Member"
        and fake.contact_json(regular.contact_id)["attributes"]["city"] == "Malmö"
    )
