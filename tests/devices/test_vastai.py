"""Vastai, cases from HAMi's pkg/device/vastai/device_test.go.

Ported: Test_MutateAdmission, Test_GetNodeDevices, Test_checkType, Test_PatchAnnotations,
Test_GenerateResourceRequests, TestDevices_Fit (die mode and the mutex policy included)
and TestComputeBestCombination.
"""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices import vastai
from shared.devices.base import Ask, Card, Grant, PodInfo, RequestError
from shared.hami.annotations import AnnotationError
from tests.devices.util import assert_fit, res

F = vastai.FAMILY
VA, REGISTER = "vastaitech.com/va", "hami.io/node-va-register"
USE_UUID, NOUSE_UUID = "vastaitech.com/use-gpuuuid", "vastaitech.com/nouse-gpuuuid"
MUTEX = {"hami.io/gpu-scheduler-policy": "mutex"}


def va(id: str = "dev-0", **kw: Any) -> Card:
    base: dict[str, Any] = {"count": 1, "totalmem": 0, "totalcore": 0, "type": "Vastai"}
    base.update(kw)
    return Card(id=id, **base)


def die(id: str, index: int, aic: str, **kw: Any) -> Card:
    return va(id, index=index, custom={"DeviceStrategy": "die", "AIC": aic}, **kw)


def test_mutate_admission_found() -> None:
    assert F.asks_for(res({VA: "1"}))


def test_get_node_devices() -> None:
    value = (
        '[{"id":"7-0","count":1,"devmem":32768,"type":"Vastai","health":true,"devicepairscore":{}}]'
    )
    cards = F.node_cards("n", {REGISTER: value}, {})
    assert [
        (c.id, c.count, c.totalmem, c.totalcore, c.type, c.numa, c.health, c.index) for c in cards
    ] == [("7-0", 1, 32768, 100, "Vastai", 0, True, 0)]


@pytest.mark.parametrize(
    "annos",
    [{}, {REGISTER: ":"}, {REGISTER: ""}],
    ids=["no annotation", "no device", "not decoded"],
)
def test_get_node_devices_errors(annos: dict[str, str]) -> None:
    with pytest.raises((RequestError, AnnotationError)):
        F.node_cards("n", annos, {})


@pytest.mark.parametrize(("req_type", "want"), [("Vastai", True), ("test", False)])
def test_check_type(req_type: str, want: bool) -> None:
    got = F.fit([va()], Ask(req_type, 1, 0, 100), PodInfo())
    assert got.ok is want
    assert got.text == ("" if want else "1/1 CardTypeMismatch")


def test_patch_annotations() -> None:
    got = F.pod_annotations(PodInfo(), [[Grant(1, "test1", "Vastai", 2048, 1)]])
    assert got == {
        "hami.io/Vastai-devices-to-allocate": "test1,Vastai,2048,1:;",
        "hami.io/Vastai-devices-allocated": "test1,Vastai,2048,1:;",
    }
    assert F.pod_annotations(PodInfo(), []) == {}


@pytest.mark.parametrize(
    ("r", "want"),
    [
        (res({}, {}), None),
        (res({VA: "1"}, {VA: "1"}), Ask("Vastai", 1, 0, 100, 0, whole=True)),
        (res({VA: "1"}), Ask("Vastai", 1, 0, 100, 0, whole=True)),
        (res(None, {VA: "1"}), Ask("Vastai", 1, 0, 100, 0, whole=True)),
    ],
    ids=["nothing", "limits and requests", "limits only", "requests only"],
)
def test_generate(r: dict[str, Any], want: Ask | None) -> None:
    assert F.parse(r) == want


FIT_CASES: list[tuple[str, list[Card], Ask, dict[str, str], list[str] | None, str]] = [
    ("fit success", [va("dev-0"), va("dev-1", index=1)], Ask("Vastai", 1), {}, ["dev-1"], ""),
    ("type mismatch", [va()], Ask("OtherType", 1, 512, 0, 50), {}, None, "1/1 CardTypeMismatch"),
    (
        "use uuid mismatch",
        [va("dev-1")],
        Ask("Vastai", 1),
        {USE_UUID: "dev-0"},
        None,
        "1/1 CardUuidMismatch",
    ),
    (
        "no-use uuid match",
        [va()],
        Ask("Vastai", 1),
        {NOUSE_UUID: "dev-0"},
        None,
        "1/1 CardUuidMismatch",
    ),
    ("card overused", [va(used=1)], Ask("Vastai", 1), {}, None, "1/1 CardTimeSlicingExhausted"),
    ("too few cards", [va()], Ask("Vastai", 2), {}, None, "1/1 AllocatedCardsInsufficientRequest"),
    (
        "mutex rejects a used card",
        [va(used=1, count=2)],
        Ask("Vastai", 1),
        MUTEX,
        None,
        "1/1 ExclusiveDeviceAllocateConflict",
    ),
    (
        "mutex die mode: an idle die of a busy card is refused, a free card's die taken",
        [die("dev-0", 0, "1", used=1, count=2), die("dev-1", 1, "1"), die("dev-2", 2, "2")],
        Ask("Vastai", 1),
        MUTEX,
        ["dev-2"],
        "",
    ),
    (
        "mutex die mode: every die of a busy card is refused",
        [die("dev-0", 0, "1", used=1, count=2), die("dev-1", 1, "1")],
        Ask("Vastai", 1),
        MUTEX,
        None,
        "2/2 ExclusiveDeviceAllocateConflict",
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


def grants(*aics: str) -> list[Grant]:
    return [Grant(i + 1, f"dev{i + 1}", "Vastai", 0, 0, {"AIC": a}) for i, a in enumerate(aics)]


@pytest.mark.parametrize(
    ("need", "dies", "want"),
    [
        (2, grants("1", "1", "1"), ["dev1", "dev2"]),  # one card suffices
        (3, grants("1", "1", "1", "2", "2", "3"), ["dev1", "dev2", "dev3"]),  # fullest card
        (4, grants("1", "1", "1", "2", "2", "3"), ["dev1", "dev2", "dev3", "dev4"]),  # across
        (5, grants("1", "1", "2"), ["dev1", "dev2", "dev3"]),  # not enough: all there are
    ],
)
def test_compute_best_combination(need: int, dies: list[Grant], want: list[str]) -> None:
    assert [g.uuid for g in vastai.best_combination(need, dies)] == want
