"""Uploading XML import files to Engage's SFTP server, each exactly once and never half.

Engage's batch job imports ``*_contacts.xml`` from its SFTP server about once an hour and
deletes what it processed; there is no feedback, and resending is the sender's job. So every
file goes up under a temporary name the job never matches (``<name>.<host>.part``), is
checked (size, and an fsync where the server offers ``fsync@openssh.com``), and only then
renamed to its final name with a plain SFTP rename, which OpenSSH refuses to do over an
existing file. The local file moves to ``xml_dir/sent/`` only after the rename succeeded.

What that gives:

- the import job never sees half a file;
- an uploader killed mid-file leaves a ``.part``; the next run truncates it and sends the
  whole file again (never resumed: an interrupted write can leave holes);
- an uploader killed between the rename and the local move finds the final name taken on its
  next run with the same bytes there, and counts the file as sent instead of sending twice;
- a *different* file under the same name (another host's flusher in the same second, or one
  of ours from the same second still waiting for the import) is never replaced: ours is
  renamed locally to the next free sequence number and sent under that name.

Host keys are checked against `EngageConfig.sftp_known_hosts` only: never ``~/.ssh``, never an
agent, never "accept any". Refused connections, lost connections and timeouts are retried
with the background schedule; a host key mismatch, a refused login or missing rights are
configuration problems and raise `SftpRefused` at once. Several uploaders on one `xml_dir`
take turns through a lock file, so two never write the same ``.part``.

asyncssh is an optional dependency: ``pip install 'engage-async[sftp]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import posixpath
import random
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import attrs

from ._config import EngageConfig
from ._errors import SftpError, SftpRefused, SftpUnavailable
from ._retry import background_delay
from ._xmlfiles import fsync_directory

if TYPE_CHECKING:
    import asyncssh

__all__ = ["SftpError", "SftpRefused", "SftpUnavailable", "UploadReport", "XmlUploader"]

log = logging.getLogger(__name__)

PATTERN: Final = "*_contacts.xml"
SENT_DIR: Final = "sent"
LOCK_FILE: Final = ".upload.lock"
# SFTP servers must take requests of 32 KiB; most announce more (OpenSSH: 255 KiB).
MIN_BLOCK: Final = 32 * 1024
_NAME = re.compile(r"(?P<stamp>\d{14})_(?P<seq>\d+)_contacts\.xml")


@attrs.frozen
class UploadReport:
    """What one `XmlUploader.upload_pending` did.

    Attributes:
        uploaded: final names now on the server, oldest first (moved to ``sent/`` locally).
        already_there: how many of them an earlier, interrupted run had already renamed.
        pending: files still waiting in `xml_dir` (another uploader holds the lock, or new
            files arrived during the run).
    """

    uploaded: tuple[str, ...] = ()
    already_there: int = 0
    pending: int = 0


def _asyncssh() -> Any:
    try:
        import asyncssh  # noqa: PLC0415 - optional: the package works without it
    except ImportError as exc:
        raise ImportError(
            "uploading XML files over SFTP needs asyncssh: pip install 'engage-async[sftp]'"
        ) from exc
    return asyncssh


def _order(path: Path) -> tuple[str, int, str]:
    # Oldest first: by timestamp, then by sequence as a number (10 after 9).
    match = _NAME.fullmatch(path.name)
    if match is None:
        return (path.name, 0, path.name)
    return (match["stamp"], int(match["seq"]), path.name)


def pending_files(directory: Path) -> list[Path]:
    """The import files in `directory` waiting to be uploaded, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob(PATTERN) if p.is_file()), key=_order)


def _host_tag() -> str:
    # Part of the temporary name, so uploaders on two hosts never write one `.part`.
    tag = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-")[:32]
    return tag or "host"


def _try_lock(directory: Path) -> IO[bytes] | None:
    """Hold the directory's upload lock (flock, released on close), or None if taken."""
    path = directory / LOCK_FILE
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "rb")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except BaseException:
        handle.close()
        raise
    return handle


