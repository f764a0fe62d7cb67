"""In-process placement benchmark: decide + reserve at 5,000 nodes x 8 cards.

Builds a synthetic cluster (mixed card models), fills it to a steady state with a
realistic mix of requests, then times ``Placer.decide`` + ``ClusterState.reserve``
(plus a release for every placement, so the cluster stays at the same fill) and prints
JSON: decisions/s, p50/p99 latency in ms, peak RSS. No NATS involved.

    .venv/bin/python bench/placement_inproc.py [--nodes 5000] [--cards 8] [--policy default|binpack|...]

``--mixed 0.1`` makes a tenth of the nodes other vendors' (Cambricon MLU370-X4, Ascend
910B3, Hygon Z100, AMD MI300X in turn, registered as their node agents register them) and
sends a tenth of the requests to one of those families (one card, the family's own
resources parsed by its rules), so the NVIDIA-only run and the mixed one compare.

``--fill 0 --no-release`` is the start of ``bench/placement.py``'s run over NATS: an
empty cluster, a placer that has seen no request yet (its shape model moves most then),
every placement kept.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.placement.engine import ClusterState, Placement, Placer  # noqa: E402
from services.placement.engine.frag import PRODUCT_DEFAULT  # noqa: E402
from shared.config import NodeSettings, SchedulerSettings  # noqa: E402
from shared.schemas import (  # noqa: E402
    AllocRequested,
    Constraints,
    ContainerAsk,
    Device,
    DeviceAsk,
    NodeInventory,
)

MODELS = [
    ("NVIDIA-A100-SXM4-80GB", 81920),
    ("NVIDIA-A10", 24576),
    ("NVIDIA-Tesla-T4", 15360),
    ("NVIDIA-H100-80GB", 81920),
]


# --mixed: (sim model, the family's resources for one card) of the other vendors' nodes
VENDOR_MIX = [
    (
        "MLU370-X4",
        {
            "cambricon.com/vmlu": "1",
            "cambricon.com/mlu.smlu.vmemory": "16",
            "cambricon.com/mlu.smlu.vcore": "25",
        },
    ),
    ("Ascend910B3", {"huawei.com/Ascend910B3": "1", "huawei.com/Ascend910B3-memory": "16384"}),
    ("Z100", {"hygon.com/dcunum": "1", "hygon.com/dcumem": "8192", "hygon.com/dcucores": "30"}),
    ("MI300X", {"amd.com/gpu": "1", "amd.com/gpumem": "32768", "amd.com/gpucores": "25"}),
]


def vendor_cards(model: str, cards: int) -> list[Device]:
    """``cards`` of a vendor model as its simulated node agent registers them."""
    from services.nodeagent.backends.sim import SimBackend, parse_gpu_specs
    from services.nodeagent.backends.vendors.registration import vendor_devices
    from services.nodeagent.registration import register

    found = SimBackend("bench", parse_gpu_specs([f"{model}:{cards}"]), 2, "pcie").discover()
    return vendor_devices(found, register(found, NodeSettings())[0], NodeSettings())


def is_vendor_node(n: int, mixed: float) -> int | None:
    """Which of VENDOR_MIX node ``n`` is (None: NVIDIA): ``mixed`` of the nodes, spread
    evenly, the families in turn."""
    if mixed <= 0 or int((n + 1) * mixed) == int(n * mixed):
        return None
    return int(n * mixed) % len(VENDOR_MIX)


def node_devices(n: int, cards: int, mixed: float = 0.0) -> list[Device]:
    v = is_vendor_node(n, mixed)
    if v is not None:
        return [
            msgspec.structs.replace(d, uuid=f"{d.vendor}-{n:05d}-{d.index}")
            for d in vendor_cards(VENDOR_MIX[v][0], cards)
        ]
    model, mem = MODELS[n % len(MODELS)]
    return [
        Device(uuid=f"GPU-{n:05d}-{i}", index=i, type=model, devmem=mem, numa=i * 2 // cards)
        for i in range(cards)
    ]


def build(nodes: int, cards: int, mixed: float = 0.0) -> ClusterState:
    cl = ClusterState()
    for n in range(nodes):
        cl.upsert_node(
            NodeInventory(
                node=f"node-{n:05d}",
                devices=node_devices(n, cards, mixed),
                cpu_milli=128000,
                memory_mib=1 << 20,
                max_pods=110,
                labels={"zone": f"z{n % 4}", "pool": "gpu"},
            )
        )
    return cl


def vendor_request(rng: np.random.Generator, i: int) -> AllocRequested:
    """One card of one of VENDOR_MIX's families, as a pod's container asks it."""
    from shared.devices.registry import REGISTRY, to_device_ask

    limits = VENDOR_MIX[int(rng.integers(len(VENDOR_MIX)))][1]
    fam = REGISTRY.for_resource(next(iter(limits)))
    assert fam is not None
    ask = fam.parse({"limits": limits}, {})
    assert ask is not None
    conts = [
        ContainerAsk(name="main", devices=[to_device_ask(ask)], cpu_milli=2000, memory_mib=8192)
    ]
    return AllocRequested(uid=f"u{i}", name=f"p{i}", namespace="bench", containers=conts)


def make_request(rng: np.random.Generator, i: int, mixed: float = 0.0) -> AllocRequested:
    """A realistic mix: mostly one shared card, some whole cards, a few complex pods;
    with ``mixed``, that share of them asks another vendor's card (:func:`vendor_request`)."""
    if mixed > 0 and rng.random() < mixed:
        return vendor_request(rng, i)
    r = rng.random()
    cons = Constraints()
    cpu, mem = int(rng.choice([1000, 2000, 4000, 8000])), int(rng.choice([2048, 8192, 16384]))
    if r < 0.45:  # one shared card by MiB
        conts = [
            ContainerAsk(
                name="main",
                devices=[
                    DeviceAsk(
                        nums=1,
                        mem=int(rng.choice([2048, 4096, 8192, 12288])),
                        cores=int(rng.choice([10, 20, 30, 50])),
                    )
                ],
                cpu_milli=cpu,
                memory_mib=mem,
            )
        ]
    elif r < 0.60:  # one shared card by percentage
        pct = int(rng.choice([10, 25, 50]))
        conts = [
            ContainerAsk(
                name="main",
                devices=[DeviceAsk(nums=1, mem_percent=pct, cores=pct)],
                cpu_milli=cpu,
                memory_mib=mem,
            )
        ]
    elif (
        r < 0.75
    ):  # whole, exclusive card(s): 100 cores, as HAMi's webhook writes for a bare nvidia.com/gpu
        conts = [
            ContainerAsk(
                name="main",
                devices=[DeviceAsk(nums=int(rng.choice([1, 1, 2, 4, 8])), cores=100)],
                cpu_milli=cpu,
                memory_mib=mem,
            )
        ]
    elif r < 0.85:  # init + two app containers
        conts = [
            ContainerAsk(name="init", init=True, devices=[DeviceAsk(nums=1, mem=1024, cores=10)]),
            ContainerAsk(name="a", devices=[DeviceAsk(nums=1, mem=4096, cores=20)], cpu_milli=cpu),
            ContainerAsk(name="b", devices=[DeviceAsk(nums=1, mem=4096, cores=20)], cpu_milli=cpu),
        ]
    elif r < 0.93:  # model constraint + selector
        conts = [
            ContainerAsk(
                name="main",
                devices=[DeviceAsk(nums=1, mem=8192, cores=30)],
                cpu_milli=cpu,
                memory_mib=mem,
            )
        ]
        cons = Constraints(use_types=["A100"], node_selector={"pool": "gpu"})
    else:  # spread pods with a card chain
        conts = [
            ContainerAsk(
                name="main",
                devices=[DeviceAsk(nums=2, mem=8192, cores=25)],
                cpu_milli=cpu,
                memory_mib=mem,
            )
        ]
        cons = Constraints(node_policy="spread", gpu_policy="binpack,numa")
    return AllocRequested(
        uid=f"u{i}", name=f"p{i}", namespace="bench", containers=conts, constraints=cons
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--cards", type=int, default=8)
    ap.add_argument("--fill", type=float, default=0.6, help="GPU memory fill before timing")
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument(
        "--policy",
        default="default",
        help="node policy; default: the product's own (frag)",
    )
    ap.add_argument("--gpu-policy", default="spread")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--no-release", action="store_true", help="keep every placement (no release per decision)"
    )
    ap.add_argument(
        "--mixed",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="this share of the nodes, and of the requests, of other vendors (0.1: a tenth)",
    )
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    cl = build(args.nodes, args.cards, args.mixed)
    build_s = time.perf_counter() - t0
    policy = PRODUCT_DEFAULT if args.policy == "default" else args.policy
    # an unknown name stops here (ValueError), before the cluster is filled
    placer = Placer(
        cl,
        SchedulerSettings(node_policy=policy, gpu_policy=args.gpu_policy),
        NodeSettings(),
        seed=args.seed,
    )
    live: list[tuple[str, str]] = []
    total_mem = float(cl.n_dmem_tot[: cl.nn].sum())
    i = 0
    t0 = time.perf_counter()
    while (
        cl.n_dmem_used[: cl.nn].sum() < args.fill * total_mem and i < 20 * args.nodes * args.cards
    ):
        req = make_request(rng, i, args.mixed)
        placer.observe(req)
        got = placer.decide(req)
        if isinstance(got, Placement):
            cl.reserve(got.node, got.to_alloc(req))
            live.append((got.node, req.uid))
        i += 1
    fill_s = time.perf_counter() - t0
    lat = np.zeros(args.decisions)
    placed = failed = 0
    t_all = time.perf_counter()
    cpu0 = time.process_time()
    for k in range(args.decisions):
        req = make_request(rng, i, args.mixed)
        i += 1
        s = time.perf_counter()
        placer.observe(req)
        got = placer.decide(req)
        if isinstance(got, Placement):
            cl.reserve(got.node, got.to_alloc(req))
        lat[k] = time.perf_counter() - s
        if isinstance(got, Placement):
            placed += 1
            live.append((got.node, req.uid))
        else:
            failed += 1
        if live and not args.no_release:  # keep the fill steady: release a random earlier one
            j = int(rng.integers(len(live)))
            live[j], live[-1] = live[-1], live[j]
            node, uid = live.pop()
            cl.unreserve(node, uid)
    wall = time.perf_counter() - t_all
    cpu_s = time.process_time() - cpu0
    out = {
        "bench": "placement_inproc",
        "nodes": args.nodes,
        "cards": args.nodes * args.cards,
        "policy": policy,
        "gpu_policy": args.gpu_policy,
        "mixed": args.mixed,
        "fill_gpu_mem": round(float(cl.n_dmem_used[: cl.nn].sum()) / total_mem, 3),
        "decisions": args.decisions,
        "released": not args.no_release,
        "placed": placed,
        "failed": failed,
        "decisions_per_s": round(args.decisions / lat.sum(), 1),
        "decisions_per_s_with_release": round(args.decisions / wall, 1),
        # CPU time of this process over the timed loop (with releases): on a shared
        # machine wall-clock figures include other programs' turns, this does not
        "decisions_per_cpu_s_with_release": round(args.decisions / cpu_s, 1),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3),
        "max_ms": round(float(lat.max()) * 1e3, 3),
        "build_s": round(build_s, 2),
        "fill_s": round(fill_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
