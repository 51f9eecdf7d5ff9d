"""The Vapi-compatible resources: assistants, SIP phone numbers, transfer destinations, servers.

A resource is kept as the JSON document a client sent (camelCase keys, unknown fields kept), after
the schemas below validated and normalised it. Field names, ranges and defaults follow Vapi's
OpenAPI spec (``CreateAssistantDTO``, ``CreateVapiPhoneNumberDTO``, ``Server``,
``TransferDestinationNumber``/``TransferDestinationSip``); see ``docs/api.md`` for what sipbridge
adds (the ``sipbridge`` extension object) and what it refuses.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from bridge.errors import ValidationFailed
from bridge.protocol.dialects import DialectName, Encoding, SampleRate

JsonObject = dict[str, Any]

# RFC 3261 token characters: what a SIP header name may contain.
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
MAX_HEADER_VALUE_CHARS = 1024
MAX_CUSTOM_HEADERS = 32

# sip:user@host[:port] - the form Vapi documents for SIP numbers (`sip:<any-username>@sip.vapi.ai`).
# The user part allows RFC 3261 unreserved characters and escapes; no URI parameters.
SIP_URI = re.compile(
    r"^sip:(?P<user>[A-Za-z0-9\-_.!~*'()&=+$,?/%]{1,128})"
    r"@(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?$"  # [0-9]: \d also matches every script's decimal digits
)
# Transfer targets may carry parameters and use sips:.
_TRANSFER_SIP_URI = re.compile(r"^sips?:[^\s<>\"@]{1,128}@[^\s<>\"]{1,255}$")
_PHONE_NUMBER = re.compile(r"^\+?[A-Za-z0-9]{1,32}$")

# Vapi's default assistant.serverMessages (spec CreateAssistantDTO.serverMessages).
DEFAULT_SERVER_MESSAGES: tuple[str, ...] = (
    "conversation-update",
    "end-of-call-report",
    "function-call",
    "hang",
    "speech-update",
    "status-update",
    "tool-calls",
    "transfer-destination-request",
    "handoff-destination-request",
    "user-interrupted",
    "assistant.started",
)
DEFAULT_MAX_DURATION_S = 600
DEFAULT_SILENCE_TIMEOUT_S = 30


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 in UTC with milliseconds, as Vapi writes them: ``2024-01-01T00:00:00.000Z``."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def parse_timestamp(text: str) -> datetime:
    """The moment :func:`format_timestamp` wrote (any ISO-8601 with a zone is read).

    Raises:
        ValueError: not such a timestamp.
    """
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without a zone: {text!r}")
    return moment


def parse_sip_uri(uri: str) -> tuple[str, str, int | None] | None:
    """Splits ``sip:user@host[:port]`` into (user, lowercase host, port), or None if malformed."""
    match = SIP_URI.match(uri.strip())
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        return None
    return match["user"], match["host"].lower(), port


def sip_uri_key(uri: str) -> str:
    """The form two SIP URIs are compared in: user part and host, case-insensitively.

    The port is left out because routing ignores it (an INVITE's request-URI port is the PBX's,
    not the number's): two numbers differing only by port would match the same calls.
    """
    parsed = parse_sip_uri(uri)
    if parsed is None:
        return uri.strip().lower()
    user, host, _port = parsed
    return f"sip:{user.lower()}@{host}"


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    """Custom SIP/HTTP headers: token names, printable single-line values, a bounded count."""
    if len(headers) > MAX_CUSTOM_HEADERS:
        raise ValueError(f"at most {MAX_CUSTOM_HEADERS} headers")
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"header name {name!r} is not a valid token")
        if len(value) > MAX_HEADER_VALUE_CHARS:
            raise ValueError(f"header {name!r} is longer than {MAX_HEADER_VALUE_CHARS} characters")
        if _FORBIDDEN_IN_VALUE.search(value):
            raise ValueError(f"header {name!r} contains a control character")
    return headers


def _check_http_url(url: str) -> str:
    if not re.match(r"^https?://[^\s/?#]+", url) or any(c.isspace() for c in url):
        raise ValueError("must be an http:// or https:// URL")
    return url


def _check_ws_url(url: str) -> str:
    if not re.match(r"^wss?://[^\s/?#]+", url) or any(c.isspace() for c in url):
        raise ValueError("must be a ws:// or wss:// URL")
    return url


def _check_sip_uri(uri: str) -> str:
    if parse_sip_uri(uri) is None:
        raise ValueError("must be a SIP URI like sip:user@host")
    return uri


def _check_transfer_sip_uri(uri: str) -> str:
    if not _TRANSFER_SIP_URI.match(uri):
        raise ValueError("must be a SIP URI like sip:agent@pbx.example.com")
    return uri


def _check_phone_number(number: str) -> str:
    if not _PHONE_NUMBER.match(number):
        raise ValueError("must be a number like +14155552671 (letters and digits, optional +)")
    return number


def _check_extension(extension: str) -> str:
    if not re.match(r"^[0-9*#wW]{1,10}$", extension):
        raise ValueError("must be up to 10 of 0-9 * # w")
    return extension


CustomHeaders = Annotated[dict[str, str], AfterValidator(_check_headers)]
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]


class _Schema(BaseModel):
    """Vapi's camelCase on the wire; unknown fields are kept, not rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=False, extra="allow", strict=True
    )


