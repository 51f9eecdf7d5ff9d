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

An undefined variable renders as an empty string (logged at debug); a template that does not parse,
fails while rendering (any exception, from python-liquid or a library under a filter) or goes over
a limit is used literally, with one warning naming the field. Rendering never fails a call.

Templates come from API clients and assistant-request servers, and rendering runs on the event
loop, so every way a template could spend time is bounded (the limits are the constants below):
python-liquid's own limits (loop iterations, output, assigned variables, nesting), checks on every
filter call (the size of what it takes and makes, the numbers' bits, an estimate before the
filters whose work grows faster than their input), and a CPU budget checked between filters and
loop iterations (on the CPU clock the caller passes: the core has no clock of its own).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache, partial
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from liquid import BoundTemplate, Environment, RenderContext, Undefined
from liquid.builtin.tags.for_tag import ForLoop
from liquid.builtin.tags.tablerow_tag import TableRow
from liquid.exceptions import LiquidError
from liquid.filter import with_context
from liquid.token import Token

from bridge.errors import TemplateLimitError

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


# ---- limits --------------------------------------------------------------------------------
# Templates come from API clients and assistant-request servers, variables from callers, and a
# render runs on the event loop that paces every call's audio. Each limit below bounds one way a
# template could spend time or memory; over any of them the template is used literally. None is a
# setting: each is far above what a prompt needs and far below what would hurt, and an operator
# has no reason to trade one for the other.

# A long system prompt is tens of kilobytes; a rendered one is sent whole in one pipeline message.
MAX_SOURCE_CHARS = 100_000
# Parsing is the one step no budget can interrupt, and it costs ~30 µs per tag or output
# statement here: 500 of them (a prompt has tens) parse in ~15 ms.
MAX_MARKUP = 500
MAX_OUTPUT_CHARS = 100_000
# The most a single value (a string, or an array or object as rendered) may hold when a filter takes
# or makes it: nothing larger could be output anyway.
MAX_VALUE_CHARS = MAX_OUTPUT_CHARS
# About 1,200 decimal digits: beyond any quantity a prompt names, and small enough that any
# arithmetic on such numbers takes microseconds (squaring a 4096-bit int: ~30 µs here). Without it,
# ``{% assign x = x | times: x %}`` doubles the digits each round and the time of the next one:
# 26 rounds took 44 s on a real Asterisk host (benchmarks/results/templating.md).
MAX_INT_BITS = 4096
MAX_DECIMAL_EXPONENT = MAX_INT_BITS * 3 // 10  # the same magnitude in decimal digits
# ``uniq`` compares every item with the ones before it: 1,000 items is ~15 ms.
MAX_UNIQ_ITEMS = 1_000
# The CPU one rendering (one template, or all of an assistant's or a destination's) may take. A
# normal template renders in tens of microseconds; 50 ms is two and a half audio frames.
RENDER_BUDGET_S = 0.05
# Steps between two readings of the CPU clock: ~0.1 µs per step instead of ~3 µs.
_CHECK_EVERY = 32
# The bytes, as sys.getsizeof counts them, of the variables a template assigns: ten values of
# the largest size.
_LOCALS_LIMIT_BYTES = 10 * MAX_VALUE_CHARS

# Keys no X- header can produce (':' is not a header-name character), so callers cannot set them.
_DEADLINE_KEY = "sipbridge:deadline"


CpuClock = Callable[[], float]
"""The rendering thread's CPU time in seconds, e.g. ``time.thread_time`` (the flow passes it)."""


class _Deadline:
    """When a rendering's CPU budget is spent, checked between filters and loop iterations.

    The clock comes in as an argument (the core has none of its own). CPU time, not wall time,
    so that a template does not turn literal because a busy machine kept it waiting. Reading a
    thread's CPU clock is a system call (~3 µs here), so it is read every ``_CHECK_EVERY`` steps:
    a step is one filter call or loop iteration, each bounded by the size limits to well under
    a millisecond. Without a clock there is no time budget, only the size limits.
    """

    __slots__ = ("_clock", "_at", "_steps")

    def __init__(self, clock: CpuClock | None, budget_s: float = RENDER_BUDGET_S) -> None:
        self._clock = clock
        self._at = clock() + budget_s if clock is not None else 0.0
        self._steps = 0

    def check(self, *, now: bool = False) -> None:
        if self._clock is None:
            return
        self._steps += 1
        if (now or self._steps % _CHECK_EVERY == 0) and self._clock() > self._at:
            raise TemplateLimitError(f"rendering took over {RENDER_BUDGET_S * 1000:g} ms of CPU")


