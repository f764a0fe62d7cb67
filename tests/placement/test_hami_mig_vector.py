"""The vectorised stage on MIG cards: HAMi's ``isMIGRequest`` and a pod's sum.

HAMi v2.10 (``fitInDevices``) skips its ``NodeInsufficientDevice`` count for an NVIDIA ask
on a node with a card in MIG mode (unless the pod's ``nvidia.com/vgpu-mode`` names another
mode), since its fit visits a MIG card again and one card may give several instances. The
vectorised stage counts a fitting MIG card's free slots for such an ask. For a pod whose
app containers run together it also checks their sum against the cards that fit any of
them, so a node where one card fits each container's ask but not all of them together is
not passed to the exact fit, which stays the judge (and gives the node's text on failure).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from services.placement.engine import Placement, Placer, hami
from shared.schemas import ContainerAsk, DeviceAsk

from .test_mig import core_node, mig_node, migs
from .util import cluster, fail, place, placer, pod, req


@pytest.mark.parametrize(
    ("vendor", "mode", "modes", "want"),
    [
        ("NVIDIA", None, ["mig"], True),
        ("NVIDIA", None, ["hami-core", "mig"], True),
        ("NVIDIA", "mig", ["mig"], True),
        ("NVIDIA", "hami-core", ["mig"], False),  # the annotation names another mode
        ("NVIDIA", "", ["mig"], False),  # set but empty: HAMi's Contains is false
        ("NVIDIA", None, ["hami-core"], False),  # no MIG card on the node
        ("Ascend", None, ["mig"], False),
    ],
)
def test_mig_request_as_hami(vendor: str, mode: str | None, modes: list[str], want: bool) -> None:
    from services.placement.engine import mig

    assert mig.mig_request(vendor, mode, modes) is want


def test_pure_fit_node_skips_the_card_count_for_a_mig_request() -> None:
    cards = [hami.Card(id="GPU-0", mode="mig", count=7, totalmem=40960)]
    r = hami.Request(nums=2, memreq=9000)
    assert hami.fit_node(cards, r).node_reason == ""
    assert hami.fit_node(cards, r, f=hami.Filters(vgpu_mode="hami-core")).node_reason == (
        "NodeInsufficientDevice"
    )


def test_two_instances_of_the_only_mig_card() -> None:
    p = placer(cluster(mig_node("a")))
    got = migs(place(p, req(DeviceAsk(nums=2, mem=9000))))
    assert [(g[0], g[1], g[2]) for g in got] == [
        ("GPU-a-0", "2g.10gb", 0),
        ("GPU-a-0", "2g.10gb", 2),
    ]
    # a pod kept off MIG cards counts cards as HAMi does
    f = fail(
        placer(cluster(mig_node("b"))), req(DeviceAsk(nums=2, mem=9000), vgpu_mode="hami-core")
    )
    assert f.reasons == {"NodeInsufficientDevice": 1}


def tried_nodes(p: Placer) -> list[str]:
    seen: list[str] = []
    fit_node = p._fit_node

    def spy(rec: Any, *args: Any) -> Any:
        seen.append(rec.name)
        return fit_node(rec, *args)

    p._fit_node = spy  # type: ignore[method-assign,assignment]
    return seen


def two_big() -> Any:
    # each container's ask needs the 7g.40gb profile: one A100-40GB holds one of them
    return pod(ContainerAsk(name="x", devices=[DeviceAsk(mem=30000)]),
               ContainerAsk(name="y", devices=[DeviceAsk(mem=30000)]))  # fmt: skip


def test_the_vector_stage_no_longer_passes_a_node_one_card_cannot_serve_twice() -> None:
    # node a (one MIG card) ranks first; before, the vector stage passed it, since its
    # card fits each ask, and the exact stage had to try it and fail
    p = placer(cluster(mig_node("a"), mig_node("b", cards=2)))
    seen = tried_nodes(p)
    got = place(p, two_big())
    assert isinstance(got, Placement) and got.node == "b"
    assert seen == ["b"]
    assert sorted(g[0] for g in migs(got)) == ["GPU-b-0", "GPU-b-1"]


def test_a_node_refused_by_the_sum_keeps_the_exact_fits_text() -> None:
    p = placer(cluster(mig_node("a"), core_node("c", mem=40960)))
    # c's one hami-core card would take both (60000 MiB > 40960: no), a's MIG card one
    f = fail(p, two_big())
    assert f.tried == {0: "1/1 CardInsufficientMemory", 1: "1/1 CardInsufficientMemory"}
    assert f.reasons == {"CardInsufficientMemory": 2}


def test_the_sum_counts_slots_too() -> None:
    # c: one hami-core card with two free slots, d: one with three; three app containers
    # of 1000 MiB each fit c's card each alone, not together: only d is tried
    c, d = core_node("c"), core_node("d")
    c.devices[0] = msgspec.structs.replace(c.devices[0], count=2)
    d.devices[0] = msgspec.structs.replace(d.devices[0], count=3)
    p = placer(cluster(c, d))
    seen = tried_nodes(p)
    three = pod(*[ContainerAsk(name=f"c{i}", devices=[DeviceAsk(mem=1000)]) for i in range(3)])
    assert place(p, three).node == "d"
    assert seen == ["d"]
    # and when no node is left, c (refused by the sum) gets the exact fit's text, d
    # (its card full: refused by the card masks) the masks' one
    f = fail(p, pod(*[ContainerAsk(name=f"c{i}", devices=[DeviceAsk(mem=1000)]) for i in range(3)]))
    assert f.tried == {0: "1/1 CardTimeSlicingExhausted"}
    assert f.reasons == {"CardTimeSlicingExhausted": 2}
