"""Asyncio client for the Voyado Engage contacts API, with a durable outbox.

``import engage_async as ea``: open an `EngageSession` with an `EngageConfig`, await its
methods; writes Engage cannot take are kept in a SQLite outbox and replayed by an
`OutboxFlusher`. `engage_async.testing.FakeEngage` simulates Engage for tests.
"""

from importlib import import_module as _import_module
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from typing import Any as _Any

from ._config import EngageConfig
from ._errors import (
    ChangeNotFound,
    CircuitOpen,
    ContactNotFound,
    EmptyValueError,
    EngageAuthError,
    EngageConfigurationError,
    EngageConflict,
    EngageConnectionError,
    EngageError,
    EngageHTTPError,
    EngageServerError,
    EngageTimeout,
    EngageUnavailable,
    EngageValidationError,
    InvalidRequest,
    MultipleMatches,
    OutboxError,
    PayloadError,
    RateLimited,
    SftpError,
    SftpRefused,
    SftpUnavailable,
    UnexpectedResponse,
)
from ._flusher import OutboxFlusher
from ._models import (
    Consent,
    Contact,
    ContactAttributes,
    ContactOverview,
    Delivery,
    FlushReport,
    Meta,
    Money,
    PointAccount,
    Preferences,
    Promotion,
    RedemptionChannel,
    RewardVoucher,
    Store,
    Tiers,
    Transaction,
)
from ._session import EngageSession
from ._wire import CLEAR
from .admin import OutboxAdmin, OutboxEntry, OutboxStats, SalvageReport

try:
    __version__ = _version("engage-async")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"


def __getattr__(name: str) -> _Any:
    # `ea.testing.FakeEngage` after a plain `import engage_async as ea`, without loading the
    # simulator's server code into every application that never uses it.
    if name == "testing":
        return _import_module(".testing", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLEAR",
    "ChangeNotFound",
    "CircuitOpen",
    "Consent",
    "Contact",
    "ContactAttributes",
    "ContactNotFound",
    "ContactOverview",
    "Delivery",
    "EmptyValueError",
    "EngageAuthError",
    "EngageConfig",
    "EngageConfigurationError",
    "EngageConflict",
    "EngageConnectionError",
    "EngageError",
    "EngageHTTPError",
    "EngageServerError",
    "EngageSession",
    "EngageTimeout",
    "EngageUnavailable",
    "EngageValidationError",
    "FlushReport",
    "InvalidRequest",
    "Meta",
    "Money",
    "MultipleMatches",
    "OutboxAdmin",
    "OutboxEntry",
    "OutboxError",
    "OutboxFlusher",
    "OutboxStats",
    "PayloadError",
    "PointAccount",
    "Preferences",
    "Promotion",
    "RateLimited",
    "RedemptionChannel",
    "RewardVoucher",
    "SalvageReport",
    "SftpError",
    "SftpRefused",
    "SftpUnavailable",
    "Store",
    "Tiers",
    "Transaction",
    "UnexpectedResponse",
    "__version__",
]
