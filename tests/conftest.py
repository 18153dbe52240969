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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aioresponses.core
import pytest
from aiohttp import ClientResponse
from helpers import Backend, make_config, use_backend

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


@pytest.fixture(name="backend", autouse=True)
def backend_fixture(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The outbox backend of this test: SQLite, unless the suite is parametrised over both
    (``pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)``), when
    PostgreSQL runs too, each test in a schema of its own. `make_config` follows it.
    """
    kind = getattr(request, "param", "sqlite")
    url = request.getfixturevalue("postgres").url if kind == "postgres" else None
    yield use_backend(kind, url)
    use_backend("sqlite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``sqlite_only`` (file modes, locks, WAL, salvage) do not run on
    PostgreSQL: they are deselected there, not skipped.
    """
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("backend") == "postgres"
        (drop if on_postgres and item.get_closest_marker("sqlite_only") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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
