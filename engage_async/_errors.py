"""The exceptions engage-async raises.

Everything the library raises on purpose derives from `EngageError`. "Nothing came back"
(transport) and "Engage answered no" (status) are separate branches, so a caller can tell a
rejected request from an unreachable server::

    EngageError
    ├── EngageUnavailable            no usable answer: network error, timeout, 5xx, open circuit
    │   ├── EngageConnectionError    the connection failed (refused, reset, DNS, TLS, lost reply)
    │   ├── EngageTimeout            no answer within the time allowed
    │   └── CircuitOpen              recent failures: the network was not even tried
    ├── EngageHTTPError              Engage answered with an error status
    │   ├── InvalidRequest           400
    │   ├── EngageAuthError          401, 403: configuration, never queued
    │   ├── ContactNotFound          404
    │   ├── EngageConflict           409
    │   │   └── MultipleMatches      409 MultipleMatches (.contact_ids)
    │   ├── EngageValidationError    422
    │   ├── RateLimited              429
    │   └── EngageServerError        5xx (also an EngageUnavailable)
    ├── UnexpectedResponse           Engage answered 2xx with a body that could not be read
    ├── PayloadError                 bad input, caught before anything is sent (a ValueError)
    │   └── EmptyValueError          a None or "" that would wipe data on Engage
    ├── OutboxError                  the outbox could not be written: nothing was kept
    └── ChangeNotFound               no such outbox change (a LookupError)

Messages name the call and the error code (``POST /api/v3/contacts -> 422 ValidationError``),
never the API key or personal data: query strings are left out, and text taken from Engage is
truncated and scrubbed of emails, phone and personal numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ChangeNotFound",
    "CircuitOpen",
    "ContactNotFound",
    "EmptyValueError",
    "EngageAuthError",
    "EngageConflict",
    "EngageConnectionError",
    "EngageError",
    "EngageHTTPError",
    "EngageServerError",
    "EngageTimeout",
    "EngageUnavailable",
    "EngageValidationError",
    "InvalidRequest",
    "MultipleMatches",
    "OutboxError",
    "PayloadError",
    "RateLimited",
    "UnexpectedResponse",
]


class EngageError(Exception):
    """Base class of every exception engage-async raises on purpose."""


class EngageUnavailable(EngageError):
    """Engage gave no usable answer: network error, timeout, 5xx, or an open circuit.

    Writes that fail this way are queued in the outbox; reads raise it. `request_sent` is
    False only when the request cannot have reached Engage (the connection was never made,
    the circuit was open, the client-side rate limit held it back), which makes a create
    safe to send again.
    """

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.request_sent = request_sent

    def __reduce__(self) -> Any:
        # Keyword-only arguments defeat Exception's default pickling; rebuild from state.
        return _rebuild, (type(self), self.args, self.__dict__)


class EngageConnectionError(EngageUnavailable):
    """The connection failed: refused, reset, DNS, TLS, or dropped before the answer."""


class EngageTimeout(EngageUnavailable):
    """No answer came within the time allowed; unless `request_sent` is False, the request
    may have been applied.
    """


class CircuitOpen(EngageUnavailable):
    """Recent calls failed in a row, so this one did not touch the network."""

    def __init__(self, message: str) -> None:
        super().__init__(message, request_sent=False)


class EngageHTTPError(EngageError):
    """Engage answered with an error status.

    Attributes:
        status: the HTTP status.
        error_code: Engage's error name (``"ContactNotFound"``), or None if the body had none.
        message: Engage's human-readable text, if any (may contain personal data: it is kept
            on the attribute but never put in ``str(exc)`` unscrubbed).
        details: ``messageDetails`` from the body, as a dict (empty if absent).
        body: the raw body text, truncated.
        method, path: the call that failed (no query string).
    """

    def __init__(
        self,
        summary: str,
        *,
        status: int,
        error_code: str | None = None,
        message: str | None = None,
        details: Mapping[str, Any] | None = None,
        body: str = "",
        method: str = "",
        path: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(summary)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.body = body
        self.method = method
        self.path = path
        self.retry_after = retry_after

    def __reduce__(self) -> Any:
        # Keyword-only arguments defeat Exception's default pickling; rebuild from state.
        return _rebuild, (type(self), self.args, self.__dict__)


class InvalidRequest(EngageHTTPError):
    """400: Engage found the request malformed (for example ``InvalidEmailAddress``)."""


class EngageAuthError(EngageHTTPError):
    """401 or 403: the API key is wrong or lacks access; a configuration problem."""


class ContactNotFound(EngageHTTPError):
    """404: no such contact."""


class EngageConflict(EngageHTTPError):
    """409: the request conflicts with Engage's state."""


class MultipleMatches(EngageConflict):
    """409 ``MultipleMatches``: several contacts match; `contact_ids` lists them."""

    def __init__(self, summary: str, *, contact_ids: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(summary, **kwargs)
        self.contact_ids = tuple(contact_ids)


class EngageValidationError(EngageHTTPError):
    """422: Engage rejected the data (``ValidationError``); never queued."""


class RateLimited(EngageHTTPError):
    """429: too many requests; `retry_after` holds Engage's hint in seconds, if it gave one."""


class EngageServerError(EngageHTTPError, EngageUnavailable):
    """5xx: Engage (or a proxy in front of it) failed; the request may have been applied."""


class UnexpectedResponse(EngageError):
    """Engage answered 2xx with a body engage-async could not read."""


class PayloadError(EngageError, ValueError):
    """A payload was rejected before anything was sent or queued.

    `field` names where the problem is (``"consents[1].value"``); the value itself is never
    repeated, since it may be personal data.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self) -> Any:
        return _rebuild, (type(self), self.args, self.__dict__)


class EmptyValueError(PayloadError):
    """A None or "" value would overwrite data on Engage; send `CLEAR` to clear on purpose."""


class OutboxError(EngageError):
    """The outbox could not be written, so nothing was kept; the cause is chained."""


class ChangeNotFound(EngageError, LookupError):
    """No outbox change has that id."""


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """Unpickle an exception without calling its __init__."""
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc
