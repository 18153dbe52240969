"""Shared fixtures: a FakeEngage over real sockets, a config pointing at it, a session.

Helpers that test modules import live in tests/helpers.py. Also here: the aioresponses shim.
aioresponses 0.7.9 builds ClientResponse objects without the `stream_writer` argument that
aiohttp 3.14 requires (upstream issue #289, fixed but not released), so every mocked request
fails. The subclass below supplies a writer that reports nothing written; drop it once
aioresponses releases the fix. We do not cap aiohttp below 3.14: that release carries
security fixes.
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioresponses.core
import pytest
from aiohttp import ClientResponse
from helpers import make_config

import engage_async as ea
from engage_async.testing import FakeEngage


class _ShimResponse(ClientResponse):
    def __init__(self, method: str, url: Any, *, stream_writer: Any = None, **kwargs: Any) -> None:
        super().__init__(
            method,
            url,
            stream_writer=stream_writer or types.SimpleNamespace(output_size=0),
            **kwargs,
        )


# Harmless once fixed upstream: it only fills in the argument when aioresponses leaves it out.
aioresponses.core.ClientResponse = _ShimResponse  # type: ignore[misc]

pytest_plugins = ["servers"]  # real sshd and PostgreSQL fixtures: tests/servers.py


@pytest.fixture(name="fake")
async def fake_fixture() -> AsyncIterator[FakeEngage]:
    """A running FakeEngage on 127.0.0.1, no rate limit."""
    async with FakeEngage(rate_limit=None) as fake:
        yield fake


@pytest.fixture(name="config")
def config_fixture(fake: FakeEngage, tmp_path: Path) -> ea.EngageConfig:
    """A config that points at `fake`, with its outbox in `tmp_path`."""
    return make_config(fake.url, fake.api_key, tmp_path)


@pytest.fixture(name="session")
async def session_fixture(config: ea.EngageConfig) -> AsyncIterator[ea.EngageSession]:
    """An open EngageSession on `config`."""
    async with ea.EngageSession(config) as session:
        yield session
