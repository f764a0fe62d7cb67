"""AWS Neuron: HAMi's ``pkg/device/awsneuron``: NeuronCore granularity, no memory.

``aws.amazon.com/neuron: N`` asks for N whole devices (all their cores);
``aws.amazon.com/neuroncore: C`` asks for C cores: at most one device's worth on one
device, or a multiple of a device's cores as whole devices. A card's cores are a bitmask
(``devcore``); several devices must be contiguous and free (on Trn, aligned runs of 1, 4,
8 or 16; on Inf, any contiguous run), else ``NumaNotFit``. HAMi writes
``AWS_NEURON_IDS`` (device indexes, or core indexes for a core ask, every container's
joined) for the AWS plugin. Counts are whole and positive: at most 2^31-1 devices and
2 x (2^31-1) cores, HAMi's bounds and texts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.devices.base import (
    CARD_INSUFFICIENT_CORE,
    CARD_NOT_HEALTH,
    CARD_TIME_SLICING_EXHAUSTED,
    CARD_TYPE_MISMATCH,
    CARD_UUID_MISMATCH,
    EXCLUSIVE_DEVICE_ALLOCATE_CONFLICT,
    NUMA_NOT_FIT,
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
    capacity_int,
    dev,
    encode_pod_single_device,
    quantity,
)
from shared.hami.quantity import QuantityError, parse_quantity

NODE_TYPE = "AWSNodeType"
IDS = "AWS_NEURON_IDS"
RESOURCE_TYPE = "NEURON_RESOURCE_TYPE"
ALLOCATED = "NEURON_ALLOCATED"
PREDICATE_NODE = "aws.amazon.com/predicate-node"
MAX_DEVICES = (1 << 31) - 1  # HAMi's maxAWSNeuronDeviceCount (math.MaxInt32)
MAX_CORES = MAX_DEVICES * 2  # HAMi's maxAWSNeuronCoreCount: devices x the default 2 cores


def count(value: Any, name: str, cap: int) -> int:
    """HAMi's ``validateResourceRequest``: a whole number in 1..``cap``, with its texts."""
    try:
        q = parse_quantity(value)
    except QuantityError:
        raise RequestError(f"{name} must be an integer") from None
    if q.denominator != 1:
        raise RequestError(f"{name} must be an integer")
    if q <= 0:
        raise RequestError(f"{name} must be greater than 0")
    if q > cap:
        raise RequestError(f"{name} must not exceed {cap}")
    return int(q)


def popcount(mask: int) -> int:
    return bin(mask).count("1") if mask > 0 else 0


