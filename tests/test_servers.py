"""The real-server fixtures themselves: sshd serves SFTP, PostgreSQL takes connections."""

from __future__ import annotations

import asyncpg
import asyncssh
import pytest
from servers import Postgres, Sshd


async def _connect_sftp(sshd: Sshd) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        sshd.host,
        sshd.port,
        username=sshd.user,
        client_keys=[str(sshd.client_key)],
        known_hosts=str(sshd.known_hosts),
        agent_path=None,
        config=None,
        connect_timeout=10,
    )


async def test_sshd_serves_sftp_with_the_client_key(sshd: Sshd) -> None:
    """The fixture's sshd accepts its client key, verifies by known_hosts and serves SFTP."""
    remote = sshd.new_directory()

    async with (
        await _connect_sftp(sshd) as connection,
        connection.start_sftp_client() as sftp,
        sftp.open(str(remote / "hello.txt"), "wb") as handle,
    ):
        await handle.write(b"hello")

    assert b"hello" == (remote / "hello.txt").read_bytes()


async def test_sshd_comes_back_on_the_same_port(sshd: Sshd) -> None:
    """After stop() the port refuses connections; after start() the same port serves again."""
    port = sshd.port
    sshd.stop()
    try:
        with pytest.raises(ConnectionRefusedError):
            await _connect_sftp(sshd)
    finally:
        sshd.start()

    async with await _connect_sftp(sshd) as connection:
        result = await connection.run("true", check=False)

    assert (port, 0) == (sshd.port, result.exit_status)


async def test_postgres_accepts_a_connection_and_a_query(postgres: Postgres) -> None:
    """The test role connects over loopback without a password and can create a table."""
    connection = await asyncpg.connect(postgres.url)
    try:
        await connection.execute("CREATE TABLE IF NOT EXISTS probe (n integer)")
        await connection.execute("INSERT INTO probe VALUES (41)")
        answer = await connection.fetchval("SELECT max(n) + 1 FROM probe")
    finally:
        await connection.close()

    assert 42 == answer


async def test_postgres_password_role_needs_its_password(postgres: Postgres) -> None:
    """The password role logs in with its password and is refused without it."""
    connection = await asyncpg.connect(postgres.password_url)
    try:
        who = await connection.fetchval("SELECT current_user")
    finally:
        await connection.close()
    without = postgres.password_url.replace(f":{postgres.password}@", "@")

    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(without)
    assert postgres.password_user == who


async def test_postgres_restart_keeps_port_and_data(postgres: Postgres) -> None:
    """After restart() the server answers on the same port with the rows committed before."""
    url = postgres.new_database()
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("CREATE TABLE kept (n integer); INSERT INTO kept VALUES (7)")
    finally:
        await connection.close()

    postgres.restart()
    connection = await asyncpg.connect(url)
    try:
        kept = await connection.fetchval("SELECT n FROM kept")
    finally:
        await connection.close()

    assert 7 == kept
