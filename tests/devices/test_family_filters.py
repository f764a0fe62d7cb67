"""A vendor's own use/nouse type and UUID annotations: the codec carries them into the
request (Constraints.family_annotations), placement hands them to the family's fit, and
the fit honours them as HAMi's checkType / CheckUUID do (cases from HAMi's vendor
tests: pkg/device/hygon, cambricon, ascend)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices.base import CARD_TYPE_MISMATCH, CARD_UUID_MISMATCH, Ask, Card, PodInfo
from shared.devices.registry import REGISTRY, family_filter_annotations
from shared.hami.codec import pod_request
from shared.schemas import Device, DeviceAsk, NodeInventory
from tests.placement.util import cards_of, cluster, fail, place, placer, req

USE, NOUSE = "hygon.com/use-dcutype", "hygon.com/nouse-dcutype"


# HAMi's Test_checkDCUtype: (annotations, card type, fits)
@pytest.mark.parametrize("annos,card_type,want", [
    ({USE: "dcu"}, "dcu", True),
    ({USE: "dcu"}, "test", False),
    ({}, "dcu", True),
    ({USE: "dcu,test"}, "dcu", True),
    ({NOUSE: "dcu"}, "dcu", False),
    ({NOUSE: "test,dcu"}, "test", False),
    ({NOUSE: "dcu"}, "test", True),
])  # fmt: skip
def test_hygon_type_annotations(annos: dict[str, str], card_type: str, want: bool) -> None:
    fam = REGISTRY.family("DCU")
    card = Card(id="dcu-0", type=card_type, count=4, totalmem=65536, totalcore=100)
    got = fam.fit([card], Ask("DCU", 1, 1024, 0, 10), PodInfo(annotations=annos))
    assert got.ok is want
    if not want:
        assert got.reasons == {CARD_TYPE_MISMATCH: 1}


# HAMi's CheckUUID: the use list wins over the nouse list
@pytest.mark.parametrize("family,use,nouse", [
    ("MLU", "cambricon.com/use-gpuuuid", "cambricon.com/nouse-gpuuuid"),
    ("Ascend910B3", "hami.io/use-Ascend910B3-uuid", "hami.io/no-use-Ascend910B3-uuid"),
    ("DCU", "hygon.com/use-gpuuuid", "hygon.com/nouse-gpuuuid"),
])  # fmt: skip
def test_uuid_annotations(family: str, use: str, nouse: str) -> None:
    fam = REGISTRY.family(family)
    cards = [
        Card(id=f"c{i}", index=i, type=family, count=4, totalmem=65536, totalcore=100)
        for i in range(3)
    ]
    ask = Ask(family, 1, 1024, 0, 10)

    def chosen(annos: dict[str, str]) -> list[str]:
        got = fam.fit(cards, ask, PodInfo(annotations=annos))
        return [g.uuid for g in got.grants] if got.ok else []

    assert chosen({use: "c0"}) == ["c0"]
    assert chosen({nouse: "c2,c1"}) == ["c0"]
    assert chosen({use: "c1", nouse: "c1"}) == ["c1"]  # use wins
    none = fam.fit(cards, ask, PodInfo(annotations={use: "other"}))
    assert not none.ok and none.reasons == {CARD_UUID_MISMATCH: 3}


def test_codec_carries_the_familys_filters_only() -> None:
    pod: dict[str, Any] = {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "annotations": {
                USE: "K100",
                "cambricon.com/nouse-gpuuuid": "mlu-1",
                "nvidia.com/use-gputype": "A100",  # NVIDIA's: in its own fields
                "example.com/other": "x",
            },
        },
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"hygon.com/dcunum": 1}}}]},
    }
    r = pod_request(pod)
    assert r.constraints.family_annotations == {USE: "K100", "cambricon.com/nouse-gpuuuid": "mlu-1"}
    assert r.constraints.use_types == ["A100"]
    assert family_filter_annotations({}) == {}


def dcu_node(name: str, model: str, n: int = 2) -> NodeInventory:
    return NodeInventory(
        node=name,
        devices=[
            Device(
                uuid=f"{name}-dcu-{i}",
                index=i,
                type=f"DCU-{model}",
                vendor="DCU",
                count=4,
                devmem=65536,
                mode="",
            )
            for i in range(n)
        ],
    )


def test_placement_honours_type_and_uuid_annotations() -> None:
    p = placer(cluster(dcu_node("k100", "K100-AI"), dcu_node("z100", "Z100")))
    ask = DeviceAsk(vendor="DCU", nums=1, mem=1024, cores=10)
    assert place(p, req(ask, family_annotations={USE: "z100"})).node == "z100"
    assert place(p, req(ask, family_annotations={NOUSE: "Z100"})).node == "k100"
    got = place(p, req(ask, family_annotations={"hygon.com/use-gpuuuid": "z100-dcu-1"}))
    assert cards_of(got)[0][0] == "z100-dcu-1"
    f = fail(p, req(ask, family_annotations={USE: "BW1000"}))
    assert "CardTypeMismatch" in f.message
    f = fail(p, req(ask, family_annotations={"hygon.com/nouse-gpuuuid": ",".join(
        f"{n}-dcu-{i}" for n in ("k100", "z100") for i in range(2))}))  # fmt: skip
    assert "CardUuidMismatch" in f.message
