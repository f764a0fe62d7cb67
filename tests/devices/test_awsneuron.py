"""AWS Neuron, ported from Project-HAMi/HAMi's pkg/device/awsneuron/device_test.go
(Test_MutateAdmission, Test_GenerateResourceRequests, Test_splitCoreRequest,
Test_GetNodeDevices, Test_PatchAnnotations, Test_countMaskAvailable, Test_graphSelect,
TestDevices_Fit). The cases are HAMi's; the code and the shapes are ours."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from shared.devices import awsneuron
from shared.devices.awsneuron import IDS, NODE_TYPE, PREDICATE_NODE, RESOURCE_TYPE, Neuron
from shared.devices.base import Ask, Card, Grant, PodInfo, RequestError
from tests.devices.util import res

F = awsneuron.FAMILY
N, C = "aws.amazon.com/neuron", "aws.amazon.com/neuroncore"
MAX32 = (1 << 31) - 1


# --------------------------------------------------------------- admission, requests


@pytest.mark.parametrize(
    ("resources", "want"),
    [
        (res({N: 2}), Ask("AWSNeuron", 2, 0, 0, 2, whole=True)),  # set neuron number
        (res(requests={N: 2}), Ask("AWSNeuron", 2, 0, 0, 2, whole=True)),  # request-only
        (res({C: 2}), Ask("AWSNeuron", 1, 0, 0, 2)),  # set neuron cores
        (res({N: 1}, {N: 1}), Ask("AWSNeuron", 1, 0, 0, 2, whole=True)),
        (res({C: 1}, {C: 1}), Ask("AWSNeuron", 1, 0, 0, 1)),
        (res({}), None),  # no neuron devices
    ],
)
def test_admitted_asks(resources: dict[str, Any], want: Ask | None) -> None:
    assert F.parse(resources) == want


@pytest.mark.parametrize(
    ("resources", "text"),
    [
        (res(requests={N: MAX32 + 1}), f"{N} must not exceed 2147483647"),
        (res({C: 3}), f"{C} must be 1 or a multiple of 2, got 3"),
        (res(requests={C: 3}), f"{C} must be 1 or a multiple of 2, got 3"),
        (res({C: 0}), f"{C} must be greater than 0"),
        (res({C: -2}), f"{C} must be greater than 0"),
        (res({C: MAX32 * 2 + 2}), f"{C} must not exceed 4294967294"),
        (res({N: "1500m"}), f"{N} must be an integer"),
    ],
)
def test_admission_refusals_and_texts(resources: dict[str, Any], text: str) -> None:
    with pytest.raises(RequestError) as err:
        F.admit(resources, {})
    assert str(err.value) == text
    # with admission bypassed, HAMi's GenerateResourceRequests asks for nothing
    assert F.generate(resources) is None


@pytest.mark.parametrize(
    ("per_device", "cores", "want"),
    [
        (2, 1, (1, 1)),  # single core takes one device
        (2, 2, (1, 2)),  # a full device is one device
        (2, 6, (3, 2)),  # whole devices divide evenly
        (2, 3, f"{C} must be 1 or a multiple of 2, got 3"),
        (4, 4, (1, 4)),  # inf1: four cores addressed fully
        (4, 3, (1, 3)),
        (4, 8, (2, 4)),
        (4, 5, f"{C} must be 1 or a multiple of 4, got 5"),
        (
            1,
            MAX32 + 1,
            f"{C} needs 2147483648 devices, which exceeds the maximum of 2147483647",
        ),
    ],
)
def test_split_core_request(per_device: int, cores: int, want: tuple[int, int] | str) -> None:
    fam = replace(F, cores_per_device=per_device)
    assert isinstance(fam, Neuron)
    if isinstance(want, str):
        with pytest.raises(RequestError) as err:
            fam.split(cores)
        assert str(err.value) == want
    else:
        assert fam.split(cores) == want


def test_unknown_per_device_cores_falls_back_to_two() -> None:
    assert F.cores_per_device == 2 and F.split(4) == (2, 2)


# --------------------------------------------------------------------- node cards


def test_node_cards_from_capacity() -> None:
    cards = F.cards_from_capacity("test", {N: 1, C: 2}, "inf2")
    assert cards == [
        Card(id="test-AWSNeuron-0", index=0, type="AWSNeuron", count=2, totalmem=0,
             totalcore=0b11, custom={NODE_TYPE: "inf2"})
    ]  # fmt: skip
    with pytest.raises(RequestError, match=f"device not found {N}"):
        F.cards_from_capacity("test", {C: 2})


@pytest.mark.parametrize(("mask", "n"), [(3, 2), (2, 1), (1, 1), (0, 0)])
def test_count_mask(mask: int, n: int) -> None:
    assert awsneuron.popcount(mask) == n


# ---------------------------------------------------------------- pod annotations


def test_pod_annotations_devices() -> None:
    whole = {"whole": True}
    grants = [
        [Grant(0, "test1", "AWSNeuron", 0, 3, whole), Grant(1, "test2", "AWSNeuron", 0, 3, whole)]
    ]
    ann = F.pod_annotations(PodInfo(), grants, node="")
    assert ann[IDS] == "0,1" and ann[PREDICATE_NODE] == "" and RESOURCE_TYPE not in ann
    assert ann[awsneuron.ALLOCATED] == "false"


def test_pod_annotations_cores() -> None:
    ann = F.pod_annotations(PodInfo(), [[Grant(0, "test1", "AWSNeuron", 0, 3)]], node="")
    assert ann[IDS] == "0,1" and ann[RESOURCE_TYPE] == C


def test_pod_annotations_init_container_device() -> None:
    ann = F.pod_annotations(
        PodInfo(), [[Grant(0, "test1", "AWSNeuron", 0, 3, {"whole": True})], []], node=""
    )
    assert ann[IDS] == "0" and RESOURCE_TYPE not in ann


def test_pod_annotations_join_every_containers_ids() -> None:
    """HAMi's PatchAnnotations builds one AWS_NEURON_IDS across the pod's containers."""
    grants = [
        [Grant(0, "a", "AWSNeuron", 0, 0b01)],  # core 0 of device 0
        [Grant(1, "b", "AWSNeuron", 0, 0b10)],  # core 1 of device 1 = node core 3
    ]
    assert F.pod_annotations(PodInfo(), grants, node="n")[IDS] == "0,3"


# ----------------------------------------------------------------------- selection


def devices16(kind: str, used: tuple[int, ...] = (), health: bool = True) -> list[Card]:
    cards = [Card(id=f"d{i}", index=i, health=health) for i in range(16)]
    cards[0].custom = {NODE_TYPE: kind}
    for i in used:
        cards[i].used = 1
    return cards


@pytest.mark.parametrize(
    ("kind", "used", "count", "want"),
    [
        ("inf2", (), 16, list(range(16))),  # full allocate
        ("trn", (7, 13), 8, []),  # aligned runs of 8 both broken
        ("trn", (7,), 8, list(range(8, 16))),
        ("inf", (5, 14), 8, list(range(6, 14))),  # ring: any contiguous run
        ("Inf1", (0,), 2, [1, 2]),
        ("trn", (), 2, []),  # Trn: runs of 1, 4, 8 or 16 only
    ],
)
def test_graph_select(kind: str, used: tuple[int, ...], count: int, want: list[int]) -> None:
    assert awsneuron.graph_select(devices16(kind, used), count) == want


def test_graph_select_needs_the_node_type_and_healthy_devices() -> None:
    cards = devices16("inf2")
    cards[0].custom = {}
    assert awsneuron.graph_select(cards, 2) == []
    assert awsneuron.graph_select(devices16("inf2", health=False), 2) == []


# ----------------------------------------------------------------------------- fit


def dev(
    id: str, index: int, used: int, count: int, usedcores: int = 0, health: bool = True
) -> Card:
    return Card(id=id, index=index, type="AWSNeuron", count=count, used=used, totalmem=0,
                totalcore=0b11, usedcores=usedcores, health=health, custom={NODE_TYPE: "trn"})  # fmt: skip


@pytest.mark.parametrize(
    ("cards", "ask", "annos", "want_ids", "reason"),
    [
        ([dev("dev-0", 0, 0, 2), dev("dev-1", 0, 0, 12)], Ask("AWSNeuron", 1, 0, 0, 2), {}, ["dev-1"], ""),
        ([dev("dev-0", 0, 0, 2)], Ask("AWSNeuron", 2, 0, 0, 2), {}, [], "1/1 NumaNotFit"),
        ([dev("dev-0", 0, 0, 2, usedcores=1)], Ask("AWSNeuron", 1, 0, 0, 2), {}, [], "1/1 CardInsufficientCore"),
        ([dev("dev-0", 0, 0, 2)], Ask("OtherType", 1, 0, 0, 2), {}, [], "1/1 CardTypeMismatch"),
        ([dev("dev-1", 0, 0, 2)], Ask("AWSNeuron", 1, 0, 0, 2),
         {"aws.amazon.com/use-neuron-uuid": "dev-0"}, [], "1/1 CardUuidMismatch"),
        ([dev("dev-0", 0, 0, 2)], Ask("AWSNeuron", 1, 0, 0, 2),
         {"aws.amazon.com/nouse-neuron-uuid": "dev-0"}, [], "1/1 CardUuidMismatch"),
        ([dev("dev-0", 0, 2, 2)], Ask("AWSNeuron", 1, 0, 0, 2), {}, [], "1/1 CardTimeSlicingExhausted"),
        ([dev("dev-0", 0, 1, 2)], Ask("AWSNeuron", 1, 0, 0, 2),
         {"hami.io/gpu-scheduler-policy": "mutex"}, [], "1/1 ExclusiveDeviceAllocateConflict"),
        ([dev("dev-0", 0, 0, 2), dev("dev-1", 1, 0, 2)], Ask("AWSNeuron", 2, 0, 0, 2), {}, [],
         "1/2 NumaNotFit"),
        ([dev("dev-0", 0, 0, 2, health=False)], Ask("AWSNeuron", 1, 0, 0, 2), {}, [], "1/1 CardNotHealth"),
    ],
)  # fmt: skip
def test_fit(
    cards: list[Card], ask: Ask, annos: dict[str, str], want_ids: list[str], reason: str
) -> None:
    got = F.fit(cards, ask, PodInfo(annotations=annos))
    assert got.ok == bool(want_ids)
    assert [g.uuid for g in got.grants] == want_ids
    assert got.text == reason


def test_fit_books_only_the_new_core_bits() -> None:
    """HAMi's Fit grants the device's whole used mask after adding (``addCoreUsage``:
    old bits | new bits) and its AddResourceUsage then adds that mask to Usedcores, so a
    second pod on a device would be given, and named in AWS_NEURON_IDS, the first pod's
    core too. That is a bookkeeping bug; ours grants the new bits alone."""
    cards = [dev("dev-0", 0, 1, 2, usedcores=0b01)]
    got = F.fit(cards, Ask("AWSNeuron", 1, 0, 0, 1), PodInfo())
    assert got.ok and got.grants[0].usedcores == 0b10
    assert F.pod_annotations(PodInfo(), [got.grants], node="n")[IDS] == "1"


def test_multi_device_fit_takes_whole_devices() -> None:
    cards = [replace(dev(f"d{i}", i, 0, 2), custom={NODE_TYPE: "trn1.32xlarge"}) for i in range(8)]
    cards[1].used = 1
    got = F.fit(cards, Ask("AWSNeuron", 4, 0, 0, 2, whole=True), PodInfo())
    assert got.ok and [g.uuid for g in got.grants] == ["d4", "d5", "d6", "d7"]
    assert all(g.usedcores == 0b11 for g in got.grants)
    assert F.pod_annotations(PodInfo(), [got.grants], node="n")[IDS] == "4,5,6,7"
