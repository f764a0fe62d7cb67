"""What the operator needs beyond the ledger: pending requests, failure reasons, events.

Pure: :class:`Fleet` is fed the decoded events of ``hami.evt.>`` one by one and keeps
the requests that wait (with placement's last reason), counts of failed placement
attempts by HAMi's reason, each placement replica's ledger write conflicts as the
replica reports them, and a short history of what happened, for the page at ``/`` and
its live feed. :class:`FleetCollector` renders the series Grafana and the alert rules
read (``hami_node_healthy``, ``hami_pending_requests``, ...) at scrape time.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.metrics.collector import Snapshot
from shared.schemas import (
    AllocBindFailed,
    AllocBound,
    AllocDecided,
    AllocEvent,
    AllocFailed,
    AllocPreempted,
    AllocPrepared,
    AllocReleased,
    AllocRequested,
    NodeEvent,
    PendingRequest,
)

# Bounds: a flood of never-placeable requests or events must not grow the service.
MAX_PENDING = 10_000
FEED_SIZE = 200


def top_reason(p: PendingRequest) -> str:
    """The reason most nodes gave, HAMi's name (``CardInsufficientMemory``)."""
    if p.reasons:
        return max(sorted(p.reasons), key=lambda r: p.reasons[r])
    return "Unknown"


