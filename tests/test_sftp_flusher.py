"""The flusher hands its XML files to Engage's SFTP server when one is configured."""

from __future__ import annotations

import asyncio
from pathlib import Path

import attrs
import pytest
from helpers import make_config
from servers import Sshd, make_key

import engage_async as ea
from engage_async.testing import FakeEngage


def sftp_config(fake: FakeEngage, tmp_path: Path, sshd: Sshd, remote: Path) -> ea.EngageConfig:
    """XML mode, uploading to the test's sshd."""
    return make_config(
        fake.url,
        fake.api_key,
        tmp_path,
        fallback_mode="xml",
        request_timeout=10.0,
        **sshd.sftp_settings(remote),  # type: ignore[arg-type]
    )


async def queue_signups(
    config: ea.EngageConfig, fake: FakeEngage, count: int, first: int = 0
) -> None:
    """`count` creates (numbered from `first`) queued while Engage is down."""
    async with ea.EngageSession(config) as engage:
        await fake.go_down()
        for number in range(first, first + count):
            assert (await engage.create_contact({"email": f"s{number}@example.com"})).queued
        await fake.come_up()


async def test_flush_once_uploads_the_files_it_wrote(
    fake: FakeEngage, tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """`flush_once` writes the import files and uploads them: they arrive under their final
    names, nothing half-written stays on the server, and the local copies move to sent/.
    """
    config = sftp_config(fake, tmp_path, sshd, sftp_remote)
    await queue_signups(config, fake, 3)

    async with ea.OutboxFlusher(config) as flusher:
        report = await flusher.flush_once()

    remote = sorted(path.name for path in sftp_remote.iterdir())
    sent = sorted(path.name for path in (config.xml_dir / "sent").iterdir())
    assert (3, 1) == (report.exported, report.uploaded)
    assert remote == sent
    assert all(name.endswith("_contacts.xml") for name in remote)
    assert [] == list(config.xml_dir.glob("*_contacts.xml"))


async def test_a_running_flusher_uploads_once_the_server_is_back(
    fake: FakeEngage, tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """With the SFTP server down, a running flusher keeps exporting and the files wait in
    xml_dir; once the server is back they are uploaded, without holding up the API replay.
    """
    config = attrs.evolve(sftp_config(fake, tmp_path, sshd, sftp_remote), background_delays=(0.1,))
    await queue_signups(config, fake, 2)
    sshd.stop()
    try:
        async with ea.OutboxFlusher(config) as flusher:
            flusher.start()
            for _ in range(200):
                if list(config.xml_dir.glob("*_contacts.xml")):
                    break
                await asyncio.sleep(0.05)
            assert list(config.xml_dir.glob("*_contacts.xml"))
            sshd.start()
            # Another export wakes the uploader (as the next written file would).
            await queue_signups(config, fake, 1, first=2)
            for _ in range(400):
                if len(list(sftp_remote.glob("*_contacts.xml"))) == 2:
                    break
                await asyncio.sleep(0.05)
    finally:
        if not sshd.running:
            sshd.start()

    assert 2 == len(list(sftp_remote.glob("*_contacts.xml")))


async def test_a_refused_host_key_stops_flush_once(
    fake: FakeEngage, tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """A host key the known_hosts file does not hold is a configuration problem: `flush_once`
    raises `SftpRefused` (the CLI exits 2), and the files stay in xml_dir.
    """
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[{sshd.host}]:{sshd.port} {make_key(tmp_path / 'impostor')}\n")
    config = make_config(
        fake.url,
        fake.api_key,
        tmp_path,
        fallback_mode="xml",
        request_timeout=10.0,
        **{**sshd.sftp_settings(sftp_remote), "sftp_known_hosts": wrong},  # type: ignore[arg-type]
    )
    await queue_signups(config, fake, 1)

    async with ea.OutboxFlusher(config) as flusher:
        with pytest.raises(ea.SftpRefused):
            await flusher.flush_once()

    assert [] == list(sftp_remote.iterdir())
    assert 1 == len(list(config.xml_dir.glob("*_contacts.xml")))
