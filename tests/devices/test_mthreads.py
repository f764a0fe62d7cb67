"""Moore Threads, cases from HAMi's pkg/device/mthreads/device_test.go (and rules of device.go)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.devices import mthreads
from shared.devices.base import Ask, Grant, PodInfo, RequestError
from tests.devices.util import card, res

F = mthreads.FAMILY
VGPU, MEM, CORE = "mthreads.com/vgpu", "mthreads.com/sgpu-memory", "mthreads.com/sgpu-core"


# Test_MutateAdmission: (limits, HAMi's "found", HAMi's error or None)
@pytest.mark.parametrize(
    ("limits", "found", "error"),
    [
        ({VGPU: 2, MEM: 2, CORE: 1}, True, None),  # set to resources limit
        ({MEM: 2, CORE: 1}, False, None),  # don't set to count limit
        ({VGPU: 1, CORE: 1}, True, None),  # don't set to memory limit
        ({VGPU: 1, MEM: 2, CORE: 1}, True, None),  # count less than one (a legal size)
        ({VGPU: 1, MEM: 3, CORE: 1}, True, "must be one of 2, 4, 8"),  # memory not a legal slice
    ],
)
def test_admission(limits: dict[str, Any], found: bool, error: str | None) -> None:
    r = res(limits)
    assert F.asks_for(r) is found
    if not found:
        assert F.parse(r) is None
        return
    if error:
        with pytest.raises(RequestError, match=error):
            F.parse(r)
    else:
        assert F.parse(r) is not None


def test_admission_makes_many_cards_whole() -> None:
    adm = F.admit(res({VGPU: 2, MEM: 2, CORE: 1}), {})
    assert adm.resources["limits"][CORE] == 32 and adm.resources["limits"][MEM] == 192
    assert adm.annotations == {mthreads.REQUEST_GPU_NUM: "2"}
    assert F.parse(res({VGPU: 2})) == Ask("Mthreads", 2, 96 * 512, 0, 16, whole=True)
    # one card without memory: the whole card
    assert F.parse(res({VGPU: 1})) == Ask("Mthreads", 1, 96 * 512, 0, 16)


def test_zero_cards_refused() -> None:
    with pytest.raises(RequestError, match="greater than 0"):
        F.parse(res({VGPU: 0}))


# Test_GenerateResourceRequests (HAMi's generator alone, before the webhook)
@pytest.mark.parametrize(
    ("r", "want"),
    [
        (
            res({VGPU: "1", MEM: "1000", CORE: "1"}, {VGPU: "1", MEM: "1000", CORE: "1"}),
            Ask("Mthreads", 1, 512000, 0, 1),
        ),
        (res({}, {MEM: "1000", CORE: "1"}), None),
        (res({}, {VGPU: "1"}), Ask("Mthreads", 1, 0, 100, 0)),
    ],
)
def test_generate(r: dict[str, Any], want: Ask | None) -> None:
    assert F.generate(r) == want


def test_get_node_devices() -> None:
    cards = F.node_cards("test", {}, {MEM: 1, CORE: 1})
    assert [(c.id, c.index, c.count, c.totalmem, c.totalcore, c.type, c.health) for c in cards] == [
        ("test-mthreads-0", 0, 100, 8192, 16, "Mthreads", True)
    ]


def test_patch_annotations() -> None:
    grants = [[Grant(0, "test1", "Mthreads", 1000, 1)]]
    got = F.pod_annotations(PodInfo(), grants, node="")
    assert got[F.allocated_annotation] == "test1,Mthreads,1000,1:;"
    assert got[mthreads.GPU_INDEX] == "0" and got[mthreads.PREDICATE_NODE] == ""


@pytest.mark.parametrize(("family", "want"), [("Mthreads", True), ("test111", False)])
def test_check_type(family: str, want: bool) -> None:
    assert F.type_ok(card("x", "Mthreads"), Ask(family, 1), PodInfo()) is want


@pytest.mark.parametrize(
    ("annos", "dev", "want"),
    [
        ({}, "", True),
        ({"mthreads.ai/use-gpuuuid": "test1"}, "test1", True),
        ({"mthreads.ai/use-gpuuuid": "test1"}, "test2", False),
        ({"mthreads.ai/nouse-gpuuuid": "test1"}, "test1", False),
        ({"mthreads.ai/nouse-gpuuuid": "test1"}, "test2", True),
    ],
)
def test_check_uuid(annos: dict[str, str], dev: str, want: bool) -> None:
    assert F.uuid_ok(card(dev, "Mthreads"), PodInfo(annotations=annos)) is want


@pytest.mark.parametrize(("allocated_uuid", "want"), [("test123", True), ("test456", False)])
def test_custom_filter_one_card_per_pod(allocated_uuid: str, want: bool) -> None:
    pod = PodInfo(allocated={"Mthreads": [[Grant(0, allocated_uuid, "Mthreads", 0, 0)]]})
    assert F.custom_filter(card("test123", "Mthreads"), Ask("Mthreads", 1), pod, []) is want


def _dev(i: str) -> Any:
    return card(i, "Mthreads", count=100, totalmem=128, totalcore=100)


def test_fit_success_takes_last_card() -> None:
    got = F.fit([_dev("dev-0"), _dev("dev-1")], Ask("Mthreads", 1, 64, 0, 50), PodInfo())
    assert got.ok and [g.uuid for g in got.grants] == ["dev-1"]


def test_fit_memory_not_enough() -> None:
    got = F.fit([_dev("dev-0")], Ask("Mthreads", 1, 512, 0, 50), PodInfo())
    assert not got.ok and got.text == "1/1 CardInsufficientMemory"


def test_fit_second_container_stays_on_the_pods_card() -> None:
    pod = PodInfo(allocated={"Mthreads": [[Grant(0, "dev-0", "Mthreads", 8, 1)]]})
    got = F.fit([_dev("dev-0"), _dev("dev-1")], Ask("Mthreads", 1, 8, 0, 1), pod)
    assert got.ok and got.grants[0].uuid == "dev-0"
    assert (
        F.fit([_dev("dev-1")], Ask("Mthreads", 1, 8, 0, 1), pod).text
        == "1/1 CardNotFoundCustomFilterRule"
    )
