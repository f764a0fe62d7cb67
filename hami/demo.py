"""``hami demo``: the example of HAMi's website, on an embedded system of its own.

One node with three cards; pods A, B and C ask 30 %/25 %, 24 %/20 % and 18 %/15 % of
memory/cores. Given whole cards they take all three; sliced and bin-packed they share one.

``hami demo --mixed`` (:func:`run_mixed`): a heterogeneous cluster, one simulated node per
vendor family the simulator knows (NVIDIA among them) and one node with an A100 beside a
Cambricon MLU; a pod per family asks that family's resources as a pod's container would
(the family's own defaults for one card), and one pod asks both NVIDIA and Cambricon in
two containers. It prints who got which card of which vendor.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

from hami.system import System
from hami.vendorask import vendor_ask
from services.nodeagent.backends.vendors import FAMILIES
from shared import config, subjects
from shared.schemas import (
    Constraints,
    ContainerAsk,
    DeviceAsk,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)

PODS = {"pod-a": (30, 25), "pod-b": (24, 20), "pod-c": (18, 15)}
CARDS = "A100-40GB:3:40960"


async def _submit(system: System, name: str, ask: DeviceAsk, gpu_policy: str | None) -> SubmitReply:
    bus = system.buses[0]
    req = SubmitRequest(
        name=name,
        containers=[ContainerAsk(name=name, devices=[ask])],
        constraints=Constraints(node_policy="binpack", gpu_policy=gpu_policy),
    )
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=30)


def _phase(replies: dict[str, SubmitReply]) -> dict[str, Any]:
    pods: dict[str, Any] = {}
    used: set[str] = set()
    for name, r in replies.items():
        if not r.ok or r.decision is None:
            pods[name] = {"ok": False, "error": r.error or (r.failure.message if r.failure else "")}
            continue
        devs = [
            {"uuid": g.uuid, "index": g.index, "mem_mib": g.mem, "cores": g.cores}
            for c in r.decision.containers
            for g in c.devices
        ]
        used.update(g.uuid for c in r.decision.containers for g in c.devices)
        pods[name] = {"ok": True, "node": r.decision.node, "devices": devs}
    return {"gpus_used": len(used), "pods": pods}


async def run_demo() -> dict[str, Any]:
    cfg = config.load(env={})
    with tempfile.TemporaryDirectory(prefix="hami-demo-") as tmp:
        from pathlib import Path

        system = System(cfg, sim_nodes=1, sim_gpus=[CARDS], metrics_port=0, data_dir=Path(tmp))
        await system.start()
        try:
            whole = {
                name: await _submit(system, name, DeviceAsk(nums=1, cores=100), None)
                for name in PODS
            }
            whole_out = _phase(whole)
            for name in PODS:
                await system.buses[0].request(
                    subjects.API_RELEASE, ReleaseRequest(name=name), ReleaseReply, timeout=15
                )
            sliced = {
                name: await _submit(
                    system, name, DeviceAsk(nums=1, mem_percent=m, cores=c), "binpack"
                )
                for name, (m, c) in PODS.items()
            }
            sliced_out = _phase(sliced)
        finally:
            await system.stop()
            await asyncio.sleep(0)
    return {
        "node_cards": 3,
        "model": CARDS.split(":")[0],
        "whole_gpu": whole_out,
        "sliced": sliced_out,
        "pods": {n: {"mem_percent": m, "cores": c} for n, (m, c) in PODS.items()},
    }


# ---------------------------------------------------------------------- --mixed

MIXED_NVIDIA = "A100-40GB:2:40960"
MIXED_COUNT = 2  # cards per vendor node


def mixed_nodes() -> list[tuple[str, str]]:
    """(family, ``--sim-gpus`` spec) of each one-vendor node: NVIDIA first, then every
    family the simulator has a model for, with its first model."""
    return [("NVIDIA", MIXED_NVIDIA)] + [
        (key, f"{fam.models[0].name}:{MIXED_COUNT}") for key, fam in FAMILIES.items() if fam.models
    ]


def mixed_asks() -> dict[str, list[tuple[str, DeviceAsk]]]:
    """Pod name -> its containers' (name, ask): one pod per family of :func:`mixed_nodes`
    asking one card as the family's resources would, and ``pod-two-vendors`` asking an
    NVIDIA half-card and an MLU in two containers (only the shared node has both)."""
    # First, while the shared node's one MLU is free (a one-vendor pod could take it).
    pods: dict[str, list[tuple[str, DeviceAsk]]] = {
        "pod-two-vendors": [
            ("cuda", DeviceAsk(nums=1, mem_percent=50, cores=50)),
            ("mlu", vendor_ask("MLU", 1, None, None, None)),
        ]
    }
    for key, _ in mixed_nodes():
        name = f"pod-{key.lower()}"
        if key == "NVIDIA":
            pods[name] = [(name, DeviceAsk(nums=1, cores=100))]  # a bare --gpus 1: a whole card
        else:
            pods[name] = [(name, vendor_ask(key, 1, None, None, None))]
    return pods


async def _submit_pod(
    system: System, name: str, containers: list[tuple[str, DeviceAsk]]
) -> SubmitReply:
    req = SubmitRequest(
        name=name, containers=[ContainerAsk(name=c, devices=[a]) for c, a in containers]
    )
    return await system.buses[0].request(subjects.API_SUBMIT, req, SubmitReply, timeout=30)


def mixed_report(
    nodes: dict[str, list[str]],
    asks: dict[str, list[tuple[str, DeviceAsk]]],
    replies: dict[str, SubmitReply],
) -> dict[str, Any]:
    """The JSON of ``hami demo --mixed``: the cluster, and per pod what each container
    asked and got (node, cards with their vendor and type)."""
    pods: dict[str, Any] = {}
    for name, r in replies.items():
        asked = [
            {
                "container": c,
                "vendor": a.vendor,
                "nums": a.nums,
                "mem_mib": a.mem,
                "mem_percent": a.mem_percent,
                "cores": a.cores,
            }
            for c, a in asks[name]
        ]
        if not r.ok or r.decision is None:
            pods[name] = {
                "ok": False,
                "asked": asked,
                "error": r.error or (r.failure.message if r.failure else ""),
            }
            continue
        got = [
            {
                "container": c.name,
                "devices": [
                    {
                        "uuid": g.uuid,
                        "index": g.index,
                        "vendor": g.vendor,
                        "type": g.type,
                        "mem_mib": g.mem,
                        "cores": g.cores,
                    }
                    for g in c.devices
                ],
            }
            for c in r.decision.containers
        ]
        pods[name] = {"ok": True, "node": r.decision.node, "asked": asked, "containers": got}
    return {
        "nodes": nodes,
        "pods": pods,
        "placed": sum(1 for p in pods.values() if p["ok"]),
        "total": len(pods),
    }


async def run_mixed() -> dict[str, Any]:
    cfg = config.load(env={})
    node_specs = [[spec] for _, spec in mixed_nodes()] + [[f"{MIXED_NVIDIA},MLU370-X4:1"]]
    asks = mixed_asks()
    with tempfile.TemporaryDirectory(prefix="hami-demo-") as tmp:
        from pathlib import Path

        system = System(cfg, sim_node_gpus=node_specs, metrics_port=0, data_dir=Path(tmp))
        await system.start()
        try:
            nodes = {a.node: specs for a, specs in zip(system.agents, node_specs, strict=True)}
            replies = {name: await _submit_pod(system, name, ctrs) for name, ctrs in asks.items()}
        finally:
            await system.stop()
            await asyncio.sleep(0)
    return mixed_report(nodes, asks, replies)


def mixed_lines(out: dict[str, Any]) -> list[str]:
    """``hami demo --mixed``'s text: one line per container's cards."""
    lines = [
        f"{len(out['nodes'])} nodes: "
        + "; ".join(f"{n} {','.join(s)}" for n, s in out["nodes"].items())
    ]
    for name, p in out["pods"].items():
        if not p["ok"]:
            lines.append(f"  {name}: not placed: {p['error']}")
            continue
        for c in p["containers"]:
            cards = ", ".join(
                f"{d['vendor']} {d['type']} #{d['index']} ({d['mem_mib']} MiB, {d['cores']} cores)"
                for d in c["devices"]
            )
            who = name if c["container"] == name else f"{name}/{c['container']}"
            lines.append(f"  {who} -> {p['node']}: {cards}")
    lines.append(f"{out['placed']}/{out['total']} pods placed")
    return lines
