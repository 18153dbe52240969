"""`EngageConfig`: everything a session, flusher or admin needs to know, validated up front."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal
from urllib.parse import SplitResult, urlsplit

import attrs

__all__ = ["EngageConfig", "sqlite_path_of", "url_without_password"]

KEY_ATTRIBUTES = ("email", "mobilePhone", "socialSecurityNumber", "externalId", "memberNumber")
# "System/version", printable: a control character would corrupt the header.
_USER_AGENT = re.compile(
    r"[^/\s\x00-\x1f\x7f][^/\x00-\x1f\x7f]*/[^\s\x00-\x1f\x7f]+[^\x00-\x1f\x7f]*"
)

_MAX_PORT = 65535
# Every validator's message starts with "<field>: " so that from_env can name the variable.
_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port(parts: SplitResult) -> int | None:
    """The URL's port, or -1 when it is malformed (urlsplit raises only on access)."""
    try:
        return parts.port
    except ValueError:
        return -1


def _check_base_url(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    # urlsplit silently drops tabs and newlines, so the URL checked would not be the URL kept.
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{attribute.name}: must not contain whitespace or control characters")
    try:
        parts: SplitResult | None = urlsplit(value)
    except ValueError:
        parts = None  # a malformed IPv6 host; raised below, outside this handler's context
    if parts is None or parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{attribute.name}: must be an absolute http(s) URL")
    if "@" in parts.netloc:
        # Never repeated: user info is a credential. Engage takes the API key as a header.
        raise ValueError(
            f"{attribute.name}: must not contain user info (user:password@); "
            "the API key goes in api_key"
        )
    port = _port(parts)
    if (port is not None and not 0 < port <= _MAX_PORT) or parts.netloc.endswith(":"):
        raise ValueError(f"{attribute.name}: the port must be a number from 1 to {_MAX_PORT}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"{attribute.name}: must use https unless the host is loopback")
    if parts.path not in {"", "/"}:
        raise ValueError(f"{attribute.name}: must be the tenant's address only (no path)")
    if parts.query or parts.fragment:
        raise ValueError(f"{attribute.name}: must not have a query or fragment")


def _check_api_key(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not _str(attribute.name, value).strip():
        raise ValueError(f"{attribute.name}: must not be empty")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{attribute.name}: must not contain whitespace or control characters")


def _check_user_agent(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not _USER_AGENT.fullmatch(_str(attribute.name, value)):
        raise ValueError(f'{attribute.name}: must look like "System/version", e.g. "AcmePOS/1.5"')


def _number(attribute: attrs.Attribute[Any], value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{attribute.name}: must be a finite number")
    return float(value)


def _optional_positive(
    _: Any, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None and not _number(attribute, value) > 0:
        raise ValueError(f"{attribute.name}: must be greater than 0, or None")


def _boolean(_: Any, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name}: must be True or False")


def _positive(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if not _number(attribute, value) > 0:
        raise ValueError(f"{attribute.name}: must be greater than 0")


def _not_negative(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if _number(attribute, value) < 0:
        raise ValueError(f"{attribute.name}: must not be negative")


def _whole(low: int, high: int | None = None) -> _Validator:
    def check(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{attribute.name}: must be a whole number")
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"from {low} to {high}"
            raise ValueError(f"{attribute.name}: must be {bounds}")

    return check


def _one_of(*choices: object) -> _Validator:
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        # By type too: 3.0 == 3 and True == 1, but "/api/v3.0" is no path Engage knows.
        if isinstance(value, bool) or not any(
            isinstance(value, type(choice)) and value == choice for choice in choices
        ):
            listed = ", ".join(repr(choice) for choice in choices)
            raise ValueError(f"{attribute.name}: must be one of {listed}")

    return check


def _str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: must be a str, not {type(value).__name__}")
    return value


def _has_control_characters(text: str) -> bool:
    return any(c < " " or c == "\x7f" for c in text)


def _check_name(name: str, given: object) -> None:
    value = _str(name, given)
    if not value.strip():
        raise ValueError(f"{name}: must not be empty")
    # A contact type goes into query strings and XML element names; a stray "\r" from an env
    # file edited on Windows would make it another type.
    if value != value.strip() or _has_control_characters(value):
        raise ValueError(f"{name}: must not have control characters or surrounding spaces")


def _name(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    _check_name(attribute.name, value)


def _delays(
    _: Any, attribute: attrs.Attribute[tuple[float, ...]], value: tuple[float, ...]
) -> None:
    if not value or any(not math.isfinite(d) or not d > 0 for d in value):
        raise ValueError(f"{attribute.name}: must be one or more delays greater than 0")


def _contact_keys(_: Any, attribute: attrs.Attribute[Mapping[str, str]], value: Any) -> None:
    seen: set[str] = set()
    for contact_type, key in value.items():
        _check_name(f"{attribute.name}[{contact_type!r}]", contact_type)
        if contact_type.lower() in seen:
            # key_attribute_for matches without regard to case: one of them would be ignored.
            raise ValueError(
                f"{attribute.name}: {contact_type.lower()!r} is given twice (in any letter case)"
            )
        seen.add(contact_type.lower())
        if key not in KEY_ATTRIBUTES:
            raise ValueError(
                f"{attribute.name}[{contact_type!r}]: must be one of {', '.join(KEY_ATTRIBUTES)}"
            )


def _delay_tuple(value: Iterable[float] | str) -> tuple[float, ...]:
    if isinstance(value, str):
        try:
            return _parse_delays(value)
        except ValueError:
            pass
    elif isinstance(value, Iterable) and not isinstance(value, bytes | Mapping | AbstractSet):
        delays = tuple(value)
        if all(isinstance(d, int | float) and not isinstance(d, bool) for d in delays):
            return tuple(float(delay) for delay in delays)
    # A mapping or a set would give keys or no order; bytes would give character codes.
    raise ValueError("background_delays: must be a sequence of numbers of seconds")


def _strip_slash(value: str) -> str:
    return _str("base_url", value).rstrip("/")


def _path(value: str | os.PathLike[str], name: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not isinstance(os.fspath(value), str):
        raise ValueError(f"{name}: must be a str or a path, not {type(value).__name__}")
    text = os.fspath(value)
    if not text.strip():
        raise ValueError(f"{name}: must not be empty")
    # NUL cannot be in a path at all; the others are a stray "\r" from an env file, or worse.
    if _has_control_characters(text):
        raise ValueError(f"{name}: must not contain control characters")
    return Path(text)


def _outbox_path(value: str | os.PathLike[str]) -> Path:
    return _path(value, "outbox_path")


# --- the outbox's URL (engage_async/_outboxes.py opens it) -----------------------------------

OUTBOX_SCHEMES: Final = ("sqlite", "postgresql", "postgres")
# A schema name goes into SQL and into the NOTIFY channel ("<schema>_changes", at most 63
# bytes), unquoted: lower-case letters, digits and underscores only.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")


def url_without_password(url: str) -> str:
    """`url` with the password (if any) replaced by ``***``, for reprs, logs and messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<malformed URL>"
    if not password:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return parts._replace(netloc=f"{name}:***@{host}").geturl()


def _outbox_url(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"outbox_url: must be a str, not {type(value).__name__}")
    if not value.strip():
        raise ValueError("outbox_url: must not be empty")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("outbox_url: must not contain whitespace or control characters")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in OUTBOX_SCHEMES:
        raise ValueError(
            "outbox_url: must start with sqlite:/// (a file) or postgresql:// (a server)"
        )
    if scheme.lower() == "sqlite":
        # sqlite:///relative/path, sqlite:////absolute/path (SQLAlchemy's spelling)
        if not rest.startswith("/") or not rest[1:]:
            raise ValueError("outbox_url: a SQLite URL is sqlite:///path/to/outbox.sqlite3")
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError("outbox_url: not a valid postgresql:// URL (check the port)") from None
    if not parts.path.strip("/"):
        raise ValueError("outbox_url: name the database, e.g. postgresql://user@host:5432/engage")
    return value


def sqlite_path_of(url: str) -> Path | None:
    """The file a ``sqlite:///`` URL names, or None for a PostgreSQL URL."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "sqlite":
        return None
    return _path(urllib.parse.unquote(rest[1:]), "outbox_url")


def _outbox_schema(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not _SCHEMA_NAME.fullmatch(value):
        raise ValueError(
            f"{attribute.name}: must be 1 to 48 lower-case letters, digits or underscores, "
            "not starting with a digit"
        )


def _xml_dir(value: str | os.PathLike[str]) -> Path:
    return _path(value, "xml_dir")


def _sftp_key_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else _path(value, "sftp_key_path")


def _sftp_known_hosts(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else _path(value, "sftp_known_hosts")


def _optional_name(_: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{attribute.name}: must not be empty")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{attribute.name}: must not contain whitespace or control characters")


def _remote_dir(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{attribute.name}: must not be empty")
    if any(not c.isprintable() for c in value):
        raise ValueError(f"{attribute.name}: must not contain control characters")


def _mapping(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(
            "contact_keys: must be a mapping of contact type to key attribute, "
            f"not {type(value).__name__}"
        )
    return value


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    # Read-only, so no one can slip an unchecked key type in after validation.
    return MappingProxyType(dict(_mapping(value)))


@attrs.frozen(kw_only=True)
class EngageConfig:
    """How to reach Engage and how to behave when it cannot be reached.

    Construct it directly or with `from_env`. Every field is validated here, so a bad value
    fails at start-up with the field's name rather than at the first request. The API key
    never appears in the repr.

    """

    base_url: str = attrs.field(converter=_strip_slash, validator=_check_base_url)
    api_key: str = attrs.field(repr=False, validator=_check_api_key)
    user_agent: str = attrs.field(validator=_check_user_agent)
    outbox_path: Path = attrs.field(default=Path("engage-outbox.sqlite3"), converter=_outbox_path)
    api_version: Literal[2, 3] = attrs.field(default=3, validator=_one_of(2, 3))
    rate_limit: float = attrs.field(default=40.0, validator=_positive)
    interactive_deadline: float = attrs.field(default=3.0, validator=_positive)
    request_timeout: float = attrs.field(default=30.0, validator=_positive)
    fallback_mode: Literal["bulk", "xml"] = attrs.field(
        default="bulk", validator=_one_of("bulk", "xml")
    )
    xml_dir: Path = attrs.field(default=Path("engage-xml"), converter=_xml_dir)
    lease_seconds: float = attrs.field(default=30.0, validator=_positive)
    durability: Literal["full", "normal"] = attrs.field(
        default="full", validator=_one_of("full", "normal")
    )
    # Beyond the contract's table: retry policy, breaker, identity map, flusher tuning.
    retry_attempts: int = attrs.field(default=3, validator=_whole(1))
    retry_initial_delay: float = attrs.field(default=0.1, validator=_positive)
    retry_max_delay: float = attrs.field(default=1.0, validator=_positive)
    background_delays: tuple[float, ...] = attrs.field(
        default=(10.0, 30.0, 60.0, 300.0, 900.0), converter=_delay_tuple, validator=_delays
    )
    breaker_threshold: int = attrs.field(default=5, validator=_whole(1))
    breaker_cooldown: float = attrs.field(default=30.0, validator=_positive)
    identity_ttl: float = attrs.field(default=3600.0, validator=_not_negative)
    default_contact_type: str = attrs.field(default="Member", validator=_name)
    # For tenants with one contact type: the outbox then needs no read to know a contact's
    # type, and replayed updates go in bulk under it.
    assume_default_contact_type: bool = attrs.field(default=False, validator=_boolean)
    contact_keys: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_mapping, validator=_contact_keys, hash=False
    )
    custom_key_attribute: Literal["externalId", "memberNumber"] = attrs.field(
        default="externalId", validator=_one_of("externalId", "memberNumber")
    )
    bulk_threshold: int = attrs.field(default=20, validator=_whole(0))
    bulk_max_items: int = attrs.field(default=4000, validator=_whole(1, 4000))
    busy_timeout: float = attrs.field(default=10.0, validator=_positive)
    max_attempts: int = attrs.field(default=8, validator=_whole(1))
    batch_poll_initial: float = attrs.field(default=2.0, validator=_positive)
    batch_poll_max: float = attrs.field(default=60.0, validator=_positive)
    batch_timeout: float = attrs.field(default=6 * 3600.0, validator=_positive)
    reconcile_max_lookups: int = attrs.field(default=12, validator=_whole(1))
    poll_interval: float = attrs.field(default=1.0, validator=_positive)
    keep_done: float = attrs.field(default=7 * 86400.0, validator=_not_negative)
    shutdown_timeout: float = attrs.field(default=5.0, validator=_positive)
    avoid_triggering_export: bool = attrs.field(default=False, validator=_boolean)
    # Engage's largest answers (a bulk status listing failures of 4000 items, a page of 100
    # transactions with their lines) are a few MB at most; more is not an answer from Engage.
    max_answer_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=_whole(64 * 1024))
    # The outbox backend: None is the SQLite file at outbox_path; sqlite:///path names another
    # file (outbox_path follows it); postgresql://user@host:port/db a shared server.
    outbox_url: str | None = attrs.field(
        default=None,
        converter=_outbox_url,
        repr=lambda url: repr(None if url is None else url_without_password(url)),
    )
    outbox_schema: str = attrs.field(default="engage_outbox", validator=_outbox_schema)
    outbox_pool_size: int = attrs.field(default=10, validator=_whole(1, 100))
    # How long a session waits for a PostgreSQL outbox; None: the share of the interactive
    # deadline the session keeps for the outbox (a tenth, at least 0.2 s).
    outbox_timeout: float | None = attrs.field(default=None, validator=_optional_positive)
    # Uploading XML files to Engage's SFTP server: off unless sftp_host is set.
    sftp_host: str | None = attrs.field(default=None, validator=_optional_name)
    sftp_port: int = attrs.field(default=22, validator=_whole(1, 65535))
    sftp_user: str | None = attrs.field(default=None, validator=_optional_name)
    sftp_key_path: Path | None = attrs.field(default=None, converter=_sftp_key_path)
    sftp_known_hosts: Path | None = attrs.field(default=None, converter=_sftp_known_hosts)
    # "." is the login directory, which is right whether or not the account is chrooted.
    sftp_dir: str = attrs.field(default=".", validator=_remote_dir)

    def __attrs_post_init__(self) -> None:
        if self.outbox_url is not None:
            path = sqlite_path_of(self.outbox_url)
            if path is not None:
                # One file, whichever field named it: budget and admin look at outbox_path.
                object.__setattr__(self, "outbox_path", path)
        for low, high in (
            ("retry_initial_delay", "retry_max_delay"),
            ("batch_poll_initial", "batch_poll_max"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low}: must not be greater than {high}")
        self._check_sftp()

    def _check_sftp(self) -> None:
        # All or nothing: half a configuration would silently leave files unsent.
        needed = ("sftp_user", "sftp_key_path", "sftp_known_hosts")
        if self.sftp_host is not None:
            for name in needed:
                if getattr(self, name) is None:
                    raise ValueError(f"{name}: must be set when sftp_host is set")
            return
        for name in (*needed, "sftp_port", "sftp_dir"):
            if getattr(self, name) != _SFTP_UNSET[name]:
                raise ValueError(f"sftp_host: must be set when {name} is set")

    @property
    def outbox_is_postgres(self) -> bool:
        """Whether the outbox is a PostgreSQL server (else the SQLite file `outbox_path`)."""
        return self.outbox_url is not None and sqlite_path_of(self.outbox_url) is None

    @property
    def outbox_location(self) -> str:
        """The outbox as a URL, without its password: ``sqlite:////abs/path`` (from
        `outbox_path` when `outbox_url` is not set) or ``postgresql://user:***@host/db``.
        """
        if self.outbox_is_postgres:
            assert self.outbox_url is not None
            return url_without_password(self.outbox_url)
        return f"sqlite:///{self.outbox_path.resolve()}"

    @property
    def sftp_enabled(self) -> bool:
        """Whether XML files are to be uploaded to Engage's SFTP server."""
        return self.sftp_host is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> EngageConfig:
        """Build a config from ``ENGAGE_*`` environment variables; `overrides` win.

        Raises:
            ValueError: a variable is missing or malformed; the message names the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (variable, parse) in _ENVIRONMENT.items():
            raw = env.get(variable)
            if raw is None or raw == "" or name in overrides:
                continue
            try:
                values[name] = parse(raw)
            except ValueError as exc:
                raise ValueError(f"{variable}: {exc}") from None
        values.update(overrides)
        for required in ("base_url", "api_key", "user_agent"):
            if required not in values:
                raise ValueError(f"{_ENVIRONMENT[required][0]}: must be set")
        try:
            return cls(**values)
        except ValueError as exc:
            # Point at the variable the user actually set, not only the field name.
            field = str(exc).partition(":")[0].partition("[")[0]
            if field in _ENVIRONMENT and field not in overrides:
                raise ValueError(f"{_ENVIRONMENT[field][0]} ({exc})") from None
            raise

    @property
    def api_root(self) -> str:
        """``/api/v3`` or ``/api/v2``: the path prefix of every call."""
        return f"/api/v{self.api_version}"

    def key_attribute_for(self, contact_type: str) -> str | None:
        """The key attribute configured for `contact_type`, or None to guess from the data."""
        for name, key in self.contact_keys.items():
            if name.lower() == contact_type.lower():
                return key
        return None


_SFTP_UNSET: dict[str, Any] = {
    "sftp_user": None,
    "sftp_key_path": None,
    "sftp_known_hosts": None,
    "sftp_port": 22,
    "sftp_dir": ".",
}


def _parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in {"1", "true", "yes", "on"}:
        return True
    if word in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _parse_number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("must be a number") from None


def _parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _parse_delays(raw: str) -> tuple[float, ...]:
    return tuple(_parse_number(part) for part in raw.split(",") if part.strip())


def _parse_contact_keys(raw: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        contact_type, sep, key = item.partition("=")
        if not sep or not contact_type.strip() or not key.strip():
            raise ValueError('must look like "Member=email,Contact=mobilePhone"')
        result[contact_type.strip()] = key.strip()
    return result


def _same(raw: str) -> str:
    return raw


_ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "base_url": ("ENGAGE_BASE_URL", _same),
    "api_key": ("ENGAGE_API_KEY", _same),
    "user_agent": ("ENGAGE_USER_AGENT", _same),
    "outbox_path": ("ENGAGE_OUTBOX", _same),
    "outbox_url": ("ENGAGE_OUTBOX_URL", _same),
    "outbox_schema": ("ENGAGE_OUTBOX_SCHEMA", _same),
    "outbox_pool_size": ("ENGAGE_OUTBOX_POOL_SIZE", _parse_int),
    "outbox_timeout": ("ENGAGE_OUTBOX_TIMEOUT", _parse_number),
    "api_version": ("ENGAGE_API_VERSION", _parse_int),
    "rate_limit": ("ENGAGE_RATE_LIMIT", _parse_number),
    "interactive_deadline": ("ENGAGE_INTERACTIVE_DEADLINE", _parse_number),
    "request_timeout": ("ENGAGE_REQUEST_TIMEOUT", _parse_number),
    "fallback_mode": ("ENGAGE_FALLBACK_MODE", _same),
    "xml_dir": ("ENGAGE_XML_DIR", _same),
    "lease_seconds": ("ENGAGE_LEASE_SECONDS", _parse_number),
    "durability": ("ENGAGE_DURABILITY", _same),
    "retry_attempts": ("ENGAGE_RETRY_ATTEMPTS", _parse_int),
    "retry_initial_delay": ("ENGAGE_RETRY_INITIAL_DELAY", _parse_number),
    "retry_max_delay": ("ENGAGE_RETRY_MAX_DELAY", _parse_number),
    "background_delays": ("ENGAGE_BACKGROUND_DELAYS", _parse_delays),
    "breaker_threshold": ("ENGAGE_BREAKER_THRESHOLD", _parse_int),
    "breaker_cooldown": ("ENGAGE_BREAKER_COOLDOWN", _parse_number),
    "identity_ttl": ("ENGAGE_IDENTITY_TTL", _parse_number),
    "default_contact_type": ("ENGAGE_DEFAULT_CONTACT_TYPE", _same),
    "assume_default_contact_type": ("ENGAGE_ASSUME_DEFAULT_CONTACT_TYPE", _parse_bool),
    "contact_keys": ("ENGAGE_CONTACT_KEYS", _parse_contact_keys),
    "custom_key_attribute": ("ENGAGE_CUSTOM_KEY_ATTRIBUTE", _same),
    "bulk_threshold": ("ENGAGE_BULK_THRESHOLD", _parse_int),
    "bulk_max_items": ("ENGAGE_BULK_MAX_ITEMS", _parse_int),
    "busy_timeout": ("ENGAGE_BUSY_TIMEOUT", _parse_number),
    "max_attempts": ("ENGAGE_MAX_ATTEMPTS", _parse_int),
    "batch_poll_initial": ("ENGAGE_BATCH_POLL_INITIAL", _parse_number),
    "batch_poll_max": ("ENGAGE_BATCH_POLL_MAX", _parse_number),
    "batch_timeout": ("ENGAGE_BATCH_TIMEOUT", _parse_number),
    "reconcile_max_lookups": ("ENGAGE_RECONCILE_MAX_LOOKUPS", _parse_int),
    "poll_interval": ("ENGAGE_POLL_INTERVAL", _parse_number),
    "keep_done": ("ENGAGE_KEEP_DONE", _parse_number),
    "shutdown_timeout": ("ENGAGE_SHUTDOWN_TIMEOUT", _parse_number),
    "avoid_triggering_export": ("ENGAGE_AVOID_TRIGGERING_EXPORT", _parse_bool),
    "max_answer_bytes": ("ENGAGE_MAX_ANSWER_BYTES", _parse_int),
    "sftp_host": ("ENGAGE_SFTP_HOST", _same),
    "sftp_port": ("ENGAGE_SFTP_PORT", _parse_int),
    "sftp_user": ("ENGAGE_SFTP_USER", _same),
    "sftp_key_path": ("ENGAGE_SFTP_KEY_PATH", _same),
    "sftp_known_hosts": ("ENGAGE_SFTP_KNOWN_HOSTS", _same),
    "sftp_dir": ("ENGAGE_SFTP_DIR", _same),
}
