"""Which assistant takes a call: Vapi's SIP-number rules as pure functions.

The decision is made in up to three pure steps, with the I/O between them done by the call flow:

1. :func:`match_phone_number` and :func:`plan_call`: from the INVITE and the stored numbers, either
   use an assistant id, ask a server (``assistant-request``), or reject.
2. :func:`parse_answer`: the server's answer (or its failure) as a fact.
3. :func:`decide_answer` / :func:`accept`: accept with a rendered assistant, transfer, or reject.

Rules, as Vapi documents them: a number with ``assistantId`` uses it; with none, a server URL
(the number's ``server.url``/``serverUrl``, else the service default) gets an ``assistant-request``
(the phone number's ``assistantId`` and ``server`` in Vapi's API reference,
docs.vapi.ai/api-reference/phone-numbers/update) that must be answered within a fixed 7.5 s
(docs.vapi.ai/server-url/events); in the answer ``error`` beats ``destination``, which beats
``assistant``/``assistantId`` (``ServerMessageResponseAssistantRequest`` in Vapi's API reference).
A failed request goes to the number's ``fallbackDestination`` when it has one, else the call is
rejected (``fallbackDestination``, same page). Neither assistant nor server:
``call-start-error-neither-assistant-nor-server-set`` (docs.vapi.ai/calls/call-ended-reason).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from bridge.calls import (
    SIP_DECLINE,
    SIP_NOT_FOUND,
    SIP_SERVICE_UNAVAILABLE,
    SIP_TEMPORARILY_UNAVAILABLE,
    EndedReason,
)
from bridge.errors import ValidationFailed
from bridge.events import InviteFacts, PbxKind, invite_facts
from bridge.models import (
    parse_sip_uri,
    server_of,
    validate_assistant,
    validate_destination,
)
from bridge.protocol.dialects import (
    DEFAULT_DIALECT,
    DEFAULT_ENCODING,
    DEFAULT_SAMPLE_RATE,
    DialectName,
    Encoding,
    resolve_format,
)
from bridge.settings import Settings
from bridge.templating import (
    CpuClock,
    header_variables,
    merge_variables,
    render_assistant,
    render_destination,
    time_variables,
)

log = logging.getLogger(__name__)

# Vapi: "The reply must arrive within 7.5 seconds end to end. This limit is fixed" (events.mdx).
ASSISTANT_REQUEST_BUDGET_S = 7.5


@dataclass(frozen=True)
class PipelineTarget:
    """Where and how a call's conversation is streamed."""

    url: str
    format: DialectName
    encoding: Encoding
    sample_rate: int
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutingDefaults:
    """The service-wide settings routing needs, as plain data."""

    sip_domains: tuple[str, ...] = ()
    default_assistant_id: str | None = None
    default_server: Mapping[str, Any] | None = None
    pipeline_url: str | None = None
    pipeline_format: DialectName = DEFAULT_DIALECT
    pipeline_encoding: Encoding = DEFAULT_ENCODING
    pipeline_sample_rate: int = DEFAULT_SAMPLE_RATE
    pipeline_headers: Mapping[str, str] = field(default_factory=dict)
    # A pipeline failure sends the call to the number's fallbackDestination (else: hang up).
    pipeline_fallback: bool = True
    # Admission: 0 means no limit.
    max_calls: int = 0
    max_event_loop_lag_s: float = 0.0
    # Outbound calls (POST /call): their ring timeout and caps (0: no limit).
    outbound_ring_timeout_s: int = 60
    outbound_max_concurrent: int = 0
    outbound_max_calls_per_second: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RoutingDefaults:
        """Takes the routing-relevant parts of the settings."""
        server: dict[str, Any] | None = None
        if settings.webhooks.default_server_url:
            server = {"url": settings.webhooks.default_server_url}
            if settings.webhooks.default_server_secret is not None:
                server["secret"] = settings.webhooks.default_server_secret.get_secret_value()
        return cls(
            sip_domains=tuple(settings.sip.domains),
            default_assistant_id=settings.sip.default_assistant_id,
            default_server=server,
            pipeline_url=settings.pipeline.default_url,
            pipeline_format=settings.pipeline.default_format,
            pipeline_encoding=settings.pipeline.default_encoding,
            pipeline_sample_rate=settings.pipeline.default_sample_rate,
            pipeline_headers={
                name: value.get_secret_value()
                for name, value in settings.pipeline.default_headers.items()
            },
            pipeline_fallback=settings.pipeline.on_failure == "fallback",
            max_calls=settings.service.max_calls,
            max_event_loop_lag_s=settings.service.max_event_loop_lag_ms / 1000,
            outbound_ring_timeout_s=settings.outbound.ring_timeout_s,
            outbound_max_concurrent=settings.outbound.max_concurrent,
            outbound_max_calls_per_second=settings.outbound.max_calls_per_second,
        )


