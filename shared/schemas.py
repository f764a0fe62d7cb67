"""Every message and stored record that crosses a service boundary.

All are msgspec Structs encoded as JSON. Rules that keep old and new readers working:
fields are keyword-only and every field added after the first release gets a default;
readers ignore fields they do not know (msgspec's default). Each top-level message
carries ``v`` (the schema version it was written with) and, for the allocation and node
events, a ``kind`` tag so one decoder reads any event of the stream (a tagged union).

Memory is in MiB and cores in percent of one card unless a field says otherwise.
"""

from __future__ import annotations

from typing import Any

import msgspec

SCHEMA_VERSION = 1


class _Base(msgspec.Struct, kw_only=True, omit_defaults=True):
    pass


# --------------------------------------------------------------------------- inventory


class MigPlacement(_Base, kw_only=True):
    """Where a MIG profile's instance may start on the card, and how many slices it spans."""

    start: int = 0
    size: int = 0


class MigProfile(_Base, kw_only=True):
    """One MIG geometry a card offers (HAMi's node register ``migProfiles``)."""

    name: str = ""
    memory_mb: int = 0
    core: int = 0
    slice_count: int = 0
    placements: list[MigPlacement] = []


class DeviceTemplate(_Base, kw_only=True):
    """A fixed slice size a card offers (Ascend vNPU template, Enflame DRS profile,
    Kunlunxin vXPU size): a request is rounded up to one of these."""

    name: str = ""
    memory_mib: int = 0
    cores: int = 0  # the vendor's unit: Ascend AI cores, Enflame slices, ...


class Device(_Base, kw_only=True):
    """One card as its node agent registers it (HAMi's registration semantics)."""

    uuid: str
    index: int
    type: str  # model as HAMi writes it, e.g. "NVIDIA-A100-80GB"
    vendor: str = "NVIDIA"
    count: int = 10  # slots: at most this many containers share the card
    devmem: int  # MiB after deviceMemoryScaling
    devcore: int = 100  # 100 x deviceCoreScaling
    numa: int = 0
    mode: str = "hami-core"  # hami-core | mig | mps
    health: bool = True
    physical_mem: int = 0  # MiB before scaling, for telemetry
    mig_profiles: list[MigProfile] = []  # mode "mig": the geometries the card offers
    # Other vendors: HAMi's customInfo of the register annotation (Ascend NetworkID,
    # AMD pciBDF, Vastai AIC/DeviceStrategy) and the card's fixed slice sizes.
    custom_info: dict[str, str | int] = {}
    templates: list[DeviceTemplate] = []


class Taint(_Base, kw_only=True):
    key: str
    value: str = ""
    effect: str = "NoSchedule"


class NodeInventory(_Base, kw_only=True, omit_defaults=False):
    """What a node offers; stored in the inventory KV bucket under the node's name."""

    v: int = SCHEMA_VERSION
    node: str
    agent_id: str = ""  # changes when the agent restarts
    devices: list[Device] = []
    # Pairwise link scores between the node's cards, indexed by position in ``devices``
    # (REFERENCE §3 topology scores); empty when unknown.
    links: list[list[int]] = []
    cpu_milli: int = 0  # 0 = not tracked (standalone nodes schedule only devices)
    memory_mib: int = 0
    max_pods: int = 0
    labels: dict[str, str] = {}
    taints: list[Taint] = []
    unschedulable: bool = False
    cordoned: list[str] = []  # UUIDs excluded from new placements (hami.io/device-cordon)
    published_at: float = 0.0


class Heartbeat(_Base, kw_only=True, omit_defaults=False):
    v: int = SCHEMA_VERSION
    node: str
    agent_id: str
    seq: int
    at: float


class NodeHealth(_Base, kw_only=True, omit_defaults=False):
    """Inventory's verdict on a node, stored in the health KV bucket."""

    v: int = SCHEMA_VERSION
    node: str
    healthy: bool
    since: float
    reason: str = ""


