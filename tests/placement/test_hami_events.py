"""HAMi's FilteringFailed events for a pod no node fits, from HAMi v2.10's scheduler.

HAMi (``calcScore`` then ``Filter``) parses each failed node's reason text with
``ParseReason``, emits one Warning per reason naming its nodes sorted
(``"2 nodes CardInsufficientMemory(a,b)"``), then ``"no available node, N nodes do not
meet"``. A node-level text (``NodeInsufficientDevice``) parses to nothing, so such a node
is named under no reason. The cases are HAMi's ``TestParseReason`` table and events
built on small clusters, with the placer's node lists feeding the binder's texts.
"""

from __future__ import annotations

import pytest

from services.binder.events import filtering_failed_messages
from services.placement.engine import hami as h
from shared.schemas import Device, DeviceAsk

from .util import cluster, fail, node, place, placer, req


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (
            "3/8 CardInsufficientMemory, 2/8 CardInsufficientCore, 3/8 CardNotHealth",
            {"CardInsufficientMemory": 3, "CardInsufficientCore": 2, "CardNotHealth": 3},
        ),
        ("", {}),
        ("invalid_reason_format", {}),
        ("4/4 CardTypeMismatch", {"CardTypeMismatch": 4}),
        ("NodeInsufficientDevice", {}),
    ],
)
def test_hami_parse_reason(text: str, want: dict[str, int]) -> None:
    assert h.hami_parse_reason(text) == want


def test_messages_one_per_reason_then_the_count() -> None:
    got = filtering_failed_messages(
        {"CardTimeSlicingExhausted": ["e", "d"], "CardInsufficientMemory": ["c", "a", "b"]}, 5
    )
    assert got == [
        "3 nodes CardInsufficientMemory(a,b,c)",
        "2 nodes CardTimeSlicingExhausted(d,e)",
        "no available node, 5 nodes do not meet",
    ]
    assert filtering_failed_messages({}, 2) == ["no available node, 2 nodes do not meet"]


def test_placer_names_each_reasons_nodes() -> None:
    # a: one A100 full, one T4 (type mismatch); b and c: cards too small;
    # d: one card only, two asked (NodeInsufficientDevice: HAMi names it nowhere)
    inv = node("a", 2, dev={"type": "NVIDIA-A100"})
    inv.devices[1] = Device(uuid="GPU-a-1", index=1, type="NVIDIA-T4", devmem=10000)
    p = placer(cluster(inv, node("b", 2, 100), node("c", 2, 100), node("d", 1)))
    place(p, req(DeviceAsk(mem=8000, cores=1), node_name="a", use_uuids=["GPU-a-0"]))
    r = req(DeviceAsk(nums=2, mem=5000, cores=1), use_types=["A100"])
    f = fail(p, r)
    got = p.reason_nodes(r, f)
    assert got == {"CardInsufficientMemory": ["a", "b", "c"], "CardTypeMismatch": ["a"]}
    assert filtering_failed_messages(got, f.nodes_total) == [
        "3 nodes CardInsufficientMemory(a,b,c)",
        "1 nodes CardTypeMismatch(a)",
        "no available node, 4 nodes do not meet",
    ]


def test_placer_lists_the_fitting_cards_of_a_short_node() -> None:
    # two free cards, three asked on a node of three: one card is full, the two that
    # fit are "AllocatedCardsInsufficientRequest" as HAMi's fit counts them
    p = placer(cluster(node("a", 3)))
    place(p, req(DeviceAsk(mem=10000, cores=1), node_name="a", use_uuids=["GPU-a-2"]))
    r = req(DeviceAsk(nums=3, mem=5000, cores=1))
    f = fail(p, r)
    assert p.reason_nodes(r, f) == {
        "AllocatedCardsInsufficientRequest": ["a"],
        "CardInsufficientMemory": ["a"],
    }
