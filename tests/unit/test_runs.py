"""A ``hami run`` slice on the host: its holders' liveness (services/nodeagent/runs.py, on real
processes) and its limiter environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.nodeagent import runs
from services.nodeagent.standalone import host_env
from shared.config import NodeSettings
from shared.schemas import CardGrant, ContainerGrant


def test_parse_stat_counts_fields_after_the_command_name() -> None:
    # A command name may hold spaces and parentheses; field 22 is the start time.
    rest = " ".join(str(n) for n in range(4, 23))
    assert runs.parse_stat(f"42 (a b) (c)) S {rest} 99 100") == ("S", 22)


def fake_proc(tmp: Path, pid: int, state: str, start: int) -> None:
    (tmp / str(pid)).mkdir(exist_ok=True)
    fields = [state, *(["0"] * 18), str(start), "0"]
    (tmp / str(pid) / "stat").write_text(f"{pid} (x) {' '.join(fields)}\n")


def test_a_zombie_or_a_reused_pid_is_not_the_holder(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, "S", 500)
    h = runs.holders([10, 11], tmp_path)
    assert h == [runs.Holder(10, 500)]  # 11 does not run: not a holder
    assert runs.alive(h[0], tmp_path)
    fake_proc(tmp_path, 10, "Z", 500)  # exited, not reaped
    assert not runs.alive(h[0], tmp_path)
    fake_proc(tmp_path, 10, "R", 777)  # the pid given to another process
    assert not runs.alive(h[0], tmp_path)


def test_real_processes(tmp_path: Path) -> None:
    me = runs.holders([os.getpid()])
    assert len(me) == 1 and runs.alive(me[0])
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (h,) = runs.holders([p.pid])
        assert runs.alive(h)
    finally:
        p.kill()
        p.wait()
    assert not runs.alive(h)  # killed and reaped
    assert runs.start_time(0) is None and runs.start_time(-5) is None


def test_saved_with_the_slice(tmp_path: Path) -> None:
    assert runs.load(tmp_path) is None  # not a hami run slice: never reclaimed
    hs = [runs.Holder(1, 2), runs.Holder(3, 4)]
    runs.save(tmp_path, hs)
    assert runs.load(tmp_path) == hs
    (tmp_path / runs.RUN_FILE).write_text("{not json")
    assert runs.load(tmp_path) == []  # unreadable: nobody provably holds it


def test_host_env_keys_limits_by_host_index() -> None:
    # On the bare host the limiter numbers cards as NVML lists them (all of the host's),
    # so a slice of cards 3 and 1 carries limits _3 and _1, not _0 and _1.
    grant = ContainerGrant(name="c", devices=[CardGrant(uuid="GPU-c", index=3, mem=1000, cores=30),
                                              CardGrant(uuid="GPU-a", index=1, mem=2000, cores=0)])
    env = host_env(grant, NodeSettings())
    limits = {k: v for k, v in env.items() if k.startswith("CUDA_DEVICE_")}
    limits.pop("CUDA_DEVICE_MEMORY_SHARED_CACHE")
    assert limits == {"CUDA_DEVICE_MEMORY_LIMIT_3": "1000m", "CUDA_DEVICE_SM_LIMIT_3": "30",
                      "CUDA_DEVICE_MEMORY_LIMIT_1": "2000m", "CUDA_DEVICE_SM_LIMIT_1": "0"}
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-c,GPU-a"
