"""The event loop's lag: the window of samples, and the watcher on a really starved loop."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from bridge.overload import EventLoopLag, watch_event_loop


def test_sustained_lag_is_late_on_every_sample_and_peak_is_the_worst() -> None:
    lag = EventLoopLag(window_s=3.0, sustained_s=1.0)
    assert (lag.sustained(0.0), lag.peak(0.0)) == (0.0, 0.0)
    for tick in range(10):
        lag.observe(0.2 if tick != 5 else 0.01, 10.0 + tick / 10)
    # One quiet sample in the last second: busy, not saturated. The peak remembers the worst.
    assert lag.sustained(10.9) == 0.01
    assert lag.peak(10.9) == 0.2
    for tick in range(10):
        lag.observe(0.25 + tick / 100, 11.0 + tick / 10)
    assert lag.sustained(11.95) == pytest.approx(0.25)  # late on every sample: saturated
    assert lag.peak(13.5) == pytest.approx(0.34)
    assert lag.sustained(13.5) == 0.0  # nothing sampled for a second (the watcher stopped)
    assert lag.peak(20.0) == 0.0
    lag.observe(-0.001, 21.0)  # a timer that fired early is no lag
    assert lag.peak(21.0) == 0.0


def test_a_late_start_is_a_burst_until_the_samples_cover_a_second() -> None:
    """The failure on a busy CI machine: a service whose first sample ran 296 ms late (its
    start-up) refused its first call as saturated, on one sample."""
    lag = EventLoopLag(window_s=3.0, sustained_s=1.0)
    lag.observe(0.296, 100.396)  # the first sample: covers [100.0, 100.396]
    assert lag.sustained(100.4) == 0.0 and lag.peak(100.4) == pytest.approx(0.296)
    now = 100.396
    while now < 101.1:  # late on every sample until the history covers a whole second
        now += 0.1 + 0.296
        lag.observe(0.296, now)
    assert lag.sustained(now) == pytest.approx(0.296)
    # One sample longer than the window (a 2 s block) covers it alone: saturated meanwhile.
    blocked = EventLoopLag(window_s=3.0, sustained_s=1.0)
    blocked.observe(0.01, 50.11)
    blocked.observe(2.0, 52.21)
    assert blocked.sustained(52.21) == pytest.approx(2.0)


async def test_the_watcher_sees_a_blocked_loop() -> None:
    lag = EventLoopLag()
    sampled = asyncio.Event()
    watcher = asyncio.create_task(watch_event_loop(lag, lambda _: sampled.set(), interval_s=0.01))
    try:
        await sampled.wait()
        time.sleep(0.3)  # noqa: ASYNC251 - the point: a starved event loop
        sampled.clear()
        await sampled.wait()  # the first sample after the block
        # The sleep in flight when the loop blocked took at least the 0.3 s block.
        assert lag.peak(time.monotonic()) >= 0.3 - 0.01 - 0.01
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
