"""Huawei Ascend, cases from HAMi's pkg/device/ascend/device_test.go and its device config."""

from __future__ import annotations

import pytest

from shared.devices import ascend
from shared.devices.base import Ask, Grant, PodInfo, RequestError
from shared.devices.registry import REGISTRY
from tests.devices.util import res

P310 = REGISTRY.family("Ascend310P")
B3 = REGISTRY.family("Ascend910B3")
C = REGISTRY.family("Ascend910C")
assert (
    isinstance(P310, ascend.Ascend)
    and isinstance(B3, ascend.Ascend)
    and isinstance(C, ascend.Ascend)
)


# Test_trimMemory with the 310P config (templates 3072/6144/12288, allocatable 21527, capacity 24576)
@pytest.mark.parametrize(
    ("mib", "want"),
    [
        (0, 3072),
        (1, 3072),
        (100, 3072),
        (3071, 3072),
        (3072, 3072),
        (3073, 6144),
        (6143, 6144),
        (6144, 6144),
        (6144, 6144),
        (6145, 12288),
        (12288, 12288),
        (12289, 21527),
        (21527, 21527),
        (21528, 21527),
        (24576, 21527),
        (24577, 0),
    ],
)
def test_trim_memory(mib: int, want: int) -> None:
    assert P310.trim(mib)[0] == want


def test_memory_rounds_up_to_the_template() -> None:
    assert B3.parse(
        res({"huawei.com/Ascend910B3": 1, "huawei.com/Ascend910B3-memory": 10000})
    ) == Ask("Ascend910B3", 1, 16384, 0, 0)
    assert B3.parse(res({"huawei.com/Ascend910B3": 1})) == Ask("Ascend910B3", 1, 65536, 0, 0)
    with pytest.raises(RequestError, match="70000 is invalid"):
        B3.parse(res({"huawei.com/Ascend910B3": 1, "huawei.com/Ascend910B3-memory": 70000}))


def test_many_cards_are_whole_cards() -> None:
    with pytest.raises(RequestError, match="multiple devices"):
        B3.parse(res({"huawei.com/Ascend910B3": 2, "huawei.com/Ascend910B3-memory": 16384}))
    assert B3.parse(res({"huawei.com/Ascend910B3": 2})) == Ask("Ascend910B3", 2, 65536, 0, 0)


def test_910c_in_modules_of_two() -> None:
    assert C.parse(res({"huawei.com/Ascend910C": 1})) == Ask("Ascend910C", 2, 65536, 0, 0)
    with pytest.raises(RequestError, match="must be 1 or 2\\*n, got 3"):
        C.parse(res({"huawei.com/Ascend910C": 3}))


def test_hami_core_takes_memory_as_asked() -> None:
    r = res(
        {
            "huawei.com/Ascend910B3": 1,
            "huawei.com/Ascend910B3-memory": 10000,
            "huawei.com/Ascend910B3-core": 30,
        }
    )
    assert B3.parse(r, {ascend.VNPU_MODE: ascend.HAMI_CORE}) == Ask("Ascend910B3", 1, 10000, 0, 30)


def test_patch_annotations_name_the_template() -> None:
    g = [[Grant(0, "die-0", "Ascend910B3", 16384, 0)]]
    got = B3.pod_annotations(PodInfo(), g)
    assert got["hami.io/Ascend910B3-devices-to-allocate"] == "die-0,Ascend910B3,16384,0:;"
    assert got["huawei.com/Ascend910B3"] == '[{"UUID":"die-0","temp":"vir05_1c_16g"}]'
    soft = B3.pod_annotations(
        PodInfo(annotations={ascend.VNPU_MODE: "hami-core"}),
        [[Grant(0, "die-0", "Ascend910B3", 10000, 30)]],
    )
    assert soft["huawei.com/Ascend910B3"] == '[{"UUID":"die-0","memory":10000,"core":30}]'
