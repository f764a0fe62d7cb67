"""Poison messages, bounds and garbage on a real nats-server, with the real services.

A request that makes placement raise is delivered a bounded number of times, then
answered with an error and kept on the dead-letter stream, while its batch neighbours
are placed; numbers out of bounds are refused where a request enters and again where
it is decided; a garbage ledger or inventory entry sets its node aside without
breaking ``hami.api.status``; the event stream's retention comes from the config.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg

from hami.system import System
from services.placement.engine import Placer
from services.placement.service import PlacementService
from shared import subjects
from shared.bus import Bus, decode_event
from shared.config import Config
from shared.schemas import (
    AllocDecided,
    AllocFailed,
    AllocRequested,
    ClusterStatus,
    ContainerAsk,
    DeviceAsk,
    ErrorReply,
    NodeEvent,
    NodeLedger,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
)

MAX_DELIVERIES = 3


@pytest.fixture
async def system(nats_url: str, cfg: Config) -> AsyncIterator[System]:
    cfg.bus.max_deliveries = MAX_DELIVERIES
    cfg.bus.stream_max_age = 3600.0
    cfg.bus.stream_max_bytes = 64 << 20
    s = System(cfg, nats_url=nats_url, sim_nodes=2, sim_gpus=["A100-80GB:4:81920"], metrics_port=0)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def placement(system: System) -> PlacementService:
    return next(s for s in system.services if isinstance(s, PlacementService))


def request(uid: str, mem: int = 1000, pending: bool = False) -> AllocRequested:
    return AllocRequested(
        uid=uid, name=uid, containers=[ContainerAsk(name="c", devices=[DeviceAsk(nums=1, mem=mem)])],
        pending=pending, source="api", requested_at=time.time(),
    )


class Answers:
    """Every decided / failed event, by uid, as an outside follower sees them."""

    def __init__(self) -> None:
        self.by_uid: dict[str, list[AllocDecided | AllocFailed]] = {}
        self.changed = asyncio.Event()

    async def cb(self, msg: Msg) -> None:
        ev = decode_event(msg.data)
        if isinstance(ev, AllocDecided | AllocFailed):
            self.by_uid.setdefault(ev.uid, []).append(ev)
            self.changed.set()

    async def wait(self, uids: list[str], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not all(u in self.by_uid for u in uids):
                self.changed.clear()
                await self.changed.wait()


async def follow(bus: Bus) -> Answers:
    a = Answers()
    await bus.nc.subscribe(subjects.alloc_any("decided"), cb=a.cb)
    await bus.nc.subscribe(subjects.alloc("failed"), cb=a.cb)
    await bus.nc.flush()
    return a


async def test_poison_request_is_dead_lettered_and_its_neighbours_placed(
    system: System, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = placement(system)
    calls: list[str] = []
    real = Placer.decide

    def decide(self: Placer, req: AllocRequested, **kw: bool) -> object:
        calls.append(req.uid)
        if req.uid == "poison":  # fault injection: a handler bug for this one request
            raise OverflowError("Python int too large to convert to C long")
        return real(self, req, **kw)

    monkeypatch.setattr(Placer, "decide", decide)
    answers = await follow(bus)
    uids = ["good-1", "good-2", "poison", "good-3", "good-4"]
    # Published back to back, so that they arrive together and share a batch.
    futs = [await bus.publish_event_nowait(subjects.alloc("requested"), request(u), msg_id=f"r:{u}")
            for u in uids]
    await asyncio.gather(*futs)
    await answers.wait(uids)

    for u in uids:
        if u != "poison":
            assert [type(e) for e in answers.by_uid[u]] == [AllocDecided], u
    (failed,) = answers.by_uid["poison"]
    assert isinstance(failed, AllocFailed)
    assert failed.reasons == {"internal-error": 1} and not failed.pending
    assert "OverflowError" in failed.message and f"{MAX_DELIVERIES} attempts" in failed.message

    # Kept, as it came, on the dead-letter stream, with what went wrong.
    info = await bus.js.stream_info(subjects.DLQ_STREAM)
    assert info.state.messages == 1
    dead = await bus.js.get_last_msg(subjects.DLQ_STREAM, subjects.dlq("placement"))
    assert dead.headers is not None
    assert dead.headers[subjects.DLQ_SUBJECT] == subjects.alloc("requested")
    assert dead.headers[subjects.DLQ_DELIVERIES] == str(MAX_DELIVERIES)
    assert "OverflowError" in dead.headers[subjects.DLQ_ERROR]
    ev = decode_event(dead.data or b"")
    assert isinstance(ev, AllocRequested) and ev.uid == "poison"
    assert svc.dead_letters == 1

    # Never redelivered again: the consumer holds nothing unacknowledged.
    tried = calls.count("poison")
    assert tried <= 2 * MAX_DELIVERIES  # at most its batch's try and its own, per delivery
    async with asyncio.timeout(20):
        while (await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.PLACEMENT_CONSUMER)).num_ack_pending:  # noqa: ASYNC110 - polled state, no event to await
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # longer than the last redelivery delay
    assert calls.count("poison") == tried
    ci = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.PLACEMENT_CONSUMER)
    assert ci.config.max_deliver == MAX_DELIVERIES + 2  # the server's own backstop


async def test_out_of_bounds_request_on_the_bus_is_answered_invalid_once(system: System, bus: Bus) -> None:
    answers = await follow(bus)
    await bus.publish_event(subjects.alloc("requested"), request("huge", mem=2**63), msg_id="r:huge")
    await bus.publish_event(subjects.alloc("requested"), request("fine"), msg_id="r:fine")
    await answers.wait(["huge", "fine"])
    (failed,) = answers.by_uid["huge"]
    assert isinstance(failed, AllocFailed) and failed.reasons == {"invalid": 1}
    assert not failed.pending and "gpu memory" in failed.message
    assert isinstance(answers.by_uid["fine"][0], AllocDecided)
    async with asyncio.timeout(20):
        while (await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.PLACEMENT_CONSUMER)).num_ack_pending:  # noqa: ASYNC110 - polled state, no event to await
            await asyncio.sleep(0.1)
    ci = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.PLACEMENT_CONSUMER)
    assert ci.num_redelivered == 0  # refused once, not retried
    assert (await bus.js.stream_info(subjects.DLQ_STREAM)).state.messages == 0
    assert "huge" not in placement(system).pending


async def test_out_of_bounds_submit_is_refused_at_entry(system: System, bus: Bus) -> None:
    for dev, words in (
        (DeviceAsk(nums=1, mem=2**40), "gpu memory"),
        (DeviceAsk(nums=1, mem=2**63), "gpu memory"),
    ):
        req = SubmitRequest(name="absurd", containers=[ContainerAsk(name="c", devices=[dev])])
        reply = await bus.request(subjects.API_SUBMIT, req, ErrorReply, timeout=10)
        assert words in reply.error, reply.error
    many = SubmitRequest(name="many", containers=[ContainerAsk(name=f"c{i}") for i in range(65)])
    reply = await bus.request(subjects.API_SUBMIT, many, ErrorReply, timeout=10)
    assert "65 containers" in reply.error
    long = SubmitRequest(name="n", namespace="x" * 64, containers=[ContainerAsk(name="c")])
    reply = await bus.request(subjects.API_SUBMIT, long, ErrorReply, timeout=10)
    assert "namespace" in reply.error


async def _status(bus: Bus) -> ClusterStatus:
    return await bus.request(subjects.API_STATUS, StatusRequest(detail=True), ClusterStatus, timeout=10)


async def _node_events(bus: Bus) -> list[NodeEvent]:
    got: list[NodeEvent] = []

    async def cb(msg: Msg) -> None:
        ev = decode_event(msg.data)
        if isinstance(ev, NodeEvent):
            got.append(ev)

    await bus.nc.subscribe(f"{subjects.PREFIX}.evt.node.>", cb=cb)
    await bus.nc.flush()
    return got


async def _submit(bus: Bus, name: str) -> SubmitReply:
    req = SubmitRequest(name=name, containers=[ContainerAsk(name="c", devices=[DeviceAsk(nums=1, mem=1000)])])
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=20)


async def test_garbage_ledger_entry_sets_its_node_aside(system: System, bus: Bus) -> None:
    events = await _node_events(bus)
    svc = placement(system)
    kv = await bus.kv(subjects.LEDGER_BUCKET)
    key = subjects.kv_key("sim-node-0")
    await kv.put(key, b"{not json")
    await kv.put(key, b"{not json")  # the same garbage again: no second event
    async with asyncio.timeout(10):
        while key not in svc.garbage or not events:  # noqa: ASYNC110 - polled state, no event to await
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # a few inventory ticks: had it announced twice, it would show
    unhealthy = [e for e in events if e.node == "sim-node-0" and e.verb == "unhealthy"]
    assert len(unhealthy) == 1 and "ledger entry is garbage" in unhealthy[0].reason

    st = await _status(bus)  # still answers
    by_node = {n.node: n for n in st.nodes}
    assert set(by_node) == {"sim-node-0", "sim-node-1"}
    assert not by_node["sim-node-0"].healthy and by_node["sim-node-1"].healthy
    # Binpack would fill one node first; every placement avoids the set-aside node.
    for i in range(4):
        r = await _submit(bus, f"job-{i}")
        assert r.ok and r.decision is not None and r.decision.node == "sim-node-1", r

    # A good entry again: the node is usable again.
    await kv.put(key, b'{"v":1,"node":"sim-node-0","allocs":{}}')
    async with asyncio.timeout(10):
        while key in svc.garbage:  # noqa: ASYNC110 - polled state, no event to await
            await asyncio.sleep(0.05)
    assert NodeLedger(node="sim-node-0") == svc.cluster.ledger("sim-node-0")


async def test_garbage_inventory_entries_leave_status_answering(system: System, bus: Bus) -> None:
    events = await _node_events(bus)
    kv = await bus.kv(subjects.NODES_BUCKET)
    await kv.put(subjects.kv_key("sim-node-1"), b'{"node": 12}')  # does not decode
    # Decodes, but names another node and claims negative memory.
    await kv.put(subjects.kv_key("ghost"), b'{"node":"sim-node-0","devices":'
                 b'[{"uuid":"G","index":0,"type":"X","devmem":-5}]}')
    async with asyncio.timeout(10):
        while {e.node for e in events if e.verb == "unhealthy"} != {"sim-node-1", "ghost"}:  # noqa: ASYNC110 - polled state, no event to await
            await asyncio.sleep(0.05)
    ghost = next(e for e in events if e.node == "ghost")
    assert "names node 'sim-node-0'" in ghost.reason and "must be 0.." in ghost.reason

    st = await _status(bus)
    assert [n.node for n in st.nodes] == ["sim-node-0"]
    svc = placement(system)
    assert set(svc.cluster.nodes) == {"sim-node-0"}
    r = await _submit(bus, "after-garbage")
    assert r.ok and r.decision is not None and r.decision.node == "sim-node-0"


async def test_stream_retention_comes_from_the_config(system: System) -> None:
    # A client that sets nothing up (the ``bus`` fixture would apply the defaults).
    bus = await Bus.connect(system.nats_url or "", "probe", setup=False)
    try:
        await _retention(system, bus)
    finally:
        await bus.close()


async def _retention(system: System, bus: Bus) -> None:
    info = await bus.js.stream_info(subjects.EVENTS_STREAM)
    assert info.config.max_age == 3600.0 and info.config.max_bytes == 64 << 20
    dlq = await bus.js.stream_info(subjects.DLQ_STREAM)
    assert dlq.config.max_age == 3600.0 and 0 < (dlq.config.max_bytes or 0) <= 64 << 20

    # An existing stream is brought to new settings by its owner at start.
    cfg = Config()
    cfg.bus.stream_max_age = 7200.0
    cfg.bus.stream_max_bytes = 32 << 20
    again = await Bus.connect(system.nats_url or "", "placement", settings=cfg.bus)
    try:
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        assert info.config.max_age == 7200.0 and info.config.max_bytes == 32 << 20
    finally:
        await again.close()