class Server(_Schema):
    """Where server messages go (spec ``Server``)."""

    url: HttpUrl
    timeout_seconds: float | None = Field(None, ge=1, le=300)
    headers: CustomHeaders | None = None
    # Removed from Vapi's spec in 2025-05 but still sent by existing servers: the x-vapi-secret.
    secret: str | None = Field(None, max_length=1000)


class TransferDestinationNumber(_Schema):
    """Transfer to a phone number (spec ``TransferDestinationNumber``)."""

    type: Literal["number"]
    number: Annotated[str, AfterValidator(_check_phone_number)]
    extension: Annotated[str, AfterValidator(_check_extension)] | None = None
    caller_id: str | None = Field(None, max_length=200)
    message: str | JsonObject | None = None
    description: str | None = None
    transfer_plan: JsonObject | None = None
    sip_headers: CustomHeaders | None = None


class TransferDestinationSip(_Schema):
    """Transfer to a SIP URI (spec ``TransferDestinationSip``)."""

    type: Literal["sip"]
    sip_uri: Annotated[str, AfterValidator(_check_transfer_sip_uri)]
    sip_headers: CustomHeaders | None = None
    caller_id: str | None = Field(None, max_length=200)
    message: str | JsonObject | None = None
    description: str | None = None
    transfer_plan: JsonObject | None = None


TransferDestination = Annotated[
    TransferDestinationNumber | TransferDestinationSip, Field(discriminator="type")
]


class PipelineSpec(_Schema):
    """sipbridge extension: the websocket that runs this assistant's conversation."""

    url: str | None = Field(None, description="ws:// or wss:// URL")
    format: DialectName | None = None
    encoding: Encoding | None = None
    sample_rate: SampleRate | None = None
    headers: CustomHeaders | None = None

    @field_validator("url")
    @classmethod
    def _ws(cls, value: str | None) -> str | None:
        return None if value is None else _check_ws_url(value)


class SipbridgeExtension(_Schema):
    """Fields Vapi does not have, under one key so they never collide with Vapi's."""

    pipeline: PipelineSpec | None = None


FirstMessageMode = Literal[
    "assistant-speaks-first",
    "assistant-waits-for-user",
    "assistant-speaks-first-with-model-generated-message",
]


class AssistantSchema(_Schema):
    """The subset of ``CreateAssistantDTO`` sipbridge checks; everything else is kept as sent."""

    name: str | None = Field(None, max_length=40)
    first_message: str | None = Field(None, max_length=10_000)
    first_message_mode: FirstMessageMode | None = None
    first_message_interruptions_enabled: bool | None = None
    model: JsonObject | None = None
    voice: JsonObject | None = None
    transcriber: JsonObject | None = None
    end_call_message: str | None = Field(None, max_length=1000)
    end_call_phrases: list[Annotated[str, Field(min_length=1, max_length=140)]] | None = None
    voicemail_message: str | None = Field(None, max_length=1000)
    max_duration_seconds: int | None = Field(None, ge=10, le=43200)
    silence_timeout_seconds: int | None = Field(None, ge=10, le=3600)
    metadata: JsonObject | None = None
    server: Server | None = None
    server_url: HttpUrl | None = None
    server_url_secret: str | None = None
    server_messages: list[str] | None = None
    sipbridge: SipbridgeExtension | None = None

    @field_validator("model")
    @classmethod
    def _messages(cls, model: JsonObject | None) -> JsonObject | None:
        if model is None:
            return None
        messages = model.get("messages")
        if messages is None:
            return model
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise ValueError("model.messages must be a list of {role, content} objects")
        return model


