"""Prometheus metrics, one registry per service instance (no process-global state).

Names and labels are documented in ``docs/operations.md``.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The *_created series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Webhook round trips: assistant-request must fit 7.5 s, so the buckets resolve that range well.
_WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 60.0)


_ASSISTANT_FRAME_OUTCOMES = (
    ("played", "assistantFramesPlayed"),
    ("dropped_full", "assistantFramesDroppedFull"),
    ("shed_late", "assistantFramesShedLate"),
    ("cleared", "assistantFramesCleared"),
    ("unplayed_at_end", "assistantFramesUnplayedAtEnd"),
)


class Metrics:
    """The service's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls_active = Gauge(
            "sipbridge_calls_active", "Calls not yet ended.", registry=self.registry
        )
        self.calls_total = Counter(
            "sipbridge_calls",
            "Calls offered by the PBX, by routing outcome (accepted, transferred, rejected, "
            "abandoned before a decision).",
            ["outcome"],
            registry=self.registry,
        )
        self.calls_ended_total = Counter(
            "sipbridge_calls_ended",
            "Ended calls by endedReason.",
            ["reason"],
            registry=self.registry,
        )
        self.webhook_seconds = Histogram(
            "sipbridge_webhook_seconds",
            "Server message round trips, by message type and result (ok, http_error, timeout, "
            "connection_error).",
            ["type", "result"],
            buckets=_WEBHOOK_BUCKETS,
            registry=self.registry,
        )
        self.webhook_dropped_total = Counter(
            "sipbridge_webhook_dropped",
            "Server messages given up on, by reason (queue_full, retries_exhausted, rejected).",
            ["reason"],
            registry=self.registry,
        )
        self.pbx_link_up = Gauge(
            "sipbridge_pbx_link_up",
            "1 while the PBX control link is up.",
            ["pbx"],
            registry=self.registry,
        )
        self.assistant_frames_total = Counter(
            "sipbridge_assistant_frames",
            "The pipeline's 20 ms frames toward callers by what became of them (played, "
            "dropped_full, shed_late, cleared, unplayed_at_end); counted when a call's media ends.",
            ["outcome"],
            registry=self.registry,
        )
        self.event_loop_lag_seconds = Gauge(
            "sipbridge_event_loop_lag_seconds",
            "How late the event loop runs what is due (the largest lag of the last seconds).",
            registry=self.registry,
        )
        self.calls_refused_total = Counter(
            "sipbridge_calls_refused",
            "Calls refused with SIP 503 before routing, by why (max_calls, event_loop_lag).",
            ["why"],
            registry=self.registry,
        )
        self.recordings_stopped_total = Counter(
            "sipbridge_recordings_stopped",
            "Call recordings stopped by a write error (a full or read-only disk); the calls "
            "went on.",
            registry=self.registry,
        )
        self.store_errors_total = Counter(
            "sipbridge_store_errors",
            "Database operations that failed.",
            ["operation"],
            registry=self.registry,
        )

    def count_assistant_frames(self, media: Mapping[str, int]) -> None:
        """Adds one call's pipeline-audio accounting (``call.sipbridge.media``)."""
        for outcome, key in _ASSISTANT_FRAME_OUTCOMES:
            value = media.get(key, 0)
            if value:
                self.assistant_frames_total.labels(outcome).inc(value)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
