"""Real servers for the tests: an OpenSSH sshd serving internal-sftp, and a PostgreSQL cluster.

Both are session-scoped, listen on 127.0.0.1 on a free port, live in temporary directories
removed at the end, and can be stopped and started again on the same port for fault tests.
A missing server fails its fixture with the Debian package to install (``.ci/run`` installs
both); with ``ENGAGE_TESTS_ALLOW_SKIP=1`` the tests that need it are skipped instead.

Loaded from ``tests/conftest.py`` as a plugin.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")
PG_VERSION = 15
READY_TIMEOUT = 30.0
ALLOW_SKIP = "ENGAGE_TESTS_ALLOW_SKIP"


def _missing(what: str, package: str) -> None:
    message = f"{what} is not installed: apt-get install {package} (.ci/run does)"
    if os.environ.get(ALLOW_SKIP) == "1":
        pytest.skip(message)
    pytest.fail(f"{message}; set {ALLOW_SKIP}=1 to skip these tests instead", pytrace=False)


def _free_port() -> int:
    # There is no "Port 0" for sshd: take one the kernel just handed out and retry if it is
    # gone by the time the server binds it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first in each branch."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ")".
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def make_key(path: Path) -> str:
    """Generate an unencrypted ed25519 key pair at `path` (and ``.pub``); the public line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "engage-tests", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_suffix(".pub").read_text().strip()


# --- sshd ---------------------------------------------------------------------------------------


