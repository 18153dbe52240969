"""`EngageConfig`: defaults, validation at construction, and `from_env`."""

from __future__ import annotations

import math
import traceback
from pathlib import Path
from typing import Any

import attrs
import pytest

from engage_async import EngageConfig

API_KEY = "s3cr3t-api-key-do-not-print"
REQUIRED: dict[str, Any] = {
    "base_url": "https://tenant.voyado.com",
    "api_key": API_KEY,
    "user_agent": "AcmePOS/1.5",
}
ENV = {
    "ENGAGE_BASE_URL": "https://tenant.voyado.com",
    "ENGAGE_API_KEY": API_KEY,
    "ENGAGE_USER_AGENT": "AcmePOS/1.5",
}


def make(**overrides: Any) -> EngageConfig:
    """A config with the required fields filled in and `overrides` on top."""
    return EngageConfig(**{**REQUIRED, **overrides})


# --- defaults -------------------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    """Every optional field of the contract's table has the documented default."""
    config = make()

    assert {
        "outbox_path": Path("engage-outbox.sqlite3"),
        "api_version": 3,
        "rate_limit": 40.0,
        "interactive_deadline": 3.0,
        "request_timeout": 30.0,
        "fallback_mode": "bulk",
        "xml_dir": Path("engage-xml"),
        "lease_seconds": 30.0,
        "durability": "full",
    } == {
        "outbox_path": config.outbox_path,
        "api_version": config.api_version,
        "rate_limit": config.rate_limit,
        "interactive_deadline": config.interactive_deadline,
        "request_timeout": config.request_timeout,
        "fallback_mode": config.fallback_mode,
        "xml_dir": config.xml_dir,
        "lease_seconds": config.lease_seconds,
        "durability": config.durability,
    }


@pytest.mark.parametrize("missing", ["base_url", "api_key", "user_agent"])
def test_required_fields(missing: str) -> None:
    """base_url, api_key and user_agent have no default."""
    values = {k: v for k, v in REQUIRED.items() if k != missing}

    with pytest.raises(TypeError, match=missing):
        EngageConfig(**values)


def test_frozen() -> None:
    """A config cannot be changed after it is built."""
    config = make()

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.rate_limit = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("version", "root"), [(3, "/api/v3"), (2, "/api/v2")])
def test_api_root_follows_the_version(version: int, root: str) -> None:
    """api_root is the path prefix of the chosen API version."""
    assert root == make(api_version=version).api_root


# --- base_url -------------------------------------------------------------------------------------


def test_base_url_trailing_slashes_are_dropped() -> None:
    """A base URL given with trailing slashes is stored without them."""
    assert "https://tenant.voyado.com" == make(base_url="https://tenant.voyado.com//").base_url


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080",
        "http://127.0.0.1:9000",
        "http://127.10.0.1",
        "http://[::1]:8080",
        "https://tenant.staging.voyado.com",
    ],
)
def test_base_url_accepted(url: str) -> None:
    """https anywhere, and plain http on loopback, are accepted."""
    assert url == make(base_url=url).base_url


@pytest.mark.parametrize(
    "url",
    [
        "http://tenant.voyado.com",
        "http://10.0.0.1",
        "ftp://tenant.voyado.com",
        "tenant.voyado.com",
        "/api/v3",
        "https://",
        "https://tenant.voyado.com?x=1",
        "https://tenant.voyado.com#frag",
    ],
)
def test_base_url_rejected(url: str) -> None:
    """http off loopback, other schemes, relative URLs, query and fragment are refused."""
    with pytest.raises(ValueError, match="base_url"):
        make(base_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://tenant.voyado.com:99999",
        "https://tenant.voyado.com:65536",
        "https://tenant.voyado.com:0",
        "https://tenant.voyado.com:abc",
        "https://tenant.voyado.com:-1",
        "https://tenant.voyado.com:+443",
        "https://tenant.voyado.com:",
        "http://127.0.0.1:99999",
    ],
)
def test_base_url_with_an_invalid_port_rejected(url: str) -> None:
    """A port outside 1-65535, not a number, or empty is refused when the config is built,
    with a message that says it is the port (not at the first request, by aiohttp).
    """
    with pytest.raises(ValueError, match=r"^base_url: .*port") as info:
        make(base_url=url)

    assert None is info.value.__context__


def test_base_url_with_a_port_accepted() -> None:
    """An explicit valid port is kept."""
    assert (
        "https://tenant.voyado.com:8443" == make(base_url="https://tenant.voyado.com:8443").base_url
    )