@dataclass(frozen=True)
class Neuron(Family):
    cores_per_device: int = 2  # Inf2/Trn1; the node's capacity ratio when known (Inf1: 4)

    def asks_for(self, resources: Mapping[str, Any]) -> bool:
        return any(
            quantity(resources, n) is not None for n in (self.resources.count, self.resources.cores)
        )

    def split(self, cores: int) -> tuple[int, int]:
        """HAMi's ``splitCoreRequest``: (devices, cores per device)."""
        cpd = self.cores_per_device
        name = self.resources.cores
        if cores <= cpd:
            return 1, cores
        if cores % cpd:
            raise RequestError(f"{name} must be 1 or a multiple of {cpd}, got {cores}")
        nums = cores // cpd
        if nums > MAX_DEVICES:
            raise RequestError(
                f"{name} needs {nums} devices, which exceeds the maximum of {MAX_DEVICES}"
            )
        return nums, cpd

    def ask(self, resources: Mapping[str, Any]) -> Ask | None:
        """The ask, or :class:`RequestError` with HAMi's text: the device count wins
        over the core count when a container names both."""
        r = self.resources
        if (v := quantity(resources, r.count)) is not None:
            n = count(v, r.count, MAX_DEVICES)
            return Ask(self.name, n, 0, 0, self.cores_per_device, whole=True)
        if (c := quantity(resources, r.cores)) is not None:
            nums, per = self.split(count(c, r.cores, MAX_CORES))
            return Ask(self.name, nums, 0, 0, per)
        return None

    def admit(self, resources: Mapping[str, Any], annotations: Mapping[str, str]) -> Admitted:
        """HAMi's ``MutateAdmission``: refuses what :meth:`ask` refuses."""
        self.ask(resources)
        return Admitted(resources, {})

    def generate(self, resources: Mapping[str, Any]) -> Ask | None:
        """HAMi's ``GenerateResourceRequests``: an invalid ask (admission bypassed) is no
        ask at all rather than an error."""
        try:
            return self.ask(resources)
        except RequestError:
            return None

    def fit(self, cards: Sequence[Card], ask: Ask, pod: PodInfo) -> FitResult:
        if ask.nums > 1:
            pick = graph_select(cards, ask.nums)
            if not pick:
                return FitResult(False, [], {NUMA_NOT_FIT: 1}, len(cards))
            return FitResult(
                True,
                [
                    Grant(
                        cards[i].index,
                        cards[i].id,
                        ask.family,
                        cards[i].totalmem,
                        cards[i].totalcore,
                        {"mask": cards[i].totalcore, "whole": True},
                    )
                    for i in pick
                ],
                {},
                len(cards),
            )
        reasons: dict[str, int] = {}
        chosen: list[Grant] = []

        def no(r: str) -> None:
            reasons[r] = reasons.get(r, 0) + 1

        for card in reversed(cards):
            if not card.health:
                no(CARD_NOT_HEALTH)
                continue
            if ask.family not in card.type or ask.family != self.name:
                no(CARD_TYPE_MISMATCH)
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
            if popcount(card.totalcore) - popcount(card.usedcores) < ask.coresreq:
                no(CARD_INSUFFICIENT_CORE)
                continue
            mask = free_bits(card.usedcores, ask.coresreq, self.cores_per_device)
            chosen.append(
                Grant(card.index, card.id, ask.family, 0, mask, {"mask": mask, "whole": ask.whole})
            )
            return FitResult(True, chosen, {}, len(cards))
        return FitResult(False, chosen, reasons, len(cards))

    def cards_from_capacity(
        self, node: str, capacity: Mapping[str, Any], instance_type: str = ""
    ) -> list[Card]:
        count = capacity_int(capacity, self.resources.count)
        if count == 0:
            raise RequestError(f"device not found {self.resources.count}")
        cores = capacity_int(capacity, self.resources.cores)
        cpd = cores // count if cores else self.cores_per_device
        mask = (1 << cpd) - 1
        return [
            Card(
                id=f"{node}-AWSNeuron-{i}",
                index=i,
                type=self.name,
                count=cpd,
                totalmem=0,
                totalcore=mask,
                custom={NODE_TYPE: instance_type},
            )
            for i in range(count)
        ]

    def pod_annotations(
        self, pod: PodInfo, grants: Sequence[Sequence[Grant]], node: str = ""
    ) -> dict[str, str]:
        out: dict[str, str] = {}
        if not any(grants):
            return out
        out[self.allocated_annotation] = encode_pod_single_device(grants)
        ids: list[str] = []  # HAMi joins every container's, in container order
        for ctr in grants:
            for g in ctr:
                if g.custom and g.custom.get("whole"):
                    ids.append(str(g.idx))
                else:
                    ids += [
                        str(self.cores_per_device * g.idx + b)
                        for b in range(self.cores_per_device)
                        if g.usedcores & (1 << b)
                    ]
                    out[RESOURCE_TYPE] = self.resources.cores
            if ids:
                out[IDS] = ",".join(ids)
                out[ALLOCATED] = "false"
                out[PREDICATE_NODE] = node
        return out

    def allocate(
        self, devices: Sequence[Allocated], ctx: AllocateContext | None = None
    ) -> Allocation:
        """``/dev/neuron<N>`` of each device and ``NEURON_RT_VISIBLE_CORES``: the node-wide
        index of every core whose bit the grant holds (0: every core of the device)."""
        per = self.cores_per_device
        out = Allocation(devices=[dev(f"/dev/neuron{d.index}") for d in devices])
        cores = [
            str(per * d.index + b)
            for d in devices
            for b in range(per)
            if d.cores == 0 or d.cores & (1 << b)
        ]
        out.envs["NEURON_RT_VISIBLE_CORES"] = ",".join(cores)
        return out


def free_bits(used: int, need: int, width: int) -> int:
    """HAMi's ``addCoreUsage``: the lowest ``need`` free core bits, as a mask of those bits."""
    out = 0
    for bit in range(width):
        if need == 0:
            break
        if not used & (1 << bit):
            out |= 1 << bit
            need -= 1
    return out


def graph_select(cards: Sequence[Card], count: int) -> list[int]:
    """HAMi's ``graphSelect``: positions of ``count`` contiguous free healthy cards."""
    if not cards or NODE_TYPE not in cards[0].custom:
        return []
    kind = str(cards[0].custom[NODE_TYPE])
    inf = "inf" in kind or "Inf" in kind  # HAMi's test, case and all
    if not inf and count not in (1, 4, 8, 16):
        return []
    step = 1 if inf else count
    for start in range(0, len(cards), step):
        run = list(range(start, start + count))
        if run[-1] < len(cards) and all(cards[i].used == 0 and cards[i].health for i in run):
            return run
    return []


FAMILY = Neuron(
    name="AWSNeuron",
    vendor="aws-neuron",
    resources=ResourceNames("aws.amazon.com/neuron", cores="aws.amazon.com/neuroncore"),
    allocated_annotation="hami.io/aws-neuron-devices-allocated",
    use_uuid_annotation="aws.amazon.com/use-neuron-uuid",
    nouse_uuid_annotation="aws.amazon.com/nouse-neuron-uuid",
    shares_memory=False,
)
