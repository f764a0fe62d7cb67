"""The cluster's device view for queries: inventory + health + ledger -> ClusterStatus.

Pure; the inventory and metrics services feed it from their KV watches.
"""

from __future__ import annotations

from shared.schemas import (
    CardStatus,
    ClusterStatus,
    NodeHealth,
    NodeInventory,
    NodeLedger,
    NodeStatus,
    card_usage,
)


def cluster_status(
    nodes: dict[str, NodeInventory],
    health: dict[str, NodeHealth],
    ledgers: dict[str, NodeLedger],
) -> ClusterStatus:
    out: list[NodeStatus] = []
    for name in sorted(nodes):
        inv = nodes[name]
        used: dict[str, list[int]] = {}
        ledger = ledgers.get(name)
        allocs = sorted(ledger.allocs.values(), key=lambda a: a.name) if ledger else []
        for a in allocs:
            for uuid, (mem, cores, slots) in card_usage(a.containers).items():
                u = used.setdefault(uuid, [0, 0, 0])
                u[0] += mem
                u[1] += cores
                u[2] += slots
        cordoned = set(inv.cordoned)
        cards = [
            CardStatus(
                uuid=d.uuid,
                index=d.index,
                type=d.type,
                health=d.health,
                used_mem=used.get(d.uuid, [0, 0, 0])[0],
                total_mem=d.devmem,
                used_cores=used.get(d.uuid, [0, 0, 0])[1],
                total_cores=d.devcore,
                used_slots=used.get(d.uuid, [0, 0, 0])[2],
                total_slots=d.count,
                cordoned=d.uuid in cordoned,
            )
            for d in inv.devices
        ]
        h = health.get(name)
        out.append(
            NodeStatus(
                node=name,
                healthy=h.healthy if h else True,
                cards=cards,
                allocations=[f"{a.namespace}/{a.name}" if a.namespace else a.name for a in allocs],
            )
        )
    return ClusterStatus(nodes=out)
