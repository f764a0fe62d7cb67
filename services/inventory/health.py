"""Node health from heartbeats: a pure state machine, driven by the service's clock.

A node is unhealthy when no heartbeat arrived for ``unhealthy_after`` seconds, and
healthy again on the next heartbeat. Nodes known before this process started get a
full grace period from its start, so a restarted inventory does not declare the whole
cluster dead before the first heartbeats come in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Transition:
    node: str
    healthy: bool
    reason: str


class HealthTracker:
    def __init__(self, unhealthy_after: float, now: float) -> None:
        self.unhealthy_after = unhealthy_after
        self.started = now
        self.last_seen: dict[str, float] = {}
        self.healthy: dict[str, bool] = {}

    def known(self, node: str, now: float) -> None:
        """A node seen in the inventory: start its clock without a heartbeat yet."""
        self.last_seen.setdefault(node, now)
        self.healthy.setdefault(node, True)

    def forget(self, node: str) -> None:
        self.last_seen.pop(node, None)
        self.healthy.pop(node, None)

    def beat(self, node: str, now: float) -> Transition | None:
        self.last_seen[node] = max(now, self.last_seen.get(node, now))
        was = self.healthy.get(node)
        self.healthy[node] = True
        if was is False:
            return Transition(node, True, "heartbeat resumed")
        return None

    def tick(self, now: float) -> list[Transition]:
        out: list[Transition] = []
        for node, seen in self.last_seen.items():
            silent = now - max(seen, self.started)
            if self.healthy.get(node, True) and silent > self.unhealthy_after:
                self.healthy[node] = False
                out.append(Transition(node, False, f"no heartbeat for {silent:.1f}s"))
        return out
