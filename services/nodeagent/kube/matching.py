"""Which pending pod can a kubelet Allocate call be for?  Pure bookkeeping, no I/O.

The kubelet's Allocate names ``n`` device IDs and nothing else. What we know
(docs/exact-matching.md):

- the node's ledger: every pod placed here, with each container's exact cards;
- the kubelet admits pods one at a time and allocates a pod's containers in spec order
  (init containers first), one Allocate per container that asks for the resource, so
  the Allocate calls of one pod come in a row; a pod whose admission fails part-way is
  abandoned (never continued after another pod started).

So the sequence of request sizes is a concatenation of the pods' *words* (the card
counts of their containers with devices, in order). :class:`Matcher` follows every
parse of that sequence that is still possible and answers, for the next call of size
``n``, every (pod, container) it could be: the *candidates*. It never guesses: one
candidate means the call is certainly for that container; several mean the caller must
answer something safe for all of them.

Pods that no observation can tell apart (same word, nothing consumed yet when they
joined) form a *group*; a parse (a :class:`Config`) only counts how many pods of each
group the kubelet has started, and which group's pod is in progress. That keeps the
number of parses small: a burst of 40 identical pods is one group and one parse per
step, not 40! orderings. A group consumed in every parse is dropped (its pods are known
to be allocated), so a pod arriving later is never confused with pods that already run.

When the observations contradict every parse (a pod unknown to the ledger, a restart
without saved state) the matcher answers every container of that size anywhere on the
node and starts over from "nothing consumed": always a superset of the truth.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.schemas import ContainerGrant, LedgerAlloc

log = logging.getLogger("hami.nodeagent.matching")

Word = tuple[int, ...]
Counts = tuple[tuple[int, int], ...]  # (group id, pods of it started), sorted, no zeros

# Past this many parses, merge them into an over-approximation (see _collapse).
MAX_CONFIGS = 256


@dataclass(frozen=True)
class Config:
    """One parse of the Allocate calls so far."""

    counts: Counts = ()
    cur: tuple[int, int] | None = None  # (group, next container position) in progress

    def count(self, gid: int) -> int:
        for g, c in self.counts:
            if g == gid:
                return c
        return 0

    def with_count(self, gid: int, value: int) -> Counts:
        d = dict(self.counts)
        if value:
            d[gid] = value
        else:
            d.pop(gid, None)
        return tuple(sorted(d.items()))

    def in_progress(self, gid: int) -> bool:
        return self.cur is not None and self.cur[0] == gid


@dataclass
class Group:
    word: Word
    members: list[str] = field(default_factory=list)  # pod UIDs, in arrival order


@dataclass(frozen=True)
class Candidate:
    """A container an Allocate call may be for."""

    uid: str
    position: int  # among the pod's containers with devices
    index: int  # among all the pod's containers (ledger order)
    container: str  # container name ("" for direct clients)
    grant: ContainerGrant

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(d.uuid for d in self.grant.devices)


def device_containers(alloc: LedgerAlloc) -> list[tuple[int, ContainerGrant]]:
    """(index, grant) of the containers that ask for devices, in pod order."""
    return [(i, c) for i, c in enumerate(alloc.containers) if c.devices]


def word_of(alloc: LedgerAlloc) -> Word:
    return tuple(len(c.devices) for _, c in device_containers(alloc))


class Matcher:
    """Follows the node's ledger and the kubelet's Allocate calls; see the module doc."""

    def __init__(self, abandon: bool = True) -> None:
        self.abandon = abandon
        self.allocs: dict[str, LedgerAlloc] = {}
        self.groups: dict[int, Group] = {}
        self.group_of: dict[str, int] = {}
        self.configs: set[Config] = {Config()}
        self.done: set[str] = set()  # pods known to be fully allocated
        self.next_gid = 0
        self.contradictions = 0

    # ------------------------------------------------------------------ the ledger

    def update(self, allocs: Mapping[str, LedgerAlloc]) -> None:
        """Follow the ledger: pods that left are dropped, new pods join (idempotent)."""
        for uid in [u for u in list(self.allocs) if u not in allocs]:
            self._remove(uid)
        for uid, alloc in allocs.items():
            old = self.allocs.get(uid)
            if old is None:
                self._add(alloc)
            elif old.containers != alloc.containers:
                # A pod's grants do not change in place; if they do, treat it as new.
                self._remove(uid)
                self._add(alloc)
            else:
                self.allocs[uid] = alloc

    def _add(self, alloc: LedgerAlloc) -> None:
        self.allocs[alloc.uid] = alloc
        word = word_of(alloc)
        if not word:
            self.done.add(alloc.uid)  # no Allocate call will ever come for it
            return
        for gid, grp in self.groups.items():
            # Join a group only while none of its pods may have started: only then are
            # the newcomer and the members interchangeable in every parse.
            if grp.word == word and all(
                c.count(gid) == 0 and not c.in_progress(gid) for c in self.configs
            ):
                grp.members.append(alloc.uid)
                self.group_of[alloc.uid] = gid
                return
        gid = self.next_gid
        self.next_gid += 1
        self.groups[gid] = Group(word, [alloc.uid])
        self.group_of[alloc.uid] = gid

    def _remove(self, uid: str) -> None:
        self.allocs.pop(uid, None)
        if uid in self.done:
            self.done.discard(uid)
            return
        gid = self.group_of.pop(uid)
        grp = self.groups[gid]
        size = len(grp.members)
        out: set[Config] = set()
        # The pod that left was either one the kubelet had finished (or abandoned), the
        # one in progress, or one never started; keep every parse each case allows.
        for c in self.configs:
            n = c.count(gid)
            finished = n - (1 if c.in_progress(gid) else 0)
            if finished >= 1:
                out.add(Config(c.with_count(gid, n - 1), c.cur))
            if c.in_progress(gid):
                out.add(Config(c.with_count(gid, n - 1), None))
            if size - n >= 1:
                out.add(c)
        grp.members.remove(uid)
        if not grp.members:
            del self.groups[gid]
        self.configs = out or {Config()}
        self._prune()

    # ------------------------------------------------------------------ the kubelet

    def _step(self, n: int) -> tuple[set[Config], set[tuple[int, int]]]:
        out: set[Config] = set()
        seen: set[tuple[int, int]] = set()
        for c in self.configs:
            if c.cur is not None:
                gid, pos = c.cur
                word = self.groups[gid].word
                if word[pos] == n:
                    nxt = (gid, pos + 1) if pos + 1 < len(word) else None
                    out.add(Config(c.counts, nxt))
                    seen.add((gid, pos))
            if c.cur is not None and not self.abandon:
                continue
            # A fresh pod starts (after the one in progress, if any, was abandoned).
            for gid, grp in self.groups.items():
                k = c.count(gid)
                if k < len(grp.members) and grp.word[0] == n:
                    nxt = (gid, 1) if len(grp.word) > 1 else None
                    out.add(Config(c.with_count(gid, k + 1), nxt))
                    seen.add((gid, 0))
        return out, seen

    def _expand(self, seen: Iterable[tuple[int, int]]) -> list[Candidate]:
        out: list[Candidate] = []
        for gid, pos in sorted(seen):
            for uid in self.groups[gid].members:
                index, grant = device_containers(self.allocs[uid])[pos]
                out.append(Candidate(uid, pos, index, grant.name, grant))
        return out

    def _loose(self, n: int) -> list[Candidate]:
        """Every not-finished container of size n on the node (after a contradiction)."""
        seen = {
            (gid, pos)
            for gid, grp in self.groups.items()
            for pos, size in enumerate(grp.word)
            if size == n
        }
        return self._expand(seen)

    def candidates(self, n: int) -> list[Candidate]:
        """Who the next Allocate of ``n`` devices may be for (state unchanged)."""
        _, seen = self._step(n)
        return self._expand(seen) if seen else self._loose(n)

    def allocate(self, n: int) -> list[Candidate]:
        """Record an Allocate of ``n`` devices; returns who it may be for (sorted by
        group, then arrival). Empty: no pod on the node asks for n cards."""
        out, seen = self._step(n)
        if seen:
            cands = self._expand(seen)
            self.configs = out
            self._prune()
            return cands
        cands = self._loose(n)
        if cands:
            # Something we assumed is not so (a restart without state, a pod the
            # kubelet retried); forget what was consumed: more candidates, never fewer.
            self.contradictions += 1
            log.warning("Allocate of %d matches no parse; %d candidates by size", n, len(cands))
            self.configs = {Config()}
        return cands

    def _prune(self) -> None:
        for gid, grp in list(self.groups.items()):
            size = len(grp.members)
            if all(c.count(gid) == size and not c.in_progress(gid) for c in self.configs):
                # Every pod of the group is allocated in every parse: known done.
                self.done.update(grp.members)
                for uid in grp.members:
                    self.group_of.pop(uid, None)
                del self.groups[gid]
                self.configs = {Config(c.with_count(gid, 0), c.cur) for c in self.configs}
        if len(self.configs) > MAX_CONFIGS:
            self._collapse()

    def _collapse(self) -> None:
        # Per in-progress state, keep the fewest pods started of each group: every
        # continuation of a merged parse is a continuation of the result, so the
        # candidates only grow.
        by_cur: dict[tuple[int, int] | None, dict[int, int]] = {}
        for c in self.configs:
            mins = by_cur.get(c.cur)
            counts = dict(c.counts)
            if mins is None:
                by_cur[c.cur] = counts
            else:
                by_cur[c.cur] = {g: min(v, counts.get(g, 0)) for g, v in mins.items()}
        self.configs = {
            Config(tuple(sorted((g, v) for g, v in m.items() if v)), cur)
            for cur, m in by_cur.items()
        }

    # ------------------------------------------------------------------ inspection

    def pending(self) -> set[str]:
        """Pods that may still have containers to allocate."""
        return set(self.group_of)

    # ------------------------------------------------------------------ persistence

    def to_json(self) -> dict[str, Any]:
        """What survives an agent restart (the ledger itself is re-read from the bus)."""
        return {
            "v": 1,
            "groups": {
                str(g): {"word": list(grp.word), "members": grp.members}
                for g, grp in self.groups.items()
            },
            "configs": [
                {"counts": [list(x) for x in c.counts], "cur": list(c.cur) if c.cur else None}
                for c in self.configs
            ],
            "done": sorted(self.done),
            "next_gid": self.next_gid,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], allocs: Mapping[str, LedgerAlloc]) -> Matcher:
        """Restore saved state against the current ledger ``allocs``.

        Saved pods are restored only if their grants are unchanged; everything else is
        reconciled by :meth:`update` as if the ledger had just changed.
        """
        m = cls()
        if data.get("v") != 1:
            m.update(allocs)
            return m
        for g, spec in data["groups"].items():
            m.groups[int(g)] = Group(tuple(spec["word"]), list(spec["members"]))
        m.configs = {
            Config(
                tuple((int(a), int(b)) for a, b in c["counts"] if int(b)),
                tuple(c["cur"]) if c["cur"] else None,
            )
            for c in data["configs"]
        } or {Config()}
        m.done = set(data["done"])
        m.next_gid = int(data["next_gid"])
        for gid, grp in m.groups.items():
            for uid in grp.members:
                m.group_of[uid] = gid
        # Adopt the saved pods whose ledger entry still has the saved word; the rest
        # (gone, or changed) are removed and re-added by update().
        for uid in list(m.group_of) + list(m.done):
            alloc = allocs.get(uid)
            same = alloc is not None and (
                uid in m.done or word_of(alloc) == m.groups[m.group_of[uid]].word
            )
            # A placeholder with no containers differs from any current entry, so
            # update() removes the saved pod (and re-adds it if it is still there).
            m.allocs[uid] = alloc if same and alloc is not None else LedgerAlloc(uid=uid, name="")
        m.update(allocs)
        return m

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str, allocs: Mapping[str, LedgerAlloc]) -> Matcher:
        try:
            return cls.from_json(json.loads(text), allocs)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("saved matcher state unreadable (%s); starting fresh", exc)
            m = cls()
            m.update(allocs)
            return m
