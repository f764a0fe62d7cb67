"""The binder's Event sender: Events trail the binds, are never lost to a slow API
unless the queue overflows, and a steady load cannot starve them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.binder.events import EventSender


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.got: list[tuple[float, str]] = []
        self.fail = fail

    async def post(self, path: str, body: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise OSError("api down")
        self.got.append((time.monotonic(), body["reason"]))


async def test_events_wait_for_the_binds_to_go_quiet() -> None:
    sink = Sink()
    s = EventSender(sink.post, quiet=0.1, max_delay=5.0)
    with s.busy():
        s.emit("/events", {"reason": "A"})
        await asyncio.sleep(0.2)
        assert sink.got == []  # a bind is running: the Event waits
    t_quiet = time.monotonic()
    s.emit("/events", {"reason": "B"})
    await asyncio.sleep(0.05)
    assert sink.got == []  # not quiet for long enough yet
    await asyncio.sleep(0.2)
    assert [r for _, r in sink.got] == ["A", "B"]
    assert sink.got[0][0] - t_quiet >= 0.09
    await s.stop()


async def test_a_steady_load_does_not_starve_events() -> None:
    sink = Sink()
    s = EventSender(sink.post, quiet=0.1, max_delay=0.3)
    t0 = time.monotonic()
    s.emit("/events", {"reason": "A"})

    async def binds() -> None:  # back to back, never quiet
        while time.monotonic() - t0 < 1.0:
            with s.busy():
                await asyncio.sleep(0.02)

    await binds()
    assert [r for _, r in sink.got] == ["A"]
    assert 0.25 <= sink.got[0][0] - t0 < 0.9  # sent at max_delay, during the load
    await s.stop()


async def test_full_queue_drops_and_counts_and_stop_flushes() -> None:
    sink = Sink()
    s = EventSender(sink.post, max_queue=3, max_delay=60.0)
    labels: list[str] = []

    async def label(path: str, body: dict[str, Any]) -> None:
        labels.append(path)

    with s.busy():
        for i in range(5):
            s.emit("/events", {"reason": f"E{i}"})
        s.emit("/pods/p", {}, send=label)  # not an Event: never dropped
        assert s.dropped == 2
        await s.stop()  # sends what is queued, busy or not
    assert [r for _, r in sink.got] == ["E0", "E1", "E2"]
    assert labels == ["/pods/p"]
    assert s.sent == 4


async def test_failed_posts_are_counted_not_raised() -> None:
    s = EventSender(Sink(fail=True).post, quiet=0.01)
    s.emit("/events", {"reason": "A"})
    await s.flush()
    assert (s.sent, s.failed) == (0, 1)
    await s.stop()


async def test_flush_sends_at_once_even_with_senders_waiting_for_quiet() -> None:
    sink = Sink()
    s = EventSender(sink.post, quiet=0.1, max_delay=60.0)
    with s.busy():
        s.emit("/events", {"reason": "A"})
        await asyncio.sleep(0.1)  # the senders are parked, waiting for the binds to end
        t0 = time.monotonic()
        await s.flush(timeout=2.0)
        assert [r for _, r in sink.got] == ["A"]
        assert time.monotonic() - t0 < 1.0
        s.emit("/events", {"reason": "B"})  # after the flush: waits for quiet again
        await asyncio.sleep(0.2)
        assert [r for _, r in sink.got] == ["A"]
    await asyncio.sleep(0.3)
    assert [r for _, r in sink.got] == ["A", "B"]
    await s.stop()
