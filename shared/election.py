"""Leader election decisions over a ``coordination.k8s.io/v1`` Lease: pure, no I/O.

client-go's ``leaderelection`` semantics, kept exactly where they matter for safety:

- A lease is expired by the candidate's *own* clock: it notes (monotonic) when it last
  saw the Lease record change, and takes the lease only once ``leaseDurationSeconds``
  (the holder's own figure) have passed since then with no change. The server's
  ``renewTime`` is never compared with the local clock, so clock skew between nodes
  does not matter.
- The leader renews every retry period; if no renewal succeeds within the renew
  deadline (measured from the *start* of the last successful write, so it holds even
  when the answer was slow) it stops leading. ``renew_deadline < lease_duration`` means
  it stops before any other candidate can consider the lease expired.
- Seeing another holder in a valid record while leading means leadership is lost now.
- Release (a clean stop): holderIdentity empty, leaseDurationSeconds 1, so the next
  candidate takes over at once.

:mod:`shared.leader` does the reads and writes (with resourceVersion preconditions).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any


def micro_time(t: dt.datetime) -> str:
    """Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec, as the election reads and writes it."""

    holder: str = ""
    duration_s: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def from_spec(cls, spec: Any) -> LeaseRecord:
        spec = spec if isinstance(spec, dict) else {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_s=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def to_spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


@dataclass(frozen=True)
class Timing:
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration, "
                f"got {self.retry_period:g} / {self.renew_deadline:g} / {self.lease_duration:g}"
            )
        if self.lease_duration < 1:
            raise ValueError("the lease duration is whole seconds, at least 1")


@dataclass
class Election:
    """One candidate's view: what it last observed, and when (its monotonic clock)."""

    identity: str
    timing: Timing
    observed: LeaseRecord | None = None
    observed_at: float = 0.0
    last_renew: float | None = None  # start of the last successful write while leading

    def is_leader(self) -> bool:
        return self.observed is not None and self.observed.holder == self.identity

    def observe(self, current: LeaseRecord | None, now: float) -> None:
        """Note the record read at ``now``; the expiry clock restarts only on a change."""
        if current != self.observed:
            self.observed = current
            self.observed_at = now

    def held_by_other(self, now: float) -> bool:
        """Another holder whose lease has not expired by our own observation."""
        o = self.observed
        if o is None or not o.holder or o.holder == self.identity:
            return False
        return now < self.observed_at + o.duration_s

    def proposal(self, current: LeaseRecord | None, now: float, wall: dt.datetime) -> LeaseRecord | None:
        """After reading ``current`` at ``now``: the record to write (create when
        ``current`` is None), or None when the lease is someone else's."""
        self.observe(current, now)
        if self.held_by_other(now):
            return None
        t = micro_time(wall)
        rec = LeaseRecord(self.identity, int(self.timing.lease_duration), t, t, 0)
        if current is None:
            return rec
        if current.holder == self.identity:
            return LeaseRecord(rec.holder, rec.duration_s, current.acquire_time or t, t,
                               current.transitions)
        return LeaseRecord(rec.holder, rec.duration_s, t, t, current.transitions + 1)

    def written(self, record: LeaseRecord, started: float, now: float) -> None:
        """A write of ``record`` begun at ``started`` succeeded at ``now``."""
        self.observed = record
        self.observed_at = now
        self.last_renew = started

    def renew_overdue(self, now: float) -> bool:
        """The leader must stop: no renewal has succeeded within the renew deadline."""
        return self.last_renew is None or now - self.last_renew >= self.timing.renew_deadline

    def lost(self) -> None:
        self.last_renew = None

    def release_record(self, wall: dt.datetime) -> LeaseRecord | None:
        """What a leader writes on a clean stop (None: nothing to release)."""
        if not self.is_leader() or self.observed is None:
            return None
        t = micro_time(wall)
        return LeaseRecord("", 1, t, t, self.observed.transitions)
