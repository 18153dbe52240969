"""Which outbox a config names, opened: the SQLite file or the PostgreSQL schema.

The session, the flusher and the admin open their outbox here and speak to it only through
`OutboxStore`, so everything above works unchanged on either backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._clock import SYSTEM_CLOCK, Clock
from ._config import EngageConfig, sqlite_path_of
from ._errors import OutboxError
from ._outbox import SqliteOutbox
from ._store import OutboxStore

__all__ = ["is_outbox_url", "open_location", "open_outbox", "session_timeout"]

# The share of the interactive deadline the session keeps for the outbox (the session's
# _NETWORK_SHARE is the rest); a database that does not answer within it is an OutboxError.
_OUTBOX_SHARE = 0.1
_LEAST_SESSION_TIMEOUT = 0.2


def session_timeout(config: EngageConfig) -> float:
    """How long a session's call may wait for a PostgreSQL outbox (`outbox_timeout`, else
    the outbox's share of the interactive deadline).
    """
    if config.outbox_timeout is not None:
        return config.outbox_timeout
    return max(config.interactive_deadline * _OUTBOX_SHARE, _LEAST_SESSION_TIMEOUT)


def is_outbox_url(value: str | os.PathLike[str]) -> bool:
    """Whether `value` is an outbox URL (``sqlite:///`` or ``postgresql://``), not a path."""
    text = os.fspath(value)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in {"sqlite", "postgresql", "postgres"}


async def open_outbox(
    config: EngageConfig, *, clock: Clock = SYSTEM_CLOCK, create: bool = True
) -> OutboxStore:
    """Open the outbox `config` names (`outbox_url`, else the file `outbox_path`).

    Raises:
        OutboxError: it cannot be opened, or (`create` False) there is none.
    """
    if config.outbox_is_postgres:
        from ._pg_outbox import PgOutbox  # noqa: PLC0415 - needs the postgres extra

        assert config.outbox_url is not None
        return await PgOutbox.open(
            config.outbox_url,
            schema=config.outbox_schema,
            pool_size=config.outbox_pool_size,
            clock=clock,
            create=create,
            session_timeout=session_timeout(config),
            timeout=config.busy_timeout,
            lease_seconds=config.lease_seconds,
        )
    outbox = await SqliteOutbox.open(
        config.outbox_path,
        busy_timeout=config.busy_timeout,
        durability=config.durability,
        clock=clock,
        create=create,
    )
    moved = await outbox.moved_to()
    if moved is not None:
        await outbox.close()
        raise OutboxError(
            f"the outbox at {config.outbox_path} was moved to {moved} (engage-async outbox "
            "migrate): point outbox_url (ENGAGE_OUTBOX_URL) there"
        )
    return outbox


async def open_location(
    location: str | os.PathLike[str],
    *,
    schema: str = "engage_outbox",
    busy_timeout: float = 10.0,
    clock: Clock = SYSTEM_CLOCK,
    create: bool = False,
) -> OutboxStore:
    """Open an outbox by its path or URL alone (the admin's way, which has no config).

    Raises:
        OutboxError: it cannot be opened, or (`create` False) there is none.
    """
    text = os.fspath(location)
    if is_outbox_url(text):
        path = sqlite_path_of(text)
        if path is None:
            from ._pg_outbox import PgOutbox  # noqa: PLC0415 - needs the postgres extra

            return await PgOutbox.open(
                text,
                schema=schema,
                pool_size=2,
                clock=clock,
                create=create,
                session_timeout=busy_timeout,
                timeout=busy_timeout,
            )
    else:
        path = Path(text)
    return await SqliteOutbox.open(path, busy_timeout=busy_timeout, clock=clock, create=create)
