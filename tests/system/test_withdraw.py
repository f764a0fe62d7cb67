"""Every request gets one answer; a request nobody waits for is never placed.

On a real nats-server with the real services: a waiting submit holds back no other
request; a withdrawn or expired request is never placed, also when it is redelivered
after a crash; a binder that dies holding a waiter leaves nothing allocated; Ctrl-C of
``hami submit --wait`` withdraws.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats.errors
import pytest

from hami.system import System
from services.binder.service import BinderService
from services.nodeagent.agent import NodeAgent
from services.nodeagent.backends.sim import SimBackend, parse_gpu_spec
from services.placement.service import DECISION_FILTERS, PlacementService
from shared import subjects
from shared.bus import Bus, decode_event
from shared.config import Config
from shared.outcomes import Outcomes
from shared.schemas import (
    AllocDecided,
    AllocFailed,
    AllocReleased,
    AllocRequested,
    ContainerAsk,
    DeviceAsk,
    ErrorReply,
    NodeLedger,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
    WithdrawReply,
    WithdrawRequest,
)

_ENTRY = Path(sys.executable).parent / "hami"
HAMI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "hami.cli"]
GUARD_S = 60.0  # a hang fails the test instead of stalling the suite; not a speed limit


def ask(name: str, pct: int | None = 25, gpus: int = 1, **kw: object) -> SubmitRequest:
    return SubmitRequest(
        name=name, containers=[ContainerAsk(name=name, devices=[DeviceAsk(nums=gpus, mem_percent=pct)])],
        **kw,  # type: ignore[arg-type]
    )


async def submit(bus: Bus, req: SubmitRequest) -> SubmitReply:
    return await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=req.timeout + 10)


async def release(bus: Bus, name: str) -> ReleaseReply:
    # As `hami` does, ask again while nothing answers (nobody took it): under a loaded
    # make test a request right after a binder's restart met 'no responders' once,
    # though the new binder had flushed its subscriptions.
    for _ in range(20):
        try:
            return await bus.request(subjects.API_RELEASE, ReleaseRequest(name=name), ReleaseReply, timeout=15)
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.25)
    return await bus.request(subjects.API_RELEASE, ReleaseRequest(name=name), ReleaseReply, timeout=15)


async def withdraw(bus: Bus, uid: str, name: str = "") -> WithdrawReply:
    return await bus.request(subjects.API_WITHDRAW, WithdrawRequest(uid=uid, name=name), WithdrawReply)


def new_uid() -> str:
    return str(uuid.uuid4())


def service(s: System, kind: type) -> object:
    return next(x for x in s.services if isinstance(x, kind))


async def until(cond: object, guard: float = GUARD_S) -> None:
    async with asyncio.timeout(guard):
        while not cond():  # type: ignore[operator]  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def ledger_uids(bus: Bus, node: str) -> set[str]:
    led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, node, NodeLedger)
    return set(led.allocs) if led else set()


class Events:
    """Every allocation event published from now on (core subscription)."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    async def start(self, bus: Bus) -> Events:
        async def cb(msg: object) -> None:
            self.seen.append(decode_event(msg.data))  # type: ignore[attr-defined]

        await bus.subscribe("hami.evt.alloc.>", cb)
        return self

    def of(self, uid: str, kind: type) -> list[object]:
        return [e for e in self.seen if isinstance(e, kind) and getattr(e, "uid", None) == uid]


@pytest.fixture
async def system(nats_url: str, cfg: Config) -> AsyncIterator[System]:
    # One node, one card: "full" and "free" are easy to arrange.
    s = System(cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=["A100-80GB:1:81920"], metrics_port=0)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


NODE = "sim-node-0"


