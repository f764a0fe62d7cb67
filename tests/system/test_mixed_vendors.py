"""A heterogeneous cluster through the real command line (issue 16).

``hami up`` with one simulated node per vendor family the simulator has (NVIDIA among
them); ``hami submit --vendor`` asks each family's card as a pod's container would; each
pod must land on a card of its family on that family's node, and ``/metrics`` must then
show, for every card of every node, the scheduler's and the node agent's series with the
card's ``vendor`` label, and the per-container series with it for each pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hami.demo import mixed_nodes
from shared.devices.registry import REGISTRY
from tests.system.test_cli import HAMI

Samples = dict[str, list[dict[str, str]]]
NODES = mixed_nodes()  # (family, spec), node i = sim-node-i


def scrape(url: str) -> Samples:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


@pytest.fixture
def mixed_up(tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    env = dict(os.environ, HAMI_STATE_FILE=str(tmp_path / "state.json"), HAMI_LOG_LEVEL="WARNING")
    env.pop("HAMI_NATS_URL", None)
    conf = tmp_path / "hami.yaml"
    conf.write_text("telemetryInterval: 0.3\n")
    args = [a for _, spec in NODES for a in ("--sim-node", spec)]
    proc = subprocess.Popen(
        [*HAMI, "up", *args, "--metrics-port", "0", "--config", str(conf), "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    try:
        assert line, proc.stderr.read() if proc.poll() is not None else "no output"
        yield env, json.loads(line)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_cluster_has_every_family_the_simulator_models() -> None:
    # Guards the node list: NVIDIA and 19 other families; the registry's families without
    # a simulated model (Ascend910C's paired dies, the 910B4-1 variant, shared vGCU) are
    # the only ones left out.
    fams = [f for f, _ in NODES]
    assert fams[0] == "NVIDIA" and len(set(fams)) == len(fams) == 20
    assert {f.name for f in REGISTRY.families} - set(fams) == {
        "Ascend910C",
        "Ascend910B4-1",
        "Enflame",
    }


def test_a_pod_per_vendor_lands_on_its_vendor_and_every_card_has_a_vendor_series(mixed_up) -> None:  # type: ignore[no-untyped-def]
    env, up = mixed_up
    assert up["nodes"] == [f"sim-node-{i}" for i in range(len(NODES))]
    st = json.loads(
        subprocess.run(
            [*HAMI, "status", "--json"], env=env, capture_output=True, text=True, timeout=60
        ).stdout
    )
    cards = {n["node"]: n["cards"] for n in st["nodes"]}
    node_of = {fam: f"sim-node-{i}" for i, (fam, _) in enumerate(NODES)}

    placed: dict[str, dict[str, object]] = {}
    for fam, node in node_of.items():
        flags = [] if fam == "NVIDIA" else ["--vendor", fam]
        name = f"pod-{fam.lower()}"
        r = subprocess.run(
            [*HAMI, "submit", name, "--gpus", "1", *flags, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, (fam, r.stdout, r.stderr)
        got = json.loads(r.stdout)
        assert got["node"] == node, (fam, got)
        assert [d["vendor"] for d in got["devices"]] == [fam], (fam, got)
        assert got["devices"][0]["uuid"] in {c["uuid"] for c in cards[node]}, (fam, got)
        placed[name] = got

    # A name the registry does not know is refused before anything is asked.
    r = subprocess.run(
        [*HAMI, "submit", "x", "--vendor", "NoSuchChip", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "no such device family" in (r.stdout + r.stderr)

    every_card = {(node, c["uuid"]): fam for fam, node in node_of.items() for c in cards[node]}
    assert len(every_card) >= 2 * len(NODES)

    def ready(got: Samples) -> bool:
        host = {
            (lb["node"], lb["device_uuid"]) for lb in got.get("hami_host_gpu_memory_used_bytes", [])
        }
        return set(every_card) <= host

    deadline = time.monotonic() + 20
    got = scrape(up["metrics_url"])
    while not ready(got) and time.monotonic() < deadline:
        time.sleep(0.2)
        got = scrape(up["metrics_url"])
    for metric in (
        "hami_gpu_memory_limit_bytes",
        "hami_gpu_core_allocated_ratio",
        "hami_host_gpu_memory_used_bytes",
        "hami_host_gpu_utilization_ratio",
    ):
        seen = {(lb["node"], lb["device_uuid"]): lb["vendor"] for lb in got[metric]}
        wrong = {k: (v, seen.get(k)) for k, v in every_card.items() if seen.get(k) != v}
        assert not wrong, (metric, wrong)
    for metric in ("hami_vgpu_memory_allocated_bytes", "hami_vgpu_memory_limit_bytes"):
        by_pod = {lb["pod"]: lb["vendor"] for lb in got[metric]}
        assert by_pod == {name: p["devices"][0]["vendor"] for name, p in placed.items()}, metric  # type: ignore[index]
