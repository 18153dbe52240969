"""The exceptions engage-async raises.

Everything the library raises on purpose derives from `EngageError`. "Nothing came back"
(transport) and "Engage answered no" (status) are separate branches, so a caller can tell a
rejected request from an unreachable server::

    EngageError
    ├── EngageUnavailable            no usable answer: the outcome of a write is unknown
    │   ├── EngageConnectionError    the connection failed (refused, reset, DNS, TLS, lost reply)
    │   ├── EngageTimeout            no answer within the time allowed
    │   ├── CircuitOpen              recent failures: the network was not even tried
    │   ├── UnexpectedResponse       an answer that is not Engage's: 1xx/3xx, an undocumented
    │   │                            4xx, a proxy's HTML page, a 2xx that cannot be read, an
    │   │                            answer over `max_answer_bytes` (.status)
    │   └── EngageServerError        5xx (also an EngageHTTPError)
    │       └── EngageConfigurationError  5xx InvalidSystemConfiguration: the tenant's setup
    ├── EngageHTTPError              Engage answered with an error status
    │   ├── InvalidRequest           400
    │   ├── EngageAuthError          401, 403: configuration, never queued
    │   ├── ContactNotFound          404
    │   ├── EngageConflict           409
    │   │   └── MultipleMatches      409 MultipleMatches (.contact_ids)
    │   ├── EngageValidationError    422
    │   ├── RateLimited              429
    │   └── EngageServerError        5xx (see above)
    ├── PayloadError                 bad input, caught before anything is sent (a ValueError)
    │   └── EmptyValueError          a None or "" that would wipe data on Engage
    ├── OutboxError                  the outbox could not be written: nothing was kept
    ├── SftpError                    uploading XML files failed; they stay in xml_dir
    │   ├── SftpUnavailable          the server could not be reached (retried, then raised)
    │   └── SftpRefused              host key, login or rights refused: configuration
    └── ChangeNotFound               no such outbox change (a LookupError)

Only Engage's documented verdicts are about the request itself (400, 404, 409, 422 with
Engage's JSON or plain-text body, not an HTML or XML page; 401 and 403; 429); anything else
on a write leaves its outcome unknown, so it is an `EngageUnavailable`: the session queues
the write (a create to be looked up first) and the flusher pauses and sends it again.
Redirects are never followed.

Messages name the call and the error code (``POST /api/v3/contacts -> 422 ValidationError``),
never the API key or personal data: query strings are left out, and text taken from Engage is
truncated and scrubbed of emails, phone and personal numbers, on the attributes too. Nothing
reachable from an exception raised here (``__cause__``, ``__context__``, attributes) holds
aiohttp's exceptions, whose text carries the URL with its query and whose request info
carries the API key: the transport keeps only the name of the network error
(`EngageUnavailable.network_error`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from ._redact import scrub

__all__ = [
    "ChangeNotFound",
    "CircuitOpen",
    "ContactNotFound",
    "EmptyValueError",
    "EngageAuthError",
    "EngageConfigurationError",
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
    "SftpError",
    "SftpRefused",
    "SftpUnavailable",
    "UnexpectedResponse",
]


_MAX_MESSAGE: Final = 500


class EngageError(Exception):
    """Base class of every exception engage-async raises on purpose."""


class EngageUnavailable(EngageError):
    """Engage gave no usable answer: network error, timeout, 5xx, an answer that is not
    Engage's, or an open circuit. The outcome of a write is unknown.

    Writes that fail this way are queued in the outbox; reads raise it. `request_sent` is
    False only when the request cannot have reached Engage (the connection was never made,
    the circuit was open, the client-side rate limit held it back), which makes a create
    safe to send again.

    Attributes:
        request_sent: the request may have reached Engage.
        network_error: the name of the network error behind it (``"ClientConnectorError"``,
            ``"ServerDisconnectedError"``, maybe with the errno name), or None. Only the name
            is kept: the network library's exception holds the URL, query string included.
    """

    def __init__(
        self, message: str, *, request_sent: bool = True, network_error: str | None = None
    ) -> None:
        super().__init__(message)
        self.request_sent = request_sent
        self.network_error = network_error

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
        message: Engage's human-readable text, if any, scrubbed of personal data.
        details: ``messageDetails`` from the body, as a dict (empty if absent), its texts
            scrubbed.
        body: the body text, truncated at a word boundary and scrubbed of personal data.
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


class EngageConfigurationError(EngageServerError):
    """5xx ``InvalidSystemConfiguration``: a fault in the tenant's configuration at Voyado.

    Waiting does not fix it; someone has to fix the tenant's setup (as with a refused API
    key). It is still a 5xx, so a write that meets it is kept rather than lost.
    """


class UnexpectedResponse(EngageUnavailable):
    """An answer that is not a usable answer from Engage, so a write's outcome is unknown.

    A 1xx or 3xx (redirects are never followed), a 4xx Engage does not document, a 400, 404,
    409 or 422 whose body is a proxy's HTML page rather than Engage's JSON, a 2xx that cannot
    be read, or an answer larger than `EngageConfig.max_answer_bytes`. Writes that meet it are
    queued (a create to be looked up first) and sent again after a pause.

    Attributes:
        status: the HTTP status, or None when no status applies (a body read elsewhere).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        # Some messages quote what could not be read; scrub them like any text from Engage.
        super().__init__(scrub(message, limit=_MAX_MESSAGE), request_sent=True)
        self.status = status


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


class SftpError(EngageError):
    """Uploading XML files to Engage's SFTP server failed; the files stay in `xml_dir`."""


class SftpUnavailable(SftpError):
    """The SFTP server could not be reached, or dropped the connection, on every attempt.

    Nothing is lost: the files not yet renamed on the server stay in `xml_dir` and the next
    `XmlUploader.upload_pending` sends them.
    """


class SftpRefused(SftpError):
    """The server's host key, the login or the rights were refused: a configuration problem.

    Never retried, since waiting does not fix it; the message names the setting to check.
    """


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """Unpickle an exception without calling its __init__."""
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc
