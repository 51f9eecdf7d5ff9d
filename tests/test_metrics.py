from __future__ import annotations

from bridge.metrics import CONTENT_TYPE, Metrics


def test_each_service_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.calls_total.labels("accepted").inc()
    first.pbx_link_up.labels("asterisk").set(1)
    first.webhook_seconds.labels("assistant-request", "ok").observe(0.2)
    text = first.render().decode()
    assert 'sipbridge_calls_total{outcome="accepted"} 1.0' in text
    assert 'sipbridge_pbx_link_up{pbx="asterisk"} 1.0' in text
    assert (
        'sipbridge_webhook_seconds_bucket{le="0.25",result="ok",type="assistant-request"} 1.0'
        in text
    )
    assert 'outcome="accepted"' not in second.render().decode()
    assert "_created" not in text  # no per-series creation timestamps cluttering the output
    assert CONTENT_TYPE.startswith("text/plain")


def test_a_calls_assistant_audio_is_counted_by_outcome() -> None:
    metrics = Metrics()
    metrics.count_assistant_frames(
        {
            "assistantFrames": 160,
            "assistantFramesPlayed": 100,
            "assistantFramesDroppedFull": 0,
            "assistantFramesShedLate": 30,
            "assistantFramesCleared": 20,
            "assistantFramesUnplayedAtEnd": 10,
        }
    )
    text = metrics.render().decode()
    assert 'sipbridge_assistant_frames_total{outcome="played"} 100.0' in text
    assert 'sipbridge_assistant_frames_total{outcome="shed_late"} 30.0' in text
    assert 'sipbridge_assistant_frames_total{outcome="unplayed_at_end"} 10.0' in text
    assert 'outcome="dropped_full"' not in text  # nothing to count, no series
