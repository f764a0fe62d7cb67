"""What a service runs in the background, stopped together.

Every service holds a few asyncio tasks (watches, loops) and NATS subscriptions; this
keeps them in one place so stopping is one call that cancels, waits and unsubscribes,
and a subscription whose connection is already closed does not fail the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, Protocol


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...


class Background:
    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []
        self.subs: list[Subscription] = []
        self.short: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)
        return task

    def spawn_short(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task that ends on its own (one per message or batch): forgotten when done."""
        task = asyncio.create_task(coro, name=name)
        self.short.add(task)
        task.add_done_callback(self.short.discard)
        return task

    def add(self, task: asyncio.Task[Any]) -> None:
        self.tasks.append(task)

    def add_sub(self, sub: Subscription) -> None:
        self.subs.append(sub)

    async def stop(self) -> None:
        tasks = [*self.tasks, *self.short]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
        for s in self.subs:
            with contextlib.suppress(Exception):  # the connection may be closed already
                await s.unsubscribe()
        self.subs.clear()
