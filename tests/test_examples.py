"""Tests of ``examples/``: the README's web app served by uvicorn against the test's
`FakeEngage`, the systemd unit, and the container files.

The web app runs as the README says (``uvicorn app:app``), in a subprocess configured only by
``ENGAGE_*`` variables; the fake serves from this test's event loop, so the subprocess is
awaited through asyncio. Docker cannot run here: its files are checked for what a stop and a
shared outbox need, not built.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import pytest
import yaml

import engage_async as ea
from engage_async.testing import FakeEngage

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
APP = EXAMPLES / "webapp" / "app.py"
UNIT = EXAMPLES / "systemd" / "engage-async-flush.service"
DOCKERFILE = EXAMPLES / "docker" / "Dockerfile"
COMPOSE = EXAMPLES / "docker" / "compose.yaml"
# Startup of a fresh interpreter with aiohttp, lxml and uvicorn is the slow part.
PROCESS_TIMEOUT = 30.0
SERVING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
# The default grace a stopping flusher gives its request in flight: stop timeouts must exceed it.
SHUTDOWN_TIMEOUT = ea.EngageConfig(
    base_url="https://example.voyado.com", api_key="k", user_agent="Tests/1.0"
).shutdown_timeout


async def eventually(condition: Callable[[], object], timeout: float) -> None:
    """Wait, polling, until `condition()` is true; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def app_env(fake: FakeEngage, outbox: Path) -> dict[str, str]:
    """The environment of the web app on `fake`, with `outbox` and short waits."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGAGE_")}
    env.update(
        {
            "ENGAGE_BASE_URL": fake.url,
            "ENGAGE_API_KEY": fake.api_key,
            "ENGAGE_USER_AGENT": "EngageExampleTests/1.0",
            "ENGAGE_OUTBOX": str(outbox),
            "ENGAGE_XML_DIR": str(outbox.parent / "xml"),
            "ENGAGE_RETRY_INITIAL_DELAY": "0.01",
            "ENGAGE_RETRY_MAX_DELAY": "0.05",
            "ENGAGE_BACKGROUND_DELAYS": "0.05",
            "ENGAGE_POLL_INTERVAL": "0.05",
        }
    )
    return env


async def serve(env: dict[str, str], log: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``uvicorn app:app`` on 127.0.0.1 and a free port; the process and its URL once
    the app's lifespan has started. Its output goes to `log` (never a full pipe).
    """
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(APP.parent)),
            *("--host", "127.0.0.1", "--port", "0"),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    port: list[str] = []

    def serving() -> bool:
        found = SERVING.search(log.read_text(encoding="utf-8"))
        if found:
            port.append(found[1])
        # An app that failed to start exits: stop waiting and show why.
        return bool(found) or process.returncode is not None

    try:
        await eventually(serving, PROCESS_TIMEOUT)
    except BaseException:
        await stop(process)
        raise
    assert port, log.read_text(encoding="utf-8")[-3000:]
    return process, f"http://127.0.0.1:{port[0]}"


