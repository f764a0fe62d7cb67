"""Gangs: all-or-nothing placement of a group, decided from the ledger alone. No I/O.

A gang member (``AllocRequested.gang``/``gang_size``, Kubernetes: a pod of a coscheduling
``PodGroup``) is placed as a *reservation*: a ledger entry carrying the gang's key and a
deadline (``LedgerAlloc.gang_expires`` > 0). The reservation holds its slice exactly as an
allocation does, so nobody else can take it, but no ``decided`` is announced for it. Once
``gang_size`` members are reserved the gang is *committed*: each entry is rewritten with
``gang_expires`` 0 and every member's decision is announced. A gang still partial at its
deadline is *rolled back*: its reservations are removed and its members told.

Everything needed to decide this is in the ledger entries, so any placement replica, or
one started after a crash, carries a half-done gang on: a complete gang whose commit
stopped half way is committed (rolled forward), a partial one past its deadline rolled
back. Both steps are idempotent.

Deadlock: two gangs that each need every card, reserving in turns, could each hold half
and wait for ever (until both deadlines, then do it again). The older gang wins instead
(wound-wait): when a member of a gang cannot be placed, the uncommitted reservations of
*younger* gangs are candidates for release, and a younger gang that holds what the
member needs is rolled back as a whole, its members waiting again. A gang's age is its
rank: the deadline of its reservations (they all share the first one's), then its key. A
gang with nothing reserved is younger than every gang holding reservations, so it never
rolls one back; the oldest gang is never rolled back by another, so some gang always
makes progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from shared.schemas import AllocRequested, LedgerAlloc, NodeLedger

# How long a partial gang may hold its reservations (coscheduling's PodGroup default
# scheduleTimeoutSeconds is 60 s as well).
GANG_TIMEOUT_S = 60.0
# Rank of a gang: (deadline of its reservations, key). Lower is older.
Rank = tuple[float, str]


def key_of(namespace: str, name: str) -> str:
    """The gang's identity in the ledger: a gang name is unique within its namespace."""
    return f"{namespace}/{name}"


def request_key(req: AllocRequested) -> str:
    return key_of(req.namespace, req.gang)


def problems(req: AllocRequested) -> list[str]:
    """What is wrong with a request's gang fields (empty: fine or not in a gang)."""
    out: list[str] = []
    if not req.gang:
        if req.gang_size:
            out.append("gang_size given without a gang name")
        return out
    if len(req.gang) > 253 or "/" in req.gang:
        out.append(f"gang name {req.gang[:64]!r} must be at most 253 characters, without '/'")
    if req.gang_size < 1:
        out.append(f"gang {req.gang}: gang_size must be at least 1, not {req.gang_size}")
    if req.gang_timeout < 0:
        out.append(f"gang {req.gang}: gang_timeout must not be negative")
    return out


@dataclass(slots=True)
class Member:
    node: str
    alloc: LedgerAlloc

    @property
    def committed(self) -> bool:
        return self.alloc.gang_expires <= 0


@dataclass(slots=True)
class GangView:
    """One gang as the ledger shows it: its members reserved or committed, by uid."""

    key: str
    size: int = 0
    members: dict[str, Member] = field(default_factory=dict)

    @property
    def reserved(self) -> list[Member]:
        """The members not yet committed."""
        return [m for m in self.members.values() if not m.committed]

    @property
    def expires(self) -> float:
        """When the partial gang is rolled back (0: nothing uncommitted)."""
        return min((m.alloc.gang_expires for m in self.reserved), default=0.0)

    @property
    def complete(self) -> bool:
        return self.size > 0 and len(self.members) >= self.size

    @property
    def rank(self) -> Rank:
        return (self.expires, self.key)


def gangs_in(ledgers: Iterable[NodeLedger]) -> dict[str, GangView]:
    """Every gang with a member in ``ledgers``."""
    out: dict[str, GangView] = {}
    for led in ledgers:
        for uid, a in led.allocs.items():
            if not a.gang:
                continue
            g = out.setdefault(a.gang, GangView(key=a.gang))
            g.size = max(g.size, a.gang_size)
            g.members[uid] = Member(node=led.node, alloc=a)
    return out


def expiry_for(view: GangView | None, now: float, timeout: float) -> float:
    """The deadline a new reservation of this gang gets: the one its reservations already
    have (a gang has one deadline), else ``now`` plus the timeout."""
    if view is not None and view.reserved:
        return view.expires
    return now + (timeout if timeout > 0 else GANG_TIMEOUT_S)


def rank_for(view: GangView | None, key: str, expires: float) -> Rank:
    return view.rank if view is not None and view.reserved else (expires, key)


def reservation(alloc: LedgerAlloc, req: AllocRequested, expires: float) -> LedgerAlloc:
    """The ledger entry of a member's reservation."""
    return msgspec.structs.replace(
        alloc, gang=request_key(req), gang_size=req.gang_size, gang_expires=expires
    )


def committed_ledger(led: NodeLedger, key: str) -> NodeLedger | None:
    """``led`` with the gang's reservations committed; None when none is left to commit."""
    todo = {u for u, a in led.allocs.items() if a.gang == key and a.gang_expires > 0}
    if not todo:
        return None
    allocs = {
        u: msgspec.structs.replace(a, gang_expires=0.0) if u in todo else a
        for u, a in led.allocs.items()
    }
    return NodeLedger(node=led.node, allocs=allocs)


def rolled_back_ledger(led: NodeLedger, key: str) -> tuple[NodeLedger, list[LedgerAlloc]] | None:
    """``led`` without the gang's uncommitted reservations, and those removed; None when
    it holds none (a rollback already done is not done again)."""
    gone = [a for a in led.allocs.values() if a.gang == key and a.gang_expires > 0]
    if not gone:
        return None
    drop = {a.uid for a in gone}
    return NodeLedger(node=led.node, allocs={u: a for u, a in led.allocs.items() if u not in drop}), gone


@dataclass(slots=True, frozen=True)
class Action:
    verb: str  # "commit" | "rollback"
    key: str


def sweep(views: Iterable[GangView], now: float) -> list[Action]:
    """What the gangs in the ledger need now: a complete gang with members still reserved
    is committed (a commit interrupted half way goes forward, never back), a partial one
    past its deadline rolled back. Oldest first."""
    out: list[Action] = []
    for g in sorted(views, key=lambda v: v.rank):
        if not g.reserved:
            continue
        if g.complete:
            out.append(Action("commit", g.key))
        elif g.expires <= now:
            out.append(Action("rollback", g.key))
    return out


def wound_priority(views: dict[str, GangView], mine: Rank) -> Callable[[LedgerAlloc], int | None]:
    """For the preemption search (``preempt.choose`` with priority 1): the uncommitted
    reservations of gangs younger than ``mine`` may be released (priority 0); nothing
    else may (None)."""

    def priority_of(a: LedgerAlloc) -> int | None:
        if not a.gang or a.gang_expires <= 0:
            return None
        g = views.get(a.gang)
        if g is None or g.rank <= mine or g.complete:
            return None
        return 0

    return priority_of
