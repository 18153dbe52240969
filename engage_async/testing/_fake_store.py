"""The simulator's memory: contacts, their key indexes, field validation and bulk batches.

Pure data and rules, no I/O: `ContactStore` applies creates, updates and contact-type changes
the way Engage does, raises `EngageFailure` (status, error code, text) where Engage would
refuse, and renders contacts as Engage's JSON. The aiohttp side lives in `_fake.py`.

Lookups go through indexes (attribute -> normalised value -> ids) that every write keeps up to
date, so neither a lookup nor a bulk item ever scans all contacts.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import uuid
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, cast

import attrs

KEY_ATTRIBUTES: Final = frozenset({"email", "mobilePhone", "socialSecurityNumber", "externalId"})
CUSTOM_KEYS: Final = frozenset({"externalId", "memberNumber"})

# Standard contact attributes: rendered as null while unset, writable over the API.
STANDARD_ATTRIBUTES: Final = (
    "firstName",
    "lastName",
    "street",
    "zipCode",
    "city",
    "careOf",
    "country",
    "countryCode",
    "email",
    "mobilePhone",
    "socialSecurityNumber",
    "gender",
    "birthDay",
    "externalId",
    "memberNumber",
    "lang",
)
# Standard flags: rendered as false while unset.
_FLAGS: Final = ("staff", "secrecyMarked")
DEFAULT_ATTRIBUTE_NAMES: Final = frozenset(STANDARD_ATTRIBUTES + _FLAGS)

_INDEXED: Final = ("email", "mobilePhone", "socialSecurityNumber", "externalId", "memberNumber")
# Body keys that are not attributes: handled apart, or identify the contact.
_NOT_ATTRIBUTES: Final = frozenset({"contactType", "preferences", "consents", "id", "contactId"})

_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+")
_PHONE = re.compile(r"\+[0-9]{7,15}")
_SSN = re.compile(r"(?:[0-9]{6}|[0-9]{8})-?[0-9]{4}")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

# The order Engage tries the attributes of an `any` lookup in; customKey, which takes any
# value, comes last.
_ANY_ORDER: Final = ("email", "socialSecurityNumber", "mobilePhone")
_INVALID_LOOKUP_CODE: Final = {
    "email": "InvalidEmailAddress",
    "mobilePhone": "InvalidPhoneNumber",
    "socialSecurityNumber": "InvalidSocialSecurityNumber",
}
LOOKUP_PARAMETERS: Final = ("email", "mobilePhone", "socialSecurityNumber", "customKey", "any")

BatchKind = Literal["create", "update"]


class EngageFailure(Exception):
    """An answer Engage gives instead of doing the work: HTTP status, error code, text."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details) if details is not None else None

    def payload(self) -> dict[str, Any]:
        """Return the JSON error body Engage sends for this failure."""
        body: dict[str, Any] = {
            "errorCode": self.code,
            "message": self.message,
            "statusCode": self.status,
        }
        if self.details is not None:
            body["messageDetails"] = self.details
        return body