def _move_to_sent(path: Path) -> Path:
    """Move an uploaded file into ``sent/`` with an atomic rename; where it went."""
    sent = path.parent / SENT_DIR
    sent.mkdir(mode=0o700, exist_ok=True)
    target = sent / path.name
    copy = 1
    # Only the lock holder moves files here, so checking first cannot race another mover.
    while target.exists():
        target = sent / f"{path.stem}~{copy}{path.suffix}"
        copy += 1
    path.rename(target)
    fsync_directory(sent)
    fsync_directory(path.parent)
    return target


def _rename_locally(path: Path) -> Path:
    """Give `path` the next free sequence number of its timestamp; the new path.

    A link claims the new name without ever replacing a file the flusher just wrote.
    """
    match = _NAME.fullmatch(path.name)
    if match is None:
        raise SftpError(f"a different file named {path.name} is already on the server")
    seq = int(match["seq"])
    sent = path.parent / SENT_DIR
    while True:
        seq += 1
        name = f"{match['stamp']}_{seq}_contacts.xml"
        if (sent / name).exists():
            continue
        try:
            os.link(path, path.parent / name)
        except FileExistsError:
            continue
        path.unlink()
        fsync_directory(path.parent)
        return path.parent / name


@attrs.define
class XmlUploader:
    """Uploads the XML import files in `config.xml_dir` to Engage's SFTP server.

    `upload_pending` is safe to call from several tasks and processes on one `xml_dir`: one
    uploads, the others return at once. `sleep` and `rng` are injectable so tests do not wait.

    Raises:
        ValueError: the config has no SFTP server (``sftp_host`` unset).
        ImportError: asyncssh is not installed (the ``sftp`` extra).
    """

    config: EngageConfig
    attempts: int = attrs.field(default=4, kw_only=True)
    sleep: Callable[[float], Awaitable[None]] = attrs.field(default=asyncio.sleep, kw_only=True)
    rng: random.Random | None = attrs.field(default=None, kw_only=True)
    _ssh: Any = attrs.field(init=False, repr=False)
    _tag: str = attrs.field(init=False, repr=False, factory=_host_tag)

    def __attrs_post_init__(self) -> None:
        if not self.config.sftp_enabled:
            raise ValueError("sftp_host: must be set to upload XML files")
        if self.attempts < 1:
            raise ValueError("attempts: must be at least 1")
        self._ssh = _asyncssh()

    async def upload_pending(self) -> UploadReport:
        """Upload every ``*_contacts.xml`` in `xml_dir`, oldest first; what was done.

        Each file is renamed to its final name on the server only when complete, then moved
        to ``xml_dir/sent/``. Connection failures are retried `attempts` times in all, with
        the background schedule (`EngageConfig.background_delays`) between them.

        Raises:
            SftpUnavailable: the server could not be reached on any attempt.
            SftpRefused: host key, login, rights or remote directory refused; not retried.
            SftpError: a local file could not be read or moved.
        """
        directory = self.config.xml_dir
        if not await asyncio.to_thread(pending_files, directory):
            return UploadReport()
        try:
            lock = await asyncio.to_thread(_try_lock, directory)
        except OSError as exc:
            raise SftpError(f"cannot lock {directory} for uploading: {exc}") from exc
        if lock is None:
            log.info("another uploader is sending the files in %s", directory)
            return UploadReport(pending=len(await asyncio.to_thread(pending_files, directory)))
        try:
            return await self._upload_all()
        finally:
            lock.close()

    async def _upload_all(self) -> UploadReport:
        uploaded: list[str] = []
        already_there = 0
        failures = 0
        while True:
            try:
                async with self._sftp() as sftp:
                    for path in await asyncio.to_thread(pending_files, self.config.xml_dir):
                        name, earlier = await self._upload(sftp, path)
                        uploaded.append(name)
                        already_there += earlier
                        failures = 0  # progress: a later drop starts a fresh count
                break
            except Exception as exc:
                self._refuse_if_fatal(exc)
                failures += 1
                if failures >= self.attempts:
                    raise SftpUnavailable(
                        f"SFTP server {self._where()} unavailable after {failures} "
                        f"attempt(s): {_describe(exc)}"
                    ) from exc
                delay = background_delay(self.config.background_delays, failures - 1, rng=self.rng)
                log.warning(
                    "SFTP server %s unavailable (%s); retrying in %.1f s",
                    self._where(),
                    _describe(exc),
                    delay,
                )
                await self.sleep(delay)
        left = len(await asyncio.to_thread(pending_files, self.config.xml_dir))
        return UploadReport(tuple(uploaded), already_there, left)

    def _where(self) -> str:
        return f"{self.config.sftp_host}:{self.config.sftp_port}"

    def _remote(self, name: str) -> str:
        directory = self.config.sftp_dir
        return name if directory == "." else posixpath.join(directory, name)

    @contextlib.asynccontextmanager
    async def _sftp(self) -> AsyncIterator[asyncssh.SFTPClient]:
        ssh = self._ssh
        config = self.config
        assert config.sftp_key_path is not None
        assert config.sftp_known_hosts is not None
        try:
            key = await asyncio.to_thread(ssh.read_private_key, config.sftp_key_path)
        except (OSError, ValueError) as exc:
            raise SftpRefused(
                f"sftp_key_path: cannot read the private key {config.sftp_key_path} "
                f"({type(exc).__name__}; it must exist and have no passphrase)"
            ) from exc
        try:
            known = await asyncio.to_thread(ssh.read_known_hosts, str(config.sftp_known_hosts))
        except (OSError, ValueError) as exc:
            raise SftpRefused(
                f"sftp_known_hosts: cannot read {config.sftp_known_hosts} ({exc})"
            ) from exc
        timeout = config.request_timeout
        async with (
            ssh.connect(
                config.sftp_host,
                config.sftp_port,
                username=config.sftp_user,
                known_hosts=known,
                client_keys=[key],
                preferred_auth="publickey",
                agent_path=None,
                config=None,
                connect_timeout=timeout,
                login_timeout=timeout,
                # Without keepalives a server that stops answering mid-file hangs us for ever;
                # with these, the connection counts as lost after `timeout` of silence.
                keepalive_interval=timeout / 4,
                keepalive_count_max=3,
            ) as connection,
            connection.start_sftp_client() as sftp,
        ):
            yield sftp

    async def _upload(self, sftp: asyncssh.SFTPClient, path: Path) -> tuple[str, bool]:
        """Send one file and move it to ``sent/``; its final name, and whether it was there."""
        part = self._remote(f"{path.name}.{self._tag}.part")
        size = await self._put(sftp, path, part)
        already_there = False
        while True:
            final = self._remote(path.name)
            try:
                await sftp.rename(part, final)
                break
            except self._ssh.SFTPError as exc:
                # OpenSSH answers a taken name with a generic failure: look at the name.
                if isinstance(exc, self._ssh.SFTPNoSuchFile) or not await self._exists(sftp, final):
                    raise
            same = await self._same(sftp, final, path, size)
            if same is None:
                continue  # the import job took it between our looks: rename again
            if same:
                await sftp.remove(part)
                already_there = True
                log.info("%s was already on the server from an earlier run", path.name)
                break
            path = await self._local(_rename_locally, path)
            log.warning("a different file has this name on the server; sending as %s", path.name)
        await self._local(_move_to_sent, path)
        if not already_there:
            log.info("uploaded %s (%d bytes) to %s", path.name, size, self._where())
        return path.name, already_there

    async def _put(self, sftp: asyncssh.SFTPClient, path: Path, part: str) -> int:
        """Write `path` to `part` from its first byte; its size, checked on the server.

        One request at a time, each at most the server's limit: asyncssh splits a larger
        write into parallel tasks and, when the connection drops, leaves some of their
        errors unretrieved ("Task exception was never retrieved" in the app's log).
        """
        block = sftp.limits.max_write_len or MIN_BLOCK
        handle = await self._local(path.open, "rb")
        try:
            async with sftp.open(part, "wb") as remote:
                offset = 0
                while chunk := await self._local(handle.read, block):
                    await remote.write(chunk, offset)
                    offset += len(chunk)
                with contextlib.suppress(self._ssh.SFTPOpUnsupported):
                    await remote.fsync()
        finally:
            handle.close()
        written = (await sftp.stat(part)).size
        if written != offset:
            raise self._ssh.SFTPFailure(f"{part} holds {written} of {offset} bytes")
        return offset

    async def _same(
        self, sftp: asyncssh.SFTPClient, final: str, path: Path, size: int
    ) -> bool | None:
        """Whether the server's `final` holds exactly `path`'s bytes; None if it vanished."""
        try:
            if (await sftp.stat(final)).size != size:
                return False
            block = sftp.limits.max_read_len or MIN_BLOCK  # one request at a time, as in _put
            handle = await self._local(path.open, "rb")
            try:
                async with sftp.open(final, "rb") as remote:
                    offset = 0
                    while local := await self._local(handle.read, block):
                        if await remote.read(len(local), offset) != local:
                            return False
                        offset += len(local)
            finally:
                handle.close()
        except self._ssh.SFTPNoSuchFile:
            return None
        return True

    async def _exists(self, sftp: asyncssh.SFTPClient, remote: str) -> bool:
        try:
            await sftp.stat(remote)
        except self._ssh.SFTPNoSuchFile:
            return False
        return True

    async def _local(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a local file operation in a thread; its OSError becomes an `SftpError`."""
        try:
            return await asyncio.to_thread(function, *args)
        except OSError as exc:
            raise SftpError(f"XML file in {self.config.xml_dir}: {exc}") from exc

    def _refuse_if_fatal(self, exc: Exception) -> None:
        """Raise `SftpRefused` (or `exc` itself) unless waiting could help; else return."""
        ssh = self._ssh
        config = self.config
        if isinstance(exc, SftpError):
            raise exc
        if isinstance(exc, ssh.HostKeyNotVerifiable):
            raise SftpRefused(
                f"the host key of {self._where()} is not in sftp_known_hosts "
                f"({config.sftp_known_hosts}) or does not match it"
            ) from exc
        if isinstance(exc, ssh.PermissionDenied):
            raise SftpRefused(
                f"{self._where()} refused the login of sftp_user {config.sftp_user!r} "
                f"with sftp_key_path ({config.sftp_key_path})"
            ) from exc
        if isinstance(exc, ssh.KeyExchangeFailed | ssh.ProtocolNotSupported):
            raise SftpRefused(
                f"cannot agree on a secure connection with {self._where()}: {_describe(exc)}"
            ) from exc
        if isinstance(exc, ssh.SFTPPermissionDenied | ssh.SFTPNoSuchFile | ssh.SFTPNoSuchPath):
            raise SftpRefused(
                f"{self._where()} refused writing to sftp_dir {config.sftp_dir!r}: {_describe(exc)}"
            ) from exc
        if isinstance(exc, ssh.SFTPOpUnsupported):
            raise SftpRefused(
                f"{self._where()} does not support a step of the upload: {_describe(exc)}"
            ) from exc
        if isinstance(exc, OSError | TimeoutError | ssh.DisconnectError | ssh.SFTPError):
            return  # refused, reset, lost, timed out, server-side failure: worth waiting for
        raise exc


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or str(exc) or "no detail"
    return f"{type(exc).__name__}: {reason}"
