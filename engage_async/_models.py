"""The values engage-async hands back: Engage's contacts and the outcome of a write.

Plain frozen attrs classes with snake_case names; they know nothing about JSON. How they map
to Engage's camelCase wire format lives in `_wire`. Every field is optional because Engage
omits and adds fields without notice; the top-level results keep the JSON they came from in
`.raw`, so nothing Engage sent is lost. Personal data (names, addresses, email, phone,
personal numbers) is left out of every repr.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import attrs

__all__ = [
    "Consent",
    "Contact",
    "ContactAttributes",
    "ContactOverview",
    "Delivery",
    "FlushReport",
    "Meta",
    "Money",
    "PointAccount",
    "Preferences",
    "Promotion",
    "RedemptionChannel",
    "RewardVoucher",
    "Store",
    "Tiers",
    "Transaction",
]

Scalar = str | int | float | bool | None


def _private(default: Any = None) -> Any:
    """A field holding personal data: kept out of repr."""
    return attrs.field(default=default, repr=False)


def _raw() -> Any:
    return attrs.field(factory=dict, repr=False, eq=False)


@attrs.frozen
class Store:
    """A store, as in a contact's ``currentStore`` or ``recruitedByStore``."""

    id: str | None = None
    name: str | None = None
    external_id: str | None = None


@attrs.frozen
class ContactAttributes:
    """A contact's standard attributes. Tenant-specific ones are in the parent's `.raw`.

    Also usable as input to `create_contact` and `update_contact`: fields left at None are
    not sent.
    """

    first_name: str | None = _private()
    last_name: str | None = _private()
    street: str | None = _private()
    zip_code: str | None = _private()
    city: str | None = _private()
    care_of: str | None = _private()
    country: str | None = None
    country_code: str | None = None
    email: str | None = _private()
    mobile_phone: str | None = _private()
    social_security_number: str | None = _private()
    gender: str | None = _private()
    birth_day: date | None = _private()
    age: int | None = _private()
    children: tuple[str, ...] = _private(())
    lang: str | None = None
    external_id: str | None = None
    member_number: str | None = None
    rfm: int | None = None
    registration_date: datetime | None = None
    secrecy_marked: bool | None = None
    staff: bool | None = None
    current_store: Store | None = None


@attrs.frozen
class Meta:
    """Bookkeeping Engage keeps about a contact."""

    created_on: datetime | None = None
    modified_on: datetime | None = None
    source_type: str | None = None
    approved: bool | None = None
    contact_type: str | None = None
    recruited_by_store: Store | None = None


@attrs.frozen
class Preferences:
    """Channel preferences; also usable as input (None fields are not sent)."""

    accepts_email: bool | None = None
    accepts_postal: bool | None = None
    accepts_sms: bool | None = None


@attrs.frozen
class Consent:
    """One consent. As input, Engage requires `id` and `value`."""

    id: str | None = None
    value: bool | None = None
    date: datetime | None = None
    comment: str | None = _private()  # free text: may name the person
    source: str | None = None


@attrs.frozen
class Tiers:
    """The contact's loyalty tier."""

    tier_id: str | None = None
    tier_name: str | None = None
    expires: datetime | None = None
    remaining_to_upgrade: float | None = None
    based_on_points: float | None = None


@attrs.frozen
class Money:
    """An amount in a currency."""

    currency: str | None = None
    amount: float | None = None


@attrs.frozen
class RewardVoucher:
    """A reward voucher on the contact overview."""

    id: str | None = None
    voucher_number: str | None = None
    name: str | None = None
    value: Money | None = None
    local_values: tuple[Money, ...] = ()
    points: float | None = None
    expires_on: datetime | None = None
    redeemed: bool | None = None
    redeemed_on: datetime | None = None


@attrs.frozen
class RedemptionChannel:
    """Where and how a promotion can be redeemed.

    Engage's documented examples nest promotion-like entries (with their own
    `redemption_channels`) inside a promotion's channels, so the promotion fields are here too.
    """

    type: str | None = None
    value_type: str | None = None
    value: str | float | None = None
    instruction: str | None = None
    id: str | None = None
    external_id: str | None = None
    name: str | None = None
    heading: str | None = None
    description: str | None = None
    expires_on: datetime | None = None
    redeemed: bool | None = None
    redeemed_on: datetime | None = None
    image_url: str | None = None
    link: str | None = None
    redemption_channels: tuple[RedemptionChannel, ...] = ()


