"""MetaX sGPU: HAMi's ``pkg/device/metax`` (the sGPU half; whole GPUs are capacity only).

``metax-tech.com/vmemory`` is GiB when written without a unit (``4`` is 4096 MiB) and
bytes when written with one (``4Gi``); cores default to 100. A card runs one QoS policy
(``best-effort``, ``fixed-share``, ``burst-share``, pod annotation
``metax-tech.com/sgpu-qos-policy``, set to ``best-effort`` by the webhook when absent):
a busy card takes only pods of its policy, unless the pod wants the card exclusively
(100 cores). ``online``/``offline`` app classes (``metax-tech.com/sgpu-app-class``) do not
mix with plain pods. The node registers ``metax-tech.com/node-gpu-devices``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    ALLOCATED_CARDS_INSUFFICIENT_REQUEST,
    CARD_COMPUTE_UNITS_EXHAUSTED,
    CARD_INSUFFICIENT_CORE,
    CARD_INSUFFICIENT_MEMORY,
    CARD_TIME_SLICING_EXHAUSTED,
    CARD_TYPE_MISMATCH,
    CARD_UUID_MISMATCH,
    EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT,
    Admitted,
    AllocateContext,
    Allocated,
    Allocation,
    Ask,
    Card,
    Family,
    FitResult,
    Grant,
    PodInfo,
    RequestError,
    ResourceNames,
    exact,
    go_json,
    whole,
)

QOS_POLICY = "metax-tech.com/sgpu-qos-policy"
APP_CLASS = "metax-tech.com/sgpu-app-class"
ALLOCATED_SDEVICES = "metax-tech.com/gpu-devices-allocated"
BEST_EFFORT, FIXED_SHARE, BURST_SHARE = "best-effort", "fixed-share", "burst-share"
QOS_POLICIES = (BEST_EFFORT, FIXED_SHARE, BURST_SHARE)
ONLINE, OFFLINE = "online", "offline"
CARD_UNHEALTHY = "CardUnhealthy"
CARD_QOS_POLICY_MISMATCH = "CardQosPolicyMismatch"
CARD_APP_CLASS_MISMATCH = "CardAppClassMismatch"
GIB_MIB = 1024


def qos_ok(req_qos: str, card: Card, ask: Ask) -> bool:
    """HAMi's ``checkDeviceQos``: an idle card takes any policy, an exclusive ask any card."""
    if card.used == 0 or ask.coresreq == 100:
        return True
    dev_qos = str(card.custom.get("QosPolicy") or "")
    return dev_qos in ("", req_qos)


def app_class_ok(req_class: str, card: Card) -> bool:
    """HAMi's ``checkAppClass``; ``custom["AppClasses"]`` lists the classes of the card's pods."""
    if card.used == 0:
        return True
    classes = card.custom.get("AppClasses") or []
    dev_online, dev_offline = ONLINE in classes, OFFLINE in classes
    if (dev_online or dev_offline) == (req_class in (ONLINE, OFFLINE)):
        return not (dev_online and req_class == OFFLINE)
    return False


