"""Enflame whole GCUs, cases from HAMi's pkg/device/enflame/gcu_test.go.

Ported: TestInitGCUDevice (annotation names), TestGCUDevices_CommonWord,
TestGCUDevices_MutateAdmission, TestGCUDevices_GetNodeDevices,
TestGCUDevices_PatchAnnotations, TestGCUDevices_GenerateResourceRequests and
TestGCUDevices_Fit. HAMi's GCU fit accepts a request of type ``GCU`` only; its cases
name both card and request with that type.
"""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices import enflame
from shared.devices.base import Ask, Card, Grant, PodInfo, RequestError
from tests.devices.util import res

F = enflame.GCU
GCU = "enflame.com/gcu"


def gcu(id: str = "dev-0", **kw: Any) -> Card:
    base: dict[str, Any] = {"count": 1, "totalmem": 100, "totalcore": 100, "type": "GCU"}
    base.update(kw)
    return Card(id=id, **base)


def test_names() -> None:
    assert F.name == "GCU"
    assert F.to_allocate_annotation == "hami.io/enflame-gcu-devices-to-allocate"
    assert F.allocated_annotation == "hami.io/enflame-gcu-devices-allocated"


@pytest.mark.parametrize(("limits", "found"), [({GCU: 2}, True), ({}, False)])
def test_mutate_admission(limits: dict[str, Any], found: bool) -> None:
    assert F.asks_for(res(limits)) is found


def test_get_node_devices() -> None:
    cards = F.node_cards("testnode", {}, {GCU: 2})
    assert [
        (c.index, c.id, c.count, c.totalmem, c.totalcore, c.type, c.numa, c.health) for c in cards
    ] == [
        (0, "testnode-GCU-0", 1, 100, 100, "GCU", 0, True),
        (1, "testnode-GCU-1", 1, 100, 100, "GCU", 0, True),
    ]
    with pytest.raises(RequestError, match="device not found enflame.com/gcu"):
        F.node_cards("testnode", {}, {})


def test_patch_annotations() -> None:
    assert F.pod_annotations(PodInfo(), []) == {}
    got = F.pod_annotations(PodInfo(), [[Grant(0, "testnode-GCU-0", "GCU", 0, 0)]])
    assert got == {
        "hami.io/enflame-gcu-devices-to-allocate": "testnode-GCU-0,GCU,0,0:;",
        "hami.io/enflame-gcu-devices-allocated": "testnode-GCU-0,GCU,0,0:;",
    }


@pytest.mark.parametrize(
    ("r", "want"),
    [
        (res({GCU: "3"}), Ask("GCU", 3, 100, 100, 100, whole=True)),
        (res(None, {GCU: "2"}), Ask("GCU", 2, 100, 100, 100, whole=True)),
        (res({}, {}), None),
    ],
    ids=["limits", "requests", "not set"],
)
def test_generate(r: dict[str, Any], want: Ask | None) -> None:
    assert F.parse(r) == want


FULL = Ask("GCU", 1, 100, 100, 100)
FIT_CASES: list[tuple[str, list[Card], Ask, list[str], bool, str]] = [
    ("fit success", [gcu("dev-0"), gcu("dev-1", index=1)], FULL, ["dev-1"], True, ""),
    (
        "type mismatch",
        [gcu()],
        Ask("OtherType", 1, 100, 100, 100),
        [],
        False,
        "1/1 CardTypeMismatch",
    ),
    ("device already used", [gcu(used=1)], FULL, [], False, "1/1 ExclusiveDeviceAllocateConflict"),
    (
        "insufficient devices",
        [gcu()],
        Ask("GCU", 2, 100, 100, 100),
        ["dev-0"],
        False,
        "1/1 AllocatedCardsInsufficientRequest",
    ),
]


@pytest.mark.parametrize(
    ("cards", "ask", "want", "ok", "reason"),
    [c[1:] for c in FIT_CASES],
    ids=[c[0] for c in FIT_CASES],
)
def test_fit(cards: list[Card], ask: Ask, want: list[str], ok: bool, reason: str) -> None:
    got = F.fit(cards, ask, PodInfo())
    assert got.ok is ok
    assert [g.uuid for g in got.grants] == want  # HAMi returns the partial pick too
    assert got.text == reason
    if ok:
        assert (got.grants[0].usedmem, got.grants[0].usedcores) == (100, 100)
