"""Hygon DCU, cases from HAMi's pkg/device/hygon/device_test.go.

Ported: Test_MutateAdmission, Test_GetNodeDevices, Test_checkType, Test_checkUUID,
Test_PatchAnnotations, Test_GenerateResourceRequests and TestDevices_Fit
(Test_checkDCUtype is in tests/devices/test_family_filters.py). HAMi's checkType and
checkUUID are one step of our fit, so their cases run through :meth:`Family.fit`.
"""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices import hygon
from shared.devices.base import Ask, Card, Grant, PodInfo, RequestError
from shared.hami.annotations import AnnotationError
from tests.devices.util import assert_fit, res

F = hygon.FAMILY
NUM, MEM, CORES = "hygon.com/dcunum", "hygon.com/dcumem", "hygon.com/dcucores"
USE_UUID, NOUSE_UUID = "hygon.com/use-gpuuuid", "hygon.com/nouse-gpuuuid"


def dcu(id: str = "dev-0", **kw: Any) -> Card:
    """HAMi's test DeviceUsage: 100 slots, 100 cores, healthy, type DCU."""
    base: dict[str, Any] = {"count": 100, "totalmem": 128, "totalcore": 100, "type": "DCU"}
    base.update(kw)
    return Card(id=id, **base)


def test_mutate_admission_found() -> None:
    r = res({NUM: "1"})
    assert F.asks_for(r)
    assert F.admit(r, {}).resources == r  # HAMi's DCU webhook changes nothing


def test_get_node_devices() -> None:
    cards = F.node_cards("n", {F.register_annotation: "test-0,1,1024,100,DCU,0,true,0,test:"}, {})
    assert [
        (c.id, c.count, c.totalmem, c.totalcore, c.type, c.numa, c.health, c.index) for c in cards
    ] == [("test-0", 1, 1024, 100, "DCU", 0, True, 0)]


@pytest.mark.parametrize(
    ("annos", "error"),
    [
        ({}, "annos not found hami.io/node-dcu-register"),  # no annotation
        ({"hami.io/node-dcu-register": ":"}, "no gpu found on node"),  # no dcu device
        ({"hami.io/node-dcu-register": ""}, "node annotations not decode successfully"),
        # fewer than 7 fields
        ({"hami.io/node-dcu-register": "test-0,1,1024,100,DCU:"}, "not decode successfully"),
    ],
)
def test_get_node_devices_errors(annos: dict[str, str], error: str) -> None:
    with pytest.raises((RequestError, AnnotationError), match=error):
        F.node_cards("n", annos, {})


# Test_checkType: (use-dcutype, card type, request type, fits)
@pytest.mark.parametrize(
    ("req_type", "want"),
    [("DCU", True), ("test", False)],
)
def test_check_type(req_type: str, want: bool) -> None:
    pod = PodInfo(annotations={"hygon.com/use-dcutype": "DCU"})
    got = F.fit([dcu(totalmem=1024)], Ask(req_type, 1, 64, 0, 10), pod)
    assert got.ok is want
    if not want:
        assert got.text == "1/1 CardTypeMismatch"


# Test_checkUUID: (annotations, card ID, fits)
@pytest.mark.parametrize(
    ("annos", "dev_id", "want"),
    [
        ({USE_UUID: "123"}, "123", True),
        ({USE_UUID: "123"}, "456", False),
        ({}, "456", True),
        ({NOUSE_UUID: "123"}, "123", False),
        ({NOUSE_UUID: "123"}, "456", True),
    ],
)
def test_check_uuid(annos: dict[str, str], dev_id: str, want: bool) -> None:
    got = F.fit([dcu(dev_id)], Ask("DCU", 1, 64, 0, 10), PodInfo(annotations=annos))
    assert got.ok is want
    if not want:
        assert got.text == "1/1 CardUuidMismatch"


def test_patch_annotations() -> None:
    got = F.pod_annotations(PodInfo(), [[Grant(1, "test1", "DCU", 2048, 1)]])
    assert got == {
        "hami.io/dcu-devices-to-allocate": "test1,DCU,2048,1:;",
        "hami.io/dcu-devices-allocated": "test1,DCU,2048,1:;",
    }
    assert F.pod_annotations(PodInfo(), []) == {}  # no device


