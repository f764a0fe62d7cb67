"""Kubernetes mode: the node agent's work on a pod continues the trace of its decision.

The ledger entry carries the decision's ``traceparent``; the kube node agent's slice
writer (``nodeagent.prepare``) and its device plugin's Allocate (``nodeagent.allocate``,
which the kubelet calls as the container is created) are children of that span, as the
real OTLP exporter sends them to the in-test receiver. An entry without a trace starts
none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from shared import tracing
from shared.bus import Bus
from shared.config import Config
from tests.fakekubelet import FakeKubelet
from tests.node import test_kube_node as kn
from tests.node.test_kube_node import RES, cards, make_node, put_ledger, until
from tests.node.util import grant, pod
from tests.otlp_collector import Collector

pytestmark = pytest.mark.timeout(40)
dirs = kn.dirs  # the node-side tests' fixtures: short socket paths, a fake kubelet
kubelet = kn.kubelet


@pytest.fixture
def otlp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    with Collector() as c:
        monkeypatch.delenv("HAMI_TRACE_EXPORT", raising=False)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", c.http_endpoint)
        tracing.setup("test", force=True)
        try:
            yield c
        finally:
            tracing.shutdown()
            tracing.setup("tests", mode="none", force=True)


async def test_prepare_and_allocate_are_children_of_the_decision(
    bus: Bus, cfg: Config, dirs: tuple[Path, Path], kubelet: FakeKubelet, otlp: Collector
) -> None:
    node = await make_node(bus, cfg, dirs)
    try:
        await kubelet.wait_devices(RES, lambda d: len(d) == 40)
        c = cards(node)
        # The decision (placement's span, here the test's) writes the entry.
        with tracing.span(tracing.tracer("hami.test"), "decide") as decide:
            traced = msgspec.structs.replace(
                pod("a", grant("main", [c[1]])), traceparent=tracing.traceparent()
            )
        untraced = pod("b", grant("main", [c[2], c[3]]))  # two cards: a's Allocate is exact
        await put_ledger(bus, [traced, untraced])
        await until(lambda: {"a", "b"} <= node.slices.prepared)
        await kubelet.admit_pod("a", [{RES: 1}])
        await kubelet.admit_pod("b", [{RES: 2}])
    finally:
        await node.stop()
    tracing.shutdown()
    spans = otlp.spans()
    ctx = decide.get_span_context()
    tid, sid = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
    mine = {s.name: s for s in spans if s.attributes.get("hami.uid") == "a"}
    assert set(mine) == {"nodeagent.prepare", "nodeagent.allocate"}
    for s in mine.values():
        assert (s.trace_id, s.parent_id, s.service) == (tid, sid, "hami-nodeagent")
        assert s.attributes["hami.node"] == "n1" and s.attributes["hami.cards"] == [c[1]]
    allocate = mine["nodeagent.allocate"].attributes
    assert allocate["hami.container"] == "main" and allocate["hami.allocate.candidates"] == 1
    # The prepared event is published in the prepare span.
    [pub] = [s for s in spans if s.name == "publish hami.evt.alloc.prepared" and s.trace_id == tid]
    assert pub.parent_id == mine["nodeagent.prepare"].span_id
    # A reservation without a trace is prepared and allocated with no span at all.
    assert not [s for s in spans if s.attributes.get("hami.uid") == "b"]
    assert {s.trace_id for s in spans if s.service == "hami-nodeagent"} == {tid}
