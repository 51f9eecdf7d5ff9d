"""Assistants and phone numbers as the API manages them: validation, ids, timestamps, storage."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from bridge.errors import NotFound, ValidationFailed
from bridge.models import (
    READ_ONLY_FIELDS,
    apply_patch,
    format_timestamp,
    parse_sip_uri,
    validate_assistant,
    validate_phone_number,
)
from bridge.store import Kind, ListQuery, Store

log = logging.getLogger(__name__)

_LABELS: dict[Kind, str] = {"assistant": "Assistant", "phone_number": "Phone number"}
_VALIDATORS: dict[Kind, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "assistant": validate_assistant,
    "phone_number": validate_phone_number,
}


class Resources:
    """CRUD over the store with Vapi's semantics (201 bodies, PATCH merging, 404s)."""

    def __init__(
        self, store: Store, clock: Callable[[], datetime], sip_domains: Sequence[str] = ()
    ) -> None:
        self._store = store
        self._clock = clock
        self._sip_domains = tuple(d.lower() for d in sip_domains)
        self._org_id: str | None = None

    async def org_id(self) -> str:
        """The orgId shown on every resource."""
        if self._org_id is None:
            self._org_id = await self._store.org_id()
        return self._org_id

    def use_org_id(self, org_id: str) -> None:
        """Overrides the database's orgId (setting ``api.org_id``)."""
        self._org_id = org_id

    def _check_reachable(self, kind: Kind, document: Mapping[str, Any]) -> None:
        """A number whose host is not a configured SIP domain could never be called."""
        if kind != "phone_number" or not self._sip_domains:
            return
        parsed = parse_sip_uri(str(document.get("sipUri", "")))
        if parsed is not None and parsed[1] not in self._sip_domains:
            raise ValidationFailed(
                [
                    f"sipUri: host {parsed[1]!r} is not one of this service's SIP domains "
                    f"({', '.join(self._sip_domains)}); no call could reach it"
                ]
            )

    async def _check_references(self, kind: Kind, document: Mapping[str, Any]) -> None:
        if kind != "phone_number" or not document.get("assistantId"):
            return
        if await self._store.get("assistant", str(document["assistantId"])) is None:
            raise ValidationFailed([f"assistantId: no assistant has id {document['assistantId']}"])

    async def create(self, kind: Kind, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validates and stores a new resource.

        Raises:
            ValidationFailed: the body is invalid (or its sipUri is taken).
        """
        document = {k: v for k, v in _VALIDATORS[kind](body).items() if k not in READ_ONLY_FIELDS}
        self._check_reachable(kind, document)
        await self._check_references(kind, document)
        now = format_timestamp(self._clock())
        document = {
            "id": str(uuid.uuid4()),
            "orgId": await self.org_id(),
            **document,
            "createdAt": now,
            "updatedAt": now,
        }
        await self._store.insert(kind, document)
        log.info("created %s %s", kind, document["id"])
        return document

    async def get(self, kind: Kind, resource_id: str) -> dict[str, Any]:
        """One resource.

        Raises:
            NotFound: no such id.
        """
        document = await self._store.get(kind, resource_id)
        if document is None:
            raise NotFound(_LABELS[kind], resource_id)
        return document

    async def find(self, kind: Kind, resource_id: str) -> dict[str, Any] | None:
        """One resource, or None."""
        return await self._store.get(kind, resource_id)

    async def listing(self, kind: Kind, query: ListQuery) -> list[dict[str, Any]]:
        """Resources, newest first."""
        return await self._store.listing(kind, query)

    async def update(
        self, kind: Kind, resource_id: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Applies a PATCH body.

        Raises:
            NotFound: no such id.
            ValidationFailed: the merged resource is invalid.
        """
        existing = await self.get(kind, resource_id)
        merged = _VALIDATORS[kind](apply_patch(existing, patch))
        if "sipUri" in patch:  # an old number outside changed domains stays editable
            self._check_reachable(kind, merged)
        await self._check_references(kind, merged)
        document = {
            "id": existing["id"],
            "orgId": existing.get("orgId", await self.org_id()),
            **merged,
            "createdAt": existing["createdAt"],
            "updatedAt": format_timestamp(self._clock()),
        }
        if not await self._store.replace(kind, document):
            raise NotFound(_LABELS[kind], resource_id)
        log.info("updated %s %s", kind, resource_id)
        return document

    async def delete(self, kind: Kind, resource_id: str) -> dict[str, Any]:
        """Deletes a resource and returns it.

        Raises:
            NotFound: no such id.
        """
        if kind == "assistant":
            users = await self._store.phone_numbers_with_assistant(resource_id)
            if users:
                # Vapi allows this too; such calls end with assistant-not-found until re-pointed.
                log.warning(
                    "assistant %s deleted while phone numbers %s still name it",
                    resource_id,
                    ", ".join(users),
                )
        document = await self._store.delete(kind, resource_id)
        if document is None:
            raise NotFound(_LABELS[kind], resource_id)
        log.info("deleted %s %s", kind, resource_id)
        return document

    async def phone_numbers_for_user(self, user: str) -> list[dict[str, Any]]:
        """Candidates for an INVITE's request-URI user part."""
        return await self._store.phone_numbers_for_user(user)
