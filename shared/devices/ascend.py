"""Huawei Ascend NPU: HAMi's ``pkg/device/ascend``, one family per chip (commonWord).

Memory rounds up to the smallest vNPU template that holds it (the chip's template table
from HAMi's device config); above the largest template, up to the chip's capacity, it is
the whole card's allocatable memory; beyond that it is refused. More than one card means
whole cards (no vNPU). 910C is allocated in modules of two: 1 becomes 2, other odd
counts are refused. With ``huawei.com/vnpu-mode: hami-core`` (soft limits) memory is
taken as asked. HAMi writes the chosen template per card in ``huawei.com/<chip>``.

Soft mode (hami-vnpu-core) is a node's choice: its plugin writes the node annotation
``hami-vnpu-core: true`` (and devcore 100). :meth:`Ascend.node_cards` marks that node's
cards (:data:`SOFT_NODE` in their ``custom``) and counts each card as 100 % of cores
(HAMi's ``hamiCorePercentBudget``: a devcore of 100 or less becomes 100). The fit then
follows HAMi's ``Fit``: a ``hami-core`` pod fits only on a soft node and a ``template``
pod only on a hard one (else ``ModeNotFit``, one count over all the cards offered); a
pod naming no mode fits either; a ``hami-core`` pod's card has 100 cores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shared.devices.base import (
    CARD_MODE,
    Admitted,
    AllocateContext,
    Allocated,
    Allocation,
    Ask,
    Card,
    Family,
    FitResult,
    Grant,
    Mount,
    PodInfo,
    RequestError,
    ResourceNames,
    go_json,
    quantity,
    whole,
    with_limits,
)

VNPU_MODE = "huawei.com/vnpu-mode"
HAMI_CORE = "hami-core"
TEMPLATE = "template"  # HAMi's VNPUModeTemplate: hard split asked explicitly
# The node annotation ascend-device-plugin writes ("true"/"false", register.go), and the
# mark node_cards leaves in each card's custom on a node that says "true".
SOFT_NODE = "hami-vnpu-core"
MODE_NOT_FIT = "ModeNotFit"  # HAMi's common.ModeNotFit
SOFT_CORES = 100  # a soft-mode card's core budget, in percent (HAMi's hamiCorePercentBase)


def soft_node(annotations: Mapping[str, str]) -> bool:
    """HAMi's ``nodeSupportsHamiCore`` with its global ``hamiVnpuCore`` at the chart's
    default (false): the node's ``hami-vnpu-core`` annotation says ``true``."""
    return annotations.get(SOFT_NODE) == "true"


def cards_soft(cards: Sequence[Card]) -> bool:
    """Whether these cards are on a soft-mode node: marked by :meth:`Ascend.node_cards`
    (from the node's annotation), or registered in that mode (placement's cards, from
    the agent's inventory: ``node.ascendSoftMode``)."""
    return bool(cards) and all(
        c.custom.get(SOFT_NODE) == "true" or c.custom.get(CARD_MODE) == SOFT_NODE for c in cards
    )


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    memory: int  # MiB
    ai_core: int


