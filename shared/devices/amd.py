"""AMD Instinct/Radeon: HAMi's ``pkg/device/amd`` with Project-HAMi's amd-device-plugin.

``amd.com/gpu``, ``amd.com/gpumem`` (MiB), ``amd.com/gpumem-percentage`` and
``amd.com/gpucores`` (a percentage of the card's compute units). The node registers
``hami.io/node-amd-register`` with ``devcore`` = the card's CU count, so the fit books
``devcore * cores / 100`` CUs; no cores and no memory means the whole card. ``Allocate``
follows the plugin: KFD and DRM nodes, ``ROCR_VISIBLE_DEVICES``, per-card
``HIP_DEVICE_MEMORY_LIMIT_<i>`` and the ``libamvgpu.so`` audit hook for slices.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from shared.devices.base import (
    AllocateContext,
    Allocated,
    Allocation,
    Ask,
    Card,
    Family,
    FitResult,
    Mount,
    PodInfo,
    RequestError,
    ResourceNames,
    dev,
    exact,
    go_json,
    quantity,
    whole,
)

HOOK = "/usr/local/vgpu/libamvgpu.so"
CU_ALLOCATED = "hami.io/amd-cu-allocated"  # the CUs each card's grant holds (JSON)


def pick_cus(d: Allocated, busy: frozenset[int] = frozenset()) -> list[int]:
    """The CUs a grant gets on its card: the lowest ones no other container holds (the
    grant's cores are CUs; none or all of them: every CU of the card). Fewer than asked
    only when the card's free CUs are fewer (placement booked them, so a restarted
    agent that lost what it handed out is the one way there)."""
    total = d.card_cores or d.cores
    if not 0 < d.cores < total:
        return list(range(max(total, 1)))
    free = [c for c in range(total) if c not in busy]
    return free[: d.cores] if len(free) >= d.cores else list(range(d.cores))


def id_list(cus: list[int]) -> str:
    """CU IDs as ``HSA_CU_MASK`` writes them: ranges ``a-b`` and single IDs, by commas."""
    out: list[str] = []
    start = prev = -2
    for c in sorted(cus):
        if c != prev + 1:
            if start >= 0:
                out.append(f"{start}-{prev}" if prev > start else str(start))
            start = c
        prev = c
    if start >= 0:
        out.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(out)


def parse_id_list(text: str) -> frozenset[int]:
    """The CU IDs of an :func:`id_list` text; ValueError on anything else."""
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def cus_held(annotations: Mapping[str, str]) -> dict[str, frozenset[int]]:
    """Card uuid -> CUs, from an answer's ``hami.io/amd-cu-allocated`` ({} without one)."""
    raw = annotations.get(CU_ALLOCATED)
    if not raw:
        return {}
    return {str(u): parse_id_list(str(v)) for u, v in json.loads(raw).items()}


def percentage(value: Any, name: str, low: int, why: str) -> int:
    """A whole percentage in ``low..100``; anything else is a :class:`RequestError`."""
    try:
        q = exact(value, name)
    except RequestError:
        raise RequestError(f"{name} {why}, got {value!r}") from None
    if q.denominator != 1 or not low <= q <= 100:
        raise RequestError(f"{name} {why}, got {value!r}")
    return int(q)


