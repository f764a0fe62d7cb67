"""Kubernetes Events (and the pods' node label), written behind the binds.

An Event costs the binder as much as a Binding (one API request each), and each pod
gets two (FilteringSucceed, BindingSucceed). Posting them inline would halve the rate
at which a burst of pods is bound, for something nobody waits on. So, as client-go's
event broadcaster does, Events go through a bounded queue drained by a few sender
tasks; and, since this is one thread, the senders yield to binding: an Event waits
until no bind has run for ``quiet`` seconds (the burst is over), for at most
``max_delay`` seconds (then it is sent regardless, so a steady load cannot starve
them). A full queue drops the new Event and counts it (client-go drops too); Events are
best effort and never fail a bind.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from shared.schemas import FilterSummary

log = logging.getLogger("hami.binder.events")


def filtering_failed_messages(reason_nodes: Mapping[str, Sequence[str]], offered: int) -> list[str]:
    """The messages of HAMi's ``FilteringFailed`` events (Warning) for a pod no node
    fits: one per card reason, ``"<n> nodes <reason>(<node>,<node>)"`` with its nodes
    sorted, then ``"no available node, <offered> nodes do not meet"``. HAMi emits the
    per-reason ones in its map's order, which Go randomises; here they come by name."""
    out = [
        f"{len(nodes)} nodes {why}({','.join(sorted(nodes))})"
        for why, nodes in sorted(reason_nodes.items())
        if nodes
    ]
    out.append(f"no available node, {offered} nodes do not meet")
    return out


def filtering_succeed_message(node: str, filtered: FilterSummary | None) -> str:
    """The message of HAMi's ``FilteringSucceed`` event: ``"find fit node(<node>), <n>
    nodes not fit, <m> nodes fit(<node>:<score>,...)"``, the fitting nodes in the order
    HAMi sorts them (the chosen one last), each with its node score to two decimals and
    joined by commas; "not fit" is the offered nodes less the fitting ones. Without the
    filter's facts (a decision made outside the ranking: a move, a preemption) only the
    chosen node is named."""
    if filtered is None:
        return f"find fit node({node}), 1 nodes fit({node})"
    listed = ",".join(f"{n.node}:{_go_2f(n.score)}" for n in filtered.nodes)
    not_fit = filtered.offered - filtered.fits
    return f"find fit node({node}), {not_fit} nodes not fit, {filtered.fits} nodes fit({listed})"


def _go_2f(x: float) -> str:
    """Go's ``%.2f``: as Python's, but infinities and NaN spelled as Go spells them."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return f"{x:.2f}"


Post = Callable[[str, dict[str, Any]], Awaitable[Any]]  # (collection path, body)


class EventSender:
    def __init__(
        self,
        post: Post,
        *,
        max_queue: int = 10000,
        max_delay: float = 10.0,
        quiet: float = 0.5,
        senders: int = 4,
    ) -> None:
        self.post = post
        self.max_queue = max_queue
        self.max_delay = max_delay
        self.quiet = quiet
        self._last_busy = 0.0
        self.n_senders = senders
        self.queue: deque[tuple[float, str, dict[str, Any], Post]] = deque()
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._ready = asyncio.Event()  # the queue is not empty
        self._drained = asyncio.Event()  # the queue is empty and nothing is being sent
        self._drained.set()
        self._inflight = 0
        self._flushing = False
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------- the binder's side

    def busy(self) -> _Busy:
        """``with sender.busy():`` around a bind: Events wait while any is running."""
        return _Busy(self)

    def emit(self, path: str, body: dict[str, Any], send: Post | None = None) -> None:
        """Queue an Event (POSTed to ``path``), or another write nobody waits on (sent
        with ``send``; never dropped: one per pod, so bounded by the pods bound)."""
        if send is None and len(self.queue) >= self.max_queue:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "event queue full (%d): %d events dropped", self.max_queue, self.dropped
                )
            return
        self.queue.append((time.monotonic(), path, body, send or self.post))
        self._drained.clear()
        self._ready.set()
        if not self._tasks:
            self._tasks = [
                asyncio.get_running_loop().create_task(self._sender(), name=f"events-{i}")
                for i in range(self.n_senders)
            ]

    async def flush(self, timeout: float = 5.0) -> None:
        """Send what is queued now without waiting for idleness (stop, tests)."""
        self._flushing = True
        self._idle.set()  # wakes the senders waiting for the binds to go quiet
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            log.warning("%d events not sent", len(self.queue) + self._inflight)
        finally:
            self._flushing = False
            if self._busy:
                self._idle.clear()

    async def stop(self) -> None:
        await self.flush()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _maybe_idle(self) -> None:
        if not self._busy and time.monotonic() - self._last_busy >= self.quiet * 0.99:
            self._idle.set()

    # ------------------------------------------------------------------ senders

    async def _sender(self) -> None:
        while True:
            if not self.queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            queued_at = self.queue[0][0]
            wait = queued_at + self.max_delay - time.monotonic()
            if wait > 0 and not self._idle.is_set():
                try:
                    async with asyncio.timeout(wait):
                        await self._idle.wait()
                except TimeoutError:
                    pass
                continue  # another sender may have taken it meanwhile
            _, path, body, send = self.queue.popleft()
            self._inflight += 1
            try:
                await send(path, body)
                self.sent += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failed += 1
                log.debug("event %s: %s", body.get("reason"), exc)
            finally:
                self._inflight -= 1
                if not self.queue and not self._inflight:
                    self._drained.set()


class _Busy:
    def __init__(self, sender: EventSender) -> None:
        self.s = sender

    def __enter__(self) -> None:
        self.s._busy += 1
        if not self.s._flushing:
            self.s._idle.clear()

    def __exit__(self, *exc: object) -> None:
        s = self.s
        s._busy -= 1
        if not s._busy:
            s._last_busy = time.monotonic()
            asyncio.get_running_loop().call_later(s.quiet, s._maybe_idle)
