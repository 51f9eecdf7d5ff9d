"""Template variables and the Liquid renderer for Vapi prompts.

Vapi renders ``{{ ... }}`` with LiquidJS (docs ``dynamic-variables.mdx``); sipbridge uses
python-liquid, a faithful Liquid engine, with Vapi's ``date`` filter signature
(``{{ "now" | date: "%b %d, %Y", "America/New_York" }}``) added. Time comes in as an argument so
that rendering is a pure function.

Variables, lowest precedence first:

1. defaults as Vapi documents them: ``now``, ``date``, ``time``, ``year``, ``month``, ``day`` (UTC),
   ``customer``, ``phoneNumber``, ``call``, ``transport``;
2. X- headers: ``X-First_Name: John`` becomes ``first_name`` (prefix stripped, lowercased); a dashed
   name is reachable both ways (``account-id`` and ``account_id``). Headers never replace the
   identity namespaces (``customer``, ``phoneNumber``, ``call``, ``transport``): those come from SIP
   signalling, and a caller must not be able to forge ``{{customer.number}}`` with a header;
3. ``assistantOverrides.variableValues`` from an assistant-request answer (trusted, beats all).

An undefined variable renders as an empty string (logged at debug); a template that does not parse
or fails while rendering is used literally (logged as a warning). Rendering never fails a call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from liquid import BoundTemplate, Environment, Undefined
from liquid.exceptions import LiquidError
from liquid.filter import with_context

log = logging.getLogger(__name__)

IDENTITY_NAMESPACES = frozenset({"customer", "phoneNumber", "call", "transport"})
# A key no X- header can produce (':' is not a header-name character), so callers cannot set it.
_NOW_KEY = "sipbridge:now"
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


class _LoggedUndefined(Undefined):
    """Renders as '' like LiquidJS, and says so at debug level."""

    def __str__(self) -> str:
        log.debug("template variable %r is not defined; rendered as ''", self.name)
        return ""


def _as_datetime(value: Any, now: datetime) -> datetime | None:
    if isinstance(value, str) and value.strip().lower() in ("now", "today"):
        return now
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Epoch seconds; Vapi timestamps in milliseconds are told apart by size.
        seconds = value / 1000 if value > 10**11 else value
        return datetime.fromtimestamp(seconds, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


@with_context
def _date_filter(value: Any, fmt: Any = None, tz: Any = None, *, context: Any) -> str:
    """``date: format[, time zone]``, also on the literal ``"now"`` (LiquidJS's signature)."""
    now = context.globals.get(_NOW_KEY)
    if not isinstance(now, datetime):
        now = datetime.now(UTC)
    moment = _as_datetime(value, now)
    if moment is None:
        return "" if isinstance(value, Undefined) else str(value)
    if isinstance(tz, str) and tz:
        try:
            moment = moment.astimezone(ZoneInfo(tz))
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {tz!r}") from exc
    else:
        moment = moment.astimezone(UTC)
    return moment.strftime(fmt if isinstance(fmt, str) and fmt else "%b %-d, %Y, %-I:%M %p")


class _Environment(Environment):
    # Templates come from API users, not callers, but a loop must still not stall a call setup.
    loop_iteration_limit = 10_000
    output_stream_limit = 100_000
    context_depth_limit = 10


_ENVIRONMENT = _Environment(undefined=_LoggedUndefined)
_ENVIRONMENT.add_filter("date", _date_filter)


@lru_cache(maxsize=1024)
def _parse(source: str) -> BoundTemplate:
    return _ENVIRONMENT.from_string(source)


def render(source: str, variables: Mapping[str, Any], now: datetime) -> str:
    """Renders one template string.

    Args:
        source: the template, e.g. ``"Hello {{first_name}}"``.
        variables: the call's variables (see the module docstring for their precedence).
        now: the moment ``"now"`` and the default date variables stand for.

    Returns:
        The rendered text; the source itself when it does not parse or fails to render.
    """
    if "{{" not in source and "{%" not in source:
        return source
    try:
        return _parse(source).render(**variables, **{_NOW_KEY: now})
    except (LiquidError, ValueError, TypeError, OverflowError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning(
            "template %r could not be rendered (%s); using it literally", source[:80], reason
        )
        return source


def time_variables(now: datetime) -> dict[str, str]:
    """Vapi's default date variables, in UTC: ``Jan 1, 2024 12:00 PM`` and its parts."""
    moment = now.astimezone(UTC)
    hour12 = moment.hour % 12 or 12
    clock = f"{hour12}:{moment.minute:02d} {'AM' if moment.hour < 12 else 'PM'}"
    date = f"{_MONTHS[moment.month - 1][:3]} {moment.day}, {moment.year}"
    return {
        "now": f"{date} {clock}",
        "date": date,
        "time": clock,
        "year": str(moment.year),
        "month": _MONTHS[moment.month - 1],
        "day": str(moment.day),
        "currentDateTime": f"{date} {clock}",
    }


def header_variables(
    headers: Iterable[tuple[str, str]], *, underscore_aliases: bool = True
) -> dict[str, str]:
    """Variables from X- headers: ``X-First_Name: John`` -> ``{"first_name": "John"}``.

    With ``underscore_aliases`` a dashed name is also reachable with underscores
    (``X-Account-Id`` -> ``account-id`` and ``account_id``) unless a header already has the
    underscore spelling; templates get the aliases, the call's ``variableValues`` (what Vapi
    shows webhooks) only the lowercased names. When a header repeats, the first value wins.
    Non-X headers are not variables (as in Vapi).
    """
    exact: dict[str, str] = {}
    for name, value in headers:
        if len(name) < 3 or name[:2].lower() != "x-":
            continue
        key = name[2:].lower()
        exact.setdefault(key, value)
    result = dict(exact)
    for key, value in exact.items() if underscore_aliases else ():
        underscored = key.replace("-", "_")
        if underscored != key and underscored not in exact:
            result[underscored] = value
    for key in IDENTITY_NAMESPACES.intersection(result):
        log.info("X- header variable %r would shadow the call's identity; ignored", key)
        del result[key]
    return result


def merge_variables(
    defaults: Mapping[str, Any], from_headers: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Applies the precedence overrides > headers > defaults."""
    return {**defaults, **from_headers, **overrides}


def render_value(value: Any, variables: Mapping[str, Any], now: datetime) -> Any:
    """Renders a string, or a Vapi ``CustomMessage`` (``content`` and ``contents[].content``)."""
    if isinstance(value, str):
        return render(value, variables, now)
    if isinstance(value, dict):
        rendered = dict(value)
        if isinstance(rendered.get("content"), str):
            rendered["content"] = render(rendered["content"], variables, now)
        if isinstance(rendered.get("contents"), list):
            rendered["contents"] = [
                render_value(item, variables, now) for item in rendered["contents"]
            ]
        return rendered
    return value


def render_destination(
    destination: Mapping[str, Any], variables: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    """Renders a transfer destination's ``message`` and ``callerId``."""
    rendered = dict(destination)
    for key in ("message", "callerId"):
        if key in rendered:
            rendered[key] = render_value(rendered[key], variables, now)
    return rendered


def render_assistant(
    assistant: Mapping[str, Any], variables: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    """Renders the text fields Vapi renders: firstMessage, the model's messages, endCallMessage,
    voicemailMessage, and the messages and callerIds of transfer destinations in the model's tools.
    """
    rendered = dict(assistant)
    for key in ("firstMessage", "endCallMessage", "voicemailMessage"):
        if isinstance(rendered.get(key), str):
            rendered[key] = render(rendered[key], variables, now)
    model = rendered.get("model")
    if isinstance(model, dict):
        model = dict(model)
        if isinstance(model.get("messages"), list):
            model["messages"] = [
                {**m, "content": render_value(m["content"], variables, now)}
                if isinstance(m, dict) and "content" in m
                else m
                for m in model["messages"]
            ]
        if isinstance(model.get("tools"), list):
            model["tools"] = [_render_tool(tool, variables, now) for tool in model["tools"]]
        rendered["model"] = model
    return rendered


def _render_tool(tool: Any, variables: Mapping[str, Any], now: datetime) -> Any:
    if not isinstance(tool, dict) or not isinstance(tool.get("destinations"), list):
        return tool
    return {
        **tool,
        "destinations": [
            render_destination(d, variables, now) if isinstance(d, dict) else d
            for d in tool["destinations"]
        ],
    }