class DeviceUsage(_Base, kw_only=True):
    uuid: str
    memory_used_mib: int = 0
    utilization: float = 0.0  # 0..1
    vendor: str = "NVIDIA"  # the card's Device.vendor (HAMi's device type key)
    type: str = ""  # the card's Device.type, e.g. "Ascend910B3", "DCU-K100-AI"
    memory_total_mib: int = 0  # 0 = not reported


class ContainerUsage(_Base, kw_only=True):
    uid: str
    container: str
    uuid: str
    memory_used_bytes: int = 0
    memory_limit_bytes: int = 0
    utilization: float = 0.0
    last_kernel_at: float = 0.0


class MigUsage(_Base, kw_only=True):
    """A MIG instance the node agent holds for an allocation's container (telemetry)."""

    uid: str
    container: str
    uuid: str  # the card's GPU- UUID
    mig: MigSlice  # profile, placement and the instance's identity (MIG UUID, GI, CI)


class Telemetry(_Base, kw_only=True, omit_defaults=False):
    v: int = SCHEMA_VERSION
    node: str
    at: float
    devices: list[DeviceUsage] = []
    containers: list[ContainerUsage] = []
    # The node's live MIG instances, every sample: a reader that starts late (the
    # metrics service) learns them without the prepared events it missed.
    mig: list[MigUsage] = []


# ---------------------------------------------------------------------------- requests


class DeviceAsk(_Base, kw_only=True):
    """One vendor's ask of one container (HAMi's ContainerDeviceRequest)."""

    vendor: str = "NVIDIA"
    nums: int = 1
    mem: int = 0  # MiB per card; 0 = not given
    mem_percent: int | None = None  # % of each card, used when ``mem`` is 0
    cores: int = 0  # % of each card's SMs


class ContainerAsk(_Base, kw_only=True):
    name: str = ""
    init: bool = False
    devices: list[DeviceAsk] = []
    cpu_milli: int = 0
    memory_mib: int = 0
    # an init container with restartPolicy: Always (a sidecar): it keeps running beside
    # the app containers, so its use is added to theirs (card_usage)
    sidecar: bool = False


class SelectorRequirement(_Base, kw_only=True):
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: list[str] = []


class Toleration(_Base, kw_only=True):
    key: str = ""
    operator: str = "Equal"  # Equal | Exists
    value: str = ""
    effect: str = ""  # "" tolerates every effect


class ScoringWeights(_Base, kw_only=True):
    slot: int = 1
    core: int = 1
    memory: int = 1


class Constraints(_Base, kw_only=True):
    """Per-request placement options (HAMi's pod annotations, REFERENCE §2)."""

    node_policy: str | None = None  # None = the configured default
    gpu_policy: str | None = None  # a chain such as "binpack,numa"
    weights: ScoringWeights | None = None
    use_types: list[str] = []
    nouse_types: list[str] = []
    use_uuids: list[str] = []
    nouse_uuids: list[str] = []
    numa_bind: bool = False
    vgpu_mode: str | None = None
    node_selector: dict[str, str] = {}
    # Required node affinity: OR over terms, AND within a term.
    affinity: list[list[SelectorRequirement]] = []
    tolerations: list[Toleration] = []
    node_name: str | None = None  # pin to a node (used by direct clients)
    # Candidate nodes: decide among these only (kube-scheduler's feasible nodes, in
    # extender mode); empty = every node.
    nodes: list[str] = []
    # Other vendors' own card filters as the pod names them (hygon.com/use-dcutype,
    # hami.io/use-Ascend910B3-uuid, ...: the use/nouse type and UUID annotations each
    # device family declares); the family's fit reads them.
    family_annotations: dict[str, str] = {}


class Quota(_Base, kw_only=True):
    """A namespace's HAMi quota (limits.nvidia.com/gpumem, limits.nvidia.com/gpucores)."""

    memory_mib: int | None = None
    cores: int | None = None


