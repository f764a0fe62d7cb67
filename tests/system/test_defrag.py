"""``hami defrag`` on a real nats-server with the real services.

Two movable slices spread over the two cards of a node leave no card whole; the plan
moves one onto the other's card, ``--apply`` carries it out through placement (the
ledger then holds it on the new card and the old card is free), and the moved slice can
still be released by name. What is not movable is never moved; a move placement finds
no room for is refused.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hami.system import System
from shared import subjects
from shared.bus import Bus
from shared.config import Config
from shared.schemas import (
    ContainerAsk,
    DeviceAsk,
    MoveReply,
    MoveRequest,
    NodeLedger,
    ReleaseReply,
    ReleaseRequest,
    SubmitReply,
    SubmitRequest,
)

NODE = "sim-node-0"
GUARD_S = 60.0  # a hang fails the test instead of stalling the suite; not a speed limit
_ENTRY = Path(sys.executable).parent / "hami"
HAMI = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "hami.cli"]


def ask(name: str, pct: int, movable: bool) -> SubmitRequest:
    return SubmitRequest(
        name=name, containers=[ContainerAsk(name=name, devices=[DeviceAsk(mem_percent=pct)])],
        uid=str(uuid.uuid4()), movable=movable,
    )


async def submit(bus: Bus, req: SubmitRequest) -> SubmitReply:
    r = await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=req.timeout + 10)
    assert r.ok, r
    return r


async def ledger(bus: Bus) -> NodeLedger:
    led, _ = await bus.kv_get(subjects.LEDGER_BUCKET, NODE, NodeLedger)
    return led or NodeLedger(node=NODE)


async def card_of(bus: Bus, uid: str) -> str:
    return (await ledger(bus)).allocs[uid].containers[0].devices[0].uuid


async def hami(url: str, tmp: Path, *args: str) -> tuple[int, dict[str, Any]]:
    env = {"HAMI_STATE_FILE": str(tmp / "state.json"), "PATH": "/usr/bin:/bin"}
    done = await asyncio.to_thread(
        subprocess.run, [*HAMI, *args, "--json", "--nats-url", url],
        capture_output=True, text=True, env=env, timeout=30,
    )
    return done.returncode, json.loads(done.stdout)


@pytest.fixture
async def system(nats_url: str, cfg: Config) -> AsyncIterator[Bus]:
    cfg.scheduler.gpu_policy = "spread"  # one slice per card: nothing whole is left
    s = System(cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=["A100-80GB:2:81920"], metrics_port=0)
    await s.start()
    bus = await Bus.connect(nats_url, "test")
    try:
        yield bus
    finally:
        await bus.close()
        await s.stop()


async def test_defrag_plans_and_applies_a_move_that_frees_a_card(
    system: Bus, nats_url: str, tmp_path: Path
) -> None:
    bus = system
    async with asyncio.timeout(GUARD_S):
        a = await submit(bus, ask("a", 30, movable=True))
        b = await submit(bus, ask("b", 30, movable=True))
        assert await card_of(bus, a.uid) != await card_of(bus, b.uid)
        code, plan = await hami(nats_url, tmp_path, "defrag", "--plan")
        assert code == 0, plan
        assert (plan["free_before"], plan["free_after"], len(plan["moves"])) == (0, 1, 1)
        assert plan["applied"] == 0 and len((await ledger(bus)).allocs) == 2
        # --for: a 60,000 MiB slice fits on neither card now; one move makes it fit
        code, fit = await hami(nats_url, tmp_path, "defrag", "--plan", "--for", "60000/0", "--max-moves", "0")
        assert code == 1 and fit["fits"] is False
        code, fit = await hami(nats_url, tmp_path, "defrag", "--plan", "--for", "60000/0")
        assert code == 0 and fit["fits"] is True and len(fit["moves"]) == 1

        code, done = await hami(nats_url, tmp_path, "defrag", "--apply")
        assert code == 0 and done["applied"] == 1, done
        mv = done["moves"][0]
        led = await ledger(bus)
        assert set(led.allocs) == {a.uid, b.uid}
        assert led.allocs[mv["uid"]].containers[0].devices[0].uuid == mv["to_cards"][0]
        assert await card_of(bus, a.uid) == await card_of(bus, b.uid)
        code, again = await hami(nats_url, tmp_path, "defrag", "--plan")
        assert code == 0 and again["moves"] == [] and again["free_before"] == 1
        # still held under its name: released as any allocation is
        moved = a if mv["uid"] == a.uid else b
        rel = await bus.request(subjects.API_RELEASE, ReleaseRequest(name=moved.name), ReleaseReply, timeout=15)
        assert rel.ok, rel
        assert moved.uid not in (await ledger(bus)).allocs


async def test_what_is_not_movable_stays_and_a_move_without_room_is_refused(
    system: Bus, nats_url: str, tmp_path: Path
) -> None:
    bus = system
    async with asyncio.timeout(GUARD_S):
        fixed = await submit(bus, ask("fixed", 30, movable=False))
        big = await submit(bus, ask("big", 80, movable=True))
        code, plan = await hami(nats_url, tmp_path, "defrag", "--plan")
        assert code == 0 and plan["moves"] == [] and plan["movable"] == 1
        here = await card_of(bus, fixed.uid)
        no_room = await bus.request(
            subjects.PLACEMENT_MOVE, MoveRequest(uid=big.uid, to_node=NODE, to_cards=[here]), MoveReply, timeout=10
        )
        assert not no_room.ok and "does not fit" in no_room.error
        not_movable = await bus.request(
            subjects.PLACEMENT_MOVE,
            MoveRequest(uid=fixed.uid, to_node=NODE, to_cards=[await card_of(bus, big.uid)]), MoveReply, timeout=10,
        )
        assert not not_movable.ok and "not movable" in not_movable.error
        assert await card_of(bus, fixed.uid) == here
