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

Pods with the same word form a *group*; a parse (a :class:`Config`) only counts how
many pods of each group the kubelet has started, and which group's pod is in progress.
That keeps the number of parses small: a burst of 40 identical pods is one group and
one parse per step, not 40! orderings. (A pod joining a group some of whose pods may
have started adds parses that cannot be true; the set of parses is then a superset of
the truth, which is always safe: candidates only grow.) A group consumed in every parse is dropped (its pods are known
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
from functools import cached_property
from typing import Any, NamedTuple

import msgspec
import numpy as np

from shared.schemas import ContainerGrant, LedgerAlloc

log = logging.getLogger("hami.nodeagent.matching")

Word = tuple[int, ...]
Counts = tuple[int, ...]  # pods started of each group, in the matcher's group order

# Past this many parses, merge them into an over-approximation (see _collapse).
MAX_CONFIGS = 256
# Past this many parses, drop the dominated ones (exact; see minimal).
THIN_ABOVE = 24


class Config(NamedTuple):
    """One parse of the Allocate calls so far. A plain tuple underneath: a burst makes
    and hashes hundreds of thousands of them."""

    # Pods started per group, aligned with ``Matcher.order`` (dense: one int per group).
    counts: Counts = ()
    cur: tuple[int, int] | None = None  # (group id, next container position) in progress


def _put(counts: Counts, i: int, value: int) -> Counts:
    return counts[:i] + (value,) + counts[i + 1 :]


def minimal(configs: set[Config]) -> set[Config]:
    """Drop every parse that another with the same pod in progress dominates.

    If parse A has started no more pods of any group than parse B (and the same
    container is in progress), every step B can take A can take too, into a parse
    that again dominates B's: A allows every candidate B allows, forever, and a group
    full in A is full in B. So B adds nothing, to the candidates or to what is known
    done, and is dropped. In a burst of mixed words this keeps a handful of parses
    where there were a hundred.
    """
    if len(configs) < 2:
        return configs
    cs = list(configs)
    curs: dict[tuple[int, int] | None, int] = {}
    cur_ids = np.array([curs.setdefault(c.cur, len(curs)) for c in cs])
    counts = np.array([c.counts for c in cs], dtype=np.int32).reshape(len(cs), len(cs[0].counts))
    # le[i, j]: parse i dominates parse j (or is j). All pairs at once: a burst's few
    # hundred parses are a few hundred thousand comparisons, too many one by one.
    le = (counts[:, None, :] <= counts[None, :, :]).all(axis=2)
    le &= cur_ids[:, None] == cur_ids[None, :]
    dominated = le.sum(axis=0) > 1  # by itself and another (distinct: a set)
    return {c for c, d in zip(cs, dominated.tolist(), strict=True) if not d}


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

    @cached_property
    def uuids(self) -> tuple[str, ...]:
        # A candidate lives as long as its pod is on the node and is asked for on
        # every call that may be its own (the union env of a burst reads dozens).
        return tuple(d.uuid for d in self.grant.devices)


def device_containers(alloc: LedgerAlloc) -> list[tuple[int, ContainerGrant]]:
    """(index, grant) of the containers that ask for devices, in pod order."""
    return [(i, c) for i, c in enumerate(alloc.containers) if c.devices]


def candidates_of(alloc: LedgerAlloc) -> list[Candidate]:
    """The pod's containers with devices, as the candidates they would be."""
    return [
        Candidate(alloc.uid, pos, index, grant.name, grant)
        for pos, (index, grant) in enumerate(device_containers(alloc))
    ]


def of_vendor(allocs: Mapping[str, LedgerAlloc], vendor: str) -> dict[str, LedgerAlloc]:
    """The ledger as the plugin of one vendor's resource sees it: each container with
    only its cards of ``vendor`` (the kubelet calls each resource's plugin for that
    resource's devices alone, so a container asking for none is no call of its own).
    An entry all of whose cards are the vendor's is passed through as it is."""
    out: dict[str, LedgerAlloc] = {}
    for uid, a in allocs.items():
        if all(d.vendor == vendor for c in a.containers for d in c.devices):
            out[uid] = a
            continue
        containers = [
            msgspec.structs.replace(c, devices=[d for d in c.devices if d.vendor == vendor])
            for c in a.containers
        ]
        out[uid] = msgspec.structs.replace(a, containers=containers)
    return out


def word_of(alloc: LedgerAlloc) -> Word:
    return tuple(len(c.devices) for _, c in device_containers(alloc))


class Matcher:
    """Follows the node's ledger and the kubelet's Allocate calls; see the module doc."""

    def __init__(self, abandon: bool = True) -> None:
        self.abandon = abandon
        self.allocs: dict[str, LedgerAlloc] = {}
        self.groups: dict[int, Group] = {}
        self.group_of: dict[str, int] = {}
        self.order: list[int] = []  # group ids, in the order of every Config's counts
        self.slot: dict[int, int] = {}  # group id -> its position in ``order``
        self.configs: set[Config] = {Config()}
        self.done: set[str] = set()  # pods known to be fully allocated
        self.next_gid = 0
        self.contradictions = 0
        self._cands: dict[str, list[Candidate]] = {}  # uid -> its device containers

    def _zero(self) -> Config:
        return Config((0,) * len(self.order), None)

    def _new_group(self, word: Word, members: list[str], gid: int | None = None) -> int:
        if gid is None:
            gid = self.next_gid
            self.next_gid += 1
        self.groups[gid] = Group(word, members)
        for uid in members:
            self.group_of[uid] = gid
        self.slot[gid] = len(self.order)
        self.order.append(gid)
        self.configs = {Config((*c.counts, 0), c.cur) for c in self.configs}
        return gid

    def _drop_groups(self, gids: set[int]) -> None:
        """Forget groups (their counts leave every parse)."""
        keep = [i for i, g in enumerate(self.order) if g not in gids]
        for gid in gids:
            del self.groups[gid]
        self.order = [self.order[i] for i in keep]
        self.slot = {g: i for i, g in enumerate(self.order)}
        self.configs = {Config(tuple(c.counts[i] for i in keep), c.cur) for c in self.configs}

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
        self._cands[alloc.uid] = candidates_of(alloc)
        for gid, grp in self.groups.items():
            # One group per word. A newcomer joining a group some of whose pods may have
            # started adds parses in which the newcomer started (it cannot have: its
            # decision is newer than those calls), so the parses become a superset of
            # the truth: candidates only grow, and a group is still dropped only when
            # every member is consumed in every parse. What it buys: the parses stay
            # few in a burst (one count per distinct word) instead of multiplying with
            # every arrival; what it costs is exactness only in rare orders (a removal,
            # or several containers per pod), since the pods that remain are ambiguous
            # to the kubelet's next call either way.
            if grp.word == word:
                grp.members.append(alloc.uid)
                self.group_of[alloc.uid] = gid
                return
        self._new_group(word, [alloc.uid])

    def _remove(self, uid: str) -> None:
        self.allocs.pop(uid, None)
        self._cands.pop(uid, None)
        if uid in self.done:
            self.done.discard(uid)
            return
        gid = self.group_of.pop(uid)
        grp = self.groups[gid]
        size = len(grp.members)
        i = self.slot[gid]
        out: set[Config] = set()
        # The pod that left was either one the kubelet had finished (or abandoned), the
        # one in progress, or one never started; keep every parse each case allows.
        for c in self.configs:
            n = c.counts[i]
            in_progress = c.cur is not None and c.cur[0] == gid
            finished = n - (1 if in_progress else 0)
            if finished >= 1:
                out.add(Config(_put(c.counts, i, n - 1), c.cur))
            if in_progress:
                out.add(Config(_put(c.counts, i, n - 1), None))
            if size - n >= 1:
                out.add(c)
        grp.members.remove(uid)
        self.configs = self._thin(out) or {self._zero()}
        if not grp.members:
            self._drop_groups({gid})  # its count is 0 in every parse left
        self._prune()

    # ------------------------------------------------------------------ the kubelet

    def _step(self, n: int) -> tuple[set[Config], set[tuple[int, int]]]:
        out: set[Config] = set()
        seen: set[tuple[int, int]] = set()
        groups = self.groups
        # The groups a call of n cards may start a pod of: (slot, gid, size, next).
        starters = [
            (self.slot[gid], gid, len(g.members), (gid, 1) if len(g.word) > 1 else None)
            for gid, g in groups.items()
            if g.word[0] == n
        ]
        abandon = self.abandon
        for counts, cur in self.configs:
            if cur is not None:
                gid, pos = cur
                word = groups[gid].word
                if word[pos] == n:
                    out.add(Config(counts, (gid, pos + 1) if pos + 1 < len(word) else None))
                    seen.add(cur)
                if not abandon:
                    continue
            # A fresh pod starts (after the one in progress, if any, was abandoned).
            for i, gid, size, nxt in starters:
                k = counts[i]
                if k < size:
                    out.add(Config(counts[:i] + (k + 1,) + counts[i + 1 :], nxt))
                    seen.add((gid, 0))
        return out, seen

    def _expand(self, seen: Iterable[tuple[int, int]]) -> list[Candidate]:
        out: list[Candidate] = []
        for gid, pos in sorted(seen):
            for uid in self.groups[gid].members:
                out.append(self._cands[uid][pos])
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
            self.configs = self._thin(out)
            self._prune()
            return cands
        cands = self._loose(n)
        if cands:
            # Something we assumed is not so (a restart without state, a pod the
            # kubelet retried); forget what was consumed: more candidates, never fewer.
            self.contradictions += 1
            log.warning("Allocate of %d matches no parse; %d candidates by size", n, len(cands))
            self.configs = {self._zero()}
        return cands

    @staticmethod
    def _thin(configs: set[Config]) -> set[Config]:
        # Dominated parses change no answer (see minimal), so they are only dropped
        # once there are enough of them for the steps to cost more than the check.
        return minimal(configs) if len(configs) > THIN_ABOVE else configs

    def _prune(self) -> None:
        # The groups every member of which is allocated in every parse: known done.
        sizes = [len(self.groups[g].members) for g in self.order]
        full = set(range(len(sizes)))
        for counts, cur in self.configs:
            if cur is not None:
                full.discard(self.slot[cur[0]])
            full = {i for i in full if counts[i] == sizes[i]}
            if not full:
                break
        if full:
            gids = {self.order[i] for i in full}
            for gid in gids:
                grp = self.groups[gid]
                self.done.update(grp.members)
                for uid in grp.members:
                    self.group_of.pop(uid, None)
            self._drop_groups(gids)
        if len(self.configs) > MAX_CONFIGS:
            self._collapse()

    def _collapse(self) -> None:
        # Per in-progress state, keep the fewest pods started of each group: every
        # continuation of a merged parse is a continuation of the result, so the
        # candidates only grow.
        by_cur: dict[tuple[int, int] | None, Counts] = {}
        for counts, cur in self.configs:
            mins = by_cur.get(cur)
            by_cur[cur] = counts if mins is None else tuple(map(min, mins, counts))
        self.configs = {Config(counts, cur) for cur, counts in by_cur.items()}

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
                {
                    "counts": [[g, k] for g, k in zip(self.order, c.counts, strict=True) if k],
                    "cur": c.cur,  # a tuple encodes as a JSON array
                }
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
        for g, spec in sorted(data["groups"].items(), key=lambda kv: int(kv[0])):
            m._new_group(tuple(spec["word"]), list(spec["members"]), gid=int(g))
        configs = set()
        for c in data["configs"]:
            counts = [0] * len(m.order)
            for g, k in c["counts"]:
                counts[m.slot[int(g)]] = int(k)
            cur = tuple(c["cur"]) if c["cur"] else None
            configs.add(Config(tuple(counts), (int(cur[0]), int(cur[1])) if cur else None))
        m.configs = configs or {m._zero()}
        m.done = set(data["done"])
        m.next_gid = max(int(data["next_gid"]), m.next_gid)
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
            m._cands[uid] = candidates_of(m.allocs[uid])
        m.update(allocs)
        return m

    def dumps(self) -> str:
        return msgspec.json.encode(self.to_json()).decode()

    @classmethod
    def loads(cls, text: str, allocs: Mapping[str, LedgerAlloc]) -> Matcher:
        try:
            return cls.from_json(json.loads(text), allocs)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("saved matcher state unreadable (%s); starting fresh", exc)
            m = cls()
            m.update(allocs)
            return m