def now() -> dt.datetime:
    """Return the current time, aware, in UTC, to the second."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def parse_contact_id(raw: object) -> str:
    """Return `raw` as a lower-case GUID; raise 400 `InvalidContactId` if it is not one."""
    if not isinstance(raw, str) or not _GUID.fullmatch(raw):
        raise EngageFailure(400, "InvalidContactId", "The contact id is not a valid GUID.")
    return raw.lower()


def is_empty(value: object) -> bool:
    """Tell whether `value` is what Engage treats as "no value": null or the empty string."""
    return value is None or value == ""


def _valid_email(value: object) -> bool:
    return isinstance(value, str) and _EMAIL.fullmatch(value) is not None


def _valid_phone(value: object) -> bool:
    return isinstance(value, str) and _PHONE.fullmatch(value) is not None


def _valid_ssn(value: object) -> bool:
    return isinstance(value, str) and _SSN.fullmatch(value) is not None


def _valid_date(value: object) -> bool:
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        return False
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return False
    return True


_CHECKS: Final = {
    "email": _valid_email,
    "mobilePhone": _valid_phone,
    "socialSecurityNumber": _valid_ssn,
    "birthDay": _valid_date,
}


def _normalise(attribute: str, value: object) -> str | None:
    """Return the index form of a value: emails ignore case, SSNs ignore the dash."""
    if is_empty(value):
        return None
    text = str(value)
    if attribute == "email":
        return text.lower()
    if attribute == "socialSecurityNumber":
        return text.replace("-", "")
    return text


def _store_json(external_id: str | None) -> dict[str, Any] | None:
    if external_id is None:
        return None
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"engage-store:{external_id}")),
        "name": f"Store {external_id}",
        "externalId": external_id,
    }


def _age(birth_day: object, today: dt.date) -> int | None:
    if not _valid_date(birth_day):
        return None
    born = dt.date.fromisoformat(str(birth_day))
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


@attrs.define(eq=False)
class StoredContact:
    """One contact as the simulator holds it.

    `attributes` is a read-only view: the store indexes some attributes, so changes go through
    the API or `FakeEngage.add_contact`. The other fields may be inspected freely.
    """

    id: str
    contact_type: str
    _attributes: dict[str, Any] = attrs.field(repr=False)
    approved: bool = True
    preferences: dict[str, Any] = attrs.field(factory=dict, repr=False)
    consents: list[dict[str, Any]] = attrs.field(factory=list, repr=False)
    source: str | None = None
    store_external_id: str | None = None
    # The `source` header of the v2 promoteToMember that made it a Member, if any.
    promotion_source: str | None = None
    source_type: str = "API"
    created_on: dt.datetime = attrs.field(factory=now)
    modified_on: dt.datetime = attrs.field(factory=now)
    transactions: list[dict[str, Any]] = attrs.field(factory=list, repr=False)
    promotions: list[dict[str, Any]] = attrs.field(factory=list, repr=False)
    point_accounts: list[dict[str, Any]] = attrs.field(factory=list, repr=False)

    @property
    def attributes(self) -> Mapping[str, Any]:
        """The stored attributes (only those ever set), read-only."""
        return MappingProxyType(self._attributes)


@attrs.define(eq=False)
class Batch:
    """One bulk request: what was sent, and what processing made of it.

    `contact_ids` holds, per item, the contact the item created or updated (None where the
    item failed); it is filled when the batch is processed.
    """

    id: str
    kind: BatchKind
    contact_type: str
    items: list[Any] = attrs.field(repr=False)
    avoid_triggering_export: bool = False
    status: Literal["Pending", "Finished"] = "Pending"
    failures: list[dict[str, Any]] = attrs.field(factory=list, repr=False)
    contact_ids: list[str | None] = attrs.field(factory=list, repr=False)
    # Full precision here (tests compare them); the status JSON shows seconds.
    submitted_at: dt.datetime = attrs.field(factory=lambda: dt.datetime.now(dt.UTC))
    processed_at: dt.datetime | None = None

    def status_json(self) -> dict[str, Any]:
        """Return the body of `GET /contacts/bulk/status` for this batch."""
        failed = len(self.failures)
        done = self.status == "Finished"
        return {
            "batchId": self.id,
            "status": self.status,
            "totalCount": len(self.items),
            "successCount": len(self.items) - failed if done else 0,
            "failedCount": failed,
            "failures": list(self.failures),
            "createdOn": self.submitted_at.isoformat(timespec="seconds"),
            "finishedOn": (
                self.processed_at.isoformat(timespec="seconds") if self.processed_at else None
            ),
        }


def _validation_failure(fields: Iterable[str]) -> EngageFailure:
    names = sorted(set(fields))
    return EngageFailure(
        422,
        "ValidationError",
        f"Invalid or missing value for: {', '.join(names)}.",
        {"fields": names},
    )


def _invalid_fields(
    attributes: Mapping[str, Any], preferences: object, consents: object
) -> list[str]:
    bad = [
        name
        for name, value in attributes.items()
        if not is_empty(value) and name in _CHECKS and not _CHECKS[name](value)
    ]
    if preferences is not None:
        if not isinstance(preferences, dict):
            bad.append("preferences")
        else:
            bad.extend(
                f"preferences.{key}"
                for key, value in preferences.items()
                if value is not None and not isinstance(value, bool)
            )
    if consents is not None:
        if not isinstance(consents, list):
            bad.append("consents")
        else:
            for i, consent in enumerate(consents):
                if not isinstance(consent, dict):
                    bad.append(f"consents[{i}]")
                    continue
                if not isinstance(consent.get("id"), str) or not consent["id"]:
                    bad.append(f"consents[{i}].id")
                if "value" not in consent:
                    bad.append(f"consents[{i}].value")
    return bad


@attrs.define
class ContactStore:
    """Contacts, their indexes, and the rules Engage applies when they change.

    Args:
        contact_types: contact type name -> its key attribute.
        custom_key: the attribute a `customKey` lookup means.
        attribute_names: the attributes this tenant knows; writes to any other name are
            dropped without an error, as Engage does.
    """

    contact_types: dict[str, str]
    custom_key: str
    attribute_names: set[str] = attrs.field(factory=lambda: set(DEFAULT_ATTRIBUTE_NAMES))
    contacts: dict[str, StoredContact] = attrs.field(factory=dict, init=False)
    batches: dict[str, Batch] = attrs.field(factory=dict, init=False)
    _type_names: dict[str, str] = attrs.field(init=False)
    _index: dict[str, dict[str, dict[str, None]]] = attrs.field(init=False)
    _member_numbers: itertools.count[int] = attrs.field(
        factory=lambda: itertools.count(100_000_001), init=False
    )
    _sequence: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        for name, key in self.contact_types.items():
            if key not in KEY_ATTRIBUTES:
                raise ValueError(
                    f"contact type {name!r}: key must be one of {sorted(KEY_ATTRIBUTES)}"
                )
        if self.custom_key not in CUSTOM_KEYS:
            raise ValueError(f"custom_key must be one of {sorted(CUSTOM_KEYS)}")
        self._type_names = {name.lower(): name for name in self.contact_types}
        # Ordered dicts as sets: MultipleMatches lists ids in the order they were stored.
        self._index = {attribute: {} for attribute in _INDEXED}

    # Contact types and lookups ---------------------------------------------------------------

    def canonical_type(self, name: object) -> str:
        """Return the configured spelling of a type name; raise 400 `InvalidContactType`."""
        canonical = self._type_names.get(name.lower()) if isinstance(name, str) else None
        if canonical is None:
            raise EngageFailure(400, "InvalidContactType", "Unknown contact type.")
        return canonical

    def get(self, contact_id: str) -> StoredContact:
        """Return the contact with this (already validated) id; raise 404 `ContactNotFound`."""
        contact = self.contacts.get(contact_id)
        if contact is None:
            raise EngageFailure(404, "ContactNotFound", "No contact has that id.")
        return contact

    def find(self, attribute: str, value: object, contact_type: str | None = None) -> list[str]:
        """Return the ids whose `attribute` equals `value` (email ignoring case), oldest first."""
        wanted = self._type_names.get(contact_type.lower(), contact_type) if contact_type else None
        if attribute in self._index:
            key = _normalise(attribute, value)
            ids = list(self._index[attribute].get(key, ())) if key is not None else []
        else:
            ids = [
                contact.id
                for contact in self.contacts.values()
                if contact.attributes.get(attribute) == value
            ]
        if wanted is None:
            return ids
        return [cid for cid in ids if self.contacts[cid].contact_type == wanted]

    def lookup(self, identifiers: Mapping[str, str], contact_type: str | None) -> list[str]:
        """Return the ids matching every given identifier, as `GET /contacts/id` resolves them.

        `identifiers` maps lookup parameter names (`email`, `mobilePhone`,
        `socialSecurityNumber`, `customKey`, `any`) to non-empty values. Raises 400
        `InvalidSearchQuery` when there are none and the matching `Invalid...` code when a
        value cannot be what its parameter names.
        """
        if not identifiers:
            raise EngageFailure(400, "InvalidSearchQuery", "No contact identifier was given.")
        matches: list[str] | None = None
        for parameter, value in identifiers.items():
            attribute = self._lookup_attribute(parameter, value)
            found = self.find(attribute, value, contact_type)
            matches = found if matches is None else [cid for cid in matches if cid in found]
        assert matches is not None
        return matches

    def _lookup_attribute(self, parameter: str, value: str) -> str:
        if parameter == "any":
            # Engage stops at the first attribute the value is valid for, match or not.
            parameter = next((name for name in _ANY_ORDER if _CHECKS[name](value)), "customKey")
        if parameter == "customKey":
            return self.custom_key
        if not _CHECKS[parameter](value):
            raise EngageFailure(
                400, _INVALID_LOOKUP_CODE[parameter], f"The {parameter} value is not valid."
            )
        return parameter

    # Writes ----------------------------------------------------------------------------------

    def create(
        self,
        body: Mapping[str, Any],
        *,
        contact_type: str,
        approved: bool = True,
        source: str | None = None,
        store_external_id: str | None = None,
        at: dt.datetime | None = None,
    ) -> StoredContact:
        """Create a contact from a create body, as `POST /contacts` does.

        Raises 422 `ValidationError` for a malformed field or a missing key attribute, and 409
        `ApprovedContactWithKeyExists` when an approved contact of the type holds the key.
        """
        attributes, preferences, consents = self._changes(body)
        key = self.contact_types[contact_type]
        if is_empty(attributes.get(key)):
            raise _validation_failure([key])
        self._check_key_free(contact_type, key, attributes[key], exclude=None)
        stamp = at or now()
        contact = StoredContact(
            id=str(uuid.uuid4()),
            contact_type=contact_type,
            attributes={name: None if value == "" else value for name, value in attributes.items()},
            approved=approved,
            preferences=dict(preferences),
            consents=[dict(consent) for consent in consents],
            source=source,
            store_external_id=store_external_id,
            created_on=stamp,
            modified_on=stamp,
        )
        self.assign_member_number(contact)
        self.insert(contact)
        return contact

    def update(
        self, contact: StoredContact, body: Mapping[str, Any], *, at: dt.datetime | None = None
    ) -> None:
        """Apply an update body: only the given fields, null or "" clearing them.

        `contactType` in the body is ignored. Preferences merge per key and consents by id.
        Raises 422 `ValidationError` for a malformed field or a cleared key attribute, and 409
        `ApprovedContactWithKeyExists` when the new key value belongs to another approved
        contact of the same type.
        """
        attributes, preferences, consents = self._changes(body)
        key = self.contact_types.get(contact.contact_type)
        if key is not None and key in attributes:
            if is_empty(attributes[key]):
                raise _validation_failure([key])
            if contact.approved:
                self._check_key_free(contact.contact_type, key, attributes[key], contact.id)
        for name, value in attributes.items():
            self._set(contact, name, None if value == "" else value)
        contact.preferences.update(preferences)
        for consent in consents:
            existing = next((c for c in contact.consents if c.get("id") == consent["id"]), None)
            if existing is None:
                contact.consents.append(dict(consent))
            else:
                existing.update(consent)
        contact.modified_on = at or now()

    def change_type(
        self,
        contact: StoredContact,
        contact_type: str,
        changes: Mapping[str, Any] | None = None,
    ) -> None:
        """Move a contact to another (canonical) type, as `updateContactType` does.

        `changes`, an update body (v2 `promoteToMember` takes one), are applied first; all or
        nothing. Raises 422 `ValidationError` when the contact would lack the new type's key
        attribute, and 409 `ApprovedContactWithKeyExists` when an approved contact of that
        type holds the same key value.
        """
        key = self.contact_types[contact_type]
        value = contact.attributes.get(key)
        if changes and key in changes and key in self.attribute_names:
            value = changes[key]
        if is_empty(value):
            raise _validation_failure([key])
        if contact.approved and contact_type != contact.contact_type:
            self._check_key_free(contact_type, key, value, exclude=contact.id)
        if changes:
            self.update(contact, changes)
        contact.contact_type = contact_type
        self.assign_member_number(contact)
        contact.modified_on = now()

    def insert(self, contact: StoredContact) -> None:
        """Store a contact as it is and index it (seeding: no validation, no uniqueness)."""
        self.contacts[contact.id] = contact
        for attribute in contact.attributes.keys() & _INDEXED:
            self._index_add(attribute, contact.attributes[attribute], contact.id)

    def next_sequence(self) -> int:
        """Return a number unique within this store (transaction numbers, account ids)."""
        return next(self._sequence)

    def assign_member_number(self, contact: StoredContact) -> None:
        """Give a Member that has none (not even a null) a fresh member number."""
        if contact.contact_type.lower() == "member" and "memberNumber" not in contact.attributes:
            self._set(contact, "memberNumber", str(next(self._member_numbers)))

    def _changes(
        self, body: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        """Split a write body into attributes, preferences and consents, all validated."""
        known = self.attribute_names
        attributes = {
            name: value
            for name, value in body.items()
            if name in known and name not in _NOT_ATTRIBUTES
        }
        preferences, consents = body.get("preferences"), body.get("consents")
        bad = _invalid_fields(attributes, preferences, consents)
        if bad:
            raise _validation_failure(bad)
        # _invalid_fields has checked the shapes these casts promise.
        return (
            attributes,
            cast("dict[str, Any]", preferences or {}),
            cast("list[dict[str, Any]]", consents or []),
        )

    def _check_key_free(
        self, contact_type: str, key: str, value: object, exclude: str | None
    ) -> None:
        for cid in self._index[key].get(_normalise(key, value) or "", ()):
            other = self.contacts[cid]
            if cid != exclude and other.approved and other.contact_type == contact_type:
                raise EngageFailure(
                    409,
                    "ApprovedContactWithKeyExists",
                    f"An approved {contact_type} with that {key} already exists.",
                )

    def _set(self, contact: StoredContact, name: str, value: object) -> None:
        if name in self._index:
            self._index_remove(name, contact.attributes.get(name), contact.id)
            self._index_add(name, value, contact.id)
        # The one write path: StoredContact shows only a read-only view, so indexes stay true.
        contact._attributes[name] = value

    def _index_add(self, attribute: str, value: object, contact_id: str) -> None:
        key = _normalise(attribute, value)
        if key is not None:
            self._index[attribute].setdefault(key, {})[contact_id] = None

    def _index_remove(self, attribute: str, value: object, contact_id: str) -> None:
        key = _normalise(attribute, value)
        ids = self._index[attribute].get(key or "")
        if ids is not None:
            ids.pop(contact_id, None)
            if not ids:
                del self._index[attribute][key or ""]

    # Bulk ------------------------------------------------------------------------------------

    def submit_batch(
        self,
        kind: BatchKind,
        contact_type: str,
        items: list[Any],
        *,
        avoid_triggering_export: bool = False,
    ) -> Batch:
        """Record a bulk request as a pending batch and return it."""
        batch = Batch(
            id=str(uuid.uuid4()),
            kind=kind,
            contact_type=contact_type,
            items=items,
            avoid_triggering_export=avoid_triggering_export,
        )
        self.batches[batch.id] = batch
        return batch

    def process_batch(self, batch: Batch, *, strict_types: bool = True) -> None:
        """Apply every item of a pending batch, each on its own, noting per-item failures.

        Creates make contacts of the batch's type. With `strict_types`, as Engage does, an
        update of a contact of another type fails with `ContactTypeMismatch` and is not
        applied; without, it is applied whatever the contact's type.
        """
        if batch.status != "Pending":
            return
        stamp = now()
        for index, item in enumerate(batch.items):
            contact_id: str | None = None
            try:
                if not isinstance(item, dict):
                    raise EngageFailure(400, "InvalidData", "The item is not a JSON object.")
                if batch.kind == "create":
                    contact_id = self.create(item, contact_type=batch.contact_type, at=stamp).id
                else:
                    contact_id = parse_contact_id(item.get("contactId", item.get("id")))
                    wanted = batch.contact_type if strict_types else None
                    self._bulk_update(contact_id, wanted, item, stamp)
            except EngageFailure as failure:
                batch.contact_ids.append(None)
                batch.failures.append(
                    {
                        "index": index,
                        "contactId": contact_id,
                        "errorCode": failure.code,
                        "message": failure.message,
                    }
                )
            else:
                batch.contact_ids.append(contact_id)
        batch.status = "Finished"
        batch.processed_at = dt.datetime.now(dt.UTC)

    def _bulk_update(
        self, contact_id: str, contact_type: str | None, item: dict[str, Any], stamp: dt.datetime
    ) -> None:
        contact = self.get(contact_id)
        if contact_type is not None and contact.contact_type != contact_type:
            raise EngageFailure(
                400,
                "ContactTypeMismatch",
                f"The contact is not of this request's type, {contact_type}.",
            )
        if all(name in ("contactId", "id") for name in item):
            raise EngageFailure(400, "NoData", "The item holds nothing to update.")
        self.update(contact, item, at=stamp)

    # Rendering -------------------------------------------------------------------------------

    def contact_json(self, contact: StoredContact) -> dict[str, Any]:
        """Return the contact as `GET /contacts/{id}` answers it."""
        store = _store_json(contact.store_external_id)
        attributes: dict[str, Any] = dict.fromkeys(STANDARD_ATTRIBUTES)
        attributes.update(dict.fromkeys(_FLAGS, False))
        attributes.update(contact.attributes)
        attributes["age"] = _age(attributes.get("birthDay"), dt.datetime.now(dt.UTC).date())
        attributes["registrationDate"] = contact.created_on.isoformat()
        attributes["currentStore"] = store
        return {
            "id": contact.id,
            "attributes": attributes,
            "meta": {
                "createdOn": contact.created_on.isoformat(),
                "modifiedOn": contact.modified_on.isoformat(),
                "sourceType": contact.source_type,
                "approved": contact.approved,
                "contactType": contact.contact_type,
                "recruitedByStore": store,
            },
            "preferences": {
                "acceptsEmail": False,
                "acceptsPostal": False,
                "acceptsSms": False,
                **contact.preferences,
            },
            "consents": [dict(consent) for consent in contact.consents],
        }

    def overview_json(self, contact: StoredContact) -> dict[str, Any]:
        """Return the contact as `GET /contactoverview` answers it."""
        base = self.contact_json(contact)
        base["attributes"].update({"rfm": None, "children": []})
        warnings = [] if contact.attributes.get("mobilePhone") else ["MissingMobileNumber"]
        return {
            "id": base["id"],
            "attributes": base["attributes"],
            "meta": base["meta"],
            "preferences": base["preferences"],
            # Engage computes tiers and vouchers elsewhere; fixed samples keep the shape honest.
            "tiers": {
                "expires": None,
                "tierName": "Base",
                "remainingToUpgrade": 500,
                "basedOnPoints": 0,
                "tierId": "base",
            },
            "consents": base["consents"],
            "audiences": [],
            "warnings": warnings,
            "rewardVouchers": [_sample_voucher()],
            "promotions": [dict(promotion) for promotion in contact.promotions],
        }


def _sample_voucher() -> dict[str, Any]:
    return {
        "expiresOn": "2031-12-31T23:59:59+00:00",
        "id": "0d9a6b1e-3f52-4c1e-9a57-5b7a3c2d1e0f",
        "voucherNumber": "0000000000001",
        "name": "Sample reward voucher",
        "value": {"currency": "EUR", "amount": 5},
        "localValues": [{"currency": "SEK", "amount": 50}],
        "points": 100,
        "redeemed": False,
        "redeemedOn": None,
    }
