"""Placement on MIG-mode cards: decide + reserve on a fleet of simulated A100-40GB nodes.

Fills every card with a random mix of MIG asks (1g/2g/3g sizes) until nothing more
fits, then times two kinds of decision and prints JSON:

* ``fit``: an ask that some card can still take (a 1g after releasing one instance);
* ``infeasible``: an ask no card can take although free memory is left (the slices
  do not line up), which walks the exact stage over every node the memory check
  admits -- the worst case of the MIG fit.

    .venv/bin/python bench/mig_placement.py [--nodes 500] [--cards 8] [--decisions 200]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.placement.engine import ClusterState, Failure, Placement, Placer  # noqa: E402
from shared.config import NodeSettings, SchedulerSettings  # noqa: E402
from shared.hami.mig import allowed_profiles, geometry, max_instances  # noqa: E402
from shared.schemas import AllocRequested, ContainerAsk, Device, DeviceAsk, NodeInventory  # noqa: E402

MODEL = "NVIDIA-A100-SXM4-40GB"


def build(nodes: int, cards: int) -> ClusterState:
    prof = [p for p in geometry(MODEL) or [] if p.name in allowed_profiles(MODEL)]
    cl = ClusterState()
    for n in range(nodes):
        devs = [
            Device(uuid=f"GPU-{n:05d}-{i}", index=i, type=MODEL, devmem=40960, count=max_instances(prof),
                   mode="mig", mig_profiles=prof)
            for i in range(cards)
        ]  # fmt: skip
        cl.upsert_node(NodeInventory(node=f"node-{n:05d}", devices=devs))
    return cl


def ask(i: int, mem: int) -> AllocRequested:
    return AllocRequested(
        uid=f"u{i}", name=f"p{i}", containers=[ContainerAsk(devices=[DeviceAsk(mem=mem)])]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--cards", type=int, default=8)
    ap.add_argument("--decisions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    cl = build(args.nodes, args.cards)
    p = Placer(cl, SchedulerSettings(node_policy="binpack"), NodeSettings())
    t0 = time.perf_counter()
    held: list[tuple[str, str]] = []
    misses = n = 0
    while misses < 50:  # fill: stop once asks keep failing
        n += 1
        got = p.decide(ask(n, rng.choice([4000, 4000, 9000, 15000])), explain=False)
        if isinstance(got, Placement):
            cl.reserve(got.node, got.to_alloc(ask(n, 0)))
            held.append((got.node, f"u{n}"))
        else:
            misses += 1
    fill_s = time.perf_counter() - t0
    used = sum(c.used_mem for nd in cl.status().nodes for c in nd.cards)
    total = sum(c.total_mem for nd in cl.status().nodes for c in nd.cards)

    def timed(mem: int, release: bool) -> tuple[list[float], int]:
        lat: list[float] = []
        placed = 0
        for k in range(args.decisions):
            if release:
                node, uid = held.pop(rng.randrange(len(held)))
                cl.unreserve(node, uid)
            r = ask(10**7 + k, mem)
            t = time.perf_counter()
            got = p.decide(r)
            lat.append((time.perf_counter() - t) * 1000)
            if isinstance(got, Placement):
                placed += 1
                cl.reserve(got.node, got.to_alloc(r))
                held.append((got.node, r.uid))
            else:
                assert isinstance(got, Failure)
        return sorted(lat), placed

    def stats(lat: list[float]) -> dict[str, float]:
        return {
            "p50_ms": round(lat[len(lat) // 2], 3),
            "p99_ms": round(lat[int(len(lat) * 0.99)], 3),
        }

    inf, inf_placed = timed(30000, release=False)  # a 7g needs an empty card: none is
    fit, fit_placed = timed(4000, release=True)
    print(json.dumps({
        "bench": "mig_placement", "nodes": args.nodes, "cards": args.nodes * args.cards,
        "fill_mem": round(used / total, 3), "fill_s": round(fill_s, 2), "decisions": args.decisions,
        "infeasible": {**stats(inf), "placed": inf_placed}, "fit": {**stats(fit), "placed": fit_placed},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
