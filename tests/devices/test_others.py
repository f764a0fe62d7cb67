"""Hygon, Iluvatar, Enflame, AWS Neuron, AMD, Biren and Vastai: HAMi's request, fit and
annotation rules for each (cases from their pkg/device/<vendor> code and tests)."""

from __future__ import annotations

import pytest

from shared.devices import awsneuron, enflame, hygon, vastai
from shared.devices.base import Ask, PodInfo, RequestError
from shared.devices.registry import REGISTRY
from tests.devices.util import card, res


def test_hygon_like_nvidia_with_dcu_type_filters() -> None:
    f = hygon.FAMILY
    ask = f.parse(res({"hygon.com/dcunum": 1, "hygon.com/dcumem": 2000, "hygon.com/dcucores": 30}))
    assert ask == Ask("DCU", 1, 2000, 0, 30)
    assert f.parse(res({"hygon.com/dcunum": 1})) == Ask("DCU", 1, 0, 100, 0)
    z100 = card("DCU-1", "DCU-Z100", count=4, totalmem=16384, totalcore=100)
    k100 = card("DCU-2", "DCU-K100", count=4, totalmem=65536, totalcore=100)
    pod = PodInfo(annotations={"hygon.com/use-dcutype": "k100"})
    got = f.fit([k100, z100], ask, pod)
    assert got.ok and got.grants[0].uuid == "DCU-2"
    assert f.fit([z100], ask, pod).text == "1/1 CardTypeMismatch"
    # the legacy colon register, as the DCU plugin writes it
    cards = f.node_cards(
        "n", {f.register_annotation: "DCU-1,4,16384,100,DCU-Z100,0,true,0,hami-core:"}, {}
    )
    assert (cards[0].id, cards[0].count, cards[0].totalmem) == ("DCU-1", 4, 16384)


def test_iluvatar_units_and_whole_cards() -> None:
    f = REGISTRY.family("BI-V150")
    assert f.parse(res({"iluvatar.ai/BI-V150-vgpu": 1, "iluvatar.ai/BI-V150.vMem": 4})) == Ask(
        "BI-V150", 1, 1024, 0, 0
    )
    many = f.parse(res({"iluvatar.ai/BI-V150-vgpu": 2, "iluvatar.ai/BI-V150.vCore": 10}))
    assert many == Ask("BI-V150", 2, 0, 100, 200)  # HAMi's webhook writes count x 100 cores
    cards = [card(f"i{k}", "BI-V150", index=k, count=4, totalmem=32768) for k in range(3)]
    cards[0].used, cards[0].usedcores = 1, 10
    got = f.fit(cards, many, PodInfo())
    assert got.ok and [g.uuid for g in got.grants] == ["i2", "i1"]  # walked last to first
    assert [g.usedcores for g in got.grants] == [100, 100]
    assert f.register_annotation == "hami.io/node-BI-V150-register"


def test_enflame_gcu_is_exclusive() -> None:
    f = enflame.GCU
    cards = f.node_cards("n", {}, {"enflame.com/gcu": 2})
    cards[1].used = 1
    assert f.fit(cards, f.parse(res({"enflame.com/gcu": 2})) or Ask("GCU", 2), PodInfo()).text == (
        "1/2 AllocatedCardsInsufficientRequest, 1/2 ExclusiveDeviceAllocateConflict"
    )