class PhoneNumberSchema(_Schema):
    """``CreateVapiPhoneNumberDTO``: a SIP URI that reaches an assistant."""

    provider: Literal["vapi"]
    sip_uri: Annotated[str, AfterValidator(_check_sip_uri)]
    name: str | None = Field(None, max_length=40)
    assistant_id: str | None = None
    squad_id: str | None = None
    workflow_id: str | None = None
    server: Server | None = None
    server_url: HttpUrl | None = None
    server_url_secret: str | None = None
    fallback_destination: TransferDestination | None = None
    authentication: JsonObject | None = None
    hooks: list[JsonObject] | None = None
    number_desired_area_code: None = Field(
        None, description="PSTN numbers are not available: sipbridge serves SIP URIs."
    )

    @model_validator(mode="before")
    @classmethod
    def _provider_default(cls, data: Any) -> Any:
        # Raw HTTP clients following Vapi's SIP guide may omit provider; the SDK always sends it.
        if isinstance(data, dict) and "provider" not in data:
            return {**data, "provider": "vapi"}
        return data


def _problems(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        # A discriminated union adds its tag to the location ("fallbackDestination.sip.sipUri").
        loc = [str(p) for p in error["loc"]]
        if len(loc) > 1 and loc[0] == "fallbackDestination" and loc[1] in ("number", "sip"):
            del loc[1]
        where = prefix + ".".join(loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "literal_error" and where.endswith("provider"):
            message = "must be 'vapi' (sipbridge serves SIP phone numbers only)"
        if where.endswith("numberDesiredAreaCode"):
            message = "not supported: sipbridge serves SIP URIs, not PSTN numbers"
        lines.append(f"{where}: {message}" if where else message)
    return lines


def _validated(schema: type[_Schema], document: Mapping[str, Any], prefix: str = "") -> JsonObject:
    if not isinstance(document, Mapping):
        raise ValidationFailed([f"{prefix or 'body'}: must be a JSON object"])
    try:
        model = schema.model_validate(dict(document), by_alias=True)
    except ValidationError as exc:
        raise ValidationFailed(_problems(exc, prefix)) from exc
    dumped: JsonObject = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return dumped


def _merge_server_forms(document: JsonObject, prefix: str) -> JsonObject:
    """Accepts ``server`` and the legacy ``serverUrl``/``serverUrlSecret``; shows both."""
    server = document.get("server")
    url, secret = document.get("serverUrl"), document.get("serverUrlSecret")
    problems = []
    if isinstance(server, dict):
        if url is not None and url != server.get("url"):
            problems.append(f"{prefix}serverUrl: differs from server.url; send one of them")
        if secret is not None and server.get("secret") not in (None, secret):
            problems.append(
                f"{prefix}serverUrlSecret: differs from server.secret; send one of them"
            )
        if problems:
            raise ValidationFailed(problems)
        if secret is not None:
            server = {**server, "secret": secret}
    elif url is not None:
        server = {"url": url} | ({"secret": secret} if secret is not None else {})
    elif secret is not None:
        raise ValidationFailed([f"{prefix}serverUrlSecret: needs serverUrl or server.url"])
    result = {
        k: v for k, v in document.items() if k not in ("server", "serverUrl", "serverUrlSecret")
    }
    if isinstance(server, dict):
        result["server"] = server
        result["serverUrl"] = server["url"]
        if server.get("secret") is not None:
            result["serverUrlSecret"] = server["secret"]
    return result


def validate_assistant(document: Mapping[str, Any], prefix: str = "") -> JsonObject:
    """Checks an assistant body (POST /assistant, or an inline assistant in an answer).

    Returns:
        The normalised document: known fields checked, unknown ones kept, both server forms shown.

    Raises:
        ValidationFailed: one line per problem.
    """
    return _merge_server_forms(_validated(AssistantSchema, document, prefix), prefix)


def validate_phone_number(document: Mapping[str, Any]) -> JsonObject:
    """Checks a phone-number body (POST /phone-number).

    Raises:
        ValidationFailed: one line per problem.
    """
    return _merge_server_forms(_validated(PhoneNumberSchema, document), "")


def validate_destination(document: Any, prefix: str = "destination.") -> JsonObject:
    """Checks a transfer destination (``number`` or ``sip``).

    Raises:
        ValidationFailed: one line per problem.
    """
    if not isinstance(document, Mapping) or document.get("type") not in ("number", "sip"):
        raise ValidationFailed([f"{prefix}type: must be 'number' or 'sip'"])
    schema: type[_Schema] = (
        TransferDestinationSip if document["type"] == "sip" else TransferDestinationNumber
    )
    return _validated(schema, document, prefix)


class Customer(_Schema):
    """Who an outbound call dials (spec ``CreateCustomerDTO``): a number or a SIP URI."""

    number: Annotated[str, AfterValidator(_check_phone_number)] | None = None
    sip_uri: Annotated[str, AfterValidator(_check_transfer_sip_uri)] | None = None
    name: str | None = Field(None, max_length=100)
    number_e164_check_enabled: bool | None = None


class OutboundExtension(_Schema):
    """sipbridge extension of ``POST /call``: X- headers for the customer's INVITE."""

    sip_headers: CustomHeaders | None = None

    @field_validator("sip_headers")
    @classmethod
    def _x_only(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name in value or {}:
            if not name.lower().startswith("x-"):
                raise ValueError(f"header {name!r} is not an X- header")
        return value


class CallSchema(_Schema):
    """``POST /call`` for an outbound phone call (spec ``CreateCallDTO``)."""

    phone_number_id: str = Field(min_length=1, max_length=100)
    customer: Customer
    assistant_id: str | None = Field(None, min_length=1, max_length=100)
    assistant: JsonObject | None = None
    assistant_overrides: JsonObject | None = None
    name: str | None = Field(None, max_length=40)
    metadata: JsonObject | None = None
    sipbridge: OutboundExtension | None = None


def validate_outbound_call(document: Mapping[str, Any]) -> JsonObject:
    """Checks a ``POST /call`` body: a phone number, a customer with exactly one of
    ``number`` and ``sipUri``, and exactly one of ``assistantId`` and ``assistant`` (checked
    like ``POST /assistant``).

    Raises:
        ValidationFailed: one line per problem.
    """
    checked = _validated(CallSchema, document)
    problems = []
    customer = checked["customer"]
    if (customer.get("number") is None) == (customer.get("sipUri") is None):
        problems.append("customer: needs exactly one of number and sipUri")
    if (checked.get("assistantId") is None) == (checked.get("assistant") is None):
        problems.append("assistantId: send exactly one of assistantId and assistant")
    if problems:
        raise ValidationFailed(problems)
    if checked.get("assistant") is not None:
        checked["assistant"] = validate_assistant(checked["assistant"], "assistant.")
    return checked


READ_ONLY_FIELDS = ("id", "orgId", "createdAt", "updatedAt")


def apply_patch(existing: Mapping[str, Any], patch: Mapping[str, Any]) -> JsonObject:
    """Vapi PATCH semantics: top-level fields replace, ``null`` clears, read-only ones are ignored.

    The legacy ``serverUrl``/``serverUrlSecret`` in a patch update ``server`` (and the reverse), so
    a client may keep using whichever form it knows.
    """
    if not isinstance(patch, Mapping):
        raise ValidationFailed(["body: must be a JSON object"])
    merged = {k: v for k, v in existing.items() if k not in READ_ONLY_FIELDS}
    patch = {k: v for k, v in patch.items() if k not in READ_ONLY_FIELDS}
    if "server" in patch:
        merged.pop("serverUrl", None)
        merged.pop("serverUrlSecret", None)
    elif "serverUrl" in patch or "serverUrlSecret" in patch:
        server = dict(merged.pop("server", None) or {})
        merged.pop("serverUrl", None)
        merged.pop("serverUrlSecret", None)
        if "serverUrl" in patch:
            server["url"] = patch["serverUrl"]
        if "serverUrlSecret" in patch:
            server["secret"] = patch["serverUrlSecret"]
        patch = {k: v for k, v in patch.items() if k not in ("serverUrl", "serverUrlSecret")}
        server = {k: v for k, v in server.items() if v is not None}
        if server.get("url") is not None:
            merged["server"] = server
        elif server:
            raise ValidationFailed(["serverUrlSecret: needs serverUrl or server.url"])
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def without_secrets(document: Mapping[str, Any] | None) -> JsonObject | None:
    """A resource as it may be shown in a call record, a payload or to the pipeline.

    No server secret, and no pipeline handshake headers (where a pipeline's bearer token is).
    """
    if document is None:
        return None
    clean = copy.deepcopy(dict(document))
    clean.pop("serverUrlSecret", None)
    if isinstance(clean.get("server"), dict):
        clean["server"].pop("secret", None)
    extension = clean.get("sipbridge")
    if isinstance(extension, dict) and isinstance(extension.get("pipeline"), dict):
        extension["pipeline"].pop("headers", None)
    return clean


def server_of(document: Mapping[str, Any] | None) -> JsonObject | None:
    """The normalised ``server`` object of an assistant or phone number, if it has a URL."""
    if not document:
        return None
    server = document.get("server")
    if isinstance(server, dict) and server.get("url"):
        return server
    if document.get("serverUrl"):
        result: JsonObject = {"url": document["serverUrl"]}
        if document.get("serverUrlSecret"):
            result["secret"] = document["serverUrlSecret"]
        return result
    return None
