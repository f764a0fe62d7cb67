"""Builders for small clusters and requests used by the placement tests."""

from __future__ import annotations

from typing import Any

from services.placement.engine import ClusterState, Failure, Placement, Placer
from shared.config import NodeSettings, SchedulerSettings
from shared.schemas import (
    AllocRequested,
    Constraints,
    ContainerAsk,
    Device,
    DeviceAsk,
    NodeInventory,
)


def card(node: str, i: int, mem: int = 10000, **kw: Any) -> Device:
    kw.setdefault("type", "NVIDIA-A100")
    return Device(uuid=f"GPU-{node}-{i}", index=i, devmem=mem, **kw)


def node(name: str, cards: int = 2, mem: int = 10000, dev: dict[str, Any] | None = None, **kw: Any) -> NodeInventory:
    return NodeInventory(node=name, devices=[card(name, i, mem, **(dev or {})) for i in range(cards)], **kw)


def cluster(*invs: NodeInventory) -> ClusterState:
    cl = ClusterState()
    for inv in invs:
        cl.upsert_node(inv)
    return cl


_n = [0]


def req(*asks: DeviceAsk, cpu: int = 0, mem: int = 0, ns: str = "", **cons: Any) -> AllocRequested:
    _n[0] += 1
    return AllocRequested(
        uid=f"uid-{_n[0]}",
        name=f"pod-{_n[0]}",
        namespace=ns,
        containers=[ContainerAsk(name="main", devices=list(asks), cpu_milli=cpu, memory_mib=mem)],
        constraints=Constraints(**cons),
    )


def pod(*containers: ContainerAsk, ns: str = "", **cons: Any) -> AllocRequested:
    _n[0] += 1
    return AllocRequested(
        uid=f"uid-{_n[0]}", name=f"pod-{_n[0]}", namespace=ns, containers=list(containers), constraints=Constraints(**cons)
    )


def placer(cl: ClusterState, node_policy: str = "binpack", gpu_policy: str = "spread", seed: int = 0, **settings: Any) -> Placer:
    return Placer(cl, SchedulerSettings(node_policy=node_policy, gpu_policy=gpu_policy), NodeSettings(**settings), seed=seed)


def place(p: Placer, r: AllocRequested) -> Placement:
    """Decide and reserve; the test fails if it does not fit."""
    got = p.decide(r)
    assert isinstance(got, Placement), getattr(got, "message", got)
    p.cluster.reserve(got.node, got.to_alloc(r))
    return got


def cards_of(pl: Placement) -> list[tuple[str, int, int]]:
    """(uuid, mem, cores) of every card granted, in grant order."""
    return [(d.uuid, d.mem, d.cores) for c in pl.containers for d in c.devices]


def fail(p: Placer, r: AllocRequested) -> Failure:
    got = p.decide(r)
    assert isinstance(got, Failure), got
    return got
