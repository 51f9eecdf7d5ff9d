"""The composition root: builds every component from the settings and wires them together.

Only this module knows the whole graph. Startup order: store, webhook delivery, call flow, PBX
backends (from :func:`bridge.pbx.build_backends`; the root knows none by name), API. Shutdown is
the reverse. ``drain`` stops taking calls and waits for the live ones to finish (SIGTERM);
``aclose`` hangs up whatever is left (SIGINT, or after the drain timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bridge import __version__
from bridge.api import create_app
from bridge.backend import PbxBackend
from bridge.callflow import CallFlow
from bridge.calls import Call
from bridge.conversation import Conversations
from bridge.errors import CallRefused, CallStillLive
from bridge.events import LinkChanged, PbxEvent, PbxKind
from bridge.metrics import Metrics
from bridge.overload import EventLoopLag, watch_event_loop
from bridge.pbx import build_backends
from bridge.recording import Channel, RecordingLinks, was_recorded
from bridge.recordings import (
    FINISH_WAIT_S,
    RecordingWriter,
    clean_up,
    delete_recording,
    recorder_factory,
    recording_path,
)
from bridge.records import CallRecorder
from bridge.resources import Resources
from bridge.routing import RoutingDefaults, admit
from bridge.settings import Settings, api_base_url, is_loopback, recordings_directory
from bridge.store import ListQuery, Store
from bridge.tasks import cancel_and_wait
from bridge.tls import client_context
from bridge.webhooks import WebhookClient, WebhookDispatcher, open_session

log = logging.getLogger(__name__)


# A call record in one of these was live when the previous run stopped.
LIVE_STATUSES = ("ringing", "in-progress", "forwarding")
LEFT_OVER_PAGE = 500


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Events:
    """What every backend reports to: link changes to the root, the rest to the call flow."""

    def __init__(self, service: Service, flow: CallFlow) -> None:
        self._service = service
        self._flow = flow

    def post(self, event: PbxEvent) -> None:
        if isinstance(event, LinkChanged):
            self._service.set_link(event.pbx, event.up)
        else:
            self._flow.post(event)

    def live_calls(self, pbx: PbxKind) -> set[str]:
        return self._flow.live_calls(pbx)


class Service:
    """The running sipbridge: API, store, webhooks, call flow and (when enabled) PBX links."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.store = Store(settings.store.path, settings.store.busy_timeout_s)
        self.resources = Resources(self.store, clock, settings.sip.domains)
        self.recorder = CallRecorder(self.store, self.metrics)
        self._http: aiohttp.ClientSession | None = None
        self._dispatcher: WebhookDispatcher | None = None
        self._callflow: CallFlow | None = None
        self._runner: web.AppRunner | None = None
        self.backends: dict[str, PbxBackend] = {}
        self.api_port: int | None = None
        self.pbx_links: dict[str, bool] = {}
        # Set and replaced on every change of a PBX link, so waiters wake up and look again.
        self._links_changed = asyncio.Event()
        self.event_loop_lag = EventLoopLag()
        self._lag_watch: asyncio.Task[None] | None = None
        self.recording_writer = RecordingWriter(
            on_failure=lambda error: self.metrics.recordings_stopped_total.inc()
        )
        self._recordings_cleanup: asyncio.Task[None] | None = None
        self.recordings_path = recordings_directory(settings)
        self.recordings_cleaned = asyncio.Event()  # set after each clean-up pass
        self._recording_links: RecordingLinks | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def callflow(self) -> CallFlow:
        """The call flow (available after :meth:`start`)."""
        if self._callflow is None:
            raise RuntimeError("service not started")
        return self._callflow

    @property
    def dispatcher(self) -> WebhookDispatcher:
        """The webhook dispatcher (available after :meth:`start`)."""
        if self._dispatcher is None:
            raise RuntimeError("service not started")
        return self._dispatcher

    async def start(self) -> None:
        """Starts every component; on failure, stops what had started and re-raises."""
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise

    async def _start(self) -> None:
        settings = self.settings
        await self.store.open()
        self._lag_watch = asyncio.create_task(
            watch_event_loop(self.event_loop_lag, self.metrics.event_loop_lag_seconds.set),
            name="event-loop-lag",
        )
        if settings.api.org_id:
            self.resources.use_org_id(settings.api.org_id)
        org_id = await self.resources.org_id()
        self.recorder.start()
        self.recording_writer.start()
        self._recordings_cleanup = asyncio.create_task(
            self._clean_up_recordings(), name="recordings-cleanup"
        )
        tls = client_context(settings.tls)
        self._http = open_session(settings.webhooks, tls)
        client = WebhookClient(self._http, settings.webhooks, self.metrics)
        self._dispatcher = WebhookDispatcher(client, settings.webhooks, self.metrics)
        self._dispatcher.start()
        self._callflow = CallFlow(
            resources=self.resources,
            recorder=self.recorder,
            webhook_client=client,
            dispatcher=self._dispatcher,
            defaults=RoutingDefaults.from_settings(settings),
            metrics=self.metrics,
            clock=self.clock,
            org_id=org_id,
            media_timeout_s=settings.media.connect_timeout_s,
            new_call_id=lambda: str(uuid.uuid4()),
            conversations=Conversations(
                settings.pipeline,
                settings.media,
                taps=[
                    recorder_factory(
                        self.recordings_path,
                        settings.recordings.enabled_by_default,
                        self.recording_writer,
                    )
                ],
                tls=tls,
            ),
            event_loop_lag=lambda: self.event_loop_lag.sustained(time.monotonic()),
            recording_links=self.recording_links,
        )
        events = _Events(self, self._callflow)
        for backend in build_backends(settings):
            self.backends[backend.kind] = backend
            self._callflow.register(backend)
            self.set_link(backend.kind, False)
            await backend.start(events)
        await self._settle_left_over()
        app = create_app(self, settings.api)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=5.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.api.host, settings.api.port)
        await site.start()
        addresses = self._runner.addresses
        self.api_port = int(addresses[0][1]) if addresses else settings.api.port
        await self._sign_recording_links()
        log.info(
            "sipbridge %s: API on http://%s:%s, store %s",
            __version__,
            settings.api.host,
            self.api_port,
            settings.store.path,
        )
        if settings.api.key is None:
            log.warning(
                "LAB MODE: the API on %s:%s accepts requests without a key (loopback only)",
                settings.api.host,
                self.api_port,
            )
        if not is_loopback(settings.api.host):
            log.info("the API listens beyond loopback; every request needs the API key")

    async def _sign_recording_links(self) -> None:
        """Recording links from now on: the configured key or the database's, and the public
        base URL (else the API's own, with the port it really got)."""
        recordings = self.settings.recordings
        stored = await self.store.recording_url_secret()
        previous = [key.get_secret_value() for key in recordings.previous_url_secrets]
        if recordings.url_secret is not None:
            secret = recordings.url_secret.get_secret_value()
            # Links signed before a key was configured were signed with the database's.
            previous.append(stored)
        else:
            secret = stored
        if recordings.public_url:
            base_url = recordings.public_url.rstrip("/")
        else:
            api = self.settings.api.model_copy(update={"port": self.api_port})
            base_url = api_base_url(self.settings.model_copy(update={"api": api}))
        self._recording_links = RecordingLinks(
            secret.encode(),
            base_url,
            recordings.url_lifetime_s,
            tuple(key.encode() for key in previous if key != secret),
        )

    def recording_links(self, call: Call, now: datetime) -> dict[str, Any]:
        """The recording fields of a recorded call's ``artifact`` (empty if not recorded)."""
        if self._recording_links is None or not was_recorded(call.media):
            return {}
        return self._recording_links.artifact(call.id, now)

    async def _clean_up_recordings(self) -> None:
        """Applies the recordings' retention and size cap at start, then periodically."""
        settings = self.settings.recordings
        while True:
            try:
                await asyncio.to_thread(
                    clean_up,
                    self.recordings_path,
                    time.time(),
                    settings.retention_days,
                    settings.max_total_mb * 1024 * 1024,
                    self.recording_writer.unfinished(),
                )
            except OSError as error:
                log.error("recordings clean-up failed: %s", error)
            self.recordings_cleaned.set()
            await asyncio.sleep(settings.cleanup_interval_s)

    async def _settle_left_over(self) -> None:
        """Calls the previous run left live end now (see CallFlow.settle_left_over).

        With one store per instance, every live record at start is one this instance's previous
        run left behind.
        """
        records: dict[str, dict[str, Any]] = {}
        before: str | None = None
        while True:
            page = await self.store.list_calls(
                ListQuery(limit=LEFT_OVER_PAGE, created_le=before),
                statuses=LIVE_STATUSES,
                phone_number_id=None,
                assistant_id=None,
            )
            fresh = [record for record in page if record["id"] not in records]
            records.update((record["id"], record) for record in fresh)
            if len(page) < LEFT_OVER_PAGE or not fresh:
                break
            before = page[-1]["createdAt"]  # newest first: on to the older ones
        if records:
            settled = await self.callflow.settle_left_over(list(records.values()))
            log.warning("settled %d calls the previous run left live", settled)

    def set_link(self, pbx: str, up: bool) -> None:
        """Records a PBX control link's state (health, metrics, waiters)."""
        self.pbx_links[pbx] = up
        self.metrics.pbx_link_up.labels(pbx).set(1 if up else 0)
        changed, self._links_changed = self._links_changed, asyncio.Event()
        changed.set()

    async def wait_link(self, pbx: str, up: bool) -> None:
        """Returns once the PBX's control link is (or becomes) up or down."""
        while self.pbx_links.get(pbx) is not up:
            await self._links_changed.wait()

    async def drain(self, timeout_s: float) -> bool:
        """Stops taking new calls and waits up to ``timeout_s`` for live ones to end."""
        if self._callflow is None:
            return True
        self._callflow.draining = True
        log.info("draining: %d live calls", len(self._callflow.active()))
        try:
            async with asyncio.timeout(timeout_s):
                await self._callflow.wait_idle()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stops everything, ending live calls with ``worker-shutdown``."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # Live calls are hung up through the backends, so those stop after.
        if self._callflow is not None:
            await self._callflow.aclose()
        for backend in reversed(list(self.backends.values())):
            await backend.aclose()
        self.backends.clear()
        self._callflow = None
        if self._dispatcher is not None:
            await self._dispatcher.aclose()
            self._dispatcher = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.recorder.aclose()
        if self._recordings_cleanup is not None:
            await cancel_and_wait([self._recordings_cleanup])
            self._recordings_cleanup = None
        # The calls are over: their last chunks are written before the service stops.
        await asyncio.to_thread(self.recording_writer.close)
        await self.store.aclose()
        if self._lag_watch is not None:
            await cancel_and_wait([self._lag_watch])
            self._lag_watch = None

    # ---- the API's backend --------------------------------------------------------------------

    async def list_calls(
        self,
        query: ListQuery,
        *,
        statuses: tuple[str, ...],
        phone_number_id: str | None,
        assistant_id: str | None,
        call_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored records with newer snapshots (live calls, unsaved records) laid over them."""
        stored = await self.store.list_calls(
            query,
            statuses=statuses,
            phone_number_id=phone_number_id,
            assistant_id=assistant_id,
            call_id=call_id,
        )
        newer = {record["id"]: record for record in self.recorder.unsaved_records()}
        newer.update({call.id: call.to_json() for call in self.callflow.active()})
        by_id = {record["id"]: record for record in stored}
        by_id.update(newer)

        def wanted(record: dict[str, Any]) -> bool:
            return (
                (not statuses or record["status"] in statuses)
                and (not phone_number_id or record.get("phoneNumberId") == phone_number_id)
                and (not assistant_id or record.get("assistantId") == assistant_id)
                and (call_id is None or record["id"] == call_id)
                and query.admits(record)
            )

        result = [record for record in by_id.values() if wanted(record)]
        result.sort(key=lambda c: (c["createdAt"], c["id"]), reverse=True)
        return result[: query.limit]

    async def get_call(self, call_id: str) -> dict[str, Any] | None:
        """A live call's current state, its unsaved snapshot, or its stored record; a
        recorded call's ``artifact`` with fresh recording links."""
        live = self.callflow.get(call_id)
        if live is not None:
            return live.to_json()
        record = self.recorder.unsaved(call_id)
        if record is None:
            record = await self.store.get_call(call_id)
        if record is None or self._recording_links is None:
            return record
        if not was_recorded(record.get("sipbridge", {}).get("media", {})):
            return record
        links = self._recording_links.artifact(record["id"], self.clock())
        return {**record, "artifact": {**record.get("artifact", {}), **links}}

    async def recording_file(self, call_id: str, channel: Channel) -> Path | None:
        """The call's recording in ``channel``, if there is one."""
        if Path(call_id).name != call_id or call_id.startswith("."):
            return None  # not a call id: nothing outside the directory is ever named
        live = self.callflow.get(call_id)
        if live is None or live.ended_reason is not None:
            # An ended call's last second may still be on its way to the disk.
            await asyncio.to_thread(self.recording_writer.wait_finished, call_id, FINISH_WAIT_S)
        path = recording_path(self.recordings_path, call_id, channel)
        return path if await asyncio.to_thread(path.is_file) else None

    def recording_link_valid(
        self, call_id: str, channel: Channel, *, expires: int, signature: str
    ) -> bool:
        """Whether a signed recording link is ours and still valid."""
        links = self._recording_links
        return links is not None and links.valid(
            call_id, channel, expires=expires, signature=signature, now=time.time()
        )

    async def create_call(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /call``: an outbound call through the PBX that places them; its record.

        Raises:
            ValidationFailed: a bad body, or one naming what does not exist (400).
            CallRefused: no PBX can place calls (503), a cap is reached (429).
        """
        return (await self.callflow.create_outbound(body, self._outbound_pbx())).to_json()

    def _outbound_pbx(self) -> PbxBackend:
        """The backend ``outbound.pbx`` names, else the enabled one (Asterisk first)."""
        wanted = self.settings.outbound.pbx
        kinds = [wanted] if wanted else ["asterisk", "freeswitch"]
        backend = next((self.backends[k] for k in kinds if k in self.backends), None)
        if backend is None:
            raise CallRefused(
                503,
                "no PBX can place outbound calls: enable asterisk"
                + (f" (outbound.pbx = {wanted} is not enabled)" if wanted else ""),
            )
        if backend.kind == "freeswitch":
            raise CallRefused(503, "outbound calls through FreeSWITCH are not supported yet")
        return backend

    async def hangup_call(self, call_id: str) -> bool:
        """Hangs up a live call (``manually-canceled``)."""
        return await self.callflow.hangup(call_id)

    async def delete_call(self, call_id: str) -> dict[str, Any] | None:
        """Deletes an ended call: its record, then its recording files (a deleted call's
        recording is what a caller asking to be forgotten means); returns the record as it
        was. A call the flow still has (ringing, up, or sending its report) is refused."""
        if self.callflow.get(call_id) is not None or self.callflow.wrapping_up(call_id):
            raise CallStillLive(call_id)
        record = await self.get_call(call_id)
        if record is None:
            return None
        # A snapshot still queued would write the record back after the delete.
        await self.recorder.flush()
        await self.store.delete_call(call_id)
        # A recorded id is one sipbridge made (a UUID): it names files in the directory only.
        await asyncio.to_thread(self.recording_writer.wait_finished, call_id, FINISH_WAIT_S)
        files = await asyncio.to_thread(delete_recording, self.recordings_path, call_id)
        log.info("call %s deleted: its record and %d recording files", call_id, files)
        return record

    async def health(self) -> dict[str, Any]:
        """Store state, PBX links, live calls, queued webhooks."""
        store = await self.store.health()
        links_ok = all(self.pbx_links.values())
        report: dict[str, Any] = {
            "status": "ok" if store.state == "ok" and links_ok else "degraded",
            "version": __version__,
            "store": store.state,
            "pbx": {name: ("up" if up else "down") for name, up in self.pbx_links.items()},
            "activeCalls": len(self.callflow.active()),
            "pendingWebhooks": self.dispatcher.pending,
            "media": self.callflow.describe_media(),
            "backends": {kind: backend.describe() for kind, backend in self.backends.items()},
            "pendingCallRecords": self.recorder.backlog,
            "load": self._load(),
        }
        if store.detail is not None:
            report["storeDetail"] = store.detail
        return report

    def _load(self) -> dict[str, Any]:
        """Overload, as the admission rule sees it: would a call offered now be refused?"""
        now = time.monotonic()
        sustained_s = self.event_loop_lag.sustained(now)
        limits = self.settings.service
        refusal = admit(
            len(self.callflow.active()) + 1,
            sustained_s,
            RoutingDefaults.from_settings(self.settings),
        )
        return {
            "eventLoopLagMs": round(sustained_s * 1000, 1),
            "eventLoopLagPeakMs": round(self.event_loop_lag.peak(now) * 1000, 1),
            "maxEventLoopLagMs": limits.max_event_loop_lag_ms or None,
            "maxCalls": limits.max_calls or None,
            "refusingNewCalls": refusal[0] if refusal else None,
            "assistantFramesShed": self.callflow.frames_shed,
        }

    def metrics_text(self) -> bytes:
        """Prometheus text exposition."""
        return self.metrics.render()