USER_SECRET = "pa55w0rd-in-url"


@pytest.mark.parametrize(
    "url",
    [
        f"https://someone:{USER_SECRET}@tenant.voyado.com",
        f"https://{USER_SECRET}@tenant.voyado.com",
        f"https://:{USER_SECRET}@tenant.voyado.com",
        f"https://someone:{USER_SECRET}@tenant.voyado.com:443/",
        "https://@tenant.voyado.com",
    ],
)
def test_base_url_with_user_info_rejected_without_repeating_it(url: str) -> None:
    """User info in the base URL is refused (Engage takes the key as a header) and never
    shows in the message, the repr or the traceback of the error.
    """
    with pytest.raises(ValueError, match=r"^base_url: .*user info") as info:
        make(base_url=url)

    assert [] == leaks(info.value, USER_SECRET, "someone")


def test_from_env_base_url_with_user_info_names_the_variable_not_the_secret() -> None:
    """From the environment, user info in the URL is reported under ENGAGE_BASE_URL, and the
    secret is not in the message.
    """
    environ = {**ENV, "ENGAGE_BASE_URL": f"https://someone:{USER_SECRET}@tenant.voyado.com"}

    with pytest.raises(ValueError, match=r"^ENGAGE_BASE_URL .*user info") as info:
        EngageConfig.from_env(environ)

    assert [] == leaks(info.value, USER_SECRET, API_KEY)


@pytest.mark.parametrize(
    "url",
    [
        "https://ten\nant.voyado.com",
        "https://tenant.voyado.com\t",
        " https://tenant.voyado.com",
        "https://tenant .voyado.com",
        "https://tenant.voyado.com\x00",
        "https://[::1",
    ],
)
def test_base_url_with_whitespace_or_control_characters_rejected(url: str) -> None:
    """Whitespace and control characters (which urlsplit silently drops, so the stored URL
    would differ from the one checked) and malformed IPv6 hosts are refused by field name.
    """
    with pytest.raises(ValueError, match=r"^base_url: "):
        make(base_url=url)


# --- api_key --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   ", "has space", "tab\tkey", "newline\n"])
def test_api_key_rejected(key: str) -> None:
    """An empty key or one with whitespace is refused, and the message does not repeat it."""
    with pytest.raises(ValueError, match="api_key") as info:
        make(api_key=key)

    if key.strip():
        assert key not in str(info.value)


def test_api_key_never_in_repr() -> None:
    """The repr (and so str) of a config never shows the API key."""
    config = make()

    assert API_KEY not in repr(config)
    assert API_KEY not in str(config)


# --- user_agent -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "agent", ["AcmePOS/1.5", "engage-async/0.1.0", "AcmePOS/1.5 (store 600)", "My POS/2"]
)
def test_user_agent_accepted(agent: str) -> None:
    """System/version user agents, with trailing comments, are accepted."""
    assert agent == make(user_agent=agent).user_agent


@pytest.mark.parametrize("agent", ["", "AcmePOS", "/1.5", "AcmePOS/", "AcmePOS/ 1.5", " A/1"])
def test_user_agent_rejected(agent: str) -> None:
    """A user agent that is not System/version is refused with the field's name."""
    with pytest.raises(ValueError, match="user_agent"):
        make(user_agent=agent)


@pytest.mark.parametrize("agent", ["AcmePOS/1.5\x00", "AcmePOS/1.5 \x07bell", "AcmePOS/1.5\r"])
def test_user_agent_with_control_characters_rejected(agent: str) -> None:
    """A control character anywhere in the user agent is refused at start-up.

    Such a header is malformed on the wire; the config promises bad values fail when it is
    built, not at the first request.
    """
    with pytest.raises(ValueError, match="user_agent"):
        make(user_agent=agent)


# --- numbers --------------------------------------------------------------------------------------

POSITIVE_FIELDS = [
    "rate_limit",
    "interactive_deadline",
    "request_timeout",
    "lease_seconds",
    "retry_initial_delay",
    "retry_max_delay",
    "breaker_cooldown",
    "busy_timeout",
    "shutdown_timeout",
]


@pytest.mark.parametrize("field", POSITIVE_FIELDS)
@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.nan])
def test_positive_fields_reject_zero_negative_and_nan(field: str, value: float) -> None:
    """Rates, timeouts and delays must be greater than 0; the message names the field."""
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


