"""The placement benchmark runs end to end at a small scale, so its figures stay measurable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_placement_bench_over_nats_answers_every_request() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "placement.py"), "--nodes", "20", "--requests", "300",
         "--rate", "0", "--skip-inprocess"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    n = json.loads(out.stdout)["nats"]
    assert n["decided"] + n["failed"] == 300
    assert n["decided"] > 0
    for key in ("p50_ms", "nats_rtt_ms", "nats_rtt_same_process_ms", "p50_to_decision_ms",
                "p50_decision_to_answer_ms", "placement_rss_mb"):
        assert n[key] > 0, key
    # the decision precedes the answer, so its share cannot exceed the latency
    assert n["p50_to_decision_ms"] <= n["p99_ms"]
    assert set(n["cpu_ms_per_request"]) == {"placement", "nats_server", "bench"}
