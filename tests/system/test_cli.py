"""End to end through the real command line: hami up, submit, status, release, /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HAMI = [sys.executable, "-m", "hami.cli"]


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HAMI, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def up(tmp_path: Path):
    env = dict(os.environ, HAMI_STATE_FILE=str(tmp_path / "state.json"), HAMI_LOG_LEVEL="WARNING")
    env.pop("HAMI_NATS_URL", None)
    proc = subprocess.Popen(
        [*HAMI, "up", "--sim-nodes", "2", "--sim-gpus", "A100-80GB:4:81920", "--metrics-port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if "hami is up" in line:
            break
    assert any(x.startswith("NATS:") for x in lines), (lines, proc.stderr.read() if proc.poll() is not None else "")
    yield proc, env, lines
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_up_submit_status_release_metrics(up) -> None:  # type: ignore[no-untyped-def]
    proc, env, lines = up
    state = json.loads(Path(env["HAMI_STATE_FILE"]).read_text())
    assert state["nats_url"] in lines[0]
    metrics_url = state["metrics_url"]
    nats_children = children(proc.pid)
    assert nats_children, "the embedded nats-server runs as a child"

    placed = []
    for i in range(32):
        r = run(env, "submit", f"job-{i}", "--mem-percent", "25", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        placed.append(json.loads(r.stdout))
    r = run(env, "submit", "job-32", "--mem-percent", "25")
    assert r.returncode == 1
    assert "CardInsufficientMemory" in r.stdout

    st = json.loads(run(env, "status", "--json").stdout)
    cards = [c for n in st["nodes"] for c in n["cards"]]
    assert len(cards) == 8
    assert all(c["used_mem"] == c["total_mem"] == 81920 for c in cards)
    assert sum(len(n["allocations"]) for n in st["nodes"]) == 32
    human = run(env, "status").stdout
    assert "mem 81920/81920 MiB" in human and "slots 4/10" in human

    text = urllib.request.urlopen(metrics_url + "/metrics", timeout=5).read().decode()
    allocated = [ln for ln in text.splitlines() if ln.startswith("hami_gpu_memory_allocated_bytes{")]
    assert len(allocated) == 8
    assert all(float(ln.rsplit(" ", 1)[1]) == 81920 * 1024 * 1024 for ln in allocated), allocated
    assert "hami_vgpu_memory_allocated_bytes{" in text
    assert "hami_scheduling_decision_seconds_bucket" in text

    rel = run(env, "release", "job-7")
    assert rel.returncode == 0, rel.stderr
    again = run(env, "submit", "job-32", "--mem-percent", "25", "--json")
    assert again.returncode == 0, again.stdout
    assert json.loads(again.stdout)["devices"][0]["uuid"] == placed[7]["devices"][0]["uuid"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    for pid in nats_children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not Path(env["HAMI_STATE_FILE"]).exists()
    host, port = state["nats_url"].removeprefix("nats://").split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()


def test_submit_without_a_running_system_says_so(tmp_path: Path) -> None:
    env = dict(os.environ, HAMI_STATE_FILE=str(tmp_path / "none.json"))
    env.pop("HAMI_NATS_URL", None)
    r = run(env, "submit", "x", "--mem", "100")
    assert r.returncode != 0
    assert "hami up" in r.stderr


def test_demo_json() -> None:
    r = subprocess.run([*HAMI, "demo", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["whole_gpu"]["gpus_used"] == 3
    assert out["sliced"]["gpus_used"] == 1
    assert set(out["sliced"]["pods"]) == {"pod-a", "pod-b", "pod-c"}