def test_rate_limit_must_be_finite() -> None:
    """An infinite rate limit is refused when the config is built.

    Otherwise it passes validation and `EngageSession(config)` later fails with an
    OverflowError from the rate limiter (``math.floor(inf)``).
    """
    with pytest.raises(ValueError, match="rate_limit"):
        make(rate_limit=math.inf)


def test_identity_ttl_may_be_zero_but_not_negative() -> None:
    """identity_ttl 0 turns the cache off; a negative one is refused."""
    assert 0.0 == make(identity_ttl=0.0).identity_ttl
    with pytest.raises(ValueError, match="identity_ttl"):
        make(identity_ttl=-1.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("api_version", 1),
        ("api_version", 4),
        ("fallback_mode", "ftp"),
        ("durability", "off"),
        ("retry_attempts", 0),
        ("breaker_threshold", 0),
        ("bulk_max_items", 0),
        ("bulk_max_items", 4001),
        ("bulk_threshold", -1),
        ("custom_key_attribute", "email"),
        ("default_contact_type", ""),
        ("max_answer_bytes", 65535),
        ("max_answer_bytes", 1.5e7),
    ],
)
def test_enumerated_and_bounded_fields_rejected(field: str, value: object) -> None:
    """Values outside a field's allowed set or bounds are refused."""
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


def test_max_answer_bytes_default_and_smallest() -> None:
    """Answers are read up to 8 MiB by default; 64 KiB is the smallest limit accepted."""
    assert (8 * 1024 * 1024, 65536) == (
        make().max_answer_bytes,
        make(max_answer_bytes=65536).max_answer_bytes,
    )


def test_bulk_max_items_upper_bound_is_engages() -> None:
    """4000, Engage's limit for one bulk request, is the largest accepted batch."""
    assert 4000 == make(bulk_max_items=4000).bulk_max_items


# --- paths ----------------------------------------------------------------------------------------


def test_paths_are_converted(tmp_path: Path) -> None:
    """outbox_path and xml_dir given as str become Path."""
    config = make(outbox_path=str(tmp_path / "o.db"), xml_dir=str(tmp_path / "x"))

    assert (tmp_path / "o.db", tmp_path / "x") == (config.outbox_path, config.xml_dir)


@pytest.mark.parametrize("field", ["outbox_path", "xml_dir"])
def test_empty_paths_rejected(field: str) -> None:
    """An empty path is refused (Path("") would silently mean the current directory)."""
    with pytest.raises(ValueError, match=field):
        make(**{field: " "})


# --- retry schedule and contact keys --------------------------------------------------------------


def test_background_delays_become_a_tuple() -> None:
    """background_delays given as a list is stored as a tuple."""
    assert (1.0, 2.0) == make(background_delays=[1.0, 2.0]).background_delays


@pytest.mark.parametrize("delays", [(), (10.0, 0.0), (-1.0,)])
def test_background_delays_rejected(delays: tuple[float, ...]) -> None:
    """The background schedule needs at least one delay, all greater than 0."""
    with pytest.raises(ValueError, match="background_delays"):
        make(background_delays=delays)


def test_contact_keys_validated() -> None:
    """A contact type's key must be one of Engage's key attributes; the type is named."""
    with pytest.raises(ValueError, match=r"contact_keys\['Member'\]"):
        make(contact_keys={"Member": "firstName"})


def test_key_attribute_for_is_case_insensitive() -> None:
    """key_attribute_for finds the configured key whatever the case of the type's name."""
    config = make(contact_keys={"Member": "email", "Contact": "mobilePhone"})

    assert ("email", "mobilePhone", None) == (
        config.key_attribute_for("member"),
        config.key_attribute_for("CONTACT"),
        config.key_attribute_for("Ecom"),
    )


def test_contact_keys_are_copied() -> None:
    """Changing the mapping passed in does not change the config."""
    given = {"Member": "email"}
    config = make(contact_keys=given)

    given["Member"] = "mobilePhone"

    assert "email" == config.key_attribute_for("Member")


def test_contact_keys_cannot_be_mutated() -> None:
    """A frozen config's contact_keys is read-only: no bypassing the validator afterwards."""
    config = make(contact_keys={"Member": "email"})

    with pytest.raises(TypeError):
        config.contact_keys["Member"] = "firstName"  # type: ignore[index]

    assert "email" == config.key_attribute_for("Member")


def test_config_is_hashable() -> None:
    """A frozen config hashes, equal configs alike (contact_keys must not be a plain dict)."""
    assert hash(make(contact_keys={"Member": "email"})) == hash(
        make(contact_keys={"Member": "email"})
    )


