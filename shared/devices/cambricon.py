"""Cambricon MLU (dynamic sMLU): HAMi's ``pkg/device/cambricon``.

Memory is asked in 256 MiB units (``cambricon.com/mlu.smlu.vmemory: 4`` is 1024 MiB),
cores default to 100 % when not given, and the cards are synthesised from node capacity
(``vcore / 100`` cards, each ``vmemory * 256 * 100 / vcore`` MiB). HAMi writes the
profile the Cambricon plugin creates the sMLU from: ``CAMBRICON_DSMLU_PROFILE`` =
``<index>_<cores>_<memory in 256 MiB units>`` and ``CAMBRICON_DSMLU_ASSIGHED=false``
(sic: the plugin's spelling, VENDORS.md §2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    AllocateContext,
    Allocated,
    Allocation,
    Card,
    Family,
    Grant,
    PodInfo,
    ResourceNames,
    capacity_int,
    dev,
    whole,
)

UNIT_MIB = 256
PROFILE = "CAMBRICON_DSMLU_PROFILE"
ASSIGNED = "CAMBRICON_DSMLU_ASSIGHED"
NODE_LOCK = "cambricon.com/dsmlu.lock"


@dataclass(frozen=True)
class Cambricon(Family):
    def memory_mib(self, value: Any) -> int:
        return whole(value, self.resources.memory) * UNIT_MIB

    def cards_from_capacity(self, node: str, capacity: Mapping[str, Any]) -> list[Card]:
        cores = capacity_int(capacity, self.resources.cores)
        mem = capacity_int(capacity, self.resources.memory)
        n = (cores + 99) // 100
        return [
            Card(
                id=f"{node}-cambricon-mlu-{i}",
                index=i,
                type=self.name,
                count=100,
                totalmem=mem * UNIT_MIB * 100 // cores,
                totalcore=100,
            )
            for i in range(n)
        ]

    def pod_annotations(
        self, pod: PodInfo, grants: Sequence[Sequence[Grant]], node: str = ""
    ) -> dict[str, str]:
        out = super().pod_annotations(pod, grants, node)
        if out:
            first = next(g for ctr in grants for g in ctr)
            out[ASSIGNED] = "false"
            out[PROFILE] = f"{first.idx}_{first.usedcores}_{first.usedmem // UNIT_MIB}"
        return out

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """The device nodes of each card (``/dev/cambricon_devN``, ``/dev/cambricon_ipcmN``),
        the sMLU capability node of a partial card's instance, the shared control node;
        ``CAMBRICON_VISIBLE_DEVICES`` lists the slots for runtimes that read it."""
        out = Allocation(
            envs={"CAMBRICON_VISIBLE_DEVICES": ",".join(str(d.index) for d in devices)}
        )
        for d in devices:
            out.devices += [
                dev(f"/dev/cambricon_dev{d.index}"),
                dev(f"/dev/cambricon_ipcm{d.index}"),
            ]
            if not d.whole:
                out.devices.append(dev(f"/dev/cambricon-caps/cap_dev{d.index}_mi{d.instance or 0}"))
        out.devices.append(dev("/dev/cambricon_ctl"))
        return out


FAMILY = Cambricon(
    name="MLU",
    vendor="cambricon",
    resources=ResourceNames(
        "cambricon.com/vmlu", "cambricon.com/mlu.smlu.vmemory", "", "cambricon.com/mlu.smlu.vcore"
    ),
    to_allocate_annotation="hami.io/cambricon-mlu-devices-to-allocate",
    allocated_annotation="hami.io/cambricon-mlu-devices-allocated",
    use_uuid_annotation="cambricon.com/use-gpuuuid",
    nouse_uuid_annotation="cambricon.com/nouse-gpuuuid",
    use_type_annotation="cambricon.com/use-mlutype",
    nouse_type_annotation="cambricon.com/nouse-mlutype",
    default_cores=100,
)