class Sshd:
    """A foreground OpenSSH server on 127.0.0.1 that accepts `client_key` for `user`.

    `known_hosts` holds its host key for ``[127.0.0.1]:port``. `stop`, `start` and `restart`
    keep the port, so a client configured once sees the same server go away and come back.
    Uploads go to absolute directories (see `new_directory`), since the login directory of
    the test user is a real home.
    """

    host = "127.0.0.1"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.user = _user()
        self.host_key = directory / "host_ed25519"
        self.client_key = directory / "client_ed25519"
        self.known_hosts = directory / "known_hosts"
        self.config_path = directory / "sshd_config"
        self.log_path = directory / "sshd.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.host_public_key = make_key(self.host_key)
        (directory / "authorized_keys").write_text(make_key(self.client_key) + "\n")
        (directory / "uploads").mkdir(mode=0o700)

    @property
    def running(self) -> bool:
        """Whether the listener is up."""
        return self.process is not None and self.process.poll() is None

    def new_directory(self) -> Path:
        """A fresh, empty directory for one test's uploads (an absolute remote path too)."""
        path = self.directory / "uploads" / uuid.uuid4().hex[:12]
        path.mkdir(mode=0o700)
        return path

    def sftp_settings(self, remote: Path) -> dict[str, object]:
        """The `EngageConfig` fields that upload to `remote` on this server."""
        return {
            "sftp_host": self.host,
            "sftp_port": self.port,
            "sftp_user": self.user,
            "sftp_key_path": self.client_key,
            "sftp_known_hosts": self.known_hosts,
            "sftp_dir": str(remote),
        }

    def log(self) -> str:
        """What sshd has logged so far (connections, refusals)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _write_config(self, port: int) -> None:
        lines = [
            f"ListenAddress {self.host}",
            f"Port {port}",
            "AddressFamily inet",
            f"HostKey {self.host_key}",
            f"PidFile {self.directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.directory / 'authorized_keys'}",
            "StrictModes no",
            "UsePAM no",
            "PubkeyAuthentication yes",
            "AuthenticationMethods publickey",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
        ]
        if _sshd_version() >= (9, 8):
            # Many quick reconnects from one address must not get it refused.
            lines.append("PerSourcePenalties no")
        self.config_path.write_text("\n".join(lines) + "\n")
        self.known_hosts.write_text(f"[{self.host}]:{port} {self.host_public_key}\n")

    def start(self) -> None:
        """Start the listener (on a free port the first time, on the same port after)."""
        if self.running:
            return
        fixed = self.port != 0
        for _ in range(20):
            port = self.port if fixed else _free_port()
            self._write_config(port)
            if self._launch():
                self.port = port
                return
            if "Address already in use" not in self.log():
                break
            if fixed:
                time.sleep(0.1)
        raise RuntimeError(f"sshd did not start:\n{self.log()}")

    def _launch(self) -> bool:
        self.log_path.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if "Server listening on" in self.log():
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.005)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the listener and drop every open connection, as a server going down would."""
        if self.process is None:
            return
        # Connections are served by children; gather them before the listener goes.
        for pid in _descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """Stop, then start on the same port."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """Stop the server's processes (SIGSTOP): connections stay open and nothing answers."""
        if self.process is None:
            return
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _sshd_version() -> tuple[int, int]:
    result = subprocess.run([str(SSHD), "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", result.stderr + result.stdout)
    return (int(match[1]), int(match[2])) if match else (0, 0)


@pytest.fixture(name="sshd", scope="session")
def sshd_fixture() -> Iterator[Sshd]:
    """A running OpenSSH server with internal-sftp on 127.0.0.1 (see `Sshd`)."""
    if not SSHD.exists():
        _missing("OpenSSH server (/usr/sbin/sshd)", "openssh-server")
    if shutil.which("ssh-keygen") is None:
        _missing("ssh-keygen", "openssh-client")
    # sshd refuses to start without its privilege-separation directory.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="engage-sshd-"))
    directory.chmod(0o700)
    server = Sshd(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(name="sftp_remote")
def sftp_remote_fixture(sshd: Sshd) -> Path:
    """An empty directory on `sshd` for this test's uploads; the server is running."""
    sshd.start()  # a test that stopped it may have failed before starting it again
    return sshd.new_directory()


# --- PostgreSQL ---------------------------------------------------------------------------------


def _pg_bindir() -> Path | None:
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    candidates.append(Path(f"/usr/lib/postgresql/{PG_VERSION}/bin"))
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


class Postgres:
    """A PostgreSQL cluster of our own on 127.0.0.1, with a database and two roles.

    `user` logs in without a password over loopback (trust) and owns `database`; it may
    create databases (`new_database`). `password_user` must give `password` (scram-sha-256),
    for tests of password handling. `fsync` is off: an OS crash is not something these tests
    simulate, and a stopped or killed server still keeps every committed row.
    """

    host = "127.0.0.1"
    database = "engage"
    user = "engage"
    password_user = "engage_pw"
    password = "engage-test-password"

    def __init__(self, directory: Path, bindir: Path) -> None:
        self.directory = directory
        self.bindir = bindir
        self.data = directory / "data"
        self.log_path = directory / "postgres.log"
        self.port = 0
        # initdb and postgres refuse to run as root.
        self._as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        """``postgresql://engage@127.0.0.1:PORT/engage``."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def password_url(self) -> str:
        """The URL for `password_user`, password included."""
        return (
            f"postgresql://{self.password_user}:{self.password}@{self.host}:{self.port}/"
            f"{self.database}"
        )

    def log(self) -> str:
        """What the server has logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._as_owner, *args], capture_output=True, text=True, check=False)

    def init(self) -> None:
        """Create the cluster: initdb, our pg_hba.conf, then the roles and the database."""
        result = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        # First match wins: the password role must never fall through to trust.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {self.password_user} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        self.start()
        self.psql(
            f"CREATE ROLE {self.user} LOGIN CREATEDB",
            f"CREATE ROLE {self.password_user} LOGIN PASSWORD '{self.password}'",
            f"CREATE DATABASE {self.database} OWNER {self.user}",
            f"GRANT ALL ON DATABASE {self.database} TO {self.password_user}",
        )
        self.psql(f"GRANT ALL ON SCHEMA public TO {self.password_user}", database=self.database)

    def psql(self, *statements: str, database: str = "postgres") -> str:
        """Run `statements` as the superuser over the Unix socket; what psql printed."""
        args = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        args += ["-h", str(self.directory), "-p", str(self.port), "-U", "postgres", "-d", database]
        for statement in statements:
            args += ["-c", statement]
        result = self._run(*args)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def new_database(self) -> str:
        """A fresh database owned by `user`, for a test that wants one alone; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name} OWNER {self.user}")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{name}"

    @property
    def running(self) -> bool:
        """Whether the server is up (pg_ctl's view)."""
        return (
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status").returncode == 0
        )

    def start(self) -> None:
        """Start the server (on a free port the first time, on the same port after)."""
        if self.port and self.running:
            return
        fixed = self.port != 0
        for _ in range(20):
            port = self.port if fixed else _free_port()
            self.log_path.unlink(missing_ok=True)  # so the check below reads this try only
            options = (
                f"-c listen_addresses={self.host} -p {port} -k {self.directory} "
                "-c fsync=off -c full_page_writes=off"
            )
            result = self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log_path),
                "-o",
                options,
                "-w",
                "-t",
                str(int(READY_TIMEOUT)),
                "start",
            )
            if result.returncode == 0:
                self.port = port
                return
            if "already in use" not in self.log():
                break
            if fixed:
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log()[-4000:]}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean), or ``immediate`` (as if it crashed)."""
        result = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"
        )
        if result.returncode != 0 and self.running:
            raise RuntimeError(f"pg_ctl stop failed: {result.stderr.strip()}")

    def restart(self) -> None:
        """Stop cleanly, then start on the same port."""
        self.stop()
        self.start()


@pytest.fixture(name="postgres", scope="session")
def postgres_fixture() -> Iterator[Postgres]:
    """A running PostgreSQL cluster on 127.0.0.1 (see `Postgres`), removed afterwards."""
    bindir = _pg_bindir()
    if bindir is None:
        _missing(f"PostgreSQL {PG_VERSION} (initdb, pg_ctl)", "postgresql")
    assert bindir is not None
    # Not under pytest's tmp: that is 0700 and root's, which the postgres user cannot enter.
    directory = Path(tempfile.mkdtemp(prefix="engage-pg-"))
    directory.chmod(0o700)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    server = Postgres(directory, bindir)
    try:
        server.init()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
