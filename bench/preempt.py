"""What choosing preemption victims costs on a large full cluster (no I/O).

Builds ``--nodes`` nodes of ``--cards`` cards, each card full with two half-card
allocations of random priority 0..3 and random age, then times
``services.placement.engine.preempt.choose`` for a few request shapes at priority 5,
``--repeat`` times each. Prints one JSON object: per shape the median and worst
milliseconds, the victims chosen (count, highest priority) and how many victim sets the
engine was asked about on the chosen node.

    .venv/bin/python bench/preempt.py [--nodes 5000] [--cards 8] [--policy binpack] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from services.placement.engine import ClusterState, Placer
from services.placement.engine.preempt import choose
from shared.config import NodeSettings, SchedulerSettings
from shared.schemas import (
    AllocRequested,
    CardGrant,
    ContainerAsk,
    ContainerGrant,
    Device,
    DeviceAsk,
    LedgerAlloc,
    NodeInventory,
)

SHAPES = {
    "one card 12000 MiB 60 % cores": DeviceAsk(nums=1, mem=12000, cores=60),
    "4 whole cards": DeviceAsk(nums=4, cores=100),
    "8 cards 16000 MiB": DeviceAsk(nums=8, mem=16000),
}


def build(nodes: int, cards: int, policy: str, seed: int) -> Placer:
    rng = random.Random(seed)
    cl = ClusterState()
    for i in range(nodes):
        name = f"n{i:05d}"
        devs = [Device(uuid=f"GPU-{name}-{c}", index=c, devmem=16000, type="NVIDIA-A100") for c in range(cards)]
        cl.upsert_node(NodeInventory(node=name, devices=devs))
        for c in range(cards):
            for k in range(2):
                grant = CardGrant(uuid=f"GPU-{name}-{c}", index=c, type="NVIDIA-A100", mem=8000, cores=50)
                cl.reserve(name, LedgerAlloc(
                    uid=f"{name}-{c}-{k}", name=f"{name}-{c}-{k}",
                    containers=[ContainerGrant(name="main", devices=[grant])],
                    decided_at=float(rng.randint(0, 100_000)), pod_priority=rng.randint(0, 3),
                ))
    return Placer(cl, SchedulerSettings(node_policy=policy), NodeSettings())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--cards", type=int, default=8)
    ap.add_argument("--policy", default="binpack")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    p = build(a.nodes, a.cards, a.policy, a.seed)
    out: dict[str, object] = {
        "nodes": a.nodes, "cards_per_node": a.cards, "allocations": 2 * a.nodes * a.cards,
        "policy": a.policy, "build_s": round(time.perf_counter() - t0, 2), "shapes": {},
    }
    shapes: dict[str, object] = {}
    for label, ask in SHAPES.items():
        if ask.nums > a.cards:
            continue
        req = AllocRequested(uid=f"bench-{label}", name="bench", containers=[ContainerAsk(devices=[ask])])
        times = []
        got = None
        for _ in range(a.repeat):
            t = time.perf_counter()
            got = choose(p, req, 5)
            times.append((time.perf_counter() - t) * 1000.0)
        shapes[label] = {
            "median_ms": round(statistics.median(times), 1),
            "max_ms": round(max(times), 1),
            "victims": len(got.victims) if got else 0,
            "highest_victim_priority": got.key[0] if got else None,
            "sets_asked_on_chosen_node": got.searched if got else 0,
        }
    out["shapes"] = shapes
    print(json.dumps(out))


if __name__ == "__main__":
    main()