@dataclass(frozen=True)
class Metax(Family):
    def asks_for(self, resources: Mapping[str, Any]) -> bool:
        return self.resources.count in (resources.get("limits") or {})  # limits only, as HAMi

    def admit(self, resources: Mapping[str, Any], annotations: Mapping[str, str]) -> Admitted:
        count = whole((resources.get("limits") or {})[self.resources.count], self.resources.count)
        app = annotations.get(APP_CLASS)
        if app is not None:
            if app not in (ONLINE, OFFLINE):
                raise RequestError(f"{APP_CLASS} must be set one of [{ONLINE}, {OFFLINE}]")
            if count != 1:
                raise RequestError("app-class pod must request single device")
        if app != ONLINE:
            qos = annotations.get(QOS_POLICY)
            if qos is None:
                return Admitted(resources, {QOS_POLICY: BEST_EFFORT})
            if qos not in QOS_POLICIES:
                raise RequestError(f"{QOS_POLICY} must be set one of [{', '.join(QOS_POLICIES)}]")
        return Admitted(resources, {})

    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        r = self.resources
        lim = resources.get("limits") or {}
        if r.count not in lim:
            return None
        count = whole(lim[r.count], r.count)
        if count <= 0:
            return None
        core = 100
        if r.cores in lim:
            core = whole(lim[r.cores], r.cores)
        mem = 0
        if r.memory in lim:
            v = lim[r.memory]
            has_unit = isinstance(v, str) and any(ch.isalpha() for ch in v)
            if has_unit:
                mem = int(exact(v, r.memory)) // 1024 // 1024
            else:
                n = whole(v, r.memory)
                if n > ((1 << 31) - 1) // GIB_MIB:
                    raise RequestError(f"{r.memory} is out of range, got {v!r}")
                mem = n * GIB_MIB
        return Ask(self.name, count, mem, 100 if mem == 0 else 0, core)

    def fit(self, cards: Sequence[Card], ask: Ask, pod: PodInfo) -> FitResult:
        """HAMi's sGPU ``Fit``: candidates first, then the first ``nums`` of them."""
        reasons: dict[str, int] = {}
        app = pod.annotations.get(APP_CLASS, "")
        req_qos = pod.annotations.get(QOS_POLICY, "")
        cand: list[Card] = []

        def no(reason: str) -> None:
            reasons[reason] = reasons.get(reason, 0) + 1

        for card in reversed(cards):
            if ask.family != self.name:
                no(CARD_TYPE_MISMATCH)
                continue
            if not card.health:
                no(CARD_UNHEALTHY)
                continue
            if not app_class_ok(app, card):
                no(CARD_APP_CLASS_MISMATCH)
                continue
            if app != ONLINE and not qos_ok(req_qos, card, ask):
                no(CARD_QOS_POLICY_MISMATCH)
                continue
            if not self.uuid_ok(card, pod):
                no(CARD_UUID_MISMATCH)
                continue
            if card.count <= card.used:
                no(CARD_TIME_SLICING_EXHAUSTED)
                continue
            if pod.mutex and card.used > 0:
                no(EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT)
                continue
            if card.totalmem - card.usedmem < self.memreq_on(card, ask):
                no(CARD_INSUFFICIENT_MEMORY)
                continue
            if app != ONLINE:
                if card.totalcore - card.usedcores < ask.coresreq:
                    no(CARD_INSUFFICIENT_CORE)
                    continue
                if card.totalcore == 100 and ask.coresreq == 100 and card.used > 0:
                    no(EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT)
                    continue
                if card.totalcore != 0 and card.usedcores == card.totalcore and ask.coresreq == 0:
                    no(CARD_COMPUTE_UNITS_EXHAUSTED)
                    continue
            cand.append(card)
        if len(cand) < ask.nums:
            if cand:
                reasons[ALLOCATED_CARDS_INSUFFICIENT_REQUEST] = len(cand)
            return FitResult(False, [], reasons, len(cards))
        best = cand[: ask.nums]
        if len(cand) > ask.nums and app == "" and ask.coresreq == 100:
            best = prioritize_exclusive(cand, ask.nums)
        cores = 0 if app == ONLINE else ask.coresreq
        grants = [
            Grant(c.index, c.id, c.type, self.memreq_on(c, ask), cores, dict(c.custom))
            for c in best
        ]
        return FitResult(True, grants, {}, len(cards))

    def decode_register(self, value: str) -> list[Card]:
        try:
            raw = json.loads(value)
        except ValueError:
            raise RequestError(f"{self.register_annotation}: invalid JSON") from None
        if not isinstance(raw, list) or not raw:
            raise RequestError("no sdevice found on node")
        return [
            Card(
                id=str(d["uuid"]),
                index=i,
                type=self.name,
                count=int(d.get("totalDevCount", 0)),
                totalmem=int(d.get("totalVRam", 0)),
                totalcore=int(d.get("totalCompute", 0)),
                numa=int(d.get("numa", 0)),
                health=bool(d.get("healthy", False)),
                custom={
                    "QosPolicy": d.get("qosPolicy", ""),
                    "Model": d.get("model", ""),
                    "LinkZone": int(d.get("linkZone", 0)),
                },
            )
            for i, d in enumerate(raw)
        ]

    def pod_annotations(
        self, pod: PodInfo, grants: Sequence[Sequence[Grant]], node: str = ""
    ) -> dict[str, str]:
        out = super().pod_annotations(pod, grants, node)
        if out:

            def one(g: Grant) -> dict[str, Any]:
                d: dict[str, Any] = {"uuid": g.uuid}
                if g.usedcores:
                    d["compute"] = g.usedcores
                if g.usedmem:
                    d["vRam"] = g.usedmem
                return d

            out[ALLOCATED_SDEVICES] = go_json([[one(g) for g in ctr] for ctr in grants])
        return out

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """The vendor's operator answers itself (its response is not public); the env name
        seen in deployments is ``METAX_VISIBLE_DEVICES`` with card indexes."""
        return Allocation(envs={"METAX_VISIBLE_DEVICES": ",".join(str(d.index) for d in devices)})


def prioritize_exclusive(cand: list[Card], need: int) -> list[Card]:
    """HAMi's ``prioritizeExclusiveDevices``: whole cards within one MetaLink zone first."""
    zones: dict[int, list[Card]] = {}
    for c in cand:
        zones.setdefault(int(c.custom.get("LinkZone", 0)), []).append(c)
    linked = sorted((v for k, v in zones.items() if k > 0), key=len)
    other = [c for k, v in zones.items() if k <= 0 for c in v]
    for group in linked:
        if len(group) >= need:
            return group[:need]
    flat = [c for g in linked for c in g] + other
    return flat[:need] if len(flat) >= need else cand[:need]


FAMILY = Metax(
    name="Metax-SGPU",
    vendor="metax",
    resources=ResourceNames(
        "metax-tech.com/sgpu", "metax-tech.com/vmemory", "", "metax-tech.com/vcore"
    ),
    register_annotation="metax-tech.com/node-gpu-devices",
    to_allocate_annotation="hami.io/metax-sgpu-devices-to-allocate",
    allocated_annotation="hami.io/metax-sgpu-devices-allocated",
    use_uuid_annotation="metax-tech.com/use-gpuuuid",
    nouse_uuid_annotation="metax-tech.com/nouse-gpuuuid",
    default_cores=100,
)
