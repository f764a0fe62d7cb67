"""Queues with fair share on a full cluster: shares against their ideal, reclaim, priority.

A simulated clock drives the placement engine and ``engine/queues.py`` the way the
placement service does (pending requests tried in queue order when capacity frees; a
request that fits nowhere asks ``queues.choose_victims``, whose victims are released,
re-queued and counted). No NATS: the decision code is the service's, the clock is not.

Cluster: the first ``--nodes`` GPU nodes of the openb node list. Workload: openb GPU
task shapes (``openb_pod_list_default.csv``), each queue kept saturated (``--backlog``
requests always waiting), run times exponential with mean ``--runtime`` s. Queues:

- ``org`` (guarantee 50 %, weight 2) with ``train`` (30 %) and ``infer`` (20 %);
- ``prod`` (guarantee 30 %, weight 1);
- ``scratch`` (no guarantee, weight 1), which starts alone and borrows the whole
  cluster, then gives back what the others reclaim (with ``--rebalance``, also what
  over-quota rebalancing takes from it: docs/queues.md).

The others' demand starts at ``--join`` s. From ``--burst`` s, every 10 s one request of
priority 10 (a whole card) arrives in ``prod`` on the full cluster. Prints one JSON:

- ``high_priority_ms``: wall time from its arrival to its placement (decision, victims
  and their release), median and worst, and how many were placed;
- ``fairness``: per queue, its share against the ideal (the guarantees, then what is
  left by weight, level by level), sampled each second from ``--settle`` s after
  ``--join``: mean and worst error, mean relative error, and the largest mean. A
  queue's *share* is its dominant share of the cluster, the larger of its share of the
  GPU memory and of the GPU cores, because that is the unit the engine lends in: the
  over-quota share it orders by is the larger of (used - guaranteed) / cluster over
  memory and cores, divided by the weight (docs/queues.md), and every guarantee here is
  the same fraction of both, so that key is (share - guarantee) / weight. The ideal
  water-fills what the top-level queues hold in these units. Why not cores alone (as
  this bench first did): the openb cards differ in memory (a 10 % slice of an 80 GB
  card is five times the MiB of one of a 16 GB card), so the queues hold different
  mixes; ``scratch``, which fills what is left, ends on the smaller cards, where cores
  are its dominant resource, and the engine rightly lends it more cores than a
  cores-only split would, since it holds less memory. A cores-only ideal counts that
  as unfairness (``scratch`` 9-22 % off on seeds 1-5, ``prod`` below by as much in
  points, while the engine's keys agree within a few %). It is still reported, as
  ``fairness_cores``, for reference;
- ``preemptions_per_placement``, ``gpu_utilisation`` (mean, after the join),
  ``over_capacity`` (card checks that found more used than the card has: must be 0).

    .venv/bin/python bench/fairness.py [--nodes 60] [--duration 240] [--seed 1] [--rebalance]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import time
from pathlib import Path

import msgspec

from services.placement import replay
from services.placement.engine import ClusterState, Placement, Placer, preempt
from services.placement.engine import queues as fair
from shared.config import NodeSettings, QueueAmount, QueueSettings, SchedulerSettings
from shared.schemas import AllocRequested, Constraints, ContainerAsk, DeviceAsk, LedgerAlloc

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "openb"
# leaf -> (parent, guarantee share of the cluster, weight)
QUEUES = {
    "org": ("", 0.50, 2.0),
    "train": ("org", 0.30, 1.0),
    "infer": ("org", 0.20, 1.0),
    "prod": ("", 0.30, 1.0),
    "scratch": ("", 0.0, 1.0),
}
LEAVES = ("train", "infer", "prod", "scratch")


def queue_defs(cap: fair.Res) -> list[QueueSettings]:
    return [
        QueueSettings(
            name=n,
            parent=p,
            guarantee=QueueAmount(memory=int(g * cap.mem), cores=int(g * cap.cores)),
            over_quota_weight=w,
        )
        for n, (p, g, w) in QUEUES.items()
    ]


def ideal(total: float, demand: set[str]) -> dict[str, float]:
    """Water-filling of ``total`` (a share of the cluster) over saturated queues: each
    level's guarantees first, the rest by weight among siblings that want more."""
    out: dict[str, float] = {}

    def fill(parent: str, amount: float) -> None:
        kids = [n for n, (p, _, _) in QUEUES.items() if p == parent]
        kids = [
            k for k in kids if k in demand or any(QUEUES[x][0] == k and x in demand for x in QUEUES)
        ]
        if not kids:
            return
        g = {k: QUEUES[k][1] for k in kids}
        got = {k: min(g[k], amount * g[k] / max(sum(g.values()), 1e-12)) for k in kids}
        if sum(g.values()) <= amount:
            got = dict(g)
        rest = amount - sum(got.values())
        w = sum(QUEUES[k][2] for k in kids)
        for k in kids:
            got[k] += rest * QUEUES[k][2] / w
        for k in kids:
            out[k] = got[k]
            fill(k, got[k])

    fill("", total)
    return out


