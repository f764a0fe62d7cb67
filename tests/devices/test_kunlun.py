"""Kunlunxin vXPU, cases from HAMi's pkg/device/kunlun/vdevice_test.go."""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices import kunlun
from shared.devices.base import Ask, Grant, PodInfo, RequestError
from tests.devices.util import card, res

F = kunlun.FAMILY
V, VM = "kunlunxin.com/vxpu", "kunlunxin.com/vxpu-memory"


@pytest.mark.parametrize(
    ("mib", "want"),
    [(0, 24576), (24576, 24576), (24577, 49152), (49152, 49152), (49153, 98304), (200000, 98304)],
)
def test_trim_memory(mib: int, want: int) -> None:
    assert kunlun.trim_memory(mib) == want


@pytest.mark.parametrize(
    ("r", "found", "memory"),
    [
        (res(), False, None),
        (res({V: "1"}), True, None),
        (res({V: "1", VM: "30000"}, {}), True, 49152),
        (res({V: "1", VM: "30000"}), True, 49152),
    ],
)
def test_admission(r: dict[str, Any], found: bool, memory: int | None) -> None:
    assert F.asks_for(r) is found
    if found:
        adm = F.admit(r, {})
        if memory is not None:
            assert adm.resources["limits"][VM] == memory and adm.resources["requests"][VM] == memory


@pytest.mark.parametrize(
    ("value", "n", "error"),
    [
        (None, 0, "annos not found hami.io/node-register-xpu"),
        ("not-json", 0, "invalid"),
        ("[]", 0, "no device found on node"),
        (
            '[{"id":"xpu-0","index":0,"count":1,"devmem":98304,"devcore":100,"type":"XPU","health":true}]',
            1,
            None,
        ),
    ],
)
def test_get_node_devices(value: str | None, n: int, error: str | None) -> None:
    annos = {} if value is None else {F.register_annotation: value}
    if error:
        with pytest.raises(RequestError, match=error):
            F.node_cards("n", annos, {})
    else:
        got = F.node_cards("n", annos, {})
        assert len(got) == n and got[0].totalmem == 98304 and got[0].health


def test_patch_annotations() -> None:
    got = F.pod_annotations(PodInfo(), [[Grant(0, "xpu-0", "XPU", 24576, 100)]])
    assert got[F.to_allocate_annotation] and got[F.allocated_annotation]
    assert F.pod_annotations(PodInfo(), []) == {}


@pytest.mark.parametrize(("family", "want"), [("XPU", True), ("other", False)])
def test_check_type(family: str, want: bool) -> None:
    assert F.type_ok(card("x", "XPU"), Ask(family, 1), PodInfo()) is want


@pytest.mark.parametrize(
    ("r", "want"),
    [
        (res(), None),
        (res({V: "1"}), Ask("XPU", 1, 98304, 100, 100)),
        (res(requests={V: "2", VM: "24576"}), Ask("XPU", 2, 24576, 0, 25)),
    ],
)
def test_generate(r: dict[str, Any], want: Ask | None) -> None:
    assert F.generate(r) == want


def test_resource_names() -> None:
    assert (F.resources.count, F.resources.memory, F.resources.cores) == (V, VM, "")


@pytest.mark.parametrize(
    ("used", "usedmem", "memreq", "want"),
    [
        (0, 90000, 20000, False),
        (0, 0, 24576, True),
        (2, 49152, 24576, True),
        (1, 49152, 24576, False),
    ],
)
def test_fit_vxpu(used: int, usedmem: int, memreq: int, want: bool) -> None:
    c = card("x", "XPU", used=used, usedmem=usedmem, totalmem=98304)
    assert kunlun.fit_vxpu(c, Ask("XPU", 1, memreq)) is want


def test_fit_one_size_per_card() -> None:
    cards = [card(f"x{i}", "XPU", index=i, count=4, totalmem=98304) for i in range(8)]
    for c in cards[:4]:  # the first group all hold one half-card slice
        c.used, c.usedmem, c.usedcores = 1, 49152, 50
    quarter = F.parse(res({V: 1, VM: 20000}))
    assert quarter == Ask("XPU", 1, 24576, 0, 25)
    got = F.fit(cards, quarter, PodInfo())
    assert got.ok and got.grants[0].uuid in {f"x{i}" for i in range(4, 8)}
    got = F.fit(cards[:4], quarter, PodInfo())
    assert not got.ok and got.text == "1/1 NumaNotFit"
    half = F.fit(cards[:4], Ask("XPU", 1, 49152, 0, 50), PodInfo())
    assert half.ok
