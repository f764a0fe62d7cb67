"""Held-out variants of the openb trace, made from the shipped default trace.

(The third session's look-alikes, kept for their figures in docs/placement.md; the
whole family, with model lists drawn per task kind, is bench/openb_family.py.)

The paper's family has more traces than are shipped (gpushareXX, multigpuXX, gpuspecXX,
cpuXXX). This writes look-alikes by the definitions in data/openb/README.md, for checking
that a policy tuned on the shipped five holds elsewhere:

- ``gpushareXX`` / ``multigpuXX``: clones of the sharing (multi-GPU) tasks until they are
  XX % of the GPU request;
- ``cpuXXX``: clones of the CPU-only tasks until they are XXX/10 % of the tasks;
- ``gpuspecXX``: XX % of the GPU tasks get an allowed-model list drawn from those of
  gpuspec10. Drawn without regard to the task (the real variants likely kept each task's
  own model), so more tasks are hard to place than in the paper's: a stress test.

    python bench/openb_variants.py OUT_DIR [--data ../shared/data/openb] [--seed 0]
    .venv/bin/python -m services.placement.replay --nodes ../shared/data/openb/openb_node_list_gpu_node.csv \\
        --pods OUT_DIR/openb_pod_list_gpushare60.csv --policy default --policy fgd
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Callable
from pathlib import Path

Row = dict[str, str]
ROOT = Path(__file__).resolve().parent.parent


def load(data: Path, trace: str) -> list[Row]:
    with open(data / f"openb_pod_list_{trace}.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def save(out: Path, trace: str, rows: list[Row]) -> None:
    with open(out / f"openb_pod_list_{trace}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for i, r in enumerate(rows):  # clones get names of their own
            w.writerow({**r, "name": f"{r['name']}-{i}"})


def gpu(r: Row) -> float:
    return int(r["num_gpu"]) * int(r["gpu_milli"]) / 1000


def grow(rows: list[Row], kind: Callable[[Row], bool], frac: float, rnd: random.Random) -> list[Row]:
    """Clones of the ``kind`` tasks until they are ``frac`` of the GPU request."""
    out, pool = list(rows), [r for r in rows if kind(r)]
    if not pool:
        raise SystemExit("the trace has no task of that kind to clone")
    total, part = sum(map(gpu, out)), sum(gpu(r) for r in out if kind(r))
    while part / total < frac:
        r = rnd.choice(pool)
        out.append(r)
        total += gpu(r)
        part += gpu(r)
    rnd.shuffle(out)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "openb")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(args.seed)
    base = load(args.data, "default")
    specs = [r["gpu_spec"] for r in load(args.data, "gpuspec10") if r["gpu_spec"] and int(r["num_gpu"]) > 0]
    for pct in (25, 33):
        rows = [dict(r) for r in base]
        for r in rows:
            if int(r["num_gpu"]) > 0 and rnd.random() < pct / 100:
                r["gpu_spec"] = rnd.choice(specs)
        save(args.out, f"gpuspec{pct}", rows)
    cpu_only = [r for r in base if int(r["num_gpu"]) == 0]
    rows = list(base)
    while sum(1 for r in rows if int(r["num_gpu"]) == 0) / len(rows) < 0.20:
        rows.append(rnd.choice(cpu_only))
    save(args.out, "cpu200", rows)
    save(args.out, "gpushare60", grow(base, lambda r: int(r["num_gpu"]) == 1 and int(r["gpu_milli"]) < 1000, 0.60, rnd))
    save(args.out, "multigpu40", grow(base, lambda r: int(r["num_gpu"]) > 1, 0.40, rnd))
    print(f"wrote gpuspec25, gpuspec33, cpu200, gpushare60, multigpu40 to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