def test_neuron_core_granularity() -> None:
    f = awsneuron.FAMILY
    assert f.parse(res({"aws.amazon.com/neuron": 2})) == Ask("AWSNeuron", 2, 0, 0, 2, whole=True)
    assert f.parse(res({"aws.amazon.com/neuroncore": 1})) == Ask("AWSNeuron", 1, 0, 0, 1)
    assert f.parse(res({"aws.amazon.com/neuroncore": 4})) == Ask("AWSNeuron", 2, 0, 0, 2)
    with pytest.raises(RequestError, match="must be 1 or a multiple of 2, got 3"):
        f.parse(res({"aws.amazon.com/neuroncore": 3}))
    with pytest.raises(RequestError, match="greater than 0"):
        f.parse(res({"aws.amazon.com/neuron": 0}))
    cards = f.cards_from_capacity(
        "n", {"aws.amazon.com/neuron": 2, "aws.amazon.com/neuroncore": 4}, "trn1.2xlarge"
    )
    assert [(c.count, c.totalcore, c.totalmem) for c in cards] == [(2, 3, 0), (2, 3, 0)]
    cards[1].used, cards[1].usedcores = 1, 1  # core 0 of device 1 taken
    got = f.fit(cards, Ask("AWSNeuron", 1, 0, 0, 1), PodInfo())
    assert (
        got.ok and got.grants[0].uuid == "n-AWSNeuron-1" and got.grants[0].usedcores == 2
    )  # core 1
    ann = f.pod_annotations(PodInfo(), [[got.grants[0]]], node="n")
    assert ann[awsneuron.IDS] == "3" and ann[awsneuron.RESOURCE_TYPE] == "aws.amazon.com/neuroncore"
    got = f.fit(cards, Ask("AWSNeuron", 1, 0, 0, 2), PodInfo())
    assert got.ok and got.grants[0].uuid == "n-AWSNeuron-0"
    # two devices must be contiguous and free: device 1 is busy
    assert (
        f.fit(cards, Ask("AWSNeuron", 2, 0, 0, 2, whole=True), PodInfo()).text == "1/2 NumaNotFit"
    )


def test_amd_cores_are_a_share_of_compute_units() -> None:
    f = REGISTRY.family("AMDGPU")
    ask = f.parse(res({"amd.com/gpu": 1, "amd.com/gpumem": 4096, "amd.com/gpucores": 25}))
    assert ask == Ask("AMDGPU", 1, 4096, 0, 25)
    assert f.parse(res({"amd.com/gpu": 1})) == Ask("AMDGPU", 1, 0, 100, 100)
    mi300 = card("8eff", "AMD Instinct MI300X VF", count=10, totalmem=196288, totalcore=304)
    got = f.fit([mi300], ask, PodInfo())
    assert got.ok and got.grants[0].usedcores == 76  # 25 % of 304 CUs
    mi300.used, mi300.usedcores = 1, 250
    assert f.fit([mi300], ask, PodInfo()).text == "1/1 CardInsufficientCore"


def test_biren_whole_cards_by_count() -> None:
    f = REGISTRY.family("Biren")
    assert f.parse(res({"birentech.com/gpu": 2})) == Ask("Biren", 2, 0, 100, 0, whole=True)
    value = '[{"id":"br-0","index":0,"count":1,"devmem":65536,"devcore":0,"type":"BR106","health":true}]'
    cards = f.node_cards("n", {f.register_annotation: value}, {})
    assert cards[0].totalcore == 100  # HAMi forces it for its scores
    cards[0].used = 1
    assert f.fit(cards, Ask("Biren", 1, 0, 100), PodInfo()).text == "1/1 CardTimeSlicingExhausted"


def test_vastai_die_mode_prefers_one_card() -> None:
    f = vastai.FAMILY
    dies = [
        card(
            f"d{i}",
            "Vastai",
            index=i,
            count=1,
            custom={"DeviceStrategy": "die", "AIC": f"aic{i // 2}"},
        )
        for i in range(5)
    ]
    dies[4].used = 1  # aic2 has one busy die
    got = f.fit(dies, Ask("Vastai", 2, 0, 100), PodInfo())
    assert got.ok and {g.custom["AIC"] for g in got.grants if g.custom} == {"aic1"}
    assert f.score([got.grants], dies, "binpack") == 1.0
    mutex = PodInfo(annotations={"hami.io/gpu-scheduler-policy": "mutex"})
    got = f.fit(dies[3:], Ask("Vastai", 1, 0, 100), mutex)  # d3 is aic1, free; d4 busy
    assert got.ok and got.grants[0].uuid == "d3"
    dies[3].health = False
    assert f.fit(dies[3:], Ask("Vastai", 1, 0, 100), PodInfo()).text == (
        "1/2 CardNotHealth, 1/2 CardTimeSlicingExhausted"
    )
