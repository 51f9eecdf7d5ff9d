"""The shared frame clock: one timer per tick for every call's paced writer."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.media.clock import FrameClock


class Writer:
    """Records the ticks it gets; can wake a test after ``until`` of them."""

    def __init__(self, until: int = 0) -> None:
        self.ticks: list[float] = []
        self.until = until
        self.reached = asyncio.Event()

    def __call__(self, now: float) -> None:
        self.ticks.append(now)
        if self.until and len(self.ticks) >= self.until:
            self.reached.set()


async def test_every_writer_runs_in_the_same_ticks_of_one_timer() -> None:
    clock = FrameClock()
    first, second = Writer(until=5), Writer()
    one, due = clock.subscribe(first)
    two, due_too = clock.subscribe(second)
    assert due == due_too  # both start at the same tick
    await first.reached.wait()
    clock.unsubscribe(one)
    clock.unsubscribe(two)
    assert first.ticks == second.ticks
    assert clock.ticks == len(first.ticks)  # one tick per frame for both writers, not two


async def test_ticks_keep_an_absolute_schedule_and_a_late_tick_does_not_burst() -> None:
    clock = FrameClock(period_s=0.02)
    seen: list[tuple[float, float]] = []  # (the tick's due time, when it ran)
    stalled = asyncio.Event()

    def writer(now: float) -> None:
        seen.append((clock.due, now))
        if len(seen) == 3:
            time.sleep(0.1)  # the point: a starved event loop, not a wait
        if len(seen) == 6:
            stalled.set()

    subscription, start = clock.subscribe(writer)
    await stalled.wait()
    clock.unsubscribe(subscription)
    assert clock.late_ticks >= 1  # more if the machine starved the test process too
    for index, (due, ran) in enumerate(seen):
        assert ran >= due - 0.001
        periods = (due - start) / 0.02
        assert abs(periods - round(periods)) < 1e-6, periods  # on the schedule
        if index:
            # The next tick is never due before the previous one ran: after the stall the
            # clock goes on with the next tick of the schedule, not a burst of ticks to catch
            # up (writers send or shed what fell due themselves).
            assert due > seen[index - 1][1]
    assert seen[3][0] - seen[2][0] >= 0.1  # the ticks that passed during the stall: skipped


async def test_the_clock_stops_with_its_last_writer_and_starts_again() -> None:
    clock = FrameClock()
    writer = Writer(until=2)
    subscription, _ = clock.subscribe(writer)
    await writer.reached.wait()
    clock.unsubscribe(subscription)
    clock.unsubscribe(subscription)  # idempotent
    assert clock._handle is None and len(clock) == 0
    ticked = clock.ticks

    again = Writer(until=2)
    subscription, _ = clock.subscribe(again)
    await again.reached.wait()
    clock.unsubscribe(subscription)
    assert clock.ticks == ticked + len(again.ticks)
    assert len(writer.ticks) == 2  # the first writer got nothing after it left


async def test_a_writer_that_raises_is_dropped_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FrameClock()

    def broken(now: float) -> None:
        raise RuntimeError("a bug in one call")

    healthy = Writer(until=3)
    clock.subscribe(broken)
    subscription, _ = clock.subscribe(healthy)
    await healthy.reached.wait()
    clock.unsubscribe(subscription)
    assert len(clock) == 0
    assert caplog.text.count("a paced writer failed") == 1
    assert "a bug in one call" in caplog.text


async def test_a_writer_removed_during_a_tick_is_not_called_in_it() -> None:
    clock = FrameClock()
    removed = Writer()
    subscriptions: dict[str, int] = {}

    def remover(now: float) -> None:
        clock.unsubscribe(subscriptions["removed"])

    done = Writer(until=2)
    subscriptions["remover"], _ = clock.subscribe(remover)
    subscriptions["removed"], _ = clock.subscribe(removed)
    subscriptions["done"], _ = clock.subscribe(done)
    await done.reached.wait()
    for subscription in subscriptions.values():
        clock.unsubscribe(subscription)
    assert removed.ticks == []
