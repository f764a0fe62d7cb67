"""The bus's KV buckets (direct gets, also on buckets an older release made) and its
writes whose acknowledgement is awaited later."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from shared import bus as bus_mod
from shared import subjects
from shared.bus import Bus, Conflict, _Writes
from shared.natsserver import EmbeddedNats
from shared.schemas import AllocReleased, NodeLedger


async def test_buckets_made_without_direct_gets_are_upgraded(tmp_path: Path) -> None:
    srv = EmbeddedNats(data_dir=tmp_path)
    url = await srv.astart()
    try:
        nc = await nats.connect(url)
        js = nc.jetstream()
        old = await js.create_key_value(bucket=subjects.LEDGER_BUCKET, history=1)
        await old.put("n0", b"{}")  # an entry written before the upgrade survives it
        stream = f"KV_{subjects.LEDGER_BUCKET}"
        assert not (await js.stream_info(stream)).config.allow_direct
        await nc.close()

        bus = await Bus.connect(url, "upgraded")  # set-up opens every bucket
        try:
            assert (await bus.js.stream_info(stream)).config.allow_direct
            rev = await bus.kv_cas(subjects.LEDGER_BUCKET, "n1", NodeLedger(node="n1"), 0)
            led, got = await bus.kv_get(subjects.LEDGER_BUCKET, "n1", NodeLedger)
            assert (led, got) == (NodeLedger(node="n1"), rev)
            assert await bus.kv_get_raw(subjects.LEDGER_BUCKET, "n0") == (b"{}", 1)
            assert await bus.kv_get_raw(subjects.LEDGER_BUCKET, "absent") == (None, 0)
        finally:
            await bus.close()
    finally:
        srv.cleanup()


async def test_writes_without_waiting_answer_every_outcome(bus: Bus) -> None:
    """kv_cas_nowait / publish_event_nowait: the revision, a conflict, a stream error."""
    first = await bus.kv_cas(subjects.LEDGER_BUCKET, "n1", NodeLedger(node="n1"), 0)
    ok = await bus.kv_cas_nowait(subjects.LEDGER_BUCKET, "n1", NodeLedger(node="n1"), first)
    # sent before the first answer: both expect the same revision; the second loses
    stale = await bus.kv_cas_nowait(subjects.LEDGER_BUCKET, "n1", NodeLedger(node="n1"), first)
    second = await ok
    assert second > first
    with pytest.raises(Conflict):
        await stale
    assert (await bus.kv_get_raw(subjects.LEDGER_BUCKET, "n1"))[1] == second

    ev = AllocReleased(uid="u1", node="n1")
    seq = await bus.publish_event_nowait(subjects.alloc("released"), ev, msg_id="r1")
    again = await bus.publish_event_nowait(subjects.alloc("released"), ev, msg_id="r1")
    assert await seq == await again  # the same id is stored once
    # A stream that rejects the write (here: it expects another stream) fails the
    # future instead of leaving it pending, as nats-py's publish_async does.
    bad = await bus._writes.send(subjects.alloc("released"), b"{}", {"Nats-Expected-Stream": "other"})
    with pytest.raises(nats.js.errors.APIError) as err:
        await asyncio.wait_for(bad, 5)
    assert err.value.err_code == 10060


async def test_an_unanswered_write_times_out(bus: Bus) -> None:
    """No stream takes the subject and nobody answers: the future fails, not hangs."""
    writes = _Writes(bus.nc, timeout=0.5)
    # a plain subscriber on the reply-less subject swallows the message: no answer
    await bus.nc.subscribe("nobody.answers", cb=_ignore)
    fut = await writes.send("nobody.answers", b"x", {})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(fut, 5)
    assert not writes.pending


async def _ignore(msg: object) -> None:
    return None


async def test_a_write_nobody_stores_fails_at_once(bus: Bus) -> None:
    """No stream and no subscriber on the subject: the server says so (503)."""
    fut = await bus._writes.send("no.stream.here", b"x", {})
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await asyncio.wait_for(fut, 5)
    await bus.nc.subscribe("nobody.answers", cb=_ignore)
    pending = await bus._writes.send("nobody.answers", b"x", {})
    await bus.close()  # closing fails what is still unanswered, and any later write
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pending
    with pytest.raises(nats.errors.ConnectionClosedError):
        await bus._writes.send("no.stream.here", b"x", {})


async def test_a_kv_watch_follows_again_soon_after_nats_restarts(tmp_path: Path) -> None:
    """A restarted server has lost the watch's consumer: without the revival on
    reconnect, nats-py finds out only after two missed 5 s heartbeats (10-20 s), and
    the watch sees no update until then."""
    srv = EmbeddedNats(data_dir=tmp_path)
    url = await srv.astart()
    seen: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()

    async def on_entry(key: str, value: bytes | None, rev: int) -> None:
        await seen.put((key, value))

    bus = await Bus.connect(url, "watcher")
    try:
        await (await bus.kv(subjects.LEDGER_BUCKET)).put("before", b"1")
        ready = asyncio.Event()
        task = await bus.watch_kv(subjects.LEDGER_BUCKET, on_entry, ready)
        await asyncio.wait_for(ready.wait(), 10)
        assert await asyncio.wait_for(seen.get(), 5) == ("before", b"1")

        srv.stop()  # a clean stop keeps the store; the watch's consumer is gone
        await srv.astart()
        writer = await Bus.connect(url, "writer")
        try:
            await (await writer.kv(subjects.LEDGER_BUCKET)).put("after", b"2")
            # well under the heartbeat reset's 10 s, with room for a slow machine
            assert await asyncio.wait_for(seen.get(), 7) == ("after", b"2")
        finally:
            await writer.close()
        task.cancel()
    finally:
        await bus.close()
        srv.cleanup()


async def test_close_does_not_wait_out_a_subscription_nobody_reads(nats_url: str) -> None:
    """A subscription whose reader stopped first never drains: nats-py would wait 30 s
    per connection for it (``hami demo`` and a stopping system ran past a minute)."""
    b = await Bus.connect(nats_url, "unread", setup=False)
    await b.nc.subscribe("hami.test.unread")  # no callback, and nobody iterates it
    for _ in range(5):
        await b.nc.publish("hami.test.unread", b"x")
    await b.nc.flush()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(60):  # a hang guard only
        await b.close()
    assert b.nc.is_closed
    # Bounded by our drain limit, not nats-py's 30 s default.
    assert loop.time() - t0 < bus_mod.DRAIN_S * 5
