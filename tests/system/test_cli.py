"""End to end through the real command line: hami up, submit, status, release, /metrics;
and every way a new user can get it wrong: one line, an exit code, never a hang."""

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

_ENTRY = Path(sys.executable).parent / "hami"  # the installed entry point, as a user runs it
HAMI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "hami.cli"]
DEAD_URL = "nats://127.0.0.1:1"


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
    # a waiting submit that times out says why, with placement's last reasons
    r = run(env, "submit", "job-32", "--mem-percent", "25", "--wait", "1.5")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no placement within 1.5s" in r.stdout and "CardInsufficientMemory" in r.stdout, r.stdout
    w = json.loads(run(env, "submit", "job-32", "--mem-percent", "25", "--wait", "1", "--json").stdout)
    assert w["ok"] is False and w["error"] == "no placement within 1s" and w["reasons"], w

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


def one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def quiet_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, HAMI_STATE_FILE=str(tmp_path / "state.json"), HAMI_LOG_LEVEL="WARNING")
    for k in ("HAMI_NATS_URL", "HAMI_CONFIG"):
        env.pop(k, None)
    return env


@pytest.mark.parametrize(
    "args",
    [["status"], ["list"], ["describe", "x"], ["submit", "x", "--mem", "100"],
     ["submit", "x", "--mem", "100", "--wait", "60"], ["release", "x"],
     ["up", "--sim-nodes", "1"]],
)
def test_an_unreachable_server_is_one_line_and_exit_3(tmp_path: Path, args: list[str]) -> None:
    r = subprocess.run([*HAMI, *args, "--nats-url", DEAD_URL], env=quiet_env(tmp_path),
                       capture_output=True, text=True, timeout=20)
    one_line_error(r, 3, f"cannot reach NATS at {DEAD_URL}: connection refused")


def test_json_errors_are_one_object_on_stdout(tmp_path: Path) -> None:
    r = run(quiet_env(tmp_path), "status", "--json", "--nats-url", DEAD_URL)
    assert r.returncode == 3 and r.stderr == ""
    assert json.loads(r.stdout) == {
        "error": f"cannot reach NATS at {DEAD_URL}: connection refused", "code": 3}


