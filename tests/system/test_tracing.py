"""One trace per scheduling decision, across the services, carried in NATS headers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from hami.system import System
from shared import subjects, tracing
from shared.bus import Bus
from shared.config import Config
from shared.schemas import AllocRequested, ContainerAsk, DeviceAsk, SubmitReply, SubmitRequest


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


async def test_a_batch_links_to_each_request_and_each_decision_stays_in_its_trace(
    nats_url: str, cfg: Config, bus: Bus, in_memory: None
) -> None:
    s = System(cfg, nats_url=nats_url, sim_nodes=2, sim_gpus=["T4:4"], metrics_port=0)
    await s.start()
    placement = s.services[1]
    client = tracing.tracer("hami.test")
    roots: dict[str, int] = {}  # uid -> the trace id its client started
    try:
        # Held, so the requests queue up and are decided in one batch.
        async with placement.lock:
            for i in range(4):
                req = AllocRequested(
                    uid=f"batched-{i}",
                    name=f"batched-{i}",
                    pending=False,
                    containers=[ContainerAsk(devices=[DeviceAsk(mem_percent=10)])],
                )
                with tracing.span(client, "client.submit") as root:
                    roots[req.uid] = root.get_span_context().trace_id
                    await bus.publish_event(subjects.alloc("requested"), req, msg_id=req.uid)
            async with asyncio.timeout(10):
                while placement._sub.queue.qsize() < 3:  # noqa: ASYNC110 - the queue has no event
                    await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            while not all(u in placement.owner for u in roots):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        await s.stop()
    finished = tracing.MEMORY.get_finished_spans()
    decides = {
        str(sp.attributes["hami.uid"]): sp
        for sp in finished
        if sp.name == "placement.decide"
        and sp.attributes
        and sp.attributes.get("hami.uid") in roots
    }
    assert set(decides) == set(roots)
    for uid, d in decides.items():  # each decision is in its own request's trace
        assert d.context.trace_id == roots[uid]
        attrs = dict(d.attributes or {})
        assert attrs["hami.outcome"] == "placed" and int(attrs["hami.ledger.revision"]) >= 1  # type: ignore[arg-type]
    [batch] = [
        sp
        for sp in finished
        if sp.name == "placement.batch"
        and {ln.context.trace_id for ln in sp.links} & set(roots.values())
    ]
    linked = {ln.context.trace_id for ln in batch.links}
    assert len(linked) >= 3 and linked <= set(roots.values())
    assert batch.context.trace_id not in roots.values()  # a trace of its own
    # ... and the decisions it made link back to it.
    in_batch = [sp for sp in decides.values() if sp.context.trace_id in linked]
    assert in_batch and all(
        [ln.context.span_id for ln in sp.links] == [batch.context.span_id] for sp in in_batch
    )
