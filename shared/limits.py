"""Bounds on every field of a request: checked where it enters and where it is decided;
and what makes a stored inventory or ledger entry nonsense (:func:`inventory_problems`,
:func:`ledger_problems`), for the services that read them to set the node aside.

One pure function, :func:`request_problems`, is used by the binder (``hami.api.submit``),
the Kubernetes codec (a pod's resources) and placement (what arrives on the bus, from
whichever writer). A request out of these bounds is refused with the problems named;
it never reaches arithmetic that could overflow (the engine's arrays are 64-bit).

The bounds are generous for real hardware and workloads, and small enough that sums
over a pod's containers and a node's cards stay far inside 64 bits.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared import subjects
from shared.schemas import Constraints, ContainerAsk, NodeInventory, NodeLedger

MAX_MEM_MIB = 1 << 31  # 2 PiB per card: beyond any card, far below 2**63
MAX_CORES = 100  # percent of one card's SMs
MAX_CARDS = 64  # cards per container ask (HAMi's nvidia.com/gpu per container)
MAX_CONTAINERS = 64  # containers of one pod, init containers included
MAX_DEVICE_ASKS = 8  # vendor asks per container
MAX_CPU_MILLI = 1 << 31  # node CPU a container asks, in millicores
MAX_NODE_MEM_MIB = 1 << 31  # node memory a container asks
MIN_PRIORITY, MAX_PRIORITY = -(1 << 31), (1 << 31) - 1  # a Kubernetes priority is int32
MAX_NAME = 253  # a Kubernetes object name (DNS subdomain)
MAX_NAMESPACE = 63  # a namespace (DNS label)
MAX_UID = 128  # a pod UID is 36
MAX_STRING = 1024  # any other string in a request (a type, a UUID, a label value)
MAX_LIST = 1024  # entries of a constraint list (types, UUIDs, tolerations, terms)
MAX_CANDIDATE_NODES = 65536  # a kube-scheduler extender's candidate list


def _int_in(value: object, low: int, high: int, what: str, out: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        out.append(f"{what} must be {low}..{high}, got {value!r}")


def _strings(values: Iterable[str], what: str, limit: int, out: list[str]) -> None:
    items = list(values)
    if len(items) > limit:
        out.append(f"{what} has {len(items)} entries; at most {limit}")
        return
    long = [v for v in items if len(v) > MAX_STRING]
    if long:
        out.append(f"{what}: an entry of {len(long[0])} characters; at most {MAX_STRING}")


def constraint_problems(c: Constraints) -> list[str]:
    out: list[str] = []
    for what, items in (
        ("use_types", c.use_types),
        ("nouse_types", c.nouse_types),
        ("use_uuids", c.use_uuids),
        ("nouse_uuids", c.nouse_uuids),
    ):
        _strings(items, what, MAX_LIST, out)
    _strings(c.nodes, "candidate nodes", MAX_CANDIDATE_NODES, out)
    sel = c.node_selector
    _strings([*sel.keys(), *sel.values()], "node_selector", 2 * MAX_LIST, out)
    if len(c.affinity) > MAX_LIST:
        out.append(f"affinity has {len(c.affinity)} terms; at most {MAX_LIST}")
    else:
        reqs = [r for term in c.affinity for r in term]
        if len(reqs) > MAX_LIST:
            out.append(f"affinity has {len(reqs)} requirements; at most {MAX_LIST}")
        else:
            _strings([v for r in reqs for v in (r.key, r.operator, *r.values)], "affinity",
                     MAX_LIST * 8, out)
    if len(c.tolerations) > MAX_LIST:
        out.append(f"tolerations has {len(c.tolerations)} entries; at most {MAX_LIST}")
    for what, s in (("node_policy", c.node_policy), ("gpu_policy", c.gpu_policy),
                    ("vgpu_mode", c.vgpu_mode), ("node_name", c.node_name)):
        if s is not None and len(s) > MAX_STRING:
            out.append(f"{what} has {len(s)} characters; at most {MAX_STRING}")
    w = c.weights
    if w is not None:
        for what, v in (("slot", w.slot), ("core", w.core), ("memory", w.memory)):
            _int_in(v, 0, 1 << 20, f"weight {what}", out)
    return out


def container_problems(containers: list[ContainerAsk]) -> list[str]:
    out: list[str] = []
    if len(containers) > MAX_CONTAINERS:
        return [f"{len(containers)} containers; at most {MAX_CONTAINERS}"]
    for i, c in enumerate(containers):
        where = f'container "{c.name}"' if c.name else f"container {i}"
        if len(c.name) > MAX_NAME:
            out.append(f"container {i}: a name of {len(c.name)} characters; at most {MAX_NAME}")
        _int_in(c.cpu_milli, 0, MAX_CPU_MILLI, f"{where}: cpu (milli)", out)
        _int_in(c.memory_mib, 0, MAX_NODE_MEM_MIB, f"{where}: memory (MiB)", out)
        if len(c.devices) > MAX_DEVICE_ASKS:
            out.append(f"{where}: {len(c.devices)} device asks; at most {MAX_DEVICE_ASKS}")
            continue
        for d in c.devices:
            if len(d.vendor) > MAX_STRING:
                out.append(f"{where}: a vendor of {len(d.vendor)} characters")
            _int_in(d.nums, 0, MAX_CARDS, f"{where}: gpus", out)
            _int_in(d.mem, 0, MAX_MEM_MIB, f"{where}: gpu memory (MiB)", out)
            if d.mem_percent is not None:
                _int_in(d.mem_percent, 0, 100, f"{where}: gpu memory percentage", out)
            _int_in(d.cores, 0, MAX_CORES, f"{where}: gpu cores", out)
    return out


def request_problems(
    *,
    name: str,
    namespace: str,
    containers: list[ContainerAsk],
    constraints: Constraints,
    priority: int,
    uid: str = "",
) -> list[str]:
    """Every bound the request breaks, one line each; empty when it is within them."""
    out: list[str] = []
    if len(name) > MAX_NAME:
        out.append(f"a name of {len(name)} characters; at most {MAX_NAME}")
    if len(namespace) > MAX_NAMESPACE:
        out.append(f"a namespace of {len(namespace)} characters; at most {MAX_NAMESPACE}")
    if len(uid) > MAX_UID:
        out.append(f"a uid of {len(uid)} characters; at most {MAX_UID}")
    _int_in(priority, MIN_PRIORITY, MAX_PRIORITY, "priority", out)
    out += container_problems(containers)
    out += constraint_problems(constraints)
    return out


# ------------------------------------------------------------------ stored entries

MAX_DEVICES = 1024  # cards one node registers
MAX_DEVCORE = 100 * 100  # 100 x deviceCoreScaling, which is at most 100
MAX_SLOTS = 1 << 16  # containers sharing one card (deviceSplitCount)
MAX_ALLOCS = 1 << 20  # reservations on one node's ledger


def inventory_problems(inv: NodeInventory, key: str) -> list[str]:
    """What makes an inventory KV entry nonsense: another node's name under this key,
    negative or absurd capacities. Empty when it can be used."""
    out: list[str] = []
    if subjects.kv_key(inv.node) != key:
        out.append(f"names node {inv.node!r}, not the node of key {key!r}")
    if len(inv.devices) > MAX_DEVICES:
        return [*out, f"{len(inv.devices)} devices; at most {MAX_DEVICES}"]
    for d in inv.devices:
        _int_in(d.devmem, 0, MAX_MEM_MIB, f"card {d.uuid!r}: memory (MiB)", out)
        _int_in(d.devcore, 0, MAX_DEVCORE, f"card {d.uuid!r}: cores", out)
        _int_in(d.count, 0, MAX_SLOTS, f"card {d.uuid!r}: slots", out)
        _int_in(d.index, 0, MAX_DEVICES, f"card {d.uuid!r}: index", out)
    if len({d.uuid for d in inv.devices}) != len(inv.devices):
        out.append("two cards share a UUID")
    _int_in(inv.cpu_milli, 0, MAX_CPU_MILLI * MAX_CONTAINERS, "node cpu (milli)", out)
    _int_in(inv.memory_mib, 0, MAX_NODE_MEM_MIB * MAX_CONTAINERS, "node memory (MiB)", out)
    return out


def ledger_problems(led: NodeLedger, key: str) -> list[str]:
    """What makes a ledger KV entry nonsense: another node's name under this key, an
    allocation filed under another uid, negative or absurd grants."""
    out: list[str] = []
    if subjects.kv_key(led.node) != key:
        out.append(f"names node {led.node!r}, not the node of key {key!r}")
    if len(led.allocs) > MAX_ALLOCS:
        return [*out, f"{len(led.allocs)} allocations; at most {MAX_ALLOCS}"]
    for uid, a in led.allocs.items():
        if a.uid != uid:
            out.append(f"allocation {uid!r} holds uid {a.uid!r}")
        for c in a.containers:
            for g in c.devices:
                _int_in(g.mem, 0, MAX_MEM_MIB, f"allocation {uid!r}: memory (MiB)", out)
                _int_in(g.cores, 0, MAX_DEVCORE, f"allocation {uid!r}: cores", out)
        _int_in(a.cpu_milli, 0, MAX_CPU_MILLI * MAX_CONTAINERS, f"allocation {uid!r}: cpu", out)
        _int_in(a.memory_mib, 0, MAX_NODE_MEM_MIB * MAX_CONTAINERS, f"allocation {uid!r}: memory", out)
        if len(out) > 8:  # enough to say why; a huge garbage entry need not be listed
            break
    return out


def node_of_key(key: str) -> str:
    """The node name a KV key was made from, as well as it can be told (for events)."""
    try:
        return subjects.unescape(key)
    except ValueError:
        return key