def test_contact_keys_differing_only_in_case_rejected() -> None:
    """Two entries for one contact type (matched regardless of case) are ambiguous: refused."""
    with pytest.raises(ValueError, match=r"^contact_keys: .*'member'"):
        make(contact_keys={"Member": "email", "member": "mobilePhone"})


def test_api_version_must_be_a_whole_number() -> None:
    """3.0 equals 3 but would make the path /api/v3.0: refused."""
    with pytest.raises(ValueError, match=r"^api_version: "):
        make(api_version=3.0)


# --- every field: wrong types -----------------------------------------------------------------

NOT_TEXT: list[object] = [None, 42, True, b"bytes", ["text"], {"a": "b"}]
FLOAT_FIELDS = [
    *POSITIVE_FIELDS,
    "identity_ttl",
    "batch_poll_initial",
    "batch_poll_max",
    "batch_timeout",
    "poll_interval",
    "keep_done",
]
BAD_FLOATS: list[object] = [None, "1.5", True, False, math.nan, math.inf, -math.inf, [1.0], 1j]
INT_FIELDS = [
    "retry_attempts",
    "breaker_threshold",
    "bulk_threshold",
    "bulk_max_items",
    "max_attempts",
    "reconcile_max_lookups",
    "max_answer_bytes",
    "sftp_port",
]
BAD_INTS: list[object] = [None, "3", True, 3.0, math.nan, math.inf, [3]]
BAD_PATHS: list[object] = [None, 42, True, b"outbox.sqlite3", ["outbox"], "out\x00box"]
BAD_CHOICES: list[object] = [None, True, ["x"], {"x": 1}, b"bulk"]
WRONG: dict[str, list[object]] = {
    "base_url": NOT_TEXT,
    "api_key": NOT_TEXT,
    "user_agent": NOT_TEXT,
    "outbox_path": BAD_PATHS,
    "xml_dir": BAD_PATHS,
    "api_version": [*BAD_CHOICES, "3", 3.0],
    "fallback_mode": BAD_CHOICES,
    "durability": BAD_CHOICES,
    "custom_key_attribute": BAD_CHOICES,
    "default_contact_type": [*NOT_TEXT, "Mem\x00ber", "Member\n"],
    "background_delays": [
        None,
        5,
        True,
        "10,soon",
        b"10",
        [True],
        ["10"],
        [None],
        [math.nan],
        [math.inf],
        {10.0: 1},
        {10.0},
    ],
    "contact_keys": [
        None,
        "Member=email",
        42,
        [("Member", "email")],
        {1: "email"},
        {"": "email"},
        {" ": "email"},
        {"Member": None},
        {"Member": ["email"]},
    ],
    **dict.fromkeys(FLOAT_FIELDS, BAD_FLOATS),
    **dict.fromkeys(INT_FIELDS, BAD_INTS),
    # Optional settings: None is their default, so only wrong types and text are wrong.
    "sftp_host": [42, True, b"host", ["host"], "", "two words"],
    "sftp_user": [42, True, b"user", ["user"], "", "a\x00b"],
    "sftp_key_path": [42, True, b"key", ["key"], "k\x00ey"],
    "sftp_known_hosts": [42, True, b"hosts", ["hosts"], "kn\x00own"],
    "sftp_dir": [None, 42, True, "", "a\x00b"],
    "avoid_triggering_export": [None, 0, 1, "true", "yes", [True]],
    "assume_default_contact_type": [None, 0, 1, "true", [True]],
    # The outbox backend (None is its default: the file at outbox_path).
    "outbox_url": [
        42,
        True,
        b"sqlite:///x",
        "",
        "outbox.sqlite3",
        "mysql://host/db",
        "sqlite://relative",
        "postgresql://host:99999/db",
        "postgresql://host/",
        "postgresql://host/db\n",
    ],
    "outbox_schema": [None, 42, "", "Engage", "1st", "my-outbox", "a" * 49, "s.t"],
    "outbox_pool_size": [*BAD_INTS, 0, 101],
    "outbox_timeout": [0, -1.0, math.nan, math.inf, "1", True, [1.0]],
}