class AllocRequested(_Base, kw_only=True, omit_defaults=False, tag="requested", tag_field="kind"):
    v: int = SCHEMA_VERSION
    uid: str  # allocation id: the pod UID in Kubernetes mode
    name: str
    namespace: str = ""
    containers: list[ContainerAsk] = []  # init containers first, in spec order
    constraints: Constraints = msgspec.field(default_factory=Constraints)
    priority: int = 1
    # Keep the request pending and retry it when capacity changes (a Kubernetes pod
    # stays Pending); a one-shot client asks for False and gets ``failed`` once.
    pending: bool = True
    source: str = "cli"  # cli | kube | api
    requested_at: float = 0.0
    # Epoch seconds after which nobody waits for an answer: placement never places it
    # then (answers ``failed`` with reason "expired"). 0 = none (a Kubernetes pod, which
    # stays pending for as long as it exists).
    deadline: float = 0.0
    # Scheduling priority, higher wins: with ``scheduler.preemption`` on, a request that
    # fits nowhere may preempt allocations of lower ``pod_priority`` (``hami submit
    # --priority``; Kubernetes: the pod's spec.priority). Not ``priority`` above, which
    # is HAMi's nvidia.com/priority task priority (0 high, 1 low) for the limiter.
    pod_priority: int = 0
    # The leaf queue it joins (docs/queues.md): ``hami submit --queue``, the pod's
    # ``hami.io/queue`` label; "" = its namespace's default queue, else "default".
    queue: str = ""
    # A gang (all-or-nothing group, docs/gangs.md): its name within the namespace and how
    # many members must be placed together (minMember); "" / 0 = not in a gang.
    gang: str = ""
    gang_size: int = 0
    # Seconds a partial gang may hold reservations before they are rolled back; 0 = the
    # default (services.placement.engine.gang.GANG_TIMEOUT_S).
    gang_timeout: float = 0.0
    # May be moved to another card by consolidation (``hami defrag``, docs/defrag.md).
    movable: bool = False


# --------------------------------------------------------------------------- decisions


class MigSlice(_Base, kw_only=True):
    """The MIG instance a grant on a card in ``mig`` mode stands for: the profile and the
    memory-slice placement the engine chose (HAMi's ``hami.io/vgpu-mig-allocations``
    entry), and, once the node agent created it, the instance's identity."""

    profile: str  # e.g. "2g.20gb"
    start: int  # first memory slice, as NVML's GPU-instance placement
    size: int  # memory slices it spans
    uuid: str = ""  # "MIG-..." once created (prepared events); "" in a decision
    gpu_instance: int = -1  # NVML GPU-instance id once created
    compute_instance: int = -1  # NVML compute-instance id once created


class CardGrant(_Base, kw_only=True):
    uuid: str
    index: int = 0
    type: str = ""
    vendor: str = "NVIDIA"
    mem: int  # MiB granted on this card
    cores: int  # % of the card's SMs
    mig: MigSlice | None = None  # on a card in mig mode: the instance placement chose


class ContainerGrant(_Base, kw_only=True):
    name: str = ""
    init: bool = False
    devices: list[CardGrant] = []
    sidecar: bool = False  # an init container that keeps running (ContainerAsk.sidecar)


class FitNode(_Base, kw_only=True):
    node: str
    score: float  # HAMi's node score before the pod (ComputeDefaultScore)


class FilterSummary(_Base, kw_only=True):
    """The filter's outcome as HAMi's FilteringSucceed event gives it: how many nodes were
    offered, how many fit, and the fitting nodes with their scores in HAMi's order (the
    chosen node last), the best :data:`FIT_NODES_MAX` of them when more fit."""

    offered: int = 0
    fits: int = 0
    nodes: list[FitNode] = []


FIT_NODES_MAX = 256


