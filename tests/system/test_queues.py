"""Queues with fair share, standalone, on a real nats-server with the real services.

One node of two 80 GiB cards; queues ``org`` (guarantee both cards) with children
``research`` (guarantee one card) and ``batch`` (no guarantee), and ``capped`` (no
guarantee, at most 40 GiB). Under every service's own identity: ``batch`` borrows the
whole idle cluster; ``research``, under its guarantee, takes its card back by preempting
``batch``'s borrowed slices (the youngest first), up to its guarantee and no further.
Through ``hami`` itself: ``--queue`` reaches the ledger, a limit refuses with the queue
named, an unknown queue is refused, and ``hami queues`` shows guarantee, use, borrowed
and pending.
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
from shared import auth, subjects
from shared.bus import Bus, decode_event
from shared.config import Config, QueueAmount, QueueSettings
from shared.natsserver import EmbeddedNats
from shared.schemas import (
    AllocReleased,
    ClusterStatus,
    ContainerAsk,
    DeviceAsk,
    NodeLedger,
    QueuesReply,
    QueuesRequest,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
)

NODE = "sim-node-0"
CARD = 81920
GUARD_S = 60.0  # a hang fails the test instead of stalling the suite; not a speed limit
_ENTRY = Path(sys.executable).parent / "hami"
HAMI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "hami.cli"]


def queues() -> list[QueueSettings]:
    return [
        QueueSettings(name="org", guarantee=QueueAmount(memory=2 * CARD, cores=200)),
        QueueSettings(name="research", parent="org", guarantee=QueueAmount(memory=CARD, cores=100)),
        QueueSettings(name="batch", parent="org"),
        QueueSettings(name="capped", limit=QueueAmount(memory=CARD // 2)),
    ]


def ask(name: str, queue: str, pct: int = 50, prio: int = 0) -> SubmitRequest:
    return SubmitRequest(
        name=name,
        containers=[ContainerAsk(name=name, devices=[DeviceAsk(mem_percent=pct)])],
        pod_priority=prio,
        queue=queue,
        uid=str(uuid.uuid4()),
    )


async def submit(bus: Bus, req: SubmitRequest) -> SubmitReply:
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=req.timeout + 10)


async def ledger(bus: Bus) -> NodeLedger:
    led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, NODE, NodeLedger)
    return led or NodeLedger(node=NODE)


async def released(bus: Bus) -> list[AllocReleased]:
    sub = await bus.js.subscribe(subjects.alloc_any("released"), ordered_consumer=True)
    out: list[AllocReleased] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return out
            ev = decode_event(msg.data)
            if isinstance(ev, AllocReleased):
                out.append(ev)
    finally:
        await sub.unsubscribe()


async def within_capacity(bus: Bus) -> None:
    st = await bus.request(
        subjects.API_STATUS, StatusRequest(detail=True), ClusterStatus, timeout=10
    )
    for n in st.nodes:
        for c in n.cards:
            assert c.used_mem <= c.total_mem and c.used_cores <= c.total_cores, c


@pytest.fixture
async def secured(tmp_path: Path, cfg: Config) -> AsyncIterator[Bus]:
    cfg.scheduler.preemption = True
    cfg.queues = queues()
    store = Store(tmp_path / "state")
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.configure(store.server_config(roles_for([NODE])))
    await server.astart()
    s = System(
        cfg,
        nats_url=server.url,
        sim_nodes=1,
        sim_gpus=[f"A100-80GB:2:{CARD}"],
        metrics_port=0,
        auth=store,
    )
    try:
        await s.start()
        bus = await Bus.connect(server.url, "test", creds=store.credentials("admin"))
        try:
            yield bus
        finally:
            await bus.close()
    finally:
        await s.stop()
        server.cleanup()


async def test_a_queue_under_its_guarantee_reclaims_what_another_borrowed(secured: Bus) -> None:
    bus = secured
    async with asyncio.timeout(GUARD_S):
        lent = []
        for i in range(4):  # batch has no guarantee: it borrows the idle cluster
            r = await submit(bus, ask(f"batch-{i}", "batch"))
            assert r.ok, r
            lent.append(r)
        got = await bus.request(subjects.PLACEMENT_QUEUES, QueuesRequest(), QueuesReply, timeout=10)
        by = {q.name: q for q in got.queues}
        assert (by["batch"].used_mem, by["batch"].borrowed_mem) == (2 * CARD, 2 * CARD)
        assert (by["org"].used_mem, by["org"].borrowed_mem) == (2 * CARD, 0)
        assert by["research"].used_mem == 0
        youngest = sorted(lent, key=lambda r: r.decision.decided_at if r.decision else 0.0)
        # research is under its guarantee: each half card it asks for is reclaimed
        for i in range(2):
            r = await submit(bus, ask(f"research-{i}", "research"))
            assert r.ok, r
        gone = {e.uid for e in await released(bus) if e.reason == "preempted"}
        assert gone <= {r.uid for r in lent} and len(gone) == 2
        assert youngest[-1].uid in gone  # the youngest borrowed slice goes first
        # at its guarantee now: a third half card would be over it, and batch's are equals
        third = await submit(bus, ask("research-2", "research"))
        assert not third.ok
        led = await ledger(bus)
        assert sum(1 for a in led.allocs.values() if a.queue == "research") == 2
        assert sum(1 for a in led.allocs.values() if a.queue == "batch") == 2
        await within_capacity(bus)
    # the roles' rights the test above relied on, and the CLI's to ask
    assert auth.may_subscribe(auth.PLACEMENT, subjects.PLACEMENT_QUEUES)
    assert auth.may_publish(auth.CLI, subjects.PLACEMENT_QUEUES)


@pytest.fixture
async def plain(nats_url: str, cfg: Config) -> AsyncIterator[System]:
    cfg.queues = queues()
    s = System(
        cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=[f"A100-80GB:2:{CARD}"], metrics_port=0
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def hami(tmp_path: Path, nats_url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {"HAMI_STATE_FILE": str(tmp_path / "state.json"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [*HAMI, *argv, "--nats-url", nats_url], capture_output=True, text=True, env=env, timeout=30
    )


async def test_hami_submit_queue_limits_and_hami_queues(
    plain: System, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    async with asyncio.timeout(GUARD_S):
        ok = await asyncio.to_thread(
            hami,
            tmp_path,
            nats_url,
            "submit",
            "c1",
            "--mem-percent",
            "50",
            "--queue",
            "capped",
            "--json",
        )
        assert ok.returncode == 0, ok.stderr
        uid = json.loads(ok.stdout)["uid"]
        assert (await ledger(bus)).allocs[uid].queue == "capped"
        over = await asyncio.to_thread(
            hami, tmp_path, nats_url, "submit", "c2", "--mem-percent", "50", "--queue", "capped"
        )
        assert over.returncode == 1
        assert (
            f"queue 'capped' limit: GPU memory {CARD}/{CARD // 2} MiB" in over.stdout + over.stderr
        )
        bad = await asyncio.to_thread(
            hami, tmp_path, nats_url, "submit", "x", "--mem-percent", "10", "--queue", "nope"
        )
        assert bad.returncode == 1 and "queue 'nope' is not defined" in bad.stdout + bad.stderr
        r = await submit(bus, ask("b1", "batch", pct=100))
        assert r.ok, r
        shown = await asyncio.to_thread(hami, tmp_path, nats_url, "queues", "--json")
        assert shown.returncode == 0, shown.stderr
        rows = {q["name"]: q for q in json.loads(shown.stdout)["queues"]}
        assert rows["capped"]["used"]["mem_mib"] == CARD // 2
        assert rows["capped"]["limit"]["mem_mib"] == CARD // 2
        assert rows["batch"]["borrowed"]["mem_mib"] == CARD
        assert rows["research"]["guarantee"] == {"mem_mib": CARD, "cores": 100}
        assert rows["org"]["used"]["mem_mib"] == CARD and rows["org"]["borrowed"]["mem_mib"] == 0
        assert set(rows) == {"org", "research", "batch", "capped", "default"}
        text = await asyncio.to_thread(hami, tmp_path, nats_url, "queues")
        assert text.returncode == 0 and "research" in text.stdout and "BORROWED" in text.stdout