async def test_a_waiting_submit_holds_back_no_other_request(system: System, bus: Bus) -> None:
    for i in range(4):
        assert (await submit(bus, ask(f"f{i}"))).ok
    # Two cards on a one-card node: it never fits, and waits as long as it may.
    blocker_uid = new_uid()
    blocker = asyncio.create_task(submit(bus, ask("blocker", pct=None, gpus=2, wait=True,
                                                  timeout=600, uid=blocker_uid)))
    p = service(system, PlacementService)
    await until(lambda: blocker_uid in p.pending)  # type: ignore[attr-defined]

    async def others() -> list[object]:
        out: list[object] = list(await asyncio.gather(*(release(bus, f"f{i}") for i in range(4))))
        out += await asyncio.gather(*(submit(bus, ask(f"g{i}", pct=10)) for i in range(10)))
        out += await asyncio.gather(*(release(bus, f"g{i}") for i in range(6)))
        return out

    answers = await asyncio.wait_for(others(), GUARD_S)
    # All 20 answered while the blocker still waits: none of them queued behind it.
    assert not blocker.done()
    assert len(answers) == 20 and all(getattr(a, "ok", False) for a in answers), answers
    w = await withdraw(bus, blocker_uid, "blocker")
    assert w.ok
    r = await asyncio.wait_for(blocker, GUARD_S)
    assert not r.ok and r.error == "withdrawn"


async def test_refused_timeouts_and_uids(system: System, bus: Bus) -> None:
    for bad in (ask("t0", timeout=0), ask("t1", timeout=-1), ask("t2", timeout=3601)):
        raw = await bus.nc.request(subjects.API_SUBMIT, msgspec.json.encode(bad), timeout=5)
        err = msgspec.json.decode(raw.data, type=ErrorReply)
        assert "timeout must be more than 0 and at most 3600s" in err.error
    raw = await bus.nc.request(subjects.API_SUBMIT, msgspec.json.encode(ask("u", uid="a b")), timeout=5)
    assert "uid" in msgspec.json.decode(raw.data, type=ErrorReply).error
    uid = new_uid()
    assert (await submit(bus, ask("u1", uid=uid))).uid == uid
    again = await submit(bus, ask("u2", uid=uid))  # a second request under one uid
    assert not again.ok and "already used" in again.error


async def test_a_withdrawn_request_is_never_placed_when_capacity_appears(system: System, bus: Bus) -> None:
    ev = await Events().start(bus)
    assert (await submit(bus, ask("full", pct=None))).ok
    uid = new_uid()
    waiting = asyncio.create_task(submit(bus, ask("w", pct=None, wait=True, timeout=600, uid=uid)))
    p = service(system, PlacementService)
    await until(lambda: uid in p.pending)  # type: ignore[attr-defined]
    assert (await withdraw(bus, uid, "w")).ok
    r = await asyncio.wait_for(waiting, GUARD_S)
    assert not r.ok and r.error == "withdrawn"
    assert (await release(bus, "full")).ok
    # The card holds one whole-card slice: the probe gets it only if "w" did not.
    probe = await submit(bus, ask("probe", pct=None))
    assert probe.ok, probe
    assert uid not in await ledger_uids(bus, NODE)
    assert not ev.of(uid, AllocDecided)


async def test_a_released_request_redelivered_is_not_placed_again(system: System, bus: Bus) -> None:
    """A copy of a request delivered again after its holder released it (a placement
    replica that crashed before its acknowledgement) must not take the card back for a
    client that was told it is gone."""
    ev = await Events().start(bus)
    uid = new_uid()
    r = await submit(bus, ask("held", pct=None, uid=uid, timeout=30))
    assert r.ok, r
    (first,) = ev.of(uid, AllocRequested)
    assert (await release(bus, "held")).ok
    assert uid not in await ledger_uids(bus, NODE)
    await bus.publish_event(subjects.alloc("requested"), first, msg_id=f"requested:{uid}:again")
    # The card holds one whole-card slice: the probe, after the copy in stream order,
    # gets it only if the copy was refused.
    probe = await submit(bus, ask("probe", pct=None))
    assert probe.ok, probe
    assert uid not in await ledger_uids(bus, NODE)
    assert len(ev.of(uid, AllocDecided)) == 1


