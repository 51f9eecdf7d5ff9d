"""The HTTP API: Vapi-compatible assistants, phone numbers and calls, plus /health and /metrics.

Handlers only translate HTTP to calls on :class:`Backend` and errors to statuses, in one table
(:func:`_error_response`): ``ValidationFailed`` 400 with every problem listed, ``NotFound`` 404,
``StoreError`` 503. Bodies follow Vapi's (NestJS) error shape:
``{"message": [...], "error": "Bad Request", "statusCode": 400}``.

Every route but ``/health``, the signed recording links under ``/recording/`` (their
signature is their key) and ``/metrics`` on a loopback address (see
``api.metrics_require_key``) needs ``Authorization: Bearer <api.key>``, compared in constant
time.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

from aiohttp import web

from bridge.errors import CallRefused, CallStillLive, NotFound, StoreError, ValidationFailed
from bridge.metrics import CONTENT_TYPE
from bridge.models import format_timestamp
from bridge.recording import Channel, is_channel
from bridge.resources import Resources
from bridge.settings import ApiSettings
from bridge.store import Kind, ListQuery

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN_PATHS = frozenset({"/health"})
# Signed recording links: the signature in the query stands in for the key.
_SIGNED_PREFIX = "/recording/"
_MAX_LIMIT = 1000
# Deeper bodies are refused before validation: nothing in Vapi's resources nests near this, and
# deep nesting is what breaks recursive code (json's ~1,000-level RecursionError, pydantic's
# 255-level "Circular reference" when serialising). Documented in docs/api.md.
MAX_BODY_DEPTH = 64
_CALL_STATUSES = ("queued", "ringing", "in-progress", "forwarding", "ended")


class Backend(Protocol):
    """What the API needs from the running service."""

    resources: Resources

    async def list_calls(
        self,
        query: ListQuery,
        *,
        statuses: tuple[str, ...],
        phone_number_id: str | None,
        assistant_id: str | None,
        call_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Call records, live ones current, newest first."""

    async def get_call(self, call_id: str) -> dict[str, Any] | None:
        """One call record, live or stored."""

    async def create_call(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Places an outbound call; its record. Raises :class:`ValidationFailed` or
        :class:`CallRefused`."""

    async def hangup_call(self, call_id: str) -> bool:
        """Hangs up a live call; False if it is not live."""

    async def delete_call(self, call_id: str) -> dict[str, Any] | None:
        """Deletes an ended call's record and recordings; returns the record (None: no such
        call). Raises :class:`CallStillLive` for a call that has not ended."""

    async def recording_file(self, call_id: str, channel: Channel) -> Path | None:
        """A call's recording in ``channel``, if there is one."""

    def recording_link_valid(
        self, call_id: str, channel: Channel, *, expires: int, signature: str
    ) -> bool:
        """Whether a signed recording link is ours and still valid."""

    async def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "degraded", ...}``."""

    def metrics_text(self) -> bytes:
        """Prometheus text exposition."""


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, ensure_ascii=False).encode(),
        status=status,
        content_type="application/json",
    )


def _wav(path: Path, call_id: str, channel: str) -> web.FileResponse:
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "audio/wav",
            "Content-Disposition": f'attachment; filename="{call_id}.{channel}.wav"',
        },
    )


def _error(status: int, error: str, message: str | list[str]) -> web.Response:
    return _json({"message": message, "error": error, "statusCode": status}, status)


def _error_response(exc: Exception) -> web.Response:
    if isinstance(exc, ValidationFailed):
        return _error(400, "Bad Request", exc.problems)
    if isinstance(exc, NotFound):
        return _error(404, "Not Found", f"{exc.kind} not found: {exc.resource_id}")
    if isinstance(exc, StoreError):
        log.error("store unavailable: %s", exc)
        return _error(503, "Service Unavailable", "the database is unavailable; try again")
    log.exception("unexpected error in the API", exc_info=exc)
    return _error(500, "Internal Server Error", "internal error")


def _parse_time(name: str, value: str) -> str:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return format_timestamp(moment)
    except ValueError:
        raise ValidationFailed([f"{name}: must be an ISO 8601 date-time"]) from None
    except OverflowError:
        # 0001-01-01T00:00:00+14:00 is a valid date-time that is before year 1 in UTC.
        raise ValidationFailed([f"{name}: must be within the years 1 to 9999 in UTC"]) from None


def list_query(params: Mapping[str, str]) -> ListQuery:
    """Vapi's list parameters: ``limit`` (0-1000, default 100) and createdAt/updatedAt bounds.

    Raises:
        ValidationFailed: naming each bad parameter.
    """
    problems: list[str] = []
    limit = 100
    if "limit" in params:
        try:
            limit = int(params["limit"])
            if not 0 <= limit <= _MAX_LIMIT:
                raise ValueError
        except ValueError:
            problems.append(f"limit: must be an integer from 0 to {_MAX_LIMIT}")
    bounds: dict[str, str | None] = {}
    for field in ("created", "updated"):
        for op in ("Gt", "Lt", "Ge", "Le"):
            name = f"{field}At{op}"
            if name in params:
                try:
                    bounds[f"{field}_{op.lower()}"] = _parse_time(name, params[name])
                except ValidationFailed as exc:
                    problems.extend(exc.problems)
    if problems:
        raise ValidationFailed(problems)
    return ListQuery(limit=limit, **bounds)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return number


def nesting_depth(value: Any) -> int:
    """How deeply objects and arrays nest in ``value`` (a scalar is 0), without recursing."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