class AllocDecided(_Base, kw_only=True, omit_defaults=False, tag="decided", tag_field="kind"):
    v: int = SCHEMA_VERSION
    uid: str
    name: str
    namespace: str = ""
    node: str
    containers: list[ContainerGrant] = []  # aligned with the request's containers
    source: str = "cli"
    requested_at: float = 0.0
    decided_at: float = 0.0
    ledger_revision: int = 0
    replica: str = ""
    deadline: float = 0.0  # the request's (AllocRequested.deadline); 0 = none
    # The deciding replica's ledger writes lost to another writer so far (a counter that
    # restarts with the replica); the metrics service exports it per replica.
    conflicts: int = 0
    # Kubernetes pods: what HAMi's FilteringSucceed event says (None for other sources)
    filtered: FilterSummary | None = None


class AllocFailed(_Base, kw_only=True, omit_defaults=False, tag="failed", tag_field="kind"):
    v: int = SCHEMA_VERSION
    uid: str
    name: str
    namespace: str = ""
    # HAMi reason vocabulary -> how many nodes failed for it (a node counts under every
    # reason of its text, "1/2 CardInsufficientMemory, 1/2 CardTypeMismatch", as HAMi).
    reasons: dict[str, int] = {}
    nodes_total: int = 0
    message: str = ""  # e.g. "0/2 nodes are available: 2 CardInsufficientMemory"
    pending: bool = True  # True: it stays queued and is retried on capacity change
    source: str = "cli"
    requested_at: float = 0.0
    failed_at: float = 0.0
    # Per candidate node, its reason, when the request named its candidates
    # (``Constraints.nodes``); nodes placement does not know are absent.
    node_reasons: dict[str, str] = {}
    # "" when it did not fit (``reasons`` say why); "expired" when its deadline passed
    # before it was placed; "withdrawn" when its client withdrew it.
    reason: str = ""
    # Per card reason, the nodes whose text gives it, sorted (what HAMi's FilteringFailed
    # events list: "2 nodes CardInsufficientMemory(n1,n2)"); for Kubernetes pods only.
    reason_nodes: dict[str, list[str]] = {}


class AllocBound(_Base, kw_only=True, omit_defaults=False, tag="bound", tag_field="kind"):
    v: int = SCHEMA_VERSION
    uid: str
    name: str
    namespace: str = ""
    node: str
    bound_at: float = 0.0


class AllocBindFailed(_Base, kw_only=True, omit_defaults=False, tag="bind_failed", tag_field="kind"):
    v: int = SCHEMA_VERSION
    uid: str
    name: str
    namespace: str = ""
    node: str
    message: str = ""
    at: float = 0.0


class AllocPrepared(_Base, kw_only=True, omit_defaults=False, tag="prepared", tag_field="kind"):
    v: int = SCHEMA_VERSION
    uid: str
    name: str = ""
    namespace: str = ""
    node: str
    container: str = ""
    devices: list[CardGrant] = []
    at: float = 0.0


class AllocReleased(_Base, kw_only=True, omit_defaults=False, tag="released", tag_field="kind"):
    v: int = SCHEMA_VERSION
    uid: str
    name: str = ""
    namespace: str = ""
    node: str = ""  # "" when the request was never placed (withdrawn while pending)
    # released | deleted | succeeded | failed | bind-failed | withdrawn | orphaned |
    # preempted (then an ``AllocPreempted`` names who took the room)
    reason: str = ""
    at: float = 0.0


class AllocPreempted(_Base, kw_only=True, omit_defaults=False, tag="preempted", tag_field="kind"):
    """An allocation was released to make room for a request of higher priority."""

    v: int = SCHEMA_VERSION
    uid: str  # the victim
    name: str = ""
    namespace: str = ""
    node: str = ""
    priority: int = 0  # the victim's pod_priority
    by_uid: str = ""  # the preemptor
    by_name: str = ""
    by_namespace: str = ""
    by_priority: int = 0
    at: float = 0.0


AllocEvent = (
    AllocRequested
    | AllocDecided
    | AllocFailed
    | AllocBound
    | AllocBindFailed
    | AllocPrepared
    | AllocReleased
    | AllocPreempted
)


