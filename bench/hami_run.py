"""What ``hami run`` costs, and how soon a killed one's slice comes back: one JSON object.

Starts ``hami up`` (one simulated node, its own state file, ``telemetryInterval`` from
``--interval``), then, all through the real command line:

- ``run_s``: wall time of ``hami run --mem 100 -q -- true`` (submit, the node agent's
  environment, the command with the limiter preloaded, release), ``--n`` times;
- ``submit_release_s``: ``hami submit`` plus ``hami release`` of the same size, for
  comparison (what ``hami run`` adds is one request to the node agent and the command);
- ``reclaim_s``: from SIGKILL of ``hami run -- sleep 600`` until ``hami list`` no longer
  shows the slice (the node agent checks every ``--interval`` seconds; each ``hami list``
  is a process start, a few tenths of a second, which bounds the resolution).

Each list gives min, median and max. Needs ``make native`` (the limiter).

    .venv/bin/python bench/hami_run.py --n 5 --interval 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_ENTRY = Path(sys.executable).parent / "hami"
HAMI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "hami.cli"]


def stats(xs: list[float]) -> dict[str, float]:
    return {
        "min": round(min(xs), 4),
        "median": round(statistics.median(xs), 4),
        "max": round(max(xs), 4),
    }


def timed(env: dict[str, str], *args: str) -> float:
    t = time.perf_counter()
    subprocess.run([*HAMI, *args], env=env, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - t


def held(env: dict[str, str], name: str) -> bool:
    out = subprocess.run(
        [*HAMI, "list", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    return any(a["name"] == name for a in json.loads(out.stdout)["allocations"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5, help="repetitions of each measurement")
    p.add_argument("--interval", type=float, default=1.0, help="telemetryInterval, seconds")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hami-run-bench-"))
    env = dict(
        os.environ,
        HAMI_STATE_FILE=str(tmp / "state.json"),
        HAMI_LOG_LEVEL="WARNING",
        HAMI__TELEMETRYINTERVAL=str(args.interval),
    )
    env.pop("HAMI_NATS_URL", None)
    up = subprocess.Popen(
        [*HAMI, "up", "--sim-nodes", "1", "--sim-gpus", "A100-80GB:2:81920", "--metrics-port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "hami is up" in line:
                break
        run = [timed(env, "run", "--mem", "100", "-q", "--", "true") for _ in range(args.n)]
        sub = [
            timed(env, "submit", f"b{i}", "--mem", "100") + timed(env, "release", f"b{i}")
            for i in range(args.n)
        ]
        reclaim = []
        for i in range(args.n):
            name = f"k{i}"
            r = subprocess.Popen(
                [*HAMI, "run", "--name", name, "--mem", "100", "-q", "--", "sleep", "600"], env=env
            )
            while not held(env, name):
                time.sleep(0.05)
            time.sleep(0.2)  # registered with the agent (it answers before the command starts)
            r.kill()
            t = time.perf_counter()
            r.wait()
            while held(env, name):
                time.sleep(0.05)
            reclaim.append(time.perf_counter() - t)
        print(
            json.dumps(
                {
                    "interval_s": args.interval,
                    "n": args.n,
                    "run_s": stats(run),
                    "submit_release_s": stats(sub),
                    "reclaim_s": stats(reclaim),
                }
            )
        )
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=20)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
