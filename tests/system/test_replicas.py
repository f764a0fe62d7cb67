"""Two placement replicas at once never double-book: the ledger's compare-and-set holds."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.inventory.service import InventoryService
from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends.sim import SimBackend, parse_gpu_spec
from services.placement.service import PlacementService
from shared import subjects
from shared.bus import Bus, decode_event
from shared.config import Config
from shared.schemas import (
    AllocDecided,
    AllocFailed,
    AllocRequested,
    CardGrant,
    ContainerAsk,
    ContainerGrant,
    DeviceAsk,
    LedgerAlloc,
    NodeLedger,
    card_usage,
)


def req(uid: str, pct: int) -> AllocRequested:
    return AllocRequested(uid=uid, name=uid, pending=False, requested_at=time.time(),
                          containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=pct, cores=10)])])


async def start_node(bus: Bus, cfg: Config, node: str, gpus: str) -> NodeAgent:
    agent = NodeAgent(bus, node, SimBackend(node, [parse_gpu_spec(gpus)]), cfg)
    await agent.start()
    return agent


async def one_replica(nats_url: str, cfg: Config, bus: Bus) -> tuple[Bus, NodeAgent, PlacementService]:
    """A placement replica on its own connection, and one node with one A10."""
    pbus = await Bus.connect(nats_url, "p")
    agent = await start_node(bus, cfg, "n1", "A10:1:24576")
    p = PlacementService(pbus, cfg, replica="p")
    await p.start()
    await wait_nodes(p, 1)
    return pbus, agent, p


async def wait_nodes(p: PlacementService, n: int) -> None:
    async with asyncio.timeout(5):
        while len(p.cluster.nodes) < n:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("batch", [1, 8])
async def test_two_replicas_never_double_book(nats_url: str, cfg: Config, bus: Bus, batch: int) -> None:
    buses = [await Bus.connect(nats_url, f"p{i}") for i in range(3)]
    inv = InventoryService(buses[2], cfg)
    await inv.start()
    agent = await start_node(buses[2], cfg, "n1", "A10:2:24576")
    a = PlacementService(buses[0], cfg, replica="a", fetch_batch=batch)
    b = PlacementService(buses[1], cfg, replica="b", fetch_batch=batch)
    await a.start()
    await b.start()
    await wait_nodes(a, 1)
    await wait_nodes(b, 1)
    outcomes: dict[str, object] = {}
    done = asyncio.Event()
    n_req = 60

    async def on_event(msg: object) -> None:
        ev = decode_event(msg.data)  # type: ignore[attr-defined]
        if isinstance(ev, AllocDecided | AllocFailed):
            outcomes.setdefault(ev.uid, ev)
            if len(outcomes) == n_req:
                done.set()

    await bus.subscribe("hami.evt.alloc.decided.>", on_event)
    await bus.subscribe(subjects.alloc("failed"), on_event)
    # 2 cards x 10 slots of 10 % memory and cores: 20 fit, 40 must fail.
    await asyncio.gather(*(
        bus.publish_event(subjects.alloc("requested"), req(f"r{i}", 10), msg_id=f"r{i}")
        for i in range(n_req)
    ))
    await asyncio.wait_for(done.wait(), 30)
    decided = [e for e in outcomes.values() if isinstance(e, AllocDecided)]
    assert len(decided) == 20
    if batch == 1:
        assert {e.replica for e in decided} == {"a", "b"}  # both replicas did real work
    led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, "n1", NodeLedger)
    assert led is not None and set(led.allocs) == {e.uid for e in decided}
    per_card: dict[str, list[int]] = {}
    for alloc in led.allocs.values():
        for uuid, (mem, cores, slots) in card_usage(alloc.containers).items():
            u = per_card.setdefault(uuid, [0, 0, 0])
            u[0] += mem
            u[1] += cores
            u[2] += slots
    assert all(m <= 24576 and c <= 100 and s <= 10 for m, c, s in per_card.values())
    # Every request is acknowledged, with a later batch's writes or after a short delay.
    async with asyncio.timeout(5):
        while (await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.PLACEMENT_CONSUMER)).num_ack_pending:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    for s in (a, b):
        await s.stop()
    await agent.stop()
    await inv.stop()
    for x in buses:
        await x.close()


async def test_stale_view_conflicts_and_decides_again(nats_url: str, cfg: Config, bus: Bus) -> None:
    pbus, agent, p = await one_replica(nats_url, cfg, bus)
    uuid = agent.inventory.devices[0].uuid  # type: ignore[union-attr]
    # A replica whose ledger watch lags behind: stop its watch.
    for t in p._bg.tasks:
        if t.get_name() == f"watch-{subjects.LEDGER_BUCKET}":
            t.cancel()
    # Another writer fills the card behind this replica's back...
    other = LedgerAlloc(uid="other", name="other", containers=[
        ContainerGrant(devices=[CardGrant(uuid=uuid, mem=24576, cores=100)])])
    await bus.kv_put(subjects.LEDGER_BUCKET, "n1", NodeLedger(node="n1", allocs={"other": other}))
    # ...and it decides on its stale view.
    placed = await p.handle_request(req("mine", 50))
    assert p.conflicts >= 1
    assert placed is False  # re-decided on the fresh ledger: the card is full
    led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, "n1", NodeLedger)
    assert led is not None and set(led.allocs) == {"other"}
    await p.stop()
    await agent.stop()
    await pbus.close()


class _Recorded:
    """Stands in for a delivered message: records how it was settled."""

    def __init__(self) -> None:
        self.settled: list[str] = []
        self.headers: dict[str, str] = {}
        self.subject = "hami.evt.alloc.requested"

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nak(self, delay: float = 0) -> None:
        self.settled.append("nak")


async def test_a_batch_is_acknowledged_only_once_its_events_are_stored(bus: Bus, cfg: Config) -> None:
    p = PlacementService(bus, cfg, replica="p")
    loop = asyncio.get_running_loop()
    stored, also_stored, lost = loop.create_future(), loop.create_future(), loop.create_future()
    good = [_Recorded(), _Recorded()]
    bad = [_Recorded(), _Recorded()]
    p._settle([(m, req(f"g{i}", 10)) for i, m in enumerate(good)], [stored])  # type: ignore[misc]
    p._settle([(m, req(f"b{i}", 10)) for i, m in enumerate(bad)], [also_stored, lost])  # type: ignore[misc]
    await asyncio.sleep(0.05)
    assert all(not m.settled for m in good + bad)  # nothing before the stream answers
    stored.set_result(7)
    also_stored.set_result(8)
    await asyncio.sleep(0.05)
    assert all(m.settled == ["ack"] for m in good)
    assert all(not m.settled for m in bad)  # one of its events is still unanswered
    lost.set_exception(TimeoutError("no acknowledgement"))
    await asyncio.sleep(0.05)
    assert all(m.settled == ["nak"] for m in bad)  # not stored: redelivered, never acknowledged
    await p.stop()


async def test_a_ledger_write_left_unanswered_forgets_its_bookings(nats_url: str, cfg: Config, bus: Bus) -> None:
    pbus, agent, p = await one_replica(nats_url, cfg, bus)

    async def no_answer(*args: object) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fut.set_exception(TimeoutError("no acknowledgement"))
        return fut

    pbus.kv_cas_nowait = no_answer  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):  # the batch is redelivered...
        async with p.lock:
            await p._handle_batch([(_Recorded(), req("lost", 50))], [])  # type: ignore[list-item]
    # ...and the view holds what the ledger does: the booking that never landed is gone
    assert "lost" not in p.owner
    assert "lost" not in p.cluster.ledger("n1").allocs
    del pbus.kv_cas_nowait
    assert await p.handle_request(req("whole", 100))  # the card is all free again
    await p.stop()
    await agent.stop()
    await pbus.close()
