"""The metrics service's view of placement's queues, with placement's answers faked (pure).

When it asks placement again (an event, a ledger write, age) and when it does not
(a good answer, a failure still recent), askers at the same time sharing one request,
an ErrorReply not read as "no queues", the page's rows and the ``hami_queue_*`` series.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import msgspec
import nats.errors
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics.dashboard import fleet_view
from services.metrics.queues import (
    Queues,
    QueuesCollector,
    QueueState,
    ask_placement,
    queue_view,
)
from shared import subjects
from shared.bus import Bus
from shared.schemas import QueuesReply, QueueStatus

MIB = 1024 * 1024


def reply(used: int = 0, pending: int = 0) -> QueuesReply:
    return QueuesReply(
        queues=[
            QueueStatus(name="org", guarantee_mem=2000, guarantee_cores=200, used_mem=used),
            QueueStatus(
                name="research",
                parent="org",
                weight=2.0,
                guarantee_mem=1000,
                guarantee_cores=100,
                limit_mem=1500,
                used_mem=used,
                pending=pending,
            ),
            QueueStatus(name="deep", parent="research"),
            QueueStatus(name="lone", borrowed_mem=300, borrowed_cores=30, used_mem=300),
        ],
        capacity_mem=4000,
        capacity_cores=400,
    )


class Placement:
    """Answers as told, counting the asks; ``hold`` keeps an ask waiting."""

    def __init__(self) -> None:
        self.asks = 0
        self.answer: QueuesReply | BaseException = reply()
        self.hold: asyncio.Event | None = None

    async def __call__(self) -> QueuesReply:
        self.asks += 1
        if self.hold is not None:
            await self.hold.wait()
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


async def asked(placement: Placement) -> None:
    """Until the ask has reached placement (a few turns of the loop)."""
    for _ in range(100):
        if placement.asks:
            return
        await asyncio.sleep(0)
    raise AssertionError("placement was never asked")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_good_answer_is_kept_until_an_event_or_it_ages() -> None:
    placement, clock = Placement(), Clock()
    q = Queues(placement, clock=clock, fresh=5.0)
    first = await q.current()
    assert first.reply == reply() and placement.asks == 1
    clock.now += 4.0
    assert await q.current() is first and placement.asks == 1  # no news: no ask
    q.changed()  # an event or a ledger write: use may differ now
    placement.answer = reply(used=500)
    got = await q.current()
    assert got.reply == reply(used=500) and placement.asks == 2
    clock.now += 5.0  # a Queue resource edited says nothing: age alone asks again
    await q.current()
    assert placement.asks == 3


async def test_askers_at_the_same_time_share_one_request() -> None:
    placement = Placement()
    placement.hold = asyncio.Event()
    q = Queues(placement, clock=Clock())
    waiting = [asyncio.create_task(q.current()) for _ in range(5)]
    await asked(placement)
    await asyncio.sleep(0)  # every asker is waiting now
    assert placement.asks == 1
    placement.hold.set()
    got = await asyncio.gather(*waiting)
    assert placement.asks == 1 and all(g.reply == reply() for g in got)


async def test_an_event_during_the_ask_makes_its_answer_stale() -> None:
    placement = Placement()
    placement.hold = asyncio.Event()
    q = Queues(placement, clock=Clock())
    asking = asyncio.create_task(q.current())
    await asyncio.sleep(0)  # the ask is under way, not yet at placement
    q.changed()  # placement may have answered from before this event
    placement.hold.set()
    await asking
    placement.hold = None
    await q.current()
    assert placement.asks == 2


async def test_a_cancelled_asker_does_not_cancel_the_others_answer() -> None:
    placement = Placement()
    placement.hold = asyncio.Event()
    q = Queues(placement, clock=Clock())
    gone = asyncio.create_task(q.current())  # a browser that goes away
    staying = asyncio.create_task(q.current())
    await asked(placement)
    gone.cancel()
    placement.hold.set()
    assert (await staying).reply == reply()


async def test_a_failure_says_why_and_is_not_retried_at_once() -> None:
    placement, clock = Placement(), Clock()
    q = Queues(placement, clock=clock, retry=5.0)
    placement.answer = nats.errors.NoRespondersError()
    got = await q.current()
    assert got.reply is None and "placement is not running" in got.error
    placement.answer = TimeoutError()
    q.changed()  # events do not bring a missing placement back: only time does
    clock.now += 4.0
    assert await q.current() is got and placement.asks == 1
    clock.now += 1.0
    got = await q.current()
    assert got.error == "placement did not answer within 1 s" and placement.asks == 2
    placement.answer = reply()
    clock.now += 5.0
    assert (await q.current()).reply == reply()


class FakeBus:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.asked: list[str] = []

    async def request(
        self, subject: str, msg: msgspec.Struct, typ: type[Any], timeout: float
    ) -> Any:
        self.asked.append(subject)
        return msgspec.json.decode(self.data, type=typ)


async def test_placements_error_reply_is_an_error_not_no_queues() -> None:
    bus = FakeBus(b'{"error": "placement is stopping; ask again"}')
    got = await Queues(ask_placement(cast(Bus, bus))).current()
    assert bus.asked == [subjects.PLACEMENT_QUEUES]
    assert got.reply is None and "placement is stopping" in got.error
    empty = await Queues(ask_placement(cast(Bus, FakeBus(b'{"capacity_mem": 5}')))).current()
    assert empty.reply is not None and empty.reply.queues == []


def test_the_page_gets_each_queue_under_its_parent() -> None:
    v = queue_view(QueueState(reply=reply(used=700, pending=2)))
    assert v["known"] and v["capacity"] == {"mem_mib": 4000, "cores": 400}
    assert [(r["name"], r["parent"], r["depth"]) for r in v["rows"]] == [
        ("org", "", 0),
        ("research", "org", 1),
        ("deep", "research", 2),
        ("lone", "", 0),
    ]
    research = v["rows"][1]
    assert research == {
        "name": "research",
        "parent": "org",
        "depth": 1,
        "weight": 2.0,
        "guarantee": {"mem_mib": 1000, "cores": 100},
        "limit": {"mem_mib": 1500, "cores": None},  # -1 on the wire: no limit
        "used": {"mem_mib": 700, "cores": 0},
        "borrowed": {"mem_mib": 0, "cores": 0},
        "pending": 2,
    }
    # No queues, and no answer, are told apart.
    assert queue_view(QueueState(reply=QueuesReply()))["rows"] == []
    assert queue_view(QueueState(reply=QueuesReply()))["known"]
    unknown = fleet_view({}, {}, {}, {}, [], [], 0.0, QueueState(error="why"))["queues"]
    assert unknown == {"known": False, "error": "why", "rows": [], "capacity": None}


def series(state: QueueState) -> dict[str, dict[str, float]]:
    reg = CollectorRegistry()
    reg.register(QueuesCollector(lambda: state))
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            assert set(s.labels) == {"queue", "parent"}
            out.setdefault(s.name, {})[s.labels["queue"]] = s.value
    return out


def test_series_per_queue_from_the_last_answer() -> None:
    got = series(QueueState(reply=reply(used=700, pending=2)))
    assert got["hami_queue_guarantee_memory_bytes"]["org"] == 2000 * MIB
    assert got["hami_queue_guarantee_core_ratio"]["research"] == 100
    assert got["hami_queue_limit_memory_bytes"] == {"research": 1500 * MIB}  # the others: none
    assert "hami_queue_limit_core_ratio" not in got
    assert got["hami_queue_used_memory_bytes"]["research"] == 700 * MIB
    assert got["hami_queue_borrowed_memory_bytes"]["lone"] == 300 * MIB
    assert got["hami_queue_borrowed_core_ratio"]["lone"] == 30
    assert got["hami_queue_pending_requests"] == {"org": 0, "research": 2, "deep": 0, "lone": 0}
    assert got["hami_queue_weight"]["research"] == 2.0
    assert series(QueueState(error="placement is not running")) == {}


async def test_stopping_ends_an_ask_under_way() -> None:
    placement = Placement()
    placement.hold = asyncio.Event()  # never set: placement does not answer
    q = Queues(placement, clock=Clock())
    waiting = asyncio.create_task(q.current())
    await asked(placement)
    await q.stop()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert q.state.reply is None and q._asking is None