class NodeEvent(_Base, kw_only=True, omit_defaults=False, tag="node", tag_field="kind"):
    v: int = SCHEMA_VERSION
    node: str
    verb: str  # registered | updated | unhealthy | recovered | removed
    reason: str = ""
    at: float = 0.0


# ------------------------------------------------------------------------------ ledger


class LedgerAlloc(_Base, kw_only=True):
    uid: str
    name: str
    namespace: str = ""
    containers: list[ContainerGrant] = []
    decided_at: float = 0.0
    source: str = "cli"
    cpu_milli: int = 0  # node resources the pod holds, summed like the cards (init peak)
    memory_mib: int = 0
    pod_priority: int = 0  # the request's scheduling priority (preemption: higher wins)
    queue: str = ""  # the leaf queue it counts against (docs/queues.md); "" = its namespace's default
    # W3C traceparent of the decision that wrote this entry: the node agent's work on
    # it (preparing, releasing) joins the request's trace across the ledger KV hop.
    traceparent: str = ""
    # Gang membership (docs/gangs.md). ``gang_expires`` > 0: a reservation of a gang not
    # yet complete, rolled back at that time (epoch s) unless every member is reserved by
    # then; 0: committed (or not in a gang).
    gang: str = ""
    gang_size: int = 0
    gang_expires: float = 0.0
    movable: bool = False  # consolidation may move it (``hami defrag --apply``)


class NodeLedger(_Base, kw_only=True, omit_defaults=False):
    """The reservations on one node; the ledger KV value, written by compare-and-set."""

    v: int = SCHEMA_VERSION
    node: str
    allocs: dict[str, LedgerAlloc] = {}


def card_usage(containers: list[ContainerGrant]) -> dict[str, tuple[int, int, int]]:
    """A pod's usage per card: (mem, cores, slots), as HAMi's ``CollapseInitContainerUsage``.

    Init containers run one after another before the app containers, so a card carries
    the larger of the init peak and the sum over app containers (REFERENCE §3). A sidecar
    (an init container that keeps running) joins the running set for good: its use is
    under every later init container's and added to the app containers'. Each running
    container using a card takes a slot there (at least one for a card the pod uses).
    """
    # per card: [sidecars' mem, cores, slots, peak mem, cores, slots, app mem, cores, slots]
    st: dict[str, list[int]] = {}
    for c in containers:
        for d in c.devices:
            u = st.setdefault(d.uuid, [0] * 9)
            if c.init and c.sidecar:
                u[0] += d.mem
                u[1] += d.cores
                u[2] += 1
                u[3], u[4], u[5] = max(u[3], u[0]), max(u[4], u[1]), max(u[5], u[2])
            elif c.init:
                u[3] = max(u[3], u[0] + d.mem)
                u[4] = max(u[4], u[1] + d.cores)
                u[5] = max(u[5], u[2] + 1)
            else:
                u[6] += d.mem
                u[7] += d.cores
                u[8] += 1
    return {
        uuid: (max(u[3], u[0] + u[6]), max(u[4], u[1] + u[7]), max(u[5], u[2] + u[8], 1))
        for uuid, u in st.items()
    }


# ------------------------------------------------------------------------ request/reply


class SubmitRequest(_Base, kw_only=True):
    """A direct client's ask for a slice (``hami submit``), answered by the binder."""

    name: str
    namespace: str = ""
    containers: list[ContainerAsk] = []
    constraints: Constraints = msgspec.field(default_factory=Constraints)
    priority: int = 1
    # Wait for capacity instead of failing at once: the request stays pending and is
    # retried when capacity changes, up to ``timeout`` seconds.
    wait: bool = False
    # Seconds to wait for an answer, more than 0 and at most the binder's ``bus.maxWait``
    # (else refused): the request's deadline is when the binder took it plus this.
    timeout: float = 30.0
    # The allocation id, chosen by the client (8 to 64 letters, digits, '-' or '_') so it
    # can withdraw the request even when the binder that took it is gone; "" lets the
    # binder choose one.
    uid: str = ""
    # Scheduling priority, higher wins (``AllocRequested.pod_priority``).
    pod_priority: int = 0
    queue: str = ""  # the leaf queue to join (``AllocRequested.queue``)
    # Gang and consolidation (``AllocRequested`` fields of the same names).
    gang: str = ""
    gang_size: int = 0
    gang_timeout: float = 0.0
    movable: bool = False


