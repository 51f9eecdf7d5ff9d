"""The HTTP API through real loopback requests, and the official Vapi SDK against it."""

from __future__ import annotations

import array
import io
import json
import re
import wave
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx
import pytest
from vapi import AsyncVapi
from vapi.core.api_error import ApiError
from vapi.phone_numbers import CreatePhoneNumbersRequest_Vapi, UpdatePhoneNumbersRequestBody_Vapi
from vapi.types import Call, CreateCustomerDto, Server

from bridge.api import MAX_BODY_DEPTH, list_query, nesting_depth
from bridge.audio import tone_share
from bridge.errors import ValidationFailed
from bridge.events import invite_facts
from bridge.service import Service
from bridge.settings import Settings
from tests.conftest import API_KEY, offer_accepted, raw_request, recorded_call
from tests.fake_pbx import FakePbx
from tests.pipeline_server import PipelineServer
from tests.webhook_sink import WebhookSink


@pytest.fixture
async def http(service: Service) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{service.api_port}",
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as session:
        yield session


async def call_api(
    http: aiohttp.ClientSession, method: str, path: str, body: Any = None, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, path, json=body, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def test_requests_need_the_key(service: Service) -> None:
    base = f"http://127.0.0.1:{service.api_port}"
    async with aiohttp.ClientSession(base_url=base) as anonymous:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key"},
            {"Authorization": f"Basic {API_KEY}"},
        ):
            async with anonymous.get("/assistant", headers=headers) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await response.json())["statusCode"] == 401
        async with anonymous.get("/health") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
        async with anonymous.get("/metrics") as response:
            # Open on loopback by default (api.metrics_require_key unset).
            assert response.status == 200
            assert "sipbridge_calls_active" in await response.text()