# ---- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accept:
    """Answer the call and stream it to ``pipeline`` with this rendered assistant."""

    assistant: dict[str, Any]
    assistant_id: str | None
    variable_values: dict[str, Any]
    variables: dict[str, Any]
    pipeline: PipelineTarget


@dataclass(frozen=True)
class Transfer:
    """Send the call elsewhere without an assistant (blind transfer)."""

    destination: dict[str, Any]
    ended_reason: EndedReason
    detail: str = ""
    variable_values: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reject:
    """Refuse the call with a final SIP status."""

    sip_status: int
    ended_reason: EndedReason
    message: str
    variable_values: dict[str, Any] = field(default_factory=dict)


Decision = Accept | Transfer | Reject


def admit(
    live_calls: int, event_loop_lag_s: float, defaults: RoutingDefaults
) -> tuple[Literal["max_calls", "event_loop_lag"], Reject] | None:
    """Whether a new call may even be routed: None, or which limit refuses it with SIP 503.

    Args:
        live_calls: calls not yet ended, this new one included.
        event_loop_lag_s: how late the event loop runs (the machine's saturation).

    A call refused here costs nothing more (no webhook, no pipeline); the calls already up
    keep the machine. 503 tells the PBX (and a SIP proxy in front of several PBXes) to try
    elsewhere.
    """
    if defaults.max_calls and live_calls > defaults.max_calls:
        return "max_calls", Reject(
            SIP_SERVICE_UNAVAILABLE,
            EndedReason.CONCURRENCY_LIMIT_REACHED,
            f"{live_calls - 1} calls are up, the most this sipbridge takes "
            f"(service.max_calls = {defaults.max_calls})",
        )
    if defaults.max_event_loop_lag_s and event_loop_lag_s > defaults.max_event_loop_lag_s:
        return "event_loop_lag", Reject(
            SIP_SERVICE_UNAVAILABLE,
            EndedReason.CONCURRENCY_LIMIT_REACHED,
            f"overloaded: the event loop runs {event_loop_lag_s * 1000:.0f} ms late "
            f"(service.max_event_loop_lag_ms = {defaults.max_event_loop_lag_s * 1000:.0f})",
        )
    return None


def outbound_rate_window(rate: float) -> tuple[float, int]:
    """(window in seconds, calls allowed in any such window) for ``rate`` calls per second:
    the fewest whole calls that keep the rate exact (1.5/s: 2 calls in any 1.33 s; 0.1/s:
    1 in any 10 s). A rate of 0 (no cap) gives an empty window."""
    if rate <= 0:
        return 0.0, 0
    allowed = math.ceil(rate)
    return allowed / rate, allowed


def admit_outbound(
    outbound_calls: int, recent_starts: Sequence[float], now: float, defaults: RoutingDefaults
) -> str | None:
    """Whether one more outbound call may start: None, or why not (an HTTP 429's message).

    Args:
        outbound_calls: outbound calls not yet ended, before this one.
        recent_starts: when the last outbound calls started (seconds, any clock), oldest first.
        now: the time on that clock.

    The rate holds over any window of :func:`outbound_rate_window`.
    """
    if defaults.outbound_max_concurrent and outbound_calls >= defaults.outbound_max_concurrent:
        return (
            f"{outbound_calls} outbound calls are under way, the most allowed "
            f"(outbound.max_concurrent = {defaults.outbound_max_concurrent})"
        )
    rate = defaults.outbound_max_calls_per_second
    if rate:
        window_s, allowed = outbound_rate_window(rate)
        started = sum(1 for when in recent_starts if when > now - window_s)
        if started >= allowed:
            return (
                f"{started} outbound calls started in the last {window_s:g} s "
                f"(outbound.max_calls_per_second = {rate:g})"
            )
    return None


