"""A bound on tool calls running at once across all episodes, with the busy time the episode benchmark reports.

ToolOrchestra ran two tool executions at a time; here many episodes share one pool, so a burst of slow sandbox
runs cannot starve the machine, and `utilisation` says how much of the pool's capacity the run used.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class ToolPool:
    """Bounds how many tool calls run at once across all episodes, and measures how busy the pool was."""

    def __init__(self, workers: int = 16) -> None:
        if workers < 1:
            raise ValueError(f"tool pool workers={workers}: must be at least 1")
        self.workers = workers
        self.busy_s = 0.0
        self.calls = 0
        self.running = 0
        self.peak = 0
        """Most calls that ran at once."""
        self._semaphore: asyncio.Semaphore | None = None

    async def run(self, call: Awaitable[T]) -> T:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.workers)
        try:
            await self._semaphore.acquire()
        except BaseException:  # cancelled while queued: the call never starts, so close it unawaited
            if inspect.iscoroutine(call):
                call.close()
            raise
        start = time.perf_counter()
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            return await call
        finally:
            self._semaphore.release()
            self.running -= 1
            self.busy_s += time.perf_counter() - start
            self.calls += 1

    def utilisation(self, wall_s: float) -> float:
        """Busy worker-seconds over available worker-seconds during `wall_s`."""
        return self.busy_s / (self.workers * wall_s) if wall_s > 0 else 0.0
