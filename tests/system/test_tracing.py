"""One trace per scheduling decision, across the services, carried in NATS headers."""

from __future__ import annotations

from hami.system import System
from shared import subjects, tracing
from shared.bus import Bus
from shared.config import Config
from shared.schemas import ContainerAsk, DeviceAsk, SubmitReply, SubmitRequest


async def test_submit_decide_and_bind_share_one_trace(nats_url: str, cfg: Config, bus: Bus) -> None:
    tracing.setup("tests", mode="memory")
    tracing.MEMORY.clear()
    s = System(cfg, nats_url=nats_url, sim_nodes=1, sim_gpus=["T4:2"], metrics_port=0)
    await s.start()
    try:
        req = SubmitRequest(name="traced", containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=50)])])
        r = await bus.request(subjects.API_SUBMIT, req, SubmitReply, timeout=10)
        assert r.ok
    finally:
        await s.stop()
    spans = {sp.name: sp for sp in tracing.MEMORY.get_finished_spans()
             if sp.attributes and sp.attributes.get("hami.uid") == r.uid}
    assert {"binder.submit", "placement.decide", "binder.bind"} <= set(spans)
    assert spans["binder.bind"].context.trace_id == spans["binder.submit"].context.trace_id
    submit, decide = spans["binder.submit"], spans["placement.decide"]
    assert decide.context.trace_id == submit.context.trace_id
    assert decide.parent is not None and decide.parent.span_id == submit.context.span_id
    assert decide.attributes["hami.node"] == "sim-node-0"  # type: ignore[index]