@dataclass(frozen=True)
class UseAssistant:
    """Step 1 result: load this saved assistant."""

    assistant_id: str


@dataclass(frozen=True)
class AskServer:
    """Step 1 result: POST an assistant-request to this server."""

    server: Mapping[str, Any]


Plan = UseAssistant | AskServer | Reject


# ---- step 1: which number, and what to do ----------------------------------------------------


def match_phone_number(
    facts: InviteFacts, numbers: Iterable[Mapping[str, Any]], sip_domains: Iterable[str]
) -> Mapping[str, Any] | None:
    """The phone number an INVITE is for.

    The request-URI's user part must equal the number's (case-insensitively). Its host must be one
    of the configured SIP domains when some are configured. Among several numbers with that user
    part, one whose own host equals the request host wins; otherwise one whose host is a
    configured domain (any host when none is configured); the oldest first.
    """
    domains = {d.lower() for d in sip_domains}
    host = facts.request_host.lower()
    if domains and host not in domains:
        log.info("request host %r is not one of the SIP domains %s", host, sorted(domains))
        return None
    user = facts.request_user.lower()
    exact: list[Mapping[str, Any]] = []
    other: list[Mapping[str, Any]] = []
    for number in numbers:
        parsed = parse_sip_uri(str(number.get("sipUri", "")))
        if parsed is None or parsed[0].lower() != user:
            continue
        if parsed[1] == host:
            exact.append(number)
        elif not domains or parsed[1] in domains:
            other.append(number)
    for group in (exact, other):
        if group:
            if len(group) > 1:
                log.warning(
                    "%d phone numbers match %s; using the oldest", len(group), facts.request_uri
                )
            return min(group, key=lambda n: str(n.get("createdAt", "")))
    return None


def plan_call(
    facts: InviteFacts, number: Mapping[str, Any] | None, defaults: RoutingDefaults
) -> Plan:
    """Step 1: use an assistant, ask a server, or reject."""
    if number is None:
        if defaults.default_assistant_id:
            return UseAssistant(defaults.default_assistant_id)
        return Reject(
            SIP_NOT_FOUND,
            EndedReason.PHONE_NUMBER_NOT_FOUND,
            f"no phone number has the SIP URI {facts.request_uri}",
        )
    if number.get("assistantId"):
        return UseAssistant(str(number["assistantId"]))
    if number.get("squadId") or number.get("workflowId"):
        kind = "squadId" if number.get("squadId") else "workflowId"
        return Reject(
            SIP_TEMPORARILY_UNAVAILABLE,
            EndedReason.ASSISTANT_NOT_VALID,
            f"phone number {number.get('id')} has a {kind}; sipbridge supports assistants only",
        )
    server = server_of(number) or defaults.default_server
    if server:
        return AskServer(server)
    return Reject(
        SIP_TEMPORARILY_UNAVAILABLE,
        EndedReason.NEITHER_ASSISTANT_NOR_SERVER,
        f"phone number {number.get('id')} has no assistantId and there is no server URL",
    )


# ---- variables and acceptance ----------------------------------------------------------------


