"""Standalone preemption on a real nats-server with the real services.

With ``scheduler.preemption`` on (and every service under its own role's identity, so
placement's right to publish the victims' events is tested too): a full cluster of
priority 0 takes a priority-10 request by releasing the youngest victim that makes room,
its ``released`` (reason preempted) and ``preempted`` events are on the stream, status no
longer lists it and no card is over capacity; a request never preempts its equals; a
whole-card request takes the two victims of one card. With preemption off (HAMi's
behaviour) the same request is refused and nobody is released. ``hami submit
--priority`` reaches the ledger.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hami.creds import Store, roles_for
from hami.system import System
from shared import subjects
from shared.bus import Bus, decode_event
from shared.config import Config
from shared.natsserver import EmbeddedNats
from shared.schemas import (
    AllocPreempted,
    AllocReleased,
    ClusterStatus,
    ContainerAsk,
    DeviceAsk,
    NodeLedger,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
)

NODE = "sim-node-0"
GUARD_S = 60.0  # a hang fails the test instead of stalling the suite; not a speed limit
_ENTRY = Path(sys.executable).parent / "hami"
HAMI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "hami.cli"]


def ask(name: str, pct: int | None, prio: int) -> SubmitRequest:
    return SubmitRequest(
        name=name,
        containers=[
            ContainerAsk(
                name=name, devices=[DeviceAsk(mem_percent=pct, cores=100 if pct is None else 0)]
            )
        ],
        pod_priority=prio,
        uid=str(uuid.uuid4()),
    )


async def submit(bus: Bus, req: SubmitRequest) -> SubmitReply:
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=req.timeout + 10)


async def status(bus: Bus) -> ClusterStatus:
    return await bus.request(
        subjects.API_STATUS, StatusRequest(detail=True), ClusterStatus, timeout=10
    )


async def ledger(bus: Bus) -> NodeLedger:
    led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, NODE, NodeLedger)
    return led or NodeLedger(node=NODE)


async def stored_events(bus: Bus, subject: str) -> list[object]:
    """What the durable stream holds on ``subject`` (not what a subscriber happened to see)."""
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
    out: list[object] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return out
            out.append(decode_event(msg.data))
    finally:
        await sub.unsubscribe()


def assert_within_capacity(st: ClusterStatus) -> None:
    for n in st.nodes:
        for c in n.cards:
            assert (
                c.used_mem <= c.total_mem
                and c.used_cores <= c.total_cores
                and c.used_slots <= c.total_slots
            ), c


async def fill(bus: Bus) -> list[SubmitReply]:
    """Four half cards of priority 0 on the node's two cards: full."""
    out = []
    for i in range(4):
        r = await submit(bus, ask(f"low{i}", 50, 0))
        assert r.ok, r
        out.append(r)
    return out


@pytest.fixture
async def secured(tmp_path: Path, cfg: Config) -> AsyncIterator[tuple[System, Bus]]:
    cfg.scheduler.preemption = True
    store = Store(tmp_path / "state")
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.configure(store.server_config(roles_for([NODE])))
    await server.astart()
    s = System(
        cfg,
        nats_url=server.url,
        sim_nodes=1,
        sim_gpus=["A100-80GB:2:81920"],
        metrics_port=0,
        auth=store,
    )
    try:
        await s.start()
        bus = await Bus.connect(server.url, "test", creds=store.credentials("admin"))
        try:
            yield s, bus
        finally:
            await bus.close()
    finally:
        await s.stop()
        server.cleanup()


