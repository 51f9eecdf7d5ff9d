"""Server messages: the webhook bodies Vapi sends, built from a call, and where each one goes.

Every message is ``{"message": {"type": ..., "timestamp": <ms>, "call", "phoneNumber",
"customer", "assistant", "artifact", ...}}``, the envelope of Vapi's server events
(docs.vapi.ai/server-url/events). Secrets are never copied into a payload. Routing of a message
follows Vapi's server URL priority (docs.vapi.ai/server-url/setting-server-urls, and the
``ServerMessage`` description in Vapi's API reference): ``assistant.server`` beats
``phoneNumber.server``, which beats the service default (Vapi's org-level server URL);
``assistant-request`` goes to the number's server or the default. ``assistant.serverMessages`` (or
Vapi's default list, given in its API reference under ``CreateAssistantDTO.serverMessages``)
filters what is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bridge.calls import Call, CallStatus
from bridge.models import DEFAULT_SERVER_MESSAGES, format_timestamp, server_of, without_secrets

ASSISTANT_REQUEST = "assistant-request"
STATUS_UPDATE = "status-update"
END_OF_CALL_REPORT = "end-of-call-report"


@dataclass(frozen=True)
class WebhookTarget:
    """Where one message is POSTed and how it is authenticated."""

    url: str
    secret: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float | None = None

    @classmethod
    def from_server(cls, server: Mapping[str, Any]) -> WebhookTarget:
        """From a Vapi ``Server`` object (``url``, ``secret``, ``headers``, ``timeoutSeconds``)."""
        timeout = server.get("timeoutSeconds")
        return cls(
            url=str(server["url"]),
            secret=server.get("secret") or None,
            headers=dict(server.get("headers") or {}),
            timeout_s=float(timeout) if timeout is not None else None,
        )


def target_for(
    message_type: str, call: Call, default_server: Mapping[str, Any] | None
) -> WebhookTarget | None:
    """Where ``message_type`` for ``call`` goes, or None when nobody asked for it."""
    if message_type == ASSISTANT_REQUEST:
        server = server_of(call.phone_number) or default_server
        return WebhookTarget.from_server(server) if server else None
    wanted = DEFAULT_SERVER_MESSAGES
    if call.assistant is not None and isinstance(call.assistant.get("serverMessages"), list):
        wanted = tuple(call.assistant["serverMessages"])
    if message_type not in wanted:
        return None
    server = server_of(call.assistant) or server_of(call.phone_number) or default_server
    return WebhookTarget.from_server(server) if server else None


def _envelope(message_type: str, call: Call, now: datetime, **fields: Any) -> dict[str, Any]:
    call_json = call.to_json()
    message: dict[str, Any] = {
        "type": message_type,
        "timestamp": int(now.timestamp() * 1000),
        "call": call_json,
        "phoneNumber": without_secrets(call.phone_number),
        "customer": call_json["customer"],
        "artifact": call_json["artifact"],
    }
    if call.assistant is not None:
        message["assistant"] = without_secrets(call.assistant)
    message.update(fields)
    return {"message": message}


def assistant_request(call: Call, now: datetime) -> dict[str, Any]:
    """The ``assistant-request`` body (spec ``ServerMessageAssistantRequest``)."""
    return _envelope(ASSISTANT_REQUEST, call, now, assistantVersion=None)


def status_update(call: Call, now: datetime) -> dict[str, Any]:
    """A ``status-update`` for the call's current status."""
    fields: dict[str, Any] = {"status": call.status.value}
    if call.status is CallStatus.ENDED and call.ended_reason is not None:
        fields["endedReason"] = call.ended_reason.value
    if call.status is CallStatus.FORWARDING and call.destination is not None:
        fields["destination"] = call.destination
        fields["messages"] = list(call.messages)
        fields["transcript"] = call.transcript
    return _envelope(STATUS_UPDATE, call, now, **fields)


def _openai_format(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    roles = {"bot": "assistant", "user": "user", "system": "system", "assistant": "assistant"}
    return [
        {"role": roles[m["role"]], "content": str(m.get("message", m.get("content", "")))}
        for m in messages
        if isinstance(m, dict) and m.get("role") in roles
    ]


def end_of_call_report(
    call: Call, now: datetime, recording: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``end-of-call-report`` (spec ``ServerMessageEndOfCallReport``).

    Also carries the legacy top-level ``durationSeconds``, ``transcript`` and ``messages`` that
    many existing handlers still read.

    Args:
        recording: the artifact's recording links (``recordingUrl``, ...) when the call was
            recorded.
    """
    call_json = call.to_json()
    artifact = {
        **call_json["artifact"],
        "messagesOpenAIFormatted": _openai_format(call.messages),
        **(recording or {}),
    }
    fields: dict[str, Any] = {
        "endedReason": call.ended_reason.value if call.ended_reason else None,
        "startedAt": format_timestamp(call.started_at) if call.started_at else None,
        "endedAt": format_timestamp(call.ended_at) if call.ended_at else None,
        "durationSeconds": call.duration_seconds,
        "durationMs": int(call.duration_seconds * 1000),
        "cost": 0,
        "costs": [],
        "analysis": {},
        "artifact": artifact,
        "transcript": call.transcript,
        "messages": list(call.messages),
    }
    if call.destination is not None:
        fields["destination"] = call.destination
    return _envelope(END_OF_CALL_REPORT, call, now, **fields)
