"""Moore Threads sGPU: HAMi's ``pkg/device/mthreads``.

A card is 16 core units and 96 x 512 MiB (cards synthesised from node capacity). One
card: memory must be one of 2, 4, 8, 16, 32, 64, 96 units of 512 MiB; without memory the
webhook makes it the whole card. More than one card: whole cards (16 cores, 96 units
each). All containers of a pod share one card (HAMi's ``customFilterRule``). The vendor
plugin reads ``mthreads.com/gpu-index``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    Admitted,
    AllocateContext,
    Allocated,
    Allocation,
    Ask,
    Card,
    Family,
    Grant,
    PodInfo,
    RequestError,
    ResourceNames,
    capacity_int,
    quantity,
    whole,
    with_limits,
)

UNIT_MIB = 512
CORES_PER_CARD = 16
UNITS_PER_CARD = 96
LEGAL_UNITS = (2, 4, 8, 16, 32, 64, 96)
GPU_INDEX = "mthreads.com/gpu-index"
PREDICATE_NODE = "mthreads.com/predicate-node"
REQUEST_GPU_NUM = "mthreads.com/request-gpu-num"


@dataclass(frozen=True)
class Mthreads(Family):
    def admit(self, resources: Mapping[str, Any], annotations: Mapping[str, str]) -> Admitted:
        r = self.resources
        n = whole(quantity(resources, r.count), r.count)
        if n <= 0:
            raise RequestError(f"{r.count} must be greater than 0")
        out = with_limits(resources)
        if n > 1:
            out["limits"][r.cores] = n * CORES_PER_CARD
            out["limits"][r.memory] = n * UNITS_PER_CARD
            return Admitted(out, {REQUEST_GPU_NUM: str(n)})
        mem = (resources.get("limits") or {}).get(r.memory)
        if mem is None:
            out["limits"][r.cores] = CORES_PER_CARD
            out["limits"][r.memory] = UNITS_PER_CARD
            return Admitted(out, {})
        if whole(mem, r.memory) not in LEGAL_UNITS:
            raise RequestError(
                f"{r.memory} must be one of {', '.join(map(str, LEGAL_UNITS))} (units of 512 MiB), got {mem!r}"
            )
        return Admitted(resources, {})

    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        r = self.resources
        raw = quantity(resources, r.count)
        if raw is None:
            return None
        n = whole(raw, r.count)
        if n <= 0:
            return None
        mem = cores = 0
        if (m := quantity(resources, r.memory)) is not None:
            mem = whole(m, r.memory) * UNIT_MIB
        if (c := quantity(resources, r.cores)) is not None:
            cores = whole(c, r.cores)
        # HAMi divides the container's totals by the card count (Go integer division)
        return Ask(self.name, n, mem // n, 100 if mem == 0 else 0, cores // n, whole=n > 1)

    def type_ok(self, card: Card, ask: Ask, pod: PodInfo) -> bool:
        return ask.family in card.type and ask.family == self.name

    def custom_filter(self, card: Card, ask: Ask, pod: PodInfo, chosen: Sequence[Grant]) -> bool:
        return all(g.uuid == card.id for ctr in pod.allocated.get(ask.family, ()) for g in ctr)

    def cards_from_capacity(self, node: str, capacity: Mapping[str, Any]) -> list[Card]:
        cores = capacity_int(capacity, self.resources.cores)
        if cores == 0:
            raise RequestError(f"device not found {self.resources.cores}")
        mem = capacity_int(capacity, self.resources.memory)
        n = (cores + CORES_PER_CARD - 1) // CORES_PER_CARD
        return [
            Card(
                id=f"{node}-mthreads-{i}",
                index=i,
                type=self.name,
                count=100,
                totalmem=mem * UNIT_MIB * CORES_PER_CARD // cores,
                totalcore=CORES_PER_CARD,
            )
            for i in range(n)
        ]

    def pod_annotations(
        self, pod: PodInfo, grants: Sequence[Sequence[Grant]], node: str = ""
    ) -> dict[str, str]:
        out = super().pod_annotations(pod, grants, node)
        for ctr in grants:
            if ctr:
                # HAMi keeps the last container's cards (all on one card anyway)
                out[GPU_INDEX] = ",".join(str(g.idx) for g in ctr)
                out[PREDICATE_NODE] = node
        return out

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """The MT container runtime's contract: ``MTHREADS_VISIBLE_DEVICES`` (device nodes
        come from that runtime, sGPU limits from the vendor's closed plugin)."""
        return Allocation(
            envs={
                "MTHREADS_VISIBLE_DEVICES": ",".join(str(d.index) for d in devices),
                "MTHREADS_DRIVER_CAPABILITIES": "compute,utility",
            }
        )


FAMILY = Mthreads(
    name="Mthreads",
    vendor="mthreads",
    resources=ResourceNames(
        "mthreads.com/vgpu", "mthreads.com/sgpu-memory", "", "mthreads.com/sgpu-core"
    ),
    allocated_annotation="hami.io/mthreads-vgpu-devices-allocated",
    use_uuid_annotation="mthreads.ai/use-gpuuuid",
    nouse_uuid_annotation="mthreads.ai/nouse-gpuuuid",
)
