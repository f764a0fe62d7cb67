"""``hami defrag --apply`` in Kubernetes: movable pods moved by eviction.

FakeKube (with the Eviction subresource and its PodDisruptionBudget check) + real NATS
+ inventory, placement, simulated node agents and the Kubernetes binder. A stand-in
ReplicaSet controller (:class:`ReplicaSet`) keeps its pod count by creating a new pod
when one goes, as the real one does. Its first pods are pinned by a nodeSelector, so
the layout starts fragmented; its template leaves the node open, so a replacement goes
wherever it is steered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shared import subjects
from shared.config import Config
from shared.schemas import DefragApplyReply, DefragApplyRequest, MoveRequest
from tests.fakekube import FakeKube
from tests.kube.harness import KubeCluster, gpu_container
from tests.kube.scheduler_loop import SchedulerLoop

SCHED = "hami-scheduler"
MOVABLE = {"hami.io/movable": "true"}
GUARD_S = 60.0  # a hang fails the test instead of stalling the suite; not a speed limit
_ENTRY = Path(sys.executable).parent / "hami"
HAMI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "hami.cli"]


def card(node: str) -> str:
    from services.nodeagent.backends.sim import sim_uuid

    return sim_uuid(node, 0)


class ReplicaSet:
    """Keeps ``replicas`` pods of one owner alive, as a ReplicaSet controller does."""

    def __init__(
        self,
        fake: FakeKube,
        name: str,
        *,
        pin: str | None = None,
        annotations: dict[str, str] | None = None,
        replicas: int = 1,
        mem: int = 20000,
        cores: int = 30,
    ) -> None:
        self.fake, self.name, self.pin, self.replicas = fake, name, pin, replicas
        self.uid = str(uuid.uuid4())
        self.annotations = dict(annotations or {})
        self.labels = {"app": name}
        self.containers = [gpu_container(gpu=1, gpumem=mem, gpucores=cores)]
        self.made: list[str] = []  # pod names, oldest first
        self._task: asyncio.Task[None] | None = None

    def pods(self) -> list[dict[str, Any]]:
        return [
            p
            for p in self.fake.list("pods", "default")
            if any(r.get("uid") == self.uid for r in p["metadata"].get("ownerReferences") or [])
        ]

    def _create(self) -> None:
        spec: dict[str, Any] = {"schedulerName": SCHED, "containers": self.containers}
        if self.pin and not self.made:  # only the first: the template itself is open
            spec["nodeSelector"] = {"kubernetes.io/hostname": self.pin}
        pod = self.fake.create(
            "pods",
            {
                "metadata": {
                    "generateName": f"{self.name}-",
                    "labels": self.labels,
                    "annotations": self.annotations,
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "ReplicaSet",
                            "name": self.name,
                            "uid": self.uid,
                            "controller": True,
                        }
                    ],
                },
                "spec": spec,
            },
            "default",
        )
        self.made.append(pod["metadata"]["name"])

    async def _run(self) -> None:
        while True:
            live = [p for p in self.pods() if not p["metadata"].get("deletionTimestamp")]
            for _ in range(self.replicas - len(live)):
                self._create()
            await asyncio.sleep(0.02)

    def start(self) -> ReplicaSet:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@pytest.fixture
async def controllers() -> AsyncIterator[list[ReplicaSet]]:
    made: list[ReplicaSet] = []
    yield made
    for rs in made:
        await rs.stop()


def bare_pod(fake: FakeKube, name: str, pin: str, annotations: dict[str, str]) -> dict[str, Any]:
    return fake.create(
        "pods",
        {
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "schedulerName": SCHED,
                "nodeSelector": {"kubernetes.io/hostname": pin},
                "containers": [gpu_container(gpu=1, gpumem=20000, gpucores=30)],
            },
        },
        "default",
    )


async def bound(kc: KubeCluster, name: str) -> dict[str, Any]:
    return await kc.wait_bound("default", name, timeout=GUARD_S)


async def apply(
    kc: KubeCluster, *moves: tuple[str, str], max_disruption: int = 0
) -> DefragApplyReply:
    """Ask the binder to move each (pod uid, node) onto that node's card."""
    assert kc.bus is not None
    req = DefragApplyRequest(
        moves=[MoveRequest(uid=u, to_node=n, to_cards=[card(n)]) for u, n in moves],
        max_disruption=max_disruption,
        timeout=GUARD_S,
    )
    msg = await kc.bus.nc.request(
        subjects.DEFRAG_APPLY, msgspec.json.encode(req), timeout=GUARD_S * 3
    )
    return msgspec.json.decode(msg.data, type=DefragApplyReply)


