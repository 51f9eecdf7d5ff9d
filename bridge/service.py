"""The composition root: builds every component from the settings and wires them together.

Only this module knows the whole graph. Startup order: store, webhook delivery, call flow, PBX
adapters, API. Shutdown is the reverse. ``drain`` stops taking calls and waits for the live ones
to finish (SIGTERM); ``aclose`` hangs up whatever is left (SIGINT, or after the drain timeout).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from bridge import __version__
from bridge.api import create_app
from bridge.callflow import CallFlow, PbxControl
from bridge.conversations import Conversations
from bridge.errors import PbxError, StoreError
from bridge.events import InviteFacts, PbxKind
from bridge.media.audiosocket import AudioSocketServer
from bridge.media.unicast import UnicastMedia
from bridge.metrics import Metrics
from bridge.pbx.asterisk import AsteriskAdapter
from bridge.pbx.freeswitch import FreeswitchAdapter
from bridge.records import CallRecorder
from bridge.resources import Resources
from bridge.routing import RoutingDefaults
from bridge.settings import Settings, is_loopback
from bridge.store import ListQuery, Store
from bridge.tasks import TaskSet
from bridge.webhooks import WebhookClient, WebhookDispatcher

log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _PbxEvents:
    """Where a PBX adapter's events go: the call flow, the link state, the media legs."""

    def __init__(
        self,
        service: Service,
        kind: PbxKind,
        adapter: Callable[[], PbxControl],
        unicast: UnicastMedia | None = None,
    ) -> None:
        self._service = service
        self._kind = kind
        self._adapter = adapter
        self._unicast = unicast

    def offered(self, facts: InviteFacts, truncated: bool) -> None:
        self._service.callflow.offer(facts, self._adapter())

    def hung_up(self, pbx_call_id: str, cause: int) -> None:
        self._service.callflow.hung_up(self._kind, pbx_call_id)
        if self._unicast is not None:
            self._unicast.hung_up(pbx_call_id)

    def dtmf(self, pbx_call_id: str, digit: str) -> None:
        # FreeSWITCH reports keys as events; they join the call's audio leg like AudioSocket's.
        if self._unicast is not None:
            self._unicast.dtmf(pbx_call_id, digit)

    def link_changed(self, up: bool, detail: str) -> None:
        self._service.set_link(self._kind, up)

    def known_calls(self) -> set[str]:
        return {
            call.facts.pbx_call_id
            for call in self._service.callflow.active()
            if call.facts.pbx == self._kind
        }


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
        self.conversations = Conversations(settings.pipeline, settings.media)
        self.audiosocket: AudioSocketServer | None = None
        self.asterisk: AsteriskAdapter | None = None
        self.unicast: UnicastMedia | None = None
        self.freeswitch: FreeswitchAdapter | None = None
        self._pbx_tasks = TaskSet("pbx")
        self.api_port: int | None = None
        self.pbx_links: dict[str, bool] = {}
        # Set and replaced on every change of a PBX link, so waiters wake up and look again.
        self._links_changed = asyncio.Event()

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
        if settings.api.org_id:
            self.resources.use_org_id(settings.api.org_id)
        org_id = await self.resources.org_id()
        self.recorder.start()
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.webhooks.concurrency * 4)
        )
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
            media=self.conversations,
        )
        self.conversations.bind(self._callflow)
        if settings.asterisk.enabled:
            await self._start_asterisk()
        if settings.freeswitch.enabled:
            await self._start_freeswitch()
        app = create_app(self, settings.api)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=5.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.api.host, settings.api.port)
        await site.start()
        addresses = self._runner.addresses
        self.api_port = int(addresses[0][1]) if addresses else settings.api.port
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

    async def _start_asterisk(self) -> None:
        media = self.settings.media
        self.audiosocket = AudioSocketServer(
            media.audiosocket_host,
            media.audiosocket_port,
            media.max_frame_bytes,
            self.conversations.attach,
        )
        await self.audiosocket.start()
        adapter = AsteriskAdapter(
            self.settings.asterisk,
            _PbxEvents(self, "asterisk", lambda: adapter),
            audiosocket_address=self.audiosocket_address,
        )
        self.asterisk = adapter
        self.set_link("asterisk", False)
        await adapter.start()

    async def _start_freeswitch(self) -> None:
        freeswitch, media = self.settings.freeswitch, self.settings.media
        self.unicast = UnicastMedia(
            media.unicast_host,
            media.unicast_advertise,
            on_leg=self.conversations.attach,
            hangup=self._hang_up_freeswitch_channel,
            start_timeout_s=media.connect_timeout_s,
        )
        unicast = self.unicast

        async def media_endpoint(
            facts: InviteFacts, call_id: str, source: tuple[str, int]
        ) -> tuple[str, int]:
            return await unicast.open(call_id, facts.channel, source)

        adapter = FreeswitchAdapter(
            freeswitch,
            _PbxEvents(self, "freeswitch", lambda: adapter, unicast),
            media_endpoint,
            on_transferred=unicast.transferred,
        )
        self.freeswitch = adapter
        self.set_link("freeswitch", False)
        await adapter.start()

    def _hang_up_freeswitch_channel(self, channel: str) -> None:
        """A unicast conversation ended: the channel is hung up over the event socket."""
        adapter = self.freeswitch
        if adapter is None:
            return

        async def hang_up() -> None:
            try:
                await adapter.hang_up_channel(channel)
            except PbxError as exc:
                log.warning("could not hang up FreeSWITCH channel %s: %s", channel, exc)

        self._pbx_tasks.spawn(hang_up(), f"hangup-{channel}")

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

    def audiosocket_address(self) -> str:
        """The host:port Asterisk connects AudioSocket to."""
        media = self.settings.media
        if media.audiosocket_advertise:
            return media.audiosocket_advertise
        assert self.audiosocket is not None
        host = media.audiosocket_host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is not an address to dial
            host = "127.0.0.1"
        return f"{host}:{self.audiosocket.port}"

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
        # Live calls are hung up through the PBX adapters and media legs, so those stop after.
        if self._callflow is not None:
            await self._callflow.aclose()
        await self.conversations.aclose()
        if self.audiosocket is not None:
            await self.audiosocket.aclose()
            self.audiosocket = None
        if self.asterisk is not None:
            await self.asterisk.aclose()
            self.asterisk = None
        if self.unicast is not None:
            await self.unicast.aclose()
            self.unicast = None
        await self._pbx_tasks.aclose()
        if self.freeswitch is not None:
            await self.freeswitch.aclose()
            self.freeswitch = None
        self._callflow = None
        if self._dispatcher is not None:
            await self._dispatcher.aclose()
            self._dispatcher = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.recorder.aclose()
        await self.store.aclose()

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
        """A live call's current state, its unsaved snapshot, or its stored record."""
        live = self.callflow.get(call_id)
        if live is not None:
            return live.to_json()
        unsaved = self.recorder.unsaved(call_id)
        if unsaved is not None:
            return unsaved
        return await self.store.get_call(call_id)

    async def hangup_call(self, call_id: str) -> bool:
        """Hangs up a live call (``manually-canceled``)."""
        return await self.callflow.hangup(call_id)

    async def health(self) -> dict[str, Any]:
        """Store reachability, PBX links, live calls, queued webhooks."""
        store_ok = True
        try:
            await self.store.ping()
        except StoreError:
            store_ok = False
        links_ok = all(self.pbx_links.values())
        return {
            "status": "ok" if store_ok and links_ok else "degraded",
            "version": __version__,
            "store": "ok" if store_ok else "unavailable",
            "pbx": {name: ("up" if up else "down") for name, up in self.pbx_links.items()},
            "activeCalls": len(self.callflow.active()),
            "pendingWebhooks": self.dispatcher.pending,
            "media": self.conversations.describe(),
            "pendingCallRecords": self.recorder.backlog,
        }

    def metrics_text(self) -> bytes:
        """Prometheus text exposition."""
        return self.metrics.render()
