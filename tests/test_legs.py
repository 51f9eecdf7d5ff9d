"""A leg's outlet: events pushed to the session's sink, or kept (bounded) until one attaches."""

from __future__ import annotations

import asyncio

from bridge.events import LegAudio, LegClosed, LegDtmf, LegEvent
from bridge.legs import LegOutlet


def frame(n: int) -> LegAudio:
    return LegAudio(bytes([n]) * 320)


async def test_events_are_kept_until_received_and_the_end_is_repeated() -> None:
    outlet = LegOutlet()
    outlet.put(frame(1))
    outlet.put(LegDtmf("5"))
    assert await outlet.receive() == [frame(1), LegDtmf("5")]
    waiting = asyncio.ensure_future(outlet.receive())
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing kept: it waits for the next event
    outlet.put(LegClosed(by_caller=True))
    assert await waiting == [LegClosed(by_caller=True)]
    outlet.put(frame(2))  # nothing after the end
    assert await outlet.receive() == [LegClosed(by_caller=True)]
    assert outlet.closed


def test_a_sink_takes_what_was_kept_then_each_event_as_it_comes() -> None:
    outlet = LegOutlet()
    taken: list[LegEvent] = []
    outlet.put(frame(1))
    outlet.attach(taken.append)
    assert taken == [frame(1)]
    outlet.put(frame(2))
    assert taken == [frame(1), frame(2)]  # synchronously, in put()
    outlet.attach(None)
    outlet.put(frame(3))
    assert taken == [frame(1), frame(2)]
    outlet.attach(taken.append)
    assert taken == [frame(1), frame(2), frame(3)]


def test_a_sink_that_detaches_while_taking_kept_events_leaves_the_rest_kept() -> None:
    outlet = LegOutlet()
    for n in range(3):
        outlet.put(frame(n))
    taken: list[LegEvent] = []

    def take_one(event: LegEvent) -> None:
        taken.append(event)
        outlet.attach(None)  # the session ended on this event

    outlet.attach(take_one)
    assert taken == [frame(0)]
    outlet.attach(taken.append)
    assert taken == [frame(0), frame(1), frame(2)]


def test_without_a_taker_the_oldest_audio_gives_way_but_never_the_end() -> None:
    outlet = LegOutlet(max_kept=3)
    for n in range(5):
        outlet.put(frame(n))
    outlet.put(LegClosed(by_caller=False, detail="gone"))
    assert outlet.dropped == 2
    taken: list[LegEvent] = []
    outlet.attach(taken.append)
    assert taken == [frame(2), frame(3), frame(4), LegClosed(by_caller=False, detail="gone")]