class PreemptRequest(_Base, kw_only=True):
    """``hami.placement.preempt``: which pods to evict on each offered node so that
    ``request`` fits there (kube-scheduler's preempt verb, through the extender)."""

    request: AllocRequested  # the preemptor, as its filter call would ask
    priority: int = 0  # the preemptor's pod priority
    # Offered node -> the pods there kube-scheduler would evict (uid -> pod priority,
    # None when it sent only the uid): every pod of lower priority may be chosen; these
    # priorities win over the ledger's.
    nodes: dict[str, dict[str, int | None]] = {}


class PreemptReply(_Base, kw_only=True):
    # Node -> the uids to evict there; a node where no set of lower-priority pods makes
    # the request fit is absent.
    victims: dict[str, list[str]] = {}


class QueuesRequest(_Base, kw_only=True):
    """``hami.placement.queues``: each queue's state (hami queues); no fields yet."""


class QueueStatus(_Base, kw_only=True):
    """One queue as placement sees it (docs/queues.md). Memory in MiB, cores in percent
    of a card (100 per whole card); a limit of -1 is none."""

    name: str
    parent: str = ""
    weight: float = 1.0
    guarantee_mem: int = 0
    guarantee_cores: int = 0
    limit_mem: int = -1
    limit_cores: int = -1
    used_mem: int = 0
    used_cores: int = 0
    borrowed_mem: int = 0  # use beyond the guarantee, lent by queues that leave theirs idle
    borrowed_cores: int = 0
    pending: int = 0  # requests waiting in it (and in the queues below it)


class QueuesReply(_Base, kw_only=True):
    queues: list[QueueStatus] = []  # parents before their children; empty: no queues
    capacity_mem: int = 0  # of the live cards
    capacity_cores: int = 0


class SubmitReply(_Base, kw_only=True):
    ok: bool
    uid: str = ""
    name: str = ""
    decision: AllocDecided | None = None
    failure: AllocFailed | None = None
    error: str = ""


class WithdrawRequest(_Base, kw_only=True):
    """``hami.api.withdraw``: the client gave up on a submit (timeout, Ctrl-C, lost reply);
    it is never placed, or released if it was."""

    uid: str
    name: str = ""
    namespace: str = ""


class WithdrawReply(_Base, kw_only=True):
    ok: bool
    uid: str = ""
    node: str = ""  # where it had been placed, when the binder knows; "" otherwise
    error: str = ""


class RunRequest(_Base, kw_only=True):
    """``hami.agent.<node>.run``: ``hami run`` asks the node agent for a slice's
    environment and hands it the processes that hold the slice; once none of them is
    alive, the agent withdraws the allocation (by ``uid``). Each call replaces the
    previous list."""

    uid: str
    container: str = ""
    pids: list[int] = []


class RunReply(_Base, kw_only=True):
    ok: bool
    env: dict[str, str] = {}  # the limiter's environment, the region as a host path
    region: str = ""
    error: str = ""


class RequestOutcome(_Base, kw_only=True, omit_defaults=False):
    """What became of a direct client's request, in the ``hami-outcomes`` bucket (key:
    the uid): ``answered`` (its client was told where it is placed) or ``withdrawn``
    (nobody waits for it: never place it, release it if placed). Whichever is written
    first wins; ``released`` (its holder released it: never place it again) is written
    over ``answered``. Entries expire with the bucket's TTL, after every request's
    deadline."""

    v: int = SCHEMA_VERSION
    uid: str
    state: str  # answered | withdrawn | released
    name: str = ""
    namespace: str = ""
    deadline: float = 0.0
    at: float = 0.0