async def test_aiohttp_refusals_have_the_vapi_error_shape(http: aiohttp.ClientSession) -> None:
    status, body = await call_api(http, "GET", "/no-such-route")
    assert (status, body) == (
        404,
        {"message": "Not Found", "error": "Not Found", "statusCode": 404},
    )
    status, body = await call_api(http, "PUT", "/assistant")
    assert status == 405 and body["statusCode"] == 405
    async with http.post(
        "/assistant",
        data=io.BytesIO(b"{" + b" " * (1 << 20) + b"}"),
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 413
        assert (await response.json())["statusCode"] == 413


async def test_a_key_that_is_not_utf8_is_refused_not_a_500(service: Service) -> None:
    status, body = await raw_request(
        service.api_port,
        b"GET /assistant HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert status == 401
    assert json.loads(body) == {
        "message": "missing or invalid API key",
        "error": "Unauthorized",
        "statusCode": 401,
    }


async def test_bodies_too_deep_or_not_json_are_400s(http: aiohttp.ClientSession) -> None:
    headers = {"Content-Type": "application/json"}
    too_deep = [f"body: nested deeper than {MAX_BODY_DEPTH} levels"]

    def metadata(depth: int) -> bytes:
        """An assistant whose body nests ``depth`` objects deep."""
        return b'{"metadata":' + b'{"a":' * (depth - 2) + b"{}" + b"}" * (depth - 2) + b"}"

    async with http.post("/assistant", data=metadata(MAX_BODY_DEPTH), headers=headers) as response:
        assert response.status == 201
    for depth in (MAX_BODY_DEPTH + 1, 255, 300, 5000):  # 255: pydantic's "Circular reference"
        for body in (metadata(depth), b'{"name":' + b"[" * depth + b"]" * depth + b"}"):
            async with http.post("/assistant", data=body, headers=headers) as response:
                assert response.status == 400, (depth, await response.text())
                assert (await response.json())["message"] == too_deep, depth
    # NaN and Infinity are not JSON; 1e400 is beyond a float: refused, not stored as null.
    for value in (b"NaN", b"-Infinity", b"1e400"):
        body = b'{"metadata": {"a": ' + value + b"}}"
        async with http.post("/assistant", data=body, headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["message"] == ["body: must be valid JSON"]
    status, _ = await call_api(http, "POST", "/assistant", {"metadata": {"a": 10**30}})
    assert status == 201


def test_nesting_depth_is_measured_without_recursion() -> None:
    assert nesting_depth(1) == 0
    assert nesting_depth({"a": [1, {"b": []}], "c": {}}) == 4
    deep: Any = []
    for _ in range(100_000):  # far past the recursion limit
        deep = [deep]
    assert nesting_depth(deep) == 100_001


async def test_list_bounds_beyond_utc_years_are_400s(http: aiohttp.ClientSession) -> None:
    for path in ("/assistant", "/phone-number", "/call"):
        for name, value in (
            ("createdAtGt", "0001-01-01T00:00:00+14:00"),
            ("updatedAtLe", "9999-12-31T23:59:59-14:00"),
        ):
            status, body = await call_api(http, "GET", path, params={name: value})
            assert status == 400, (path, body)
            assert body["message"] == [f"{name}: must be within the years 1 to 9999 in UTC"]
        for limit in ("9" * 5000, "1e3", "\xff", "nan"):
            status, body = await call_api(http, "GET", path, params={"limit": limit})
            assert status == 400 and body["message"][0].startswith("limit:")


def test_metrics_need_the_key_off_loopback_unless_told() -> None:
    from bridge.settings import ApiSettings

    assert not ApiSettings(host="127.0.0.1").metrics_need_key()
    assert ApiSettings(host="0.0.0.0").metrics_need_key()
    assert not ApiSettings(host="0.0.0.0", metrics_require_key=False).metrics_need_key()
    assert ApiSettings(host="127.0.0.1", metrics_require_key=True).metrics_need_key()


async def test_assistant_lifecycle(http: aiohttp.ClientSession) -> None:
    status, created = await call_api(
        http,
        "POST",
        "/assistant",
        {"name": "Support", "firstMessage": "Hello {{first_name}}", "custom": {"a": 1}},
    )
    assert status == 201
    assert {"id", "orgId", "createdAt", "updatedAt"} <= set(created)
    assert created["custom"] == {"a": 1}
    status, shown = await call_api(http, "GET", f"/assistant/{created['id']}")
    assert (status, shown) == (200, created)
    status, listed = await call_api(http, "GET", "/assistant")
    assert status == 200 and [a["id"] for a in listed] == [created["id"]]
    status, patched = await call_api(
        http, "PATCH", f"/assistant/{created['id']}", {"name": "Sales", "custom": None}
    )
    assert status == 200 and patched["name"] == "Sales" and "custom" not in patched
    status, deleted = await call_api(http, "DELETE", f"/assistant/{created['id']}")
    assert status == 200 and deleted["id"] == created["id"]
    status, missing = await call_api(http, "GET", f"/assistant/{created['id']}")
    assert status == 404 and missing["error"] == "Not Found"


async def test_validation_errors_list_every_problem(http: aiohttp.ClientSession) -> None:
    status, body = await call_api(
        http, "POST", "/assistant", {"name": "x" * 41, "maxDurationSeconds": 1}
    )
    assert status == 400
    assert body["error"] == "Bad Request" and body["statusCode"] == 400
    assert sorted(m.split(":")[0] for m in body["message"]) == ["maxDurationSeconds", "name"]
    async with http.post(
        "/assistant", data=b"{not json", headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        assert (await response.json())["message"] == ["body: must be valid JSON"]
    status, body = await call_api(http, "POST", "/phone-number", [1, 2])
    assert status == 400 and body["message"] == ["body: must be a JSON object"]
    status, body = await call_api(
        http, "GET", "/assistant", params={"limit": "5000", "createdAtGt": "yesterday"}
    )
    assert status == 400 and len(body["message"]) == 2


async def test_phone_numbers(http: aiohttp.ClientSession) -> None:
    _, assistant = await call_api(http, "POST", "/assistant", {"name": "A"})
    status, number = await call_api(
        http,
        "POST",
        "/phone-number",
        {
            "provider": "vapi",
            "sipUri": "sip:Alice@sip.example.com",
            "assistantId": assistant["id"],
            "name": "Front desk",
        },
    )
    assert status == 201, number
    status, clash = await call_api(
        http, "POST", "/phone-number", {"provider": "vapi", "sipUri": "sip:alice@SIP.example.com"}
    )
    assert status == 400 and "already used" in clash["message"][0]
    status, patched = await call_api(
        http,
        "PATCH",
        f"/phone-number/{number['id']}",
        {"assistantId": None, "serverUrl": "https://hooks.example.com/vapi"},
    )
    assert status == 200
    assert "assistantId" not in patched
    assert patched["server"] == {"url": "https://hooks.example.com/vapi"}
    assert patched["serverUrl"] == "https://hooks.example.com/vapi"
    status, dangling = await call_api(
        http, "PATCH", f"/phone-number/{number['id']}", {"assistantId": "nope"}
    )
    assert status == 400 and dangling["message"] == ["assistantId: no assistant has id nope"]
    status, _ = await call_api(http, "DELETE", "/phone-number/nope")
    assert status == 404


async def test_calls_live_and_stored(
    service: Service, http: aiohttp.ClientSession, pipeline: PipelineServer
) -> None:
    _, assistant = await call_api(
        http,
        "POST",
        "/assistant",
        {"name": "A", "sipbridge": {"pipeline": {"url": pipeline.url}}},
    )
    await call_api(
        http,
        "POST",
        "/phone-number",
        {"provider": "vapi", "sipUri": "sip:alice@x", "assistantId": assistant["id"]},
    )
    pbx = FakePbx()
    facts = invite_facts(
        pbx="test",
        pbx_call_id="p1",
        channel="c",
        request_user="alice",
        request_host="x",
        headers=[("X-First_Name", "John")],
    )
    call = service.callflow.offer(facts, pbx)
    assert call is not None
    await pbx.wait_for("connect_media")
    status, active = await call_api(
        http, "GET", "/call", params={"status": "ringing,in-progress,forwarding"}
    )
    assert status == 200 and [c["id"] for c in active] == [call.id]
    assert active[0]["status"] == "in-progress"
    status, hung_up = await call_api(http, "POST", f"/call/{call.id}/hangup")
    assert status == 200 and hung_up["endedReason"] == "manually-canceled"
    status, again = await call_api(http, "POST", f"/call/{call.id}/hangup")
    assert status == 409 and again["error"] == "Conflict"
    assert await service.recorder.flush()
    status, shown = await call_api(http, "GET", f"/call/{call.id}")
    assert status == 200 and shown["status"] == "ended"
    assert shown["assistantOverrides"]["variableValues"] == {"first_name": "John"}
    status, ended = await call_api(
        http, "GET", "/call", params={"status": "ended", "assistantId": assistant["id"]}
    )
    assert [c["id"] for c in ended] == [call.id]
    status, _ = await call_api(http, "GET", "/call", params={"status": "bogus"})
    assert status == 400
    for path in ("/call/nope", "/call/nope/hangup"):
        status, _ = await call_api(http, "GET" if "hangup" not in path else "POST", path)
        assert status == 404


def test_list_query_parsing() -> None:
    query = list_query(
        {
            "limit": "10",
            "createdAtGt": "2024-01-01T00:00:00Z",
            "updatedAtLe": "2024-02-01T10:00:00+02:00",
        }
    )
    assert query.limit == 10
    assert query.created_gt == "2024-01-01T00:00:00.000Z"
    assert query.updated_le == "2024-02-01T08:00:00.000Z"
    with pytest.raises(ValidationFailed):
        list_query({"limit": "-1"})


async def test_the_official_vapi_sdk_round_trip(service: Service) -> None:
    """vapi-server-sdk pointed at sipbridge, as an existing Vapi user would use it."""
    base_url = f"http://127.0.0.1:{service.api_port}"
    async with httpx.AsyncClient(timeout=10) as transport:
        await _sdk_round_trip(
            service, AsyncVapi(token=API_KEY, base_url=base_url, httpx_client=transport)
        )
        wrong = AsyncVapi(token="wrong", base_url=base_url, httpx_client=transport)
        with pytest.raises(ApiError) as unauthorised:
            await wrong.assistants.list()
        assert unauthorised.value.status_code == 401


async def _sdk_round_trip(service: Service, vapi: AsyncVapi) -> None:
    assistant = await vapi.assistants.create(
        name="SIP Demo", first_message="Hello {{first_name}}, you've reached me over SIP."
    )
    assert (
        assistant.id
        and assistant.first_message == "Hello {{first_name}}, you've reached me over SIP."
    )
    number = await vapi.phone_numbers.create(
        request=CreatePhoneNumbersRequest_Vapi(
            sip_uri="sip:demo@sip.example.com", assistant_id=assistant.id, name="Demo"
        )
    )
    assert number.sip_uri == "sip:demo@sip.example.com" and number.assistant_id == assistant.id

    assert [a.id for a in await vapi.assistants.list()] == [assistant.id]
    assert (await vapi.assistants.get(assistant.id)).name == "SIP Demo"
    assert [n.id for n in await vapi.phone_numbers.list()] == [number.id]
    fetched = await vapi.phone_numbers.get(number.id)
    assert fetched.sip_uri == "sip:demo@sip.example.com"

    updated = await vapi.phone_numbers.update(
        number.id,
        request=UpdatePhoneNumbersRequestBody_Vapi(
            assistant_id=None, server=Server(url="https://hooks.example.com/vapi")
        ),
    )
    assert updated.assistant_id is None
    assert updated.server is not None and updated.server.url == "https://hooks.example.com/vapi"
    stored = await service.resources.get("phone_number", number.id)
    assert "assistantId" not in stored and stored["serverUrl"] == "https://hooks.example.com/vapi"

    await vapi.phone_numbers.delete(number.id)
    await vapi.assistants.delete(assistant.id)
    with pytest.raises(ApiError) as caught:
        await vapi.assistants.get(assistant.id)
    assert caught.value.status_code == 404


@pytest.fixture
async def reporting(
    make_settings: Callable[..., Settings], sink: WebhookSink
) -> AsyncIterator[Service]:
    """A service whose server messages go to ``sink``."""
    service = Service(make_settings(webhooks={"default_server_url": sink.url}))
    await service.start()
    yield service
    await service.aclose()


async def test_a_recording_downloads_with_the_key_and_by_its_signed_links(
    reporting: Service, pipeline: PipelineServer, sink: WebhookSink
) -> None:
    service = reporting
    call_id = await recorded_call(
        service, pipeline, {"sipbridge": {"pipeline": {"url": pipeline.url}}}
    )
    report = (await sink.wait_for_message("end-of-call-report")).message
    artifact = report["artifact"]
    assert artifact["recording"] == {
        "stereoUrl": artifact["stereoRecordingUrl"],
        "mono": {"combinedUrl": artifact["recordingUrl"]},
    }
    assert artifact["presignedUrlsExpiresAt"] > report["endedAt"]
    base = f"http://127.0.0.1:{service.api_port}"
    async with aiohttp.ClientSession() as anonymous:
        # The report's links need no key ...
        async with anonymous.get(artifact["stereoRecordingUrl"]) as response:
            assert response.status == 200 and response.content_type == "audio/wav"
            stereo = await response.read()
        async with anonymous.get(artifact["recordingUrl"]) as response:
            mono = await response.read()
        # ... the API's route does.
        async with anonymous.get(f"{base}/call/{call_id}/recording") as response:
            assert response.status == 401
        # A changed or expired link is refused.
        tampered = artifact["recordingUrl"].replace(".mono.", ".stereo.")
        expired = re.sub(r"expires=\d+", "expires=1000", artifact["recordingUrl"])
        for url in (tampered, expired, f"{base}/recording/{call_id}.mono.wav"):
            async with anonymous.get(url) as response:
                assert response.status == 403
    async with aiohttp.ClientSession(
        base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as http:
        async with http.get(f"/call/{call_id}/recording") as response:
            assert response.status == 200 and await response.read() == stereo
        async with http.get(f"/call/{call_id}/recording?channel=mono") as response:
            assert await response.read() == mono
        status, problem = await call_api(http, "GET", f"/call/{call_id}/recording?channel=x")
        assert status == 400
        status, shown = await call_api(http, "GET", f"/call/{call_id}")
        assert shown["artifact"]["recording"]["stereoUrl"].startswith(f"{base}/recording/")
    with wave.open(io.BytesIO(stereo)) as recording:
        samples = array.array("h", recording.readframes(recording.getnframes()))
    said = samples[0::2].tobytes()
    assert tone_share(said[: 2 * 3600], 8000, 440) > 0.95
    played = samples[1::2].tobytes()
    assert tone_share(played, 8000, 1000) > 0.3  # the pipeline's 0.4 s, then silence
    recorded_frames = report["call"]["sipbridge"]["media"]["recordedFrames"]
    assert len(played) == recorded_frames * 320  # the call's duration, to the frame
    with wave.open(io.BytesIO(mono)) as recording:
        assert recording.getnchannels() == 1 and recording.getnframes() == len(played) // 2


async def test_deleting_a_call_removes_its_record_and_its_recordings(
    reporting: Service, pipeline: PipelineServer, sink: WebhookSink
) -> None:
    """[recording] a deleted call's recording goes with it (a caller who asks to be
    forgotten); a call that has not ended cannot be deleted."""
    service = reporting
    assistant = {"sipbridge": {"pipeline": {"url": pipeline.url}}}
    call_id = await recorded_call(service, pipeline, assistant)
    await sink.wait_for_message("end-of-call-report")
    files = sorted(path.name for path in service.recordings_path.glob(f"{call_id}.*"))
    assert files == [f"{call_id}.mono.wav", f"{call_id}.stereo.wav"]
    live, _ = await offer_accepted(service, "live", assistant)
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{service.api_port}",
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as http:
        status, problem = await call_api(http, "DELETE", f"/call/{live.id}")
        assert status == 409 and "has not ended" in problem["message"]
        status, deleted = await call_api(http, "DELETE", f"/call/{call_id}")
        assert status == 200 and (deleted["id"], deleted["status"]) == (call_id, "ended")
        assert (await call_api(http, "GET", f"/call/{call_id}"))[0] == 404
        assert (await call_api(http, "GET", f"/call/{call_id}/recording"))[0] == 404
        assert (await call_api(http, "DELETE", f"/call/{call_id}"))[0] == 404
        listed = (await call_api(http, "GET", "/call"))[1]
        assert [call["id"] for call in listed] == [live.id]
    assert list(service.recordings_path.glob(f"{call_id}.*")) == []
    assert await service.callflow.hangup(live.id)


async def test_a_call_not_recorded_has_no_recording_nor_links(
    reporting: Service, pipeline: PipelineServer, sink: WebhookSink
) -> None:
    service = reporting
    call_id = await recorded_call(
        service,
        pipeline,
        {
            "sipbridge": {"pipeline": {"url": pipeline.url}},
            "artifactPlan": {"recordingEnabled": False},
        },
    )
    report = (await sink.wait_for_message("end-of-call-report")).message
    assert "recordingUrl" not in report["artifact"]
    assert list(service.recordings_path.glob("*")) == []
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{service.api_port}",
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as http:
        status, problem = await call_api(http, "GET", f"/call/{call_id}/recording")
        assert status == 404 and problem["message"] == f"call {call_id} has no stereo recording"
        status, problem = await call_api(http, "GET", "/call/nope/recording")
        assert status == 404 and problem["message"] == "Call not found: nope"


async def test_outbound_calls_through_the_api_and_the_vapi_sdk(service: Service) -> None:
    """``POST /call`` as the SDK's ``calls.create`` sends it: 201 with the queued call, read
    back by ``calls.get``; a bad body is a 400, no PBX able to place it a 503."""
    base_url = f"http://127.0.0.1:{service.api_port}"
    assistant = await service.resources.create(
        "assistant",
        {"name": "Out", "sipbridge": {"pipeline": {"url": "ws://127.0.0.1:9/pipeline"}}},
    )
    number = await service.resources.create(
        "phone_number", {"sipUri": "sip:+15550100@pbx.example.com", "assistantId": assistant["id"]}
    )
    body = {
        "assistantId": assistant["id"],
        "phoneNumberId": number["id"],
        "customer": {"sipUri": "sip:bob@example.org"},
    }
    async with aiohttp.ClientSession(
        base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as http:
        status, refused = await call_api(http, "POST", "/call", body)
        assert status == 503 and "no PBX can place outbound calls" in refused["message"]
        pbx = FakePbx(kind="asterisk")
        service.backends["asterisk"] = pbx  # type: ignore[assignment]
        try:
            status, problem = await call_api(http, "POST", "/call", {**body, "customer": {}})
            assert status == 400
            assert problem["message"] == ["customer: needs exactly one of number and sipUri"]
            async with httpx.AsyncClient(timeout=10) as transport:
                vapi = AsyncVapi(token=API_KEY, base_url=base_url, httpx_client=transport)
                created = await vapi.calls.create(
                    assistant_id=assistant["id"],
                    phone_number_id=number["id"],
                    customer=CreateCustomerDto(sip_uri="sip:bob@example.org", name="Bob"),
                )
                assert isinstance(created, Call) and created.type == "outboundPhoneCall"
                assert created.status == "queued"
                call_id, dial = await pbx.wait_for("originate")
                assert call_id == created.id and dial.customer["sipUri"] == "sip:bob@example.org"
                fetched = await vapi.calls.get(created.id)
                assert fetched.status in ("queued", "ringing") and fetched.customer is not None
                assert fetched.customer.name == "Bob"
            status, hung_up = await call_api(http, "POST", f"/call/{created.id}/hangup")
            assert status == 200 and hung_up["endedReason"] == "manually-canceled"
        finally:
            service.backends.pop("asterisk")
