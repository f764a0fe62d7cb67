"""The openb replay harness on a tiny synthetic trace (the real one runs in docs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.placement import replay


def _trace(tmp: Path) -> tuple[str, str]:
    nodes = tmp / "nodes.csv"
    nodes.write_text(
        "sn,cpu_milli,memory_mib,gpu,model\n"
        + "".join(f"n{i},32000,131072,{2 if i % 2 else 4},{'T4' if i % 2 else 'V100M16'}\n" for i in range(6))
    )
    pods = tmp / "pods.csv"
    rows = ["p0,4000,8192,1,500,", "p1,8000,8192,1,1000,", "p2,2000,4096,0,0,", "p3,8000,16384,2,1000,V100M16", "p4,1000,2048,1,250,T4"]
    pods.write_text("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n" + "\n".join(rows) + "\n")
    return str(nodes), str(pods)


def test_task_mapping() -> None:
    share = replay.Task("a", 1000, 10, 1, 460, ("T4",)).request("u")
    ask = share.containers[0].devices[0]
    assert (ask.nums, ask.mem_percent, ask.cores) == (1, 46, 46)
    assert share.constraints.use_types == ["T4"]
    whole = replay.Task("b", 1000, 10, 4, 1000, ()).request("u").containers[0].devices[0]
    assert (whole.nums, whole.mem_percent, whole.cores) == (4, 100, 100)
    assert replay.Task("c", 1000, 10, 0, 0, ()).request("u").containers[0].devices == []


def test_inflate_reaches_the_tuned_request() -> None:
    tasks = [replay.Task(f"t{i}", 1000, 1, 1, 500, ()) for i in range(10)]
    seq = replay.inflate(tasks, seed=3, total_gpus=20, tune=1.3)
    assert sum(t.gpu for t in seq) >= 26 > sum(t.gpu for t in seq[:-1])
    assert sorted(t.name for t in seq[:10]) == sorted(t.name for t in tasks)  # a shuffle first
    assert replay.parse_seeds("42-44,7") == [42, 43, 44, 7]


@pytest.mark.parametrize("policy", ["bestfit", "fgd", "frag", "random", "default"])
def test_replay_one_places_through_the_engine(tmp_path: Path, policy: str) -> None:
    nodes_csv, pods_csv = _trace(tmp_path)
    nodes, tasks = replay.load_nodes(nodes_csv), replay.load_tasks(pods_csv)
    run = replay.replay_one(nodes, tasks, policy, seed=1, tune=1.3)
    assert 0.0 <= run.unallocated <= 100.0
    xs = [x for x, _ in run.curve]
    assert xs == sorted(xs) and xs[-1] >= 130.0 - 1e-6
    # unallocated = arrived - allocated can only grow by failures, never beyond arrived
    assert all(0.0 <= u <= x + 1e-9 for x, u in run.curve)


def test_main_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nodes_csv, pods_csv = _trace(tmp_path)
    png = tmp_path / "out.png"
    rc = replay.main(["--nodes", nodes_csv, "--pods", pods_csv, "--policy", "bestfit", "--policy", "default",
                      "--seeds", "1-2", "--json", "--plot", str(png), "--quiet"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["results"]] == ["bestfit", "default"]
    # "default" is the product default policy, compared with the published FGD figure
    assert out["results"][1]["policy_used"] == replay.PRODUCT_DEFAULT
    assert all(set(r["per_seed"]) == {"1", "2"} for r in out["results"])
    assert png.stat().st_size > 1000


def test_main_rejects_unknown_policy(tmp_path: Path) -> None:
    nodes_csv, pods_csv = _trace(tmp_path)
    with pytest.raises(SystemExit):
        replay.main(["--nodes", nodes_csv, "--pods", pods_csv, "--policy", "nope"])


def test_default_is_the_product_default_and_compares_with_fgd() -> None:
    assert replay.resolve_policy("default") == replay.PRODUCT_DEFAULT
    assert replay.resolve_policy("bestfit") == "bestfit"
    assert replay.published("cpu050", "default") == replay.PUBLISHED["cpu050"]["fgd"]
