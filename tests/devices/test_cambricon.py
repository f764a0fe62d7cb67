"""Cambricon MLU, cases from HAMi's pkg/device/cambricon/device_test.go."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from shared.devices import cambricon
from shared.devices.base import Ask, Grant, PodInfo, ResourceNames
from tests.devices.util import card, res

# HAMi's tests name the count resource cambricon.com/mlu (the flag default); ours is
# the chart's cambricon.com/vmlu, one setting away
F = dataclasses.replace(
    cambricon.FAMILY,
    resources=ResourceNames(
        "cambricon.com/mlu", "cambricon.com/mlu.smlu.vmemory", "", "cambricon.com/mlu.smlu.vcore"
    ),
)
MLU, MEM, CORE = (
    "cambricon.com/mlu",
    "cambricon.com/mlu.smlu.vmemory",
    "cambricon.com/mlu.smlu.vcore",
)


def test_get_node_devices() -> None:
    got = F.node_cards("test", {}, {CORE: 1, MEM: 1})
    assert [
        (c.index, c.id, c.count, c.totalmem, c.totalcore, c.type, c.numa, c.health) for c in got
    ] == [(0, "test-cambricon-mlu-0", 100, 25600, 100, "MLU", 0, True)]


def test_admission_found() -> None:
    assert F.asks_for(res({MLU: "1"}))


@pytest.mark.parametrize(("family", "want"), [("MLU", True), ("TEST", False)])
def test_check_type(family: str, want: bool) -> None:
    assert F.type_ok(card("d", "MLU"), Ask(family, 1), PodInfo()) is want


@pytest.mark.parametrize(
    ("annos", "dev", "want"),
    [
        ({}, "", True),
        ({"cambricon.com/use-gpuuuid": "test123,111"}, "test123", True),
        ({"cambricon.com/nouse-gpuuuid": "test123,111"}, "test123", False),
        ({"cambricon.com/nouse-gpuuuid": "test123,111"}, "test456", True),
        ({"cambricon.com/use-gpuuuid": "test123,111"}, "test456", False),
    ],
)
def test_check_uuid(annos: dict[str, str], dev: str, want: bool) -> None:
    assert F.uuid_ok(card(dev, "MLU"), PodInfo(annotations=annos)) is want


@pytest.mark.parametrize(
    ("r", "want"),
    [
        (res({}, {}), None),
        (
            res({MLU: "1", MEM: "1000", CORE: "2"}, {MLU: "1", MEM: "1000", CORE: "2"}),
            Ask("MLU", 1, 256000, 0, 2),
        ),
        (res({MLU: "1", MEM: "1000"}, {MLU: "1", MEM: "1000"}), Ask("MLU", 1, 256000, 0, 100)),
        (res({MLU: "1", CORE: "2"}, {MLU: "1", CORE: "2"}), Ask("MLU", 1, 0, 100, 2)),
    ],
)
def test_generate(r: dict[str, Any], want: Ask | None) -> None:
    assert F.parse(r) == want


def test_patch_annotations() -> None:
    got = F.pod_annotations(PodInfo(), [[Grant(0, "device-0", "MLU", 256000, 1)]])
    assert got == {
        "CAMBRICON_DSMLU_ASSIGHED": "false",
        "CAMBRICON_DSMLU_PROFILE": "0_1_1000",
        "hami.io/cambricon-mlu-devices-to-allocate": "device-0,MLU,256000,1:;",
        "hami.io/cambricon-mlu-devices-allocated": "device-0,MLU,256000,1:;",
    }
    assert F.pod_annotations(PodInfo(), []) == {}


def test_fit_in_256_mib_units() -> None:
    cards = F.node_cards("n", {}, {CORE: 200, MEM: 4096})  # two cards of 2048 units each
    assert [c.totalmem for c in cards] == [524288, 524288]
    ask = F.parse(res({MLU: 1, MEM: 2048, CORE: 100}))
    assert ask == Ask("MLU", 1, 524288, 0, 100)
    cards[1].used, cards[1].usedmem, cards[1].usedcores = 1, 256, 10
    got = F.fit(cards, ask, PodInfo())
    assert got.ok and got.grants[0].uuid == "n-cambricon-mlu-0"
    got = F.fit(cards[1:], ask, PodInfo())
    assert got.text == "1/1 CardInsufficientMemory"
