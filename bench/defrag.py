"""What planning consolidation costs, and what it frees, on a fragmented cluster (no I/O).

Builds ``--nodes`` nodes of ``--cards`` 80 GiB cards and fills them with one-card slices
of openb-like sizes (10 to 60 % of a card's memory and cores) placed at random until
``--fill`` of the memory is used; ``--movable`` of them are movable. Then times
``services.placement.engine.defrag.plan`` for each ``--max-moves``, freeing whole cards,
and once for a slice of 90 % of a card. Prints one JSON object: per budget the plan's
milliseconds, the cards free before and after, the moves and whether the search was
exact, and that every plan was checked step by step against capacity.

    .venv/bin/python bench/defrag.py [--nodes 50] [--cards 8] [--fill 0.6] [--movable 0.5] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from services.placement.engine import defrag as d

MEM = 81920


def cluster(nodes: int, cards: int, fill: float, movable: float, rng: random.Random) -> tuple[list[d.Card], list[d.Holding]]:
    cs = [d.Card(node=f"n{n}", uuid=f"n{n}-c{i}", type="A100-80GB", mem=MEM, cores=100, slots=10)
          for n in range(nodes) for i in range(cards)]
    used = {c.uuid: [0, 0, 0] for c in cs}
    hs: list[d.Holding] = []
    target = fill * MEM * len(cs)
    total = 0
    tries = 0
    while total < target and tries < 50 * len(cs):
        tries += 1
        pct = rng.choice([10, 15, 20, 25, 30, 40, 50, 60])
        mem, cores = MEM * pct // 100, pct
        c = rng.choice(cs)
        u = used[c.uuid]
        if u[0] + mem > c.mem or u[1] + cores > c.cores or u[2] >= c.slots:
            continue
        u[0] += mem
        u[1] += cores
        u[2] += 1
        total += mem
        hs.append(d.Holding(uid=f"a{len(hs)}", node=c.node, grants=(d.Grant(c.uuid, mem, cores),),
                            movable=rng.random() < movable))
    return cs, hs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--cards", type=int, default=8)
    ap.add_argument("--fill", type=float, default=0.6)
    ap.add_argument("--movable", type=float, default=0.5)
    ap.add_argument("--budgets", default="1,5,10,20")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    cs, hs = cluster(args.nodes, args.cards, args.fill, args.movable, random.Random(args.seed))
    out: dict[str, object] = {"nodes": args.nodes, "cards": len(cs), "allocations": len(hs),
                              "movable": sum(h.movable for h in hs), "plans": []}
    plans: list[dict[str, object]] = []
    for k in (int(x) for x in args.budgets.split(",")):
        t0 = time.perf_counter()
        p = d.plan(cs, hs, max_moves=k)
        ms = (time.perf_counter() - t0) * 1000
        checked = d.check(cs, hs, p.moves) == p.free_after
        plans.append({"max_moves": k, "ms": round(ms, 1), "free_before": p.free_before,
                      "free_after": p.free_after, "moves": len(p.moves), "exact": p.exact,
                      "checked": checked})
    t0 = time.perf_counter()
    p = d.plan(cs, hs, max_moves=10, need=(MEM * 9 // 10, 90))
    plans.append({"max_moves": 10, "for": "90%/90%", "ms": round((time.perf_counter() - t0) * 1000, 1),
                  "fits": p.fits, "moves": len(p.moves), "exact": p.exact})
    out["plans"] = plans
    print(json.dumps(out))


if __name__ == "__main__":
    main()