class ReleaseRequest(_Base, kw_only=True):
    name: str
    namespace: str = ""


class ReleaseReply(_Base, kw_only=True):
    ok: bool
    uid: str = ""
    node: str = ""
    error: str = ""


class CardStatus(_Base, kw_only=True):
    uuid: str
    index: int
    type: str
    health: bool
    used_mem: int
    total_mem: int
    used_cores: int
    total_cores: int
    used_slots: int
    total_slots: int
    cordoned: bool = False


class NodeStatus(_Base, kw_only=True):
    node: str
    healthy: bool
    cards: list[CardStatus] = []
    allocations: list[str] = []
    held: list[LedgerAlloc] = []  # what each allocation holds; only when detail is asked


class PendingRequest(_Base, kw_only=True):
    """A request that stays queued, with why it did not fit when placement last tried."""

    uid: str
    name: str
    namespace: str = ""
    source: str = "cli"
    reasons: dict[str, int] = {}  # HAMi's reason counts, as in the last ``failed``
    nodes_total: int = 0
    message: str = ""
    requested_at: float = 0.0
    failed_at: float = 0.0


class StatusRequest(_Base, kw_only=True):
    """The body of ``hami.api.status``; an empty object asks for the summary."""

    detail: bool = False  # also each allocation's grants and the pending requests


class ClusterStatus(_Base, kw_only=True):
    nodes: list[NodeStatus] = []
    pending: int = 0
    pending_requests: list[PendingRequest] = []  # only when detail is asked


class ErrorReply(_Base, kw_only=True):
    """What a request/reply endpoint answers when the request itself is bad."""

    error: str
    detail: Any = None



class MoveRequest(_Base, kw_only=True):
    """``hami.placement.move`` (``hami defrag --apply``): re-place a movable allocation on
    other cards, one per card it holds, in the order of its grants."""

    uid: str
    to_node: str
    to_cards: list[str] = []


class MoveReply(_Base, kw_only=True):
    ok: bool
    uid: str = ""
    node: str = ""  # where it is now
    cards: list[str] = []
    error: str = ""


class DefragApplyRequest(_Base, kw_only=True):
    """``hami.binder.defrag.apply`` (``hami defrag --apply``, Kubernetes): carry out these
    moves of movable pods, in order, by eviction; each pod's replacement is steered to
    the planned node and cards."""

    moves: list[MoveRequest] = []
    # At most this many pods evicted and not yet placed again at a time; 0 = the
    # binder's ``scheduler.defragMaxDisruption``.
    max_disruption: int = 0
    # Seconds one replacement may take to be placed; 0 = ``scheduler.defragReplaceTimeout``.
    timeout: float = 0.0


class DefragOutcome(_Base, kw_only=True):
    """What became of one planned move of a pod."""

    uid: str  # the evicted pod's (the plan's allocation)
    name: str = ""
    namespace: str = ""
    # moved: evicted, its replacement placed; refused: nothing evicted (``error`` says
    # why); failed: evicted, but no replacement placed in time; not-tried: a move
    # before it did not complete.
    state: str = ""
    error: str = ""
    replacement: str = ""  # the new pod's name
    node: str = ""  # where the replacement was placed
    cards: list[str] = []
    on_plan: bool = False  # placed on the planned node and cards


class DefragApplyReply(_Base, kw_only=True):
    ok: bool  # every move done
    outcomes: list[DefragOutcome] = []
    error: str = ""

EVENT_TYPES: tuple[type[msgspec.Struct], ...] = (
    AllocRequested,
    AllocDecided,
    AllocFailed,
    AllocBound,
    AllocBindFailed,
    AllocPrepared,
    AllocReleased,
    AllocPreempted,
    NodeEvent,
)