async def stop(process: asyncio.subprocess.Process) -> int:
    """SIGTERM `process`, as a supervisor stops it; its exit status (killed if it hangs)."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


async def sign_up(client: aiohttp.ClientSession, url: str, email: str, name: str) -> Any:
    """POST a sign-up to the app; its JSON answer."""
    async with client.post(f"{url}/signup", json={"email": email, "firstName": name}) as reply:
        assert 200 == reply.status, await reply.text()
        return await reply.json()


async def test_the_quickstart_app_answers_during_an_outage_and_delivers_afterwards(
    fake: FakeEngage, tmp_path: Path
) -> None:
    """The README's app under uvicorn: a sign-up is delivered; with Engage down the next one
    is answered as queued; once Engage is back, the app's own flusher delivers it. Each
    customer exists once, with the source and store the app gave, and the app stops on
    SIGTERM with exit status 0 and nothing left pending.
    """
    outbox = tmp_path / "outbox.sqlite3"
    log = tmp_path / "uvicorn.log"
    process, url = await serve(app_env(fake, outbox), log)
    try:
        async with aiohttp.ClientSession() as client:
            anna = await sign_up(client, url, "anna@example.com", "Anna")
            await fake.go_down()
            bo = await sign_up(client, url, "bo@example.com", "Bo")
            await fake.come_up()
        await eventually(lambda: fake.find("email", "bo@example.com"), PROCESS_TIMEOUT)
    finally:
        status = await stop(process)
    output = log.read_text(encoding="utf-8")

    # Recent uvicorn re-raises the signal it stopped on after a clean shutdown; older ones exit 0.
    assert (True, True, False) == (
        status in {0, -signal.SIGTERM},
        "Application shutdown complete." in output,
        "Traceback" in output,
    ), output[-3000:]
    assert (False, True) == (anna["queued"], isinstance(anna["contactId"], str))
    assert (True, None) == (bo["queued"], bo["contactId"])
    emails = ("anna@example.com", "bo@example.com")
    assert [1, 1] == [len(fake.find("email", email)) for email in emails]
    delivered = [fake.contacts[fake.find("email", email)[0]] for email in emails]
    assert [("Anna", "Member", "e-com", "600"), ("Bo", "Member", "e-com", "600")] == [
        (c.attributes["firstName"], c.contact_type, c.source, c.store_external_id)
        for c in delivered
    ]
    assert anna["contactId"] == delivered[0].id
    stats = await ea.OutboxAdmin(outbox).stats()
    assert (0, 0) == (stats.by_state.get("pending", 0), stats.by_state.get("inflight", 0))


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_the_readme_quickstart_is_the_example_app() -> None:
    """The README's web-app quickstart is ``examples/webapp/app.py`` verbatim, so what the
    README shows is what the test above serves.
    """
    section = _readme_section("Quickstart in an async web app")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)

    assert APP.read_text(encoding="utf-8") == blocks[0]


# --- systemd -----------------------------------------------------------------------------------


def _unit_service() -> dict[str, list[str]]:
    """The ``[Service]`` section of the unit: every value of each key, in order (units repeat
    keys, as ``Environment=``).
    """
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_the_systemd_unit_restarts_stops_in_time_and_shares_the_state_directory() -> None:
    """The flusher unit restarts after a failure (a missing outbox exits 2), stops with
    SIGTERM to the flusher and a stop timeout longer than the flusher's shutdown, and keeps
    an absolute outbox in its state directory.
    """
    service = _unit_service()
    environment = dict(line.split("=", 1) for line in service["Environment"])
    outbox = PurePosixPath(environment["ENGAGE_OUTBOX"])

    assert (["on-failure"], ["mixed"], ["SIGTERM"]) == (
        service["Restart"],
        service["KillMode"],
        service["KillSignal"],
    )
    assert float(service["TimeoutStopSec"][0]) > SHUTDOWN_TIMEOUT
    assert [PurePosixPath("/var/lib", *service["StateDirectory"])] == [outbox.parent]
    assert [True] == [line.endswith("/engage-async flush") for line in service["ExecStart"]]


def _installable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart on this environment's `engage-async` (verify checks it exists)."""
    executable = Path(sys.executable).parent / "engage-async"
    assert executable.exists()
    text = UNIT.read_text(encoding="utf-8")
    path = tmp_path / UNIT.name
    path.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={executable}", text), "utf-8")
    return path


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_systemd_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit and says nothing: no unknown key, no value
    it would ignore.
    """
    result = _systemd_analyze("verify", str(_installable_unit(tmp_path)))

    assert (0, "") == (result.returncode, result.stderr + result.stdout)


def test_the_systemd_unit_is_hardened(tmp_path: Path) -> None:
    """``systemd-analyze security`` rates the unit's exposure at 2.0 or lower ("OK")."""
    unit = _installable_unit(tmp_path)
    result = _systemd_analyze("security", "--offline=yes", "--threshold=20", str(unit))
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze cannot rate a unit file offline")

    assert 0 == result.returncode, result.stdout[-3000:] + result.stderr


# --- containers --------------------------------------------------------------------------------


def _seconds(duration: str) -> float:
    """A compose duration (``30s``, ``1m30s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined: (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    words = [line.partition(" ") for line in lines if line and not line.startswith("#")]
    return [(word.upper(), rest.strip()) for word, _, rest in words]


def test_compose_runs_the_app_and_the_sidecar_on_one_outbox_volume() -> None:
    """compose.yaml: the app and ``engage-async flush`` mount one named volume at one place
    and name the same absolute ``ENGAGE_OUTBOX`` inside it; both run under an init, restart,
    and get a stop grace period longer than the flusher's shutdown.
    """
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    app, flusher = compose["services"]["app"], compose["services"]["flusher"]
    outboxes = {PurePosixPath(s["environment"]["ENGAGE_OUTBOX"]) for s in (app, flusher)}
    mounts = {tuple(s["volumes"]) for s in (app, flusher)}
    [[mount]] = mounts
    volume, target = mount.split(":")[:2]

    assert (1, 1) == (len(outboxes), len(mounts))
    [outbox] = outboxes
    assert outbox.is_absolute()
    assert PurePosixPath(target) in outbox.parents
    assert volume in compose["volumes"]
    assert ["engage-async", "flush"] == flusher["command"]
    for service in (app, flusher):
        assert (True, "unless-stopped") == (service["init"], service["restart"])
        assert _seconds(service["stop_grace_period"]) > SHUTDOWN_TIMEOUT


def test_the_dockerfile_stops_cleanly_and_builds_from_files_that_exist() -> None:
    """The Dockerfile: exec-form CMD/ENTRYPOINT (SIGTERM reaches the process, not a shell),
    STOPSIGNAL SIGTERM, a user that is not root, the compose file's outbox path, and every
    file it copies present in the repository (its build context).
    """
    instructions = _dockerfile()
    commands = [rest for word, rest in instructions if word in {"CMD", "ENTRYPOINT"}]
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))

    assert commands
    assert all(isinstance(json.loads(command), list) for command in commands)
    assert [("STOPSIGNAL", "SIGTERM")] == [i for i in instructions if i[0] == "STOPSIGNAL"]
    assert [("USER", "shop")] == [i for i in instructions if i[0] == "USER"]
    outbox = compose["services"]["app"]["environment"]["ENGAGE_OUTBOX"]
    assert f"ENGAGE_OUTBOX={outbox}" in env.split()
    sources = [
        source
        for word, rest in instructions
        if word == "COPY"
        for source in rest.split()[:-1]
        if not source.startswith("--")
    ]
    assert [] == [source for source in sources if not (ROOT / source).exists()]
