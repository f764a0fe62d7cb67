"""One trace per scheduling decision, across the services, carried in NATS headers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from hami.system import System
from shared import subjects, tracing
from shared.bus import Bus
from shared.config import Config
from shared.schemas import ContainerAsk, DeviceAsk, SubmitReply, SubmitRequest


@pytest.fixture
def in_memory() -> Iterator[None]:
    tracing.setup("tests", mode="memory", force=True)
    tracing.MEMORY.clear()
    yield
    tracing.shutdown()
    tracing.setup("tests", mode="none", force=True)


async def test_submit_decide_and_bind_share_one_trace(
    nats_url: str, cfg: Config, bus: Bus, in_memory: None
) -> None:
    s = System(cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=["T4:2"], metrics_port=0)
    await s.start()
    try:
        req = SubmitRequest(
            name="traced", containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=50)])]
        )
        r = await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=10)
        assert r.ok
    finally:
        await s.stop()
    finished = tracing.MEMORY.get_finished_spans()
    spans = {
        sp.name: sp for sp in finished if sp.attributes and sp.attributes.get("hami.uid") == r.uid
    }
    assert {"binder.submit", "placement.decide", "binder.bind"} <= set(spans)
    submit, decide, bind = spans["binder.submit"], spans["placement.decide"], spans["binder.bind"]
    assert decide.context.trace_id == submit.context.trace_id == bind.context.trace_id
    by_id = {sp.context.span_id: sp for sp in finished}

    def chain(sp: ReadableSpan) -> list[str]:
        out = []
        while sp.parent is not None and sp.parent.span_id in by_id:
            sp = by_id[sp.parent.span_id]
            out.append(sp.name)
        return out

    # decide <- receive (placement) <- publish (binder) <- submit
    assert chain(decide)[:3] == [
        "receive hami.evt.alloc.requested",
        "publish hami.evt.alloc.requested",
        "binder.submit",
    ]
    assert chain(bind)[:3] == [
        "receive hami.evt.alloc.decided",
        "publish hami.evt.alloc.decided",
        "placement.decide",
    ]
    assert decide.attributes["hami.node"] == "sim-node-0"  # type: ignore[index]
