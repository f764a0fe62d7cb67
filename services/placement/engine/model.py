"""Request resolution, reason codes and decision results of the placement engine.

Pure data and small functions: how a HAMi device ask becomes concrete numbers (the
``defaultMemory`` / ``defaultCores`` / ``defaultGPUNum`` / ``memoryFactor`` rules, shared
with the Kubernetes codec through :func:`resolve_device_ask`), the reason vocabulary a
failed decision reports, and the :class:`Placement` / :class:`Failure` results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import NodeSettings
from shared.schemas import (
    AllocRequested,
    ContainerAsk,
    ContainerGrant,
    DeviceAsk,
    LedgerAlloc,
)

# ------------------------------------------------------------------------ reason codes
# Card-level codes, in the order HAMi checks them (REFERENCE §3); the first failing check
# of a card is its reason. The integer values index the per-card reason array, so their
# order matters: it is the check order.
OK = 0
CARD_NOT_HEALTH = 1
CARD_CORDONED = 2
CARD_TYPE_MISMATCH = 3
CARD_UUID_MISMATCH = 4
CARD_SLOTS = 5
CARD_MUTEX = 6
CARD_QUOTA = 7
CARD_MEMORY = 8
CARD_CORE = 9
CARD_EXCLUSIVE = 10
N_CARD_CODES = 11

CARD_REASONS: dict[int, str] = {
    CARD_NOT_HEALTH: "CardNotHealth",
    CARD_CORDONED: "CardCordoned",
    CARD_TYPE_MISMATCH: "CardTypeMismatch",
    CARD_UUID_MISMATCH: "CardUuidMismatch",
    CARD_SLOTS: "CardTimeSlicingExhausted",
    # mutex admits idle cards only; HAMi reports a busy card under this code
    CARD_MUTEX: "ExclusiveDeviceAllocateConflict",
    CARD_QUOTA: "ResourceQuotaNotFit",
    CARD_MEMORY: "CardInsufficientMemory",
    CARD_CORE: "CardInsufficientCore",
    CARD_EXCLUSIVE: "ExclusiveDeviceAllocateConflict",
}

# Node-level reasons. HAMi's own codes for devices; kube-scheduler's wording for the
# pod-level filters that HAMi leaves to kube-scheduler and that we do ourselves.
NUMA_NOT_FIT = "NumaNotFit"
NODE_INSUFFICIENT_DEVICE = "NodeInsufficientDevice"
NODE_UNFIT_POD = "NodeUnfitPod"
NODE_UNREGISTERED = "node unregistered"
NODE_UNSCHEDULABLE = "node(s) were unschedulable"
NODE_SELECTOR = "node(s) didn't match Pod's node affinity/selector"
NODE_NAME = "node(s) didn't match the requested node name"
NODE_TAINT = "node(s) had untolerated taint"
INSUFFICIENT_CPU = "Insufficient cpu"
INSUFFICIENT_MEMORY = "Insufficient memory"
TOO_MANY_PODS = "Too many pods"


# ----------------------------------------------------------------- request resolution


def resolve_device_ask(
    *,
    nums: int | None,
    mem: int | None,
    mem_percent: int | None,
    cores: int | None,
    settings: NodeSettings,
    vendor: str = "NVIDIA",
) -> DeviceAsk | None:
    """Turn the raw numbers of a container's resource limits into a :class:`DeviceAsk`.

    ``None`` means "not given". This is the one place where HAMi's request defaults live
    (REFERENCE §1): ``gpumem`` is multiplied by ``memoryFactor``; a percentage is used
    only without ``gpumem`` (>100 clamps, <=0 is ignored); no memory at all gives
    ``defaultMemory`` MiB if configured, else 100 % of each card; cores default to
    ``defaultCores`` and clamp to 0..100; cores or memory without a card count ask for
    ``defaultGPUNum`` cards; a bare count (or 100 % memory) with no cores means whole,
    exclusive cards (cores = 100). Returns ``None`` when the container asks for no card.
    """
    if nums is None:
        if mem is None and mem_percent is None and cores is None:
            return None
        nums = settings.default_gpu_num
    if nums <= 0:
        return None
    mib = 0
    pct: int | None = None
    if mem is not None and mem > 0:
        mib = mem * max(1, settings.memory_factor)
    elif mem_percent is not None and mem_percent > 0:
        pct = min(100, mem_percent)
    c = settings.default_cores if cores is None else cores
    c = max(0, min(100, c))
    ask = DeviceAsk(vendor=vendor, nums=nums, mem=mib, mem_percent=pct, cores=c)
    return normalise_ask(ask, settings)


def normalise_ask(ask: DeviceAsk, settings: NodeSettings) -> DeviceAsk:
    """Apply the defaults the engine needs to an already-parsed ask (idempotent).

    A direct client's ``DeviceAsk`` may leave memory unset (``mem`` 0, no percentage):
    that is ``defaultMemory`` MiB when configured, else the whole card; a whole card with
    no cores asked is exclusive (cores 100), as HAMi does for a bare ``nvidia.com/gpu``.
    """
    mib = max(0, ask.mem)
    pct = ask.mem_percent
    if mib == 0:
        if pct is not None and pct > 0:
            pct = min(100, pct)
        elif settings.default_memory > 0:
            mib, pct = settings.default_memory, None
        else:
            pct = 100
    else:
        pct = None
    cores = max(0, min(100, ask.cores))
    if pct == 100 and cores == 0:
        cores = 100
    if mib == ask.mem and pct == ask.mem_percent and cores == ask.cores:
        return ask
    return DeviceAsk(vendor=ask.vendor, nums=ask.nums, mem=mib, mem_percent=pct, cores=cores)


def pod_node_resources(containers: list[ContainerAsk]) -> tuple[int, int]:
    """The node CPU (milli) and memory (MiB) a pod holds: max of init peak and app sum."""
    icpu = imem = acpu = amem = 0
    for c in containers:
        if c.init:
            icpu, imem = max(icpu, c.cpu_milli), max(imem, c.memory_mib)
        else:
            acpu, amem = acpu + c.cpu_milli, amem + c.memory_mib
    return max(icpu, acpu), max(imem, amem)


def ordered_containers(req: AllocRequested) -> list[ContainerAsk]:
    """Init containers first (spec order kept), as the grant list is aligned."""
    return [c for c in req.containers if c.init] + [c for c in req.containers if not c.init]


# ----------------------------------------------------------------------------- results


@dataclass(slots=True)
class Placement:
    """Where a request goes; ``containers`` is aligned with the request (init first)."""

    node: str
    containers: list[ContainerGrant]
    cpu_milli: int = 0
    memory_mib: int = 0
    score: float = 0.0  # the node policy's score (for traces and tests)

    def to_alloc(self, req: AllocRequested, decided_at: float = 0.0) -> LedgerAlloc:
        """The ledger entry that reserves this placement for ``req``."""
        return LedgerAlloc(
            uid=req.uid,
            name=req.name,
            namespace=req.namespace,
            containers=self.containers,
            decided_at=decided_at,
            source=req.source,
            cpu_milli=self.cpu_milli,
            memory_mib=self.memory_mib,
        )


@dataclass(slots=True)
class Failure:
    """No node fits: how many nodes failed for each reason (a node counts once)."""

    reasons: dict[str, int] = field(default_factory=dict)
    nodes_total: int = 0
    message: str = ""


def failure_message(reasons: dict[str, int], nodes_total: int) -> str:
    """kube-scheduler's wording: ``0/5 nodes are available: 3 CardInsufficientMemory``."""
    parts = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    msg = f"0/{nodes_total} nodes are available"
    return f"{msg}: {parts}" if parts else msg
