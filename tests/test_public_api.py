"""The import surface: `__all__`, `__version__`, and the exception tree of the contract."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

import engage_async as ea


def test_all_is_sorted() -> None:
    """`__all__` is kept sorted."""
    assert sorted(ea.__all__) == ea.__all__


def test_all_has_no_duplicates() -> None:
    """Each name is listed once."""
    assert len(set(ea.__all__)) == len(ea.__all__)


def test_every_listed_name_is_importable() -> None:
    """Every name in `__all__` exists on the package."""
    assert [] == [name for name in ea.__all__ if not hasattr(ea, name)]


def test_every_public_class_is_listed() -> None:
    """Every public class the package defines and exposes is in `__all__`."""
    public_classes = {
        name
        for name, value in vars(ea).items()
        if not name.startswith("_")
        and inspect.isclass(value)
        and value.__module__.startswith("engage_async")
    }

    assert set() == public_classes - set(ea.__all__)


def test_star_import_gives_exactly_all() -> None:
    """`from engage_async import *` binds exactly the names of `__all__`."""
    namespace: dict[str, object] = {}
    exec("from engage_async import *", namespace)

    assert set(ea.__all__) == set(namespace) - {"__builtins__"}


def test_version_comes_from_the_package_metadata() -> None:
    """`__version__` is the installed distribution's version."""
    assert importlib.metadata.version("engage-async") == ea.__version__


@pytest.mark.parametrize(
    "name",
    [
        "EngageConfig",
        "EngageSession",
        "CLEAR",
        "Contact",
        "ContactOverview",
        "Delivery",
        "EngageError",
        "EngageHTTPError",
        "ContactNotFound",
        "MultipleMatches",
        "InvalidRequest",
        "EngageValidationError",
        "RateLimited",
        "EngageAuthError",
        "EngageUnavailable",
        "EmptyValueError",
        "OutboxError",
        "ChangeNotFound",
    ],
)
def test_contract_names_exported(name: str) -> None:
    """The names the contract promises (that exist so far) are listed in `__all__`."""
    assert name in ea.__all__


# --- the exception tree ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (ea.EngageError, (Exception,)),
        (ea.EngageUnavailable, (ea.EngageError,)),
        (ea.EngageConnectionError, (ea.EngageUnavailable,)),
        (ea.EngageTimeout, (ea.EngageUnavailable,)),
        (ea.CircuitOpen, (ea.EngageUnavailable,)),
        (ea.EngageHTTPError, (ea.EngageError,)),
        (ea.InvalidRequest, (ea.EngageHTTPError,)),
        (ea.EngageAuthError, (ea.EngageHTTPError,)),
        (ea.ContactNotFound, (ea.EngageHTTPError,)),
        (ea.EngageConflict, (ea.EngageHTTPError,)),
        (ea.MultipleMatches, (ea.EngageConflict, ea.EngageHTTPError)),
        (ea.EngageValidationError, (ea.EngageHTTPError,)),
        (ea.RateLimited, (ea.EngageHTTPError,)),
        (ea.EngageServerError, (ea.EngageHTTPError, ea.EngageUnavailable)),
        (ea.UnexpectedResponse, (ea.EngageError,)),
        (ea.PayloadError, (ea.EngageError, ValueError)),
        (ea.EmptyValueError, (ea.PayloadError, ea.EngageError, ValueError)),
        (ea.OutboxError, (ea.EngageError,)),
        (ea.ChangeNotFound, (ea.EngageError, LookupError)),
    ],
)
def test_exception_tree(cls: type, bases: tuple[type, ...]) -> None:
    """Each exception derives from what the contract and the module docstring draw."""
    assert [] == [base.__name__ for base in bases if not issubclass(cls, base)]


@pytest.mark.parametrize(
    "cls",
    [
        ea.InvalidRequest,
        ea.EngageAuthError,
        ea.ContactNotFound,
        ea.EngageConflict,
        ea.MultipleMatches,
        ea.EngageValidationError,
        ea.RateLimited,
    ],
)
def test_client_errors_are_not_unavailable(cls: type) -> None:
    """Errors about the request itself are never "unavailable" (so never queued)."""
    assert not issubclass(cls, ea.EngageUnavailable)


@pytest.mark.parametrize(
    "cls", [ea.EngageConnectionError, ea.EngageTimeout, ea.CircuitOpen, ea.UnexpectedResponse]
)
def test_no_answer_is_not_an_http_error(cls: type) -> None:
    """No answer at all is a separate branch from "Engage answered no"."""
    assert not issubclass(cls, ea.EngageHTTPError)


def test_http_error_attributes() -> None:
    """EngageHTTPError carries status, error_code, message, details and body."""
    exc = ea.ContactNotFound(
        "GET /api/v3/contacts/x -> 404 ContactNotFound",
        status=404,
        error_code="ContactNotFound",
        message="ContactNotFound",
        details={"a": 1},
        body='{"errorCode":"ContactNotFound"}',
    )

    assert (
        404,
        "ContactNotFound",
        "ContactNotFound",
        {"a": 1},
        '{"errorCode":"ContactNotFound"}',
        "GET /api/v3/contacts/x -> 404 ContactNotFound",
    ) == (exc.status, exc.error_code, exc.message, exc.details, exc.body, str(exc))


def test_multiple_matches_contact_ids() -> None:
    """MultipleMatches exposes contact_ids as a tuple."""
    exc = ea.MultipleMatches("409", status=409, contact_ids=["a", "b"])

    assert ("a", "b") == exc.contact_ids


def test_payload_error_names_the_field() -> None:
    """PayloadError keeps the field and reason, and says both."""
    exc = ea.EmptyValueError("changes.lastName", "empty")

    assert ("changes.lastName", "empty", "changes.lastName: empty") == (
        exc.field,
        exc.reason,
        str(exc),
    )


def test_connection_error_says_whether_the_request_went_out() -> None:
    """EngageConnectionError records whether the request can have reached Engage."""
    assert (False, True) == (
        ea.EngageConnectionError("x", request_sent=False).request_sent,
        ea.EngageConnectionError("x", request_sent=True).request_sent,
    )


def test_change_not_found_caught_as_lookup_error() -> None:
    """ChangeNotFound is caught by a plain `except LookupError`."""
    with pytest.raises(LookupError):
        raise ea.ChangeNotFound("chg_0")
