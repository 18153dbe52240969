"""`XmlUploader` against a real OpenSSH sshd: complete files only, each once, host key checked."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from helpers import make_config
from servers import Sshd, make_key

import engage_async as ea
from engage_async import _sftp
from engage_async._sftp import SftpRefused, SftpUnavailable, UploadReport, XmlUploader

STAMP = "20261201120000"


def _config(tmp_path: Path, sshd: Sshd, remote: Path, **overrides: Any) -> ea.EngageConfig:
    values: dict[str, Any] = {**sshd.sftp_settings(remote), "request_timeout": 10.0}
    values.update(overrides)
    return make_config("http://127.0.0.1:9", "test-api-key", tmp_path, **values)


def _xml_file(config: ea.EngageConfig, seq: int, size: int = 2000, fill: bytes = b"x") -> Path:
    """An import file as the flusher names it; the uploader never looks inside."""
    config.xml_dir.mkdir(exist_ok=True)
    path = config.xml_dir / f"{STAMP}_{seq}_contacts.xml"
    head = f'<?xml version="1.0" encoding="utf-8"?>\n<!-- file {seq} -->\n'.encode()
    path.write_bytes(head + fill * (size - len(head)))
    path.chmod(0o600)
    return path


class Sleeps:
    """An injected sleep that records each wait and runs `then` on it instead of waiting."""

    def __init__(self, then: Any = None) -> None:
        self.delays: list[float] = []
        self.then = then

    async def __call__(self, delay: float) -> None:
        """Record `delay`; do `then` instead of waiting."""
        self.delays.append(delay)
        if self.then is not None:
            self.then()


def _listing(remote: Path) -> list[str]:
    return sorted(p.name for p in remote.iterdir())


def _part_name(path: Path) -> str:
    return f"{path.name}.{_sftp._host_tag()}.part"


# --- uploads --------------------------------------------------------------------------------------


async def test_upload_arrives_complete_under_final_name(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """Each file lands complete under its own name, no .part stays, the local one goes to sent/."""
    config = _config(tmp_path, sshd, sftp_remote)
    files = [_xml_file(config, seq, size=300_000 + seq) for seq in (2, 1)]
    contents = {path.name: path.read_bytes() for path in files}

    report = await XmlUploader(config, sleep=Sleeps()).upload_pending()

    oldest_first = (f"{STAMP}_1_contacts.xml", f"{STAMP}_2_contacts.xml")
    assert UploadReport(uploaded=oldest_first, already_there=0, pending=0) == report
    assert sorted(contents) == _listing(sftp_remote)
    assert contents == {name: (sftp_remote / name).read_bytes() for name in contents}
    assert [] == sorted(config.xml_dir.glob("*_contacts.xml"))
    assert contents == {p.name: p.read_bytes() for p in (config.xml_dir / "sent").iterdir()}


async def test_sent_files_keep_their_mode_in_a_private_directory(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """The move to sent/ is a rename: the file keeps 0600; sent/ itself is 0700."""
    config = _config(tmp_path, sshd, sftp_remote)
    path = _xml_file(config, 1)

    await XmlUploader(config, sleep=Sleeps()).upload_pending()

    sent = config.xml_dir / "sent"
    modes = (sent.stat().st_mode & 0o777, (sent / path.name).stat().st_mode & 0o777)
    assert (0o700, 0o600) == modes


async def test_nothing_to_upload_does_not_connect(tmp_path: Path, sshd: Sshd) -> None:
    """With no files waiting, no connection is made (the server may as well be down)."""
    remote = sshd.new_directory()
    config = _config(tmp_path, sshd, remote, sftp_port=1)  # nothing listens on port 1

    report = await XmlUploader(config, sleep=Sleeps()).upload_pending()

    assert UploadReport() == report


def test_pending_files_are_oldest_first(tmp_path: Path) -> None:
    """Files go by timestamp, then by sequence as a number; other files are not touched."""
    names = [
        "20261201120001_1_contacts.xml",
        "20261201120000_10_contacts.xml",
        "20261201120000_9_contacts.xml",
        "20261201120000_1_contacts.xml.host.part",
        ".20261201120000_1.tmp",
        "notes.txt",
    ]
    for name in names:
        (tmp_path / name).write_text("x")

    pending = _sftp.pending_files(tmp_path)

    assert [
        "20261201120000_9_contacts.xml",
        "20261201120000_10_contacts.xml",
        "20261201120001_1_contacts.xml",
    ] == [p.name for p in pending]


# --- retries ------------------------------------------------------------------------------------


async def test_server_down_then_up_is_retried_with_backoff(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """A refused connection waits the background schedule's first delay, then succeeds."""
    config = _config(tmp_path, sshd, sftp_remote)
    path = _xml_file(config, 1)
    data = path.read_bytes()
    sleeps = Sleeps(then=sshd.start)
    sshd.stop()

    report = await XmlUploader(config, sleep=sleeps).upload_pending()

    assert 1 == len(sleeps.delays)
    assert 10.0 <= sleeps.delays[0] <= 12.0  # background_delays[0] plus at most 20% jitter
    assert (path.name,) == report.uploaded
    assert data == (sftp_remote / path.name).read_bytes()


async def test_server_down_for_good_gives_up_and_keeps_the_file(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """After `attempts` refused connections the uploader raises; the file stays in xml_dir."""
    config = _config(tmp_path, sshd, sftp_remote)
    path = _xml_file(config, 1)
    sleeps = Sleeps()
    sshd.stop()
    try:
        with pytest.raises(SftpUnavailable, match="after 3 attempt"):
            await XmlUploader(config, attempts=3, sleep=sleeps).upload_pending()
    finally:
        sshd.start()

    # Two waits between three attempts, along background_delays with up to 20% jitter.
    assert 2 == len(sleeps.delays)
    assert 10.0 <= sleeps.delays[0] <= 12.0
    assert 30.0 <= sleeps.delays[1] <= 36.0
    assert path.exists()
    assert [] == _listing(sftp_remote)


async def test_server_killed_mid_upload_is_retried_and_the_file_arrives_whole(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """sshd dies with half a file written: the retry sends it whole, and only then renames it."""
    config = _config(tmp_path, sshd, sftp_remote)
    path = _xml_file(config, 1, size=16 * 1024 * 1024)
    part = sftp_remote / _part_name(path)
    seen_partial: list[int] = []

    async def kill_when_partial() -> None:
        while True:
            size = part.stat().st_size if part.exists() else 0
            if 0 < size < path.stat().st_size:
                seen_partial.append(size)
                sshd.stop()
                return
            await asyncio.sleep(0.001)

    killer = asyncio.create_task(kill_when_partial())
    try:
        report = await XmlUploader(config, sleep=Sleeps(then=sshd.start)).upload_pending()
    finally:
        killer.cancel()
        sshd.start()

    assert 1 == len(seen_partial), "the server was not killed mid-upload"
    assert (path.name,) == report.uploaded
    assert [path.name] == _listing(sftp_remote)
    assert (config.xml_dir / "sent" / path.name).read_bytes() == (
        sftp_remote / path.name
    ).read_bytes()


async def test_server_that_stops_answering_mid_upload_is_given_up_on_and_retried(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """A server frozen mid-file does not hang the uploader: after `request_timeout` of silence
    the connection counts as lost, and the retry sends the file whole.
    """
    config = _config(tmp_path, sshd, sftp_remote, request_timeout=1.0)
    path = _xml_file(config, 1, size=16 * 1024 * 1024)
    part = sftp_remote / _part_name(path)
    frozen: list[int] = []

    async def freeze_when_partial() -> None:
        while True:
            size = part.stat().st_size if part.exists() else 0
            if 0 < size < path.stat().st_size:
                frozen.append(size)
                sshd.freeze()
                return
            await asyncio.sleep(0.001)

    freezer = asyncio.create_task(freeze_when_partial())
    try:
        report = await XmlUploader(config, sleep=Sleeps(then=sshd.restart)).upload_pending()
    finally:
        freezer.cancel()
        sshd.restart()

    assert 1 == len(frozen), "the server was not frozen mid-upload"
    assert (path.name,) == report.uploaded
    assert [path.name] == _listing(sftp_remote)
    assert (config.xml_dir / "sent" / path.name).read_bytes() == (
        sftp_remote / path.name
    ).read_bytes()


# --- crashes of the uploader ----------------------------------------------------------------------


async def test_partial_part_from_a_killed_upload_is_replaced(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """A .part left by a killed uploader is written again from byte 0, then renamed."""
    config = _config(tmp_path, sshd, sftp_remote)
    path = _xml_file(config, 1, size=500_000)
    data = path.read_bytes()
    # What a killed upload leaves: the first part of the file, and garbage where writes at
    # later offsets landed first.
    (sftp_remote / _part_name(path)).write_bytes(data[:100_000] + b"\0" * 600_000)

    report = await XmlUploader(config, sleep=Sleeps()).upload_pending()

    assert UploadReport(uploaded=(path.name,), already_there=0, pending=0) == report
    assert [path.name] == _listing(sftp_remote)
    assert data == (sftp_remote / path.name).read_bytes()


_UPLOAD_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import engage_async as ea
    from engage_async._sftp import XmlUploader

    settings = dict(arg.split("=", 1) for arg in sys.argv[1:])
    settings["sftp_port"] = int(settings["sftp_port"])
    config = ea.EngageConfig(
        base_url="http://127.0.0.1:9", api_key="k", user_agent="Tests/1", **settings
    )
    asyncio.run(XmlUploader(config).upload_pending())
    """
)


@pytest.mark.slow
async def test_uploader_killed_mid_upload_then_restarted_uploads_once(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """SIGKILL of an uploading process part-way: a new uploader replaces the .part, and the
    file reaches its final name once and whole.
    """
    config = _config(tmp_path, sshd, sftp_remote)
    path = _xml_file(config, 1, size=24 * 1024 * 1024, fill=b"y")
    part = sftp_remote / _part_name(path)
    settings = {**sshd.sftp_settings(sftp_remote), "xml_dir": config.xml_dir}
    process = subprocess.Popen(
        [sys.executable, "-c", _UPLOAD_SCRIPT, *(f"{k}={v}" for k, v in settings.items())]
    )
    killed_at = 0
    try:
        while process.poll() is None:
            size = part.stat().st_size if part.exists() else 0
            if 0 < size < path.stat().st_size:
                os.kill(process.pid, signal.SIGKILL)
                killed_at = size
                break
            await asyncio.sleep(0.001)
    finally:
        process.kill()
        process.wait()

    assert 0 < killed_at, "the uploader finished before it could be killed"
    assert path.exists()  # the dead uploader had not renamed it
    assert [part.name] == _listing(sftp_remote)

    report = await XmlUploader(config, sleep=Sleeps()).upload_pending()

    assert (path.name,) == report.uploaded
    assert [path.name] == _listing(sftp_remote)
    assert (config.xml_dir / "sent" / path.name).read_bytes() == (
        sftp_remote / path.name
    ).read_bytes()


async def test_file_renamed_before_a_crash_counts_as_sent_once(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """Killed between the rename and the local move: the next run finds the same bytes under
    the final name, keeps them, sends nothing again and moves the local file to sent/.
    """
    config = _config(tmp_path, sshd, sftp_remote)
    path = _xml_file(config, 1, size=400_000)
    data = path.read_bytes()
    (sftp_remote / path.name).write_bytes(data)
    before = (sftp_remote / path.name).stat()

    report = await XmlUploader(config, sleep=Sleeps()).upload_pending()

    after = (sftp_remote / path.name).stat()
    assert UploadReport(uploaded=(path.name,), already_there=1, pending=0) == report
    assert [path.name] == _listing(sftp_remote)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert data == (config.xml_dir / "sent" / path.name).read_bytes()


async def test_a_different_file_under_the_name_is_never_replaced(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """Another writer's file with our name (same size, other bytes) stays as it is; ours is
    renamed to the next free sequence number and sent under that.
    """
    config = _config(tmp_path, sshd, sftp_remote)
    path = _xml_file(config, 1, size=10_000, fill=b"a")
    theirs = b"b" * 10_000
    (sftp_remote / path.name).write_bytes(theirs)
    ours = path.read_bytes()

    report = await XmlUploader(config, sleep=Sleeps()).upload_pending()

    renamed = f"{STAMP}_2_contacts.xml"
    assert UploadReport(uploaded=(renamed,), already_there=0, pending=0) == report
    assert [path.name, renamed] == _listing(sftp_remote)
    assert (theirs, ours) == (
        (sftp_remote / path.name).read_bytes(),
        (sftp_remote / renamed).read_bytes(),
    )
    assert [renamed] == [p.name for p in (config.xml_dir / "sent").iterdir()]


async def test_two_uploaders_on_one_directory_send_each_file_once(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """Two uploaders started together on one xml_dir: one sends, the other steps aside."""
    config = _config(tmp_path, sshd, sftp_remote)
    names = [_xml_file(config, seq, size=200_000).name for seq in (1, 2, 3)]

    first, second = await asyncio.gather(
        XmlUploader(config, sleep=Sleeps()).upload_pending(),
        XmlUploader(config, sleep=Sleeps()).upload_pending(),
    )

    assert sorted(names) == sorted(first.uploaded + second.uploaded)
    assert names == _listing(sftp_remote)


# --- refusals -------------------------------------------------------------------------------------


async def test_wrong_host_key_is_refused_before_any_byte(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """A known_hosts entry with another key: SftpRefused at once, no retry, nothing written."""
    other = make_key(tmp_path / "impostor")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {other}\n")
    config = _config(tmp_path, sshd, sftp_remote, sftp_known_hosts=known_hosts)
    path = _xml_file(config, 1)
    sleeps = Sleeps()

    with pytest.raises(SftpRefused, match="host key") as caught:
        await XmlUploader(config, sleep=sleeps).upload_pending()

    assert [] == sleeps.delays
    assert [] == _listing(sftp_remote)
    assert path.exists()
    assert str(known_hosts) in str(caught.value)


async def test_host_missing_from_known_hosts_is_refused(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """An empty known_hosts does not mean "accept any": the server is refused."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    config = _config(tmp_path, sshd, sftp_remote, sftp_known_hosts=known_hosts)
    path = _xml_file(config, 1)

    with pytest.raises(SftpRefused, match="host key"):
        await XmlUploader(config, sleep=Sleeps()).upload_pending()

    assert ([], True) == (_listing(sftp_remote), path.exists())


async def test_unauthorised_client_key_is_refused_without_retry(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """A key the server does not know: SftpRefused naming sftp_user and sftp_key_path."""
    make_key(tmp_path / "stranger")
    config = _config(tmp_path, sshd, sftp_remote, sftp_key_path=tmp_path / "stranger")
    _xml_file(config, 1)
    sleeps = Sleeps()

    with pytest.raises(SftpRefused, match="refused the login of sftp_user"):
        await XmlUploader(config, sleep=sleeps).upload_pending()

    assert [] == sleeps.delays


async def test_missing_key_file_is_refused(tmp_path: Path, sshd: Sshd, sftp_remote: Path) -> None:
    """A key path that does not exist is a configuration error named after the field."""
    config = _config(tmp_path, sshd, sftp_remote, sftp_key_path=tmp_path / "nowhere")
    _xml_file(config, 1)

    with pytest.raises(SftpRefused, match="sftp_key_path"):
        await XmlUploader(config, sleep=Sleeps()).upload_pending()


async def test_missing_remote_directory_is_refused(
    tmp_path: Path, sshd: Sshd, sftp_remote: Path
) -> None:
    """An sftp_dir the server does not have is refused at once and named."""
    config = _config(tmp_path, sshd, sftp_remote / "absent")
    path = _xml_file(config, 1)
    sleeps = Sleeps()

    with pytest.raises(SftpRefused, match="sftp_dir"):
        await XmlUploader(config, sleep=sleeps).upload_pending()

    assert ([], True) == (sleeps.delays, path.exists())


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ConnectionRefusedError(111, "refused"), "retry"),
        (TimeoutError(), "retry"),
        (asyncssh.ConnectionLost("Server not responding to keepalive"), "retry"),
        (asyncssh.SFTPConnectionLost("lost"), "retry"),
        (asyncssh.SFTPFailure("disk trouble"), "retry"),
        (asyncssh.HostKeyNotVerifiable("no match"), "refused"),
        (asyncssh.PermissionDenied("no"), "refused"),
        (asyncssh.SFTPPermissionDenied("no"), "refused"),
        (asyncssh.SFTPOpUnsupported("rename"), "refused"),
        (ValueError("a bug"), "raised as is"),
    ],
)
def test_which_failures_are_worth_waiting_for(
    tmp_path: Path, sshd: Sshd, error: Exception, outcome: str
) -> None:
    """Transport trouble is retried; a refusal is SftpRefused; anything else is not hidden."""
    uploader = XmlUploader(_config(tmp_path, sshd, tmp_path))

    try:
        uploader._refuse_if_fatal(error)
        actual = "retry"
    except SftpRefused:
        actual = "refused"
    except ValueError as exc:
        actual = "raised as is" if exc is error else "other"

    assert outcome == actual


# --- construction and configuration -------------------------------------------------------------


def test_uploader_needs_an_sftp_host(tmp_path: Path) -> None:
    """An uploader on a config without sftp_host is refused, naming the field."""
    config = make_config("http://127.0.0.1:9", "test-api-key", tmp_path)

    with pytest.raises(ValueError, match="sftp_host"):
        XmlUploader(config)


def test_missing_asyncssh_names_the_extra(
    tmp_path: Path, sshd: Sshd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without asyncssh, building an uploader says which extra to install."""
    config = _config(tmp_path, sshd, tmp_path)
    monkeypatch.setitem(sys.modules, "asyncssh", None)

    with pytest.raises(ImportError, match=r"engage-async\[sftp\]"):
        XmlUploader(config)


REQUIRED: dict[str, Any] = {
    "base_url": "https://tenant.voyado.com",
    "api_key": "k",
    "user_agent": "AcmePOS/1.5",
}
SFTP: dict[str, Any] = {
    "sftp_host": "ftp.voyado.com",
    "sftp_user": "acme",
    "sftp_key_path": "/etc/engage/id_ed25519",
    "sftp_known_hosts": "/etc/engage/known_hosts",
}


def test_sftp_is_off_by_default_and_defaults_to_port_22_and_the_login_directory() -> None:
    """No sftp_host, no upload; once set, port 22 and "." (the login directory) by default."""
    off = ea.EngageConfig(**REQUIRED)
    on = ea.EngageConfig(**REQUIRED, **SFTP)

    assert (False, True, 22, ".") == (off.sftp_enabled, on.sftp_enabled, on.sftp_port, on.sftp_dir)
    assert Path("/etc/engage/id_ed25519") == on.sftp_key_path


@pytest.mark.parametrize("missing", ["sftp_user", "sftp_key_path", "sftp_known_hosts"])
def test_sftp_settings_are_all_or_nothing(missing: str) -> None:
    """With sftp_host set, user, key path and known_hosts are required, each by name."""
    values = {k: v for k, v in SFTP.items() if k != missing}

    with pytest.raises(ValueError, match=f"^{missing}: must be set when sftp_host is set"):
        ea.EngageConfig(**REQUIRED, **values)


@pytest.mark.parametrize(
    ("field", "value"),
    [("sftp_user", "acme"), ("sftp_port", 2222), ("sftp_dir", "/in"), ("sftp_key_path", "/k")],
)
def test_sftp_settings_without_a_host_are_refused(field: str, value: Any) -> None:
    """Any SFTP setting without sftp_host is a mistake, not a silent no-upload."""
    with pytest.raises(ValueError, match=f"^sftp_host: must be set when {field} is set"):
        ea.EngageConfig(**REQUIRED, **{field: value})


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("sftp_port", 0, "from 1 to 65535"),
        ("sftp_port", 65536, "from 1 to 65535"),
        ("sftp_host", "", "must not be empty"),
        ("sftp_host", "ftp voyado", "whitespace"),
        ("sftp_user", "ac me", "whitespace"),
        ("sftp_dir", "", "must not be empty"),
        ("sftp_key_path", " ", "must not be empty"),
    ],
)
def test_bad_sftp_values_name_the_field(field: str, value: Any, reason: str) -> None:
    """Each bad SFTP value fails with the field's name and the reason."""
    with pytest.raises(ValueError, match=f"^{field}: .*{reason}"):
        ea.EngageConfig(**REQUIRED, **{**SFTP, field: value})


def test_sftp_settings_come_from_the_environment() -> None:
    """ENGAGE_SFTP_* fill the sftp_* fields; a missing partner names its variable."""
    env = {
        "ENGAGE_BASE_URL": "https://tenant.voyado.com",
        "ENGAGE_API_KEY": "k",
        "ENGAGE_USER_AGENT": "AcmePOS/1.5",
        "ENGAGE_SFTP_HOST": "ftp.voyado.com",
        "ENGAGE_SFTP_PORT": "2022",
        "ENGAGE_SFTP_USER": "acme",
        "ENGAGE_SFTP_KEY_PATH": "/k",
        "ENGAGE_SFTP_KNOWN_HOSTS": "/kh",
        "ENGAGE_SFTP_DIR": "in",
    }
    config = ea.EngageConfig.from_env(env)

    assert ("ftp.voyado.com", 2022, "acme", Path("/k"), Path("/kh"), "in") == (
        config.sftp_host,
        config.sftp_port,
        config.sftp_user,
        config.sftp_key_path,
        config.sftp_known_hosts,
        config.sftp_dir,
    )
    with pytest.raises(ValueError, match=r"^ENGAGE_SFTP_USER "):
        ea.EngageConfig.from_env({k: v for k, v in env.items() if k != "ENGAGE_SFTP_USER"})
