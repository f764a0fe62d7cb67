"""What became of each direct client's request: the ``hami-outcomes`` KV bucket.

A ``hami submit`` request ends in exactly one of two ways, recorded under its uid:

- ``answered``: the binder serving the submit told its client where it is placed. The
  binder writes it with a create (compare-and-set from nothing) *before* it replies.
- ``withdrawn``: nobody waits for it any more (the wait timed out, the client withdrew,
  or a binder found a decision nobody answered). Never place it; release it if placed.

- ``released``: its holder released it (``hami release``) after it was answered.
  Written over ``answered`` before the release is published, so that a copy of the
  request redelivered after the release (a placement replica that crashed before its
  acknowledgement) is refused like a withdrawn one instead of being placed again for
  a client that has been told it is gone.

A create loses to whatever is there already, so of a reply and a withdrawal racing on
two binder replicas only the first counts: a client is told "placed" only if nobody
withdrew the request first, and every other decision is released. Placement follows
the bucket (a KV watch) so that no replica places a withdrawn request, also one
redelivered after a crash to a replica that never saw its withdrawal.

Entries expire with the bucket's TTL (the longest wait, ``bus.maxWait``, plus a
margin): by then every request they concern is past its deadline, which placement
refuses on its own, so the bucket stays bounded.
"""

from __future__ import annotations

import time

from nats.js import api
from nats.js.errors import BadRequestError

from shared import subjects
from shared.bus import Bus, Conflict
from shared.schemas import RequestOutcome

ANSWERED = "answered"
WITHDRAWN = "withdrawn"
RELEASED = "released"
# Never to be placed (again): what placement refuses.
CLOSED = frozenset({WITHDRAWN, RELEASED})
# Kept this long after the longest wait: a late redelivery still finds its outcome.
TTL_MARGIN_S = 600.0


def ttl(max_wait: float) -> float:
    return max_wait + TTL_MARGIN_S


class Outcomes:
    """One service's handle on the bucket; created (with its TTL) on first use."""

    def __init__(self, bus: Bus, max_wait: float) -> None:
        self.bus = bus
        self.ttl = ttl(max_wait)
        self._ready = False

    async def ensure(self) -> None:
        """Create the bucket with its TTL unless it exists (any replica may be first)."""
        if self._ready:
            return
        if self.bus.may_create(f"KV_{subjects.OUTCOMES_BUCKET}"):
            try:
                await self.bus.js.create_key_value(api.KeyValueConfig(
                    bucket=subjects.OUTCOMES_BUCKET, history=1, ttl=self.ttl,
                    replicas=self.bus.replicas, direct=True,
                ))
            except BadRequestError:
                pass  # exists (another replica made it, maybe with another TTL): use it
        self._ready = True

    async def get(self, uid: str) -> RequestOutcome | None:
        await self.ensure()
        value, _ = await self.bus.kv_get(subjects.OUTCOMES_BUCKET, uid, RequestOutcome)
        return value

    async def claim(self, outcome: RequestOutcome) -> RequestOutcome:
        """Record ``outcome`` unless one is recorded already; returns the one that holds."""
        await self.ensure()
        for _ in range(4):
            try:
                await self.bus.kv_cas(subjects.OUTCOMES_BUCKET, outcome.uid, outcome, 0)
                return outcome
            except Conflict:
                held = await self.get(outcome.uid)
                if held is not None:
                    return held
                # Expired between the create and the read: try again.
        raise RuntimeError(f"{outcome.uid}: its outcome kept changing")

    async def withdraw(self, uid: str, name: str = "", namespace: str = "",
                       deadline: float = 0.0) -> None:
        """Record that nobody waits for ``uid`` (overwriting ``answered``: a client that
        withdraws after its reply was lost does not want the allocation)."""
        await self._put(uid, WITHDRAWN, name, namespace, deadline)

    async def release(self, uid: str, name: str = "", namespace: str = "") -> None:
        """Record that ``uid``'s holder released it: never place it again."""
        await self._put(uid, RELEASED, name, namespace, 0.0)

    async def _put(self, uid: str, state: str, name: str, namespace: str,
                   deadline: float) -> None:
        await self.ensure()
        await self.bus.kv_put(subjects.OUTCOMES_BUCKET, uid, RequestOutcome(
            uid=uid, state=state, name=name, namespace=namespace, deadline=deadline,
            at=time.time(),
        ))