def _who(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def _ask(ev: AllocRequested) -> str:
    parts: list[str] = []
    for c in ev.containers:
        for d in c.devices:
            mem = (
                f"{d.mem} MiB"
                if d.mem
                else (f"{d.mem_percent}% memory" if d.mem_percent else "whole memory")
            )
            parts.append(f"{d.nums} x {d.vendor} ({mem}, {d.cores}% cores)")
    return ", ".join(parts) or "no devices"


def describe(ev: AllocEvent | NodeEvent) -> tuple[str, str]:
    """(verb, one line a person reads) for the feed."""
    if isinstance(ev, NodeEvent):
        return ev.verb, f"node {ev.node} {ev.verb}" + (f": {ev.reason}" if ev.reason else "")
    who = _who(ev.namespace, ev.name)
    if isinstance(ev, AllocRequested):
        return "requested", f"{who} requested {_ask(ev)}"
    if isinstance(ev, AllocDecided):
        cards = sorted(
            {f"{g.uuid} ({g.mem} MiB, {g.cores}%)" for c in ev.containers for g in c.devices}
        )
        return "decided", f"{who} placed on {ev.node}: " + (", ".join(cards) or "no cards")
    if isinstance(ev, AllocFailed):
        text = ev.message or ev.reason or "no fit"
        return "failed", f"{who} not placed: {text}" + (" (waits)" if ev.pending else "")
    if isinstance(ev, AllocBound):
        return "bound", f"{who} bound on {ev.node}"
    if isinstance(ev, AllocBindFailed):
        return "bind_failed", f"{who} bind failed on {ev.node}: {ev.message}"
    if isinstance(ev, AllocPrepared):
        return "prepared", f"{who} ready on {ev.node}" + (
            f" ({ev.container})" if ev.container else ""
        )
    if isinstance(ev, AllocPreempted):
        by = _who(ev.by_namespace, ev.by_name)
        return "preempted", f"{who} (priority {ev.priority}) preempted on {ev.node} by {by} (priority {ev.by_priority})"
    where = f" from {ev.node}" if ev.node else ""
    return "released", f"{who} released{where}" + (f" ({ev.reason})" if ev.reason else "")


def _event_time(ev: AllocEvent | NodeEvent, now: float) -> float:
    for attr in ("at", "decided_at", "failed_at", "bound_at", "requested_at"):
        t = getattr(ev, attr, 0.0)
        if t:
            return float(t)
    return now


class Fleet:
    """Pending requests, failure and conflict counts, and recent events, from the stream."""

    def __init__(self, clock: Callable[[], float] = time.time, feed_size: int = FEED_SIZE) -> None:
        self.clock = clock
        self.pending: OrderedDict[str, PendingRequest] = OrderedDict()
        self.failures: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.conflicts: dict[str, int] = {}  # placement replica -> its conflicts so far
        self.feed: deque[dict[str, Any]] = deque(maxlen=feed_size)
        self.seq = 0

    def observe(self, ev: AllocEvent | NodeEvent) -> dict[str, Any]:
        """Take one event in; returns the feed entry it made."""
        verb, text = describe(ev)
        self.events[verb] += 1
        if isinstance(ev, AllocFailed):
            # One failed attempt counts once under each reason some node gave.
            for reason in ev.reasons or {ev.reason or "Unknown": 1}:
                self.failures[reason] += 1
            if ev.pending:
                self.pending[ev.uid] = PendingRequest(
                    uid=ev.uid,
                    name=ev.name,
                    namespace=ev.namespace,
                    source=ev.source,
                    reasons=ev.reasons,
                    nodes_total=ev.nodes_total,
                    message=ev.message,
                    requested_at=ev.requested_at,
                    failed_at=ev.failed_at,
                )
                self.pending.move_to_end(ev.uid)
                while len(self.pending) > MAX_PENDING:
                    self.pending.popitem(last=False)
            else:
                self.pending.pop(ev.uid, None)
        elif isinstance(ev, AllocDecided | AllocReleased):
            self.pending.pop(ev.uid, None)
            if isinstance(ev, AllocDecided) and ev.replica:
                # A replica's count only grows (it restarts with the replica, which a
                # Prometheus counter allows).
                self.conflicts[ev.replica] = ev.conflicts
        self.seq += 1
        item: dict[str, Any] = {
            "seq": self.seq,
            "at": _event_time(ev, self.clock()),
            "verb": verb,
            "text": text,
            "node": getattr(ev, "node", "") or "",
            "name": getattr(ev, "name", "") or "",
            "namespace": getattr(ev, "namespace", "") or "",
        }
        self.feed.append(item)
        return item

    def waiting(self, placed: set[str]) -> list[PendingRequest]:
        """The pending requests, oldest first, less those a ledger now holds."""
        for uid in [u for u in self.pending if u in placed]:
            del self.pending[uid]
        return sorted(self.pending.values(), key=lambda p: (p.requested_at, p.namespace, p.name))


class FleetCollector(Collector):
    """The series our own dashboard and alert rules read, beyond HAMi's."""

    def __init__(self, fleet: Fleet, snapshot: Callable[[], Snapshot]) -> None:
        self.fleet = fleet
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        nodes, ledgers, health = self.snapshot()
        now = self.fleet.clock()
        healthy = GaugeMetricFamily(
            "hami_node_healthy",
            "1 while a node's heartbeats arrive, 0 once declared unhealthy",
            labels=["node", "reason"],
        )
        for name in sorted(nodes):
            h = health.get(name)
            healthy.add_metric(
                [name, h.reason if h and not h.healthy else ""], 1 if h is None or h.healthy else 0
            )
        yield healthy
        placed = {uid for led in ledgers.values() for uid in led.allocs}
        waiting = self.fleet.waiting(placed)
        yield GaugeMetricFamily(
            "hami_pending_requests", "Requests waiting for capacity", value=len(waiting)
        )
        age = GaugeMetricFamily(
            "hami_pending_request_age_seconds",
            "Seconds since a waiting request was made, with the reason it does not fit",
            labels=["namespace", "name", "reason"],
        )
        for p in waiting:
            age.add_metric(
                [p.namespace, p.name, top_reason(p)],
                max(0.0, now - (p.requested_at or p.failed_at)),
            )
        yield age
        failures = CounterMetricFamily(
            "hami_allocation_failures",
            "Failed placement attempts by HAMi's reason",
            labels=["reason"],
        )
        for reason, n in sorted(self.fleet.failures.items()):
            failures.add_metric([reason], n)
        yield failures
        events = CounterMetricFamily(
            "hami_events", "Allocation and node events seen, by verb", labels=["verb"]
        )
        for verb, n in sorted(self.fleet.events.items()):
            events.add_metric([verb], n)
        yield events
        conflicts = CounterMetricFamily(
            "hami_placement_conflicts",
            "Ledger writes a placement replica lost to another writer and redid",
            labels=["replica"],
        )
        for replica, n in sorted(self.fleet.conflicts.items()):
            conflicts.add_metric([replica], n)
        yield conflicts
