"""``hami demo``: the example of HAMi's website, on an embedded system of its own.

One node with three cards; pods A, B and C ask 30 %/25 %, 24 %/20 % and 18 %/15 % of
memory/cores. Given whole cards they take all three; sliced and bin-packed they share one.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

from hami.system import System
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
            for c in r.decision.containers for g in c.devices
        ]
        used.update(d["uuid"] for d in devs)
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
                    subjects.API_RELEASE, ReleaseRequest(name=name), ReleaseReply, timeout=15)
            sliced = {
                name: await _submit(system, name, DeviceAsk(nums=1, mem_percent=m, cores=c), "binpack")
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