async def test_a_higher_priority_request_preempts_the_youngest_victim(
    secured: tuple[System, Bus],
) -> None:
    _, bus = secured
    async with asyncio.timeout(GUARD_S):
        low = await fill(bus)
        assert not (await submit(bus, ask("equal", 50, 0))).ok  # never its equals
        high = await submit(bus, ask("high", 50, 10))
        assert high.ok, high
        assert high.decision is not None and high.decision.node == NODE
        # the youngest of the two on the card it got (the slices alternate cards)
        card = high.decision.containers[0].devices[0].uuid
        same = [
            r
            for r in low
            if r.decision is not None and r.decision.containers[0].devices[0].uuid == card
        ]
        assert len(same) == 2
        victim = max(low, key=lambda r: r.decision.decided_at if r.decision else 0.0)
        assert victim in same  # any one of them makes room: the youngest goes
        released = [
            e
            for e in await stored_events(bus, subjects.alloc_any("released"))
            if isinstance(e, AllocReleased)
        ]
        assert [(e.uid, e.reason, e.node) for e in released] == [(victim.uid, "preempted", NODE)]
        preempted = [
            e
            for e in await stored_events(bus, subjects.alloc_any("preempted"))
            if isinstance(e, AllocPreempted)
        ]
        assert len(preempted) == 1
        p = preempted[0]
        assert (p.uid, p.by_uid, p.by_name, p.priority, p.by_priority) == (
            victim.uid,
            high.uid,
            "high",
            0,
            10,
        )
        led = await ledger(bus)
        assert victim.uid not in led.allocs and led.allocs[high.uid].pod_priority == 10
        st = await status(bus)
        listed = {u for n in st.nodes for u in n.allocations}
        assert "low3" not in listed and victim.name not in listed and "high" in listed
        assert_within_capacity(st)

        # A whole card: the two priority-0 slices of the other card go, not the
        # priority-10 one.
        whole = await submit(bus, ask("whole", None, 10))
        assert whole.ok, whole
        others = {r.uid for r in low if r.decision is not None} - {r.uid for r in same}
        led = await ledger(bus)
        assert others.isdisjoint(led.allocs)
        assert high.uid in led.allocs and whole.uid in led.allocs
        names = {
            e.uid
            for e in await stored_events(bus, subjects.alloc_any("preempted"))
            if isinstance(e, AllocPreempted) and e.by_uid == whole.uid
        }
        assert names == others
        assert_within_capacity(await status(bus))


@pytest.fixture
async def plain(
    nats_url: str, cfg: Config, request: pytest.FixtureRequest
) -> AsyncIterator[System]:
    cfg.scheduler.preemption = bool(request.param)
    s = System(cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=["A100-80GB:2:81920"], metrics_port=0)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.mark.parametrize("plain", [False], indirect=True)
async def test_with_preemption_off_the_request_is_refused_as_before(
    plain: System, bus: Bus
) -> None:
    async with asyncio.timeout(GUARD_S):
        low = await fill(bus)
        high = await submit(bus, ask("high", 50, 10))
        assert not high.ok and high.failure is not None
        assert high.failure.reasons  # HAMi's reason counts, as without priorities
        led = await ledger(bus)
        assert {r.uid for r in low} <= set(led.allocs) and high.uid not in led.allocs
        assert not await stored_events(bus, subjects.alloc_any("preempted"))


@pytest.mark.parametrize("plain", [True], indirect=True)
async def test_hami_submit_priority_reaches_the_ledger(
    plain: System, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    async with asyncio.timeout(GUARD_S):
        await fill(bus)
        env = {"HAMI_STATE_FILE": str(tmp_path / "state.json"), "PATH": "/usr/bin:/bin"}
        cmd = [
            *HAMI,
            "submit",
            "cli-high",
            "--mem-percent",
            "50",
            "--priority",
            "7",
            "--json",
            "--nats-url",
            nats_url,
        ]
        done = await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, env=env, timeout=30
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        led = await ledger(bus)
        assert led.allocs[out["uid"]].pod_priority == 7
        bad = await asyncio.to_thread(
            subprocess.run,
            [*HAMI, "submit", "x", "--priority", "high", "--nats-url", nats_url],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert bad.returncode == 2 and "not an integer" in bad.stderr