def default_variables(
    facts: InviteFacts, call_id: str, number: Mapping[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """Vapi's default variables for a SIP call."""
    phone_number: dict[str, Any] = {}
    if number is not None:
        phone_number = {
            "id": number.get("id"),
            "number": number.get("number") or number.get("sipUri"),
            "name": number.get("name"),
            "sipUri": number.get("sipUri"),
            "provider": number.get("provider", "vapi"),
        }
    return {
        **time_variables(now),
        "customer": facts.customer(),
        "phoneNumber": phone_number,
        "call": {"id": call_id, "type": facts.call_type},
        "transport": {"provider": "vapi.sip", "callSid": facts.pbx_call_id},
    }


def call_variables(
    facts: InviteFacts,
    call_id: str,
    number: Mapping[str, Any] | None,
    now: datetime,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variableValues as Vapi shows them on the call, every variable templates see)."""
    from_headers = header_variables(facts.headers)
    variable_values = {
        **header_variables(facts.headers, underscore_aliases=False),
        **(overrides or {}),
    }
    variables = merge_variables(
        default_variables(facts, call_id, number, now), from_headers, overrides or {}
    )
    return variable_values, variables


_CALLER_ID = re.compile(r"^\+?[A-Za-z0-9*#]{1,32}$")


def outbound_caller_id(number: Mapping[str, Any]) -> str | None:
    """The caller id an outbound call from this SIP number shows: its ``number`` if it has
    one, else its sipUri's user part; None if that is not dialable (letters and digits)."""
    candidate = number.get("number")
    if not candidate:
        parsed = parse_sip_uri(str(number.get("sipUri", "")))
        candidate = parsed[0] if parsed else ""
    return str(candidate) if _CALLER_ID.match(str(candidate)) else None


def outbound_facts(
    pbx: PbxKind,
    call_id: str,
    number: Mapping[str, Any],
    customer: Mapping[str, Any],
    headers: Mapping[str, str],
) -> InviteFacts:
    """An outbound call as the flow knows calls: the customer dialled (``from_*``), the SIP
    number it comes from (the request side), the X- headers sent; the PBX knows it by its
    call id (Asterisk: the Uniqueid ``Originate`` gives it)."""
    parsed = parse_sip_uri(str(number.get("sipUri", "")))
    user, host = (parsed[0], parsed[1]) if parsed else ("", "")
    return invite_facts(
        pbx=pbx,
        pbx_call_id=call_id,
        channel=call_id,
        request_user=user,
        request_host=host,
        headers=list(headers.items()),
        to_uri=customer.get("sipUri"),
        from_number=customer.get("number"),
        from_name=customer.get("name"),
        from_uri=customer.get("sipUri"),
        outbound=True,
    )


def pipeline_target(
    assistant: Mapping[str, Any], defaults: RoutingDefaults
) -> PipelineTarget | None:
    """The assistant's ``sipbridge.pipeline`` over the settings' defaults; None without a URL."""
    ext = assistant.get("sipbridge")
    spec: Mapping[str, Any] = {}
    if isinstance(ext, Mapping) and isinstance(ext.get("pipeline"), Mapping):
        spec = ext["pipeline"]
    url = spec.get("url") or defaults.pipeline_url
    if not url:
        return None
    audio = resolve_format(
        spec.get("format"),
        spec.get("encoding"),
        spec.get("sampleRate"),
        default_dialect=defaults.pipeline_format,
        default_encoding=defaults.pipeline_encoding,
        default_sample_rate=defaults.pipeline_sample_rate,
    )
    headers = {**defaults.pipeline_headers, **(spec.get("headers") or {})}
    return PipelineTarget(
        url=url,
        format=audio.dialect,
        encoding=audio.encoding,
        sample_rate=audio.sample_rate,
        headers=headers,
    )


def _with_overrides(
    assistant: Mapping[str, Any], overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``assistantOverrides`` replaces top-level assistant fields (variableValues aside)."""
    merged = dict(assistant)
    for key, value in (overrides or {}).items():
        if key == "variableValues":
            continue
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def accept(
    facts: InviteFacts,
    *,
    call_id: str,
    number: Mapping[str, Any] | None,
    assistant: Mapping[str, Any],
    assistant_id: str | None,
    now: datetime,
    defaults: RoutingDefaults,
    overrides: Mapping[str, Any] | None = None,
    invalid_reason: EndedReason = EndedReason.ASSISTANT_NOT_VALID,
    cpu_clock: CpuClock | None = None,
) -> Accept | Reject:
    """Renders the assistant for this call, or rejects it if it cannot run.

    Args:
        overrides: ``assistantOverrides`` from an assistant-request answer.
        invalid_reason: the endedReason when the assistant (with overrides) is not valid.
        cpu_clock: bounds the rendering's CPU time (``templating.RENDER_BUDGET_S``).
    """
    values = (overrides or {}).get("variableValues") or {}
    variable_values, variables = call_variables(facts, call_id, number, now, values)
    merged = _with_overrides(assistant, overrides)
    if overrides:
        try:
            merged = validate_assistant(merged, "assistantOverrides.")
        except ValidationFailed as exc:
            return Reject(
                SIP_TEMPORARILY_UNAVAILABLE,
                invalid_reason,
                "; ".join(exc.problems),
                variable_values,
            )
    target = pipeline_target(merged, defaults)
    if target is None:
        return Reject(
            SIP_TEMPORARILY_UNAVAILABLE,
            EndedReason.ASSISTANT_NOT_VALID,
            "no pipeline URL: set the assistant's sipbridge.pipeline.url or pipeline.default_url",
            variable_values,
        )
    rendered = render_assistant(merged, variables, now, cpu_clock=cpu_clock)
    return Accept(rendered, assistant_id, variable_values, variables, target)


def fallback_or_reject(
    number: Mapping[str, Any] | None,
    reason: EndedReason,
    detail: str,
    *,
    variables: tuple[dict[str, Any], dict[str, Any]],
    now: datetime,
    sip_status: int = SIP_TEMPORARILY_UNAVAILABLE,
    cpu_clock: CpuClock | None = None,
) -> Transfer | Reject:
    """A failed assistant-request: to the number's fallbackDestination if set, else reject."""
    variable_values, all_variables = variables
    fallback = (number or {}).get("fallbackDestination")
    if isinstance(fallback, Mapping):
        destination = render_destination(
            fallback, all_variables, now, field="fallbackDestination", cpu_clock=cpu_clock
        )
        return Transfer(destination, reason, detail, variable_values, all_variables)
    return Reject(sip_status, reason, detail, variable_values)


# ---- step 2: the server's answer -------------------------------------------------------------


@dataclass(frozen=True)
class WebhookResult:
    """What came back from the assistant-request POST (a fact for :func:`parse_answer`).

    Attributes:
        status: the HTTP status, or None when no answer arrived.
        body: the answer's body.
        failure: why no answer arrived ("timeout", "connection refused", ...).
    """

    status: int | None
    body: bytes = b""
    failure: str | None = None


@dataclass(frozen=True)
class AnswerFailed:
    """The request failed or the answer is unusable."""

    reason: EndedReason
    detail: str


@dataclass(frozen=True)
class AnswerError:
    """The server refused the call (``error``)."""

    message: str


@dataclass(frozen=True)
class AnswerDestination:
    """The server wants the call transferred (``destination``)."""

    destination: dict[str, Any]


@dataclass(frozen=True)
class AnswerAssistantId:
    """The server named a saved assistant."""

    assistant_id: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class AnswerAssistant:
    """The server sent an inline (transient) assistant, already validated."""

    assistant: dict[str, Any]
    overrides: dict[str, Any]


ParsedAnswer = AnswerFailed | AnswerError | AnswerDestination | AnswerAssistantId | AnswerAssistant


def parse_answer(result: WebhookResult) -> ParsedAnswer:
    """Interprets an assistant-request answer (``ServerMessageResponseAssistantRequest``)."""
    if result.status is None:
        return AnswerFailed(EndedReason.ASSISTANT_REQUEST_FAILED, result.failure or "no answer")
    if not 200 <= result.status < 300:
        return AnswerFailed(
            EndedReason.ASSISTANT_REQUEST_FAILED, f"server answered HTTP {result.status}"
        )
    if not result.body.strip():
        return AnswerFailed(EndedReason.ASSISTANT_REQUEST_RETURNED_NO_ASSISTANT, "empty answer")
    try:
        answer = json.loads(result.body)
    except (ValueError, UnicodeDecodeError) as exc:
        return AnswerFailed(EndedReason.ASSISTANT_REQUEST_FAILED, f"answer is not JSON: {exc}")
    if not isinstance(answer, dict):
        return AnswerFailed(EndedReason.ASSISTANT_REQUEST_FAILED, "answer is not a JSON object")
    # Vapi's webhook OpenAPI also describes a {"messageResponse": {...}} envelope.
    if set(answer) == {"messageResponse"} and isinstance(answer["messageResponse"], dict):
        answer = answer["messageResponse"]
    invalid = EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT

    error = answer.get("error")
    if error not in (None, ""):
        return AnswerError(error if isinstance(error, str) else json.dumps(error))
    if answer.get("destination") is not None:
        try:
            return AnswerDestination(validate_destination(answer["destination"]))
        except ValidationFailed as exc:
            return AnswerFailed(invalid, "; ".join(exc.problems))

    overrides = answer.get("assistantOverrides") or {}
    if not isinstance(overrides, dict):
        return AnswerFailed(invalid, "assistantOverrides: must be an object")
    values = overrides.get("variableValues")
    if values is not None and not isinstance(values, dict):
        return AnswerFailed(invalid, "assistantOverrides.variableValues: must be an object")

    if answer.get("assistant") is not None:
        try:
            inline = validate_assistant(answer["assistant"], "assistant.")
        except ValidationFailed as exc:
            return AnswerFailed(invalid, "; ".join(exc.problems))
        return AnswerAssistant(inline, overrides)
    if answer.get("assistantId") is not None:
        if not isinstance(answer["assistantId"], str) or not answer["assistantId"]:
            return AnswerFailed(invalid, "assistantId: must be a non-empty string")
        return AnswerAssistantId(answer["assistantId"], overrides)
    for key in ("squadId", "squad", "workflowId", "workflow"):
        if answer.get(key) is not None:
            return AnswerFailed(
                invalid,
                f"{key}: squads and workflows are not supported; answer with an assistant",
            )
    return AnswerFailed(
        EndedReason.ASSISTANT_REQUEST_RETURNED_NO_ASSISTANT,
        "answer has no assistant, assistantId, destination or error",
    )


# ---- step 3: decide ----------------------------------------------------------------------------


def decide_answer(
    parsed: ParsedAnswer,
    *,
    facts: InviteFacts,
    call_id: str,
    number: Mapping[str, Any] | None,
    now: datetime,
    defaults: RoutingDefaults,
    saved_assistant: Mapping[str, Any] | None = None,
    cpu_clock: CpuClock | None = None,
) -> Decision:
    """Step 3: the decision from an assistant-request answer.

    Args:
        saved_assistant: for :class:`AnswerAssistantId`, the assistant loaded from the store
            (None when there is no such assistant).
    """
    overrides = getattr(parsed, "overrides", None) or {}
    variables = call_variables(facts, call_id, number, now, overrides.get("variableValues"))
    if isinstance(parsed, AnswerError):
        return Reject(
            SIP_DECLINE, EndedReason.ASSISTANT_REQUEST_RETURNED_ERROR, parsed.message, variables[0]
        )
    if isinstance(parsed, AnswerFailed):
        return fallback_or_reject(
            number, parsed.reason, parsed.detail, variables=variables, now=now, cpu_clock=cpu_clock
        )
    if isinstance(parsed, AnswerDestination):
        destination = render_destination(parsed.destination, variables[1], now, cpu_clock=cpu_clock)
        return Transfer(
            destination,
            EndedReason.ASSISTANT_REQUEST_RETURNED_FORWARDING,
            "assistant-request answered with a destination",
            *variables,
        )
    if isinstance(parsed, AnswerAssistantId) and saved_assistant is None:
        return fallback_or_reject(
            number,
            EndedReason.ASSISTANT_NOT_FOUND,
            f"assistant-request named assistant {parsed.assistant_id!r}, which does not exist",
            variables=variables,
            now=now,
            cpu_clock=cpu_clock,
        )
    if isinstance(parsed, AnswerAssistantId):
        assert saved_assistant is not None
        assistant, assistant_id = saved_assistant, parsed.assistant_id
    else:
        assistant, assistant_id = parsed.assistant, None
    decision = accept(
        facts,
        call_id=call_id,
        number=number,
        assistant=assistant,
        assistant_id=assistant_id,
        now=now,
        defaults=defaults,
        overrides=overrides,
        invalid_reason=EndedReason.ASSISTANT_REQUEST_RETURNED_INVALID_ASSISTANT,
        cpu_clock=cpu_clock,
    )
    if isinstance(decision, Reject):
        return fallback_or_reject(
            number,
            decision.ended_reason,
            decision.message,
            variables=variables,
            now=now,
            cpu_clock=cpu_clock,
        )
    return decision