@attrs.frozen
class Promotion:
    """A promotion assigned to a contact (overview entry or promotion assignment).

    `id` is the assignment (what ``/redeem`` takes); `promotion_id` the template it came from.
    """

    id: str | None = None
    promotion_id: str | None = None
    external_id: str | None = None
    type: str | None = None
    name: str | None = None
    heading: str | None = None
    description: str | None = None
    expires_on: datetime | None = None
    redeemed: bool | None = None
    redeemed_on: datetime | None = None
    image_url: str | None = None
    link: str | None = None
    redemption_channels: tuple[RedemptionChannel, ...] = ()
    raw: Mapping[str, Any] = _raw()


@attrs.frozen
class Contact:
    """A contact as ``GET /contacts/{id}`` (and create, update) return it."""

    id: str
    attributes: ContactAttributes = ContactAttributes()
    meta: Meta = Meta()
    preferences: Preferences = Preferences()
    consents: tuple[Consent, ...] = ()
    raw: Mapping[str, Any] = _raw()

    def attribute(self, name: str) -> Any:
        """An attribute by its Engage name, tenant-specific ones included (None if absent)."""
        attributes = self.raw.get("attributes")
        return attributes.get(name) if isinstance(attributes, Mapping) else None


@attrs.frozen
class ContactOverview:
    """The enriched profile from ``/contactoverview`` (may be cached on Engage's side)."""

    id: str
    attributes: ContactAttributes = ContactAttributes()
    meta: Meta = Meta()
    preferences: Preferences = Preferences()
    tiers: Tiers | None = None
    consents: tuple[Consent, ...] = ()
    audiences: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    reward_vouchers: tuple[RewardVoucher, ...] = ()
    promotions: tuple[Promotion, ...] = ()
    raw: Mapping[str, Any] = _raw()

    def attribute(self, name: str) -> Any:
        """An attribute by its Engage name, tenant-specific ones included (None if absent)."""
        attributes = self.raw.get("attributes")
        return attributes.get(name) if isinstance(attributes, Mapping) else None


@attrs.frozen
class Transaction:
    """One purchase or return from a contact's history."""

    id: str | None = None
    transaction_number: str | None = None
    external_id: str | None = None
    created_date: datetime | None = None
    store_name: str | None = None
    store_type: str | None = None
    number_of_items: float | None = None
    net_price_sum: float | None = None
    local_net_price_sum: float | None = None
    local_currency: str | None = None
    group_currency: str | None = None
    line_items: tuple[Mapping[str, Any], ...] = ()
    raw: Mapping[str, Any] = _raw()


@attrs.frozen
class PointAccount:
    """A contact's account for one point definition (active and pending points)."""

    id: int | str | None = None
    contact_id: str | None = None
    definition_id: int | str | None = None
    balance: float | None = None
    pending_points: float | None = None
    balance_expires: datetime | None = None
    raw: Mapping[str, Any] = _raw()


@attrs.frozen
class Delivery:
    """What became of a write.

    Attributes:
        queued: True if Engage could not take it now and it is committed to the outbox.
        contact_id: the contact's GUID when known.
        contact: the contact as Engage returned it, when Engage answered.
        change_id: the outbox change, when queued.
        ref: on every create, delivered or queued: a local reference later calls may pass
            instead of a GUID; `EngageSession.resolve` answers it from then on.
        existed: the contact was already there, so nothing was created.
    """

    queued: bool
    contact_id: str | None = None
    contact: Contact | None = attrs.field(default=None, repr=False)
    change_id: str | None = None
    ref: str | None = None
    existed: bool = False


@attrs.frozen
class FlushReport:
    """What one `OutboxFlusher.flush_once` did.

    Attributes:
        sent: changes handed to Engage (bulk items and single calls).
        created: creates Engage confirmed.
        updated: updates and contact-type changes Engage confirmed.
        reconciled: GUIDs found by lookup (after a bulk or XML create, or an existing contact).
        dead: changes dead-lettered.
        exported: changes written to XML import files.
        uploaded: XML files uploaded to Engage's SFTP server (when one is configured).
        pending: changes still waiting (pending, in flight, or waiting for a GUID).
    """

    sent: int = 0
    created: int = 0
    updated: int = 0
    reconciled: int = 0
    dead: int = 0
    exported: int = 0
    uploaded: int = 0
    pending: int = 0