async def _body(request: web.Request) -> Mapping[str, Any]:
    raw = await request.read()
    too_deep = f"body: nested deeper than {MAX_BODY_DEPTH} levels"
    try:
        # NaN, Infinity and numbers beyond a float's range are not JSON: refused, not stored
        # as null.
        body = json.loads(raw or b"{}", parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValidationFailed([too_deep]) from None
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed(["body: must be valid JSON"]) from None
    if not isinstance(body, dict):
        raise ValidationFailed(["body: must be a JSON object"])
    if nesting_depth(body) > MAX_BODY_DEPTH:
        raise ValidationFailed([too_deep])
    return body


def create_app(backend: Backend, settings: ApiSettings) -> web.Application:
    """The aiohttp application serving the API for ``backend``."""
    key = settings.key.get_secret_value().encode() if settings.key is not None else None
    metrics_need_key = settings.metrics_need_key()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        open_path = (
            request.path in _OPEN_PATHS
            or request.path.startswith(_SIGNED_PREFIX)
            or (request.path == "/metrics" and not metrics_need_key)
        )
        if key is not None and not open_path:
            supplied = request.headers.get("Authorization", "")
            scheme, _, token = supplied.partition(" ")
            # aiohttp decodes header bytes as UTF-8 with surrogateescape: bytes that are not
            # UTF-8 arrive as lone surrogates, which encode back to the bytes that were sent.
            supplied_key = token.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(supplied_key, key):
                log.warning(
                    "rejected %s %s from %s: bad or missing key",
                    request.method,
                    request.path,
                    request.remote,
                )
                response = _error(401, "Unauthorized", "missing or invalid API key")
                response.headers["WWW-Authenticate"] = 'Bearer realm="sipbridge"'
                return response
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own refusals (unknown route 404, 405, 413 body too large) in the same
            # JSON shape as ours, so a Vapi client can read every error.
            return _error(exc.status, exc.reason, exc.reason)
        except Exception as exc:
            return _error_response(exc)

    app = web.Application(middlewares=[guard], client_max_size=settings.max_body_bytes)

    def resource_routes(path: str, kind: Kind) -> None:
        async def create(request: web.Request) -> web.Response:
            return _json(await backend.resources.create(kind, await _body(request)), 201)

        async def listing(request: web.Request) -> web.Response:
            return _json(await backend.resources.listing(kind, list_query(request.query)))

        async def show(request: web.Request) -> web.Response:
            return _json(await backend.resources.get(kind, request.match_info["id"]))

        async def update(request: web.Request) -> web.Response:
            body = await _body(request)
            return _json(await backend.resources.update(kind, request.match_info["id"], body))

        async def delete(request: web.Request) -> web.Response:
            return _json(await backend.resources.delete(kind, request.match_info["id"]))

        app.router.add_post(path, create)
        app.router.add_get(path, listing)
        app.router.add_get(path + "/{id}", show)
        app.router.add_patch(path + "/{id}", update)
        app.router.add_delete(path + "/{id}", delete)

    resource_routes("/assistant", "assistant")
    resource_routes("/phone-number", "phone_number")

    async def list_calls(request: web.Request) -> web.Response:
        statuses = tuple(s for s in request.query.get("status", "").split(",") if s)
        unknown = [s for s in statuses if s not in _CALL_STATUSES]
        if unknown:
            raise ValidationFailed([f"status: unknown status {', '.join(unknown)}"])
        calls = await backend.list_calls(
            list_query(request.query),
            statuses=statuses,
            phone_number_id=request.query.get("phoneNumberId"),
            assistant_id=request.query.get("assistantId"),
            call_id=request.query.get("id"),
        )
        return _json(calls)

    async def show_call(request: web.Request) -> web.Response:
        call = await backend.get_call(request.match_info["id"])
        if call is None:
            raise NotFound("Call", request.match_info["id"])
        return _json(call)

    async def hangup_call(request: web.Request) -> web.Response:
        call_id = request.match_info["id"]
        if not await backend.hangup_call(call_id):
            if await backend.get_call(call_id) is None:
                raise NotFound("Call", call_id)
            return _error(409, "Conflict", f"call {call_id} is not active")
        return _json(await backend.get_call(call_id))

    async def create_call(request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            return _json(await backend.create_call(body), 201)
        except CallRefused as exc:
            error = "Too Many Requests" if exc.status == 429 else "Service Unavailable"
            return _error(exc.status, error, str(exc))

    async def delete_call(request: web.Request) -> web.Response:
        call_id = request.match_info["id"]
        try:
            deleted = await backend.delete_call(call_id)
        except CallStillLive:
            return _error(409, "Conflict", f"call {call_id} has not ended: hang it up first")
        if deleted is None:
            raise NotFound("Call", call_id)
        return _json(deleted)

    async def call_recording(request: web.Request) -> web.StreamResponse:
        call_id = request.match_info["id"]
        channel = request.query.get("channel", "stereo")
        if not is_channel(channel):
            raise ValidationFailed(["channel: must be stereo or mono"])
        if await backend.get_call(call_id) is None:
            raise NotFound("Call", call_id)
        path = await backend.recording_file(call_id, cast(Channel, channel))
        if path is None:
            return _error(404, "Not Found", f"call {call_id} has no {channel} recording")
        return _wav(path, call_id, channel)

    async def signed_recording(request: web.Request) -> web.StreamResponse:
        call_id, channel = request.match_info["id"], request.match_info["channel"]
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            expires = 0
        signature = request.query.get("signature", "")
        if not is_channel(channel) or not backend.recording_link_valid(
            call_id, cast(Channel, channel), expires=expires, signature=signature
        ):
            return _error(403, "Forbidden", "invalid or expired recording link")
        path = await backend.recording_file(call_id, cast(Channel, channel))
        if path is None:
            return _error(404, "Not Found", f"call {call_id} has no {channel} recording")
        return _wav(path, call_id, channel)

    async def health(_: web.Request) -> web.Response:
        report = await backend.health()
        return _json(report, 200 if report.get("status") == "ok" else 503)

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=backend.metrics_text())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    app.router.add_post("/call", create_call)
    app.router.add_get("/call", list_calls)
    app.router.add_get("/call/{id}", show_call)
    app.router.add_delete("/call/{id}", delete_call)
    app.router.add_post("/call/{id}/hangup", hangup_call)
    app.router.add_get("/call/{id}/recording", call_recording)
    app.router.add_get(_SIGNED_PREFIX + "{id}.{channel:stereo|mono}.wav", signed_recording)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