MEASURES = ("dominant", "cores")


def share(use: fair.Res, cap: fair.Res, measure: str) -> float:
    """A queue's share of the cluster: of the cores, or dominant (the larger of memory
    and cores, the unit the engine lends in: module docstring)."""
    cores = use.cores / cap.cores
    return cores if measure == "cores" else max(cores, use.mem / cap.mem)


def summary(
    shares: dict[str, list[float]], wants: dict[str, list[float]]
) -> dict[str, dict[str, float | None]]:
    """Per leaf: mean ideal and share; |share - ideal| in shares of the cluster (mean,
    worst) and the mean as a fraction of the mean ideal."""
    out: dict[str, dict[str, float | None]] = {}
    for q in LEAVES:
        got, want = shares[q], wants[q]
        err = [abs(g - w) for g, w in zip(got, want, strict=True)]
        mean_want = statistics.fmean(want) if want else 0.0
        out[q] = {
            "mean_ideal_share": round(mean_want, 4) if want else None,
            "mean_share": round(statistics.fmean(got), 4) if got else None,
            "mean_abs_error": round(statistics.fmean(err), 4) if err else None,
            "worst_abs_error": round(max(err), 4) if err else None,
            "mean_rel_error": round(statistics.fmean(err) / mean_want, 4)
            if err and mean_want > 0
            else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--nodes", type=int, default=60)
    ap.add_argument("--duration", type=float, default=240.0, help="simulated seconds")
    ap.add_argument("--runtime", type=float, default=40.0, help="mean run time, s")
    ap.add_argument("--join", type=float, default=20.0, help="when the other queues start")
    ap.add_argument(
        "--settle", type=float, default=60.0, help="s after the join before shares count"
    )
    ap.add_argument("--burst", type=float, default=120.0, help="first high-priority request")
    ap.add_argument("--backlog", type=int, default=24, help="requests kept waiting per queue")
    ap.add_argument("--policy", default="binpack")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--rebalance",
        action="store_true",
        help="preempt to rebalance queues over their guarantees (docs/queues.md)",
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)

    nodes = [n for n in replay.load_nodes(args.data / "openb_node_list_gpu_node.csv") if n.devices]
    tasks = [t for t in replay.load_tasks(args.data / "openb_pod_list_default.csv") if t.gpu > 0]
    cl = ClusterState()
    for inv in nodes[: args.nodes]:
        cl.upsert_node(inv)
    placer = Placer(
        cl, SchedulerSettings(node_policy=args.policy, gpu_policy="binpack"), NodeSettings()
    )
    cap = fair.capacity(cl)
    tree = fair.tree_of(queue_defs(cap))
    assert tree is not None
    cache = fair.UseCache(tree)

    now = 0.0
    seq = 0
    pending: dict[str, AllocRequested] = {}
    ends: list[tuple[float, str, str]] = []  # (end time, uid, node)
    where: dict[str, str] = {}
    high_ms: list[float] = []
    placements = preempted = over = 0

    def new(queue: str, prio: int = 0, whole: bool = False) -> AllocRequested:
        nonlocal seq
        seq += 1
        if whole:
            r = AllocRequested(
                uid=f"hp-{seq}",
                name=f"hp-{seq}",
                containers=[
                    ContainerAsk(
                        name="main", devices=[DeviceAsk(nums=1, mem_percent=100, cores=100)]
                    )
                ],
                constraints=Constraints(),
            )
        else:
            r = rng.choice(tasks).request(f"{queue}-{seq}")
            # the node's CPU and memory are not what this measures: GPU only
            r = msgspec.structs.replace(
                r,
                containers=[
                    msgspec.structs.replace(c, cpu_milli=0, memory_mib=0) for c in r.containers
                ],
                constraints=Constraints(),
            )
        return msgspec.structs.replace(
            r, queue=queue, pod_priority=prio, requested_at=now + seq * 1e-9
        )

    def check_capacity() -> None:
        nonlocal over
        n = cl.nc
        over += int(((cl.c_umem[:n] > cl.c_tmem[:n]) | (cl.c_ucore[:n] > cl.c_tcore[:n])).sum())

    def commit(r: AllocRequested, p: Placement) -> None:
        nonlocal placements
        a = msgspec.structs.replace(p.to_alloc(r, now), pod_priority=r.pod_priority)
        cl.reserve(p.node, a)
        where[r.uid] = p.node
        heapq.heappush(ends, (now + rng.expovariate(1.0 / args.runtime), r.uid, p.node))
        pending.pop(r.uid, None)
        placements += 1

    def release(uid: str) -> LedgerAlloc | None:
        node = where.pop(uid, None)
        if node is None:
            return None
        a = cl.nodes[node].allocs[uid].alloc
        cl.unreserve(node, uid)
        return a

    def try_one(r: AllocRequested) -> bool:
        nonlocal preempted
        use = cache.get(cl)
        got = placer.decide(r, explain=False)
        if isinstance(got, Placement) and fair.limit_problem(tree, use, r, got.containers) is None:
            commit(r, got)
            return True
        leaf = tree.leaf_of(r.queue, r.namespace)
        under = fair.within_guarantee(tree, use, leaf, fair.Res(), len(tree.path[leaf]) - 1)
        if not under and r.pod_priority == 0:
            # over its own guarantee, lowest priority: no victim unless by rebalancing
            least = fair.Res(*preempt.least_use(placer, r))
            if not args.rebalance or not fair.rebalance_candidates(tree, use, cap, leaf, least):
                return False
        choice = fair.choose_victims(
            placer, tree, r, lambda a: a.pod_priority, use=use, rebalance=args.rebalance
        )
        if choice is None:
            return False
        for uid in choice.uids:  # the victims' queues stay saturated by their backlog
            assert release(uid) is not None
            preempted += 1
        commit(r, choice.placement)
        return True

    def active() -> set[str]:
        return set(LEAVES) if now >= args.join else {"scratch"}

    def top_up() -> None:
        for q in LEAVES:  # in a fixed order: a set's order changes with PYTHONHASHSEED
            if q not in active():
                continue
            n = sum(1 for r in pending.values() if r.queue == q)
            for _ in range(args.backlog - n):
                r = new(q)
                pending[r.uid] = r

    def schedule() -> None:
        rounds = fair.Rounds(tree, cache.get(cl), cap, list(pending.values()))
        while (r := rounds.next()) is not None:
            try_one(r)
            rounds.use = cache.get(cl)
        check_capacity()

    # per measure ("dominant", "cores"): per leaf, the samples of its share and ideal
    shares: dict[str, dict[str, list[float]]] = {m: {q: [] for q in LEAVES} for m in MEASURES}
    wants: dict[str, dict[str, list[float]]] = {m: {q: [] for q in LEAVES} for m in MEASURES}
    utils: list[float] = []
    next_high = args.burst
    t = 0.0
    while t < args.duration:
        t += 1.0
        while ends and ends[0][0] <= t:
            now, uid, _ = heapq.heappop(ends)
            release(uid)
        now = t
        if t >= next_high:
            next_high += 10.0
            hp = new("prod", prio=10, whole=True)
            t0 = time.perf_counter()
            ok = try_one(hp)
            if ok:
                high_ms.append((time.perf_counter() - t0) * 1000.0)
            else:
                pending[hp.uid] = hp
        top_up()
        schedule()
        use = cache.get(cl)
        util = sum(use.of(q).cores for q in QUEUES if not QUEUES[q][0]) / cap.cores
        if t >= args.join:
            utils.append(util)
        if t >= args.join + args.settle:
            for m in MEASURES:
                got = {q: share(use.of(q), cap, m) for q in QUEUES}
                want = ideal(sum(got[q] for q in QUEUES if not QUEUES[q][0]), active())
                for q in LEAVES:
                    shares[m][q].append(got[q])
                    wants[m][q].append(want[q])

    fairness, fairness_cores = (summary(shares[m], wants[m]) for m in MEASURES)
    means = [v["mean_rel_error"] for v in fairness.values() if v["mean_rel_error"] is not None]
    absolute = [v["mean_abs_error"] for v in fairness.values() if v["mean_abs_error"] is not None]
    means_cores = [
        v["mean_rel_error"] for v in fairness_cores.values() if v["mean_rel_error"] is not None
    ]
    out = {
        "nodes": len(cl.nodes),
        "gpus": int(cap.cores // 100),
        "policy": args.policy,
        "rebalance": args.rebalance,
        "simulated_s": args.duration,
        "high_priority_ms": {
            "placed": len(high_ms),
            "asked": int(max(0.0, (args.duration - args.burst) // 10 + 1)),
            "median": round(statistics.median(high_ms), 2) if high_ms else None,
            "worst": round(max(high_ms), 2) if high_ms else None,
        },
        "fairness": fairness,
        "fairness_worst_mean_rel_error": round(max(means), 4) if means else None,
        "fairness_worst_mean_abs_error": round(max(absolute), 4) if absolute else None,
        "fairness_cores": fairness_cores,
        "fairness_cores_worst_mean_rel_error": round(max(means_cores), 4) if means_cores else None,
        "preemptions_per_placement": round(preempted / max(1, placements), 4),
        "placements": placements,
        "preemptions": preempted,
        "gpu_utilisation": round(statistics.fmean(utils), 4) if utils else None,
        "over_capacity": over,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