async def test_an_expired_request_redelivered_is_answered_expired_and_not_placed(system: System, bus: Bus) -> None:
    ev = await Events().start(bus)
    uid = new_uid()
    late = AllocRequested(uid=uid, name="late", pending=True, source="cli",
                          containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=10)])],
                          requested_at=time.time() - 20, deadline=time.time() - 10)
    for n in range(2):  # the first delivery and a redelivery (another message id)
        await bus.publish_event(subjects.alloc("requested"), late, msg_id=f"requested:{uid}:{n}")
    await until(lambda: ev.of(uid, AllocFailed))
    probe = await submit(bus, ask("probe", pct=90))  # after both, in stream order
    assert probe.ok
    # Answered once: the stream stores one failed (both deliveries give one message id).
    si = await bus.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.alloc("failed"))
    assert (si.state.subjects or {}).get(subjects.alloc("failed")) == 1
    f = ev.of(uid, AllocFailed)[0]
    assert isinstance(f, AllocFailed) and f.reason == "expired" and not f.pending
    assert not ev.of(uid, AllocDecided)
    assert uid not in await ledger_uids(bus, NODE)
    assert uid not in service(system, PlacementService).pending  # type: ignore[attr-defined]


async def test_a_binder_killed_while_a_submit_waits_leaves_nothing_orphaned(
    system: System, bus: Bus, nats_url: str, cfg: Config
) -> None:
    ev = await Events().start(bus)
    assert (await submit(bus, ask("full", pct=None))).ok
    uid = new_uid()
    client = asyncio.create_task(submit(bus, ask("w", pct=None, wait=True, timeout=8, uid=uid)))
    p = service(system, PlacementService)
    await until(lambda: uid in p.pending)  # type: ignore[attr-defined]
    # Kill the binder: its connection goes first, so none of its clean-up reaches NATS.
    b1 = service(system, BinderService)
    assert isinstance(b1, BinderService)
    await b1.bus.nc.close()
    await b1.stop()
    b2bus = await Bus.connect(nats_url, "binder-2")
    b2 = BinderService(b2bus, cfg)
    await b2.start()
    try:
        assert (await release(bus, "full")).ok  # capacity: the request may now be placed
        # Whatever happened meanwhile, it ends released (nobody was told): never held.
        await until(lambda: ev.of(uid, AllocFailed) or ev.of(uid, AllocReleased))
        if ev.of(uid, AllocDecided):
            await until(lambda: any(getattr(e, "reason", "") == "orphaned" for e in ev.of(uid, AllocReleased)))
        led = await ledger_uids(bus, NODE)

        async def gone() -> None:
            nonlocal led
            while uid in led:
                await asyncio.sleep(0.05)
                led = await ledger_uids(bus, NODE)

        await asyncio.wait_for(gone(), GUARD_S)
        assert not client.done()  # its binder died: no answer came
    finally:
        client.cancel()
        await b2.stop()
        await b2bus.close()


