"""Leader election over a Lease: the pure decisions (expiry by the candidate's own
observation, renew deadline, release), and two electors against the fake API server
(the real kubernetes client): one leads, a killed leader is replaced only after the
lease expired, a 409 is retried, a clean stop hands over at once."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest

from services.binder.kube import KubeBinder
from shared.bus import Bus
from shared.config import Config
from shared.election import Election, LeaseRecord, Timing
from shared.kube import Kube
from shared.leader import LeaderElector
from tests.fakekube import FakeKube
from tests.kube.harness import KubeCluster, gpu_container

T = Timing(lease_duration=15, renew_deadline=10, retry_period=2)
WALL = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_timing_must_order_retry_renew_lease() -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        Timing(lease_duration=10, renew_deadline=10, retry_period=2)


def test_expiry_counts_from_our_own_observation_not_the_servers_renew_time() -> None:
    e = Election("b", T)
    # The record says it was renewed long ago (skewed clock): irrelevant.
    other = LeaseRecord("a", 15, "2000-01-01T00:00:00.000000Z", "2000-01-01T00:00:00.000000Z", 3)
    assert e.proposal(other, now=100.0, wall=WALL) is None  # first seen at 100
    assert e.proposal(other, now=114.9, wall=WALL) is None  # unchanged, not yet 15 s
    renewed = LeaseRecord("a", 15, other.acquire_time, "2000-01-01T00:00:05.000000Z", 3)
    assert e.proposal(renewed, now=114.95, wall=WALL) is None  # a change restarts the clock
    assert e.proposal(renewed, now=129.9, wall=WALL) is None
    taken = e.proposal(renewed, now=130.0, wall=WALL)
    assert taken is not None and taken.holder == "b" and taken.transitions == 4
    assert taken.acquire_time == taken.renew_time == "2026-01-01T00:00:00.000000Z"


def test_released_or_missing_lease_is_taken_at_once_and_renewal_keeps_acquire_time() -> None:
    e = Election("b", T)
    created = e.proposal(None, now=1.0, wall=WALL)
    assert created == LeaseRecord("b", 15, created.acquire_time, created.renew_time, 0)
    released = LeaseRecord("", 1, "x", "x", 7)
    got = e.proposal(released, now=2.0, wall=WALL)
    assert got is not None and got.transitions == 8
    e.written(got, started=2.0, now=2.1)
    assert e.is_leader()
    later = e.proposal(got, now=4.0, wall=WALL + dt.timedelta(seconds=2))
    assert later is not None and later.acquire_time == got.acquire_time
    assert later.renew_time != got.renew_time and later.transitions == 8


def test_renew_deadline_from_the_start_of_the_last_successful_write() -> None:
    e = Election("a", T)
    rec = e.proposal(None, now=0.0, wall=WALL)
    assert rec is not None
    e.written(rec, started=0.0, now=3.0)  # a slow answer
    assert not e.renew_overdue(9.9)
    assert e.renew_overdue(10.0)  # 10 s after the write began, not after it returned
    # It stops before any candidate that saw the write (at >= 0) can take it (>= 15).
    assert T.renew_deadline < T.lease_duration
    assert e.release_record(WALL) == LeaseRecord("", 1, rec.renew_time, rec.renew_time, 0)


def test_seeing_another_holder_means_not_leading() -> None:
    e = Election("a", T)
    rec = e.proposal(None, now=0.0, wall=WALL)
    assert rec is not None
    e.written(rec, 0.0, 0.1)
    assert e.proposal(LeaseRecord("b", 15, "t", "t", 1), now=1.0, wall=WALL) is None
    assert not e.is_leader() and e.held_by_other(1.0)
    assert e.release_record(WALL) is None  # nothing of ours to release


# ----------------------------------------------------------------- against fakekube

FAST = Timing(lease_duration=2, renew_deadline=1.2, retry_period=0.2)


@pytest.fixture
async def fake() -> AsyncIterator[FakeKube]:
    async with FakeKube() as f:
        yield f


class Candidate:
    def __init__(self, kube: Kube, name: str, log: list[tuple[str, str]]) -> None:
        async def started() -> None:
            log.append((name, "start"))

        async def stopped() -> None:
            log.append((name, "stop"))

        self.elector = LeaderElector(kube, "default", "hami-binder", identity=name,
                                     on_start=started, on_stop=stopped, timing=FAST)


async def wait_until(pred: object, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():  # type: ignore[operator]  # noqa: ASYNC110 - polls state
            await asyncio.sleep(0.02)


def parse(t: str) -> dt.datetime:
    return dt.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


async def test_one_leader_killed_leader_replaced_after_expiry(fake: FakeKube) -> None:
    ka, kb = await Kube.connect(host=fake.url), await Kube.connect(host=fake.url)
    log: list[tuple[str, str]] = []
    a, b = Candidate(ka, "a", log), Candidate(kb, "b", log)
    try:
        a.elector.start()
        await wait_until(lambda: a.elector.leading)
        b.elector.start()
        await asyncio.sleep(FAST.lease_duration * 1.5)  # several renewals: b stays out
        assert a.elector.leading and not b.elector.leading
        lease = fake.get("leases.coordination.k8s.io", "default", "hami-binder")
        assert lease is not None and lease["spec"]["holderIdentity"] == "a"
        assert lease["spec"]["leaseDurationSeconds"] == 2

        await a.elector.stop(release=False)  # killed: the lease is left as it was
        last_renew = parse(fake.get("leases.coordination.k8s.io", "default",
                                    "hami-binder")["spec"]["renewTime"])
        await wait_until(lambda: b.elector.leading)
        spec = fake.get("leases.coordination.k8s.io", "default", "hami-binder")["spec"]
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
        # Not taken before the lease had run out since a's last renewal.
        assert parse(spec["acquireTime"]) - last_renew >= dt.timedelta(seconds=2)
        assert log == [("a", "start"), ("a", "stop"), ("b", "start")]

        # A clean stop releases: a new candidate does not wait for expiry.
        c = Candidate(ka, "c", log)
        c.elector.start()
        await b.elector.stop()
        spec = fake.get("leases.coordination.k8s.io", "default", "hami-binder")["spec"]
        assert spec["holderIdentity"] in ("", "c")
        await wait_until(lambda: c.elector.leading, timeout=FAST.lease_duration * 5)
        await c.elector.stop()
    finally:
        await a.elector.stop()
        await b.elector.stop()
        await ka.close()
        await kb.close()


async def test_conflict_is_retried_on_a_fresh_read(fake: FakeKube) -> None:
    kube = await Kube.connect(host=fake.url)
    try:
        e = LeaderElector(kube, "default", "l", identity="a", on_start=_noop, on_stop=_noop,
                          timing=FAST)
        assert await e.try_acquire_or_renew()  # created
        fake.fail_next("update", "leases.coordination.k8s.io", 409)
        assert await e.try_acquire_or_renew()  # 409, read again, renewed
        assert not fake.store.faults  # the 409 was answered
        assert e.election.is_leader()
        # Someone else's write in between: the fresh read shows it, and we back off.
        fake.update("leases.coordination.k8s.io", {
            "metadata": {"name": "l", "namespace": "default"},
            "spec": {"holderIdentity": "z", "leaseDurationSeconds": 2}})
        assert not await e.try_acquire_or_renew()
        assert e.election.held_by_other(asyncio.get_running_loop().time())
    finally:
        await kube.close()


async def _noop() -> None:
    return None


# ------------------------------------------------------- two binders, one leader


class TwoBinders(KubeCluster):
    """inventory, placement, agents, and two direct-mode binders with electors."""

    async def start_binder(self) -> KubeBinder:
        self.pair: list[tuple[KubeBinder, Bus, Kube]] = []
        for name in ("binder-a", "binder-b"):
            await self.add_binder(name)
            if name == "binder-a":
                await wait_until(lambda: self.pair[0][0].leader.leading)  # type: ignore[union-attr]
        return self.pair[0][0]

    async def add_binder(self, identity: str) -> None:
        bus = await Bus.connect(self.nats_url, identity)
        kube = await Kube.connect(host=self.fake.url)
        b = KubeBinder(bus, self.cfg, kube, retry_backoff_s=0.2)
        elector = LeaderElector(kube, "default", "hami-binder", identity=identity,
                                on_start=b.start_watches, on_stop=b.stop_watches, timing=FAST)
        await b.start(serve_api=False, leader=elector)
        self.pair.append((b, bus, kube))

    async def stop_binder(self) -> None:
        for b, bus, kube in getattr(self, "pair", []):
            await b.stop()
            await bus.close()
            await kube.close()
        self.pair = []


async def test_killed_leader_is_replaced_and_no_pod_is_bound_twice(
    fake: FakeKube, nats_url: str, cfg: Config
) -> None:
    nodes = {"node-a": ["A100-80GB:4"], "node-b": ["A100-80GB:4"]}
    async with TwoBinders(fake, nats_url, cfg, nodes) as kc:
        (a, a_bus, a_kube), (b, _, _) = kc.pair
        assert a.leader is not None and b.leader is not None
        assert a.leader.leading and not b.leader.leading
        assert [x.ready_checks() for x in (a, b)] == [
            [("leader", None), ("kube pods", None)], [("leader", None)]]
        for i in range(12):
            fake.add_pod(f"p{i}", containers=[gpu_container(gpu=1, gpumem=1000)],
                         scheduler_name="hami-scheduler")
        await kc.wait_bound("default", "p0")
        # Killed mid-burst: no release, its connections cut, its tasks gone.
        await a.leader.stop(release=False)
        await a_bus.nc.close()
        await a_kube.close()
        for i in range(12, 24):
            fake.add_pod(f"p{i}", containers=[gpu_container(gpu=1, gpumem=1000)],
                         scheduler_name="hami-scheduler")
        await wait_until(lambda: b.leader.leading)  # type: ignore[union-attr]
        spec = fake.get("leases.coordination.k8s.io", "default", "hami-binder")["spec"]
        assert spec["holderIdentity"] == "binder-b"
        for i in range(24):
            await kc.wait_bound("default", f"p{i}", timeout=30)
        ledger = await kc.ledger()
        assert fake.store.bindings == {("default", f"p{i}"): 1 for i in range(24)}
        # One reservation per pod, on the node it is bound to: none placed twice.
        pods = {p["metadata"]["uid"]: p for p in fake.list("pods")}
        assert set(ledger) == set(pods)
        for uid, (node, _) in ledger.items():
            assert pods[uid]["spec"]["nodeName"] == node
