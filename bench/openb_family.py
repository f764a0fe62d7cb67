"""The openb trace family as a generator, and the product default against fgd across it.

The paper's variants move one property of the default trace at a time. This makes any
point of each axis from the shipped default trace (and, for model constraints, the
allowed-model lists of the shipped gpuspec10 trace), so a policy can be checked on
traces it was never tuned on:

- ``gpushare`` 20-100: sharing tasks (one card, share < 1) are that % of the GPU
  request (default trace: 28.5 %). Up: clones of sharing tasks; down: clones of the
  other GPU tasks; 100: the other GPU tasks go.
- ``multigpu`` 20-50: multi-card tasks are that % of the GPU request (default: 7.3 %),
  by clones of multi-card tasks.
- ``gpuspec`` 5-33: that % of the GPU tasks carry an allowed-model list. A task's list
  is drawn from the gpuspec10 lists of tasks of its own kind (card count, sharing or
  not), so the models stay those such tasks ask for (a CPU-light sharing task does not
  get an 8-card model list).
- ``cpu`` 0.5-2.5: CPU pressure, the CPU-only tasks' total CPU request times that
  factor (fewer: a random subset kept; more: clones).

Every point is generated per seed (the generator's seed is the replay's), so the
10-seed mean covers the generator's variance as well as the replay's.

    .venv/bin/python bench/openb_family.py --seeds 42-51 --json OUT.json [--plot OUT.png]
    .venv/bin/python bench/openb_family.py --axis gpuspec --points 10,33 --seeds 42-44
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.placement import replay  # noqa: E402
from services.placement.replay import Task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "openb"
GRID: dict[str, list[float]] = {
    "gpushare": [20, 40, 60, 80, 100],
    "multigpu": [20, 30, 40, 50],
    "gpuspec": [5, 10, 20, 25, 33],
    "cpu": [0.5, 1.0, 1.5, 2.0, 2.5],
}
# published FGD, unallocated GPU % at arrived = 100 % (the shipped traces only)
PUBLISHED_FGD = {("gpushare", 40): 6.04, ("multigpu", 20): 4.47, ("gpuspec", 10): 5.34}


def sharing(t: Task) -> bool:
    return t.num_gpu == 1 and t.gpu_milli < 1000


def multi(t: Task) -> bool:
    return t.num_gpu > 1


def kind(t: Task) -> tuple[int, bool]:
    return (t.num_gpu, sharing(t))


def _share(tasks: list[Task], which: Callable[[Task], bool]) -> float:
    total = sum(t.gpu for t in tasks)
    return sum(t.gpu for t in tasks if which(t)) / total if total else 0.0


def _clone(t: Task, i: int) -> Task:
    return Task(f"{t.name}-c{i}", t.cpu_milli, t.memory_mib, t.num_gpu, t.gpu_milli, t.gpu_spec)


def gpu_share(
    tasks: list[Task], which: Callable[[Task], bool], frac: float, rnd: random.Random
) -> list[Task]:
    """Clones until the ``which`` tasks are ``frac`` of the GPU request (either way)."""
    out = list(tasks)
    if frac >= 1.0:
        return [t for t in out if which(t) or t.num_gpu == 0]
    part = sum(t.gpu for t in out if which(t))
    total = sum(t.gpu for t in out)
    up = part / total < frac
    pool = (
        [t for t in out if which(t)] if up else [t for t in out if t.num_gpu > 0 and not which(t)]
    )
    while (part / total < frac) if up else (part / total > frac):
        c = _clone(rnd.choice(pool), len(out))
        out.append(c)
        total += c.gpu
        part += c.gpu if up else 0.0
    return out


def gpu_spec(tasks: list[Task], frac: float, specs: list[Task], rnd: random.Random) -> list[Task]:
    """``frac`` of the GPU tasks get an allowed-model list from a task of their kind."""
    by_kind: dict[tuple[int, bool], list[tuple[str, ...]]] = {}
    for s in specs:
        by_kind.setdefault(kind(s), []).append(s.gpu_spec)
    every = [s.gpu_spec for s in specs]
    out = []
    for t in tasks:
        if t.num_gpu > 0 and rnd.random() < frac:
            t = Task(
                t.name,
                t.cpu_milli,
                t.memory_mib,
                t.num_gpu,
                t.gpu_milli,
                rnd.choice(by_kind.get(kind(t), every)),
            )
        elif t.gpu_spec:
            t = Task(t.name, t.cpu_milli, t.memory_mib, t.num_gpu, t.gpu_milli, ())
        out.append(t)
    return out


def cpu_pressure(tasks: list[Task], factor: float, rnd: random.Random) -> list[Task]:
    """The CPU-only tasks' total CPU request times ``factor``."""
    gpu = [t for t in tasks if t.num_gpu > 0]
    cpu = [t for t in tasks if t.num_gpu == 0]
    target = factor * sum(t.cpu_milli for t in cpu)
    if factor <= 1.0:
        keep, acc = [], 0
        for t in rnd.sample(cpu, len(cpu)):
            if acc + t.cpu_milli > target:
                continue
            keep.append(t)
            acc += t.cpu_milli
        out = gpu + keep
    else:
        out, acc = list(tasks), sum(t.cpu_milli for t in cpu)
        while acc < target:
            c = _clone(rnd.choice(cpu), len(out))
            out.append(c)
            acc += c.cpu_milli
    rnd.shuffle(out)
    return out


