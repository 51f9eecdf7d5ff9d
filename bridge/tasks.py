"""Owned background tasks: every task sipbridge starts belongs to a :class:`TaskSet`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskSet:
    """Keeps references to tasks, logs their failures, and cancels them on :meth:`aclose`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Starts ``coro`` as a task owned by this set."""
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task %s failed", task.get_name(), exc_info=exc)

    async def join(self) -> None:
        """Waits for every task in the set (including ones started meanwhile)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancels every task and waits for them to finish."""
        while self._tasks:
            await cancel_and_wait(list(self._tasks))


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancels the tasks and returns once every one of them has finished.

    One ``cancel()`` is not always enough on Python 3.11: ``asyncio.wait_for`` (used inside
    libraries) can swallow a cancellation that arrives just as what it awaits completes. So a
    task still running after a moment is cancelled again.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
