"""The queues with fair share as placement reports them, for the page at ``/`` and ``/metrics``.

Placement owns the queue tree (the configured queues and the Kubernetes Queue
resources), each queue's use and its pending requests; the metrics service keeps none
of it. :class:`Queues` asks ``hami.placement.queues``, the question ``hami queues``
asks, when the page's view or a scrape needs the answer, and keeps that answer until an
event or a ledger write says use or pending may have changed, or :data:`FRESH_S`
passes (a Queue resource edited says nothing the metrics service hears). Askers at the same time share one request. A failed
ask (placement not running, not answering) is remembered for :data:`RETRY_S`, so that
a missing placement does not hold up every refresh of the page by the request's
timeout. :func:`queue_view` is the page's part of it; :class:`QueuesCollector` renders
the ``hami_queue_*`` series from the last answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import nats.errors
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import logs, subjects
from shared.bus import BadMessage, Bus
from shared.schemas import QueuesReply, QueuesRequest

log = logging.getLogger("hami.metrics.queues")
noisy = logs.RateLimited(log)

FRESH_S = 5.0  # an answer no event has made stale is asked again after this long
RETRY_S = 5.0  # a failed ask is not repeated sooner than this
ASK_TIMEOUT_S = 1.0  # placement answers from memory: a slow answer is a missing one
MIB = 1024 * 1024


class _Answer(QueuesReply, kw_only=True):
    # Placement's ErrorReply decodes to this with only ``error`` set; decoded as a
    # QueuesReply it would read as "no queues configured".
    error: str = ""


@dataclass(frozen=True)
class QueueState:
    """Placement's last answer, or why there is none (``error``)."""

    reply: QueuesReply | None = None
    error: str = ""


def ask_placement(bus: Bus) -> Callable[[], Awaitable[QueuesReply]]:
    """The request ``hami queues`` makes, on the metrics service's own connection."""

    async def ask() -> QueuesReply:
        got = await bus.request(
            subjects.PLACEMENT_QUEUES, QueuesRequest(), _Answer, timeout=ASK_TIMEOUT_S
        )
        if got.error:
            raise BadMessage(got.error)
        return got

    return ask


class Queues:
    def __init__(
        self,
        ask: Callable[[], Awaitable[QueuesReply]],
        clock: Callable[[], float] = time.monotonic,
        fresh: float = FRESH_S,
        retry: float = RETRY_S,
    ) -> None:
        self._ask = ask
        self.clock = clock
        self.fresh = fresh
        self.retry = retry
        self.state = QueueState(error="placement not asked yet")
        self._at = -math.inf  # when ``state`` was got
        self._events = 0  # events seen: use and pending change only with them
        self._answered_at_event = -1  # ``_events`` when the answer in ``state`` was asked
        self._asking: asyncio.Task[QueueState] | None = None

    def changed(self) -> None:
        """An event: a queue's use or pending may differ from the last answer."""
        self._events += 1

    async def current(self) -> QueueState:
        """The last answer while still good, else a new one (shared with other askers)."""
        age = self.clock() - self._at
        if self.state.reply is not None:
            if self._answered_at_event == self._events and age < self.fresh:
                return self.state
        elif age < self.retry:
            return self.state
        if self._asking is None:
            # The event count now, not when the task first runs: an event in between
            # must still make this answer stale.
            self._asking = asyncio.create_task(self._refresh(self._events))
        # Shielded: a browser going away cancels its own wait, not the others' answer.
        return await asyncio.shield(self._asking)

    async def stop(self) -> None:
        """Ends an ask under way (the service stops; its connection goes)."""
        asking = self._asking
        if asking is not None:
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asking

    async def _refresh(self, seen: int) -> QueueState:
        """Asks placement; an event after ``seen`` makes the answer stale at once."""
        try:
            state = QueueState(reply=await self._ask())
        except nats.errors.NoRespondersError:
            state = QueueState(error="placement is not running: nothing answers")
        except TimeoutError:
            # Also what a connection without the right to ask gets: the server refuses
            # the publish and the request waits out its timeout.
            state = QueueState(error=f"placement did not answer within {ASK_TIMEOUT_S:g} s")
        except (BadMessage, nats.errors.Error) as exc:
            state = QueueState(error=f"placement's answer: {exc}")
        finally:
            self._asking = None
        if state.error:
            noisy.warning(f"queues:{state.error}", "queues unknown: %s", state.error)
        self.state, self._at, self._answered_at_event = state, self.clock(), seen
        return state