def make(axis: str, point: float, base: list[Task], specs: list[Task], seed: int) -> list[Task]:
    rnd = random.Random(f"{axis}-{point}-{seed}")
    if axis == "gpushare":
        return gpu_share(base, sharing, point / 100.0, rnd)
    if axis == "multigpu":
        return gpu_share(base, multi, point / 100.0, rnd)
    if axis == "gpuspec":
        return gpu_spec(base, point / 100.0, specs, rnd)
    if axis == "cpu":
        return cpu_pressure(base, point, rnd)
    raise ValueError(f"unknown axis {axis!r}; use one of {', '.join(GRID)}")


def describe(tasks: list[Task]) -> dict[str, float]:
    gpu_tasks = [t for t in tasks if t.num_gpu > 0]
    return {
        "tasks": len(tasks),
        "sharing_pct_of_gpu": round(100 * _share(tasks, sharing), 1),
        "multigpu_pct_of_gpu": round(100 * _share(tasks, multi), 1),
        "spec_pct_of_gpu_tasks": round(
            100 * sum(1 for t in gpu_tasks if t.gpu_spec) / max(len(gpu_tasks), 1), 1
        ),
        "cpu_only_cpu_cores": round(sum(t.cpu_milli for t in tasks if t.num_gpu == 0) / 1000),
    }


def plot(rows: list[dict[str, object]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_used = list(dict.fromkeys(str(r["axis"]) for r in rows))
    fig, axs = plt.subplots(1, len(axes_used), figsize=(4 * len(axes_used), 3.6), squeeze=False)
    for ax, axis in zip(axs[0], axes_used, strict=True):
        mine = [r for r in rows if r["axis"] == axis]
        xs = [float(r["point"]) for r in mine]  # type: ignore[arg-type]
        for pol, style in (("default", "-o"), ("fgd", "--s")):
            mean = [r[pol]["mean"] for r in mine]  # type: ignore[index]
            worst = [r[pol]["worst"] for r in mine]  # type: ignore[index]
            line = ax.plot(xs, mean, style, label=f"{pol} (mean)")[0]
            ax.plot(xs, worst, ":", color=line.get_color(), label=f"{pol} (worst seed)")
        pub = [(p, v) for (a, p), v in PUBLISHED_FGD.items() if a == axis]
        if pub:
            ax.plot(*zip(*pub, strict=True), "k*", ms=9, label="published FGD")
        ax.set_title(axis)
        ax.set_xlabel({"cpu": "CPU-only CPU x"}.get(axis, "% (see docs)"))
        ax.set_ylabel("unallocated GPU % at arrived 100 %")
        ax.grid(alpha=0.3)
    axs[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--axis", action="append", choices=list(GRID), help="default: every axis")
    ap.add_argument("--points", help="comma-separated points of the (one) axis; default: its grid")
    ap.add_argument("--seeds", default="42-51")
    ap.add_argument("--policy", action="append", help="default: default and fgd")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write the plot here (needs matplotlib)")
    args = ap.parse_args(argv)
    policies = args.policy or ["default", "fgd"]
    nodes = replay.load_nodes(args.data / "openb_node_list_gpu_node.csv")
    base = replay.load_tasks(args.data / "openb_pod_list_default.csv")
    specs = [
        t
        for t in replay.load_tasks(args.data / "openb_pod_list_gpuspec10.csv")
        if t.gpu_spec and t.num_gpu
    ]
    seeds = replay.parse_seeds(args.seeds)
    axes = args.axis or list(GRID)
    rows: list[dict[str, object]] = []
    for axis in axes:
        points = [float(p) for p in args.points.split(",")] if args.points else GRID[axis]
        for point in points:
            row: dict[str, object] = {"axis": axis, "point": point}
            t0 = time.perf_counter()
            for pol in policies:
                vals = []
                for s in seeds:
                    tasks = make(axis, point, base, specs, s)
                    if pol == policies[0] and s == seeds[0]:
                        row["trace"] = describe(tasks)
                    vals.append(replay.replay_one(nodes, tasks, pol, s).unallocated)
                row[pol] = {
                    "mean": round(statistics.fmean(vals), 2),
                    "worst": round(max(vals), 2),
                    "stdev": round(statistics.pstdev(vals), 2),
                    "per_seed": [round(v, 2) for v in vals],
                }
            pub = PUBLISHED_FGD.get((axis, int(point)))
            row["published_fgd"] = pub
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": seeds, "results": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
