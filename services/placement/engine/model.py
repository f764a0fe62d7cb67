"""Request resolution, reason codes and decision results of the placement engine.

Pure data and small functions: how a HAMi device ask becomes concrete numbers (the
``defaultMemory`` / ``defaultCores`` / ``defaultGPUNum`` / ``memoryFactor`` rules, shared
with the Kubernetes codec through :func:`resolve_device_ask`), the reason vocabulary a
failed decision reports, and the :class:`Placement` / :class:`Failure` results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# HAMi's request defaults live in shared.hami.resources, since the Kubernetes codec needs
# the same answers; re-exported here for the engine's callers.
from shared.hami.resources import normalise_ask as normalise_ask
from shared.hami.resources import resolve_device_ask as resolve_device_ask
from shared.schemas import (
    AllocRequested,
    ContainerAsk,
    ContainerGrant,
    LedgerAlloc,
)

# ------------------------------------------------------------------------ reason codes
# Card-level codes, in the order HAMi's NVIDIA fit checks them; the first failing check
# of a card is its reason. The integer values index the per-card reason array, so their
# order matters: it is the check order. A card of another vendor is not passed to the
# vendor's fit at all in HAMi (``CARD_OTHER_VENDOR``: no reason, not counted).
OK = 0
CARD_OTHER_VENDOR = 1
CARD_NOT_HEALTH = 2
CARD_CORDONED = 3
CARD_TYPE_MISMATCH = 4
CARD_UUID_MISMATCH = 5
CARD_SLOTS = 6
CARD_MUTEX = 7
CARD_QUOTA = 8
CARD_MEMORY = 9
CARD_CORE = 10
CARD_EXCLUSIVE = 11
CARD_COMPUTE_EXHAUSTED = 12
CARD_MIG_TOPOLOGY = 13  # HAMi's CustomFilterRule on a MIG-mode card, its last check
N_CARD_CODES = 14

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
    # a 0-core ask on a card whose cores are all taken
    CARD_COMPUTE_EXHAUSTED: "CardComputeUnitsExhausted",
    # no large-enough MIG profile has a free placement (engine/mig.py)
    CARD_MIG_TOPOLOGY: "CardMigTopologyInfeasible",
}
# The fitting cards of a node that has too few of them (HAMi counts them too).
ALLOCATED_INSUFFICIENT = "AllocatedCardsInsufficientRequest"

# Node-level reasons. HAMi's own codes for devices; kube-scheduler's wording for the
# pod-level filters that HAMi leaves to kube-scheduler and that we do ourselves.
NUMA_NOT_FIT = "NumaNotFit"
NODE_INSUFFICIENT_DEVICE = "NodeInsufficientDevice"
NODE_UNFIT_POD = "NodeUnfitPod"
NODE_UNREGISTERED = "node unregistered"
NODE_UNSCHEDULABLE = "node(s) were unschedulable"
NODE_SELECTOR = "node(s) didn't match Pod's node affinity/selector"
NODE_NAME = "node(s) didn't match the requested node name"
NODE_NOT_OFFERED = "node(s) not among the scheduler's candidates"
NODE_TAINT = "node(s) had untolerated taint"
INSUFFICIENT_CPU = "Insufficient cpu"
INSUFFICIENT_MEMORY = "Insufficient memory"
TOO_MANY_PODS = "Too many pods"


# ----------------------------------------------------------------- request resolution


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
    # Kubernetes pods: HAMi's fitting nodes for its FilteringSucceed event, as (node,
    # HAMi node score) in HAMi's order (the chosen node last), and how many fit in all
    fits: list[tuple[str, float]] | None = None
    fit_count: int = 0

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
            queue=req.queue,
        )


@dataclass(slots=True)
class Failure:
    """No node fits: for each reason, how many nodes gave it.

    A node counts once per reason it gave: one whose cards fail for two reasons
    (``1/2 CardInsufficientMemory, 1/2 CardTypeMismatch``) counts under both, as HAMi
    counts the nodes of each reason; so the counts can add up to more than the nodes.
    """

    reasons: dict[str, int] = field(default_factory=dict)
    nodes_total: int = 0
    message: str = ""
    # node row -> the reason text the exact stage gave it (for per-node reasons later)
    tried: dict[int, str] = field(default_factory=dict)


def failure_message(reasons: dict[str, int], nodes_total: int) -> str:
    """kube-scheduler's wording: ``0/5 nodes are available: 3 CardInsufficientMemory``."""
    parts = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    msg = f"0/{nodes_total} nodes are available"
    return f"{msg}: {parts}" if parts else msg
