"""How the simulator words its answers where Engage publishes no schema.

Engage documents error codes but no error body, calls the `/contacts/id` answer "the
contactId", the bulk answer "BatchId" and the bulk status a "status object", and names no v3
path for a contact's purchases. The library reads all of these leniently; these renderers let a
test (or `engage-async doctor`'s own tests) make the simulator answer each plausible
alternative. The first choice of every shape is what the simulator answers by default.

Each shape, its choices, default first:

- ``error_body``: ``error_code`` ``{"errorCode", "message", "statusCode", "messageDetails"?}``;
  ``code_detail`` ``{"code", "detail"}``; ``error`` ``{"error": <code>, "statusCode": n}``;
  ``string`` a bare JSON string, the code.
- ``contact_id`` (the `/contacts/id` answer): ``string`` a bare JSON string; ``contactId``
  ``{"contactId": <id>}``; ``id`` ``{"id": <id>}``.
- ``batch_id`` (a bulk submission's answer): ``string`` a bare JSON string; ``batchId``
  ``{"batchId": <id>}``.
- ``batch_status``: ``status`` ``{"batchId", "status": "Pending"|"Finished", "totalCount",
  "successCount", "failedCount", "failures": [{"index", "contactId", "errorCode",
  "message"}], "createdOn", "finishedOn"}``; ``state`` ``{"state": "Processing"|"Completed",
  "errors": [{"row", "code", "detail"}], "failedCount"}`` with rows counted from 1; ``items``
  today's shape plus ``"items": [{"index", "contactId", "status": "Done"|"Failed"}]`` once the
  batch is processed, telling each created contact's id.
- ``transactions_path`` (v3 only): ``query`` ``/contacts/transactions?contactId=``; ``path``
  ``/contacts/{id}/transactions``.
- ``rate_limit_headers``: ``absent``; ``present`` ``X-RateLimit-Limit`` and
  ``X-RateLimit-Remaining`` on every answer (while `rate_limit` is set).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from ._fake_store import Batch, EngageFailure

SHAPES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "error_body": ("error_code", "code_detail", "error", "string"),
        "contact_id": ("string", "contactId", "id"),
        "batch_id": ("string", "batchId"),
        "batch_status": ("status", "state", "items"),
        "transactions_path": ("query", "path"),
        "rate_limit_headers": ("absent", "present"),
    }
)
DEFAULT_SHAPES: Final[Mapping[str, str]] = MappingProxyType(
    {name: choices[0] for name, choices in SHAPES.items()}
)


def checked_shapes(shapes: Mapping[str, str]) -> dict[str, str]:
    """Return the defaults overlaid with `shapes`; raise `ValueError` naming a bad one."""
    merged = dict(DEFAULT_SHAPES)
    for name, choice in shapes.items():
        check_shape(name, choice)
        merged[name] = choice
    return merged


def check_shape(name: str, choice: str) -> None:
    """Raise `ValueError` unless `choice` is one of the shape's choices."""
    if name not in SHAPES:
        raise ValueError(f"shapes: unknown shape {name!r}; use one of {sorted(SHAPES)}")
    if choice not in SHAPES[name]:
        raise ValueError(f"shapes[{name!r}]: must be one of {list(SHAPES[name])}, not {choice!r}")


def error_body(failure: EngageFailure, shape: str) -> Any:
    """Return the JSON body of an error answer in the given `error_body` shape."""
    if shape == "code_detail":
        return {"code": failure.code, "detail": failure.message}
    if shape == "error":
        return {"error": failure.code, "statusCode": failure.status}
    if shape == "string":
        return failure.code
    return failure.payload()


def contact_id_body(contact_id: str, shape: str) -> Any:
    """Return the body of a `/contacts/id` answer in the given `contact_id` shape."""
    if shape == "string":
        return contact_id
    return {shape: contact_id}


def batch_id_body(batch_id: str, shape: str) -> Any:
    """Return the body of a bulk submission's answer in the given `batch_id` shape."""
    return batch_id if shape == "string" else {"batchId": batch_id}


def batch_status_body(batch: Batch, shape: str) -> Any:
    """Return the body of `GET /contacts/bulk/status` in the given `batch_status` shape."""
    if shape == "items":
        body = batch.status_json()
        failed = {failure["index"] for failure in batch.failures}
        body["items"] = [
            {
                "index": index,
                "contactId": contact_id,
                "status": "Failed" if index in failed else "Done",
            }
            for index, contact_id in enumerate(batch.contact_ids)
        ]
        return body
    if shape != "state":
        return batch.status_json()
    return {
        "state": "Completed" if batch.status == "Finished" else "Processing",
        "errors": [
            {
                "row": failure["index"] + 1,
                "code": failure["errorCode"],
                "detail": failure["message"],
            }
            for failure in batch.failures
        ],
        "failedCount": len(batch.failures),
    }
