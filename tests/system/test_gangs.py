"""Gangs on a real nats-server with the real services: all or nothing, and no deadlock.

Two gangs that each need every card of the cluster, their members submitted in turns
(so each could hold half and wait for the other): one completes, the other waits with
nothing reserved and is placed once the first is released. A gang that cannot complete
holds nothing past its deadline and its members are told why; a placement stopped half
way through a gang and started again leaves no reservation past the deadline either.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from hami.system import System
from services.placement.service import PlacementService
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.schemas import (
    ContainerAsk,
    DeviceAsk,
    NodeLedger,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)

NODES = ["sim-node-0", "sim-node-1"]
CARDS = 4  # two nodes of two cards
GUARD_S = 90.0  # a hang fails the test instead of stalling the suite; not a speed limit


def member(gang: str, i: int, size: int, timeout: float = 20.0, gang_timeout: float = 20.0) -> SubmitRequest:
    name = f"{gang}-{i}"
    return SubmitRequest(
        name=name,
        containers=[ContainerAsk(name=name, devices=[DeviceAsk(nums=1, cores=100)])],  # a whole card
        wait=True, timeout=timeout, uid=str(uuid.uuid4()),
        gang=gang, gang_size=size, gang_timeout=gang_timeout,
    )


async def submit(bus: Bus, req: SubmitRequest) -> SubmitReply:
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=req.timeout + 10)


async def ledgers(bus: Bus) -> list[NodeLedger]:
    out = []
    for n in NODES:
        led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, n, NodeLedger)
        out.append(led or NodeLedger(node=n))
    return out


async def held(bus: Bus) -> dict[str, tuple[str, float]]:
    """uid -> (gang, reservation deadline; 0 once committed), over the whole cluster."""
    return {u: (a.gang, a.gang_expires) for led in await ledgers(bus) for u, a in led.allocs.items()}


async def until(cond: object, what: str, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not await cond():  # type: ignore[operator]
        assert time.monotonic() < end, what
        await asyncio.sleep(0.05)


@pytest.fixture
async def system(nats_url: str, cfg: Config) -> AsyncIterator[tuple[System, Bus]]:
    s = System(cfg, nats_url=nats_url, sim_nodes=2, sim_gpus=["A100-80GB:2:81920"], metrics_port=0)
    await s.start()
    bus = await Bus.connect(nats_url, "test")
    try:
        yield s, bus
    finally:
        await bus.close()
        await s.stop()


async def test_two_gangs_for_all_cards_neither_deadlocks(system: tuple[System, Bus]) -> None:
    _, bus = system
    async with asyncio.timeout(GUARD_S):
        # in turns: a0 b0 a1 b1 ... so that each gang holds part of the cluster early on
        tasks = {}
        for i in range(CARDS):
            for g in ("a", "b"):
                req = member(g, i, CARDS, timeout=60.0, gang_timeout=60.0)
                tasks[req.name] = asyncio.create_task(submit(bus, req))
                await asyncio.sleep(0.02)
        done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done)).result()
        assert first.ok, first
        winner = first.name.split("-")[0]
        loser = "b" if winner == "a" else "a"
        won = [await tasks[f"{winner}-{i}"] for i in range(CARDS)]
        assert all(r.ok for r in won), won
        assert len({(r.decision.node, r.decision.containers[0].devices[0].uuid) for r in won if r.decision}) == CARDS
        # all or nothing: the cluster holds the winner, committed, and nothing of the loser
        now = await held(bus)
        assert {u: g for u, (g, _) in now.items()} == {r.uid: f"/{winner}" for r in won}
        assert all(exp == 0 for _, exp in now.values())
        assert not any(tasks[f"{loser}-{i}"].done() for i in range(CARDS))
        for r in won:
            rel = await bus.request(subjects.API_RELEASE, ReleaseRequest(name=r.name), ReleaseReply, timeout=15)
            assert rel.ok, rel
        lost = [await tasks[f"{loser}-{i}"] for i in range(CARDS)]
        assert all(r.ok for r in lost), lost
        now = await held(bus)
        assert sorted(g for g, _ in now.values()) == [f"/{loser}"] * CARDS
        assert all(exp == 0 for _, exp in now.values())


async def test_a_partial_gang_is_rolled_back_at_its_deadline(system: tuple[System, Bus]) -> None:
    _, bus = system
    async with asyncio.timeout(GUARD_S):
        # three members of five: they fit, but the gang never completes
        replies = await asyncio.gather(*(submit(bus, member("c", i, 5, gang_timeout=1.5)) for i in range(3)))
        for r in replies:
            assert not r.ok and r.failure is not None, r
            assert r.failure.reason == "gang-expired" and "gang /c" in r.failure.message, r
        assert await held(bus) == {}
        # the cards are free again: a whole-cluster gang fits
        ok = await asyncio.gather(*(submit(bus, member("d", i, CARDS)) for i in range(CARDS)))
        assert all(r.ok for r in ok), ok


async def test_a_placement_restart_mid_gang_leaves_no_reservation_past_its_deadline(
    system: tuple[System, Bus], cfg: Config
) -> None:
    s, bus = system
    async with asyncio.timeout(GUARD_S):
        gang_timeout = 3.0
        waiting = [asyncio.create_task(submit(bus, member("e", i, 3, gang_timeout=gang_timeout)))
                   for i in range(2)]

        async def two_reserved() -> bool:
            return len([1 for g, exp in (await held(bus)).values() if g == "/e" and exp > 0]) == 2

        await until(two_reserved, "the two members were never reserved")
        deadline = max(exp for _, exp in (await held(bus)).values())
        old = next(svc for svc in s.services if isinstance(svc, PlacementService))
        await old.stop()
        s.services.remove(old)
        # a new placement knows the gang from the ledger only
        fresh = PlacementService(await s._bus("placement-2", "placement"), cfg)
        await fresh.start()
        s.services.append(fresh)

        async def none_left() -> bool:
            return not any(g == "/e" for g, _ in (await held(bus)).values())

        await until(none_left, "reservations outlived the gang's deadline")
        assert time.time() >= deadline  # rolled back at the deadline, not before
        for t in waiting:
            r = await t
            assert not r.ok and r.failure is not None and r.failure.reason == "gang-expired", r