@pytest.mark.parametrize(
    ("r", "want"),
    [
        (res({}, {}), None),  # nothing set
        (
            res({NUM: "1", CORES: "1", MEM: "1024"}, {NUM: "1", CORES: "1", MEM: "1024"}),
            Ask("DCU", 1, 1024, 0, 1),
        ),
        # memory and cores in requests only: read there
        (res({NUM: "1"}, {NUM: "1", CORES: "1", MEM: "1024"}), Ask("DCU", 1, 1024, 0, 1)),
        # no memory at all: the whole card's memory by percentage
        (res({NUM: "1"}, {NUM: "1", CORES: "1"}), Ask("DCU", 1, 0, 100, 1)),
    ],
)
def test_generate(r: dict[str, Any], want: Ask | None) -> None:
    assert F.parse(r) == want


# TestDevices_Fit: (cards, ask, annotations, chosen card IDs or None, reason text)
FIT_CASES: list[tuple[str, list[Card], Ask, dict[str, str], list[str] | None, str]] = [
    ("fit success", [dcu("dev-0"), dcu("dev-1")], Ask("DCU", 1, 64, 0, 50), {}, ["dev-1"], ""),
    (
        "memory not enough",
        [dcu()],
        Ask("DCU", 1, 512, 0, 50),
        {},
        None,
        "1/1 CardInsufficientMemory",
    ),
    (
        "core not enough",
        [dcu(totalmem=1024, usedcores=100)],
        Ask("DCU", 1, 512, 0, 50),
        {},
        None,
        "1/1 CardInsufficientCore",
    ),
    ("type mismatch", [dcu()], Ask("OtherType", 1, 512, 0, 50), {}, None, "1/1 CardTypeMismatch"),
    (
        "use uuid mismatch",
        [dcu("dev-1", totalmem=1280)],
        Ask("DCU", 2, 512, 0, 50),
        {USE_UUID: "dev-0"},
        None,
        "1/1 CardUuidMismatch",
    ),
    (
        "no-use uuid match",
        [dcu("dev-0", totalmem=1280)],
        Ask("DCU", 2, 512, 0, 50),
        {NOUSE_UUID: "dev-0"},
        None,
        "1/1 CardUuidMismatch",
    ),
    (
        "card overused",
        [dcu(totalmem=1280, used=100)],
        Ask("DCU", 1, 512, 0, 50),
        {},
        None,
        "1/1 CardTimeSlicingExhausted",
    ),
    (
        "core limit clamped to 100",
        [dcu(totalmem=1280)],
        Ask("DCU", 1, 512, 0, 120),
        {},
        ["dev-0"],
        "",
    ),
    (
        "card exclusively",
        [dcu(totalmem=1280, used=20)],
        Ask("DCU", 1, 512, 0, 100),
        {},
        None,
        "1/1 ExclusiveDeviceAllocateConflict",
    ),
    (
        "compute units exhausted",
        [dcu(totalmem=1280, used=20, usedcores=100)],
        Ask("DCU", 1, 512, 0, 0),
        {},
        None,
        "1/1 CardComputeUnitsExhausted",
    ),
    (
        "allocated cards insufficient",
        [dcu(totalmem=1280, used=20, usedcores=10)],
        Ask("DCU", 2, 512, 0, 20),
        {},
        None,
        "1/1 AllocatedCardsInsufficientRequest",
    ),
    (
        "memory percentage",
        [dcu(totalmem=1280, used=20, usedcores=10)],
        Ask("DCU", 1, 0, 10, 20),
        {},
        ["dev-0"],
        "",
    ),
]


@pytest.mark.parametrize(
    ("cards", "ask", "annos", "want", "reason"),
    [c[1:] for c in FIT_CASES],
    ids=[c[0] for c in FIT_CASES],
)
def test_fit(
    cards: list[Card], ask: Ask, annos: dict[str, str], want: list[str] | None, reason: str
) -> None:
    assert_fit(F, cards, ask, annos, want, reason)


def test_fit_grants_clamped_cores_and_percentage_memory() -> None:
    got = F.fit([dcu(totalmem=1280)], Ask("DCU", 1, 512, 0, 120), PodInfo())
    assert got.grants[0].usedcores == 100  # HAMi: "core limit can't exceed 100"
    got = F.fit([dcu(totalmem=1280, used=20, usedcores=10)], Ask("DCU", 1, 0, 10, 20), PodInfo())
    assert got.grants[0].usedmem == 128  # 10 % of 1280
