from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bridge.errors import NotFound, ValidationFailed
from bridge.resources import Resources
from bridge.store import ListQuery, Store


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
async def resources(tmp_path: Path) -> Iterator[Resources]:  # type: ignore[misc]
    store = Store(tmp_path / "s.sqlite3")
    await store.open()
    yield Resources(store, Clock())
    await store.aclose()


async def test_create_sets_identity_and_timestamps(resources: Resources) -> None:
    created = await resources.create("assistant", {"name": "A", "firstMessage": "Hi", "extra": 1})
    assert created["orgId"] == await resources.org_id()
    assert created["createdAt"] == created["updatedAt"] == "2024-01-01T00:00:01.000Z"
    assert created["extra"] == 1
    assert await resources.get("assistant", created["id"]) == created


async def test_client_cannot_choose_read_only_fields(resources: Resources) -> None:
    created = await resources.create("assistant", {"id": "mine", "createdAt": "1999", "name": "A"})
    assert created["id"] != "mine" and created["createdAt"] != "1999"


async def test_update_merges_and_moves_updated_at(resources: Resources) -> None:
    created = await resources.create("assistant", {"name": "A", "firstMessage": "Hi"})
    updated = await resources.update(
        "assistant", created["id"], {"firstMessage": None, "metadata": {"k": 1}}
    )
    assert "firstMessage" not in updated and updated["metadata"] == {"k": 1}
    assert (
        updated["createdAt"] == created["createdAt"] and updated["updatedAt"] > created["updatedAt"]
    )
    with pytest.raises(ValidationFailed):
        await resources.update("assistant", created["id"], {"maxDurationSeconds": -1})
    with pytest.raises(NotFound):
        await resources.update("assistant", "missing", {"name": "x"})


async def test_phone_number_must_name_an_existing_assistant(resources: Resources) -> None:
    with pytest.raises(ValidationFailed, match="no assistant has id nope"):
        await resources.create(
            "phone_number", {"provider": "vapi", "sipUri": "sip:a@b", "assistantId": "nope"}
        )
    assistant = await resources.create("assistant", {"name": "A"})
    number = await resources.create(
        "phone_number", {"sipUri": "sip:a@b", "assistantId": assistant["id"]}
    )
    cleared = await resources.update(
        "phone_number", number["id"], {"assistantId": None, "serverUrl": "https://h"}
    )
    assert "assistantId" not in cleared and cleared["server"] == {"url": "https://h"}


async def test_delete_returns_the_resource_and_warns_about_users(
    resources: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    assistant = await resources.create("assistant", {"name": "A"})
    number = await resources.create(
        "phone_number", {"sipUri": "sip:a@b", "assistantId": assistant["id"]}
    )
    with caplog.at_level(logging.WARNING):
        deleted = await resources.delete("assistant", assistant["id"])
    assert deleted["id"] == assistant["id"]
    assert number["id"] in caplog.text
    with pytest.raises(NotFound):
        await resources.delete("assistant", assistant["id"])
    assert await resources.find("assistant", assistant["id"]) is None
    assert [n["id"] for n in await resources.listing("phone_number", ListQuery())] == [number["id"]]


async def test_org_id_override(resources: Resources) -> None:
    resources.use_org_id("org-from-settings")
    assert (await resources.create("assistant", {}))["orgId"] == "org-from-settings"


async def test_a_number_outside_the_sip_domains_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "d.sqlite3")
    await store.open()
    try:
        resources = Resources(store, Clock(), sip_domains=["SIP.example.com"])
        number = await resources.create("phone_number", {"sipUri": "sip:a@sip.example.com:5070"})
        with pytest.raises(ValidationFailed) as caught:
            await resources.create("phone_number", {"sipUri": "sip:b@sip.vapi.ai"})
        assert caught.value.problems[0].startswith("sipUri: host 'sip.vapi.ai' is not one of")
        with pytest.raises(ValidationFailed):
            await resources.update("phone_number", number["id"], {"sipUri": "sip:a@other.example"})
        # Without domains any host is fine (numbers match by user part).
        anything = Resources(store, Clock())
        await anything.create("phone_number", {"sipUri": "sip:c@sip.vapi.ai"})
        # A number from before the domains changed stays editable in its other fields.
        renamed = await resources.update(
            "phone_number",
            (await anything.listing("phone_number", ListQuery()))[0]["id"],
            {"name": "x"},
        )
        assert renamed["name"] == "x"
    finally:
        await store.aclose()