def leaks(exc: BaseException, *secrets: str) -> list[str]:
    """The `secrets` found in the exception: its message, repr, args, chain or traceback."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return [secret for secret in secrets if any(secret in text for text in texts)]


def test_every_field_has_wrong_values_to_try() -> None:
    """Each field of EngageConfig is in WRONG, so the tests below cover every validator.

    A new field needs a row there: its validator must name it for wrong types too.
    """
    assert sorted(field.name for field in attrs.fields(EngageConfig)) == sorted(WRONG)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param(field, value, id=f"{field}-{value!r}")
        for field, values in WRONG.items()
        for value in values
    ],
)
def test_wrong_values_raise_value_error_naming_the_field(field: str, value: object) -> None:
    """A value of the wrong type or out of range, for any field, is a ValueError whose
    message starts with the field's name, and holds neither the API key nor the value's text.
    """
    with pytest.raises(ValueError, match=rf"^{field}(: |\[)") as info:
        make(**{field: value})

    assert [] == leaks(info.value, API_KEY)


def test_non_ascii_names_and_paths_accepted(tmp_path: Path) -> None:
    """The control-character checks leave other languages' letters and spaces alone."""
    config = make(
        outbox_path=tmp_path / "utgående kö.sqlite3",
        xml_dir=tmp_path / "filer för import",
        default_contact_type="Medlem",
        contact_keys={"Kund": "email"},
    )

    assert (tmp_path / "utgående kö.sqlite3", "email") == (
        config.outbox_path,
        config.key_attribute_for("kund"),
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENGAGE_BASE_URL", "https://tenant.voyado.com:99999"),
        ("ENGAGE_OUTBOX", "outbox\x01.sqlite3"),
        ("ENGAGE_CONTACT_KEYS", "Member=email,member=mobilePhone"),
        ("ENGAGE_DEFAULT_CONTACT_TYPE", "Mem\x7fber"),
    ],
)
def test_from_env_new_checks_name_the_variable(variable: str, value: str) -> None:
    """The checks added for wrong values report the environment variable, as from_env does
    for the others.
    """
    with pytest.raises(ValueError, match=f"^{variable} ") as info:
        EngageConfig.from_env({**ENV, variable: value})

    assert [] == leaks(info.value, API_KEY)


def test_config_repr_and_str_hold_no_secrets() -> None:
    """Neither repr nor str of a config holds the API key, whatever else is set."""
    config = make(base_url="https://tenant.voyado.com:8443", contact_keys={"Member": "email"})

    assert [] == [secret for secret in (API_KEY,) if secret in repr(config) + str(config)]


# --- from_env -------------------------------------------------------------------------------------


def test_from_env_reads_every_variable(tmp_path: Path) -> None:
    """Each ENGAGE_* variable sets its field, parsed to the field's type."""
    environ = {
        **ENV,
        "ENGAGE_OUTBOX": str(tmp_path / "o.sqlite3"),
        "ENGAGE_API_VERSION": "2",
        "ENGAGE_RATE_LIMIT": "12.5",
        "ENGAGE_INTERACTIVE_DEADLINE": "2",
        "ENGAGE_REQUEST_TIMEOUT": "90",
        "ENGAGE_FALLBACK_MODE": "xml",
        "ENGAGE_XML_DIR": str(tmp_path / "xml"),
        "ENGAGE_LEASE_SECONDS": "45",
        "ENGAGE_DURABILITY": "normal",
        "ENGAGE_RETRY_ATTEMPTS": "5",
        "ENGAGE_RETRY_INITIAL_DELAY": "0.2",
        "ENGAGE_RETRY_MAX_DELAY": "2",
        "ENGAGE_BACKGROUND_DELAYS": "5, 10,,20",
        "ENGAGE_BREAKER_THRESHOLD": "7",
        "ENGAGE_BREAKER_COOLDOWN": "12",
        "ENGAGE_IDENTITY_TTL": "0",
        "ENGAGE_DEFAULT_CONTACT_TYPE": "Contact",
        "ENGAGE_CONTACT_KEYS": "Member=email, Contact = mobilePhone",
        "ENGAGE_CUSTOM_KEY_ATTRIBUTE": "memberNumber",
        "ENGAGE_BULK_THRESHOLD": "0",
        "ENGAGE_BULK_MAX_ITEMS": "1000",
        "ENGAGE_BUSY_TIMEOUT": "3",
        "ENGAGE_MAX_ANSWER_BYTES": "1048576",
    }

    config = EngageConfig.from_env(environ)

    assert (
        make(
            outbox_path=tmp_path / "o.sqlite3",
            api_version=2,
            rate_limit=12.5,
            interactive_deadline=2.0,
            request_timeout=90.0,
            fallback_mode="xml",
            xml_dir=tmp_path / "xml",
            lease_seconds=45.0,
            durability="normal",
            retry_attempts=5,
            retry_initial_delay=0.2,
            retry_max_delay=2.0,
            background_delays=(5.0, 10.0, 20.0),
            breaker_threshold=7,
            breaker_cooldown=12.0,
            identity_ttl=0.0,
            default_contact_type="Contact",
            contact_keys={"Member": "email", "Contact": "mobilePhone"},
            custom_key_attribute="memberNumber",
            bulk_threshold=0,
            bulk_max_items=1000,
            busy_timeout=3.0,
            max_answer_bytes=1048576,
        )
        == config
    )


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a mapping, from_env reads the process environment."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ENGAGE_RATE_LIMIT", "7")

    assert make(rate_limit=7.0) == EngageConfig.from_env()


