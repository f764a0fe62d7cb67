"""Over-quota rebalancing, standalone, on a real nats-server with the real services.

One node of two 80 GiB cards; queues ``scratch`` and ``late``, neither with a
guarantee, ``late`` of weight 3. ``scratch`` borrows the whole idle cluster in quarter
cards. Rebalancing is off by default: ``late``, over its (empty) guarantee, gets nothing
while nothing ends. Turned on (with ``scheduler.preemption``), each quarter card
``late`` asks for preempts one of ``scratch``'s, youngest first, while ``late``'s
over-quota share per weight after the move, times 1 + REBALANCE_MARGIN, stays below
``scratch``'s: five of the eight (ideal 6), and no further.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest

from hami.system import System
from services.placement.engine import queues as fair
from services.placement.service import PlacementService
from shared import config, subjects
from shared.bus import Bus
from shared.config import Config, QueueSettings
from shared.schemas import ContainerAsk, DeviceAsk, NodeLedger, SubmitReply, SubmitRequest

NODE = "sim-node-0"
CARD = 81920
GUARD_S = 60.0  # a hang fails the test instead of stalling the suite; not a speed limit


def ask(name: str, queue: str) -> SubmitRequest:
    return SubmitRequest(
        name=name,
        containers=[ContainerAsk(name=name, devices=[DeviceAsk(mem_percent=25)])],
        queue=queue,
        uid=str(uuid.uuid4()),
    )


async def submit(bus: Bus, req: SubmitRequest) -> SubmitReply:
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=req.timeout + 10)


async def held(bus: Bus) -> dict[str, list[str]]:
    led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, NODE, NodeLedger)
    out: dict[str, list[str]] = {}
    for a in (led or NodeLedger(node=NODE)).allocs.values():
        out.setdefault(a.queue, []).append(a.uid)
    return out


@pytest.fixture
async def system(nats_url: str, cfg: Config) -> AsyncIterator[tuple[System, Bus]]:
    cfg.scheduler.preemption = True
    cfg.queues = [QueueSettings(name="scratch"), QueueSettings(name="late", over_quota_weight=3)]
    s = System(
        cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=[f"A100-80GB:2:{CARD}"], metrics_port=0
    )
    await s.start()
    try:
        bus = await Bus.connect(nats_url, "test")
        try:
            yield s, bus
        finally:
            await bus.close()
    finally:
        await s.stop()


async def test_a_late_queue_takes_its_weighted_share_by_preemption(
    system: tuple[System, Bus],
) -> None:
    s, bus = system
    placement = next(x for x in s.services if isinstance(x, PlacementService))
    async with asyncio.timeout(GUARD_S):
        lent = []
        for i in range(8):
            r = await submit(bus, ask(f"scratch-{i}", "scratch"))
            assert r.ok, r
            lent.append(r)
        # off by default: late is over its guarantee, scratch's slices are its equals
        assert not placement.queue_rebalance
        r = await submit(bus, ask("late-off", "late"))
        assert not r.ok
        assert set(await held(bus)) == {"scratch"}

        placement.queue_rebalance = True
        got = [await submit(bus, ask(f"late-{i}", "late")) for i in range(8)]
        # 1.25 * k / 3 < 8 - k up to k = 5 (after the move, in quarter cards)
        assert [r.ok for r in got] == [True] * 5 + [False] * 3
        by = await held(bus)
        assert len(by["late"]) == 5 and len(by["scratch"]) == 3
        # the youngest of scratch's went, the oldest stayed
        order = sorted(lent, key=lambda r: r.decision.decided_at if r.decision else 0.0)
        assert sorted(by["scratch"]) == sorted(r.uid for r in order[:3])
        assert fair.REBALANCE_MARGIN == 0.25  # what the five above were worked out with


def test_the_setting_reaches_placement() -> None:
    # scheduler.queueRebalance (docs/queues.md) is what turns the attribute above on
    cfg = config.load(env={"HAMI__SCHEDULER__QUEUEREBALANCE": "true"})
    assert cfg.scheduler.queue_rebalance and not config.Config().scheduler.queue_rebalance
    assert PlacementService(cast(Bus, None), cfg).queue_rebalance