_NO_DEADLINE = _Deadline(None)


def _measure(value: object) -> int:
    """A value's size as rendered, roughly, in characters; raises over the value limits.

    Arrays and objects are walked (with an early stop), so that an array of large strings
    counts as what ``join`` or output would make of it. Other objects (dates, drops) count as
    one: they come from the call's variables, not from template arithmetic.
    """
    size = 0
    pending: list[object] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, bool) or item is None:
            size += 5
        elif isinstance(item, int):
            if item.bit_length() > MAX_INT_BITS:
                raise TemplateLimitError(f"a number over {MAX_INT_BITS} bits")
            size += item.bit_length() // 3 + 1
        elif isinstance(item, Decimal):
            if item.is_finite() and abs(item.adjusted()) > MAX_DECIMAL_EXPONENT:
                raise TemplateLimitError(f"a number over {MAX_DECIMAL_EXPONENT} digits")
            size += len(item.as_tuple().digits) + 2
        elif isinstance(item, range):
            # Ranges are lazy ((1..n) costs nothing until iterated); count what they would make.
            count = max(0, (item.stop - item.start) // item.step)
            size += count * (max(abs(item.start), abs(item.stop)).bit_length() // 3 + 2)
        elif isinstance(item, list | tuple):
            size += len(item)
            if size <= MAX_VALUE_CHARS:
                pending.extend(item)
        elif isinstance(item, dict):
            size += len(item)
            if size <= MAX_VALUE_CHARS:
                pending.extend(item.keys())
                pending.extend(item.values())
        else:
            size += 1
        if size > MAX_VALUE_CHARS:
            raise TemplateLimitError(f"a value over {MAX_VALUE_CHARS} characters")
    return size


def _replace_size(value: object, old: object = "", new: object = "", *_: object) -> int:
    text, old_text, new_text = str(value), str(old), str(new)
    return len(text) + text.count(old_text) * max(0, len(new_text) - len(old_text))


def _join_size(value: object, separator: object = " ", *_: object) -> int:
    count = len(value) if isinstance(value, list | tuple | range) else 1
    return _measure(value) + count * len(str(separator))


def _uniq_size(value: object, *_: object) -> int:
    if isinstance(value, list | tuple | range) and len(value) > MAX_UNIQ_ITEMS:
        raise TemplateLimitError(f"uniq on over {MAX_UNIQ_ITEMS} items")
    return 0


# Every filter a template may use, reviewed against python-liquid 2.3.6's builtins: the work of
# each is about linear in the size of its arguments (which _measure bounds) except those with a
# size estimate, whose result or work can grow with the product of their arguments' sizes
# (``x | replace: "a", x`` squares a string's length); the estimate is checked before they run.
# Any other filter, including one a newer python-liquid adds, is unknown here: a template using
# it is used literally until it is reviewed.
_LINEAR_FILTERS = frozenset(
    {
        "abs",
        "append",
        "at_least",
        "at_most",
        "base64_decode",
        "base64_encode",
        "base64_url_safe_decode",
        "base64_url_safe_encode",
        "capitalize",
        "ceil",
        "compact",
        "concat",
        "date",
        "default",
        "divided_by",
        "downcase",
        "escape",
        "escape_once",
        "find",
        "find_index",
        "first",
        "floor",
        "has",
        "last",
        "lstrip",
        "map",
        "minus",
        "modulo",
        "newline_to_br",
        "plus",
        "prepend",
        "reject",
        "remove",
        "remove_first",
        "remove_last",
        "replace_first",
        "replace_last",
        "reverse",
        "round",
        "rstrip",
        "size",
        "slice",
        "sort",
        "sort_natural",
        "split",
        "squish",
        "strip",
        "strip_html",
        "strip_newlines",
        "sum",
        "times",
        "truncate",
        "truncatewords",
        "upcase",
        "url_decode",
        "url_encode",
        "where",
    }
)
_SIZE_ESTIMATES: dict[str, Callable[..., int]] = {
    "replace": _replace_size,
    "join": _join_size,
    "uniq": _uniq_size,
}


def _bounded_filter(
    name: str, apply: Callable[..., Any], deadline: _Deadline, value: Any, *args: Any, **kwargs: Any
) -> Any:
    """Runs one filter within the limits: inputs, expected size, time so far, result."""
    deadline.check()
    for argument in (value, *args, *kwargs.values()):
        _measure(argument)
    estimate = _SIZE_ESTIMATES.get(name)
    if estimate is not None and estimate(value, *args) > MAX_VALUE_CHARS:
        raise TemplateLimitError(f"{name} would make over {MAX_VALUE_CHARS} characters")
    result = apply(value, *args, **kwargs)
    _measure(result)
    return result


def _paced(items: Iterator[Any], deadline: _Deadline) -> Iterator[Any]:
    for item in items:
        deadline.check()
        yield item


class _RenderContext(RenderContext):
    """A render context that runs every filter and loop iteration within the limits."""

    __slots__ = ()

    def _deadline(self) -> _Deadline:
        deadline = self.globals.get(_DEADLINE_KEY)
        return deadline if isinstance(deadline, _Deadline) else _NO_DEADLINE

    def filter(self, name: str, token: Token | None) -> Callable[..., object]:
        return partial(_bounded_filter, name, super().filter(name, token), self._deadline())

    @contextmanager
    def loop(
        self, namespace: Mapping[str, object], forloop: ForLoop | TableRow
    ) -> Iterator[RenderContext]:
        # The loop's body renders once per item its helper yields (python-liquid 2.x iterates
        # ``forloop.it`` for both for and tablerow): checking the deadline there bounds loops
        # whose bodies hold no filter, e.g. thousands of empty loops in a row.
        forloop.it = _paced(forloop.it, self._deadline())
        with super().loop(namespace, forloop) as context:
            yield context


class _Template(BoundTemplate):
    context_class = _RenderContext


class _Environment(Environment):
    template_class = _Template
    # A loop's iterations, times those of the loops around it.
    loop_iteration_limit = 10_000
    output_stream_limit = MAX_OUTPUT_CHARS
    local_namespace_limit = _LOCALS_LIMIT_BYTES
    # There is no include or render (no loader), so contexts only nest through loops and captures.
    context_depth_limit = 10
    # Block tags inside one another ({% if %} in {% for %} ...): python-liquid's default.
    block_nesting_limit = 30


def _environment() -> _Environment:
    environment = _Environment(undefined=_LoggedUndefined)
    environment.add_filter("date", _date_filter)
    reviewed = _LINEAR_FILTERS | _SIZE_ESTIMATES.keys()
    for name in set(environment.filters) - reviewed:
        del environment.filters[name]
    return environment


_ENVIRONMENT = _environment()


@lru_cache(maxsize=1024)
def _parse(source: str) -> BoundTemplate:
    return _ENVIRONMENT.from_string(source)


def render(
    source: str,
    variables: Mapping[str, Any],
    now: datetime,
    *,
    field: str = "",
    cpu_clock: CpuClock | None = None,
) -> str:
    """Renders one template string; never raises.

    Args:
        source: the template, e.g. ``"Hello {{first_name}}"``.
        variables: the call's variables (see the module docstring for their precedence).
        now: the moment ``"now"`` and the default date variables stand for.
        field: where the template is, e.g. ``"firstMessage"``, for the log line.
        cpu_clock: the thread's CPU clock; with it, rendering stops at ``RENDER_BUDGET_S``.

    Returns:
        The rendered text; the source itself when it does not parse, fails to render or goes
        over a limit (see the constants above).
    """
    return _render(source, variables, now, field or "template", _Deadline(cpu_clock))


def _render(
    source: str, variables: Mapping[str, Any], now: datetime, field: str, deadline: _Deadline
) -> str:
    if "{{" not in source and "{%" not in source:
        return source
    # The one boundary: whatever goes wrong in a template (a parse error, a filter's exception
    # from any library underneath, a limit), the call goes on with the template as written.
    try:
        if len(source) > MAX_SOURCE_CHARS:
            raise TemplateLimitError(f"a template over {MAX_SOURCE_CHARS} characters")
        if source.count("{{") + source.count("{%") > MAX_MARKUP:
            raise TemplateLimitError(f"a template with over {MAX_MARKUP} tags and outputs")
        deadline.check(now=True)
        return _parse(source).render({**variables, _NOW_KEY: now, _DEADLINE_KEY: deadline})
    except Exception as exc:
        log.warning(
            "%s (%d characters) not rendered, used literally: %s",
            field,
            len(source),
            _reason(exc),
        )
        return source


def _reason(exc: Exception) -> str:
    """Why a template failed, without values: the error's type and, if known, its line.

    Messages are left out except our own limits': a library's message may quote a variable's
    value (a caller's header, a secret in variableValues).
    """
    if isinstance(exc, TemplateLimitError):
        return str(exc)
    where = None
    if isinstance(exc, LiquidError):
        with suppress(ValueError):
            where = exc.context()
    return type(exc).__name__ + (f" at line {where[0]}, column {where[1]}" if where else "")


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


def render_value(
    value: Any,
    variables: Mapping[str, Any],
    now: datetime,
    *,
    field: str = "value",
    cpu_clock: CpuClock | None = None,
) -> Any:
    """Renders a string, or a Vapi ``CustomMessage`` (``content`` and ``contents[].content``)."""
    return _render_value(value, variables, now, field, _Deadline(cpu_clock))


def _render_value(
    value: Any, variables: Mapping[str, Any], now: datetime, field: str, deadline: _Deadline
) -> Any:
    if isinstance(value, str):
        return _render(value, variables, now, field, deadline)
    if isinstance(value, dict):
        rendered = dict(value)
        if isinstance(rendered.get("content"), str):
            rendered["content"] = _render(
                rendered["content"], variables, now, f"{field}.content", deadline
            )
        if isinstance(rendered.get("contents"), list):
            rendered["contents"] = [
                _render_value(item, variables, now, f"{field}.contents[{i}]", deadline)
                for i, item in enumerate(rendered["contents"])
            ]
        return rendered
    return value


def render_destination(
    destination: Mapping[str, Any],
    variables: Mapping[str, Any],
    now: datetime,
    *,
    field: str = "destination",
    cpu_clock: CpuClock | None = None,
) -> dict[str, Any]:
    """Renders a transfer destination's ``message`` and ``callerId``, within one budget."""
    return _render_destination(destination, variables, now, field, _Deadline(cpu_clock))


def _render_destination(
    destination: Mapping[str, Any],
    variables: Mapping[str, Any],
    now: datetime,
    field: str,
    deadline: _Deadline,
) -> dict[str, Any]:
    rendered = dict(destination)
    for key in ("message", "callerId"):
        if key in rendered:
            rendered[key] = _render_value(rendered[key], variables, now, f"{field}.{key}", deadline)
    return rendered


def render_assistant(
    assistant: Mapping[str, Any],
    variables: Mapping[str, Any],
    now: datetime,
    *,
    cpu_clock: CpuClock | None = None,
) -> dict[str, Any]:
    """Renders the text fields Vapi renders: firstMessage, the model's messages, endCallMessage,
    voicemailMessage, and the messages and callerIds of transfer destinations in the model's tools.

    With ``cpu_clock``, all of them share one CPU budget (``RENDER_BUDGET_S``): an assistant
    with many hostile templates costs the event loop no more than one.
    """
    deadline = _Deadline(cpu_clock)
    rendered = dict(assistant)
    for key in ("firstMessage", "endCallMessage", "voicemailMessage"):
        if isinstance(rendered.get(key), str):
            rendered[key] = _render(rendered[key], variables, now, key, deadline)
    model = rendered.get("model")
    if isinstance(model, dict):
        model = dict(model)
        if isinstance(model.get("messages"), list):
            model["messages"] = [
                {
                    **m,
                    "content": _render_value(
                        m["content"], variables, now, f"model.messages[{i}].content", deadline
                    ),
                }
                if isinstance(m, dict) and "content" in m
                else m
                for i, m in enumerate(model["messages"])
            ]
        if isinstance(model.get("tools"), list):
            model["tools"] = [
                _render_tool(tool, variables, now, f"model.tools[{i}]", deadline)
                for i, tool in enumerate(model["tools"])
            ]
        rendered["model"] = model
    return rendered


def _render_tool(
    tool: Any, variables: Mapping[str, Any], now: datetime, field: str, deadline: _Deadline
) -> Any:
    if not isinstance(tool, dict) or not isinstance(tool.get("destinations"), list):
        return tool
    return {
        **tool,
        "destinations": [
            _render_destination(d, variables, now, f"{field}.destinations[{i}]", deadline)
            if isinstance(d, dict)
            else d
            for i, d in enumerate(tool["destinations"])
        ],
    }