def test_from_env_empty_variable_means_unset() -> None:
    """An empty variable is ignored, so the default applies."""
    assert make() == EngageConfig.from_env({**ENV, "ENGAGE_RATE_LIMIT": "", "ENGAGE_OUTBOX": ""})


def test_from_env_overrides_win_and_skip_parsing() -> None:
    """A keyword override replaces the variable, even a malformed one, which is not parsed."""
    config = EngageConfig.from_env(
        {**ENV, "ENGAGE_RATE_LIMIT": "fast", "ENGAGE_API_KEY": "other"}, rate_limit=3.0
    )

    assert (3.0, "other") == (config.rate_limit, config.api_key)


@pytest.mark.parametrize("variable", list(ENV))
def test_from_env_missing_required_names_the_variable(variable: str) -> None:
    """A missing required variable is reported by its environment name."""
    environ = {k: v for k, v in ENV.items() if k != variable}

    with pytest.raises(ValueError, match=f"^{variable}: must be set$"):
        EngageConfig.from_env(environ)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("ENGAGE_RATE_LIMIT", "fast", "must be a number"),
        ("ENGAGE_API_VERSION", "v3", "must be a whole number"),
        ("ENGAGE_RETRY_ATTEMPTS", "2.5", "must be a whole number"),
        ("ENGAGE_BACKGROUND_DELAYS", "10,soon", "must be a number"),
        ("ENGAGE_CONTACT_KEYS", "Member:email", "Member=email"),
    ],
)
def test_from_env_unparseable_names_the_variable(variable: str, value: str, reason: str) -> None:
    """A variable that cannot be parsed is reported by name, with what was expected."""
    with pytest.raises(ValueError, match=f"^{variable}: .*{reason}"):
        EngageConfig.from_env({**ENV, variable: value})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENGAGE_BASE_URL", "http://tenant.voyado.com"),
        ("ENGAGE_RATE_LIMIT", "0"),
        ("ENGAGE_CONTACT_KEYS", "Member=firstName"),
        ("ENGAGE_OUTBOX", " "),
    ],
)
def test_from_env_invalid_value_names_the_variable(variable: str, value: str) -> None:
    """A parsed but invalid value is reported under the variable the user set."""
    with pytest.raises(ValueError, match=f"^{variable} "):
        EngageConfig.from_env({**ENV, variable: value})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENGAGE_API_VERSION", "4"),
        ("ENGAGE_DURABILITY", "fast"),
        ("ENGAGE_FALLBACK_MODE", "ftp"),
        ("ENGAGE_RETRY_ATTEMPTS", "0"),
        ("ENGAGE_BULK_MAX_ITEMS", "5000"),
    ],
)
def test_from_env_choice_and_bound_errors_name_the_variable(variable: str, value: str) -> None:
    """Values refused by attrs' own validators (in_, ge, le) also name the variable.

    from_env promises that "the message names the variable"; it finds the field by the text
    before the first colon, which attrs' messages do not put there.
    """
    with pytest.raises(ValueError, match=f"^{variable}"):
        EngageConfig.from_env({**ENV, variable: value})


def test_from_env_never_prints_the_api_key() -> None:
    """A malformed API key is reported by variable name, never by its value."""
    with pytest.raises(ValueError, match="ENGAGE_API_KEY") as info:
        EngageConfig.from_env({**ENV, "ENGAGE_API_KEY": "top secret"})

    assert "top secret" not in str(info.value)


def test_from_env_invalid_override_is_reported_by_field() -> None:
    """An invalid keyword override is the caller's code, so it is named by field, not variable."""
    with pytest.raises(ValueError, match=r"^rate_limit: "):
        EngageConfig.from_env(ENV, rate_limit=0.0)