@dataclass(frozen=True)
class Ascend(Family):
    fit_annotations: tuple[str, ...] = (VNPU_MODE,)
    memory_allocatable: int = 0
    memory_capacity: int = 0
    ai_core: int = 0
    memory_factor: int = 1
    templates: tuple[Template, ...] = field(default_factory=tuple)  # sorted by memory

    def trim(self, mib: int) -> tuple[int, str]:
        """HAMi's ``trimMemory``: (MiB, template name); (0, "") when nothing holds it."""
        for t in self.templates:
            if mib <= t.memory:
                return t.memory, t.name
        if mib <= self.memory_capacity:
            return self.memory_allocatable, ""
        return 0, ""

    def admit(self, resources: Mapping[str, Any], annotations: Mapping[str, str]) -> Admitted:
        r = self.resources
        n = whole((resources.get("limits") or {}).get(r.count, 0), r.count)
        out = with_limits(resources)
        if self.name == "Ascend910C":
            if n == 1:
                n = 2  # the smallest unit is one module of two NPUs
                out["limits"][r.count] = 2
                if r.count in out["requests"]:
                    out["requests"][r.count] = 2
            elif n % 2:
                raise RequestError(f"Ascend910C device request must be 1 or 2*n, got {n}")
        hami_core = annotations.get(VNPU_MODE) == HAMI_CORE
        trimmed = self.memory_allocatable
        mem = (resources.get("limits") or {}).get(r.memory)
        if mem is not None:
            m = whole(mem, r.memory)
            if hami_core:
                trimmed = m
            else:
                trimmed, _ = self.trim(m)
                if trimmed <= 0:
                    raise RequestError(f"{r.memory} {m} is invalid")
        if n > 1 and trimmed != self.memory_allocatable:
            raise RequestError("vNPU nor supported for multiple devices")  # HAMi's text
        out["limits"][r.memory] = trimmed
        out["requests"][r.memory] = trimmed
        return Admitted(out, {})

    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        r = self.resources
        raw = quantity(resources, r.count)
        if raw is None:
            return None
        n = whole(raw, r.count)
        if n <= 0:
            return None
        mem = 0
        core_asked = r.cores and quantity(resources, r.cores) is not None
        if (m := quantity(resources, r.memory)) is not None:
            mib = whole(m, r.memory) * max(1, self.memory_factor)
            # a core ask means soft partitioning: memory as asked
            mem = mib if core_asked else self.trim(mib)[0]
        cores = whole(quantity(resources, r.cores), r.cores) if core_asked else 0
        return Ask(self.name, n, mem, 100 if mem == 0 else 0, cores)

    def node_cards(
        self, node: str, annotations: Mapping[str, str], capacity: Mapping[str, Any]
    ) -> list[Card]:
        """The register annotation's cards; on a soft-mode node each is marked and gets
        at least 100 cores (above 100 is kept: an operator's deliberate oversell)."""
        cards = super().node_cards(node, annotations, capacity)
        if not soft_node(annotations):
            return cards
        return [
            replace(
                c,
                totalcore=max(c.totalcore, SOFT_CORES),
                # CARD_MODE: the mode the inventory records for the card (kube_nodes)
                custom={**c.custom, SOFT_NODE: "true", CARD_MODE: SOFT_NODE},
            )
            for c in cards
        ]

    def fit(self, cards: Sequence[Card], ask: Ask, pod: PodInfo) -> FitResult:
        """HAMi's mode gate before its common fit: soft pods on soft nodes, template pods
        on hard ones; a soft pod counts each card as 100 % of cores."""
        mode = pod.annotations.get(VNPU_MODE, "")
        soft = cards_soft(cards)
        if (mode == HAMI_CORE and not soft) or (mode == TEMPLATE and soft):
            return FitResult(False, [], {MODE_NOT_FIT: 1}, len(cards))
        if mode == HAMI_CORE:
            cards = [replace(c, totalcore=SOFT_CORES) for c in cards]
        return super().fit(cards, ask, pod)

    def pod_annotations(
        self, pod: PodInfo, grants: Sequence[Sequence[Grant]], node: str = ""
    ) -> dict[str, str]:
        out = super().pod_annotations(pod, grants, node)
        if out:
            hami_core = pod.annotations.get(VNPU_MODE) == HAMI_CORE
            info: list[dict[str, Any]] = []
            for ctr in grants:
                for g in ctr:
                    if hami_core:
                        d: dict[str, Any] = {"UUID": g.uuid}
                        if g.usedmem:
                            d["memory"] = g.usedmem
                        if g.usedcores:
                            d["core"] = g.usedcores
                    else:
                        d = {"UUID": g.uuid}
                        name = self.trim(g.usedmem)[1]
                        if name:
                            d["temp"] = name
                    info.append(d)
            out[f"huawei.com/{self.name}"] = go_json(info)
        return out

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """ascend-device-plugin's answer: ``ASCEND_VISIBLE_DEVICES`` (the physical IDs);
        one partial card in hard mode gets its vNPU template in ``ASCEND_VNPU_SPECS``
        (the Ascend runtime creates the vNPU); soft mode (``huawei.com/vnpu-mode:
        hami-core``) mounts the hami-vnpu-core limiter and sets its quotas instead."""
        ctx = ctx or AllocateContext()
        out = Allocation(envs={"ASCEND_VISIBLE_DEVICES": ",".join(str(d.index) for d in devices)})
        if ctx.annotations.get(VNPU_MODE) == HAMI_CORE and devices:
            d = devices[0]
            hook = ctx.hook_path or "/usr/local/hami"
            out.envs.update(
                {
                    "NPU_MEM_QUOTA": str(d.mem),
                    "NPU_PRIORITY": str(d.cores),
                    "NPU_GLOBAL_SHM_PATH": f"/hami-shared-region/{d.index}_global_registry",
                    "NPU_LOCAL_SHM_PATH": "/hami-vnpu-shmem/vnpu_local_shmem",
                }
            )
            driver = "/usr/local/Ascend/driver"
            out.mounts = [
                Mount("/usr/local/bin/npu-smi", "/usr/local/bin/npu-smi"),
                Mount("/etc/ascend_install.info", "/etc/ascend_install.info"),
                Mount(f"{driver}/lib64", f"{driver}/lib64"),
                Mount(f"{driver}/version.info", f"{driver}/version.info"),
                Mount("/usr/local/hami-vnpu-core", "/hami-vnpu-core"),
                Mount("/usr/local/hami-vnpu-core/ld.so.preload", "/etc/ld.so.preload"),
                Mount("/usr/local/hami-shared-region", "/hami-shared-region", read_only=False),
                Mount(
                    f"{hook}/containers/{ctx.pod_uid}_{ctx.container}",
                    "/hami-vnpu-shmem",
                    read_only=False,
                ),
            ]
            return out
        if len(devices) == 1 and not devices[0].whole:
            name = devices[0].template or self.trim(devices[0].mem)[1]
            if name:
                out.envs["ASCEND_VNPU_SPECS"] = name
        return out


