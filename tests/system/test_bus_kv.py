"""The bus's KV buckets: direct gets, also on buckets an older release made."""

from __future__ import annotations

from pathlib import Path

import nats

from shared import subjects
from shared.bus import Bus
from shared.natsserver import EmbeddedNats
from shared.schemas import NodeLedger


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