async def in_ledger(kc: KubeCluster, n: int) -> None:
    async def enough() -> bool:
        return len(await kc.ledger()) == n

    await kc.wait_for(enough, GUARD_S, f"{n} allocations in the ledger")


def evictions(fake: FakeKube) -> list[str]:
    return [r.path for r in fake.requests if r.method == "POST" and r.path.endswith("/eviction")]


def defrag_events(kc: KubeCluster, name: str) -> list[dict[str, Any]]:
    return kc.events(name, "HamiDefrag")


@contextlib.asynccontextmanager
async def scheduling(kc: KubeCluster) -> AsyncIterator[None]:
    """Extender mode: a stand-in kube-scheduler while the block runs (direct mode: none;
    the binder places the pods itself)."""
    if kc.cfg.scheduler.mode != "extender":
        yield
        return
    loop = SchedulerLoop(kc.fake.url, kc.extender_url, retry_s=0.05, retry_unschedulable=True)
    finished = asyncio.Event()
    sched = asyncio.create_task(loop.run(lambda _s: finished.is_set(), timeout=GUARD_S * 3))
    try:
        yield
    finally:
        finished.set()
        await sched


async def hami_defrag_apply(nats_url: str, tmp: Path) -> tuple[int, dict[str, Any]]:
    """``hami defrag --apply --json``, run as a user runs it."""
    env = {"HAMI_STATE_FILE": str(tmp / "state.json"), "PATH": "/usr/bin:/bin"}
    done = await asyncio.to_thread(
        subprocess.run,
        [
            *HAMI,
            "defrag",
            "--apply",
            "--json",
            "--nats-url",
            nats_url,
            "--replace-timeout",
            str(GUARD_S),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=GUARD_S * 3,
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


# ------------------------------------------------------------------ extender mode


async def test_cli_apply_evicts_a_movable_pod_and_its_replacement_lands_on_the_plan(
    fake: FakeKube,
    nats_url: str,
    cfg: Config,
    controllers: list[ReplicaSet],
    tmp_path: Path,
) -> None:
    """Extender mode, through ``hami defrag --apply``: the planner moves the movable pod
    onto the other node's card; it is evicted, its ReplicaSet's new pod is filtered onto
    the planned card, and the card it held is free."""
    cfg.scheduler.mode = "extender"
    nodes = {"node-a": ["A100-80GB:1"], "node-b": ["A100-80GB:1"]}
    async with KubeCluster(fake, nats_url, cfg, nodes) as kc, scheduling(kc):
        a = ReplicaSet(fake, "a", pin="node-a", annotations=MOVABLE).start()
        b = ReplicaSet(fake, "b", pin="node-b").start()  # not movable: it stays
        controllers += [a, b]
        old = await kc.wait_for(lambda: a.made, GUARD_S)
        pod_a = await bound(kc, old[0])
        pod_b = await bound(kc, (await kc.wait_for(lambda: b.made, GUARD_S))[0])
        await in_ledger(kc, 2)

        code, out = await hami_defrag_apply(nats_url, tmp_path)
        assert code == 0, out
        assert [m["uid"] for m in out["moves"]] == [pod_a["metadata"]["uid"]]
        [o] = out["outcomes"]
        assert o["state"] == "moved" and o["on_plan"], o
        assert o["node"] == "node-b" and o["cards"] == [card("node-b")]
        assert out["applied"] == 1

        # The old pod is gone and its card free; the replacement holds node-b's.
        assert fake.get("pods", "default", old[0]) is None
        new = fake.get("pods", "default", o["replacement"])
        assert new is not None and new["spec"]["nodeName"] == "node-b"
        led = await kc.ledger()
        assert {u: n for u, (n, _) in led.items()} == {
            new["metadata"]["uid"]: "node-b",
            pod_b["metadata"]["uid"]: "node-b",
        }
        kept = fake.get("pods", "default", pod_b["metadata"]["name"])
        assert kept is not None and kept["metadata"]["uid"] == pod_b["metadata"]["uid"]
        [ev] = await kc.wait_for(lambda: defrag_events(kc, old[0]), GUARD_S)
        assert ev["type"] == "Normal" and "to node-b" in ev["message"]


# --------------------------------------------------------------------- direct mode


async def test_a_budget_that_allows_no_disruption_refuses_the_move(
    fake: FakeKube,
    nats_url: str,
    cfg: Config,
    controllers: list[ReplicaSet],
    tmp_path: Path,
) -> None:
    """Through the CLI: the move is refused with the budget's reason, exit 1, and
    nothing is evicted."""
    nodes = {"node-a": ["A100-80GB:1"], "node-b": ["A100-80GB:1"]}
    async with KubeCluster(fake, nats_url, cfg, nodes) as kc:
        a = ReplicaSet(fake, "a", pin="node-a", annotations=MOVABLE).start()
        b = ReplicaSet(fake, "b", pin="node-b").start()
        controllers += [a, b]
        pod = await bound(kc, (await kc.wait_for(lambda: a.made, GUARD_S))[0])
        await bound(kc, (await kc.wait_for(lambda: b.made, GUARD_S))[0])
        await in_ledger(kc, 2)
        fake.create(
            "poddisruptionbudgets.policy",
            {
                "metadata": {"name": "a-budget"},
                "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "a"}}},
            },
            "default",
        )

        code, out = await hami_defrag_apply(nats_url, tmp_path)
        assert code == 1, out
        assert [m["uid"] for m in out["moves"]] == [pod["metadata"]["uid"]]
        [o] = out["outcomes"]
        assert o["state"] == "refused" and out["applied"] == 0
        assert "disruption budget" in o["error"] and "a-budget" in o["error"], o
        assert "a-budget" in out["error"]
        assert evictions(fake) == [
            f"/api/v1/namespaces/default/pods/{pod['metadata']['name']}/eviction"
        ]
        # Nothing evicted: the same pod, still on its card.
        still = fake.get("pods", "default", pod["metadata"]["name"])
        assert still is not None and still["metadata"]["uid"] == pod["metadata"]["uid"]
        assert len(a.made) == 1
        assert (await kc.ledger())[pod["metadata"]["uid"]][0] == "node-a"
        # Events are sent behind the binds (services/binder/events.py): waited for.
        [ev] = await kc.wait_for(lambda: defrag_events(kc, pod["metadata"]["name"]), GUARD_S)
        assert ev["type"] == "Warning" and "disruption budget" in ev["message"]


async def test_a_pod_not_movable_or_without_a_controller_is_never_evicted(
    fake: FakeKube,
    nats_url: str,
    cfg: Config,
    controllers: list[ReplicaSet],
) -> None:
    nodes = {"node-a": ["A100-80GB:1"], "node-b": ["A100-80GB:1"]}
    async with KubeCluster(fake, nats_url, cfg, nodes) as kc:
        kept = ReplicaSet(fake, "kept", pin="node-a").start()  # owned, not movable
        controllers.append(kept)
        owned = await bound(kc, (await kc.wait_for(lambda: kept.made, GUARD_S))[0])
        bare = await bound(kc, bare_pod(fake, "bare", "node-a", MOVABLE)["metadata"]["name"])
        await in_ledger(kc, 2)

        r1 = await apply(
            kc, (owned["metadata"]["uid"], "node-b"), (bare["metadata"]["uid"], "node-b")
        )
        assert not r1.ok
        assert [o.state for o in r1.outcomes] == ["refused", "not-tried"]
        assert "not marked movable" in r1.outcomes[0].error

        r2 = await apply(kc, (bare["metadata"]["uid"], "node-b"))
        [o] = r2.outcomes
        assert o.state == "refused" and "no owner controller" in o.error, o.error

        assert evictions(fake) == []
        for p in (owned, bare):
            still = fake.get("pods", "default", p["metadata"]["name"])
            assert still is not None and still["metadata"]["uid"] == p["metadata"]["uid"]


async def test_max_disruption_one_evicts_the_second_only_after_the_first_is_replaced(
    fake: FakeKube,
    nats_url: str,
    cfg: Config,
    controllers: list[ReplicaSet],
) -> None:
    """Two moves onto node-c's card, one pod at a time: the second pod is evicted only
    once the first one's replacement is bound, and both replacements are steered there."""
    nodes = {"node-a": ["A100-80GB:1"], "node-b": ["A100-80GB:1"], "node-c": ["A100-80GB:1"]}
    async with KubeCluster(fake, nats_url, cfg, nodes) as kc:
        one = ReplicaSet(fake, "one", pin="node-a", annotations=MOVABLE).start()
        two = ReplicaSet(fake, "two", pin="node-b", annotations=MOVABLE).start()
        rest = ReplicaSet(fake, "rest", pin="node-c").start()
        controllers += [one, two, rest]
        p1 = await bound(kc, (await kc.wait_for(lambda: one.made, GUARD_S))[0])
        p2 = await bound(kc, (await kc.wait_for(lambda: two.made, GUARD_S))[0])
        await bound(kc, (await kc.wait_for(lambda: rest.made, GUARD_S))[0])
        await in_ledger(kc, 3)

        r = await apply(
            kc,
            (p1["metadata"]["uid"], "node-c"),
            (p2["metadata"]["uid"], "node-c"),
            max_disruption=1,
        )
        assert r.ok, r
        assert [(o.state, o.node, o.on_plan) for o in r.outcomes] == [
            ("moved", "node-c", True),
            ("moved", "node-c", True),
        ]

        # In the API server's own order of changes: the first replacement bound, then
        # the second pod's deletion.
        def rv(pred: Any) -> int:
            return next(c.rv for c in fake.store.history if c.storage == "pods" and pred(c))

        first_bound = rv(
            lambda c: (
                c.obj["metadata"]["name"] == r.outcomes[0].replacement
                and c.obj["spec"].get("nodeName")
            )
        )
        second_gone = rv(
            lambda c: c.type == "DELETED" and c.obj["metadata"]["name"] == p2["metadata"]["name"]
        )
        first_gone = rv(
            lambda c: c.type == "DELETED" and c.obj["metadata"]["name"] == p1["metadata"]["name"]
        )
        assert first_gone < first_bound < second_gone
        led = await kc.ledger()
        assert sorted(n for n, _ in led.values()) == ["node-c", "node-c", "node-c"]


@pytest.mark.parametrize("mode", ["direct", "extender"])
async def test_planned_cards_that_no_longer_fit_leave_the_replacement_placed_elsewhere(
    fake: FakeKube,
    nats_url: str,
    cfg: Config,
    controllers: list[ReplicaSet],
    mode: str,
) -> None:
    """The plan's target card is full (the cluster changed since the plan): the
    replacement is not steered there but placed where it fits, and the outcome says so."""
    cfg.scheduler.mode = mode
    nodes = {"node-a": ["A100-80GB:1"], "node-b": ["A100-80GB:1"]}
    async with KubeCluster(fake, nats_url, cfg, nodes) as kc, scheduling(kc):
        a = ReplicaSet(fake, "a", pin="node-a", annotations=MOVABLE).start()
        full = ReplicaSet(fake, "full", pin="node-b", mem=81920, cores=100).start()
        controllers += [a, full]
        pod = await bound(kc, (await kc.wait_for(lambda: a.made, GUARD_S))[0])
        await bound(kc, (await kc.wait_for(lambda: full.made, GUARD_S))[0])
        await in_ledger(kc, 2)

        r = await apply(kc, (pod["metadata"]["uid"], "node-b"))
        assert r.ok, r
        [o] = r.outcomes
        assert (o.state, o.node, o.cards, o.on_plan) == ("moved", "node-a", [card("node-a")], False)
        new = fake.get("pods", "default", o.replacement)
        assert new is not None and new["spec"]["nodeName"] == "node-a"
