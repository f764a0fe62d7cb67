"""``hami replay``: the openb trace replay of the FGD paper, through the real engine.

Reproduces the evaluation described in data/openb/README.md: the 1,213-node cluster,
each seed shuffles the task list and inflates it with random clones until the GPU
request reaches ``--tune`` x the cluster's GPUs, tasks are placed one at a time with
``Placer.decide`` + ``ClusterState.reserve`` (the same rules the service uses), failed
tasks are dropped, and the figure of merit is the unallocated GPU % when the arrived
GPU request reaches 100 % of the cluster.

Task mapping: a sharing task (one card, ``gpu_milli`` < 1000) asks ``gpu_milli/10`` % of
a card's memory and cores; ``num_gpu`` >= 1 with ``gpu_milli`` = 1000 asks whole,
exclusive cards; ``gpu_spec`` becomes the allowed models (``use_types``); CPU and
memory are node resources. Cards get 100 slots (the trace has no slot limit). Inside a
node every policy but the fragmentation-aware ones uses the card policy ``binpack``
(the smallest free share that fits; idle cards in index order), as the paper's harness.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.placement.engine import NODE_POLICIES, ClusterState, Placement, Placer
from services.placement.engine.frag import PRODUCT_DEFAULT, VARIANTS
from shared.config import NodeSettings, SchedulerSettings
from shared.schemas import (
    AllocRequested,
    Constraints,
    ContainerAsk,
    Device,
    DeviceAsk,
    NodeInventory,
)

# Published unallocated GPU % at arrived = 100 % (mean of 10 seeds), openb README.
PUBLISHED: dict[str, dict[str, float]] = {
    "default": {
        "random": 13.70,
        "dotprod": 9.38,
        "gpuclustering": 8.35,
        "gpupacking": 8.22,
        "bestfit": 7.14,
        "fgd": 4.77,
    },
    "gpushare40": {
        "random": 15.14,
        "dotprod": 10.70,
        "gpuclustering": 10.24,
        "gpupacking": 10.23,
        "bestfit": 8.56,
        "fgd": 6.04,
    },
    "multigpu20": {
        "random": 13.08,
        "dotprod": 8.15,
        "gpuclustering": 6.66,
        "gpupacking": 6.50,
        "bestfit": 6.27,
        "fgd": 4.47,
    },
    "gpuspec10": {
        "random": 13.74,
        "dotprod": 9.83,
        "gpuclustering": 8.04,
        "gpupacking": 7.76,
        "bestfit": 6.90,
        "fgd": 5.34,
    },
    "cpu050": {
        "random": 10.98,
        "dotprod": 6.97,
        "gpuclustering": 6.48,
        "gpupacking": 6.54,
        "bestfit": 6.44,
        "fgd": 5.00,
    },
}

# Card memory by model (MiB); only used to resolve percentages, which cores also bound.
_MODEL_MEM = {
    "P100": 16384,
    "T4": 15360,
    "V100M16": 16384,
    "V100M32": 32768,
    "A10": 24576,
    "G2": 32768,
    "G3": 81920,
}


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: tuple[str, ...]

    @property
    def gpu(self) -> float:
        """GPU request in card units."""
        return self.num_gpu * self.gpu_milli / 1000.0

    def request(self, uid: str) -> AllocRequested:
        devs = []
        if self.num_gpu > 0 and self.gpu_milli > 0:
            share = max(1, self.gpu_milli // 10)
            devs = [DeviceAsk(nums=self.num_gpu, mem_percent=share, cores=share)]
        return AllocRequested(
            uid=uid,
            name=self.name,
            containers=[
                ContainerAsk(
                    name="main", devices=devs, cpu_milli=self.cpu_milli, memory_mib=self.memory_mib
                )
            ],
            constraints=Constraints(use_types=list(self.gpu_spec)),
        )


def load_nodes(path: str | Path) -> list[NodeInventory]:
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            name, model = row["sn"], row["model"]
            devs = [
                Device(
                    uuid=f"{name}-gpu{i}",
                    index=i,
                    type=model,
                    devmem=_MODEL_MEM.get(model, 16384),
                    count=100,
                )
                for i in range(int(row["gpu"]))
            ]
            out.append(
                NodeInventory(
                    node=name,
                    devices=devs,
                    cpu_milli=int(row["cpu_milli"]),
                    memory_mib=int(row["memory_mib"]),
                )
            )
    return out


def load_tasks(path: str | Path) -> list[Task]:
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            spec = tuple(s for s in (row.get("gpu_spec") or "").split("|") if s)
            out.append(
                Task(
                    row["name"],
                    int(row["cpu_milli"]),
                    int(row["memory_mib"]),
                    int(row["num_gpu"]),
                    int(row["gpu_milli"]),
                    spec,
                )
            )
    return out


def inflate(tasks: list[Task], seed: int, total_gpus: float, tune: float) -> list[Task]:
    """Shuffle, then append random clones until the GPU request reaches tune x GPUs."""
    rng = np.random.default_rng(seed)
    order = [tasks[i] for i in rng.permutation(len(tasks))]
    want = tune * total_gpus
    got = sum(t.gpu for t in order)
    while got < want:
        t = tasks[int(rng.integers(len(tasks)))]
        order.append(t)
        got += t.gpu
    return order


@dataclass(slots=True)
class Run:
    policy: str
    seed: int
    unallocated: float  # % at arrived = 100 %
    seconds: float
    decisions: int
    curve: list[tuple[float, float]] = field(default_factory=list)  # (arrived %, unallocated %)


def replay_one(
    nodes: list[NodeInventory],
    tasks: list[Task],
    policy: str,
    seed: int,
    tune: float = 1.3,
    progress: bool = False,
) -> Run:
    """One seed of one policy; returns the unallocated GPU % at arrived = 100 %.

    ``policy`` "default" is the product's own (:func:`resolve_policy`).
    """
    label = policy
    policy = resolve_policy(policy)
    cluster = ClusterState()
    for inv in nodes:
        cluster.upsert_node(inv)
    total = float(sum(len(n.devices) for n in nodes))
    placer = Placer(
        cluster,
        SchedulerSettings(node_policy=policy, gpu_policy="binpack"),
        NodeSettings(),
        seed=seed,
    )
    for i, t in enumerate(tasks):  # typical shapes: once, from the original list
        placer.observe(t.request(f"o{i}"))
    placer.shapes.frozen = True
    seq = inflate(tasks, seed, total, tune)
    arrived = allocated = 0.0
    at100: float | None = None
    curve: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    step = max(1, len(seq) // 100)
    for i, t in enumerate(seq):
        req = t.request(f"t{i}")
        got = placer.decide(req, explain=False)
        arrived += t.gpu
        if isinstance(got, Placement):
            cluster.reserve(got.node, got.to_alloc(req))
            allocated += t.gpu
        if at100 is None and arrived >= total - 1e-9:
            at100 = 100.0 * (1.0 - allocated / total)
        if i % step == 0 or i == len(seq) - 1:
            curve.append((100.0 * arrived / total, 100.0 * (arrived - allocated) / total))
            if progress:
                _bar(f"{policy} seed {seed}", i + 1, len(seq))
    if at100 is None:  # --tune below 1: report where the replay stopped
        at100 = 100.0 * (1.0 - allocated / total)
    return Run(label, seed, at100, time.perf_counter() - t0, len(seq), curve)


def resolve_policy(name: str) -> str:
    """``default`` names the product's own policy (``frag``), the one compared with the
    published FGD figure; other names pass through."""
    return PRODUCT_DEFAULT if name == "default" else name


def published(trace: str, policy: str) -> float | None:
    """The published figure a policy is compared with (the default: FGD's, its target)."""
    key = "fgd" if policy == "default" else policy
    return PUBLISHED.get(trace, {}).get(key)


def _bar(label: str, done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r{label:<22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def trace_name(path: str) -> str:
    stem = Path(path).stem
    return stem.removeprefix("openb_pod_list_")


def plot(runs: list[Run], path: str) -> None:
    """Unallocated GPU % vs arrived % per policy (mean over seeds), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = np.linspace(0, 130, 261)
    for policy in dict.fromkeys(r.policy for r in runs):
        ys = []
        for r in runs:
            if r.policy == policy and r.curve:
                xs, us = zip(*r.curve, strict=True)
                ys.append(np.interp(grid, xs, us, right=np.nan))
        ax.plot(grid, np.nanmean(np.array(ys), axis=0), label=policy)
    ax.axvline(100, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("arrived GPU request (% of cluster GPUs)")
    ax.set_ylabel("unallocated GPU (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str], parser: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> int:
    # ``hami replay`` passes its own parser class: a usage error is one line there.
    ap = parser(prog="hami replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", required=True, help="openb node list CSV")
    ap.add_argument("--pods", required=True, help="openb pod list CSV")
    ap.add_argument(
        "--policy",
        action="append",
        required=True,
        help=f"node policy: default (the product's own, {PRODUCT_DEFAULT}), {', '.join(NODE_POLICIES)} (repeat)",
    )
    ap.add_argument("--seeds", default="42-51", help="e.g. 42-51 or 42,43 (default 42-51)")
    ap.add_argument(
        "--tune", type=float, default=1.3, help="inflate the GPU request to this x cluster GPUs"
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--plot", help="write unallocated %% vs arrived %% to this PNG")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    bad = [
        p
        for p in args.policy
        if resolve_policy(p) not in NODE_POLICIES and resolve_policy(p) not in VARIANTS
    ]
    if bad:
        ap.error(f"unknown policy {', '.join(bad)}; choose from {', '.join(NODE_POLICIES)}")
    nodes = load_nodes(args.nodes)
    tasks = load_tasks(args.pods)
    seeds = parse_seeds(args.seeds)
    runs = [
        replay_one(nodes, tasks, pol, s, args.tune, progress=not args.quiet)
        for pol in args.policy
        for s in seeds
    ]
    trace = trace_name(args.pods)
    summary = []
    for pol in args.policy:
        vals = [r.unallocated for r in runs if r.policy == pol]
        summary.append(
            {
                "policy": pol,
                "mean": round(statistics.fmean(vals), 2),
                "median": round(statistics.median(vals), 2),
                "stdev": round(statistics.pstdev(vals), 2),
                "per_seed": {r.seed: round(r.unallocated, 2) for r in runs if r.policy == pol},
                "policy_used": resolve_policy(pol),
                "published": published(trace, pol),
                "seconds_per_seed": round(
                    statistics.fmean(r.seconds for r in runs if r.policy == pol), 1
                ),
            }
        )
    if args.plot:
        plot(runs, args.plot)
    if args.json:
        print(
            json.dumps(
                {"trace": trace, "seeds": seeds, "tune": args.tune, "results": summary}, indent=2
            )
        )
    else:
        print(f"trace {trace}, seeds {args.seeds}: unallocated GPU % at arrived = 100 %")
        print(
            f"{'policy':<10} {'mean':>7} {'median':>7} {'stdev':>6} {'published':>9} {'s/seed':>7}"
        )
        for row in summary:
            pub = "" if row["published"] is None else f"{row['published']:.2f}"
            print(
                f"{row['policy']:<10} {row['mean']:>7.2f} {row['median']:>7.2f} {row['stdev']:>6.2f} {pub:>9} {row['seconds_per_seed']:>7}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