@dataclass(frozen=True)
class Amd(Family):
    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        """HAMi's AMD request: a core share omitted is the whole card's CUs (100); a core
        share must be a whole 1..100 and a memory percentage a whole 0..100 (0: none)."""
        r = self.resources
        raw = quantity(resources, r.count)
        if raw is None:
            return None
        n = whole(raw, r.count)
        if n <= 0:
            return None
        mem = pct = 0
        if (m := quantity(resources, r.memory)) is not None:
            mem = whole(m, r.memory)
        if (p := quantity(resources, r.memory_percentage)) is not None:
            pct = percentage(p, r.memory_percentage, 0, "must be an integer between 0 and 100")
        cores = 100
        if (c := quantity(resources, r.cores)) is not None:
            cores = percentage(
                c, r.cores, 1, "out of range: must be an integer percentage between 1 and 100"
            )
        if mem > 0:
            pct = 0
        elif pct == 0:
            pct = 100
        return Ask(self.name, n, mem, pct, cores)

    def type_ok(self, card: Card, ask: Ask, pod: PodInfo) -> bool:
        """HAMi's ``checkAMDType``: members are trimmed and blank ones ignored; a blank
        annotation filters nothing, a use list of only blanks admits no card."""
        if ask.family != self.name:
            return False
        ctype = card.type.upper()
        for name, use in ((self.use_type_annotation, True), (self.nouse_type_annotation, False)):
            value = pod.annotations.get(name, "").strip()
            if not value:
                continue
            hit = any(t.strip().upper() in ctype for t in value.split(",") if t.strip())
            return hit if use else not hit
        return True

    def fit(self, cards: Sequence[Card], ask: Ask, pod: PodInfo) -> FitResult:
        # neither MiB nor a percentage: the whole card, and with it all its CUs
        if ask.memreq == 0 and ask.mem_percent == 0:
            ask = replace(ask, mem_percent=100, coresreq=ask.coresreq or 100)
        return super().fit(cards, ask, pod)

    def memreq_on(self, card: Card, ask: Ask) -> int:
        if ask.memreq > 0:
            return ask.memreq
        # a positive percentage books at least 1 MiB, however small the card
        return max(1, card.totalmem * ask.mem_percent // 100) if ask.mem_percent > 0 else 0

    def cores_on(self, card: Card, cores: int) -> int:
        """The CUs a share books: at least one for a positive share, rounded up to whole
        WGPs where the register names ``cuPerWGP`` (RDNA), never more than the card has."""
        if cores <= 0:
            return 0
        cus = max(1, card.totalcore * cores // 100)
        wgp = card.custom.get("cuPerWGP")
        if (
            isinstance(wgp, (int, float))
            and not isinstance(wgp, bool)
            and wgp == int(wgp)
            and wgp > 1
        ):
            step = int(wgp)
            cus = min(card.totalcore, -(-cus // step) * step)
        return cus

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """amd-device-plugin's answer: ``/dev/kfd`` and the cards' DRM nodes; the cards'
        ROCr IDs in ``ROCR_VISIBLE_DEVICES`` and their container-local indexes in
        ``HIP_VISIBLE_DEVICES``; ``HSA_CU_MASK`` with each card's granted CUs (all of a
        whole card; a slice gets the lowest CUs ``ctx.busy_cus`` leaves free, and the
        response's ``hami.io/amd-cu-allocated`` says which, as HAMi's pod annotation
        does); a partial grant adds the LD_AUDIT memory limiter with the first card's
        memory. The limiter library is always mounted."""
        ctx = ctx or AllocateContext()
        out = Allocation(devices=[dev("/dev/kfd")])
        for d in devices:
            out.devices += [dev(f"/dev/dri/card{d.index}"), dev(f"/dev/dri/renderD{128 + d.index}")]
        if devices:
            picked = [pick_cus(d, ctx.busy_cus.get(d.uuid, frozenset())) for d in devices]
            out.annotations[CU_ALLOCATED] = go_json(
                {d.uuid: id_list(cus) for d, cus in zip(devices, picked, strict=True)}
            )
            out.envs["HSA_CU_MASK"] = ";".join(f"{i}:{id_list(c)}" for i, c in enumerate(picked))
            out.envs["ROCR_VISIBLE_DEVICES"] = ",".join(d.local_id or d.uuid for d in devices)
            out.envs["HIP_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(devices)))
            if not all(d.whole for d in devices):
                out.envs["HIP_DEVICE_MEMORY_LIMIT"] = f"{devices[0].mem}m"
                out.envs["LD_AUDIT"] = HOOK
        out.mounts.append(Mount(f"{ctx.hook_path or '/usr/local'}/vgpu/libamvgpu.so", HOOK))
        return out


FAMILY = Amd(
    name="AMDGPU",
    vendor="amd",
    resources=ResourceNames(
        "amd.com/gpu", "amd.com/gpumem", "amd.com/gpumem-percentage", "amd.com/gpucores"
    ),
    register_annotation="hami.io/node-amd-register",
    handshake_annotation="hami.io/node-handshake-amd",
    to_allocate_annotation="hami.io/amd-devices-to-allocate",
    allocated_annotation="hami.io/amd-devices-allocated",
    use_uuid_annotation="amd.com/use-gpu-uuid",
    nouse_uuid_annotation="amd.com/nouse-gpu-uuid",
    use_type_annotation="amd.com/use-gputype",
    nouse_type_annotation="amd.com/nouse-gputype",
    check_health=True,
)
