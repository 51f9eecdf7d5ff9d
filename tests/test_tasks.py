from __future__ import annotations

import asyncio
import logging

import pytest

from bridge.tasks import TaskSet


async def test_failures_are_logged_and_tasks_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet("t")

    async def boom() -> None:
        raise RuntimeError("kaput")

    with caplog.at_level(logging.ERROR):
        task = tasks.spawn(boom(), "boom")
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    assert len(tasks) == 0
    assert "t:boom failed" in caplog.text and "kaput" in caplog.text


async def test_aclose_cancels_and_join_waits() -> None:
    tasks = TaskSet("t")
    release = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def waits() -> str:
        await release.wait()
        return "done"

    tasks.spawn(forever(), "forever")
    joined = tasks.spawn(waits(), "waits")
    release.set()
    assert await joined == "done"
    await tasks.aclose()
    assert cancelled.is_set() and len(tasks) == 0
    await tasks.join()


async def test_cancel_and_wait_outlasts_a_swallowed_cancellation() -> None:
    """Python 3.11's wait_for can swallow a cancel; one cancel() must not be all we try."""
    from bridge.tasks import cancel_and_wait

    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # as wait_for does when its inner future completes at that moment
        await asyncio.Event().wait()  # keeps running until cancelled again

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    await cancel_and_wait([task])
    assert swallowed.is_set() and task.cancelled()