async def test_a_placement_replica_stopped_mid_batch_places_none_of_its_withdrawn_requests(
    nats_url: str, cfg: Config, bus: Bus
) -> None:
    # The shared consumer with a short ack wait, so what the stopped replica held comes
    # back soon (the services adopt an existing consumer's settings).
    wq = await bus.work_queue(subjects.PLACEMENT_CONSUMER, DECISION_FILTERS, ack_wait=1.0)
    await wq.close()
    agent = NodeAgent(bus, "n1", SimBackend("n1", [parse_gpu_spec("A10:1:24576")]), cfg)
    await agent.start()
    ev = await Events().start(bus)
    p1bus = await Bus.connect(nats_url, "p1")
    p1 = PlacementService(p1bus, cfg, replica="p1")
    await p1.start()
    await until(lambda: len(p1.cluster.nodes) == 1)

    def req(uid: str, pct: int, pending: bool) -> AllocRequested:
        return AllocRequested(uid=uid, name=uid, pending=pending, source="cli", requested_at=time.time(),
                              deadline=time.time() + 120,
                              containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=pct)])])

    await bus.publish_event(subjects.alloc("requested"), req("filler", 100, False), msg_id="filler")
    await until(lambda: ev.of("filler", AllocDecided))
    # The replica takes a batch and stalls in it (its lock held).
    await p1.lock.acquire()
    # The card frees first: without the withdrawals, the requests after it would fit.
    await bus.publish_event(subjects.alloc("released", "n1"),
                            AllocReleased(uid="filler", node="n1", reason="released"), msg_id="rel-filler")
    uids = [f"w-{i:02d}-{uuid.uuid4().hex[:8]}" for i in range(20)]
    for u in uids:
        await bus.publish_event(subjects.alloc("requested"), req(u, 10, True), msg_id=f"requested:{u}")
    # Their clients withdraw, as the binder does: the outcome first, then the release.
    out = Outcomes(bus, cfg.bus.max_wait)
    for u in uids:
        await out.withdraw(u, u)
        await bus.publish_event(subjects.alloc("released"),
                                AllocReleased(uid=u, name=u, reason="withdrawn", at=time.time()),
                                msg_id=f"released:{u}:withdrawn")
    await until(lambda: p1._sub is not None and p1._sub.queue.qsize() > 0)
    # Killed: the connection goes, nothing is acknowledged.
    await p1bus.nc.close()
    await p1.stop()
    p1.lock.release()
    p2bus = await Bus.connect(nats_url, "p2")
    p2 = PlacementService(p2bus, cfg, replica="p2")
    await p2.start()
    try:
        # Redelivered to the new replica: the release frees the card, the requests are refused.
        async def settled() -> bool:
            ci = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.PLACEMENT_CONSUMER)
            return not ci.num_ack_pending and not ci.num_pending and "filler" not in await ledger_uids(bus, "n1")

        async with asyncio.timeout(GUARD_S):
            while not await settled():  # noqa: ASYNC110 - the stream has no event for it
                await asyncio.sleep(0.1)
        assert not any(ev.of(u, AllocDecided) for u in uids)
        assert not (set(uids) & await ledger_uids(bus, "n1"))
        assert not (set(uids) & set(p2.pending))
        # The card is free and usable: nothing was held back for the withdrawn ones.
        await bus.publish_event(subjects.alloc("requested"), req("probe", 100, False), msg_id="probe")
        await until(lambda: ev.of("probe", AllocDecided))
    finally:
        await p2.stop()
        await p2bus.close()
        await p1bus.close()
        await agent.stop()


async def test_ctrl_c_of_hami_submit_wait_withdraws(system: System, bus: Bus) -> None:
    assert (await submit(bus, ask("full", pct=None))).ok
    assert system.nats_url
    env = dict(os.environ, HAMI_LOG_LEVEL="WARNING", HAMI_STATE_FILE="/nonexistent/state.json")
    proc = await asyncio.create_subprocess_exec(
        *HAMI, "submit", "w", "--mem-percent", "50", "--wait", "600", "--nats-url", system.nats_url,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    p = service(system, PlacementService)
    try:
        await until(lambda: any(r.name == "w" for r in p.pending.values()))  # type: ignore[attr-defined]
        uid = next(u for u, r in p.pending.items() if r.name == "w")  # type: ignore[attr-defined]
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), GUARD_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    await until(lambda: uid not in p.pending)  # type: ignore[attr-defined]
    assert (await release(bus, "full")).ok
    probe = await submit(bus, ask("probe", pct=None))  # the whole card: only if "w" is not on it
    assert probe.ok, probe
    assert uid not in await ledger_uids(bus, NODE)