def _amount(mem: int, cores: int) -> dict[str, int | None]:
    # -1 is placement's "no limit" on the wire; JSON says it with null.
    return {"mem_mib": None if mem < 0 else mem, "cores": None if cores < 0 else cores}


def queue_view(state: QueueState) -> dict[str, Any]:
    """The page's queues: each with its depth in the tree, parents before children."""
    if state.reply is None:
        return {"known": False, "error": state.error, "rows": [], "capacity": None}
    depth: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for q in state.reply.queues:
        depth[q.name] = depth.get(q.parent, -1) + 1 if q.parent else 0
        rows.append(
            {
                "name": q.name,
                "parent": q.parent,
                "depth": depth[q.name],
                "weight": q.weight,
                "guarantee": _amount(q.guarantee_mem, q.guarantee_cores),
                "limit": _amount(q.limit_mem, q.limit_cores),
                "used": _amount(q.used_mem, q.used_cores),
                "borrowed": _amount(q.borrowed_mem, q.borrowed_cores),
                "pending": q.pending,
            }
        )
    return {
        "known": True,
        "error": "",
        "rows": rows,
        "capacity": {"mem_mib": state.reply.capacity_mem, "cores": state.reply.capacity_cores},
    }


class QueuesCollector(Collector):
    """``hami_queue_*``: each queue's guarantee, limit, use, borrowed share and pending,
    from placement's last answer (none while there is none). Memory in bytes, cores in
    percent of a card (100 per card), as HAMi's ``*_core_*_ratio`` series."""

    def __init__(self, state: Callable[[], QueueState]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        reply = self.state().reply
        if reply is None:
            return
        labels = ["queue", "parent"]

        def family(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        fams = {
            "gmem": family("hami_queue_guarantee_memory_bytes", "GPU memory guaranteed to a queue"),
            "gcore": family("hami_queue_guarantee_core_ratio", "Cores guaranteed to a queue"),
            "lmem": family("hami_queue_limit_memory_bytes", "GPU memory a queue may use at most"),
            "lcore": family("hami_queue_limit_core_ratio", "Cores a queue may use at most"),
            "umem": family("hami_queue_used_memory_bytes", "GPU memory a queue's slices hold"),
            "ucore": family("hami_queue_used_core_ratio", "Cores a queue's slices hold"),
            "bmem": family(
                "hami_queue_borrowed_memory_bytes", "GPU memory a queue uses beyond its guarantee"
            ),
            "bcore": family(
                "hami_queue_borrowed_core_ratio", "Cores a queue uses beyond its guarantee"
            ),
            "pending": family(
                "hami_queue_pending_requests", "Requests waiting in a queue and the ones below it"
            ),
            "weight": family("hami_queue_weight", "A queue's weight among its siblings"),
        }
        for q in reply.queues:
            at = [q.name, q.parent]
            fams["gmem"].add_metric(at, q.guarantee_mem * MIB)
            fams["gcore"].add_metric(at, q.guarantee_cores)
            if q.limit_mem >= 0:  # no limit: no sample, rather than a sentinel value
                fams["lmem"].add_metric(at, q.limit_mem * MIB)
            if q.limit_cores >= 0:
                fams["lcore"].add_metric(at, q.limit_cores)
            fams["umem"].add_metric(at, q.used_mem * MIB)
            fams["ucore"].add_metric(at, q.used_cores)
            fams["bmem"].add_metric(at, q.borrowed_mem * MIB)
            fams["bcore"].add_metric(at, q.borrowed_cores)
            fams["pending"].add_metric(at, q.pending)
            fams["weight"].add_metric(at, q.weight)
        yield from fams.values()