def family(
    chip: str, allocatable: int, capacity: int, ai_core: int, templates: Sequence[Template]
) -> Ascend:
    return Ascend(
        name=chip,
        vendor="ascend",
        resources=ResourceNames(
            f"huawei.com/{chip}", f"huawei.com/{chip}-memory", "", f"huawei.com/{chip}-core"
        ),
        register_annotation=f"hami.io/node-register-{chip}",
        handshake_annotation=f"hami.io/node-handshake-{chip}",
        to_allocate_annotation=f"hami.io/{chip}-devices-to-allocate",
        allocated_annotation=f"hami.io/{chip}-devices-allocated",
        use_uuid_annotation=f"hami.io/use-{chip}-uuid",
        nouse_uuid_annotation=f"hami.io/no-use-{chip}-uuid",
        memory_allocatable=allocatable,
        memory_capacity=capacity,
        ai_core=ai_core,
        templates=tuple(sorted(templates, key=lambda t: t.memory)),
    )


T = Template
# HAMi's default device config (charts/hami device-configmap "vnpus").
FAMILIES = (
    family(
        "Ascend910A",
        32768,
        32768,
        30,
        [T("vir02", 2184, 2), T("vir04", 4369, 4), T("vir08", 8738, 8), T("vir16", 17476, 16)],
    ),
    family(
        "Ascend910B2",
        65536,
        65536,
        24,
        [T("vir03_1c_8g", 8192, 3), T("vir06_1c_16g", 16384, 6), T("vir12_3c_32g", 32768, 12)],
    ),
    family(
        "Ascend910B3", 65536, 65536, 20, [T("vir05_1c_16g", 16384, 5), T("vir10_3c_32g", 32768, 10)]
    ),
    family(
        "Ascend910B4-1",
        65536,
        65536,
        20,
        [T("vir05_1c_16g", 16384, 5), T("vir10_3c_32g", 32768, 10)],
    ),
    family(
        "Ascend910B4", 32768, 32768, 20, [T("vir05_1c_8g", 8192, 5), T("vir10_3c_16g", 16384, 10)]
    ),
    family(
        "Ascend310P",
        21527,
        24576,
        8,
        [T("vir01", 3072, 1), T("vir02", 6144, 2), T("vir04", 12288, 4)],
    ),
    family(
        "Ascend910C", 65536, 65536, 20, [T("vir05_1c_16g", 16384, 5), T("vir10_3c_32g", 32768, 10)]
    ),
)
