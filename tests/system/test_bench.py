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
    # request by request the decision precedes the answer, so its median cannot
    # exceed the latency's (it would with the decision stamped after the publish)
    assert n["p50_to_decision_ms"] <= n["p50_ms"]
    assert n["nats_rtt_under_load_ms"] > 0
    assert set(n["cpu_ms_per_request"]) == {"placement", "nats_server", "bench"}


def test_openb_variants_meet_their_definitions(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import openb_variants as ov

    head = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n"
    rows = ["s,4000,1,1,500,", "w,8000,1,1,1000,", "m,8000,1,4,1000,", "c,2000,1,0,0,"] * 25
    (tmp_path / "openb_pod_list_default.csv").write_text(head + "\n".join(f"p{i}{r}" for i, r in enumerate(rows)) + "\n")
    (tmp_path / "openb_pod_list_gpuspec10.csv").write_text(head + "g,1000,1,1,1000,T4|G2\n")
    out = tmp_path / "out"
    assert ov.main([str(out), "--data", str(tmp_path)]) == 0

    def load(t: str) -> list[dict[str, str]]:
        return ov.load(out, t)

    share = load("gpushare60")
    gpu = sum(map(ov.gpu, share))
    assert sum(ov.gpu(r) for r in share if r["num_gpu"] == "1" and r["gpu_milli"] != "1000") / gpu >= 0.60
    multi = load("multigpu40")
    assert sum(ov.gpu(r) for r in multi if int(r["num_gpu"]) > 1) / sum(map(ov.gpu, multi)) >= 0.40
    cpu = load("cpu200")
    assert sum(r["num_gpu"] == "0" for r in cpu) / len(cpu) >= 0.20
    spec = [r for r in load("gpuspec33") if r["num_gpu"] != "0"]
    assert 0.15 < sum(r["gpu_spec"] == "T4|G2" for r in spec) / len(spec) < 0.50
    assert len({r["name"] for r in share}) == len(share)  # clones are named apart


def test_kube_burst_both_modes_bind_every_pod_where_it_is_reserved() -> None:
    """The Kubernetes burst, small, in both modes: the binder scheduling by itself, and
    the kube-scheduler stand-in driving the extender's filter and bind over HTTP."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kube_burst.py"), "--nodes", "2", "--pods", "30",
         "--mode", "both", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    res = json.loads(out.stdout)
    assert set(res) == {"direct", "extender"}
    for mode, r in res.items():
        assert r["mode"] == mode
        assert r["allocated"] == 30 and r["failed"] == 0, r["examples"]
        assert r["mismatches"] == 0 and r["reservation_mismatches"] == 0, r["examples_inconsistent"]
        assert r["leaked_reservations"] == 0, r["examples_inconsistent"]
        assert r["pods_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"]
    x = res["extender"]
    # every pod went through filter and bind (retries may add calls, never remove them)
    assert x["filters"] >= 30 and x["binds"] >= 30 and x["filter_p50_ms"] > 0
    assert "filters" not in res["direct"]
