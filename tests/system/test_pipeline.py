"""The whole pipeline on a real nats-server: a slice's life as an outside system sees it."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.js import api

from hami.system import System
from shared import subjects
from shared.bus import Bus, decode_event
from shared.config import Config
from shared.schemas import (
    AllocBound,
    AllocDecided,
    AllocFailed,
    AllocPrepared,
    AllocReleased,
    AllocRequested,
    ClusterStatus,
    Constraints,
    ContainerAsk,
    DeviceAsk,
    NodeLedger,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)


def ask(name: str, pct: int | None = 25, cores: int = 0, gpus: int = 1, **kw: object) -> SubmitRequest:
    return SubmitRequest(
        name=name,
        containers=[ContainerAsk(name=name, devices=[DeviceAsk(nums=gpus, mem_percent=pct, cores=cores)])],
        constraints=Constraints(**kw),  # type: ignore[arg-type]
    )


async def submit(bus: Bus, req: SubmitRequest) -> SubmitReply:
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=req.timeout + 5)


async def release(bus: Bus, name: str) -> ReleaseReply:
    return await bus.request(subjects.API_RELEASE, ReleaseRequest(name=name), ReleaseReply, timeout=15)


@pytest.fixture
async def system(nats_url: str, cfg: Config):
    s = System(cfg, nats_url=nats_url, sim_nodes=2, sim_gpus=["A100-80GB:4:81920"], metrics_port=0)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def test_outside_subscriber_sees_the_whole_life_of_one_slice(system: System, bus: Bus) -> None:
    # An outside system follows the durable stream with its own ordered consumer.
    seen: list[object] = []
    got_released = asyncio.Event()

    async def cb(msg: object) -> None:
        ev = decode_event(msg.data)  # type: ignore[attr-defined]
        seen.append(ev)
        if isinstance(ev, AllocReleased):
            got_released.set()

    sub = await bus.js.subscribe("hami.evt.alloc.>", cb=cb, ordered_consumer=True,
                                 deliver_policy=api.DeliverPolicy.ALL)
    r = await submit(bus, ask("job-1", pct=50, cores=30))
    assert r.ok and r.decision is not None
    assert (await release(bus, "job-1")).ok
    await asyncio.wait_for(got_released.wait(), 5)
    await sub.unsubscribe()

    mine = [e for e in seen if getattr(e, "uid", None) == r.uid]
    kinds = [type(e) for e in mine]
    # The node agent announces the slice ready once its files are written. It acts on
    # the ledger entry, which placement writes before it publishes ``decided``, and it
    # publishes on its own connection: ``prepared`` may come before ``decided`` or after
    # ``released`` in the stream (or not at all if released first), never before the ask.
    if AllocPrepared in kinds:
        assert kinds.count(AllocPrepared) == 1
        assert kinds.index(AllocRequested) < kinds.index(AllocPrepared)
        mine = [e for e in mine if not isinstance(e, AllocPrepared)]
        kinds = [type(e) for e in mine]
    assert kinds == [AllocRequested, AllocDecided, AllocBound, AllocReleased]
    decided = mine[1]
    assert isinstance(decided, AllocDecided)
    card = decided.containers[0].devices[0]
    assert card.mem == 40960 and card.cores == 30
    assert mine[3].node == decided.node  # type: ignore[attr-defined]


async def test_failure_names_reasons_and_is_published(system: System, bus: Bus) -> None:
    r = await submit(bus, ask("too-big", pct=None, gpus=5))
    assert not r.ok and r.failure is not None
    assert r.failure.nodes_total == 2
    assert sum(r.failure.reasons.values()) == 2
    assert "0/2 nodes" in r.failure.message
    # The stream holds the failed event too.
    info = await bus.js.get_last_msg(subjects.EVENTS_STREAM, subjects.alloc("failed"))
    ev = decode_event(info.data)
    assert isinstance(ev, AllocFailed) and ev.uid == r.uid


async def test_fills_cluster_then_reports_insufficient_memory_and_release_frees(system: System, bus: Bus) -> None:
    # 2 nodes x 4 cards x 4 quarters = 32 slices.
    replies = [await submit(bus, ask(f"q{i}")) for i in range(32)]
    assert all(r.ok for r in replies), [r.error or r.failure for r in replies if not r.ok]
    per_card: dict[str, int] = {}
    for r in replies:
        assert r.decision is not None
        for g in r.decision.containers[0].devices:
            per_card[g.uuid] = per_card.get(g.uuid, 0) + g.mem
    assert len(per_card) == 8 and set(per_card.values()) == {81920}
    r33 = await submit(bus, ask("q32"))
    assert not r33.ok and r33.failure is not None
    assert "CardInsufficientMemory" in r33.failure.reasons
    st = await bus.request(subjects.API_STATUS, ask("x"), ClusterStatus)
    assert sum(c.used_mem for n in st.nodes for c in n.cards) == 32 * 20480
    assert (await release(bus, "q5")).ok
    assert (await submit(bus, ask("q32"))).ok


async def test_pending_request_is_placed_when_capacity_frees(system: System, bus: Bus) -> None:
    for i in range(8):
        assert (await submit(bus, ask(f"whole{i}", pct=None))).ok
    waiting = asyncio.create_task(submit(bus, msgspec.structs.replace(ask("late", pct=10), wait=True, timeout=10)))
    await asyncio.sleep(0.5)
    assert not waiting.done()  # no timer retries it: it waits for capacity
    assert (await release(bus, "whole3")).ok
    r = await asyncio.wait_for(waiting, 10)
    assert r.ok and r.decision is not None


async def test_pending_request_is_placed_when_a_node_registers(nats_url: str, cfg: Config, bus: Bus) -> None:
    s = System(cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=["T4:1:16384"], metrics_port=0)
    await s.start()
    try:
        assert (await submit(bus, ask("a", pct=None))).ok
        waiting = asyncio.create_task(submit(bus, msgspec.structs.replace(ask("b", pct=None), wait=True, timeout=10)))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        from services.nodeagent.agent import NodeAgent
        from services.nodeagent.backends.sim import SimBackend, parse_gpu_spec

        agent = NodeAgent(s.buses[-1], "late-node", SimBackend("late-node", [parse_gpu_spec("T4:1:16384")]), cfg)
        await agent.start()
        try:
            r = await asyncio.wait_for(waiting, 10)
            assert r.ok and r.decision is not None and r.decision.node == "late-node"
        finally:
            await agent.stop()
    finally:
        await s.stop()


async def test_release_is_idempotent_and_malformed_messages_lose_nothing(system: System, bus: Bus) -> None:
    r = await submit(bus, ask("keep", pct=50))
    assert r.ok and r.decision is not None
    node = r.decision.node
    # Garbage on the request subject and a duplicate release of an unknown uid.
    await bus.js.publish(subjects.alloc("requested"), b"{not json")
    await bus.publish_event(subjects.alloc("released", node),
                            AllocReleased(uid="nope", node=node), msg_id="released:nope")
    r2 = await submit(bus, ask("after", pct=25))
    assert r2.ok
    led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, node, NodeLedger)
    assert led is not None and r.uid in led.allocs
    bad = await bus.nc.request(subjects.API_SUBMIT, b"[1,2]", timeout=5)
    assert b"error" in bad.data


async def test_namespace_quota_from_the_bucket_caps_placements(system: System, bus: Bus) -> None:
    from shared.schemas import Quota

    await bus.kv_put(subjects.QUOTA_BUCKET, "team-a", Quota(memory_mib=40960))
    await asyncio.sleep(0.2)  # the placement's watch applies it
    first = msgspec.structs.replace(ask("qa-1", pct=25), namespace="team-a")
    second = msgspec.structs.replace(ask("qa-2", pct=50), namespace="team-a")
    other = msgspec.structs.replace(ask("qb-1", pct=50), namespace="team-b")
    assert (await submit(bus, first)).ok  # 20480 of 40960 MiB
    r = await submit(bus, second)  # would make 61440
    assert not r.ok and r.failure is not None and "ResourceQuotaNotFit" in r.failure.reasons
    assert (await submit(bus, other)).ok  # another namespace is not capped


async def test_unknown_policies_are_refused_with_the_known_ones_named(system: System, bus: Bus) -> None:
    from shared.schemas import ErrorReply

    for bad, what in ((ask("p1", node_policy="roundrobin"), "node policy"),
                      (ask("p2", gpu_policy="binpack,fastest"), "gpu policy")):
        raw = await bus.nc.request(subjects.API_SUBMIT, msgspec.json.encode(bad), timeout=10)
        err = msgspec.json.decode(raw.data, type=ErrorReply)
        assert what in err.error and "binpack" in err.error
    r = await submit(bus, ask("p3", node_policy="frag"))
    assert r.ok
