"""Biren, cases from HAMi's pkg/device/biren/device_test.go (whole cards by count).

Ported: Test_MutateAdmission, Test_GetNodeDevices, Test_checkType, Test_PatchAnnotations,
Test_GenerateResourceRequests and TestDevices_Fit. HAMi's request for a count alone is
``Nums: n, MemPercentagereq: 100``; ours marks it ``whole`` as well.
"""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices import biren
from shared.devices.base import Ask, Card, Grant, PodInfo, RequestError
from shared.hami.annotations import AnnotationError
from tests.devices.util import assert_fit, res

F = biren.FAMILY
GPU, REGISTER = "birentech.com/gpu", "hami.io/node-biren-register"
USE_UUID, NOUSE_UUID = "birentech.com/use-gpuuuid", "birentech.com/nouse-gpuuuid"


def br(id: str = "dev-0", **kw: Any) -> Card:
    base: dict[str, Any] = {"count": 1, "totalmem": 0, "totalcore": 0, "type": "Biren"}
    base.update(kw)
    return Card(id=id, **base)


def test_mutate_admission_found() -> None:
    assert F.asks_for(res({GPU: "1"}))
    assert not F.asks_for(res({}))


def test_get_node_devices() -> None:
    value = (
        '[{"id":"7-0","count":1,"devmem":32768,"type":"Biren","health":true,"devicepairscore":{}}]'
    )
    cards = F.node_cards("n", {REGISTER: value}, {})
    assert [
        (c.id, c.count, c.totalmem, c.totalcore, c.type, c.numa, c.health, c.index) for c in cards
    ] == [
        ("7-0", 1, 32768, 100, "Biren", 0, True, 0)  # devcore forced to 100 for scores
    ]


@pytest.mark.parametrize(
    "annos",
    [{}, {REGISTER: ":"}, {REGISTER: ""}],
    ids=["no annotation", "no biren device", "not decoded"],
)
def test_get_node_devices_errors(annos: dict[str, str]) -> None:
    with pytest.raises((RequestError, AnnotationError)):
        F.node_cards("n", annos, {})


@pytest.mark.parametrize(("req_type", "want"), [("Biren", True), ("test", False)])
def test_check_type(req_type: str, want: bool) -> None:
    got = F.fit([br()], Ask(req_type, 1, 0, 100), PodInfo())
    assert got.ok is want
    assert got.text == ("" if want else "1/1 CardTypeMismatch")


def test_patch_annotations() -> None:
    got = F.pod_annotations(PodInfo(), [[Grant(1, "test1", "Biren", 2048, 1)]])
    assert got == {
        "hami.io/Biren-devices-to-allocate": "test1,Biren,2048,1:;",
        "hami.io/Biren-devices-allocated": "test1,Biren,2048,1:;",
    }
    assert F.pod_annotations(PodInfo(), []) == {}


@pytest.mark.parametrize(
    ("r", "want"),
    [
        (res({}, {}), None),
        (res({GPU: "1"}, {GPU: "1"}), Ask("Biren", 1, 0, 100, 0, whole=True)),
        (res({GPU: "1"}), Ask("Biren", 1, 0, 100, 0, whole=True)),
        (res(None, {GPU: "1"}), Ask("Biren", 1, 0, 100, 0, whole=True)),
    ],
    ids=["nothing", "limits and requests", "limits only", "requests only"],
)
def test_generate(r: dict[str, Any], want: Ask | None) -> None:
    assert F.parse(r) == want


FIT_CASES: list[tuple[str, list[Card], Ask, dict[str, str], list[str] | None, str]] = [
    (
        "fit success",
        [br("dev-0"), br("dev-1", index=1)],
        Ask("Biren", 1, 0, 0, 0),
        {},
        ["dev-1"],
        "",
    ),
    ("type mismatch", [br()], Ask("OtherType", 1, 512, 0, 50), {}, None, "1/1 CardTypeMismatch"),
    (
        "use uuid mismatch",
        [br("dev-1")],
        Ask("Biren", 1),
        {USE_UUID: "dev-0"},
        None,
        "1/1 CardUuidMismatch",
    ),
    (
        "no-use uuid match",
        [br()],
        Ask("Biren", 1),
        {NOUSE_UUID: "dev-0"},
        None,
        "1/1 CardUuidMismatch",
    ),
    ("card overused", [br(used=1)], Ask("Biren", 1), {}, None, "1/1 CardTimeSlicingExhausted"),
    ("too few cards", [br()], Ask("Biren", 2), {}, None, "1/1 AllocatedCardsInsufficientRequest"),
    (
        "mutex rejects a used card",
        [br(used=1, count=2)],
        Ask("Biren", 1),
        {"hami.io/gpu-scheduler-policy": "mutex"},
        None,
        "1/1 ExclusiveDeviceAllocateConflict",
    ),
    (
        "partial allocation of many cards",
        [
            br("dev-0", count=100, totalmem=1280, totalcore=100),
            br("dev-1", index=1, count=100, totalmem=1280, totalcore=100),
        ],
        Ask("Biren", 3, 512, 0, 20),
        {},
        None,
        "2/2 AllocatedCardsInsufficientRequest",
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
