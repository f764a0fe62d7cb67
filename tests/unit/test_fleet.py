"""The metrics service's fleet state and the page's view, fed events by hand (pure)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics.collector import Snapshot
from services.metrics.dashboard import fleet_view
from services.metrics.fleet import FEED_SIZE, Fleet, FleetCollector, top_reason
from shared.schemas import (
    AllocDecided,
    AllocFailed,
    AllocReleased,
    CardGrant,
    ContainerGrant,
    ContainerUsage,
    Device,
    DeviceUsage,
    LedgerAlloc,
    NodeEvent,
    NodeHealth,
    NodeInventory,
    NodeLedger,
    PendingRequest,
    Telemetry,
)

MIB = 1024 * 1024


def failed(uid: str, pending: bool = True, **reasons: int) -> AllocFailed:
    return AllocFailed(
        uid=uid,
        name=uid,
        namespace="ns",
        reasons=reasons,
        pending=pending,
        requested_at=100.0,
        failed_at=101.0,
        message=f"0/2 nodes: {reasons}",
    )


def samples(fleet: Fleet, snap: Snapshot) -> dict[str, list[tuple[dict[str, str], float]]]:
    reg = CollectorRegistry()
    reg.register(FleetCollector(fleet, lambda: snap))
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def test_pending_requests_come_and_go_with_the_events() -> None:
    f = Fleet(clock=lambda: 400.0)
    f.observe(failed("a", CardInsufficientMemory=2))
    f.observe(failed("b", CardInsufficientMemory=1, NodeUnfitPod=1))
    f.observe(failed("c"))
    assert [p.uid for p in f.waiting(set())] == ["a", "b", "c"]
    f.observe(AllocDecided(uid="a", name="a", node="n1", replica="p1", conflicts=3))
    f.observe(AllocReleased(uid="b", reason="withdrawn"))
    f.observe(failed("c", pending=False))  # given up: no longer waits
    assert f.waiting(set()) == []
    f.observe(failed("d", CardInsufficientMemory=1))
    assert f.waiting({"d"}) == []  # a ledger holds it: the decided event was missed


def test_series_failure_reasons_conflicts_health_and_ages() -> None:
    f = Fleet(clock=lambda: 400.0)
    f.observe(failed("a", CardInsufficientMemory=2, NodeUnfitPod=1))
    f.observe(failed("a", CardInsufficientMemory=2))
    f.observe(AllocFailed(uid="x", name="x", pending=False, reason="expired"))
    f.observe(AllocDecided(uid="y", name="y", node="n1", replica="p1", conflicts=2))
    f.observe(AllocDecided(uid="z", name="z", node="n1", replica="p1", conflicts=5))
    f.observe(AllocDecided(uid="w", name="w", node="n1", replica="p2", conflicts=1))
    nodes = {n: NodeInventory(node=n) for n in ("n1", "n2", "n3")}
    health = {"n2": NodeHealth(node="n2", healthy=False, since=1.0, reason="no heartbeat for 10s")}
    got = samples(f, (nodes, {}, health))
    assert sorted((s["reason"], v) for s, v in got["hami_allocation_failures_total"]) == [
        ("CardInsufficientMemory", 2),
        ("NodeUnfitPod", 1),
        ("expired", 1),
    ]
    assert sorted((s["replica"], v) for s, v in got["hami_placement_conflicts_total"]) == [
        ("p1", 5),
        ("p2", 1),
    ]
    assert {s["node"]: v for s, v in got["hami_node_healthy"]} == {"n1": 1, "n2": 0, "n3": 1}
    assert [s["reason"] for s, v in got["hami_node_healthy"] if s["node"] == "n2"] == [
        "no heartbeat for 10s"
    ]
    assert got["hami_pending_requests"] == [({}, 1)]
    [(labels, age)] = got["hami_pending_request_age_seconds"]
    assert (
        labels == {"namespace": "ns", "name": "a", "reason": "CardInsufficientMemory"}
        and age == 300
    )
    assert {s["verb"]: v for s, v in got["hami_events_total"]} == {"failed": 3, "decided": 3}


def test_top_reason_is_the_most_nodes_then_the_name() -> None:
    assert top_reason(PendingRequest(uid="u", name="u", reasons={"B": 1, "A": 1, "C": 0})) == "A"
    assert top_reason(PendingRequest(uid="u", name="u", reasons={"B": 3, "A": 1})) == "B"
    assert top_reason(PendingRequest(uid="u", name="u")) == "Unknown"


def test_feed_is_bounded_and_numbered() -> None:
    f = Fleet()
    for i in range(FEED_SIZE + 10):
        item = f.observe(NodeEvent(node=f"n{i}", verb="registered", at=float(i)))
    assert len(f.feed) == FEED_SIZE and f.feed[0]["seq"] == 11 and item["seq"] == FEED_SIZE + 10
    assert item["text"] == f"node n{FEED_SIZE + 9} registered" and item["at"] == FEED_SIZE + 9


def test_view_names_the_sharers_of_each_card_and_what_is_free() -> None:
    dev = [
        Device(uuid="GPU-0", index=0, type="T4", devmem=16000, count=4),
        Device(uuid="GPU-1", index=1, type="T4", devmem=16000, count=4),
    ]
    two = LedgerAlloc(
        uid="u1",
        name="train",
        namespace="a",
        containers=[
            ContainerGrant(
                name="init", init=True, devices=[CardGrant(uuid="GPU-0", mem=6000, cores=50)]
            ),
            ContainerGrant(name="m1", devices=[CardGrant(uuid="GPU-0", mem=3000, cores=20)]),
            ContainerGrant(name="m2", devices=[CardGrant(uuid="GPU-0", mem=2000, cores=10)]),
        ],
    )
    other = LedgerAlloc(
        uid="u2",
        name="infer",
        namespace="b",
        containers=[ContainerGrant(name="m", devices=[CardGrant(uuid="GPU-0", mem=1000, cores=5)])],
    )
    tel = Telemetry(
        node="n1",
        at=5.0,
        devices=[DeviceUsage(uuid="GPU-0", memory_used_mib=4000, utilization=0.25)],
        containers=[
            ContainerUsage(uid="u1", container="m1", uuid="GPU-0", memory_used_bytes=1000 * MIB),
            ContainerUsage(uid="u1", container="m2", uuid="GPU-0", memory_used_bytes=500 * MIB),
        ],
    )
    v = fleet_view(
        {"n1": NodeInventory(node="n1", devices=dev, cordoned=["GPU-1"])},
        {"n1": NodeLedger(node="n1", allocs={"u1": two, "u2": other})},
        {},
        {"n1": tel},
        [PendingRequest(uid="p", name="p", requested_at=10.0, message="why")],
        [],
        70.0,
    )
    c0, c1 = v["nodes"][0]["cards"]
    # The init peak (6000 MiB, 50 %) is above the app sum (5000, 30): the pod holds the peak.
    assert [
        (s["pod"], s["namespace"], s["mem_mib"], s["cores"], s["mem_used_mib"])
        for s in c0["sharers"]
    ] == [("train", "a", 6000, 50, 1500), ("infer", "b", 1000, 5, 0)]
    assert c0["sharers"][0]["containers"] == ["init", "m1", "m2"]
    assert (c0["mem_free_mib"], c0["cores_free"], c0["slots_used"], c0["slots_free"]) == (
        9000,
        45,
        3,
        1,
    )
    assert (c0["mem_used_mib"], c0["utilization"]) == (4000, 25)
    assert c1["sharers"] == [] and c1["cordoned"] and c1["mem_used_mib"] is None
    assert v["pending"] == [
        {
            "uid": "p",
            "name": "p",
            "namespace": "",
            "source": "cli",
            "waiting_s": 60.0,
            "message": "why",
            "reasons": {},
        }
    ]