def test_a_state_file_of_a_dead_hami_up_is_stale(tmp_path: Path) -> None:
    env = quiet_env(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    sf = Path(env["HAMI_STATE_FILE"])
    sf.write_text(json.dumps({"nats_url": DEAD_URL, "pid": gone.pid}))
    one_line_error(run(env, "status"), 3, "stale state file", f"pid {gone.pid}")
    assert not sf.exists()
    one_line_error(run(env, "status"), 3, "hami up")


def test_kill_9_of_hami_up_takes_its_nats_server_along(up) -> None:  # type: ignore[no-untyped-def]
    proc, env, _ = up
    st = json.loads(Path(env["HAMI_STATE_FILE"]).read_text())
    assert st["pid"] == proc.pid and st["nats_pid"] in children(proc.pid)

    # While it runs: who holds what, and a request left waiting with HAMi's reasons.
    assert run(env, "submit", "big", "--gpus", "4").returncode == 0
    assert run(env, "submit", "small", "--mem", "1000", "--cores", "20").returncode == 0
    waiting = subprocess.Popen([*HAMI, "submit", "later", "--gpus", "8", "--wait", "120"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while True:
        listed = json.loads(run(env, "list", "--json").stdout)
        if listed["pending"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    by_name = {a["name"]: a for a in listed["allocations"]}
    assert set(by_name) == {"big", "small"}
    assert by_name["big"]["cards"] == 4 and by_name["big"]["cores"] == 400
    assert (by_name["small"]["mem_mib"], by_name["small"]["cores"]) == (1000, 20)
    assert [p["name"] for p in listed["pending"]] == ["later"]
    d = json.loads(run(env, "describe", "later", "--json").stdout)
    assert d["state"] == "pending" and sum(d["reasons"].values()) == d["nodes_total"] == 2
    human = run(env, "describe", "later").stdout
    assert "pending" in human and "0/2 nodes are available" in human
    assert "NVIDIA-A100-80GB  1000 MiB  20% cores" in run(env, "describe", "small").stdout
    one_line_error(run(env, "describe", "nobody"), 1, "nobody: no such allocation")
    status = json.loads(run(env, "status", "--json").stdout)
    assert status["pending"] == 1 and sorted(status["allocations"]) == ["big", "small"]

    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(st["nats_pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(st["nats_pid"], 0)
    # The client waiting on it notices the server is gone instead of waiting 120 s.
    _, err = waiting.communicate(timeout=20)
    assert waiting.returncode == 3 and "Traceback" not in err, err
    one_line_error(run(env, "status"), 3, "stale state file")


@pytest.mark.parametrize(
    ("text", "words"),
    [("node:\n  deviceSplitCnt: 4\n", ["unknown setting 'deviceSplitCnt' in node", "deviceSplitCount"]),
     ("node:\n  deviceSplitCount: many\n", ["node.deviceSplitCount", "expected int"]),
     ("scheduler:\n  nodePolicy: binpak\n", ["scheduler.nodePolicy", "binpak"]),
     ("node:\n  deviceSplitCount: -3\n", ["node.deviceSplitCount", "-3"]),
     ("node: [\n", ["cannot read config"])],
)
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path: Path, text: str, words: list[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    one_line_error(run(quiet_env(tmp_path), "up", "--config", str(f)), 2, *words)


@pytest.mark.parametrize(
    ("args", "words"),
    [(["up", "--sim-gpus", "A100"], ["--sim-gpus 'A100'", "MODEL:COUNT"]),
     (["up", "--sim-gpus", "A100:x"], ["integers"]),
     (["up", "--sim-nodes", "-1"], ["--sim-nodes"]),
     (["submit", "x", "--mem-percent", "150"], ["--mem-percent", "150"]),
     (["submit", "x", "--node-policy", "binpak"], ["binpak"]),
     (["nosuch"], ["invalid choice"]),
     (["replay", "--nodes", "n.csv", "--pods", "p.csv", "--policy", "fgd", "--plot", "out.txt"], ["--plot", ".png"]),
     (["replay", "--nodes", "n.csv", "--pods", "p.csv", "--policy", "fgd", "--plot", "/no/such/dir/a.png"], ["no such directory"]),
     (["replay", "--nodes", "/no/such.csv", "--pods", "p.csv", "--policy", "fgd"], ["/no/such.csv"]),
     (["replay", "--bogus"], ["--nodes", "required", "hami replay --help"])],
)
def test_bad_flags_are_one_line_and_exit_2(tmp_path: Path, args: list[str], words: list[str]) -> None:
    one_line_error(run(quiet_env(tmp_path), *args), 2, *words)


def test_a_metrics_port_in_use_is_one_line_and_exit_4(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run(quiet_env(tmp_path), "up", "--sim-nodes", "1", "--metrics-port", str(port))
    one_line_error(r, 4, f"metrics port {port} is in use")
    assert not Path(quiet_env(tmp_path)["HAMI_STATE_FILE"]).exists()


def test_version_help_defaults_and_a_closed_pipe(tmp_path: Path) -> None:
    r = run(quiet_env(tmp_path), "--version")
    assert r.returncode == 0 and r.stdout.startswith("hami ")
    helptext = run(quiet_env(tmp_path), "submit", "--help").stdout
    assert "--gpus GPUS           cards (default: 1)" in helptext
    assert "--nats-url" in helptext and "default: $HAMI_NATS_URL" in helptext
    # The reader of stdout is gone before the answer is written: no traceback, 141.
    p = subprocess.Popen([*HAMI, "status", "--json", "--nats-url", DEAD_URL], env=quiet_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    assert p.wait(timeout=20) == 141
    assert p.stderr.read() == ""


def test_a_zombie_or_a_reused_pid_is_not_the_hami_up_recorded() -> None:
    from hami import state

    me = os.getpid()
    assert state.alive(me) and state.alive(me, state.start_time(me))
    assert not state.alive(me, (state.start_time(me) or 0) + 1)  # same pid, another process
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while state.alive(child.pid) and time.monotonic() < deadline:  # exited, not yet reaped
        time.sleep(0.05)
    assert not state.alive(child.pid)
    child.wait()
    assert not state.alive(child.pid)
