"""What a service runs in the background, stopped together.

Every service holds a few asyncio tasks (watches, loops) and NATS subscriptions; this
keeps them in one place so stopping is one call that cancels, waits and unsubscribes,
and a subscription whose connection is already closed does not fail the stop.

A stop never waits forever: a task can lose its cancel (on Python 3.11
``asyncio.wait_for``, ours or a library's, drops one that meets its inner future
finishing) and loop on, so the tasks still running are cancelled again until they end,
and after ``STOP_S`` the stop names them in the log and goes on without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

log = logging.getLogger("hami.lifecycle")

STOP_S = 10.0
RECANCEL_S = 0.5


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

    async def stop(self, timeout: float = STOP_S) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending: set[asyncio.Task[Any]] = {*self.tasks, *self.short}
        while pending:
            for t in pending:
                t.cancel()
            left = deadline - loop.time()
            if left <= 0:
                log.error("stopping: %d task(s) did not end after %.0f s, left running: %s",
                          len(pending), timeout, ", ".join(sorted(t.get_name() for t in pending)))
                break
            done, pending = await asyncio.wait(pending, timeout=min(RECANCEL_S, left))
            for t in done:  # retrieved, so asyncio does not log them as never retrieved
                if not t.cancelled():
                    t.exception()
        self.tasks.clear()
        for s in self.subs:
            with contextlib.suppress(Exception):  # the connection may be closed already
                await s.unsubscribe()
        self.subs.clear()
