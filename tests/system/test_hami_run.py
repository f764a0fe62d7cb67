"""``hami run`` end to end: hami up (one simulated node), the real limiter, the fake driver.

The workload (tests/system/cuda_workload.py) allocates device memory through the fake
CUDA library the limiter tests build; ``hami run`` preloads the built libvgpu.so with the
slice's environment. Checked: the limiter holds the command to its slice, its output and
exit status come through, its usage is in /metrics while it runs, the slice is released
when it ends, a signal sent to ``hami run`` reaches it, after a SIGKILL of
``hami run`` the node agent reclaims the slice, and a preempted slice stops the command.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.nodeagent.backends.sim import sim_uuid
from services.nodeagent.runs import start_time

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "isolation" / "native"
FAKE = NATIVE / "build" / "fake"
LIB = NATIVE / "build" / "libvgpu.so"
WORKLOAD = Path(__file__).with_name("cuda_workload.py")
_ENTRY = Path(sys.executable).parent / "hami"
HAMI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "hami.cli"]
MIB = 1 << 20
NODE = "sim-node-0"
CARDS = [sim_uuid(NODE, i) for i in range(2)]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    subprocess.run(["make", "-s", "-C", str(NATIVE), "fakes"], check=True, timeout=240)
    tmp = tmp_path_factory.mktemp("run")
    # Preemption on: only a request of higher priority than the others preempts, and
    # only the preemption test makes one.
    env = dict(os.environ, HAMI_STATE_FILE=str(tmp / "state.json"), HAMI_LOG_LEVEL="WARNING",
               HAMI__TELEMETRYINTERVAL="0.2", HAMI__SCHEDULER__PREEMPTION="true")
    env.pop("HAMI_NATS_URL", None)
    proc = subprocess.Popen(
        [*HAMI, "up", "--sim-nodes", "1", "--sim-gpus", "A100-80GB:2:81920", "--metrics-port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line or "hami is up" in line:
            break
        lines.append(line)
    assert proc.poll() is None, (lines, proc.stderr.read() if proc.stderr else "")
    metrics_url = json.loads((tmp / "state.json").read_text())["metrics_url"]
    # What the fake driver needs to pose as the simulated node's two cards, and the limiter.
    env.update(
        LD_LIBRARY_PATH=str(FAKE),
        HAMI_REAL_LIBCUDA=str(FAKE / "libcuda.so.1"),
        HAMI_REAL_LIBNVML=str(FAKE / "libnvidia-ml.so.1"),
        FAKE_GPU_STATE=str(tmp / "fakegpu.state"),
        FAKE_CUDA_DEVICES="2",
        FAKE_CUDA_MEM_MB="81920",
        FAKE_CUDA_UUIDS=",".join(CARDS),
        HAMI_LIMITER=str(LIB),
        METRICS_URL=metrics_url,
        TMP=str(tmp),
    )
    try:
        yield env
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hami(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HAMI, *args], env=env, capture_output=True, text=True, timeout=60)


def start_run(env: dict[str, str], name: str, *cmd: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*HAMI, "run", "--name", name, "--mem", "1000", "--", *cmd], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(p: subprocess.Popen[str], word: str) -> list[str]:
    assert p.stdout is not None
    seen = []
    for line in p.stdout:
        seen.append(line.strip())
        if line.startswith(word):
            return seen
    raise AssertionError(f"ended before {word!r}: {seen} {p.stderr.read() if p.stderr else ''}")


def allocations(env: dict[str, str]) -> list[str]:
    r = hami(env, "list", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return [a["name"] for a in json.loads(r.stdout)["allocations"]]


def scrape(env: dict[str, str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = urllib.request.urlopen(env["METRICS_URL"] + "/metrics", timeout=5).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def pod_series(env: dict[str, str], metric: str, pod: str) -> list[tuple[dict[str, str], float]]:
    return [(lb, v) for lb, v in scrape(env).get(metric, []) if lb.get("pod") == pod]


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_runs_on_its_slice_passes_output_and_status_through_and_releases(up: dict[str, str]) -> None:
    gate = Path(up["TMP"]) / "gate-a"
    p = start_run(up, "job-a", sys.executable, str(WORKLOAD), "300", str(gate), "7")
    try:
        out = read_until(p, "info")
        assert out[-2] == "alloc 0", out
        free, total = map(int, out[-1].split()[1:])
        assert (total, free) == (1000 * MIB, 700 * MIB), out  # the limiter's view: the slice
        assert allocations(up) == ["job-a"]

        # Its usage, as the limiter wrote it into the region, is in /metrics while it runs.
        used = eventually(lambda: [v for _, v in pod_series(up, "hami_vgpu_memory_used_bytes", "job-a") if v])
        assert used == [300 * MIB], used
        ((lb, limit),) = pod_series(up, "hami_vgpu_memory_limit_bytes", "job-a")
        assert limit == 1000 * MIB and lb["namespace"] == "standalone" and lb["container"] == "job-a"
        card = lb["device_uuid"]
        host = {h["device_uuid"]: v for h, v in scrape(up)["hami_host_gpu_memory_used_bytes"]}
        assert host[card] == (409 + 300) * MIB and set(host) == set(CARDS), host

        gate.touch()
        rest, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 7
    assert rest.strip() == "workload done"
    assert "workload says bye" in err and f"hami run: job-a on {NODE}: {card} 1000 MiB" in err, err
    assert allocations(up) == []  # released before it returned
    assert eventually(lambda: not pod_series(up, "hami_vgpu_memory_limit_bytes", "job-a"))


def test_the_limiter_holds_it_to_its_slice(up: dict[str, str]) -> None:
    gate = Path(up["TMP"]) / "gate-open"
    gate.touch()
    r = hami(up, "run", "--name", "job-big", "--mem", "1000", "-q", "--", sys.executable, str(WORKLOAD),
             "2000", str(gate))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == "alloc 2", r.stdout  # CUDA_ERROR_OUT_OF_MEMORY
    assert "hami run:" not in r.stderr  # --quiet
    assert allocations(up) == []


def test_a_signal_to_hami_run_reaches_the_command(up: dict[str, str]) -> None:
    p = start_run(up, "job-term", sys.executable, str(WORKLOAD), "100")
    try:
        read_until(p, "info")
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM
    assert allocations(up) == []


def test_a_command_that_cannot_start(up: dict[str, str]) -> None:
    r = hami(up, "run", "--mem", "100", "--", "/nonexistent/program")
    assert r.returncode == 127 and "cannot run /nonexistent/program" in r.stderr, r.stderr
    assert allocations(up) == []
    r = hami(up, "run", "--mem", "100")
    assert r.returncode == 2 and "nothing to run" in r.stderr


def test_the_node_agent_reclaims_the_slice_of_a_killed_hami_run(up: dict[str, str]) -> None:
    p = start_run(up, "job-k", sys.executable, str(WORKLOAD), "100")
    try:
        read_until(p, "info")
        (child,) = children(p.pid)
        assert eventually(lambda: [v for _, v in pod_series(up, "hami_vgpu_memory_used_bytes", "job-k") if v])
        p.kill()  # no release from hami run: the agent must notice
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # The command dies with it (at worst a zombie of whoever inherited it) ...
    assert eventually(lambda: start_time(child) is None, 10), "the command outlived hami run"
    # ... and the node agent withdraws the slice within a few telemetry intervals.
    assert eventually(lambda: "job-k" not in allocations(up)), allocations(up)
    assert eventually(lambda: not pod_series(up, "hami_vgpu_memory_limit_bytes", "job-k"))


def test_ctrl_c_at_a_terminal_reaches_the_command_once(up: dict[str, str]) -> None:
    # A terminal sends Ctrl-C's SIGINT to its whole foreground process group: the
    # command already has it, so hami run must not pass on a second one.
    gate = Path(up["TMP"]) / "gate-tty"
    script = f'trap "echo got-int" INT; echo started; while [ ! -e {gate} ]; do sleep 0.05; done; echo done'
    master, slave = pty.openpty()

    def controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen([*HAMI, "run", "--mem", "100", "-q", "--", "sh", "-c", script], env=up,
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                         preexec_fn=controlling_tty)
    os.close(slave)
    out = b""
    try:
        def read_until_word(word: bytes) -> None:
            nonlocal out
            while word not in out:
                ready, _, _ = select.select([master], [], [], 30)
                assert ready, out
                out += os.read(master, 4096)

        read_until_word(b"started")
        os.write(master, b"\x03")  # Ctrl-C
        read_until_word(b"got-int")
        time.sleep(1.0)  # a forwarded copy would come within hami run's 0.2 s poll
        gate.touch()
        read_until_word(b"done")
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert out.count(b"got-int") == 1, out
    assert allocations(up) == []


def test_its_compute_use_reaches_the_container_and_host_series(up: dict[str, str]) -> None:
    # The limiter measures a container's SM utilisation on a card it caps (--cores);
    # the fake driver's launches occupy the card for grid x FAKE_CUDA_NS_PER_BLOCK.
    env = dict(up, FAKE_CUDA_NS_PER_BLOCK="10000")
    p = subprocess.Popen([*HAMI, "run", "--name", "job-sm", "--mem", "1000", "--cores", "30", "-q", "--",
                          str(FAKE / "cutest"), "init", "ctx", "0", "launch", "kernel", "20000", "100", "0"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        util = eventually(lambda: [(lb["device_uuid"], v) for lb, v in
                                   pod_series(up, "hami_container_device_utilization_ratio", "job-sm") if v])
        assert util, p.stderr.read() if p.poll() is not None and p.stderr else "no utilisation seen"
        ((card, v),) = util
        assert 0 < v <= 100
        host = {lb["device_uuid"]: x for lb, x in scrape(up)["hami_host_gpu_utilization_ratio"]}
        assert host[card] > 0, host
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    assert eventually(lambda: "job-sm" not in allocations(up))


def test_a_preempted_slice_stops_the_command(up: dict[str, str]) -> None:
    # Both whole cards at priority 0; a whole card at priority 10 fits only by preempting.
    p = subprocess.Popen([*HAMI, "run", "--name", "job-low", "--gpus", "2", "--mem-percent", "100",
                          "--grace", "5", "--", sys.executable, str(WORKLOAD), "100"],
                         env=up, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_until(p, "info")
        (child,) = children(p.pid)
        hi = hami(up, "submit", "job-high", "--mem-percent", "100", "--priority", "10", "--json")
        assert hi.returncode == 0, hi.stdout + hi.stderr
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 5, err
    assert "job-low on sim-node-0 was preempted by job-high (priority 10 over 0); stopping the command" in err, err
    assert "release not confirmed" not in err
    assert eventually(lambda: start_time(child) is None, 10), "the command outlived its slice"
    assert allocations(up) == ["job-high"]
    assert hami(up, "release", "job-high").returncode == 0
