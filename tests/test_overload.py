"""The event loop's lag: the window of samples, and the watcher on a really starved loop."""

from __future__ import annotations

import asyncio
import contextlib
import time

from bridge.overload import EventLoopLag, watch_event_loop


def test_the_lag_is_the_largest_sample_of_the_window() -> None:
    lag = EventLoopLag(window_s=3.0)
    assert lag.current(0.0) == 0.0
    lag.observe(0.010, 10.0)
    lag.observe(0.250, 10.1)
    lag.observe(0.020, 10.2)  # one quiet sample does not hide the busy one before it
    assert lag.current(10.2) == 0.250
    assert lag.current(13.0) == 0.250
    assert lag.current(13.15) == 0.020  # the busy sample left the window
    assert lag.current(20.0) == 0.0
    lag.observe(-0.001, 21.0)  # a timer that fired early is no lag
    assert lag.current(21.0) == 0.0


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
        assert lag.current(time.monotonic()) >= 0.3 - 0.01 - 0.01
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
